"""A pipeline with the preference stages: sft -> rm -> grpo (the verifier's reward plus the rm stage's learned
reward, named through ``{run}``) -> dpo -> eval. Each stage takes the right input (rm and grpo start from the sft
adapter, dpo from grpo's, the eval evaluates dpo's adapter and never the reward model), and the report has the
DPO and reward-model tables and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from posttrain.pipeline import run_pipeline
from tests.integration.test_pipeline import SFT  # the same tiny SFT stage

PAIRS = """\
model: {{name: {model}}}
lora: {{r: 4, alpha: 8}}
data:
  path: posttrain.preference.data:synthetic_pairs
  generator_kwargs: {{split: train, n: 24, difficulty: easy, seed: 0}}
  max_length: 192
  val_size: 8
train: {{batch_size: 4, max_steps: 2, lr: 1.0e-3, warmup_steps: 0, eval_every: 2, seed: 1}}
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
train: {{batch_size: 8, max_steps: 2, lr: 5.0e-3, warmup_steps: 0, seed: 2}}
grpo: {{num_generations: 4, max_completion_length: 6, max_prompt_length: 200, log_completions_every: 0}}
rewards: [math_accuracy]
"""

PIPELINE = """\
model: {model}
stages:
  - {{name: sft, recipe: sft.yaml}}
  - {{name: rm, recipe: rm.yaml}}
  - name: grpo
    recipe: grpo.yaml
    overrides: ["rewards=[math_accuracy, {{name: reward_model, model: '{{run}}/rm', weight: 0.5}}]"]
  - {{name: dpo, recipe: dpo.yaml}}
  - {{name: eval, benchmark: synthetic, limit: 4, prompt: reasoning, max_new_tokens: 8, batch_size: 4}}
  - {{name: grpo_verifier, command: grpo, recipe: grpo.yaml, start_from: sft}}
  - {{name: eval_verifier, command: eval, benchmark: synthetic, limit: 4, prompt: reasoning, max_new_tokens: 8}}
  - {{name: eval_grpo, command: eval, start_from: grpo, benchmark: synthetic, limit: 4, prompt: reasoning,
     max_new_tokens: 8}}
"""


def test_preference_stages_take_the_right_inputs_and_are_reported(tiny_qwen3, tmp_path):
    (tmp_path / "sft.yaml").write_text(SFT.format(model=tiny_qwen3))
    (tmp_path / "rm.yaml").write_text(PAIRS.format(model=tiny_qwen3))
    (tmp_path / "dpo.yaml").write_text(PAIRS.format(model=tiny_qwen3))
    (tmp_path / "grpo.yaml").write_text(GRPO.format(model=tiny_qwen3))
    (tmp_path / "pipe.yaml").write_text(PIPELINE.format(model=tiny_qwen3))
    run = tmp_path / "run"
    run_pipeline(tmp_path / "pipe.yaml", out=run)

    def used(stage):
        return yaml.safe_load((run / stage / "config.yaml").read_text())

    sft_adapter = str(run / "sft" / "adapter")
    assert used("rm")["init_adapter"] == sft_adapter            # the reward model starts from the SFT policy
    assert used("grpo")["init_adapter"] == sft_adapter          # GRPO continues SFT, not the reward model
    assert used("dpo")["init_adapter"] == str(run / "grpo" / "adapter")
    rewards = used("grpo")["rewards"]
    assert {"name": "reward_model", "model": f"{run}/rm", "weight": 0.5}.items() <= rewards[1].items()
    grpo_rows = [json.loads(line) for line in (run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert all("rewards/reward_model/mean" in r for r in grpo_rows if "reward" in r)

    evaluated = json.loads((run / "eval" / "DONE").read_text())
    assert evaluated["adapter"] == str(run / "dpo" / "adapter")

    # start_from: a second GRPO from the same SFT model, and evaluations of each branch
    assert used("grpo_verifier")["init_adapter"] == sft_adapter
    assert "rewards/reward_model/mean" not in (run / "grpo_verifier" / "metrics.jsonl").read_text()
    assert json.loads((run / "eval_verifier" / "DONE").read_text())["adapter"] == str(run / "grpo_verifier" / "adapter")
    assert json.loads((run / "eval_grpo" / "DONE").read_text())["adapter"] == str(run / "grpo" / "adapter")

    report = (run / "report.md").read_text()
    assert "DPO stage `dpo`" in report and "Reward model stage `rm`" in report
    assert "| rewards/accuracies |" in report and "| accuracy |" in report
    # branches (start_from): every evaluation is compared with the first one, not with the branch before it
    assert "Paired differences between each evaluation and the first" in report
    assert "| eval → eval_verifier |" in report and "| eval → eval_grpo |" in report
    assert (run / "plots" / "dpo_accuracy.png").is_file() and (run / "plots" / "rm_accuracy.png").is_file()


def test_start_from_must_name_an_earlier_policy_stage(tiny_qwen3, tmp_path):
    from posttrain.errors import UserError
    from posttrain.pipeline import load_pipeline

    for stage, why in (("rm", "an rm stage, not a policy"), ("later", "no stage named 'later' comes before it")):
        (tmp_path / "p.yaml").write_text(
            f"model: {tiny_qwen3}\nstages:\n  - {{name: sft, recipe: tiny/sft}}\n  - {{name: rm, recipe: tiny/rm}}\n"
            f"  - {{name: grpo, recipe: tiny/grpo, start_from: {stage}}}\n  - {{name: later, command: sft, recipe: tiny/sft}}\n")
        with pytest.raises(UserError, match=why) as err:
            load_pipeline(tmp_path / "p.yaml")
        assert "p.yaml" in str(err.value) and "start_from" in str(err.value) and "['sft']" in str(err.value)


def test_a_stage_is_redone_when_a_stage_it_names_through_run_was_redone(tiny_qwen3, tmp_path, capsys):
    """A grpo stage that scores with '{run}/rm' consumed the rm stage's model, not just the policy before it: when
    the rm stage is redone, the grpo stage is redone too; when nothing changed, both are skipped."""
    (tmp_path / "rm.yaml").write_text(PAIRS.format(model=tiny_qwen3).replace("max_steps: 2", "max_steps: 1"))
    (tmp_path / "grpo.yaml").write_text(GRPO.format(model=tiny_qwen3).replace("max_steps: 2", "max_steps: 1"))
    (tmp_path / "pipe.yaml").write_text(
        f"model: {tiny_qwen3}\nstages:\n  - {{name: rm, recipe: rm.yaml}}\n  - name: grpo\n    recipe: grpo.yaml\n"
        "    overrides: [\"rewards=[{name: reward_model, model: '{run}/rm'}]\"]\n")
    run = tmp_path / "run"

    def finished(stage):
        return json.loads((run / stage / "DONE").read_text())["finished_at"]

    run_pipeline(tmp_path / "pipe.yaml", out=run)
    first = finished("grpo")
    run_pipeline(tmp_path / "pipe.yaml", out=run)
    assert finished("grpo") == first and "grpo (grpo): done already, skipped" in capsys.readouterr().out
    import shutil

    shutil.rmtree(run / "rm")  # the user redoes the reward model
    run_pipeline(tmp_path / "pipe.yaml", out=run)
    assert "its input stage rm was redone since; redoing grpo" in capsys.readouterr().out
    assert finished("grpo") != first
