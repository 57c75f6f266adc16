"""The fast path: how the weights that do not train compute, behind two entry points that algorithms call
without knowing what they do.

- :func:`training` (an update of a model whose base is frozen: SFT, GRPO, every trainer): on a CPU with
  oneDNN the frozen linears are prepacked once per run in the compute dtype (:mod:`.onednn`; same values, 2-3x
  faster matmuls than MKL's fp32 here), LoRA layers over a prepacked base train through one fused autograd node
  each (:mod:`.fused_lora`), the MLPs' SiLU gate saves two tensors instead of three (:mod:`.swiglu`), and
  attention computes in float32 under a bf16 autocast (:mod:`.attention`).
  Elsewhere the frozen weights are held as compute-dtype copies for the update (:func:`.weights.compute_copies`).
  It yields the language-model :class:`~posttrain.losses.Head` the loss applies.
- :func:`rollout` (generation: GRPO rollouts, evaluation, batch generation, chat): on a CPU with oneDNN each
  LoRA layer computes with one prepacked merged weight ``W + BA`` (the base weights untouched), the other
  linears and the head prepacked (the head in its own dtype, float32 logits for GRPO's sampler log-probabilities,
  or in ``head_dtype`` where only the chosen token matters: evaluation, generation), and Llama-family models
  decode through the lean forward (:mod:`.lean`).
  Elsewhere the adapter is merged into the base (:func:`.weights.merged_lora`) and the decoder held in the
  compute dtype. It yields the decoder to use (the lean one, or None for transformers' forward) and the head.

A ``cache`` dict, kept by the caller for a run, lets both entry points reuse prepacked copies of weights that
have not changed (frozen weights are packed once per run).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator, NamedTuple

import torch

from posttrain.fastpath import lean, onednn
from posttrain.fastpath.attention import float32_attention
from posttrain.fastpath.fused_lora import fused_lora
from posttrain.fastpath.swiglu import fused_swiglu
from posttrain.fastpath.weights import compute_copies, hold_frozen_in, merged_lora
from posttrain.losses import Head, module_head
from posttrain.models import decoder_and_head


def _head(module: torch.nn.Module) -> Head:
    """The head as a :class:`Head`: its prepacked copy while one is installed and it does not train."""
    pw = onednn.prepacked_weight(module)
    if pw is None or module.weight.requires_grad:
        return module_head(module)
    return Head(forward=pw.linear, grad_input=pw.grad_input, vocab=module.weight.shape[0])


@contextmanager
def training(model, compute_dtype: torch.dtype | None, *, cache: dict | None = None,
             copies: bool = True, hold: bool = False, head_dtype: torch.dtype | None = None,
             recompute_attention: bool = False) -> Iterator[Head]:
    """The weights of an update step (see the module docstring); yields the head for the loss.
    ``head_dtype``: the dtype of a frozen head's packed matmul (None: the head weight's own, float32 logits on a
    CPU; the logits go to the log-softmax in float32 either way).
    ``hold`` (trainers that never need the float32 base again in the process: SFT, DPO, reward models): at the
    first call with this ``cache``, a 16-bit ``compute_dtype`` becomes the frozen base's only dtype for the rest of
    the run (:func:`.weights.hold_frozen_in`: the same results, the float32 copy's memory freed).
    ``recompute_attention``: the float32 attention is recomputed in the backward instead of saving its outputs
    (:func:`.attention.sdpa_float32`: the same results, less memory, a few percent more time; SFT, DPO and reward
    models, whose memory is compared with TRL's checkpointed defaults).
    ``copies=False`` (sharded launches: FSDP2, ZeRO) leaves the weights alone and yields None: their tensors are
    whole only inside the prepared module's forward (FSDP2 swaps in unsharded parameters, ZeRO-3 gathers on
    access), so the loss wrapper takes the model's head there; a head made here would hold the shards."""
    if not copies:
        with float32_attention(model, compute_dtype, recompute_attention):
            yield None
        return
    weights_dtype = compute_dtype
    if hold and compute_dtype is not None and cache is not None and ("held",) not in cache:
        cache[("held",)] = hold_frozen_in(model, compute_dtype)
    decoder, head = decoder_and_head(model)
    with ExitStack() as stack:
        stack.enter_context(float32_attention(model, compute_dtype, recompute_attention))
        if onednn.available(next(model.parameters()).device):
            heads = onednn.frozen_linears(head) if isinstance(head, torch.nn.Linear) else []
            stack.enter_context(onednn.prepacked_linears(onednn.frozen_linears(decoder, exclude=(head,)),
                                                         weights_dtype, cache=cache))
            stack.enter_context(onednn.prepacked_linears(heads, head_dtype, cache=cache))
            stack.enter_context(fused_lora(model))
            stack.enter_context(fused_swiglu(model))
        else:
            stack.enter_context(compute_copies(model, weights_dtype, frozen_only=True))
        yield _head(head)


class RolloutWeights(NamedTuple):
    """What a rollout computes with: ``decoder`` (the lean decoder, or None for transformers' forward) and
    ``head`` (final hidden states -> float32 logits, never under autocast)."""

    decoder: lean.LeanDecoder | None
    head: Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def rollout(model, compute_dtype: torch.dtype | None, *, merge: str = "auto", use_lean: bool = True,
            cache: dict | None = None, head_dtype: torch.dtype | None = None) -> Iterator[RolloutWeights]:
    """The weights of a rollout (see the module docstring). ``merge``: how LoRA is folded for generation
    (:func:`.weights.merged_lora`; ``none`` keeps the adapter unmerged everywhere). ``head_dtype``: the dtype of
    the packed head's matmul where the head is packed (None: the head weight's own); the logits are float32."""
    device = next(model.parameters()).device
    decoder, head = decoder_and_head(model)
    lora = onednn.mergeable_lora_layers(model) if onednn.available(device) and merge != "none" else None

    def logits(hidden: torch.Tensor) -> torch.Tensor:  # resolved at call time: prepacked inside the body
        pw = onednn.prepacked_weight(head)
        if pw is not None:
            return pw.linear(hidden).float()
        return torch.nn.functional.linear(hidden.to(head.weight.dtype), head.weight, head.bias).float()

    if lora is None:
        with merged_lora(model, merge), compute_copies(model, compute_dtype):
            yield RolloutWeights(None, logits)
        return
    heads = onednn.frozen_linears(head, frozen_only=False) if isinstance(head, torch.nn.Linear) else []
    with ExitStack() as stack:
        stack.enter_context(onednn.prepacked_linears(heads, head_dtype, grad_input=False, rows_hint=16, cache=cache))
        if use_lean and lean.unsupported(model) is None:
            yield RolloutWeights(lean.LeanDecoder(model, lora, compute_dtype), logits)
            return
        inside_lora = tuple(sub for m in lora for sub in m.modules())
        rest = onednn.frozen_linears(decoder, exclude=inside_lora + (head,), frozen_only=False)
        stack.enter_context(onednn.prepacked_merged_lora(lora, compute_dtype))
        stack.enter_context(onednn.prepacked_linears(rest, compute_dtype, grad_input=False, rows_hint=16,
                                                     cache=cache))
        yield RolloutWeights(None, logits)


__all__ = ["RolloutWeights", "rollout", "training"]
