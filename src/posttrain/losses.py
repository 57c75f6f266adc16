"""Pure tensor math shared by every trainer: the language-model head applied in chunks with a log-softmax.

Nothing here builds full-vocabulary float32 logits for a whole batch: the head is applied to chunks of
positions (only the positions that carry a target), each chunk's logits are made in float32 and reduced, and
the backward pass either keeps the chunk's probabilities (while they fit in ``KEEP_PROBS_BYTES``) or rebuilds
the logits, so peak memory is bounded by a chunk of logits instead of ``batch x length x vocab``.

The head is a :class:`Head`: a forward callable and its input gradient, plus the weight and bias when they
train. A fast path (``posttrain.fastpath``) may hand in a head with other kernels; the math here does not know.
SFT's cross-entropy and GRPO's token log-probabilities are the same function (:func:`selective_log_softmax`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
KEEP_PROBS_BYTES = 256 * 2**20  # keep float32 probabilities for the backward while a call's total is below this


class Head(NamedTuple):
    """The language-model head as the chunked log-softmax sees it.

    ``forward(hidden) -> logits`` (any float dtype); ``grad_input(g) -> g @ W`` (the gradient with respect to
    ``hidden``); ``vocab``: the number of logits; ``weight`` / ``bias``: the head's own tensors when they train
    (their gradients are formed here), else None."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    grad_input: Callable[[torch.Tensor], torch.Tensor]
    vocab: int
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def linear_head(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Head:
    """``hidden @ weight.T + bias`` as a :class:`Head`; the weight and bias train when they require grad."""
    trains = weight.requires_grad or (bias is not None and bias.requires_grad)
    return Head(forward=lambda h: F.linear(h, weight, bias), grad_input=lambda g: g.to(weight.dtype) @ weight,
                vocab=weight.shape[0], weight=weight if trains else None, bias=bias if trains else None)


def module_head(module: torch.nn.Module) -> Head:
    """A ``torch.nn.Linear``-like head module (its input cast to the weight's dtype) as a :class:`Head`."""
    weight, bias = module.weight, getattr(module, "bias", None)
    head = linear_head(weight, bias)
    return head._replace(forward=lambda h: F.linear(h.to(weight.dtype), weight, bias))


def _logits(hidden: torch.Tensor, head: Head, temperature: float) -> torch.Tensor:
    logits = head.forward(hidden).float()
    return logits / temperature if temperature != 1.0 else logits


def _chunk_logps(hidden: torch.Tensor, weight, bias, targets: torch.Tensor, head: Head, temperature: float,
                 with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable log-probabilities and entropy of one chunk (checkpointed when the entropy trains).
    ``weight`` and ``bias`` are passed only so that checkpointing sees them as inputs."""
    logits = _logits(hidden, head, temperature)
    logz = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    if with_entropy:  # H = logZ - sum_v p_v * logit_v  (a batched dot product: no second (N, V) product)
        probs = torch.softmax(logits, dim=-1)
        entropy = logz - torch.bmm(probs.unsqueeze(1), logits.unsqueeze(2)).view(-1)
    else:
        entropy = logps.new_zeros(())
    return logps, entropy


@torch.no_grad()
def _chunk_probs(hidden: torch.Tensor, head: Head, targets: torch.Tensor, temperature: float,
                 with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_chunk_logps`` without autograd, in fewer passes over the (N, V) chunk: one exp gives logZ, the
    probabilities and the entropy. Returns ``(logps, entropy, logz, probs)``."""
    logits = _logits(hidden, head, temperature)
    peak = logits.amax(-1, keepdim=True)
    probs = (logits - peak).exp_()
    total = probs.sum(-1, keepdim=True)
    logz = (peak + total.log()).squeeze(-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    probs.div_(total)
    if with_entropy:  # H = logZ - sum_v p_v * logit_v
        entropy = logz - torch.bmm(probs.unsqueeze(1), logits.unsqueeze(2)).view(-1)
    else:
        entropy = logps.new_zeros(())
    return logps, entropy, logz, probs


class _FusedChunkLogps(torch.autograd.Function):
    """``_chunk_logps`` with a hand-written backward (the entropy as a detached metric), forming
    ``d logp / d logits = onehot - p`` in place. With ``keep_probs`` the forward keeps the chunk's probabilities
    (N, V) for the backward; without, it keeps only ``logZ`` (N,) and the backward rebuilds the logits (one
    more head matmul). Autograd through a checkpointed ``_chunk_logps`` would recompute the entropy too and run
    logsumexp's own backward over the whole (N, V) chunk. ``weight`` / ``bias`` are the head's trainable
    tensors (or None): inputs here so that autograd routes their gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, head: Head, temperature: float, with_entropy: bool,
                keep_probs: bool = False):
        logps, entropy, logz, probs = _chunk_probs(hidden, head, targets, temperature, with_entropy)
        ctx.save_for_backward(hidden, targets, probs if keep_probs else logz)
        ctx.head, ctx.temperature, ctx.keep_probs, ctx.done = head, temperature, keep_probs, False
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        hidden, targets, saved = ctx.saved_tensors
        if ctx.done:
            raise RuntimeError("the chunked log-softmax backward runs once (its buffers are reused in place)")
        ctx.done = True
        head, t = ctx.head, ctx.temperature
        with torch.no_grad():
            if ctx.keep_probs:
                g = saved.mul_(-grad_logps.unsqueeze(-1))                         # -grad * p (p kept)
            else:
                g = _logits(hidden, head, t)
                g.sub_(saved.unsqueeze(-1)).exp_().mul_(-grad_logps.unsqueeze(-1))   # -grad * p
            g.scatter_add_(-1, targets.unsqueeze(-1), grad_logps.unsqueeze(-1))     # + grad * onehot
            if t != 1.0:
                g.div_(t)
            gh = head.grad_input(g).to(hidden.dtype) if ctx.needs_input_grad[0] else None
            gw = g.t().to(head.weight.dtype) @ hidden if ctx.needs_input_grad[1] else None
            gb = g.sum(0).to(head.bias.dtype) if ctx.needs_input_grad[2] else None
        return gh, gw, gb, None, None, None, None, None


def selective_log_softmax(hidden: torch.Tensor, head: Head, targets: torch.Tensor, *, temperature: float = 1.0,
                          chunk_size: int = 1024, entropy: bool = False, entropy_grad: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log softmax(head(hidden) / temperature)[target]`` for each row, and optionally the entropy of that
    distribution, without ever holding more than ``chunk_size`` rows of float32 logits.

    ``hidden`` (N, H) are the final hidden states at the positions to score, ``targets`` (N,) the token that
    follows each. Returns float32 ``(logps (N,), entropy (N,) or None)``. Under autograd a chunk's logits are
    not kept: its probabilities are, while all chunks' together take at most ``KEEP_PROBS_BYTES`` (256 MB: one
    head matmul less per chunk); beyond that they are rebuilt in the backward pass (by :class:`_FusedChunkLogps`,
    or by checkpointing when the entropy itself carries a gradient). The entropy carries a gradient only with
    ``entropy_grad`` (an entropy bonus); as a metric it is detached.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    logps_out, ent_out = [], []
    grad = torch.is_grad_enabled() and (hidden.requires_grad or head.weight is not None)
    keep_probs = hidden.shape[0] * head.vocab * 4 <= KEEP_PROBS_BYTES
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if grad and not entropy_grad:
            lp, ent = _FusedChunkLogps.apply(h, head.weight, head.bias, t, head, temperature, entropy, keep_probs)
        elif grad:
            lp, ent = checkpoint(_chunk_logps, h, head.weight, head.bias, t, head, temperature, entropy,
                                 use_reentrant=False)
        else:
            lp, ent = _chunk_probs(h, head, t, temperature, entropy)[:2]
        logps_out.append(lp)
        ent_out.append(ent if entropy_grad else ent.detach())
    if not logps_out:
        empty = hidden.new_zeros((0,), dtype=torch.float32)
        return empty, (empty if entropy else None)
    logps = torch.cat(logps_out)
    return logps, (torch.cat(ent_out) if entropy else None)


def chunked_cross_entropy_sum(hidden: torch.Tensor, head: Head, labels: torch.Tensor,
                              chunk_size: int = 1024) -> torch.Tensor:
    """Sum of token cross-entropies over every position whose (already shifted) label is not -100.

    ``hidden``: (..., H) final hidden states; ``labels``: (...) next-token ids aligned with ``hidden``.
    Equal to ``F.cross_entropy(head(hidden).float(), labels, reduction="sum", ignore_index=-100)`` within
    float rounding: the negated sum of :func:`selective_log_softmax` over the kept positions.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    logps, _ = selective_log_softmax(hidden[keep], head, labels[keep], chunk_size=chunk_size)
    return -logps.sum()


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets: position t predicts token t+1; the last position has none."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[..., :-1] = labels[..., 1:]
    return shifted


def shift_labels_packed(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Like ``shift_labels`` for packed rows: no target crosses from one sequence into the next
    (a position whose successor starts a new sequence, position id 0, gets no target)."""
    shifted = shift_labels(labels)
    starts_next = torch.zeros_like(position_ids, dtype=torch.bool)
    starts_next[..., :-1] = position_ids[..., 1:] == 0
    return shifted.masked_fill(starts_next, IGNORE_INDEX)
