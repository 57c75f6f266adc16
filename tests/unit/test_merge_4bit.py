"""Merging an adapter into a 4-bit (QLoRA) base in float32 (export.merge.merge_4bit; gpu-review.md E1), on CPU with
bitsandbytes' CPU 4-bit kernels: the merged weights equal a float32 reference merge (the whole model dequantized to
float32 by transformers, then PEFT's merge), and a 16-bit export is that float32 merge rounded once."""

from __future__ import annotations

import pytest
import torch

from posttrain.config import LoraConfig, ModelConfig
from posttrain.export.merge import dequantized_fp32, merge_4bit
from posttrain.models import apply_lora, load_model

pytest.importorskip("bitsandbytes")


def _qlora(path, dtype: str, use_dora: bool = False):
    torch.manual_seed(0)
    cfg = ModelConfig(name=str(path), load_in_4bit=True, dtype=dtype)
    base, _ = load_model(cfg, LoraConfig(), for_training=False, verbose=False)
    model = apply_lora(base, LoraConfig(r=4, alpha=8, use_dora=use_dora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, cfg


def _reference_fp32(cfg: ModelConfig, adapter_dir):
    """The float32 reference: a fresh 4-bit load made dense by transformers (float32 here), PEFT's merge."""
    from peft import PeftModel

    base, _ = load_model(cfg.model_copy(update={"dtype": "float32"}), LoraConfig(), for_training=False, verbose=False)
    base = base.dequantize()
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_weights_equal_a_float32_reference_merge(tiny_qwen3, tmp_path, use_dora):
    model, cfg = _qlora(tiny_qwen3, "float32", use_dora)
    model.save_pretrained(tmp_path / "adapter")
    merged = merge_4bit(model, "float32")
    ref = _reference_fp32(cfg, tmp_path / "adapter").state_dict()
    got = merged.state_dict()
    assert set(got) == set(ref) and not getattr(merged, "is_loaded_in_4bit", False)
    assert not hasattr(merged.config, "quantization_config")
    for name, w in got.items():
        assert w.dtype is torch.float32, name
        torch.testing.assert_close(w, ref[name], rtol=1e-6, atol=1e-6, msg=name)


def test_a_bf16_export_is_the_float32_merge_rounded_once(tiny_qwen3):
    """A base loaded in bf16 (as on a GPU): the NF4 weight is dequantized to float32, not to bf16, and W + BA is
    rounded to bf16 once. Dequantizing to bf16 and merging in bf16 (the old GPU path) rounds twice and differs."""
    model, _ = _qlora(tiny_qwen3, "bfloat16")
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    w32 = dequantized_fp32(q.get_base_layer().weight)
    expected = (w32 + q.get_delta_weight("default").float()).to(torch.bfloat16)
    w16 = q.get_base_layer().weight.quant_state.dtype  # the load dtype: bnb's default dequantization target
    assert w16 is torch.bfloat16
    import bitsandbytes.functional as bnbf

    twice = (bnbf.dequantize_4bit(q.get_base_layer().weight.data, q.get_base_layer().weight.quant_state)
             + q.get_delta_weight("default").to(torch.bfloat16))
    merged = merge_4bit(model, "bfloat16")
    got = merged.model.layers[0].self_attn.q_proj.weight
    assert got.dtype is torch.bfloat16
    assert torch.equal(got, expected)
    assert not torch.equal(twice, expected)  # the double rounding this replaces is visible on this layer
