"""scripts/gpu_check.sh, run as its CPU dry run (``GPU_CHECK_DEVICE=cpu``) on a few checks: the plumbing a person
with a GPU relies on (models built from configs, the shipped recipes with overrides, per-check logs, the verdicts
read from the outputs, the table and results.tsv) works here, and a check whose command exits 0 but whose adapter
never trained is FAIL, as is a check whose command fails; CUDA-only paths are SKIP with their reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def run_script(*args: str, out: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "PYTHON": sys.executable}
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.slow  # about a minute (three real checks on SmolLM2); CI's 30 minutes cannot hold it: -m slow runs it
def test_dry_run_reports_pass_fail_and_skip_from_real_outputs(tmp_path):
    # sft_qlora: one step whose learning rate is 0 (warm-up of 1 step): the command succeeds, the adapter stays zero.
    # eval_hf: an option value the command refuses. fsdp2_sft and unsloth_sft: CUDA only.
    proc = run_script("--only", "sft_format,sft_qlora,eval_hf,fsdp2_sft,unsloth_sft",
                      "--set", "sft_qlora:train.max_steps=1", "--set", "eval_hf:--max-new-tokens=0", out=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a FAIL makes the script fail
    rows = [line.split("\t") for line in (tmp_path / "results.tsv").read_text().splitlines()]
    table = {r[0]: (r[1], r[3]) for r in rows}
    assert [r[0] for r in rows] == ["env", "models", "sft_format", "sft_qlora", "eval_hf", "fsdp2_sft", "unsloth_sft"]
    assert all(len(r) == 4 and r[2].isdigit() for r in rows), rows
    assert table["env"][0] == "PASS" and "cpu (dry run)" in table["env"][1]
    assert table["models"][0] == "PASS" and "head_dim 64" in table["models"][1]
    assert table["sft_format"][0] == "PASS" and table["sft_format"][1].startswith("3 steps, loss "), table
    assert table["sft_qlora"] == ("FAIL", "every lora_B of the saved adapter is zero: the adapter never trained")
    assert table["eval_hf"][0] == "FAIL" and table["eval_hf"][1].startswith("exit 2: posttrain eval: error:"), table
    assert "max_new_tokens" in table["eval_hf"][1]
    assert table["fsdp2_sft"] == ("SKIP", "CUDA only (GPU_CHECK_DEVICE=cpu dry run)")
    assert table["unsloth_sft"] == ("SKIP", "CUDA only (GPU_CHECK_DEVICE=cpu dry run)")
    # the final table repeats every line; the summary counts them
    tail = proc.stdout.split("== posttrain gpu_check on cpu")[1]
    for check, (status, _) in table.items():
        assert any(line.split()[:2] == [status, check] for line in tail.splitlines()), (check, tail)
    assert "3 PASS" in tail and "2 FAIL" in tail and "2 SKIP" in tail
    # the checks ran the shipped recipe files with their overrides (one log per check)
    sft_log = (tmp_path / "logs" / "sft_format.log").read_text()
    assert "src/posttrain/recipes/sft/qwen3-4b-base_openmath_format.yaml" in sft_log.splitlines()[0]
    assert "train.optimizer=adamw_8bit" in sft_log.splitlines()[0]  # the recipe's 8-bit AdamW (bitsandbytes on CPU)
    qlora_cmd = (tmp_path / "logs" / "sft_qlora.log").read_text().splitlines()[0]
    assert "recipes/sft/qwen3-14b_finetome_qlora.yaml" in qlora_cmd and qlora_cmd.endswith("train.max_steps=1")


def test_bad_arguments_are_refused_before_anything_runs():
    for args, message in ((["--only", "sft,nope"], "--only: unknown check or group 'nope'"),
                          (["--set", "nope:x=1"], "--set: unknown check 'nope'"),
                          (["--set", "sft_format"], "--set takes ID:ARG")):
        proc = run_script(*args, timeout=30)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert "PASS" not in proc.stdout


def verdict(*args: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=60, check=False)
    return proc.returncode, proc.stdout.strip()


def fake_run(run: Path, steps: int, losses: list[float], lora_b: float):
    """A run directory as posttrain writes one (config.yaml, metrics.jsonl, adapter/), with chosen values."""
    import numpy as np
    from safetensors.numpy import save_file

    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(f"train:\n  max_steps: {steps}\n")
    (run / "metrics.jsonl").write_text("".join(f'{{"step": {i}, "loss": {x}}}\n' for i, x in enumerate(losses, 1)))
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": np.ones((2, 4), np.float32),
               "base_model.model.layers.0.q_proj.lora_B.weight": np.full((4, 2), lora_b, np.float32)},
              str(run / "adapter" / "adapter_model.safetensors"))
    return run


def test_training_verdicts(tmp_path):
    """The judgements the GPU checks rely on that the dry run above does not reach: a continued adapter that did
    not change, a run that stopped early, a non-finite loss, and the FSDP2 step-1 loss comparison."""
    start = fake_run(tmp_path / "sft", 2, [11.9, 11.5], 0.5)
    assert verdict("train", start) == (0, "2 steps, loss 11.9 -> 11.5")
    assert verdict("train", start, "--init", start / "adapter") == (
        1, f"FAIL: the adapter equals init_adapter {start / 'adapter'}: training never changed it")
    moved = fake_run(tmp_path / "grpo", 2, [0.1, 0.2], 0.25)
    assert verdict("train", moved, "--init", start / "adapter")[0] == 0
    assert verdict("train", fake_run(tmp_path / "short", 3, [11.9, 11.5], 0.5)) == (
        1, "FAIL: metrics.jsonl ends at step 2, not 3")
    assert verdict("train", fake_run(tmp_path / "nan", 2, [11.9, "NaN"], 0.5)) == (1, "FAIL: non-finite loss at steps [2]")
    other = fake_run(tmp_path / "fsdp", 2, [12.5, 11.0], 0.5)
    code, note = verdict("train", other, "--same-first-loss", start)
    assert code == 1 and "step-1 loss 12.5 differs from the single-process run's 11.9" in note
    assert verdict("train", fake_run(tmp_path / "fsdp_ok", 2, [11.95, 11.0], 0.5), "--same-first-loss", start)[0] == 0
