"""GRPO's data side: prompts rendered and filtered by length, a resumable prompt stream shared by all processes,
rollouts scored by the reward functions into groups, and what users read about them (reward and completion
metrics with TRL's names, sample completions in a table and in ``completions.jsonl``)."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from posttrain.data.formats import is_numeric_answer
from posttrain.data.loading import load_rows
from posttrain.data.templates import install_template
from posttrain.errors import UserError
from posttrain.grpo.config import GRPORecipe
from posttrain.grpo.losses import mask_truncated, zero_std_groups

PROMPT_COLUMNS = ("prompt", "problem", "question")


# ---------------------------------------------------------------------------------------------- data


def prepare_prompts(cfg: GRPORecipe, tok, rows: list[dict] | None = None) -> tuple[list[dict], dict]:
    """Rows -> prompts rendered with the chat template and tokenized; the seeds' length rule applied.

    Each prompt is ``{"ids", "messages", "columns"}``; ``columns`` are every other column of the row (they all
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
        prompts.append({"ids": tok(text, add_special_tokens=False)["input_ids"], "messages": messages,
                        "columns": columns, "row": i})
    lengths = [len(p["ids"]) for p in prompts]
    if g.max_prompt_length == "auto":
        limit = int(np.quantile(lengths, g.prompt_length_quantile))
    else:
        limit = g.max_prompt_length
    kept = [p for p in prompts if len(p["ids"]) <= limit]
    stats.update(dropped_too_long=len(prompts) - len(kept), prompts=len(kept), max_prompt_length=limit)
    max_prompt = max((len(p["ids"]) for p in kept), default=0)
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


# ---------------------------------------------------------------------------------------------- rewards


class CheckedReward:
    """Wraps a reward function: a wrong number of values, NaN or infinity is recorded, and the loop stops
    with an error naming the function (a quiet NaN would poison every advantage of its group)."""

    def __init__(self, fn, problems: list):
        self.fn, self.problems = fn, problems
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, prompts, completions, **columns):
        values = self.fn(prompts=prompts, completions=completions, **columns)
        try:
            seq = list(values)
        except TypeError:
            return values
        if len(seq) != len(completions):
            self.problems.append(f"reward {self.__name__!r} returned {len(seq)} values for {len(completions)} "
                                 "completions; it must return one float (or None to skip) per completion")
        bad = [v for v in seq if v is not None and isinstance(v, (int, float)) and not math.isfinite(v)]
        if bad:
            self.problems.append(f"reward {self.__name__!r} returned {bad[0]} (non-finite); return a finite float, "
                                 "or None to skip a completion")
            return [v if not (isinstance(v, (int, float)) and not math.isfinite(v)) else None for v in seq]
        return values


def build_rewards(cfg: GRPORecipe, tok, reward_funcs=None):
    """The recipe's rewards (or ``reward_funcs``) as a ``RewardSet`` whose functions are checked; -> (set, the
    list where the checks record problems). Format rewards learn what the generation prompt opens."""
    from posttrain.rewards import RewardSet
    from posttrain.rewards.functions import Markers, generation_suffix

    m = cfg.data.markers
    specs = reward_funcs if reward_funcs is not None else cfg.rewards
    base = RewardSet.from_specs(specs, prompt_suffix=generation_suffix(tok),
                                markers=Markers(m.reasoning_start, m.reasoning_end, m.solution_start, m.solution_end))
    weights = cfg.grpo.reward_weights or base.weights
    if len(weights) != len(base.funcs):
        raise UserError(f"grpo.reward_weights has {len(weights)} weights for {len(base.funcs)} reward functions "
                        f"{base.names}; give one weight per function (presets expand: unsloth_math is 4)")
    problems: list[str] = []
    return RewardSet([CheckedReward(f, problems) for f in base.funcs], weights), problems


# ---------------------------------------------------------------------------------------------- rollouts -> groups


