"""get_reward_funcs / RewardSet: lookup, custom rewards, TRL's accuracy_reward, weighted sums, metrics,
failure counting and the stop rule."""

import logging
import math
import textwrap

import pytest

from posttrain.errors import UserError
from posttrain.rewards import RewardFailureError, RewardSet, get_reward_funcs
from posttrain.verify import default_pool


@pytest.fixture(scope="module")
def pool():
    return default_pool()


def test_names_and_presets():
    funcs = get_reward_funcs(["math_accuracy", "unsloth_math", "boxed_format", "think_format",
                              {"name": "soft_overlong", "max_length": 64, "cache_length": 16}])
    assert [f.__name__ for f in funcs] == ["math_accuracy", "format_exact", "format_approx", "answer_tiers",
                                           "number_match", "boxed_format", "think_format", "soft_overlong"]
    assert funcs[-1].max_length == 64
    assert get_reward_funcs("boxed_format")[0].__name__ == "boxed_format"


def test_unknown_names_and_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match=r"unknown reward 'accuracy'; built-ins: .*math_accuracy.*unsloth_math"):
        get_reward_funcs(["accuracy"])
    with pytest.raises(UserError, match="reward 'soft_overlong': unknown argument 'max_len'; it accepts: max_length"):
        get_reward_funcs([{"name": "soft_overlong", "max_len": 5}])
    with pytest.raises(UserError, match="reward 'soft_overlong': bad arguments: soft_overlong needs 0 < cache_length"):
        get_reward_funcs([{"name": "soft_overlong", "max_length": 5}])
    assert get_reward_funcs([{"name": "format_exact", "reasoning_start": "<think>"}])[0].markers.reasoning_start == "<think>"
    with pytest.raises(UserError, match="expected 'package.module:function'"):
        get_reward_funcs([":fn"])
    with pytest.raises(UserError, match="file .*nope.py.* not found"):
        get_reward_funcs(["nope.py:fn"])
    with pytest.raises(UserError, match="cannot import module 'no_such_pkg_xyz.mod'"):
        get_reward_funcs(["no_such_pkg_xyz.mod:fn"])


def test_custom_rewards_by_file_and_module(tmp_path, monkeypatch):
    code = textwrap.dedent('''
        def length_reward(prompts, completions, scale=1.0, **kwargs):
            return [scale * len(c) for c in completions]
        not_callable = 3
    ''')
    (tmp_path / "my_rewards.py").write_text(code)
    by_file = get_reward_funcs([f"{tmp_path}/my_rewards.py:length_reward"])[0]
    assert by_file.__name__ == "length_reward"
    assert by_file(prompts=None, completions=["ab", "abc"]) == [2, 3]
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = get_reward_funcs([{"name": "my_rewards:length_reward", "scale": 2.0}])[0]
    assert by_module.__name__ == "length_reward"
    assert by_module(prompts=None, completions=["ab"]) == [4.0]
    with pytest.raises(UserError, match="has no callable 'not_callable'"):
        get_reward_funcs(["my_rewards:not_callable"])


def test_trl_accuracy_reward_works_unchanged_as_a_posttrain_reward():
    pytest.importorskip("trl.rewards", reason="trl is not installed")
    pytest.importorskip("math_verify", reason="math-verify (needed by trl's accuracy_reward) is not installed")
    rs = RewardSet.from_specs(["trl.rewards:accuracy_reward"])
    completions = [
        [{"role": "assistant", "content": r"The sum is \boxed{\frac{1}{3}}"}],
        [{"role": "assistant", "content": r"I think \boxed{\frac{1}{2}}"}],
        [{"role": "assistant", "content": r"\boxed{12}"}],
    ]
    prompts = [[{"role": "user", "content": "q"}]] * 3
    total, per, metrics = rs(prompts, completions, solution=[r"$\frac{1}{3}$", r"$\frac{1}{3}$", "no math here"],
                             extra_column=["a", "b", "c"])
    assert per["accuracy_reward"] == [1.0, 0.0, None]  # an unparseable gold is skipped, never rewarded
    assert total == [1.0, 0.0, None]
    assert metrics["rewards/accuracy_reward/mean"] == 0.5
    assert metrics["rewards/accuracy_reward/failures"] == 0


