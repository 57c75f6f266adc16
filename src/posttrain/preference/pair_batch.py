"""Preference pairs as one forward: each pair's shared beginning computed once.

A pair's two sequences (prompt + chosen, prompt + rejected) share the prompt and often most of the answers (DPO and
reward-model pairs frequently differ only at the end). :class:`PairBatch` lays B pairs out as B prefixes (prompt +
the answers' longest common beginning) and 2B tails; :func:`pair_hidden` runs the prefixes once and both tails on
their key/value cache, still in the autograd graph, as GRPO shares a group's prompt. The hidden states are those of
the 2B whole sequences up to float rounding, for fewer positions. DPO reads the positions that predict answer
tokens (``src``), a reward model the last token of each sequence (``last``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from transformers import DynamicCache

from posttrain.models import (autocast_to, decoder_and_head, layers_checkpointed, returned_cache,
                              with_cache)
from posttrain.preference.data import PreferencePair


@dataclass(frozen=True)
class PairBatch:
    """B pairs, each pair's shared beginning computed once. The prefix of pair i is its prompt plus the longest
    common beginning of its two answers (DPO pairs often differ only at the end); the chosen and rejected tails
    are what follows it.

    ``prefix_ids``, ``prefix_attn``, ``prefix_pos`` (B, Lp): the prefixes, left-padded; ``tail_ids``, ``tail_pos``
    (2B, T): the chosen tails, then the rejected ones, right-padded; ``attn`` (2B, Lp + T) the mask of a tail row
    over its prefix and itself. ``src`` (N,): for each scored position, its index in the flat hidden states
    ``[prefix states (B*Lp); tail states (2B*T)]``, ``targets`` (N,) the token it predicts; ``pick``/``out`` (M,):
    the answer token log-probs ``logps[pick]`` summed into sequence ``out`` (0..2B-1: chosen, then rejected; a
    shared answer token counts for both sides). ``last`` (2B,): each whole sequence's last token that is not the
    pad token, as an index into the flat hidden states (what a sequence classifier's head reads: a reward).
    ``tokens`` (2B,) each answer's length; ``counts`` (3,): the tokens
    of the 2B whole sequences (prompt + answer, what a plain batch would compute and what TRL counts), the
    positions computed here, and the positions computed with their padding."""

    prefix_ids: torch.Tensor
    prefix_attn: torch.Tensor
    prefix_pos: torch.Tensor
    tail_ids: torch.Tensor
    tail_pos: torch.Tensor
    attn: torch.Tensor
    prefix_of: torch.Tensor
    src: torch.Tensor
    targets: torch.Tensor
    pick: torch.Tensor
    out: torch.Tensor
    last: torch.Tensor
    tokens: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def build(cls, pairs: list[PreferencePair], pad_id: int) -> PairBatch:
        B = len(pairs)
        shared = [common_length(p.chosen_ids, p.rejected_ids) for p in pairs]
        prefixes = [p.prompt_ids + p.chosen_ids[:k] for p, k in zip(pairs, shared)]
        tails = [p.chosen_ids[k:] for p, k in zip(pairs, shared)] + [p.rejected_ids[k:] for p, k in zip(pairs, shared)]
        Lp, T = max(len(x) for x in prefixes), max(1, max(len(t) for t in tails))
        prefix_ids = torch.full((B, Lp), pad_id, dtype=torch.long)
        prefix_attn = torch.zeros((B, Lp), dtype=torch.long)
        tail_ids = torch.full((2 * B, T), pad_id, dtype=torch.long)
        tail_attn = torch.zeros((2 * B, T), dtype=torch.long)
        src, targets, pick, out, last = [], [], [], [], [0] * (2 * B)

        def score(position: int, target: int, *sequences: int) -> None:
            for s in sequences:
                pick.append(len(src))
                out.append(s)
            src.append(position)
            targets.append(target)

        for i, (p, k, prefix) in enumerate(zip(pairs, shared, prefixes)):
            pad = Lp - len(prefix)
            prefix_ids[i, pad:] = torch.tensor(prefix)
            prefix_attn[i, pad:] = 1
            first = i * Lp + pad + len(p.prompt_ids) - 1  # the prompt's last position predicts answer token 0
            for j in range(k):  # the answers' shared beginning: one prediction, counted for both sides
                score(first + j, p.chosen_ids[j], i, B + i)
            for s, answer in ((i, p.chosen_ids), (B + i, p.rejected_ids)):
                tail = answer[k:]
                tail_ids[s, :len(tail)] = torch.tensor(tail, dtype=torch.long)
                tail_attn[s, :len(tail)] = 1
                for j, token in enumerate(tail):  # tail token j: from the prefix's last state, then the tail's
                    score(first + k if j == 0 else B * Lp + s * T + j - 1, token, s)
                whole = prefix + tail
                end = max((j for j, t in enumerate(whole) if t != pad_id), default=len(whole) - 1)
                last[s] = i * Lp + pad + end if end < len(prefix) else B * Lp + s * T + end - len(prefix)
        prefix_of = torch.arange(2 * B) % B
        prefix_len = prefix_attn.sum(-1)
        seq_tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        counts = torch.tensor([seq_tokens, int(prefix_len.sum() + tail_attn.sum()), B * Lp + 2 * B * T],
                              dtype=torch.float64)
        return cls(prefix_ids=prefix_ids, prefix_attn=prefix_attn, prefix_pos=(prefix_attn.cumsum(-1) - 1).clamp(min=0),
                   tail_ids=tail_ids, tail_pos=prefix_len[prefix_of].unsqueeze(1) + torch.arange(T),
                   attn=torch.cat([prefix_attn[prefix_of], tail_attn], dim=1), prefix_of=prefix_of,
                   src=torch.tensor(src), targets=torch.tensor(targets), pick=torch.tensor(pick),
                   out=torch.tensor(out), last=torch.tensor(last), tokens=torch.tensor([len(p.chosen_ids) for p in pairs]
                                                              + [len(p.rejected_ids) for p in pairs]),
                   counts=counts)

    def to(self, device) -> PairBatch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def common_length(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def pair_hidden(model, batch: PairBatch, compute_dtype: torch.dtype | None) -> torch.Tensor:
    """The decoder's final (normed) hidden states of ``batch`` as one flat ``(B*Lp + 2B*T, width)`` tensor:
    ``[prefix states; tail states]``, the layout ``src`` and ``last`` index. The decoder runs under ``compute_dtype``
    autocast; each prefix's key/value cache is indexed out to the pair's two tails (``index_select``: a
    deterministic backward, see grpo/loop.py).

    Under gradient checkpointing (while gradients are taken) transformers drops every layer's cache, so the tails
    could not see their prefix: then the 2B whole sequences (prefix + tail, padded on both sides) run as one plain
    batch, and the same layout is read out of it (the prefix states from the chosen rows)."""
    decoder, _ = decoder_and_head(model)
    with autocast_to(batch.prefix_ids.device.type, compute_dtype):
        if cache_dropped(decoder):
            B, Lp = batch.prefix_ids.shape
            hidden = decoder(input_ids=torch.cat([batch.prefix_ids[batch.prefix_of], batch.tail_ids], dim=1),
                             attention_mask=batch.attn,
                             position_ids=torch.cat([batch.prefix_pos[batch.prefix_of], batch.tail_pos], dim=1),
                             use_cache=False).last_hidden_state
            width = hidden.shape[-1]
            return torch.cat([hidden[:B, :Lp].reshape(-1, width), hidden[:, Lp:].reshape(-1, width)])
        pre = decoder(input_ids=batch.prefix_ids, attention_mask=batch.prefix_attn, position_ids=batch.prefix_pos,
                      **with_cache(decoder, DynamicCache(config=model.config)))
        cache = returned_cache(pre)
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(0, batch.prefix_of)
            layer.values = layer.values.index_select(0, batch.prefix_of)
        tail = decoder(input_ids=batch.tail_ids, attention_mask=batch.attn, position_ids=batch.tail_pos,
                       **with_cache(decoder, cache)).last_hidden_state
    width = pre.last_hidden_state.shape[-1]
    return torch.cat([pre.last_hidden_state.reshape(-1, width), tail.reshape(-1, width)])


def cache_dropped(decoder: torch.nn.Module) -> bool:
    """Whether transformers' gradient checkpointing will drop the cache in this forward (training, with grad)."""
    return decoder.training and torch.is_grad_enabled() and layers_checkpointed(decoder)
