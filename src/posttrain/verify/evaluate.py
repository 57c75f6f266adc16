"""AST -> exact value (``algebra.RF`` or ``Inf``), in-process and bounded.

``evaluate`` raises ``NeedSymbolic`` for what needs sympy (functions, roots of expressions, symbolic
exponents), ``TooLarge`` past the caps, ``Undefined`` for 1/0 and the like, and ``NotScalar`` for structures.

``TooLarge.bigpow`` is set only when the node evaluated *is* the power b^e (rational b not in {0, ±1}): its
reduced numerator or denominator then provably exceeds every in-cap number, and two such powers are equal
exactly when their canonical forms are. Any other node (a sum, product, negation, quotient, or a power of
such a power) clears the tag on the way out: ``2^{10^6}+1`` is "too large", never "the same as 2^{10^6}"
(issue 17 item 9: the tag used to survive enclosing ``+``/``·`` and made different numbers equal).
"""

from __future__ import annotations

import math
from fractions import Fraction

from posttrain.verify.algebra import (
    E,
    MAX_BITS,
    MAX_FACT,
    PI,
    RF,
    Budget,
    NeedSymbolic,
    NotScalar,
    Poly,
    TooLarge,
    Undefined,
    real_sign,
    rf_pow,
    root,
)

_I = RF(Poly({(1, 1, ()): Fraction(1)}))


class Inf:
    __slots__ = ("sign",)

    def __init__(self, sign):
        self.sign = sign

    def __eq__(self, other):
        return isinstance(other, Inf) and other.sign == self.sign

    def __repr__(self):
        return "oo" if self.sign > 0 else "-oo"


def _integer(v, what):
    if isinstance(v, Inf):
        raise NeedSymbolic(f"infinite {what}")
    r = v.rational()
    if r is None:
        raise NeedSymbolic(f"symbolic {what}")
    if r.denominator != 1:
        raise NeedSymbolic(f"non-integer {what}")
    return r.numerator


def evaluate(node, B: Budget | None = None):
    """The exact value of ``node`` (see the module doc for what it raises)."""
    B = B or Budget()
    try:
        return _value(node, B)
    except TooLarge as exc:
        if exc.bigpow is not None and node[0] != "pow":
            raise TooLarge(str(exc)) from None  # the tag describes a sub-expression, not this value
        raise


def _value(node, B: Budget):
    kind = node[0]
    if kind == "num":
        return RF.const(B.frac(node[1]))
    if kind == "sym":
        return RF(Poly.sym(node[1]))
    if kind == "const":
        name = node[1]
        if name == "inf":
            return Inf(1)
        if name == "i":
            return _I
        return RF(Poly.sym(PI if name == "pi" else E))
    if kind == "neg":
        v = evaluate(node[1], B)
        return Inf(-v.sign) if isinstance(v, Inf) else RF(v.num.neg(), v.den)
    if kind == "add":
        vals = [evaluate(t, B) for t in node[1]]
        infs = [v for v in vals if isinstance(v, Inf)]
        if infs:
            if len({v.sign for v in infs}) > 1:
                raise Undefined("oo - oo")
            return infs[0]
        acc = vals[0]
        for v in vals[1:]:
            acc = acc.add(v, B)
        return acc
    if kind == "mul":
        vals = [evaluate(t, B) for t in node[1]]
        if any(isinstance(v, Inf) for v in vals):
            sign = 1
            for v in vals:
                s = v.sign if isinstance(v, Inf) else real_sign(v)
                if not s:
                    raise NeedSymbolic("oo times something of unknown sign")
                sign *= s
            return Inf(sign)
        acc = vals[0]
        for v in vals[1:]:
            acc = acc.mul(v, B)
        return acc
    if kind == "div":
        a, b = evaluate(node[1], B), evaluate(node[2], B)
        if isinstance(a, Inf) or isinstance(b, Inf):
            raise NeedSymbolic("division with oo")
        return a.div(b, B)
    if kind == "pow":
        return _pow(node, B)
    if kind == "sqrt":
        arg = evaluate(node[1], B)
        q = 2 if node[2] is None else _integer(evaluate(node[2], B), "root index")
        if q < 1 or isinstance(arg, Inf):
            raise NeedSymbolic("bad root")
        r = arg.rational()
        if r is None:
            raise NeedSymbolic("root of a non-rational")
        return root(r, q, B)
    if kind == "fact":
        n = _integer(evaluate(node[1], B), "factorial argument")
        if n < 0:
            raise Undefined("factorial of a negative integer")
        if n > MAX_FACT:
            raise TooLarge("factorial too large")
        return RF.const(B.frac(Fraction(math.factorial(n))))
    if kind == "binom":
        n = _integer(evaluate(node[1], B), "binomial argument")
        k = _integer(evaluate(node[2], B), "binomial argument")
        if n < 0:
            raise NeedSymbolic("binomial of a negative integer")
        if n.bit_length() * min(k, n - k, 10**9) > MAX_BITS:
            raise TooLarge("binomial too large")
        return RF.const(Fraction(math.comb(n, k) if 0 <= k <= n else 0))
    if kind == "pct":
        v = evaluate(node[1], B)
        if isinstance(v, Inf):
            return v
        return v.mul(RF.const(Fraction(1, 100)), B)
    if kind == "abs":
        v = evaluate(node[1], B)
        if isinstance(v, Inf):
            return Inf(1)
        s = real_sign(v)
        if s is None:
            raise NeedSymbolic("absolute value of a symbolic or complex value")
        return v if s >= 0 else RF(v.num.neg(), v.den)
    if kind == "func":
        raise NeedSymbolic(f"function {node[1]}")
    if kind == "pm":
        raise NotScalar("unexpanded \\pm")
    raise NotScalar(kind)


def _pow(node, B):
    try:
        base = evaluate(node[1], B)
    except TooLarge as exc:
        raise TooLarge(str(exc)) from None  # (b^e)^k: the inner tag is not this value's form
    if isinstance(base, Inf):
        raise NeedSymbolic("power of oo")
    r = base.rational()
    try:
        exp = evaluate(node[2], B)
    except TooLarge as exc:
        # b^(huge) with a rational b not in {0, 1, -1}: when the exponent is a huge positive power its
        # value is outside every cap, so the reduced numerator or denominator of b^(that) is too
        bp = exc.bigpow
        if r is not None and r not in (0, 1, -1) and bp is not None and bp[0] > 1 and (bp[1] is None or bp[1] > 0):
            raise TooLarge("power tower", bigpow=(r, None)) from None
        raise TooLarge(str(exc)) from None
    if isinstance(exp, Inf):
        raise NeedSymbolic("power with infinite exponent")
    e = exp.rational()
    if e is None:
        raise NeedSymbolic("symbolic exponent")
    try:
        return rf_pow(base, e, B)
    except TooLarge:
        if r is not None and r not in (0, 1, -1) and e.denominator == 1:
            raise TooLarge("power too large", bigpow=(r, e.numerator)) from None
        raise


def canonical_bigpow(bp):
    """b^e with integer b -> (root, exponent) where root is not a perfect power, for comparison."""
    b, e = bp
    if e is None or b.denominator != 1 or b < 0:
        return None
    n = b.numerator
    for k in range(n.bit_length(), 1, -1):
        r = round(n ** (1.0 / k)) if n.bit_length() < 1000 else None
        if r is not None:
            for c in (r - 1, r, r + 1):
                if c > 1 and c**k == n:
                    return (c, e * k)
    return (n, e)
