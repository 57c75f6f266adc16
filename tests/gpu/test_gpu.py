"""GPU checks (``pytest -m gpu tests/gpu``): skipped without CUDA, so CI (CPU only) never runs them.

- QLoRA: a 4-bit NF4 base on CUDA trains a few steps; the adapter moves, every base weight (the packed 4-bit
  data included) stays bit-identical, and the loss falls.
- bf16: a bf16 model trains through the SFT loop with finite, falling loss and float32-accumulated log-probs.
- flash-attention 2 (when flash-attn is installed): the same logits as sdpa within bf16 tolerance, and packed
  sequences train.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def chats(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i % 7} plus {i % 5}?"},
                          {"role": "assistant", "content": f"It is {i % 7 + i % 5}."}]} for i in range(n)]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chats(32)))
    return path


def recipe(model, data, out, *overrides):
    from posttrain.config import load_recipe

    return load_recipe(None, [f"model.name={model}", f"data.path={data}", f"output_dir={out}", "data.template=chatml",
                              "data.max_length=128", "lora.r=8", "lora.alpha=16", "train.lr=5e-3",
                              "train.warmup_steps=0", "train.batch_size=8", "model.device=cuda", *overrides])


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_qlora_4bit_on_cuda_trains_only_the_adapter(tiny_qwen3, data_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    from posttrain.data.tokenize import prepare_sft_data
    from posttrain.models import load_model
    from posttrain.optim import build_optimizer
    from posttrain.sft import LossModule, collate

    cfg = recipe(tiny_qwen3, data_file, tmp_path / "q", "model.load_in_4bit=true", "model.dtype=bfloat16")
    model, tok = load_model(cfg.model, cfg.lora, verbose=False)
    assert any(p.__class__.__name__ == "Params4bit" and p.is_cuda for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    examples, _, _ = prepare_sft_data(cfg.data, tok)
    batch = collate(examples[:8], tok.pad_token_id, packed=False)
    module, opt = LossModule(model, 64), build_optimizer(model, cfg.train)
    seen = []
    for _ in range(4):
        targets = int((batch["labels"] != -100).sum())
        loss = module(batch["input_ids"].cuda(), batch["attention_mask"].cuda(), batch["position_ids"].cuda(),
                      batch["labels"].cuda()) / targets
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen.append(float(loss))
    assert seen[-1] < seen[0], seen
    for n, p in model.named_parameters():
        if not p.requires_grad:  # the 4-bit packed base, norms, embeddings: bit-identical
            assert torch.equal(p.detach(), before[n]), f"frozen weight {n} changed"
        else:
            assert "lora_" in n, n
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if "lora_B" in n)


def test_bf16_sft_run(tiny_qwen3, data_file, tmp_path):
    from posttrain.sft import train

    out = tmp_path / "bf16"
    train(recipe(tiny_qwen3, data_file, out, "model.dtype=bfloat16", "train.max_steps=6", "train.lr=1e-2"))
    seen = losses(out)
    assert all(torch.isfinite(torch.tensor(seen))) and seen[-1] < seen[0], seen
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(v.float().abs().max() > 0 for k, v in saved.items() if "lora_B" in k)


def test_bf16_grpo_step(tiny_qwen3, tmp_path):
    from posttrain.config import load_recipe
    from posttrain.grpo.loop import train
    from posttrain.grpo.config import GRPORecipe

    def short(prompts, completions, completion_ids, **columns):
        return [1.0 / (1 + len(ids)) for ids in completion_ids]

    cfg = load_recipe(None, [f"model.name={tiny_qwen3}", "data.path=posttrain.data.synthetic:problems",
                             "data.generator_kwargs={n: 16}", "data.columns={problem: problem, solution: null, answer: answer}",
                             "data.template=chatml", f"output_dir={tmp_path / 'g'}", "lora.r=4", "lora.alpha=8",
                             "train.batch_size=8", "grpo.num_generations=4", "grpo.max_completion_length=8",
                             "train.max_steps=2", "model.dtype=bfloat16", "model.device=cuda",
                             "grpo.log_completions_every=0", "grpo.max_prompt_length=64",
                             "grpo.importance_sampling_cap=2.0"], cls=GRPORecipe)
    train(cfg, reward_funcs=[short])
    rows = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["peak_memory_mb"] > 0 for r in rows)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attention_matches_sdpa_and_trains_packed(tiny_qwen3, data_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from posttrain.sft import train

    ids = torch.randint(0, 1000, (2, 32), device="cuda")
    logits = {}
    for impl in ("sdpa", "flash_attention_2"):
        m = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.bfloat16, attn_implementation=impl).cuda()
        with torch.no_grad():
            logits[impl] = m(input_ids=ids).logits.float()
    assert torch.allclose(logits["sdpa"], logits["flash_attention_2"], atol=5e-2, rtol=5e-2)
    out = tmp_path / "fa"
    train(recipe(tiny_qwen3, data_file, out, "model.dtype=bfloat16", "model.attn_implementation=flash_attention_2",
                 "train.packing=true", "train.max_steps=3"))
    assert all(torch.isfinite(torch.tensor(losses(out))))
