"""A LoRA layer's training forward and backward as one autograd node over its packed frozen base.

PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: under autocast that is, per layer and
micro-batch, casts of x, A and B, two small matmuls, a multiply and an add, each its own autograd node, and
their backward nodes. :class:`_LoraLinearFn` computes the same in the compute dtype with one ``addmm``
(``y = base(x) + scale * (x A^T) B^T``) and writes the backward by hand::

    dB = scale * g^T (x A^T)      dA = (scale * g B)^T x      dx = g W + (scale * g B) A

(the base weight ``W`` is frozen and packed, :mod:`posttrain.fastpath.onednn`). The same values as PEFT under autocast,
with fewer passes; used while :func:`fused_lora` runs, for LoRA layers whose base is packed, with one active
adapter, no dropout, no DoRA and no LoRA bias. Any other layer keeps PEFT's forward.

Layers that read the same input (q, k and v; gate and up) share its compute-dtype cast: it is made once, and the
three nodes save that one tensor for their backward instead of three copies of it.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch

from posttrain.fastpath.forwards import installed_forwards
from posttrain.fastpath.onednn import PrepackedWeight, prepacked_weight

_last_cast: tuple | None = None  # (weakref to the input, its version, dtype, its 2-D cast)


def _cast_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a 2-D tensor in ``dtype``; the same tensor again when the previous call cast this very ``x``
    (unchanged since): q, k and v (gate and up) share one cast and one saved copy."""
    global _last_cast
    if x.dtype == dtype:
        return x.reshape(-1, x.shape[-1])
    if _last_cast is not None:
        ref, version, dt, cast = _last_cast
        if ref() is x and version == x._version and dt == dtype:
            return cast
    cast = x.reshape(-1, x.shape[-1]).to(dtype)
    _last_cast = (weakref.ref(x), x._version, dtype, cast)
    return cast


def lora_forward(x2: torch.Tensor, a, b, base: PrepackedWeight, scale: float):
    """``(y, xa, ac, bc)``: ``y = base(x2) + scale * (x2 A^T) B^T`` for a 2-D input already in the compute dtype,
    with what the backward needs besides ``x2``."""
    dtype = base.dtype
    ac, bc = a.to(dtype), b.to(dtype)
    xa = x2 @ ac.t()
    return torch.addmm(base._forward(x2), xa, bc.t(), alpha=scale), xa, ac, bc


def lora_backward(g2: torch.Tensor, x2: torch.Tensor, xa, ac, bc, base: PrepackedWeight, scale: float,
                  needs: tuple[bool, bool, bool]):
    """``(dx2, dA, dB)`` of :func:`lora_forward` for the output gradient ``g2`` (2-D, compute dtype); ``needs``:
    which of x, A and B want a gradient (None for the others)."""
    gxa = (g2 @ bc).mul_(scale)                                            # (M, r)
    gb = (g2.t() @ xa).mul_(scale) if needs[2] else None
    ga = gxa.t() @ x2 if needs[1] else None
    gx = base.grad_input(g2).addmm_(gxa, ac) if needs[0] else None
    return gx, ga, gb


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, base: PrepackedWeight, scale: float):
        x2 = _cast_once(x, base.dtype)
        y, xa, ac, bc = lora_forward(x2, a, b, base, scale)
        ctx.save_for_backward(x2, xa, ac, bc)
        ctx.base, ctx.scale, ctx.x_dtype, ctx.lead = base, scale, x.dtype, x.shape[:-1]
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x2, xa, ac, bc = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1]).to(ac.dtype)
        gx, ga, gb = lora_backward(g2, x2, xa, ac, bc, ctx.base, ctx.scale, ctx.needs_input_grad[:3])
        if gx is not None:
            gx = gx.view(*ctx.lead, x2.shape[-1]).to(ctx.x_dtype)
        return gx, ga, gb, None, None


class FusedForward:
    """The forward installed on a LoRA layer by :func:`fused_lora`."""

    def __init__(self, layer, adapter: str, base: PrepackedWeight):
        self.layer, self.adapter, self.base = layer, adapter, base

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The active adapter's ``(A, B, scaling)``."""
        layer = self.layer
        return layer.lora_A[self.adapter].weight, layer.lora_B[self.adapter].weight, float(layer.scaling[self.adapter])

    def __call__(self, x, *args, **kwargs):
        if self.layer.disable_adapters:  # the reference forward (adapters disabled): the base alone
            return self.base.linear(x)
        a, b, scale = self.weights()
        return _LoraLinearFn.apply(x, a, b, self.base, scale)


def _eligible(layer) -> str | None:
    """The adapter name when ``layer`` can be fused, else None."""
    adapters = [n for n in layer.active_adapters if n in layer.lora_A]
    if len(adapters) != 1 or getattr(layer, "merged", False):
        return None
    name = adapters[0]
    if (not isinstance(layer.lora_dropout[name], torch.nn.Identity) or any(getattr(layer, "use_dora", {}).values())
            or name in getattr(layer, "lora_variant", {}) or layer.lora_B[name].bias is not None
            or not isinstance(layer.lora_A[name], torch.nn.Linear)):
        return None
    return name


@contextmanager
def fused_lora(model: torch.nn.Module):
    """While the body runs, every PEFT LoRA layer whose base layer computes with a packed weight (inside
    :func:`posttrain.fastpath.onednn.prepacked_linears`) and that qualifies (see the module docstring) trains through one
    fused autograd node; restored after."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        yield
        return

    def fused_forwards():
        for m in model.modules():
            if not isinstance(m, LoraLayer) or "forward" in m.__dict__:
                continue
            base = prepacked_weight(m.get_base_layer())
            name = _eligible(m)
            if base is not None and name is not None:
                yield m, FusedForward(m, name, base)

    with installed_forwards(fused_forwards()):
        yield


__all__ = ["FusedForward", "fused_lora", "lora_backward", "lora_forward"]