def test_weighted_sum_none_handling_and_metrics(pool):
    def always_none(prompts, completions, **kw):
        return [None] * len(completions)

    def half(prompts, completions, **kw):
        return [0.5, None, float("nan")]

    rs = RewardSet.from_specs([{"name": "math_accuracy", "weight": 2.0}, {"name": "boxed_format", "weight": 0.5}],
                              pool=pool)
    rs_more = RewardSet(rs.funcs + [always_none, half], rs.weights + [1.0, 4.0])
    comps = [r"\boxed{2}", r"\boxed{3}", "nothing"]
    total, per, m = rs_more(None, comps, answer=["2", "2", "2"])
    assert per["math_accuracy"] == [1.0, 0.0, 0.0]
    assert per["boxed_format"] == [1.0, 1.0, 0.0]
    assert per["always_none"] == [None, None, None]
    assert per["half"] == [0.5, None, None]  # NaN means "skip", like None
    assert total == [2.0 + 0.5 + 2.0, 0.5, 0.0]
    assert m["reward"] == pytest.approx((4.5 + 0.5 + 0.0) / 3)
    assert m["rewards/math_accuracy/mean"] == pytest.approx(1 / 3)
    assert m["rewards/boxed_format/std"] == pytest.approx(math.sqrt(1 / 3))  # unbiased (TRL's)
    assert math.isnan(m["rewards/always_none/mean"])
    assert m["rewards/math_accuracy/timeouts"] == 0
    total, _, _ = RewardSet([always_none])(None, ["x"])
    assert total == [None]  # every reward skipped the sample: the sample is skipped


def test_duplicate_names_get_suffixes():
    rs = RewardSet.from_specs(["boxed_format", "boxed_format"])
    assert rs.names == ["boxed_format", "boxed_format_2"]


def test_a_reward_that_raises_for_one_sample(caplog):
    def fragile(prompts, completions, **kw):
        if any("boom" in c for c in completions):
            raise KeyError("boom sample")
        return [1.0] * len(completions)

    rs = RewardSet([fragile], max_failure_fraction=0.5)
    with caplog.at_level(logging.ERROR, logger="posttrain.rewards"):
        total, per, m = rs(None, ["a", "boom", "c", "d"])
        rs(None, ["boom", "b", "c", "d"])
    assert per["fragile"] == [1.0, None, 1.0, 1.0]
    assert m["rewards/fragile/failures"] == 1
    assert rs.failures["fragile"] == 2
    tracebacks = [r for r in caplog.records if "Traceback" in r.getMessage()]
    assert len(tracebacks) == 1 and "KeyError: 'boom sample'" in tracebacks[0].getMessage()


def test_too_many_failures_stop_the_run():
    def broken(prompts, completions, **kw):
        raise ZeroDivisionError("division by zero in my reward")

    rs = RewardSet([broken], max_failure_fraction=0.25)
    with pytest.raises(RewardFailureError, match=r"reward 'broken' failed on 4 of 4 samples.*ZeroDivisionError"):
        rs(None, ["a", "b", "c", "d"])


def test_bad_return_values_count_as_failures():
    def wrong_length(prompts, completions, **kw):
        return [1.0]

    def wrong_type(prompts, completions, **kw):
        return ["high"] * len(completions)

    rs = RewardSet([wrong_length, wrong_type], max_failure_fraction=1.0)
    total, per, m = rs(None, ["a", "b"])
    assert per["wrong_length"] == [1.0, 1.0]  # retried per sample: one value per one-sample call is fine
    assert per["wrong_type"] == [None, None]
    assert m["rewards/wrong_type/failures"] == 2


def test_weights_must_match():
    with pytest.raises(UserError, match="2 reward weights for 1 reward functions"):
        RewardSet([lambda prompts, completions, **kw: [0.0]], [1.0, 2.0])
