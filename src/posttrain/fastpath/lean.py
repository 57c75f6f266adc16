"""A lean decoder forward for generation on CPU: Llama-family layers (Llama, Mistral, Qwen2, Qwen3) run as
a few fused, packed matmuls over a preallocated KV cache.

Why: at a decode step of 16 rows, SmolLM2-135M's matmuls take ~10 ms, but transformers' forward around them
(a ``DynamicCache`` that concatenates every layer's keys and values at every step, masks rebuilt per step,
three q/k/v and two gate/up matmuls, module dispatch) took ~30 ms more. Here, per layer and step:

- one matmul for q, k and v and one for gate and up (weights concatenated, LoRA merged in: ``W + BA``), each
  packed for oneDNN (:mod:`posttrain.fastpath.onednn`), in the compute dtype;
- keys and values written in place into a cache allocated once for prompt + ``max_new_tokens``;
- RMSNorm, rotary embedding (the model's own rotary module, so every RoPE scaling variant is the model's),
  ``scaled_dot_product_attention`` with grouped-query heads, and SiLU gating, as transformers computes them.

The residual stream, norms, rotary angles, the KV cache and attention stay in float32 (as under transformers +
autocast on CPU); the matmuls run in the compute dtype. In float32 its logits equal transformers' to ~1e-5 (tested).
Only what it supports runs here (:func:`unsupported` says why not); everything else uses transformers' forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.fastpath.onednn import PrepackedWeight, merged_weight

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def unsupported(model) -> str | None:
    """Why the lean forward cannot run ``model`` (a reason), or None when it can."""
    from posttrain.models import decoder_and_head

    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in FAMILIES:
        return f"model type {kind!r} (supported: {', '.join(FAMILIES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    decoder, _ = decoder_and_head(model)
    for p in decoder.parameters():
        if p.__class__ is not torch.nn.Parameter or p.dtype not in (torch.float32, torch.bfloat16):
            return f"{p.__class__.__name__} weights of dtype {p.dtype} (packed matmuls need float32 or bfloat16)"
    for layer in getattr(decoder, "layers", []):
        attn, mlp = layer.self_attn, layer.mlp
        if getattr(attn, "sliding_window", None):
            return "sliding-window attention"
        if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "attention without q/k/v/o projections"
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return "MLP without gate/up/down projections"
    if not hasattr(decoder, "rotary_emb"):
        return "no rotary embedding module"
    return None


def _weight(module, lora: set, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The effective (weight in ``dtype``, bias) of a projection: ``W + BA`` when it is a LoRA layer."""
    if module in lora:
        return merged_weight(module, dtype)
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base.weight.detach().to(dtype), base.bias


def _fused(modules, lora: set, dtype: torch.dtype, rows_hint: int) -> PrepackedWeight:
    """One packed weight for several projections of the same input (their outputs concatenated)."""
    parts = [_weight(m, lora, dtype) for m in modules]
    weight = torch.cat([w for w, _ in parts]) if len(parts) > 1 else parts[0][0]
    bias = None
    if any(b is not None for _, b in parts):
        bias = torch.cat([b.detach().to(dtype) if b is not None else w.new_zeros(w.shape[0], dtype=dtype)
                          for w, b in parts])
    return PrepackedWeight(weight, bias, grad_input=False, rows_hint=rows_hint)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm on a float32 input: ``weight * (x / sqrt(mean(x^2) + eps))``."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float,
                      shared: int) -> torch.Tensor:
    """One decode step's attention, grouped: ``q`` (R, KV, G, D) against ``k``, ``v`` (R, KV, L, D), ``keep``
    (R, 1, 1, L). The first ``shared`` columns are the same in every row: they are read once, from row 0, in
    one matmul for all rows, instead of once per row (at 360 rows the keys and values read per step halve)."""
    R, KV, G, D = q.shape
    scores = q @ k[:, :, shared:].transpose(-1, -2)
    if shared:
        q_all = q.transpose(0, 1).reshape(KV, R * G, D)
        head = (q_all @ k[0, :, :shared].transpose(-1, -2)).view(KV, R, G, shared).transpose(0, 1)
        scores = torch.cat([head, scores], dim=-1)
    probs = torch.softmax(scores.mul_(scale).masked_fill_(~keep, float("-inf")), -1)
    out = probs[..., shared:] @ v[:, :, shared:]
    if shared:
        p_all = probs[..., :shared].transpose(0, 1).reshape(KV, R * G, shared)
        out += (p_all @ v[0, :, :shared]).view(KV, R, G, D).transpose(0, 1)
    return out


