"""Pure tensor math for the training losses.

Nothing here builds full-vocabulary float32 logits for a whole batch: the language-model head is applied
to chunks of positions (and only to the positions that carry a target), each chunk's logits are made in
float32, reduced, and recomputed during the backward pass (activation checkpointing per chunk; the last
chunk is kept instead of recomputed), so peak memory is one chunk of logits instead of
``batch x length x vocab``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy_sum(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
                              chunk_size: int = 1024) -> torch.Tensor:
    """Sum of token cross-entropies over every position whose (already shifted) label is not -100.

    ``hidden``: (..., H) final hidden states; ``labels``: (...) next-token ids aligned with ``hidden``.
    Equal to ``F.cross_entropy(lm_head(hidden).float(), labels, reduction="sum", ignore_index=-100)`` within
    float rounding, without ever holding more than ``chunk_size`` rows of logits.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    hidden, labels = hidden[keep], labels[keep]
    weight = lm_head.weight
    bias = getattr(lm_head, "bias", None)
    total = hidden.new_zeros((), dtype=torch.float32)
    n = hidden.shape[0]
    for start in range(0, n, chunk_size):
        h = hidden[start:start + chunk_size]
        t = labels[start:start + chunk_size]
        last = start + chunk_size >= n  # its logits may stay alive: peak memory is one chunk either way
        if not last and torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_ce_sum, h, weight, bias, t, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(h, weight, bias, t)
    return total


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
