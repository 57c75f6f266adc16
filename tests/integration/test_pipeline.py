"""`posttrain run`: a tiny sft -> grpo -> eval pipeline runs end to end and writes its report with the stages'
numbers; a rerun skips every finished stage without touching it; an interrupted grpo stage resumes from its
checkpoint (and the eval after it is redone); bad pipeline files get errors that name the file and the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain import recipes
from posttrain.errors import UserError
from posttrain.pipeline import load_pipeline, run_pipeline

SFT = """\
model: {{name: {model}}}
lora: {{r: 4, alpha: 8}}
data:
  path: posttrain.data.synthetic:problems
  generator_kwargs: {{split: train, n: 16, difficulty: easy, seed: 0}}
  format: columns
  columns: {{problem: problem, solution: solution, answer: answer}}
  template: reasoning
  max_length: 160
train: {{batch_size: 4, max_steps: 2, lr: 1.0e-3, warmup_steps: 0, save_every: 1, seed: 1}}
"""

GRPO = """\
model: {{name: {model}}}
lora: {{r: 4, alpha: 8}}
data:
  path: posttrain.data.synthetic:problems
  generator_kwargs: {{split: train, n: 16, difficulty: easy, seed: 1}}
  columns: {{problem: problem, solution: null, answer: answer}}
  template: reasoning
  max_length: 256
train: {{batch_size: 8, max_steps: 2, lr: 5.0e-3, warmup_steps: 0, save_every: 1, seed: 2}}
grpo: {{num_generations: 4, max_completion_length: 6, max_prompt_length: 200, log_completions_every: 0}}
rewards: [math_accuracy, {{name: format_exact, weight: 0.2}}, "{reward}:low_ids"]
"""

PIPELINE = """\
model: {model}
stages:
  - {{name: sft, recipe: sft.yaml}}
  - {{name: grpo, recipe: grpo.yaml}}
  - {{name: eval, label: after GRPO, benchmark: synthetic, limit: 4, prompt: reasoning, max_new_tokens: 8,
     batch_size: 4}}
