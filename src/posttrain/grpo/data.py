"""GRPO's data: the typed records a step passes between its stages, the prompts rendered and filtered by
length, and a resumable prompt stream shared by all processes.

A step reads as ``Prompt`` -> (rollout) -> ``Sample`` (one completion, its rewards) -> ``Group`` (the G samples
of one prompt) -> ``StepRollouts`` (the step's groups) -> advantages set once (:meth:`StepRollouts.with_advantages`)
-> micro-batches (:mod:`posttrain.grpo.batch`)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from posttrain.data.formats import is_numeric_answer
from posttrain.data.loading import load_rows
from posttrain.data.templates import install_template
from posttrain.errors import UserError
from posttrain.grpo.config import GRPORecipe

PROMPT_COLUMNS = ("prompt", "problem", "question")


# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Prompt:
    """A dataset row ready to sample from: its tokens (chat template applied), its messages, every other
    column of the row (they all reach the rewards) and its row number in the data."""

    ids: list[int]
    messages: list[dict]
    columns: dict
    row: int


@dataclass(frozen=True)
class Sample:
    """One completion of a prompt: tokens, loss mask (0 on a truncated completion when those are masked), the
    rollout engine's log-probabilities (vLLM; None from transformers), text, rewards and, once computed, its
    advantage. ``reward`` is the weighted total (NaN when every reward function skipped it)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    mask: torch.Tensor
    sample_logps: torch.Tensor | None
    text: str
    finish: str
    truncated: bool
    reward: float
    per_reward: dict[str, float | None]
    advantage: float | None = None

    @property
    def length(self) -> int:
        return len(self.completion_ids)


@dataclass(frozen=True)
class Group:
    """The G samples of one prompt. ``zero_std``: their rewards all agree (no learning signal)."""

    samples: list[Sample]
    prompt_text: str
    zero_std: bool

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]


@dataclass(frozen=True)
class StepRollouts:
    """One step's rollouts on this process: ``groups`` to train on and ``first``, the first round's groups
    (what the reward metrics and the completion log report; with dynamic sampling ``groups`` keeps only groups
    whose rewards differ, possibly from later rounds), with counts and timings."""

    groups: list[Group]
    first: list[Group]
    rollout_time: float = 0.0
    reward_time: float = 0.0
    gen_tokens: int = 0
    seen_tokens: int = 0
    rounds: int = 0
    dropped: int = 0
    reward_fn_metrics: dict = field(default_factory=dict)  # the reward functions' own, over every round

    def samples(self) -> list[Sample]:
        return [s for g in self.groups for s in g.samples]

    def with_advantages(self, advantages: list[float]) -> StepRollouts:
        """The same rollouts with each training sample's advantage set (in ``samples()`` order); the first
        round's groups show the advantages of the samples that train."""
        new = {id(s): replace(s, advantage=a) for s, a in zip(self.samples(), advantages)}

        def regroup(groups):
            return [replace(g, samples=[new.get(id(s), s) for s in g.samples]) for g in groups]

        return replace(self, groups=regroup(self.groups), first=regroup(self.first))


# ---------------------------------------------------------------------------------------------- data


def prepare_prompts(cfg: GRPORecipe, tok, rows: list[dict] | None = None) -> tuple[list[Prompt], dict]:
    """Rows -> prompts rendered with the chat template and tokenized; the seeds' length rule applied.

    Each prompt's ``columns`` are every other column of the row (they all
    reach the rewards), plus ``answer`` from ``data.columns.answer`` when that is set. ``max_prompt_length:
    auto`` keeps prompts up to the ``prompt_length_quantile`` (0.9) of the prompt lengths; longer ones are
    dropped and counted. Completions get the rest of ``data.max_length`` unless ``max_completion_length``.
    """
    d, g = cfg.data, cfg.grpo
    rows = load_rows(d) if rows is None else rows
    stats = {"rows": len(rows)}
    cols = d.columns
    prompt_col = cols.problem if cols else next((c for c in PROMPT_COLUMNS if c in rows[0]), None)
    answer_col = cols.answer if cols else None
    if prompt_col is None or prompt_col not in rows[0]:
        raise UserError(f"data: no prompt column {prompt_col or '/'.join(PROMPT_COLUMNS)!r} in {d.path} "
                        f"(columns: {sorted(rows[0])}); set data.columns.problem")
    if answer_col is not None and answer_col not in rows[0]:
        raise UserError(f"data.columns.answer={answer_col!r} is not a column of {d.path} (columns: {sorted(rows[0])})")
    if d.numeric_answer_only:
        if answer_col is None:
            raise UserError("data.numeric_answer_only needs data.columns.answer (the gold answer column)")
        rows = [r for r in rows if is_numeric_answer(r.get(answer_col))]
        stats["dropped_non_numeric"] = stats["rows"] - len(rows)
    if d.sample is not None and d.sample < len(rows):
        rows = random.Random(d.seed).sample(rows, d.sample)
    install_template(tok, d.template, d.markers, d.system_prompt if d.template == "reasoning" else None)
    system = d.system_prompt if d.template != "reasoning" else None
    prompts = []
    for i, row in enumerate(rows):
        value = row[prompt_col]
        if isinstance(value, list):  # TRL's conversational prompt: a list of messages
            messages = [dict(m) for m in value]
        elif isinstance(value, str) and value.strip():
            messages = [{"role": "user", "content": value}]
        else:
            raise UserError(f"{d.path} row {i}: prompt column {prompt_col!r} is empty or not text/messages")
        if system and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": system}] + messages
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        columns = {k: v for k, v in row.items() if k != prompt_col}
        if answer_col is not None:
            columns["answer"] = row[answer_col]
        prompts.append(Prompt(ids=tok(text, add_special_tokens=False)["input_ids"], messages=messages,
                              columns=columns, row=i))
    lengths = [len(p.ids) for p in prompts]
    if g.max_prompt_length == "auto":
        limit = int(np.quantile(lengths, g.prompt_length_quantile))
    else:
        limit = g.max_prompt_length
    kept = [p for p in prompts if len(p.ids) <= limit]
    stats.update(dropped_too_long=len(prompts) - len(kept), prompts=len(kept), max_prompt_length=limit)
    max_prompt = max((len(p.ids) for p in kept), default=0)
    completion = g.max_completion_length or d.max_length - max_prompt
    if completion < 1:
        raise UserError(f"data.max_length={d.max_length} leaves no room for completions after prompts of up to "
                        f"{max_prompt} tokens: raise data.max_length or lower grpo.max_prompt_length")
    stats["max_completion_length"] = completion
    if not kept:
        raise UserError(f"data: every prompt is longer than max_prompt_length={limit}")
    return kept, stats


class PromptStream:
    """A global, seeded, epoch-shuffled order of prompts with a cursor. Every process draws the same global
    slice and takes its own part, so processes stay in step and a resumed run continues the same order."""

    def __init__(self, n: int, seed: int, cursor: int = 0):
        self.n, self.seed, self.cursor = n, seed, cursor
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def draw(self, count: int) -> list[tuple[int, int]]:
        """-> [(prompt index, draw number)] for the next ``count`` prompts (the draw number seeds sampling)."""
        out = []
        for _ in range(count):
            epoch, k = divmod(self.cursor, self.n)
            out.append((self._order(epoch)[k], self.cursor))
            self.cursor += 1
        return out


