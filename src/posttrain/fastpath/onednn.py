"""Frozen linear weights prepacked for oneDNN on CPU: the same ``x @ W.T`` in the same dtype, 2-3x faster here.

torch computes a float32 ``F.linear`` on CPU with MKL's sgemm. On this project's reference machine (AMD EPYC,
AVX512) that reaches 113-185 GFLOP/s, while oneDNN's kernel on a weight reordered once into its blocked layout
(``torch.ops.mkldnn._reorder_linear_weight`` + ``_linear_pointwise``, what torch.compile's CPU backend emits)
reaches 270-415 GFLOP/s on the same shapes, in IEEE float32 (no reduced-precision accumulation; results differ
from MKL's only by summation order, ~1e-6 relative). bfloat16 gains less (5-80%, most on small batches).

Reordering costs one pass over the weight, so it pays only for weights that stay fixed while they are used
many times: a LoRA model's frozen base and its head during a training step, or the merged weights of one
rollout. :func:`prepacked_linears` swaps the forward of such ``nn.Linear`` modules for the packed kernel while
its body runs; gradients still flow to the input (``g @ W`` through a second packed copy, ``W.T``), never to the
packed weight (it is frozen). Everything else (LoRA's A and B, trainable weights) stays on the usual path.

A weight already held in a 16-bit compute dtype (SFT, DPO and reward models hold their frozen base in bf16) is
not packed: it computes from itself, forward and backward, through plain matmuls (oneDNN's bf16 kernels all the
same). At training's row counts (256-2048) those are within 2-8% of the packed kernel's time on the decoder's
shapes, and neither ``W`` nor ``W.T`` is copied (each copy is 212 MB on SmolLM2-135M, about 7 GB on Qwen3-4B).

Off on non-CPU devices, without oneDNN, and with ``POSTTRAIN_PACKED_LINEAR=0``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from posttrain.fastpath.forwards import installed_forwards

_DTYPES = (torch.float32, torch.bfloat16)


def available(device: torch.device | str) -> bool:
    """Whether packed linears apply on ``device``: a CPU with oneDNN, unless ``POSTTRAIN_PACKED_LINEAR=0``."""
    if torch.device(device).type != "cpu" or os.environ.get("POSTTRAIN_PACKED_LINEAR", "1") == "0":
        return False
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _pack(weight: torch.Tensor, rows_hint: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows_hint)


def _apply(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


class PrepackedWeight:
    """A frozen ``(out, in)`` weight (and bias) reordered for oneDNN. ``linear(x)`` is ``F.linear(x, W, b)`` in
    the weight's dtype (``x`` is cast to it), differentiable with respect to ``x``; ``grad_input`` also packs
    ``W.T`` for that backward (without it, a backward through ``linear`` is an error). ``plain``: no packed copy,
    the weight itself computes both ways (one held in a 16-bit compute dtype; the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, grad_input: bool = True,
                 rows_hint: int = 256, plain: bool = False):
        if weight.dtype not in _DTYPES:
            raise ValueError(f"packed linear weights must be float32 or bfloat16, got {weight.dtype}")
        self.dtype, self.shape = weight.dtype, tuple(weight.shape)
        self.plain = weight.detach() if plain else None
        self.w = None if plain else _pack(weight, rows_hint)
        self.wt = _pack(weight.detach().t(), rows_hint) if grad_input and not plain else None
        self.bias = bias.detach().to(weight.dtype) if bias is not None else None

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            return _PrepackedLinearFn.apply(x, self)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plain is not None:
            return torch.nn.functional.linear(x, self.plain, self.bias)
        lead = x.shape[:-1]
        return _apply(x.reshape(-1, x.shape[-1]), self.w, self.bias).view(*lead, self.shape[0])

    def grad_input(self, g: torch.Tensor) -> torch.Tensor:
        """``g @ W``: the gradient of ``linear``'s input for an output gradient ``g``."""
        lead = g.shape[:-1]
        if self.plain is not None:
            return (g.reshape(-1, g.shape[-1]).to(self.dtype) @ self.plain).view(*lead, self.shape[1])
        if self.wt is None:
            raise RuntimeError("this packed weight was built without grad_input; it cannot backpropagate")
        return _apply(g.reshape(-1, g.shape[-1]).to(self.dtype), self.wt, None).view(*lead, self.shape[1])


