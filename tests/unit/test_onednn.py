"""Frozen linears packed for oneDNN (posttrain.fastpath.onednn): same values and input gradients as F.linear, forwards
installed and restored, packed copies reused only while the weight is unchanged, LoRA merged without
touching the base."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from posttrain.fastpath import onednn
from posttrain.fastpath.onednn import (PrepackedWeight, frozen_linears, merged_weight, mergeable_lora_layers, prepacked_linears,
                              prepacked_weight)

pytestmark = pytest.mark.skipif(not onednn.available("cpu"), reason="oneDNN packed linears unavailable")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear_with_input_gradient(dtype, tol, bias):
    torch.manual_seed(0)
    w = torch.randn(96, 64, dtype=dtype)
    b = torch.randn(96, dtype=dtype) if bias else None
    x = torch.randn(3, 7, 64, dtype=dtype, requires_grad=True)
    ref = F.linear(x, w, b)
    g = torch.randn_like(ref)
    (gref,) = torch.autograd.grad(ref, x, g)
    pw = PrepackedWeight(w, b)
    out = pw.linear(x)
    (gout,) = torch.autograd.grad(out, x, g)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(gout.float(), gref.float(), rtol=tol, atol=tol)
    # a float32 input to a bf16 packed weight is cast, as autocast would
    assert pw.linear(x.detach().float()).dtype == dtype


def test_a_weight_held_in_bf16_computes_from_itself_without_packed_copies():
    """SFT/DPO/RM hold the frozen base in bf16: forward and input gradient come from the weight itself (no packed
    W, no packed W.T), with the packed copies' values."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=True).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3, 7, 96, dtype=torch.bfloat16)
    ref = PrepackedWeight(lin.weight, lin.bias).linear(x)                        # packed W and W.T
    (gref,) = torch.autograd.grad(ref, x, g)
    with prepacked_linears([lin], torch.bfloat16):
        pw = prepacked_weight(lin)
        assert pw.w is None and pw.wt is None and pw.plain.data_ptr() == lin.weight.data_ptr()  # the weight itself
        out = lin(x)
        (gout,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gout.float(), gref.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gout.float(), (g.float() @ lin.weight.float()), rtol=2e-2, atol=2e-2)
    with prepacked_linears([lin.float()], torch.bfloat16):  # a float32 weight cast to bf16 is packed, W and W.T
        pw = prepacked_weight(lin)
        assert pw.w is not None and pw.wt is not None and pw.plain is None


def test_without_grad_input_a_backward_is_an_error():
    pw = PrepackedWeight(torch.randn(8, 4), grad_input=False)
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="without grad_input"):
        pw.linear(x).sum().backward()


def test_packed_linears_install_restore_and_reuse_until_the_weight_changes():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8).requires_grad_(False)
    x = torch.randn(5, 16)
    cache: dict = {}
    with prepacked_linears([lin], cache=cache):
        first = prepacked_weight(lin)
        assert first is not None
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert prepacked_weight(lin) is None and "forward" not in lin.__dict__  # the module's own forward again
    with prepacked_linears([lin], cache=cache):
        assert prepacked_weight(lin) is first  # unchanged weight: the same packed copy
    with torch.no_grad():
        lin.weight.mul_(2.0)  # an in-place change bumps the version: the copy is stale
    with prepacked_linears([lin], cache=cache):
        assert prepacked_weight(lin) is not first
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert len(cache) == 1  # the stale copy was dropped
    with prepacked_linears([lin], grad_input=False, cache=cache):  # a copy with W.T serves a rollout too
        served = prepacked_weight(lin)
    with prepacked_linears([lin], cache=cache):
        assert prepacked_weight(lin) is served and len(cache) == 1
    with prepacked_linears([lin], torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16


def _lora_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def test_frozen_linears_are_the_base_weights_not_the_adapter():
    model = _lora_model()
    found = frozen_linears(model)
    names = {n for n, m in model.named_modules() if m in found}
    assert names == {"base_model.model.0.base_layer", "base_model.model.2"}
    everything = frozen_linears(model, frozen_only=False)
    assert len(everything) == 4  # + lora_A and lora_B, for a rollout under no_grad


def test_merged_weights_equal_the_adapter_and_leave_the_base_alone():
    model = _lora_model()
    layer = model.base_model.model[0]
    before = layer.base_layer.weight.detach().clone()
    merged = mergeable_lora_layers(model)
    assert merged == [layer]
    x = torch.randn(6, 16)
    w, b = merged_weight(layer)
    torch.testing.assert_close(F.linear(x, w, b), layer(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.base_layer.weight, before)
    with torch.no_grad(), onednn.prepacked_merged_lora(merged):
        torch.testing.assert_close(model(x), model.base_model.model[2](torch.relu(F.linear(x, w, b))), rtol=1e-5,
                                   atol=1e-5)
    assert "forward" not in layer.__dict__


def test_dora_is_not_merged_this_way():
    from peft import LoraConfig, get_peft_model

    base = torch.nn.Sequential(torch.nn.Linear(16, 8))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["0"], use_dora=True))
    assert mergeable_lora_layers(model) is None


