"""The fast path's entry points: float32 attention through transformers' registered interface (nothing global
overwritten), and fastpath.training's head giving the same log-probabilities as the model's own head."""

from __future__ import annotations

import pytest
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


def test_a_bf16_head_dtype_computes_the_logits_as_bf16_autocast_does_and_float32_stays_the_default():
    """SFT's head computes in its compute dtype (as under TRL's bf16 autocast); GRPO's and DPO's keep float32."""
    if not fastpath.onednn.available("cpu"):
        pytest.skip("packed heads need oneDNN")
    model = _tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    hidden = torch.randn(9, 64, requires_grad=True)
    targets = torch.randint(0, 97, (9,))
    w = model.lm_head.weight
    bf16_logits = torch.nn.functional.linear(hidden.detach().bfloat16(), w.bfloat16()).float()
    with fastpath.training(model, torch.bfloat16, cache={}, head_dtype=torch.bfloat16) as head:
        assert head.forward(hidden).dtype == torch.bfloat16
        torch.testing.assert_close(head.forward(hidden.detach()).float(), bf16_logits, rtol=0, atol=1e-2)
        got, _ = selective_log_softmax(hidden, head, targets)
        (g_got,) = torch.autograd.grad(got.sum(), hidden)
    assert g_got.dtype == torch.float32 and g_got.abs().sum() > 0
    with fastpath.training(model, torch.bfloat16, cache={}) as head:
        assert head.forward(hidden).dtype == torch.float32
    h = hidden.detach()
    with fastpath.rollout(model, torch.bfloat16, cache={}, head_dtype=torch.bfloat16) as weights:
        got = weights.head(h)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, bf16_logits, rtol=0, atol=1e-2)
    with fastpath.rollout(model, torch.bfloat16, cache={}) as weights:
        full = weights.head(h)
    torch.testing.assert_close(full, torch.nn.functional.linear(h, w), rtol=1e-5, atol=1e-5)
    assert not torch.equal(full, got)


def _lora_loss_and_grads(model, hold: bool):
    """One bf16 fast-path forward and backward of a LoRA model: (loss, LoRA gradients)."""
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    cache: dict = {}
    for _ in range(2):  # the second call reuses the cache (held weights, packed copies)
        model.zero_grad()
        with fastpath.training(model, torch.bfloat16, cache=cache, hold=hold):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
            loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_holding_the_frozen_base_in_bf16_frees_its_float32_copy_with_the_same_results():
    from peft import LoraConfig, get_peft_model

    def lora_model():
        return get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))

    plain, held = lora_model(), lora_model()
    with torch.no_grad():  # the same weights in both, with a non-zero B so the adapter matters
        for (name, a), (_, b) in zip(plain.named_parameters(), held.named_parameters()):
            if "lora_B" in name:
                a.normal_(0, 0.05)
            b.copy_(a)
    loss_plain, grads_plain = _lora_loss_and_grads(plain, hold=False)
    loss_held, grads_held = _lora_loss_and_grads(held, hold=True)
    assert torch.equal(loss_plain, loss_held)
    for name, g in grads_plain.items():
        assert torch.equal(g, grads_held[name]), name
    dtypes = {n: p.dtype for n, p in held.named_parameters()}
    frozen_linear = [n for n in dtypes if "base_layer.weight" in n or n.endswith("k_proj.weight")]
    assert frozen_linear and all(dtypes[n] == torch.bfloat16 for n in frozen_linear)
    kept = [n for n in dtypes if "lora_" in n or "embed" in n or "norm" in n]
    assert kept and all(dtypes[n] == torch.float32 for n in kept)
    assert all(p.dtype == torch.float32 for p in plain.parameters())  # without hold nothing stays changed


def test_float32_attention_keeps_grouped_key_value_heads_grouped_with_transformers_values():
    """With a padding mask transformers' sdpa repeats k and v for every query head (and autograd saves the copies);
    the float32 attention passes the 3 key/value heads to torch's GQA kernel: the same output and gradients, and
    k and v saved once, not once per query head."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from posttrain.fastpath.attention import sdpa_float32

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    B, T, S = 4, 5, 11                                    # 5 new tokens on a 6-token cache
    q = torch.randn(B, 9, T, 64, requires_grad=True)
    k, v = (torch.randn(B, 3, S, 64, requires_grad=True) for _ in range(2))
    mask = torch.ones(B, 1, T, S, dtype=torch.bool).tril(S - T)
    mask[0, :, :, :2] = False                              # left padding in one row
    g = torch.randn(B, T, 9, 64)

    def run(fn):
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, _ = fn(module, q, k, v, mask, dropout=0.0, scaling=0.125)
        return out, torch.autograd.grad(out, (q, k, v), g), sum(saved.values())

    want, want_grads, want_saved = run(sdpa_attention_forward)
    got, got_grads, got_saved = run(sdpa_float32)
    assert got.shape == want.shape == (B, T, 9, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert want_saved - got_saved == 2 * (9 - 3) * B * S * 64 * 4  # no repeated k and v (float32) saved


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_the_fused_swiglu_gate_gives_the_same_bits_and_saves_one_tensor_less_per_mlp(family):
    """The MLP's gate as one node: loss and every gradient (LoRA and a trained full MLP weight) bit-equal to
    transformers' two nodes, under bf16 autocast and in float32; the saved tensors lose exactly the SiLU outputs;
    the MLPs' forward is restored after."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config

    from posttrain.fastpath.swiglu import fused_swiglu

    torch.manual_seed(0)
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
    cfg = LlamaConfig(**kw) if family == "llama" else Qwen3Config(head_dim=16, **kw)
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    down = model.base_model.model.model.layers[0].mlp.down_proj.weight
    down.requires_grad_(True)  # a trained weight after the gate: its gradient reads the product
    trained = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, 97, (2, 9))

    def run(fused: bool, dtype):
        saved = []
        with (fused_swiglu(model) if fused else torch.enable_grad(),
              torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16),
              torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)):
            loss = model(ids).logits.float().logsumexp(-1).mean()
        wide = {t.untyped_storage().data_ptr() for t in saved if t.shape[-1] == 128}
        return loss, torch.autograd.grad(loss, trained), len(wide)

    for dtype in (torch.bfloat16, torch.float32):
        loss, grads, n_fused = run(True, dtype)
        loss_ref, grads_ref, n_ref = run(False, dtype)
        assert torch.equal(loss, loss_ref)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))
        assert n_ref - n_fused == 2  # silu(gate) of each of the 2 layers is no longer saved
    mlps = [m for m in model.modules() if type(m).__name__.endswith("MLP")]
    assert len(mlps) == 2 and all("forward" not in m.__dict__ for m in mlps)