def score_groups(ro, batch_prompts: list[dict], rewards, problems: list[str], tok, step: int,
                 mask_truncated_completions: bool = False) -> list[dict]:
    """Rewards for one batch of rollouts -> one dict per group with its items (completions) and statistics."""
    G = ro.num_generations
    n = len(ro)
    prompts_msgs = [batch_prompts[i // G]["messages"] for i in range(n)]
    completions = [[{"role": "assistant", "content": text}] for text in ro.texts]
    keys = list(batch_prompts[0]["columns"])
    columns = {k: [batch_prompts[i // G]["columns"].get(k) for i in range(n)] for k in keys}
    lengths = ro.lengths.tolist()
    ids = [ro.completion_ids[i, :lengths[i]].tolist() for i in range(n)]
    total, per_reward, _ = rewards(prompts_msgs, completions, completion_ids=ids, **columns)
    if problems:
        msg = problems[0]
        problems.clear()
        raise UserError(f"step {step + 1}: {msg}")
    truncated = ro.truncated.tolist()
    mask = ro.completion_mask.float()
    if mask_truncated_completions:
        mask = mask_truncated(mask, ro.truncated)
    values = [float("nan") if v is None else float(v) for v in total]
    zero = zero_std_groups(torch.tensor(values, dtype=torch.float64), G).tolist()
    groups = []
    for gi in range(n // G):
        rows = range(gi * G, (gi + 1) * G)
        items = [{"prompt": ro.prompt_of(i), "completion": ids[i], "length": lengths[i],
                  "mask": mask[i, :lengths[i]],
                  "sample_logps": ro.logprobs[i, :lengths[i]] if ro.logprobs is not None else None,
                  "text": ro.texts[i], "finish": ro.finish_reasons[i], "truncated": truncated[i]} for i in rows]
        groups.append({"items": items, "rewards": [values[i] for i in rows], "zero_std": zero[gi],
                       "per_reward": {k: [per_reward[k][i] for i in rows] for k in per_reward},
                       "lengths": [lengths[i] for i in rows], "truncated": [truncated[i] for i in rows],
                       "prompt_text": tok.decode(batch_prompts[gi]["ids"][-200:])})
    return groups


def collect_groups(engine, stream: PromptStream, prompts: list[dict], rewards, problems: list[str], tok, sampling,
                   g, step: int, per_proc: int, rank: int, world: int) -> dict:
    """One step's rollouts, scored, as groups. Every process draws the same global slice of prompts and takes
    its own part. With dynamic sampling, groups whose rewards all agree are dropped and, for up to
    ``dynamic_sampling_rounds`` more rounds, more prompts are drawn until every process has ``per_proc``
    groups (all processes draw in every round, so the prompt stream stays in step)."""
    from accelerate.utils import gather_object

    out = {"groups": [], "first": None, "dropped": 0, "rounds": 0, "rollout_time": 0.0, "reward_time": 0.0,
           "gen_tokens": 0, "seen_tokens": 0}
    while True:
        draws = stream.draw(per_proc * world)[rank * per_proc:(rank + 1) * per_proc]
        need = per_proc - len(out["groups"])
        new = []
        if need > 0:
            batch = [prompts[i] for i, _ in draws]
            t0 = time.perf_counter()
            ro = engine.generate([p["ids"] for p in batch], g.num_generations, sampling, seeds=[k for _, k in draws])
            out["rollout_time"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            new = score_groups(ro, batch, rewards, problems, tok, step, g.mask_truncated_completions)
            out["reward_time"] += time.perf_counter() - t0
            out["gen_tokens"] += ro.stats["tokens"]
            out["seen_tokens"] += ro.stats["tokens"] + sum(len(p["ids"]) for p in batch) * g.num_generations
        if out["first"] is None:
            out["first"] = list(new)
        if g.dynamic_sampling:
            kept = [x for x in new if not x["zero_std"]]
            out["dropped"] += len(new) - len(kept)
            out["groups"] += kept[:max(need, 0)]
        else:
            out["groups"] += new
        short = per_proc - len(out["groups"])
        if world > 1:
            short = max(gather_object([short]))
        if not g.dynamic_sampling or short <= 0 or out["rounds"] >= g.dynamic_sampling_rounds:
            out["rounds"] += 1
            return out
        out["rounds"] += 1


# ---------------------------------------------------------------------------------------------- what users read


def reward_metrics(groups: list[tuple], names: list[str], frac_zero: float) -> dict:
    """TRL's reward and completion metrics over the step's first round of rollouts (every process's groups,
    each ``(rewards, per_reward, lengths, truncated)``)."""
    rewards = [r for x in groups for r in x[0]]
    lengths = [n for x in groups for n in x[2]]
    trunc = [tr for x in groups for tr in x[3]]
    r = torch.tensor(rewards, dtype=torch.float64)
    out = {"reward": float(torch.nanmean(r)), "reward_std": float(_std(r)), "frac_reward_zero_std": frac_zero}
    for name in names:
        vals = torch.tensor([float("nan") if v is None else v for x in groups for v in x[1][name]], dtype=torch.float64)
        out[f"rewards/{name}/mean"] = float(torch.nanmean(vals))
        out[f"rewards/{name}/std"] = float(_std(vals))
    term = [n for n, tr in zip(lengths, trunc) if not tr]
    out.update({"completions/mean_length": float(np.mean(lengths)), "completions/min_length": min(lengths),
                "completions/max_length": max(lengths), "completions/clipped_ratio": float(np.mean(trunc)),
                "completions/mean_terminated_length": float(np.mean(term)) if term else 0.0,
                "completions/min_terminated_length": min(term) if term else 0,
                "completions/max_terminated_length": max(term) if term else 0})
    return out


def _std(x: torch.Tensor) -> torch.Tensor:
    x = x[~torch.isnan(x)]
    return x.std() if x.numel() > 1 else torch.tensor(0.0)


def log_completions(run_dir: Path, step: int, groups: list[dict], names: list[str], n_print: int) -> None:
    """Every completion of the step (this process) to completions.jsonl; a few to the console as a table."""
    path = run_dir / "completions.jsonl"
    with path.open("a") as f:
        for gi, grp in enumerate(groups):
            for k, it in enumerate(grp["items"]):
                f.write(json.dumps({"step": step, "group": gi, "prompt": grp["prompt_text"], "completion": it["text"],
                                    "reward": grp["rewards"][k], "advantage": it.get("advantage"),
                                    "rewards": {nm: grp["per_reward"][nm][k] for nm in names},
                                    "length": it["length"], "finish_reason": it["finish"]}) + "\n")
    if not n_print:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"step {step}: sample completions", show_lines=True)
    for col in ("prompt", "completion", "reward", *names):
        table.add_column(col, overflow="fold")
    shown = 0
    for grp in groups:
        for k, it in enumerate(grp["items"]):
            if shown >= n_print:
                break
            table.add_row(grp["prompt_text"][-120:], it["text"][:300], f"{grp['rewards'][k]:.3g}",
                          *(f"{grp['per_reward'][nm][k]}" for nm in names))
            shown += 1
    Console(width=160).print(table)
