"""posttrain under ``accelerate launch`` with the shipped FSDP2 and DeepSpeed configs, on two CPU processes (gloo).

- FSDP2: accelerate's own preparation of posttrain's loss wrappers (the shipped fsdp2_8gpu.yaml, cut to two
  processes) and posttrain's loops after it. accelerate enables FSDP only on GPUs, so the worker
  (``accelerate_cpu_worker.py``) switches accelerate's CPU state to FSDP by hand; everything after that is the code
  a GPU launch runs. Checked: each decoder layer is its own FSDP unit (accelerate got ``_no_split_modules`` of the
  model inside the wrapper), the sharding is detected, a GRPO rollout before the first training forward works
  (the root's FSDP state is initialized at preparation), each unit's reshard-after-forward setting survives the
  rollouts, SFT and GRPO equal one unsharded process, dynamic sampling keeps the ranks in step, and 8-bit AdamW is
  refused with a message.
- DeepSpeed (when installed): ZeRO-2 SFT and ZeRO-3 GRPO (with a reference KL, so the reference forward and the
  gathered rollout both run) through DeepSpeed's CPU accelerator, equal to one process.

The single-process runs use the fast path's prepacked weights; the sharded runs skip it (their weights are whole
only inside the prepared forward), which is what the tolerances allow for.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import load_recipe
from posttrain.grpo.config import GRPORecipe
from posttrain.grpo.loop import train as grpo_train
from posttrain.sft import train as sft_train

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("accelerate_cpu_worker.py")
CONFIGS = REPO / "src" / "posttrain" / "recipes" / "accelerate"
HALF_VOCAB = 75968
has_deepspeed = importlib.util.find_spec("deepspeed") is not None
LAYERS = [["", "FSDPLossModule"], ["model.base_model.model.model.layers.0", "FSDPQwen3DecoderLayer"],
          ["model.base_model.model.model.layers.1", "FSDPQwen3DecoderLayer"]]


def launch(config: str, tmp_path: Path, name: str, argv: list[str], port: int, deepspeed: bool = False,
           timeout: int = 240) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the worker under ``accelerate launch`` with the shipped ``config`` for two processes."""
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text((CONFIGS / f"{config}.yaml").read_text().replace("num_processes: 8", "num_processes: 2"))
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "--main_process_port",
           str(port), str(WORKER), str(out), *(["--deepspeed"] if deepspeed else []), "--", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return res, (json.loads(out.read_text()) if out.exists() else {})


def adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_adapter(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].shape == b[k].shape, k  # whole tensors, not one rank's shard
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def sft_args(model: Path, out: Path, batch_size: int) -> list[str]:
    return ["sft", "tiny/sft", f"model.name={model}", f"output_dir={out}", "lora.r=4", "lora.alpha=8",
            "data.template=chatml", "data.max_length=64", "data.val_size=0", "train.eval_every=0",
            "train.max_steps=2", "train.warmup_steps=0", f"train.batch_size={batch_size}", "train.lr=5e-3",
            "train.optimizer=adamw", "train.compute_dtype=float32"]  # float32: sharded runs equal one process


