"""Protocols and published numbers end to end, on tiny real Qwen3 models (random weights, Qwen's vocabulary) and
real GSM8K test problems: `posttrain eval --protocol` prompts, records and reports as documented; a pipeline's
report puts the published numbers beside its greedy evaluations and draws pass@k / maj@k curves from the sampled
evaluations' samples.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.evaluation.fewshot import GSM8K_8SHOT_COT
from posttrain.evaluation.metrics import k_curves
from posttrain.evaluation.report import percent

SHARED = Path(__file__).resolve().parents[3] / "shared" / "benchmarks"
GSM8K = SHARED / "gsm8k.jsonl"
pytestmark = pytest.mark.skipif(not GSM8K.is_file(), reason="needs shared/benchmarks/gsm8k.jsonl")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_cli_protocol_prompts_records_and_prints_published_numbers(tiny_qwen3_base, tmp_path, capsys):
    from posttrain.cli import main

    out = tmp_path / "ev"
    args = ["eval", "--model", str(tiny_qwen3_base), "--benchmark", "gsm8k", "--data-file", str(GSM8K),
            "--limit", "2", "--max-new-tokens", "4", "--out", str(out), "--no-progress"]
    assert main([*args, "--protocol", "gsm8k-8shot"]) == 0
    printed = capsys.readouterr().out
    assert "Published numbers on gsm8k (2 problems here, protocol gsm8k-8shot)" in printed
    dsm = next(line for line in printed.splitlines() if line.startswith("| DeepSeekMath-Base 7B | 64.2 |"))
    assert dsm.endswith("| subset (2 of 1,319) |")

    questions = [json.loads(line)["question"] for line in GSM8K.read_text().splitlines()[:2]]
    rows = _rows(out / "samples.jsonl")
    assert sorted(r["prompt"].rsplit("\n\n\nQ: ", 1)[1] for r in rows) == sorted(f"{q}\nA:" for q in questions)
    assert all(r["prompt"].startswith(f"Q: {GSM8K_8SHOT_COT[0].question}\nA: ") for r in rows)
    m = json.loads((out / "metrics.json").read_text())
    assert m["settings"]["protocol"] == "gsm8k-8shot"
    assert m["settings"]["max_new_tokens"] == 4 and m["settings"]["last_number"] is True  # given; protocol's
    assert json.loads((out / "eval_config.json").read_text())["protocol"] == "gsm8k-8shot"
    # the same directory with another protocol would mix results: refused
    assert main([*args, "--protocol", "lighteval-gsm8k-5shot"]) == 2
    assert "other settings (" in capsys.readouterr().err


PIPELINE = """\
model: {model}
stages:
  - {{name: eval, label: base, benchmark: gsm8k, data_file: {gsm8k}, limit: 3, protocol: boxed-0shot,
     max_new_tokens: 4, batch_size: 3}}
  - {{name: sample_a, command: eval, label: first, benchmark: synthetic, limit: 3, prompt: reasoning,
     max_new_tokens: 4, samples: 4, temperature: 1.0, batch_size: 12}}
  - {{name: sample_b, command: eval, label: second, benchmark: synthetic, limit: 3, prompt: reasoning,
     max_new_tokens: 4, samples: 4, temperature: 1.0, seed: 1, batch_size: 12}}
"""


def test_pipeline_report_shows_references_and_pass_maj_curves(tiny_qwen3, tmp_path):
    from posttrain.pipeline import run_pipeline

    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(PIPELINE.format(model=tiny_qwen3, gsm8k=GSM8K))
    run = run_pipeline(pipe, out=tmp_path / "run")
    report = (run / "report.md").read_text()
    summary = json.loads((run / "report.json").read_text())

    # the greedy evaluation: an accuracy row naming its protocol, the published numbers marked against it
    ev = json.loads((run / "eval" / "metrics.json").read_text())
    assert f"| base | 3 | {100 * ev['accuracy']:.1f}% |" in report and "| protocol boxed-0shot |" in report
    assert "Published numbers on gsm8k, beside ours (3 problems, protocol boxed-0shot)" in report
    rl = next(line for line in report.splitlines() if line.startswith("| DeepSeekMath-RL 7B | 88.2 |"))
    assert rl.endswith("| subset (3 of 1,319) |")
    base = next(line for line in report.splitlines() if line.startswith("| DeepSeekMath-Base 7B | 64.2 |"))
    assert "≠ protocol (ours boxed-0shot, theirs gsm8k-8shot)" in base

    # the sampled evaluations: not accuracy rows, but pass@k / maj@k curves computed from their samples.jsonl
    assert [e["stage"] for e in summary["evals"]] == ["eval"]
    assert [s["stage"] for s in summary["sampled"]] == ["sample_a", "sample_b"]
    assert "## pass@k and maj@k" in report and (run / "plots" / "pass_maj_at_k.png").stat().st_size > 1000
    for stage, label in (("sample_a", "first"), ("sample_b", "second")):
        curves = k_curves(_rows(run / stage / "samples.jsonl"))
        saved = next(s for s in summary["sampled"] if s["stage"] == stage)
        assert saved["k"] == [1, 2, 3, 4] and saved["pass_at_k"] == curves["pass_at_k"]
        assert saved["maj_at_k"] == curves["maj_at_k"]
        metrics = json.loads((run / stage / "metrics.json").read_text())
        assert curves["pass_at_k"][0] == pytest.approx(metrics["accuracy"])        # pass@1 is the mean accuracy
        assert all(a <= b for a, b in zip(curves["pass_at_k"], curves["pass_at_k"][1:]))
        cells = [percent(curves[key][k - 1], "%", "–") for key in ("pass_at_k", "maj_at_k") for k in (1, 2, 4)]
        assert f"| {label} | 3 × 4 | 1.00 | " + " | ".join(cells) + " |" in report
    assert "From first to second: pass@1 " in report
