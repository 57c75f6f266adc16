"""The SwiGLU gate of Llama-family MLPs, ``silu(gate) * up``, as one autograd node that saves its two inputs.

transformers computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` as two autograd nodes: the SiLU saves
``gate`` and the product saves ``silu(gate)`` and ``up``, three intermediate-width tensors per layer. The product's
backward needs ``silu(gate)``, which costs one elementwise pass to recompute from ``gate``: :class:`_SwiGLUFn`
saves ``gate`` and ``up`` only and recomputes it. Forward and backward are torch's own operations in the same
order (``silu``, the product, and ``silu_backward`` for the gate), so the values are bit-for-bit those of the
two nodes; a third less of the MLP's saved activations (on a SmolLM2 reward-model batch of 8 pairs, 47 of its
466 MiB).

When ``down_proj`` is a fused LoRA layer (:mod:`.fused_lora`), the gate and ``down_proj`` are one node
(:class:`_SwiGLUDownFn`): the product, which that layer's backward reads for its ``A`` gradient, is recomputed
from ``gate`` and ``up`` as well instead of saved, with :func:`~.fused_lora.lora_forward` /
:func:`~.fused_lora.lora_backward` doing the layer's own arithmetic: two of the MLP's four wide tensors saved.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from posttrain.fastpath.forwards import installed_forwards
from posttrain.fastpath.fused_lora import FusedForward, lora_backward, lora_forward

# MLP classes whose forward is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (transformers 5)
MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        gate, up = ctx.saved_tensors
        d_gate = torch.ops.aten.silu_backward(g * up, gate) if ctx.needs_input_grad[0] else None
        d_up = g * F.silu(gate) if ctx.needs_input_grad[1] else None
        return d_gate, d_up


class _SwiGLUDownFn(torch.autograd.Function):
    """``down_proj(silu(gate) * up)`` for a fused LoRA ``down_proj``, saving ``gate`` and ``up`` (not the product)."""

    @staticmethod
    def forward(ctx, gate, up, a, b, base, scale: float):
        h = F.silu(gate) * up
        y, xa, ac, bc = lora_forward(h.reshape(-1, h.shape[-1]), a, b, base, scale)
        ctx.save_for_backward(gate, up, xa, ac, bc)
        ctx.base, ctx.scale = base, scale
        return y.view(*h.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        gate, up, xa, ac, bc = ctx.saved_tensors
        s = F.silu(gate)
        h2 = (s * up).reshape(-1, gate.shape[-1])
        need = ctx.needs_input_grad
        dh, ga, gb = lora_backward(g.reshape(-1, g.shape[-1]).to(ac.dtype), h2, xa, ac, bc, ctx.base, ctx.scale,
                                   (need[0] or need[1], need[2], need[3]))
        d_gate = d_up = None
        if dh is not None:
            dh = dh.view(gate.shape)
            d_gate = torch.ops.aten.silu_backward(dh * up, gate) if need[0] else None
            d_up = dh * s if need[1] else None
        return d_gate, d_up, ga, gb, None, None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, saving only ``gate`` and ``up`` for the backward."""
    return _SwiGLUFn.apply(gate, up)


class _MLPForward:
    """The forward installed on an MLP by :func:`fused_swiglu`: the model's own projections around :func:`swiglu`."""

    def __init__(self, mlp):
        self.mlp = mlp

    def __call__(self, x):
        mlp = self.mlp
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        down = mlp.down_proj.__dict__.get("forward")
        if isinstance(down, FusedForward) and not down.layer.disable_adapters and gate.dtype == down.base.dtype:
            a, b, scale = down.weights()
            return _SwiGLUDownFn.apply(gate, up, a, b, down.base, scale)
        return mlp.down_proj(swiglu(gate, up))


def _eligible(module) -> bool:
    act = getattr(module, "act_fn", None)
    return (type(module).__name__ in MLP_CLASSES and "forward" not in module.__dict__
            and (isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"))


@contextmanager
def fused_swiglu(model: torch.nn.Module):
    """While the body runs, every Llama-family SiLU MLP of ``model`` gates through :func:`swiglu`; restored after."""
    with installed_forwards((m, _MLPForward(m)) for m in model.modules() if _eligible(m)):
        yield


__all__ = ["fused_swiglu", "swiglu"]