def grpo_args(model: Path, rewards: Path, recipe: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    return ["grpo", str(recipe), f"model.name={model}", "data.path=posttrain.data.synthetic:problems",
            "data.generator_kwargs={n: 32}", "data.columns={problem: problem, solution: null, answer: answer}",
            "data.template=chatml", f"output_dir={out}", "lora.r=4", "lora.alpha=8", f"train.batch_size={batch_size}",
            "grpo.num_generations=4", "grpo.max_completion_length=6", "train.lr=5e-3", "train.max_steps=2",
            "grpo.loss_type=dapo", "grpo.scale_rewards=batch", "grpo.log_completions_every=0",
            "grpo.max_prompt_length=64", "grpo.compute_dtype=float32", f"rewards=[{rewards}:{extra[0]}]", *extra[1:]]


@pytest.fixture()
def grpo_files(tmp_path):
    rewards = tmp_path / "toy_rewards.py"
    rewards.write_text(f"HALF_VOCAB = {HALF_VOCAB}\n\n"
                       "def low_ids(prompts, completions, completion_ids, **columns):\n"
                       "    return [sum(t < HALF_VOCAB for t in ids) / max(len(ids), 1) for ids in completion_ids]\n\n"
                       "def half_agree(prompts, completions, completion_ids, answer, **columns):\n"
                       "    # groups of even answers all get 0.5 (no signal: dynamic sampling drops them)\n"
                       "    low = low_ids(prompts, completions, completion_ids)\n"
                       "    return [0.5 if int(a) % 2 == 0 else r for a, r in zip(answer, low)]\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: x}\ndata: {path: x}\n")
    return rewards, recipe


def in_process(argv: list[str]) -> None:
    """The same command line in this process, unsharded (the reference the sharded runs must equal)."""
    if argv[0] == "sft":
        sft_train(load_recipe(argv[1], argv[2:]))
    else:
        grpo_train(load_recipe(argv[1], argv[2:], cls=GRPORecipe))


# ---------------------------------------------------------------------------------------------- FSDP2


def test_fsdp2_sft_wraps_each_decoder_layer_and_equals_one_process(tiny_qwen3, tmp_path):
    argv = sft_args(tiny_qwen3, tmp_path / "fsdp", 2) + ["train.save_every=1"]
    res, rec = launch("fsdp2_8gpu", tmp_path, "fsdp", argv, 29641)
    assert res.returncode == 0 and rec["status"] == 0, res.stdout[-2000:] + res.stderr[-4000:]
    prep = rec["prepared"][0]
    assert prep["kind"] == "fsdp2" and prep["wrapper"] == "LossModule"
    # accelerate received the decoder-layer class of the model inside the wrapper, and made each layer a unit
    assert prep["transformer_cls_names_to_wrap"] == ["Qwen3DecoderLayer"]
    assert [u[:2] for u in prep["units"]] == LAYERS
    assert prep["sharded_inner"] and prep["sharded_prepared"]  # so the adapter is gathered and saved whole
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-1"  # each rank's optimizer shard, whole trainable weights
    assert {p.name for p in ckpt.glob("optimizer-*.pt")} == {"optimizer-0.pt", "optimizer-1.pt"}
    in_process(sft_args(tiny_qwen3, tmp_path / "one", 4))  # the same global batch of 4 in one process
    a, b = metrics(tmp_path / "fsdp"), metrics(tmp_path / "one")
    for key in ("loss", "grad_norm", "target_tokens"):
        assert [m[key] for m in a] == pytest.approx([m[key] for m in b], rel=1e-4), key
    assert_same_adapter(adapter(tmp_path / "fsdp"), adapter(tmp_path / "one"), 5e-4)


def test_fsdp2_grpo_rollout_before_the_first_forward_and_reference_kl(tiny_qwen3, grpo_files, tmp_path):
    """The first rollout runs the decoder layers' FSDP hooks before any forward through the root (it failed with
    "FSDP state has already been lazily initialized" before the root was initialized at preparation)."""
    rewards, recipe = grpo_files
    args = lambda out, bs: grpo_args(tiny_qwen3, rewards, recipe, out, bs, "low_ids", "grpo.beta=0.1")  # noqa: E731
    res, rec = launch("fsdp2_8gpu", tmp_path, "fsdp", args(tmp_path / "fsdp", 4), 29642)
    assert res.returncode == 0 and rec["status"] == 0, res.stdout[-2000:] + res.stderr[-4000:]
    prep = rec["prepared"][0]
    assert [u[:2] for u in prep["units"]] == [["", "FSDPPolicyLogps"], *LAYERS[1:]]
    # the root stays gathered after forward (accelerate's choice), the layers reshard; rollouts leave both so
    assert [u[2] for u in prep["units"]] == [False, True, True]
    assert prep["units_at_finish"] == prep["units"]
    in_process(args(tmp_path / "one", 8))
    a, b = metrics(tmp_path / "fsdp"), metrics(tmp_path / "one")
    for key in ("reward", "loss", "kl", "grad_norm", "completions/mean_length"):
        assert [m[key] for m in a] == pytest.approx([m[key] for m in b], rel=1e-4, abs=1e-7), key
    assert a[1]["kl"] > 0
    assert_same_adapter(adapter(tmp_path / "fsdp"), adapter(tmp_path / "one"), 5e-3)


def test_fsdp2_dynamic_sampling_keeps_ranks_in_step(tiny_qwen3, grpo_files, tmp_path):
    """A rank whose groups are complete still enters the rollout (it holds FSDP's all-gather): before, it went on
    to the next collective alone while the other all-gathered (measured: gloo aborted a rank on the mismatched
    collectives; on NCCL such ranks wait forever)."""
    rewards, recipe = grpo_files
    argv = grpo_args(tiny_qwen3, rewards, recipe, tmp_path / "fsdp", 4, "half_agree", "grpo.dynamic_sampling=true",
                     "grpo.dynamic_sampling_rounds=4", "train.max_steps=3")
    res, rec = launch("fsdp2_8gpu", tmp_path, "fsdp", argv, 29643, timeout=150)
    assert res.returncode == 0 and rec["status"] == 0, res.stdout[-2000:] + res.stderr[-4000:]
    m = metrics(tmp_path / "fsdp")
    # some step needed more rounds for one rank than the other (dropped groups; seeded, so always here)
    assert max(x["dynamic_sampling/rounds"] for x in m) > 1 and sum(x["dynamic_sampling/dropped_groups"] for x in m)


def test_fsdp2_refuses_8bit_adamw_with_what_to_do(tiny_qwen3, tmp_path):
    argv = sft_args(tiny_qwen3, tmp_path / "run", 2)[:-1] + ["train.optimizer=adamw_8bit"]
    res, rec = launch("fsdp2_8gpu", tmp_path, "fsdp", argv, 29644)
    assert res.returncode != 0 and rec["status"] == 2
    assert "train.optimizer=adamw_8bit does not run under FSDP2" in res.stderr
    assert "set train.optimizer=adamw" in res.stderr
    assert f'File "{REPO / "src"}' not in res.stderr  # a message, no traceback of posttrain's (torchrun prints its own)
    assert not (tmp_path / "run" / "adapter").exists()


# ---------------------------------------------------------------------------------------------- DeepSpeed


@pytest.mark.skipif(not has_deepspeed, reason="deepspeed is not installed (pip install 'posttrain[dev]')")
def test_zero2_sft_on_cpu_equals_one_process(tiny_qwen3, tmp_path):
    argv = sft_args(tiny_qwen3, tmp_path / "z2", 2) + ["train.save_every=1"]
    res, rec = launch("zero2", tmp_path, "z2", argv, 29645, deepspeed=True)
    assert res.returncode == 0 and rec["status"] == 0, res.stdout[-2000:] + res.stderr[-4000:]
    prep = rec["prepared"][0]
    # the micro-batch accelerate would otherwise refuse to guess ("auto" without a DataLoader)
    assert prep["kind"] == "deepspeed" and prep["zero_stage"] == 2 and prep["micro_batch"] == 2
    assert prep["sharded_inner"]  # optimizer partitions: saved per rank
    ckpt = tmp_path / "z2" / "checkpoints" / "step-1"
    assert {p.name for p in ckpt.glob("optimizer-*.pt")} == {"optimizer-0.pt", "optimizer-1.pt"}
    in_process(sft_args(tiny_qwen3, tmp_path / "one", 4))
    a, b = metrics(tmp_path / "z2"), metrics(tmp_path / "one")
    # the learning-rate schedule advances (the engine steps only DeepSpeed's own schedulers; it stood still)
    for key in ("loss", "grad_norm", "learning_rate"):
        assert [m[key] for m in a] == pytest.approx([m[key] for m in b], rel=1e-4), key
    assert a[1]["learning_rate"] < a[0]["learning_rate"]
    assert_same_adapter(adapter(tmp_path / "z2"), adapter(tmp_path / "one"), 5e-4)


@pytest.mark.skipif(not has_deepspeed, reason="deepspeed is not installed (pip install 'posttrain[dev]')")
def test_zero3_grpo_on_cpu_equals_one_process(tiny_qwen3, grpo_files, tmp_path):
    """ZeRO-3 partitions every weight: the rollout runs inside GatheredParameters with DeepSpeed's module hooks
    taken off, the reference forward (beta > 0, adapters off) goes through the engine, the adapter is gathered."""
    rewards, recipe = grpo_files
    args = lambda out, bs: grpo_args(tiny_qwen3, rewards, recipe, out, bs, "low_ids", "grpo.beta=0.1")  # noqa: E731
    res, rec = launch("zero3", tmp_path, "z3", args(tmp_path / "z3", 4), 29646, deepspeed=True)
    assert res.returncode == 0 and rec["status"] == 0, res.stdout[-2000:] + res.stderr[-4000:]
    prep = rec["prepared"][0]
    assert prep["zero_stage"] == 3 and prep["micro_batch"] == 4 and prep["sharded_inner"]
    in_process(args(tmp_path / "one", 8))
    a, b = metrics(tmp_path / "z3"), metrics(tmp_path / "one")
    for key in ("reward", "loss", "kl", "completions/mean_length", "learning_rate", "grad_norm"):
        assert [m[key] for m in a] == pytest.approx([m[key] for m in b], rel=1e-4, abs=1e-7), key
    assert_same_adapter(adapter(tmp_path / "z3"), adapter(tmp_path / "one"), 5e-3)