def test_available_only_on_cpu_and_can_be_turned_off(monkeypatch):
    assert not onednn.available("meta")
    monkeypatch.setenv("POSTTRAIN_PACKED_LINEAR", "0")
    assert not onednn.available("cpu")


@pytest.mark.parametrize("dtype,tol", [(None, 1e-5), (torch.bfloat16, 3e-2)])
def test_fused_lora_trains_like_peft(dtype, tol):
    """One fused autograd node per LoRA layer over its packed base: PEFT's output and gradients (for the input,
    A and B), the base alone when adapters are disabled, and PEFT's own forward back afterwards."""
    from posttrain.fastpath.fused_lora import fused_lora

    model = _lora_model()
    layer = model.base_model.model[0]
    x = torch.randn(4, 5, 16, requires_grad=True)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]

    def run():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            out = model(x)
        grads = torch.autograd.grad(out.float().pow(2).sum(), [x] + params)
        return out.float(), grads

    ref, ref_grads = run()
    with prepacked_linears(frozen_linears(model), dtype), fused_lora(model):
        assert type(layer.__dict__.get("forward")).__name__ == "FusedForward"
        out, grads = run()
        with model.disable_adapter(), torch.no_grad():
            bare = model(x.detach())
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, float(want.abs().max())))
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(bare.float(), model(x.detach()), rtol=tol, atol=tol)
    assert "forward" not in layer.__dict__


def test_fused_lora_leaves_layers_with_dropout_to_peft():
    from peft import LoraConfig, get_peft_model

    from posttrain.fastpath.fused_lora import fused_lora

    base = torch.nn.Sequential(torch.nn.Linear(16, 8))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["0"], lora_dropout=0.1))
    with prepacked_linears(frozen_linears(model)), fused_lora(model):
        assert "forward" not in model.base_model.model[0].__dict__


def test_layers_reading_one_input_share_its_cast_and_the_saved_copy():
    """q, k and v read the same hidden states: the fused LoRA nodes cast them to bf16 once and save that one tensor,
    with the same gradients as casting each time; an input changed in place, or another input, is cast anew."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    fl = importlib.import_module("posttrain.fastpath.fused_lora")  # the module (the package exports the function)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 97, (2, 9))
    saved = []

    def run(share: bool):
        saved.clear()
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        with (prepacked_linears(frozen_linears(model), torch.bfloat16), fl.fused_lora(model),
              torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)):
            if not share:
                original, fl._cast_once = fl._cast_once, lambda x, dt: x.reshape(-1, x.shape[-1]).to(dt)
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(ids).logits.float().logsumexp(-1).mean()
            finally:
                if not share:
                    fl._cast_once = original
        return loss, torch.autograd.grad(loss, lora)

    loss, grads = run(share=True)
    shared = {t.untyped_storage().data_ptr() for t in saved if t.dtype == torch.bfloat16 and t.shape == (18, 64)}
    loss_each, grads_each = run(share=False)
    each = {t.untyped_storage().data_ptr() for t in saved if t.dtype == torch.bfloat16 and t.shape == (18, 64)}
    assert len(each) - len(shared) == 2 * 2   # q, k, v: 3 copies -> 1, in each of 2 layers (up_proj reads its own)
    assert torch.equal(loss, loss_each) and all(torch.equal(a, b) for a, b in zip(grads, grads_each))

    x = torch.randn(3, 64)
    first = fl._cast_once(x, torch.bfloat16)
    assert fl._cast_once(x, torch.bfloat16) is first
    x.mul_(2)                                           # changed in place: a new cast
    assert not torch.equal(fl._cast_once(x, torch.bfloat16), first)
    assert fl._cast_once(x.clone(), torch.bfloat16) is not fl._cast_once(x, torch.bfloat16)
