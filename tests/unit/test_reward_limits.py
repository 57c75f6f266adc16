"""Rewards are bounded in time and size (reliability review W13-W15): a hung custom reward stops the run naming
itself, rewards so large that their spread overflows are an error naming the reward, the failure advice names a
real key, and a step whose completions no reward scored is not reported as rewards that "all agree"."""

from __future__ import annotations

import threading
import time

import pytest

from posttrain.config import load_recipe
from posttrain.grpo.collect import build_rewards
from posttrain.grpo.config import GRPORecipe
from posttrain.grpo.loop import warn_zero_std
from posttrain.rewards import RewardContractError, RewardFailureError, RewardSet
from posttrain.rewards.deadline import TimeLimitError

COMPLETIONS = [[{"role": "assistant", "content": c}] for c in ("1", "2")]


def hangs(prompts, completions, **kw):
    time.sleep(60)
    return [0.0] * len(completions)


def swallows(prompts, completions, **kw):
    """A reward whose own broad ``except`` would eat an ordinary exception."""
    try:
        time.sleep(60)
    except Exception:  # noqa: BLE001
        return [0.0] * len(completions)
    return [1.0] * len(completions)


def quick(prompts, completions, **kw):
    return [float(len(c[0]["content"])) for c in completions]


@pytest.mark.parametrize("fn", [hangs, swallows], ids=["hangs", "swallows_exceptions"])
def test_a_hung_custom_reward_stops_with_its_name(fn):
    rs = RewardSet([fn], timeout=0.3)
    t0 = time.perf_counter()
    with pytest.raises(TimeLimitError, match=rf"reward '{fn.__name__}' did not return within 0.3 s "
                                             r"\(grpo.reward_timeout\).*raise grpo.reward_timeout"):
        rs(["p", "p"], COMPLETIONS)
    assert time.perf_counter() - t0 < 5  # interrupted, not waited out (and not retried per sample)
    # the next call of a reward in time is unaffected by the interrupt of the last one
    total, _, _ = RewardSet([quick], timeout=5)(["p", "p"], COMPLETIONS)
    assert total == [1.0, 1.0]


def test_off_the_main_thread_the_limit_still_holds():
    box = {}

    def run():
        try:
            RewardSet([hangs], timeout=0.3)(["p", "p"], COMPLETIONS)
        except TimeLimitError as exc:
            box["error"] = str(exc)

    t = threading.Thread(target=run)
    t0 = time.perf_counter()
    t.start()
    t.join(10)
    assert time.perf_counter() - t0 < 5
    assert "reward 'hangs' did not return within 0.3 s" in box["error"]


def test_builtin_rewards_have_no_second_time_limit():
    rs = RewardSet.from_specs(["math_accuracy", "boxed_format", "unsloth_math", "tests.unit.test_reward_limits:quick"],
                              timeout=7.0)
    assert rs.limits == [None] * 6 + [7.0]  # math_accuracy's verifier pool bounds each comparison already


def test_trl_accuracy_reward_keeps_its_own_signal_timeout_under_the_limit():
    """math-verify (TRL's accuracy_reward) times itself out with signal.alarm, which works only in the main
    thread: the limit runs the reward there."""
    pytest.importorskip("math_verify", reason="math-verify (needed by trl's accuracy_reward) is not installed")
    rs = RewardSet.from_specs(["trl.rewards:accuracy_reward"], timeout=60)
    completions = [[{"role": "assistant", "content": r"The answer is $\boxed{\frac{1}{2}}$."}],
                   [{"role": "assistant", "content": r"$\boxed{3}$"}]]
    _, per, metrics = rs(None, completions, solution=[r"$0.5$", r"$4$"])
    assert per["accuracy_reward"] == [1.0, 0.0] and metrics["rewards/accuracy_reward/failures"] == 0


def test_rewards_whose_spread_overflows_are_an_error_naming_the_reward():
    def huge(prompts, completions, **kw):
        return [1e308, -1e308][: len(completions)]

    def big_same_sign(prompts, completions, **kw):
        return [1e308] * len(completions)

    with pytest.raises(RewardContractError, match=r"reward 'huge' returned 1e\+308 \(weight 1\): rewards this large "
                                                  r"overflow the group statistics .*every advantage would be 0"):
        RewardSet([quick, huge], strict=True)(["p", "p"], COMPLETIONS)
    # each is fine alone, their weighted sum is not: the larger one is named
    with pytest.raises(RewardContractError, match="reward 'big_same_sign' returned 1e"):
        RewardSet([quick, big_same_sign], [1.0, 1.0], strict=True)(["p", "p"], COMPLETIONS)
    with pytest.raises(RewardContractError, match=r"reward 'quick' returned 1 \(weight 1e\+308\)"):
        RewardSet([quick], [1e308], strict=True)(["p", "p"], COMPLETIONS)
    total, _, metrics = RewardSet([quick], [1e6], strict=True)(["p", "p"], COMPLETIONS)  # large but sound
    assert total == [1e6, 1e6] and metrics["reward_std"] == 0.0
    # without strict (metrics only) the overflow is reported as numbers, not as an exception
    _, _, metrics = RewardSet([big_same_sign, big_same_sign])(["p", "p"], COMPLETIONS)
    assert metrics["reward"] == float("inf")


def test_the_failure_advice_names_a_real_key_and_build_rewards_passes_the_recipe_settings(qwen_tok):
    def broken(prompts, completions, **kw):
        raise RuntimeError("boom")

    with pytest.raises(RewardFailureError, match=r"raise grpo.reward_max_failure_fraction \(now 0.5\)"):
        RewardSet([broken], max_failure_fraction=0.5)(["p", "p"], COMPLETIONS)
    cfg = load_recipe("tiny/grpo", ["grpo.reward_timeout=12.5", "grpo.reward_max_failure_fraction=0.25"], GRPORecipe)
    rs = build_rewards(cfg, qwen_tok, ["tests.unit.test_reward_limits:quick"])
    assert (rs.limits, rs.max_failure_fraction, rs.strict) == ([12.5], 0.25, True)
    assert "reward_max_failure_fraction" in GRPORecipe.model_fields["grpo"].annotation.model_fields


def test_groups_no_reward_scored_are_not_called_agreeing():
    nan = float("nan")
    grpo = load_recipe("tiny/grpo", [], GRPORecipe).grpo
    with pytest.warns(UserWarning) as caught:
        warn_zero_std(0, 1.0, grpo, [[nan, nan], [nan, nan]])
        warn_zero_std(4, 1.0, grpo, [[nan, nan], [1.0, 1.0]])
        warn_zero_std(9, 0.5, grpo, [[0.0, 1.0], [1.0, 1.0]])
    first, mixed, agree = (str(w.message) for w in caught)
    assert first.startswith("step 1: 100% of the groups got no reward at all: every reward function returned None")
    assert "all agree" not in first
    assert mixed.startswith("step 5: 50% of the groups got rewards that all agree, and 50% got no reward at all")
    assert agree.startswith("step 10: 50% of the groups got rewards that all agree (frac_reward_zero_std=0.50)")
