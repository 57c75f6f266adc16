"""The fast path's entry points: float32 attention through transformers' registered interface (nothing global
overwritten), and fastpath.training's head giving the same log-probabilities as the model's own head."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from posttrain import fastpath
from posttrain.fastpath.attention import NAME, float32_attention
from posttrain.losses import module_head, selective_log_softmax


def _tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def test_float32_attention_is_a_registered_implementation_and_is_restored():
    model = _tiny_llama()
    ids = torch.randint(0, 97, (2, 12))
    attn = torch.ones_like(ids)
    attn[0, :4] = 0
    sdpa_before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attn).logits  # float32 throughout
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(input_ids=ids, attention_mask=attn).logits.float()
            with float32_attention(model, torch.bfloat16):
                assert model.config._attn_implementation == NAME
                assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_before  # nothing global replaced
                mixed = model(input_ids=ids, attention_mask=attn).logits.float()
    assert model.config._attn_implementation == "sdpa"
    # float32 attention moves the bf16 forward towards the float32 one (it removes a source of rounding)
    keep = attn.bool()
    assert (mixed - full)[keep].abs().mean() < (bf16 - full)[keep].abs().mean()


def test_float32_attention_does_nothing_without_a_16bit_compute_dtype():
    model = _tiny_llama()
    with float32_attention(model, None):
        assert model.config._attn_implementation == "sdpa"


def test_training_head_gives_the_model_heads_log_probs_and_input_gradient():
    model = _tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    hidden = torch.randn(9, 64, requires_grad=True)
    targets = torch.randint(0, 97, (9,))
    ref, _ = selective_log_softmax(hidden, module_head(model.lm_head), targets)
    (g_ref,) = torch.autograd.grad(ref.sum(), hidden)
    with fastpath.training(model, None, cache={}) as head:
        got, _ = selective_log_softmax(hidden, head, targets)
        (g_got,) = torch.autograd.grad(got.sum(), hidden)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-5)