class _PrepackedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed: PrepackedWeight):
        ctx.packed = packed
        return packed._forward(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.packed.grad_input(g), None


def frozen_linears(module: torch.nn.Module, exclude: tuple = (), frozen_only: bool = True) -> list[torch.nn.Linear]:
    """The plain ``nn.Linear`` modules under ``module`` (float32/bfloat16, not quantized) whose weight and bias
    do not train; all of them with ``frozen_only=False`` (a rollout, under no_grad)."""
    out = []
    for m in module.modules():
        if (isinstance(m, torch.nn.Linear) and not isinstance(m.__dict__.get("forward"), _PrepackedForward)
                and m not in exclude and m.weight.dtype in _DTYPES and m.weight.__class__ is torch.nn.Parameter
                and (not frozen_only or (not m.weight.requires_grad
                                         and (m.bias is None or not m.bias.requires_grad)))):
            out.append(m)
    return out


def prepacked_weight(module: torch.nn.Module) -> PrepackedWeight | None:
    """The packed weight a module computes with inside :func:`prepacked_linears`, or None."""
    fwd = module.__dict__.get("forward")
    return fwd.packed if isinstance(fwd, _PrepackedForward) else None


def mergeable_lora_layers(model: torch.nn.Module) -> list | None:
    """The PEFT LoRA layers of ``model`` (possibly none), or None when one cannot be merged by
    :func:`merged_weight` (DoRA, a quantized or non-Linear base, already merged): the caller then falls back to
    merging in place."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    out = []
    for m in model.modules():
        if not isinstance(m, LoraLayer):
            continue
        base = m.get_base_layer()
        if (not isinstance(base, torch.nn.Linear) or base.weight.__class__ is not torch.nn.Parameter
                or base.weight.dtype not in _DTYPES or any(getattr(m, "use_dora", {}).values())
                or getattr(m, "merged", False)):
            return None
        out.append(m)
    return out


@torch.no_grad()
def merged_weight(layer, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W + sum of the active adapters' scale * B @ A, bias)`` of a LoRA layer, computed in the base weight's
    dtype and then cast to ``dtype``; the base weight is not written."""
    base = layer.get_base_layer()
    w = base.weight.detach()
    deltas = [layer.get_delta_weight(name) for name in layer.active_adapters if name in layer.lora_A]
    if deltas:
        w = w + sum(deltas).to(w.dtype)
    return w.to(dtype or w.dtype), base.bias


class _PrepackedForward:
    """The forward installed on a module by :func:`prepacked_linears` (a class, so it is recognizable)."""

    def __init__(self, packed: PrepackedWeight):
        self.packed = packed

    def __call__(self, x):
        return self.packed.linear(x)


@contextmanager
def prepacked_merged_lora(layers: list, dtype: torch.dtype | None = None, rows_hint: int = 16):
    """While the body runs (no gradients), each LoRA layer of ``layers`` (:func:`mergeable_lora_layers`) computes
    its whole forward, base plus adapter, with one packed merged weight in ``dtype`` (:func:`merged_weight`):
    the cost of the base model, and the base weights are never written."""
    with torch.no_grad():
        pairs = [(m, _PrepackedForward(PrepackedWeight(*merged_weight(m, dtype), grad_input=False,
                                                       rows_hint=rows_hint))) for m in layers]
    with installed_forwards(pairs):
        yield


@contextmanager
def prepacked_linears(modules: list[torch.nn.Linear], dtype: torch.dtype | None = None, *, grad_input: bool = True,
                   rows_hint: int = 256, cache: dict | None = None):
    """While the body runs, each module in ``modules`` computes its forward with a packed copy of its current
    weight in ``dtype`` (default: the weight's own; see :class:`PrepackedWeight`), and returns that dtype, as
    autocast to ``dtype`` would; restored after. ``cache`` (a dict kept by the caller) reuses packed copies across
    calls while a weight's storage and version are unchanged: frozen weights are packed once per run."""
    def packed_forwards():
        for m in modules:
            dt = dtype or m.weight.dtype
            key = (id(m), m.weight.data_ptr(), m.weight._version, dt, grad_input)
            packed = cache.get(key) if cache is not None else None
            if packed is None and cache is not None and not grad_input:  # a copy with a backward serves too
                packed = cache.get(key[:-1] + (True,))
            if packed is None:
                # a weight held in a 16-bit compute dtype (SFT/DPO/RM's bf16 base) computes from itself
                plain = m.weight.dtype == dt and dt != torch.float32
                with torch.no_grad():
                    packed = PrepackedWeight(m.weight.to(dt), m.bias, grad_input=grad_input, rows_hint=rows_hint,
                                             plain=plain)
                if cache is not None:
                    for k in [k for k in cache if k[0] == id(m) and (k[1:4] != key[1:4] or grad_input)]:
                        del cache[k]  # a stale copy, or one without W.T that this one supersedes
                    cache[key] = packed
            yield m, _PrepackedForward(packed)

    with installed_forwards(packed_forwards()):
        yield


__all__ = ["PrepackedWeight", "available", "frozen_linears", "merged_weight", "mergeable_lora_layers", "prepacked_linears",
           "prepacked_merged_lora", "prepacked_weight"]
