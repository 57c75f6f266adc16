"""The case suite (verify_cases.py) through posttrain's verifier: every verdict as expected, none slow."""

import time

import pytest

from posttrain.verify import Verdict, default_pool, verify
from tests.unit.verify_cases import CASES

TIMEOUT_S = 10.0  # generous: sympy cases take < 0.3 s here, but the 2-core test box is shared and loaded
TIME_CAP_S = TIMEOUT_S + 2.0  # nothing may run past the pool's hard limit (plus process scheduling slack)


@pytest.fixture(scope="module")
def pool():
    p = default_pool()  # shared with the other test modules: workers start once
    p.verify(r"\sin x", r"\cos x")  # start the workers outside the timed cases
    return p


def test_suite_is_large_and_covers_every_category():
    assert len(CASES) >= 200
    cats = " ".join(c[3] for c in CASES)
    for needed in ("mv#14", "mv#60", "mv#65", "qwen", "minerva", "hendrycks", "gsm8k", "percent", "currency",
                   "units", "degrees", "mixed number", "e-notation", "thousands", "interval", "union", "matrix",
                   "pm", "set", "tuple", "complex", "symbolic", "inequality", "equation", "several boxes",
                   "truncated box", "empty box", "tolerance", "400 nested parentheses", "100k junk"):
        assert needed in cats, needed
    assert sum(1 for c in CASES if c[2]) > 60 and sum(1 for c in CASES if not c[2]) > 60


@pytest.mark.parametrize("pred,gold,expected,category,kind", CASES, ids=[f"{i}-{c[3]}" for i, c in enumerate(CASES)])
def test_case(pool, pred, gold, expected, category, kind):
    t = time.perf_counter()
    v = verify(pred, gold, pool=pool, timeout=TIMEOUT_S)
    elapsed = time.perf_counter() - t
    assert isinstance(v, Verdict)
    assert v.equal is expected, f"{category}: verify({pred[:80]!r}, {gold[:80]!r}) -> {v}"
    assert v.reason != "timeout"
    assert elapsed < TIME_CAP_S


def test_reasons_explain_the_verdict(pool):
    assert verify(r"\frac{1}{2}", "0.5").reason == "exact"
    assert verify("3, -2", "-2, 3").reason == "same_elements"
    assert verify("(2,5]", "[2,5)").reason == "different_brackets"
    assert verify("0<x<12.5", "(0, 12.5)").reason == "inequality_for_interval"
    assert verify("", "3").reason == "no_prediction"
    assert verify("3", "").reason == "unparseable_gold"
    assert verify(r"5^{5^{5^{5^5}}}", "5").reason == "different_magnitude"
    assert verify(r"\sin^2 x+\cos^2 x", "1", pool=pool).reason in ("symbolic", "equal_at_points")


def test_ordinary_answers_are_decided_in_process(pool):
    before = dict(pool.stats)
    pairs = [("42", "42.0"), (r"\frac{3}{6}", "0.5"), (r"2\sqrt{2}", r"\sqrt8"), ("(1,2]", "(1, 2]"),
             (r"\{1,2\}", "2, 1"), ("x^2+2x+1", "(x+1)^2"), (r"\frac{1}{1+i}", r"\frac{1-i}{2}")]
    verdicts = pool.verify_many(pairs)
    assert all(v.equal for v in verdicts)
    assert pool.stats["pooled"] == before["pooled"]
    assert pool.stats["fast"] == before["fast"] + len(pairs)
