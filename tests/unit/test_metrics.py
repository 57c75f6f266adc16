"""Evaluation metric math against values computed by hand."""

from math import comb

import pytest

from posttrain.evaluation.metrics import maj_at_k, majority_vote, pass_at_k, summarize, wilson_interval


@pytest.mark.parametrize("k, expected", [
    (1, 2 / 5),             # c/n
    (2, 1 - 3 / 10),        # 1 - C(3,2)/C(5,2)
    (3, 1 - 1 / 10),        # 1 - C(3,3)/C(5,3)
    (4, 1.0),               # fewer than 4 wrong samples: any 4 include a right one
    (5, 1.0),
])
def test_pass_at_k_n5_c2(k, expected):
    assert pass_at_k(5, 2, k) == pytest.approx(expected)


def test_pass_at_k_matches_binomial_formula_and_edges():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert 0 < pass_at_k(1000, 1, 1) == pytest.approx(1e-3)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_wilson_interval_hand_values():
    # 1/10: p=0.1, z=1.96 -> center 0.21101, half-width 0.19313
    lo, hi = wilson_interval(1, 10)
    assert (lo, hi) == pytest.approx((0.017875, 0.404150), abs=1e-5)
    # 0/20 never collapses to a point: upper = z^2/(n+z^2)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(3.8415 / 23.8415, abs=1e-4)
    # symmetric around 1/2 for 50/100
    lo, hi = wilson_interval(50, 100)
    assert (lo + hi) / 2 == pytest.approx(0.5) and hi - lo == pytest.approx(2 * 0.0962, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_majority_vote_and_maj_at_k():
    assert majority_vote(["3", None, "4", "4", "3"]) == "3"      # tie 2-2: first seen wins
    assert majority_vote([None, None]) is None
    answers = ["5", "7", "7", "5", "5"]
    correct = [True, False, False, True, True]
    assert maj_at_k(answers, correct, 1) is True                 # ["5"]
    assert maj_at_k(answers, correct, 3) is False                # 7 wins 2-1
    assert maj_at_k(answers, correct, 4) is True                 # 2-2 tie, "5" seen first
    assert maj_at_k(answers, correct, 5) is True                 # 5 wins 3-2
    assert maj_at_k([None, None, "1"], [False, False, False], 3) is False


def _row(pid, sample, ok, key, **kw):
    return {"id": pid, "sample": sample, "verdict": ok, "normalized": key, "format_ok": key is not None,
            "truncated": key is None, "completion_tokens": 10, **kw}


def test_summarize_hand_computed():
    rows = [
        # problem a: 2 of 4 right; majority of first 3 is "1" (wrong)
        _row("a", 0, False, "1", level=1), _row("a", 1, True, "2", level=1),
        _row("a", 2, False, "1", level=1), _row("a", 3, True, "2", level=1),
        # problem b: all 4 right
        *[_row("b", i, True, "9", level=2) for i in range(4)],
        # problem c: none right, no answers at all
        *[_row("c", i, False, None, level=2) for i in range(4)],
    ]
    m = summarize(rows, ks=(1, 2, 4, 8))
    assert m["n"] == 3 and m["n_samples"] == 4 and m["correct"] == 6
    assert m["accuracy"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["ci95"] == pytest.approx(list(wilson_interval(1.5, 3)))
    assert m["pass_at_k"]["2"] == pytest.approx((pass_at_k(4, 2, 2) + 1 + 0) / 3)
    assert m["pass_at_k"]["4"] == pytest.approx(2 / 3)
    assert "8" not in m["pass_at_k"]                               # k > n samples is skipped
    assert m["maj_at_k"]["4"] == pytest.approx(1 / 3)              # a: 2-2 tie, "1" first -> wrong; b right
    assert m["maj_at_k"]["1"] == pytest.approx(1 / 3)
    assert m["format_rate"] == pytest.approx(8 / 12)
    assert m["truncation_rate"] == pytest.approx(4 / 12)
    assert m["mean_completion_tokens"] == 10
    assert m["by"]["level"]["1"]["accuracy"] == 0.5 and m["by"]["level"]["2"]["n"] == 2


def test_summarize_rejects_ragged_samples():
    with pytest.raises(ValueError, match="sample counts"):
        summarize([_row("a", 0, True, "1"), _row("b", 0, True, "1"), _row("b", 1, True, "1")])


def test_k_curves_by_hand():
    from posttrain.evaluation.metrics import k_curves

    def rows(pid, verdicts, answers):
        return [{"id": pid, "sample": i, "verdict": v, "normalized": a, "format_ok": True, "truncated": False,
                 "completion_tokens": 5} for i, (v, a) in enumerate(zip(verdicts, answers))]

    # a: 1 of 4 right, its right answer never the majority; b: 3 of 4 right, the majority right from k = 1
    data = rows("a", [False, True, False, False], ["1", "2", "1", "3"]) + \
        rows("b", [True, True, False, True], ["5", "5", "4", "5"])
    c = k_curves(data)
    assert c["k"] == [1, 2, 3, 4] and c["n"] == 2 and c["n_samples"] == 4
    # a: 1/4, 1 - C(3,2)/C(4,2) = 1/2, 1 - C(3,3)/C(4,3) = 3/4, 1; b: 3/4, then 1 (fewer than k wrong)
    assert c["pass_at_k"] == pytest.approx([(0.25 + 0.75) / 2, (0.5 + 1) / 2, (0.75 + 1) / 2, 1.0])
    assert c["maj_at_k"] == pytest.approx([0.5, 0.5, 0.5, 0.5])   # a's vote: "1" (ties go to the first seen)
