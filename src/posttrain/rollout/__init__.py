"""Rollout engines: sample G completions for each prompt, behind one interface.

``engine.generate(prompts, n, sampling, seeds=None) -> Rollouts``

- ``prompts``: token ids, one list per prompt (already rendered with the chat template).
- ``n``: completions per prompt (GRPO's group size G). Completions of prompt ``i`` are rows ``i*n .. i*n+n-1``.
- ``sampling``: :class:`SamplingParams` (vLLM's names where they exist).
- ``seeds``: one integer per prompt. Completion ``j`` of a prompt with seed ``s`` is drawn from its own random
  stream keyed by ``(sampling.seed, s, j)``, so a completion does not depend on which other prompts share its
  batch, on the number of processes, or on a restart: resumed and multi-process runs sample the same tokens.

The transformers backend is :class:`posttrain.rollout.hf.HFRolloutEngine`. A vLLM backend fits behind the same
signature (vLLM takes token-id prompts, ``n``, per-request seeds and returns log-probabilities).

Two rules every generating stage shares live here: :func:`completion_seed` (the random stream of one completion)
and :func:`stop_token_ids` (which tokens end generation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``top_k`` <= 0, ``top_p`` = 1 and ``min_p`` = 0 switch those filters off; filters apply
    in the order temperature, top-k, top-p, min-p. ``temperature`` = 0 is greedy decoding."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    include_stop_str_in_output: bool = True
    ignore_eos: bool = False  # never stop early: every completion is max_new_tokens long (benchmarks)
    seed: int = 0
    logprobs: bool = True  # return log pi_sample(token) under the temperature-scaled, unfiltered distribution

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            raise ValueError("min_p must be in [0, 1)")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")


@dataclass
class Rollouts:
    """Completions of a batch of prompts, ``n`` per prompt, grouped: rows ``i*n .. i*n+n-1`` belong to prompt ``i``.

    ``completion_ids`` (N, T) are right-padded with ``pad_token_id``; ``completion_mask`` (N, T) is 1 on the
    generated tokens (a stop token that ended the completion included); ``logprobs`` (N, T) are the sampling
    log-probabilities when the backend gives them (0 on padding). ``finish_reasons`` are ``"stop"`` (a stop
    token or string) or ``"length"`` (cut at ``max_new_tokens``).
    """

    prompt_ids: list[list[int]]
    num_generations: int
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    finish_reasons: list[str]
    logprobs: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    @property
    def truncated(self) -> torch.Tensor:
        return torch.tensor([r == "length" for r in self.finish_reasons], dtype=torch.bool)

    def prompt_of(self, row: int) -> list[int]:
        return self.prompt_ids[row // self.num_generations]


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams, *,
                 seeds: Sequence[int] | None = None) -> Rollouts: ...


def checked_request(prompts: Sequence[Sequence[int]], n: int, seeds: Sequence[int] | None
                    ) -> tuple[list[list[int]], list[int]]:
    """A ``generate`` request as plain lists, checked the same way by every engine: ``n >= 1``, no empty prompt,
    one seed per prompt (default: the prompt's index)."""
    if n < 1:
        raise ValueError("n must be >= 1")
    prompts = [list(map(int, p)) for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt is empty; every prompt needs at least one token")
    seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    return prompts, seeds


def completion_seed(sampling_seed: int, prompt_seed: int, index: int) -> int:
    """The seed of completion ``index`` of the prompt seeded ``prompt_seed``: a deterministic 63-bit mix of the
    three integers (splitmix64 steps). Every backend keys its per-completion random stream with it."""
    h = 0x9E3779B97F4A7C15
    for x in (sampling_seed, prompt_seed, index):
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


# tokens that end an assistant turn in common chat templates (ChatML/Qwen, Llama 3, Phi, Gemma, GPT-2 style)
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>")


def rollout_pad_id(tokenizer) -> int:
    """The id every rollout engine pads completions with: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def stop_token_ids(model, tokenizer) -> tuple[int, ...]:
    """Every token id generation stops on; the one rule for GRPO rollouts, evaluation, chat, ``generate`` and the
    exported generation config.

    The union of: the end-of-turn token the chat template writes (the first of :data:`END_OF_TURN` that appears in
    the template and the vocabulary), the tokenizer's EOS (what TRL stops on), and the EOS ids of the model's
    generation config and config (what ``transformers`` ``generate()`` stops on). The template's token comes
    first, so ``ids[0]`` is the token that ends a turn (export writes it as the GGUF EOS). Why the template's
    token: a base tokenizer with a chat template (Qwen3-Base: EOS ``<|endoftext|>``, turns end with
    ``<|im_end|>``) would otherwise run past the end of the answer. ``model`` may be None (tokenizer only)."""
    ids: list[int] = []

    def add(x):
        for i in x if isinstance(x, (list, tuple)) else [x]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))

    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    for t in END_OF_TURN:
        i = tokenizer.convert_tokens_to_ids(t) if t in template else None
        if i is not None and tokenizer.convert_ids_to_tokens(i) == t:  # in the vocabulary (not the unknown token)
            add(i)
            break
    add(tokenizer.eos_token_id)
    add(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    add(getattr(getattr(model, "config", None), "eos_token_id", None))
    return tuple(ids)


__all__ = ["END_OF_TURN", "RolloutEngine", "Rollouts", "SamplingParams", "completion_seed", "rollout_pad_id",
           "stop_token_ids"]
