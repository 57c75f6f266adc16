"""The fast path's entry points: float32 attention through transformers' registered interface (nothing global
overwritten), and fastpath.training's head giving the same log-probabilities as the model's own head."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from posttrain import fastpath
from posttrain.fastpath.attention import NAME, NAME_SAVED, float32_attention
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
                assert model.config._attn_implementation == NAME_SAVED  # (recompute=True: NAME, below)
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
    k and v saved once, not once per query head (counted with the backward's recompute turned off)."""
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
    with pytest.MonkeyPatch.context() as mp:  # without the recompute (next test), autograd saves what the kernel reads
        mp.setattr("posttrain.fastpath.attention.checkpoint", lambda fn, *args, **kw: fn(*args))
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


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant"])
def test_float32_attention_recomputed_in_the_backward_gives_the_same_bits_and_saves_none_of_its_tensors(checkpointing):
    """A LoRA model with grouped heads and left padding under bf16 autocast: the loss and every LoRA gradient are
    bit-equal with the attention recomputed in the backward and with its tensors saved, also under transformers'
    gradient checkpointing (then it is not recomputed again); with the recompute autograd saves none of the
    kernel's outputs (only q, k and v, as the recompute's inputs)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2)
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()
    model.train()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    ids = torch.randint(0, 97, (3, 10))
    attn = torch.ones_like(ids)
    attn[0, :3] = 0

    def run(recompute: bool):
        saved = []
        with pytest.MonkeyPatch.context() as mp:
            if not recompute:
                mp.setattr("posttrain.fastpath.attention.checkpoint", lambda fn, *args, **kw: fn(*args))
            with float32_attention(model, torch.bfloat16, recompute=True):  # the backward inside it, as trainers do
                assert model.config._attn_implementation == (NAME_SAVED if checkpointing else NAME)
                with (torch.autocast("cpu", dtype=torch.bfloat16),
                      torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)):
                    loss = model(input_ids=ids, attention_mask=attn).logits.float().logsumexp(-1).mean()
                model.zero_grad(set_to_none=True)
                loss.backward()  # (reentrant checkpointing takes backward(), not autograd.grad)
        kernels = {type(t.grad_fn).__name__ for t in saved if t.grad_fn is not None}
        return loss, [p.grad.clone() for p in lora], any("ScaledDotProduct" in k for k in kernels)

    loss, grads, kernel_output_saved = run(recompute=True)
    loss_saved, grads_saved, kernel_output_saved_without = run(recompute=False)
    assert torch.equal(loss, loss_saved)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_saved))
    # without transformers' checkpointing the kernel's float32 output is saved unless recomputed; with it, nothing
    # inside a layer is saved in the forward either way (the attention is not recomputed a second time there)
    assert kernel_output_saved_without == (checkpointing is None)
    assert not kernel_output_saved


def _rss_mb(kind: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(f"Rss{kind}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no Rss{kind} in /proc/self/status")


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="/proc and madvise are Linux's")
def test_holding_a_base_loaded_from_its_file_hands_the_float32_pages_back(tmp_path):
    """A float32 model loaded from its safetensors file is views of one mapping of the file. Holding its frozen
    linears in bf16 reads every float32 page; those pages (and the embedding's) leave the resident set, the weights
    keep their values, the embedding is not copied, and memory that is not a file's is left alone."""
    from peft import LoraConfig, get_peft_model

    from posttrain.fastpath.allocator import page_out
    from posttrain.fastpath.weights import hold_frozen_in

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)  # 40 MB of float32, 16 MB of it embedding
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    emb = model.get_input_embeddings().weight
    want_linear = {n: p.detach().to(torch.bfloat16) for n, p in model.named_parameters()
                   if p.dim() == 2 and "lora_" not in n and "embed" not in n}
    want_emb = emb.detach().clone()  # reads the embedding's pages: resident now
    file_before, anon_before = _rss_mb("File"), _rss_mb("Anon")
    assert hold_frozen_in(model, torch.bfloat16) > 0
    assert file_before - _rss_mb("File") > 30  # float32 linears (24 MB) and embedding (16 MB), less the odd page
    assert _rss_mb("Anon") - anon_before < 20  # the bf16 linears (12 MB), no 16 MB copy of the embedding
    got = {n: p for n, p in model.named_parameters() if n in want_linear}
    assert got.keys() == want_linear.keys() and all(torch.equal(got[n], w) for n, w in want_linear.items())
    assert torch.equal(emb, want_emb)  # read back from the file
    assert page_out([torch.ones(1 << 20)]) == 0  # ordinary memory: not advised


def test_a_lora_down_projection_after_the_gate_recomputes_the_product_with_the_same_bits():
    """Inside the training fast path a LoRA down_proj and the SwiGLU gate are one node: loss and every LoRA gradient
    bit-equal to the separate nodes, and per MLP two intermediate-width tensors saved (gate, up) instead of three."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    ids = torch.randint(0, 97, (2, 9))

    def run(one_node: bool):
        saved = []
        with pytest.MonkeyPatch.context() as mp:
            if not one_node:
                mp.setattr("posttrain.fastpath.swiglu.FusedForward", type(None))  # down_proj stays its own node
            with fastpath.training(model, torch.bfloat16, cache={}):
                with (torch.autocast("cpu", dtype=torch.bfloat16),
                      torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)):
                    hidden = model.base_model.model.model(ids).last_hidden_state
                    loss = hidden.float().logsumexp(-1).mean()
                grads = torch.autograd.grad(loss, lora)
        wide = {t.untyped_storage().data_ptr() for t in saved if t.shape[-1] == 128 and t.numel() == 18 * 128}
        return loss, grads, len(wide)  # activations of the 2 x 9 tokens (not the (4, 128) LoRA A)

    loss, grads, n_one = run(True)
    loss_ref, grads_ref, n_ref = run(False)
    assert torch.equal(loss, loss_ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))
    assert (n_one, n_ref) == (2 * 2, 3 * 2)  # 2 layers
