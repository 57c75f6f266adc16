"""One GRPO step's rollouts: the rewards built once per run, each round of rollouts scored into groups
(:func:`collect_rollouts`, with DAPO's dynamic sampling), and what users read about them (sample completions
in a table and in ``completions.jsonl``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from posttrain.distributed import gather_all
from posttrain.errors import UserError
from posttrain.grpo.config import GRPORecipe
from posttrain.grpo.data import Group, Prompt, PromptStream, Sample, StepRollouts
from posttrain.grpo.losses import mask_truncated, zero_std_groups
from posttrain.rewards import RewardSet
from posttrain.rewards.functions import generation_suffix
from posttrain.rewards.registry import RewardContractError


def build_rewards(cfg: GRPORecipe, tok, reward_funcs=None) -> RewardSet:
    """The recipe's rewards (or ``reward_funcs``), strict: a reward that returns the wrong number of values,
    NaN, infinity or values so large that their spread overflows stops the run naming it, and so does a custom
    reward that runs past ``grpo.reward_timeout``. Format rewards learn what the generation prompt opens."""
    specs = reward_funcs if reward_funcs is not None else cfg.rewards
    try:
        return RewardSet.from_specs(specs, prompt_suffix=generation_suffix(tok), markers=cfg.data.markers,
                                    weights=cfg.grpo.reward_weights, strict=True,
                                    max_failure_fraction=cfg.grpo.reward_max_failure_fraction,
                                    timeout=cfg.grpo.reward_timeout)
    except UserError as exc:
        if cfg.grpo.reward_weights is not None and "reward weights" in str(exc):
            raise UserError(f"grpo.reward_weights: {exc}") from None
        raise


def score_groups(ro, prompts: list[Prompt], rewards: RewardSet, tok, step: int,
                 mask_truncated_completions: bool = False) -> tuple[list[Group], dict[str, float]]:
    """Rewards for one batch of rollouts (``ro``: G completions of each prompt, in order) -> one group each, and
    the reward functions' own metrics of this call (``rewards/<name>/failures``, a verifier's timeouts, a reward
    model's seconds; TRL's reward statistics are computed from the groups instead)."""
    G, n = ro.num_generations, len(ro)
    columns = {k: [prompts[i // G].columns.get(k) for i in range(n)] for k in prompts[0].columns}
    lengths = ro.lengths.tolist()
    ids = [ro.completion_ids[i, :lengths[i]].tolist() for i in range(n)]
    try:
        total, per_reward, metrics = rewards([prompts[i // G].messages for i in range(n)],
                                             [[{"role": "assistant", "content": text}] for text in ro.texts],
                                             completion_ids=ids, **columns)
    except RewardContractError as exc:
        raise UserError(f"step {step + 1}: {exc}") from None
    truncated = ro.truncated.tolist()
    mask = ro.completion_mask.float()
    if mask_truncated_completions:
        mask = mask_truncated(mask, ro.truncated)
    values = [float("nan") if v is None else float(v) for v in total]
    zero = zero_std_groups(torch.tensor(values, dtype=torch.float64), G).tolist()
    groups = []
    for gi, prompt in enumerate(prompts):
        samples = [Sample(prompt_ids=ro.prompt_of(i), completion_ids=ids[i], mask=mask[i, :lengths[i]],
                          sample_logps=ro.logprobs[i, :lengths[i]] if ro.logprobs is not None else None,
                          text=ro.texts[i], finish=ro.finish_reasons[i], truncated=truncated[i], reward=values[i],
                          per_reward={k: per_reward[k][i] for k in per_reward})
                   for i in range(gi * G, (gi + 1) * G)]
        groups.append(Group(samples=samples, prompt_text=tok.decode(prompt.ids[-200:]), zero_std=zero[gi]))
    own = {k: float(v) for k, v in metrics.items() if k.startswith("rewards/") and k.rsplit("/", 1)[-1] not in
           ("mean", "std")}
    return groups, own


def combine_reward_metrics(parts: list[dict[str, float]], *, mean_states: bool = False) -> dict[str, float]:
    """Reward functions' own metrics of several calls together (a step's rounds; with ``mean_states``, its
    processes): counts and seconds add up; a ``running_*`` value is a state: the last one, or the mean."""
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            if not k.rsplit("/", 1)[-1].startswith("running_"):
                out[k] = out.get(k, 0.0) + v
            else:
                out[k] = (out.get(k, 0.0) + v / len(parts)) if mean_states else v
    return out


def collect_rollouts(engine, stream: PromptStream, prompts: list[Prompt], rewards: RewardSet, tok, sampling,
                     cfg: GRPORecipe, step: int, per_proc: int, rank: int, world: int) -> StepRollouts:
    """One step's rollouts, scored, as groups. Every process draws the same global slice of prompts and takes
    its own part. With dynamic sampling, groups whose rewards all agree are dropped and, for up to
    ``dynamic_sampling_rounds`` more rounds, more prompts are drawn until every process has ``per_proc``
    groups (all processes draw in every round, so the prompt stream stays in step)."""
    grpo = cfg.grpo
    groups: list[Group] = []
    first: list[Group] | None = None
    counts = {"rollout_time": 0.0, "reward_time": 0.0, "gen_tokens": 0, "seen_tokens": 0, "dropped": 0}
    own_metrics: list[dict[str, float]] = []  # each scoring call's reward-function metrics
    rounds = 0
    while True:
        draws = stream.draw(per_proc * world)[rank * per_proc:(rank + 1) * per_proc]
        need = per_proc - len(groups)
        # every process generates in every round, even one whose groups are complete (need <= 0; what it draws is
        # not kept): generation may hold collectives (FSDP2 / ZeRO-3 gather the weights, vLLM syncs them) that
        # every rank must enter, and the others are generating anyway, so it costs no wall time
        batch = [prompts[i] for i, _ in draws]
        t0 = time.perf_counter()
        ro = engine.generate([p.ids for p in batch], grpo.num_generations, sampling, seeds=[k for _, k in draws])
        counts["rollout_time"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        new, own = (score_groups(ro, batch, rewards, tok, step, grpo.mask_truncated_completions) if need > 0
                    else ([], {}))
        own_metrics.append(own)
        counts["reward_time"] += time.perf_counter() - t0
        counts["gen_tokens"] += ro.stats["tokens"]
        counts["seen_tokens"] += ro.stats["tokens"] + sum(len(p.ids) for p in batch) * grpo.num_generations
        if first is None:
            first = list(new)
        if grpo.dynamic_sampling:
            kept = [x for x in new if not x.zero_std]
            counts["dropped"] += len(new) - len(kept)
            groups += kept[:max(need, 0)]
        else:
            groups += new
        rounds += 1
        short = max(gather_all([per_proc - len(groups)], world))
        if not grpo.dynamic_sampling or short <= 0 or rounds > grpo.dynamic_sampling_rounds:
            return StepRollouts(groups=groups, first=first, rounds=rounds,
                                reward_fn_metrics=combine_reward_metrics(own_metrics), **counts)


def log_completions(run_dir: Path, step: int, groups: list[Group], names: list[str], n_print: int) -> None:
    """Every completion of the step (this process) to completions.jsonl; a few to the console as a table."""
    with (run_dir / "completions.jsonl").open("a") as f:
        for gi, grp in enumerate(groups):
            for s in grp.samples:
                f.write(json.dumps({"step": step, "group": gi, "prompt": grp.prompt_text, "completion": s.text,
                                    "reward": s.reward, "advantage": s.advantage,
                                    "rewards": {nm: s.per_reward[nm] for nm in names},
                                    "length": s.length, "finish_reason": s.finish}) + "\n")
    if not n_print:
        return
    table = Table(title=f"step {step}: sample completions", show_lines=True)
    for col in ("prompt", "completion", "reward", *names):
        table.add_column(col, overflow="fold")
    shown = [(grp, s) for grp in groups for s in grp.samples][:n_print]
    for grp, s in shown:
        table.add_row(grp.prompt_text[-120:], s.text[:300], f"{s.reward:.3g}", *(f"{s.per_reward[nm]}" for nm in names))
    Console(width=160).print(table)
