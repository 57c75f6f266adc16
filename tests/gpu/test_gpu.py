"""GPU checks (``pytest -m gpu tests/gpu``): skipped without CUDA, so CI (CPU only) never runs them;
``scripts/gpu_check.sh`` runs them last on a GPU.

Each test runs a shipped recipe file (``src/posttrain/recipes``) through posttrain's own training function, with
overrides that point it at a tiny random Qwen3 and shrink the steps, so the path is the recipe's: the
TrainingSession (accelerate ``prepare``), gradient checkpointing, the recipe's 8-bit AdamW (when bitsandbytes is
installed), ``init_adapter`` continued by GRPO.

- Qwen3-4B format SFT recipe (bf16 LoRA r32, GC): the loss falls, and the saved adapter, reloaded, lowers the loss
  of the training examples against the same model with the adapter disabled (what trained is what was saved).
- Qwen3-14B QLoRA recipe: the base reloads in 4-bit on CUDA, the loss falls, the reloaded adapter lowers the loss,
  and the run exports to merged 16-bit weights (the 4-bit base dequantized), checked by export's round trip.
- DAPO GRPO recipe continuing the SFT adapter (beta 0.001 reference with adapters disabled, bnpo, min_p, GC):
  every step logged with a finite KL and peak memory, and the adapter moved away from the one it continued.
- flash-attention 2 (when flash-attn is installed): the same logits as sdpa within bf16 tolerance, and the SFT
  recipe trains packed sequences with it.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

OPTIMIZER = "adamw_8bit" if importlib.util.find_spec("bitsandbytes") else "adamw"  # the notebooks' 8-bit AdamW
SYNTHETIC = ["data.path=posttrain.data.synthetic:problems", "data.generator_kwargs={n: 64}"]


def format_sft(model, out, *overrides):
    """The Qwen3-4B format SFT recipe (reasoning template, LoRA r32 alpha 64, GC) on ``model``, learning fast."""
    from posttrain.config import SFTRecipe, load_recipe

    return load_recipe("sft/qwen3-4b-base_openmath_format", [
        f"model.name={model}", "model.device=cuda", *SYNTHETIC,
        "data.columns={problem: problem, solution: solution, answer: answer}", f"output_dir={out}",
        f"train.optimizer={OPTIMIZER}", "train.max_steps=12", "train.lr=5e-3", "train.warmup_steps=1",
        "train.log_every=1", *overrides], SFTRecipe)


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_fell(seen: list[float]) -> None:
    assert all(math.isfinite(x) for x in seen), seen
    assert sum(seen[-3:]) < sum(seen[:3]), seen


def adapter_lowers_loss(run, cfg) -> tuple[float, float]:
    """(loss with the saved adapter, loss with it disabled) of the run's first training examples, reloaded from
    disk as ``posttrain eval``/``export`` load a run."""
    from posttrain import runs
    from posttrain.data.tokenize import prepare_sft_data

    model, tok = runs.load(runs.resolve(str(run)), device="cuda", verbose=False)
    examples = prepare_sft_data(cfg.data, tok)[0][:8]

    @torch.no_grad()
    def loss() -> float:
        total = [float(model(input_ids=torch.tensor([e["input_ids"]], device="cuda"),
                             labels=torch.tensor([e["labels"]], device="cuda")).loss) for e in examples]
        return sum(total) / len(total)

    with_adapter = loss()
    with model.disable_adapter():
        without = loss()
    return with_adapter, without


@pytest.fixture(scope="module")
def format_run(tmp_path_factory):
    from posttrain.sft import train
    from posttrain.tiny import save_tiny_qwen3

    model = save_tiny_qwen3(tmp_path_factory.mktemp("models") / "base", base=True)
    out = tmp_path_factory.mktemp("runs") / "format"
    cfg = format_sft(model, out)
    train(cfg)
    return model, out, cfg


def test_format_sft_recipe_trains_and_saves_what_it_trained(format_run):
    _, out, cfg = format_run
    assert_fell(losses(out))
    assert cfg.model.gradient_checkpointing and cfg.lora.r == 32 and cfg.data.template == "reasoning"
    with_adapter, without = adapter_lowers_loss(out, cfg)
    assert with_adapter < without - 0.1, (with_adapter, without)


def test_qlora_recipe_on_cuda_trains_and_exports(tiny_qwen3, tmp_path):
    pytest.importorskip("bitsandbytes")
    from posttrain import runs
    from posttrain.config import SFTRecipe, load_recipe
    from posttrain.export import export
    from posttrain.sft import train

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"conversations": [
        {"from": "human", "value": f"What is {i % 7} plus {i % 5}?"},
        {"from": "gpt", "value": f"It is {i % 7 + i % 5}."}]}) + "\n" for i in range(64)))
    out = tmp_path / "qlora"
    cfg = load_recipe("sft/qwen3-14b_finetome_qlora", [
        f"model.name={tiny_qwen3}", "model.device=cuda", f"data.path={chats}", f"output_dir={out}",
        "train.max_steps=12", "train.lr=5e-3", "train.warmup_steps=1", "train.log_every=1"], SFTRecipe)
    train(cfg)
    assert_fell(losses(out))
    model, _ = runs.load(runs.resolve(str(out)), device="cuda", verbose=False)
    assert any(p.__class__.__name__ == "Params4bit" and p.is_cuda for p in model.parameters())
    del model
    with_adapter, without = adapter_lowers_loss(out, cfg)
    assert with_adapter < without - 0.1, (with_adapter, without)
    export(str(out), "merged", str(tmp_path / "merged"), device="cuda")  # raises unless its round trip passes
    report = json.loads((tmp_path / "merged" / "export.json").read_text())
    assert report["load_in_4bit"] and report["verification"]["rel_diff"] <= report["verification"]["tolerance"]


def test_dapo_grpo_recipe_continues_the_sft_adapter(format_run, tmp_path):
    from safetensors.torch import load_file

    from posttrain.config import load_recipe
    from posttrain.grpo.config import GRPORecipe
    from posttrain.grpo.loop import train

    model, sft_run, _ = format_run
    out = tmp_path / "grpo"
    cfg = load_recipe("grpo/qwen3-4b-base_dapo_math", [
        f"model.name={model}", "model.device=cuda", *SYNTHETIC,
        "data.columns={problem: problem, solution: null, answer: answer}", f"init_adapter={sft_run / 'adapter'}",
        f"output_dir={out}", f"train.optimizer={OPTIMIZER}", "train.max_steps=2", "grpo.max_completion_length=32",
        "grpo.log_completions_every=0"], GRPORecipe)
    assert cfg.model.gradient_checkpointing and cfg.grpo.beta > 0 and cfg.init_adapter_mode == "continue"
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) and r["peak_memory_mb"] > 0 for r in rows), rows
    start, end = (load_file(str(d / "adapter_model.safetensors")) for d in (sft_run / "adapter", out / "adapter"))
    assert start.keys() == end.keys()
    assert any(not torch.equal(start[k], end[k]) for k in start), "GRPO never changed the adapter it continued"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attention_matches_sdpa_and_trains_packed(format_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from posttrain.sft import train

    model_dir = format_run[0]
    ids = torch.randint(0, 1000, (2, 32), device="cuda")
    logits = {}
    for impl in ("sdpa", "flash_attention_2"):
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=impl).cuda()
        with torch.no_grad():
            logits[impl] = m(input_ids=ids).logits.float()
    assert torch.allclose(logits["sdpa"], logits["flash_attention_2"], atol=5e-2, rtol=5e-2)
    out = tmp_path / "fa"
    train(format_sft(model_dir, out, "model.attn_implementation=flash_attention_2", "train.packing=true",
                     "train.batch_size=2", "data.max_length=256"))
    assert all(math.isfinite(x) for x in losses(out))