"""


def write_pipeline(tmp_path: Path, model: Path) -> Path:
    (tmp_path / "sft.yaml").write_text(SFT.format(model=model))
    reward = tmp_path / "toy_reward.py"  # varies within a group, so the grpo steps really move the adapter
    reward.write_text("def low_ids(prompts, completions, completion_ids, **columns):\n"
                      "    return [sum(t < 75968 for t in ids) / max(len(ids), 1) for ids in completion_ids]\n")
    (tmp_path / "grpo.yaml").write_text(GRPO.format(model=model, reward=reward))
    path = tmp_path / "pipe.yaml"
    path.write_text(PIPELINE.format(model=model))
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mtimes(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*")
            if p.is_file() and p.parent.name != "plots" and not p.name.startswith("report") and p.name != "pipeline.yaml"}


def test_pipeline_runs_skips_resumes_and_reports(tiny_qwen3, tmp_path, capsys):
    pipe = write_pipeline(tmp_path, tiny_qwen3)
    run = tmp_path / "run"
    run_pipeline(pipe, out=run)

    # every stage finished in its own directory, marked last by DONE; grpo continued the sft adapter
    for name in ("sft", "grpo", "eval"):
        assert (run / name / "DONE").is_file(), name
    assert f"init_adapter: {run / 'sft' / 'adapter'}" in (run / "grpo" / "config.yaml").read_text()
    assert (run / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "grpo" / "adapter" / "adapter_model.safetensors").is_file()

    # the report holds the numbers the stages wrote
    report = (run / "report.md").read_text()
    sft_rows, grpo_rows = rows(run / "sft" / "metrics.jsonl"), rows(run / "grpo" / "metrics.jsonl")
    ev = json.loads((run / "eval" / "metrics.json").read_text())
    assert f"{sft_rows[0]['loss']:.3f}" in report and f"{sft_rows[-1]['loss']:.3f}" in report
    k = max(1, min(5, len(grpo_rows) // 2))
    assert f"| reward | {sum(r['reward'] for r in grpo_rows[:k]) / k:.3f} |" in report
    assert "rewards/math_accuracy/mean" in report and "rewards/low_ids/mean" in report
    lo, hi = ev["ci95"]
    assert f"| after GRPO | 4 | {100 * ev['accuracy']:.1f}% | {100 * lo:.1f}% – {100 * hi:.1f}% |" in report
    for png in ("sft_loss.png", "grpo_reward.png", "completion_length.png", "accuracy.png"):
        assert (run / "plots" / png).stat().st_size > 1000, png
        assert f"plots/{png}" in report
    summary = json.loads((run / "report.json").read_text())
    assert summary["evals"][0]["accuracy"] == ev["accuracy"]

    # a rerun skips everything: nothing retrained or rewritten
    before = mtimes(run)
    capsys.readouterr()
    run_pipeline(pipe, out=run)
    out = capsys.readouterr().out
    assert out.count("done already, skipped") == 3, out
    assert mtimes(run) == before

    # interrupt grpo after its step-1 checkpoint: no DONE, no final adapter, metrics cut at step 1
    final = load_file(str(run / "grpo" / "adapter" / "adapter_model.safetensors"))
    assert (run / "grpo" / "checkpoints" / "step-1").is_dir() or any((run / "grpo" / "checkpoints").iterdir())
    (run / "grpo" / "DONE").unlink()
    for f in (run / "grpo" / "adapter").iterdir():
        f.unlink()
    (run / "grpo" / "adapter").rmdir()
    (run / "grpo" / "metrics.jsonl").write_text(json.dumps(grpo_rows[0]) + "\n")
    capsys.readouterr()
    run_pipeline(pipe, out=run)
    out = capsys.readouterr().out
    assert "sft (sft): done already, skipped" in out
    assert "grpo: resuming from" in out and "resumed from step 1" in out
    assert "redoing eval" in out
    assert [r["step"] for r in rows(run / "grpo" / "metrics.jsonl")] == [1, 2]
    resumed = load_file(str(run / "grpo" / "adapter" / "adapter_model.safetensors"))
    for key in final:  # resume is exact: the same adapter as the uninterrupted run
        assert torch.allclose(final[key], resumed[key], atol=1e-5, rtol=0), key
    after = mtimes(run)
    assert after["sft/adapter/adapter_model.safetensors"] == before["sft/adapter/adapter_model.safetensors"]
    assert after["eval/metrics.json"] != before["eval/metrics.json"]
    assert (run / "eval" / "DONE").is_file()


def test_bad_pipeline_files_name_the_problem(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("stages:\n  - {name: distill, recipe: x.yaml}\n")
    with pytest.raises(UserError, match=r"p.yaml: stages\[0\] \(distill\): unknown stage command 'distill'.*sft, grpo, dpo, rm, eval, export"):
        load_pipeline(p)
    p.write_text("stages:\n  - {name: sft, recipe: missing/sft.yaml}\n")
    with pytest.raises(UserError, match=r"stages\[0\] \(sft\): recipe file missing/sft.yaml not found"):
        load_pipeline(p)
    p.write_text("stages:\n  - {name: eval, benchmark: synthetic, limt: 3}\n")
    with pytest.raises(UserError, match=r"p.yaml: stages\[0\] \(eval, an eval stage\): unknown key 'limt'; "
                                        r"valid keys here: .*\blimit\b"):
        load_pipeline(p)
    p.write_text("stages:\n  - {name: export, format: zip}\n")
    with pytest.raises(UserError, match=r"stages\[0\] \(export, an export stage\): format: .*'merged'.*\(got 'zip'\)"):
        load_pipeline(p)
    p.write_text("stages:\n  - {name: export, format: merged}\n")
    with pytest.raises(UserError, match="before any sft/grpo stage"):
        run_pipeline(p, out=tmp_path / "run")
    with pytest.raises(UserError, match="does not exist"):
        load_pipeline(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted((recipes.ROOT / "pipelines").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_pipelines_load(path):
    pipe = load_pipeline(path)
    assert pipe.stages and all(Path(s.config.recipe).is_file() for s in pipe.stages if s.command in ("sft", "grpo"))


def test_ctrl_c_in_a_stage_then_rerun_continues(tiny_qwen3, tmp_path):
    """A real `posttrain run` process gets SIGINT during sft: it checkpoints, exits with status 2 and says to rerun;
    the rerun resumes sft from that checkpoint (not from step 0) and finishes the pipeline."""
    import os
    import signal
    import subprocess
    import sys

    pipe = write_pipeline(tmp_path, tiny_qwen3)
    pipe.write_text(f"model: {tiny_qwen3}\nstages:\n  - {{name: sft, recipe: sft.yaml, overrides: "
                    "[train.max_steps=12, train.save_every=0]}\n")
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(pipe), "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("[step 2/12]"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=120)[0]
    text = "".join(seen) + rest
    assert proc.returncode == 2, text
    assert "stage sft: interrupted after step" in text and "run the pipeline again" in text
    assert not (run / "sft" / "DONE").exists()
    stopped = json.loads((run / "sft" / "checkpoints").glob("step-*").__next__().joinpath("state.json").read_text())
    assert stopped["step"] >= 2

    run_pipeline(pipe, out=run)
    steps = [r["step"] for r in rows(run / "sft" / "metrics.jsonl")]
    assert steps == list(range(1, 13)) and (run / "sft" / "DONE").is_file()


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../x", ".hidden", "report.md", "pipeline.yaml", "a\\b", "-x"])
def test_a_stage_name_is_a_plain_folder_name(tmp_path, name):
    """The review's C6: a stage named '..' made a rerun delete the run's parent folder."""
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"stages": [{"name": name, "command": "eval", "benchmark": "synthetic"}]}))
    with pytest.raises(UserError, match=r"stages\[0\] .*: a stage name is a plain folder name inside the run "
                                        r"directory .*; rename it"):
        load_pipeline(p)


def test_a_refused_rerun_keeps_pipeline_yaml_and_a_second_runner_is_refused(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("model: m\nstages:\n  - {name: eval_base, command: eval, benchmark: synthetic, limit: 2}\n")
    run = tmp_path / "run"
    (run / "eval_base").mkdir(parents=True)
    (run / "pipeline.yaml").write_text("# the file that ran the finished stage\n")
    (run / "eval_base" / "DONE").write_text(json.dumps({"fingerprint": "of other settings"}))
    with pytest.raises(UserError, match="eval_base .* was finished with a different recipe or settings"):
        run_pipeline(p, out=run)
    assert (run / "pipeline.yaml").read_text() == "# the file that ran the finished stage\n"
    assert not (run / ".lock").exists()  # released on the way out
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom posttrain.runs import lock_run_dir\n"
                               "lock_run_dir(sys.argv[1], 'posttrain run'); print('locked', flush=True); "
                               "time.sleep(120)", str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"{run} is in use by another posttrain process \(PID {holder.pid}"):
            run_pipeline(p, out=run)
    finally:
        holder.kill()
        holder.wait()