class LeanDecoder:
    """Packed weights of one rollout (build one per rollout: the LoRA deltas change every step) and the forward.

    ``lora``: the model's LoRA layers (:func:`posttrain.fastpath.onednn.mergeable_lora_layers`), merged into the packed
    weights; ``dtype``: the matmul dtype (None: the weights' own)."""

    @torch.no_grad()
    def __init__(self, model, lora: list, dtype: torch.dtype | None, rows_hint: int = 16):
        from posttrain.models import decoder_and_head

        self.decoder, _ = decoder_and_head(model)
        first = self.decoder.layers[0].self_attn
        self.dtype = dtype or self.decoder.embed_tokens.weight.dtype
        self.head_dim = first.head_dim
        cfg = model.config
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.layers = []
        merged = set(lora)
        for layer in self.decoder.layers:
            a, m = layer.self_attn, layer.mlp
            qk_norm = None
            if hasattr(a, "q_norm"):  # Qwen3: RMSNorm over each head's q and k, before the rotation
                qk_norm = (torch.cat([a.q_norm.weight.expand(self.n_heads, -1),
                                      a.k_norm.weight.expand(self.n_kv, -1)]).float(), a.q_norm.variance_epsilon)
            self.layers.append({
                "ln1": (layer.input_layernorm.weight.float(), layer.input_layernorm.variance_epsilon),
                "ln2": (layer.post_attention_layernorm.weight.float(), layer.post_attention_layernorm.variance_epsilon),
                "qkv": _fused([a.q_proj, a.k_proj, a.v_proj], merged, self.dtype, rows_hint),
                "o": _fused([a.o_proj], merged, self.dtype, rows_hint),
                "gate_up": _fused([m.gate_proj, m.up_proj], merged, self.dtype, rows_hint),
                "down": _fused([m.down_proj], merged, self.dtype, rows_hint),
                "qk_norm": qk_norm, "scale": a.scaling,
            })
        self.norm = (self.decoder.norm.weight.float(), self.decoder.norm.variance_epsilon)

    def new_cache(self, rows: int, length: int, device) -> torch.Tensor:
        """Keys and values of every layer: ``(layers, 2, rows, kv_heads, length, head_dim)``, float32 (CPU
        attention is 6x faster in float32 than in bfloat16 at decode shapes, and the cache is small)."""
        return torch.zeros((len(self.layers), 2, rows, self.n_kv, length, self.head_dim), dtype=torch.float32,
                           device=device)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor, cache: torch.Tensor,
                start: int, shared: int = 0) -> torch.Tensor:
        """Final hidden states (float32) of the last column of ``ids`` (R, T), whose tokens sit at cache columns
        ``start .. start + T - 1`` with position ids ``positions`` (R, T). ``keep`` (R, 1, T, start + T) is the
        boolean attention mask over the cache (True: attend). ``shared``: cache columns ``0 .. shared - 1`` hold
        the same keys and values in every row (a prompt prefix they share); a decode step reads them once."""
        R, T = ids.shape
        end = start + T
        x = self.decoder.embed_tokens(ids).float()
        cos, sin = self.decoder.rotary_emb(x, positions)  # (R, T, head_dim), float32
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        half = D // 2
        for i, L in enumerate(self.layers):
            h = _rms(x, *L["ln1"])
            qkv = L["qkv"].linear(h).view(R, T, H + 2 * KV, D)
            qk = qkv[:, :, :H + KV].float()
            if L["qk_norm"] is not None:
                qk = _rms(qk, *L["qk_norm"])
            rotated = torch.cat([-qk[..., half:], qk[..., :half]], dim=-1)
            qk = qk * cos + rotated * sin
            cache[i, 0, :, :, start:end] = qk[:, :, H:].transpose(1, 2)
            cache[i, 1, :, :, start:end] = qkv[:, :, H + KV:].transpose(1, 2)
            if T == 1:  # a decode step: grouped heads as one batched matmul (2x sdpa's speed at these shapes)
                out = _decode_attention(qk[:, 0, :H].reshape(R, KV, H // KV, D), cache[i, 0, :, :, :end],
                                        cache[i, 1, :, :, :end], keep.view(R, 1, 1, end), L["scale"], shared)
                out = out.reshape(R, T, H * D)
            else:
                out = F.scaled_dot_product_attention(qk[:, :, :H].transpose(1, 2), cache[i, 0, :, :, :end],
                                                     cache[i, 1, :, :, :end], attn_mask=keep, scale=L["scale"],
                                                     enable_gqa=KV != H).transpose(1, 2).reshape(R, T, H * D)
            x = x + L["o"].linear(out).float()
            gu = L["gate_up"].linear(_rms(x, *L["ln2"]))
            gate, up = gu.chunk(2, dim=-1)
            x = x + L["down"].linear(F.silu(gate) * up).float()
        return _rms(x[:, -1], *self.norm)


__all__ = ["FAMILIES", "LeanDecoder", "unsupported"]
