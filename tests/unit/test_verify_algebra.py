"""The exact in-process algebra under the verifier: square-free parts, roots, canonical forms, caps."""

import math
import random
import time
from fractions import Fraction

import pytest

from posttrain.verify.algebra import NeedSymbolic, TooLarge, _exact_root, squarefree_split
from posttrain.verify.evaluate import evaluate
from posttrain.verify.latex_parse import parse
from posttrain.verify.normalize import normalize
from posttrain.verify.verifier import verify_fast


def test_squarefree_split_against_brute_force():
    rng = random.Random(0)
    for n in list(range(0, 2000)) + [rng.randint(1, 10**12 - 1) for _ in range(300)]:
        s, r = squarefree_split(n)
        assert s * s * r == n
        assert all(r % (p * p) for p in range(2, min(math.isqrt(r), 3000) + 1))


def test_exact_roots():
    rng = random.Random(1)
    for q in (3, 4, 5, 7, 11):
        for _ in range(100):
            a = rng.randint(2, 2 ** (990 // q))
            assert _exact_root(a**q, q) == a
            assert _exact_root(a**q + 1, q) is None
    with pytest.raises(NeedSymbolic):
        _exact_root(2**3000, 3)


@pytest.mark.parametrize(
    "a,b",
    [(r"(\sqrt2+\sqrt3)^2", r"5+2\sqrt6"), (r"\frac{1}{\sqrt2+\sqrt3}", r"\sqrt3-\sqrt2"),
     (r"(1+i)^8", "16"), (r"\frac{\pi^2}{\pi}", r"\pi"), (r"\sqrt{\frac{9}{8}}", r"\frac{3\sqrt2}{4}"),
     (r"(x+y)^3", "x^3+3x^2y+3xy^2+y^3"), (r"\frac{1}{x}\cdot x^2", "x"), ("2^{-3}", "0.125")],
)
def test_canonical_forms_decide_equality_in_process(a, b):
    v = verify_fast(a, b)
    assert v is not None and v.equal and v.reason == "exact"


def test_caps_refuse_huge_work_quickly():
    t = time.perf_counter()
    for s in (r"2^{10^{9}}", "99999!", r"(x+1)^{1000}", r"x^{100000}"):
        with pytest.raises((TooLarge, NeedSymbolic)):
            evaluate(parse(normalize(s)))
    assert time.perf_counter() - t < 0.5


def test_exact_values():
    assert evaluate(parse(r"\frac{1}{2006!}")).rational() == Fraction(1, math.factorial(2006))
    assert evaluate(parse(r"0.1\overline{6}")).rational() == Fraction(1, 6)
    assert evaluate(parse("2.5e-3")).rational() == Fraction(1, 400)
