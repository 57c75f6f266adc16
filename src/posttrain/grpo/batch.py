"""GRPO micro-batches: the step's samples as tensors for one training forward each.

Micro-batches hold whole groups, longest first (less padding, and a group's completions can share one prompt
forward). Two layouts: plain rows ``prompt + completion`` (right-padded), or shared prompts (each distinct
prompt once, left-padded, and the completions right-padded after it; the policy indexes the prompt's KV cache
out to its completions)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from posttrain.grpo.data import Sample, StepRollouts


@dataclass(frozen=True)
class MicroBatch:
    """Tensors of one micro-batch of ``B`` completions, ``T`` completion positions.

    Always: ``rows``/``cols`` (N,) the hidden state that predicts each completion token (in the plain layout a
    position of ``ids``; in the shared layout of ``[last prompt state, completion states]``), ``targets`` (N,),
    ``mask`` (B, T) the loss mask, ``advantages`` (B,), ``sample_logps`` (B, T) the rollout engine's
    log-probabilities or None. Plain: ``ids``, ``attn`` (B, prompt + completion). Shared: ``prompt_ids``,
    ``prompt_attn``, ``prompt_pos`` (U, Lp) the U distinct prompts, ``prompt_of`` (B,) each row's prompt,
    ``completion_ids`` (B, T), ``completion_pos`` (B, T), ``attn`` (B, Lp + T)."""

    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    attn: torch.Tensor
    sample_logps: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    prompt_ids: torch.Tensor | None = None
    prompt_attn: torch.Tensor | None = None
    prompt_pos: torch.Tensor | None = None
    prompt_of: torch.Tensor | None = None
    completion_ids: torch.Tensor | None = None
    completion_pos: torch.Tensor | None = None

    @property
    def shared_prompts(self) -> bool:
        return self.prompt_ids is not None

    def to(self, device) -> MicroBatch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if getattr(self, f.name) is not None})

    @classmethod
    def plain(cls, samples: list[Sample], pad_id: int) -> MicroBatch:
        width = max(len(s.prompt_ids) + s.length for s in samples)
        ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(samples), width), dtype=torch.long)
        rows, cols = [], []
        for b, s in enumerate(samples):
            n = len(s.prompt_ids) + s.length
            ids[b, :n] = torch.tensor(s.prompt_ids + s.completion_ids)
            attn[b, :n] = 1
            rows += [b] * s.length
            cols += range(len(s.prompt_ids) - 1, n - 1)
        return cls(ids=ids, attn=attn, rows=torch.tensor(rows), cols=torch.tensor(cols), **_common(samples))

    @classmethod
    def shared(cls, samples: list[Sample], pad_id: int) -> MicroBatch:
        uniq: dict[tuple, int] = {}
        prompt_of = [uniq.setdefault(tuple(s.prompt_ids), len(uniq)) for s in samples]
        width = max(len(p) for p in uniq)
        p_ids = torch.full((len(uniq), width), pad_id, dtype=torch.long)
        p_attn = torch.zeros((len(uniq), width), dtype=torch.long)
        for u, p in enumerate(uniq):
            p_ids[u, width - len(p):] = torch.tensor(p)
            p_attn[u, width - len(p):] = 1
        T = max(s.length for s in samples)
        c_ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
        c_attn = torch.zeros((len(samples), T), dtype=torch.long)
        rows, cols = [], []
        for b, s in enumerate(samples):
            c_ids[b, :s.length] = torch.tensor(s.completion_ids)
            c_attn[b, :s.length] = 1
            rows += [b] * s.length
            cols += range(s.length)
        row_u = torch.tensor(prompt_of)
        p_len = p_attn.sum(-1)
        return cls(prompt_ids=p_ids, prompt_attn=p_attn, prompt_pos=(p_attn.cumsum(-1) - 1).clamp(min=0),
                   prompt_of=row_u, completion_ids=c_ids, completion_pos=p_len[row_u].unsqueeze(1) + torch.arange(T),
                   attn=torch.cat([p_attn[row_u], c_attn], dim=1), rows=torch.tensor(rows), cols=torch.tensor(cols),
                   **_common(samples))


def _common(samples: list[Sample]) -> dict:
    """targets, loss mask, advantages and the engine's log-probabilities (when every sample has them)."""
    T = max(s.length for s in samples)
    mask = torch.zeros((len(samples), T))
    for b, s in enumerate(samples):
        mask[b, :s.length] = s.mask
    sample_logps = None
    if all(s.sample_logps is not None for s in samples):  # the rollout engine's log-probs (TIS)
        sample_logps = torch.zeros((len(samples), T))
        for b, s in enumerate(samples):
            sample_logps[b, :s.length] = s.sample_logps
    return {"targets": torch.tensor([t for s in samples for t in s.completion_ids]), "mask": mask,
            "advantages": torch.tensor([s.advantage for s in samples]), "sample_logps": sample_logps}


def micro_batches(rollouts: StepRollouts, batch_size: int, pad_id: int, device, share_prompts: bool
                  ) -> tuple[list[MicroBatch], bool]:
    """The step's samples in micro-batches of ``batch_size``: groups kept together, longest first; a group's
    samples longest first. -> (micro-batches, dummy): when dynamic sampling left this process nothing, one
    zero-advantage micro-batch of a first-round sample keeps DDP in step (the caller zeroes its loss)."""
    by_group = sorted((sorted(g.samples, key=lambda s: -s.length) for g in rollouts.groups),
                      key=lambda ss: -(len(ss[0].prompt_ids) + ss[0].length))
    samples = [s for ss in by_group for s in ss]
    dummy = not samples
    if dummy:
        samples = [replace(rollouts.first[0].samples[0], advantage=0.0)]
    build = MicroBatch.shared if share_prompts else MicroBatch.plain
    return [build(samples[i:i + batch_size], pad_id).to(device) for i in range(0, len(samples), batch_size)], dummy


def unpad(flat: torch.Tensor, batch: MicroBatch) -> torch.Tensor:
    """(N_tokens,) -> (B, T) with zeros on padding."""
    out = flat.new_zeros(batch.mask.shape)
    starts = torch.zeros(out.shape[0] + 1, dtype=torch.long, device=flat.device)
    starts[1:] = torch.bincount(batch.rows, minlength=out.shape[0]).cumsum(0)
    t = torch.arange(flat.shape[0], device=flat.device) - starts[batch.rows]
    out[batch.rows, t] = flat
    return out
