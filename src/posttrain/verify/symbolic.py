"""The costly rung of the ladder: sympy, run only inside a worker process with a hard timeout.

Our own AST is turned into sympy objects by constructor calls (``sympy.Add``, ``sympy.Pow`` ...); no
string ever reaches ``sympify``/``parse_expr`` (which call ``eval``). Constant sub-expressions go
through the bounded exact evaluator first, so sympy never sees a number that our caps refuse (power
towers, huge factorials). latex2sympy2_extended (an ANTLR grammar, no eval of the input) is a fallback
for answers our grammar does not parse.

Scalar comparison:
* constants: exact for rationals; otherwise both sides are evaluated to 50 significant digits and
  are equal when they agree to 40 (relative, so 1/2006! and 1/2004! stay apart) and their difference,
  evaluated with the precision sympy adapts to cancellation, is not a non-zero number (so
  ``10^{50}\\sin 1`` and ``10^{50}\\sin 1 + 1`` stay apart); a decimal literal may also match by the rounding
  rule of ``compare.py``;
* expressions with variables: evaluated at six fixed pseudo-random points (both signs, complex values
  allowed); any clear difference means not equal, agreement everywhere means equal.
"""

from __future__ import annotations

import random
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal, localcontext

import sympy as sp
from latex2sympy2_extended import latex2sympy
from latex2sympy2_extended.latex2sympy2 import ConversionConfig

from posttrain.verify.algebra import E, MAX_FACT, PI, RF, Budget, NeedSymbolic, NotScalar, TooLarge, Undefined
from posttrain.verify.compare import REL_TOL, _decimal_places
from posttrain.verify.evaluate import Inf, evaluate

MAX_SYMBOLIC_EXP = 200
_DEC = Context(prec=60, Emax=MAX_EMAX, Emin=MIN_EMIN)
_FUNCS = {
    "sin": sp.sin, "cos": sp.cos, "tan": sp.tan, "cot": sp.cot, "sec": sp.sec, "csc": sp.csc,
    "arcsin": sp.asin, "arccos": sp.acos, "arctan": sp.atan, "arccot": sp.acot, "arcsec": sp.asec,
    "arccsc": sp.acsc, "sinh": sp.sinh, "cosh": sp.cosh, "tanh": sp.tanh, "coth": sp.coth, "ln": sp.log,
    "exp": sp.exp, "floor": sp.floor, "ceil": sp.ceiling, "det": None,
}


def rf_to_sympy(v: RF):
    def poly(p):
        terms = []
        for (n, k, m), c in p.t.items():
            factors = [sp.Rational(c.numerator, c.denominator)]
            if n != 1:
                factors.append(sp.sqrt(sp.Integer(n)))
            if k:
                factors.append(sp.I)
            for name, e in m:
                base = sp.pi if name == PI else sp.E if name == E else sp.Symbol(name)
                factors.append(sp.Pow(base, sp.Integer(e)))
            terms.append(sp.Mul(*factors))
        return sp.Add(*terms)

    return poly(v.num) / poly(v.den)


def to_sympy(node):
    try:
        v = evaluate(node, Budget())
        if isinstance(v, Inf):
            return sp.oo if v.sign > 0 else -sp.oo
        return rf_to_sympy(v)
    except NeedSymbolic:
        pass
    kind = node[0]
    if kind == "neg":
        return -to_sympy(node[1])
    if kind == "add":
        return sp.Add(*[to_sympy(t) for t in node[1]])
    if kind == "mul":
        return sp.Mul(*[to_sympy(t) for t in node[1]])
    if kind == "div":
        return to_sympy(node[1]) / to_sympy(node[2])
    if kind == "pow":
        base, exp = to_sympy(node[1]), to_sympy(node[2])
        if exp.has(sp.nan, sp.zoo) or base.has(sp.nan, sp.zoo):
            raise Undefined("undefined power")
        if exp.is_Number and exp.is_finite and abs(exp) > MAX_SYMBOLIC_EXP:
            raise TooLarge("symbolic power too large")
        return sp.Pow(base, exp)
    if kind == "sqrt":
        arg = to_sympy(node[1])
        if node[2] is None:
            return sp.sqrt(arg)
        return sp.root(arg, to_sympy(node[2]))
    if kind == "fact":
        arg = to_sympy(node[1])
        if arg.is_Integer and arg > MAX_FACT:
            raise TooLarge("factorial too large")
        return sp.factorial(arg)
    if kind == "binom":
        return sp.binomial(to_sympy(node[1]), to_sympy(node[2]))
    if kind == "pct":
        return to_sympy(node[1]) / 100
    if kind == "abs":
        return sp.Abs(to_sympy(node[1]))
    if kind == "func":
        _, name, arg, base, power = node
        args = [to_sympy(a) for a in arg[3]] if arg[0] == "brack" else [to_sympy(arg)]
        if name in ("log", "lg"):
            b = to_sympy(base) if base is not None else (sp.Integer(10) if name == "lg" else sp.E)
            out = sp.log(args[0], b)
        elif name in ("gcd", "lcm", "max", "min"):
            fn = {"gcd": sp.gcd, "lcm": sp.lcm, "max": sp.Max, "min": sp.Min}[name]
            out = fn(*args) if name in ("max", "min") else fn(args[0], args[1]) if len(args) == 2 else None
        else:
            fn = _FUNCS.get(name)
            out = fn(args[0]) if fn is not None and len(args) == 1 else None
        if out is None:
            raise NotScalar(f"unsupported function {name}")
        if power is not None:
            out = out ** to_sympy(power)
        return out
    raise NotScalar(kind)


def _points(symbols, count=6):
    rng = random.Random(1234567)
    out = []
    for j in range(count):
        vals = {}
        for idx, s in enumerate(sorted(symbols, key=str)):
            x = sp.Rational(rng.randint(150, 2900), 1000) * (1 if (j + idx) % 2 == 0 else -1)
            if j >= 4:
                x = x + sp.I * sp.Rational(rng.randint(100, 900), 1000)
            vals[s] = x
        out.append(vals)
    return out


def _num(expr, digits=50):
    """(real, imag) Decimals of a numeric sympy value, or None (undefined, infinite, not a number)."""
    try:
        v = sp.N(expr, digits)
        if v.has(sp.nan, sp.zoo, sp.oo, -sp.oo) or not v.is_number:
            return None
        re_, im_ = v.as_real_imag()
        if not (re_.is_Number and im_.is_Number):
            return None
        out = Decimal(str(re_)), Decimal(str(im_))
        return out if all(x.is_finite() for x in out) else None
    except (ArithmeticError, ValueError, TypeError, AttributeError):
        return None


def _surely_nonzero(diff) -> bool:
    """Does the difference evaluate, with the precision sympy adapts to cancellation, to a non-zero number?
    (A relative agreement of 40 digits cannot tell x from x + 1 once |x| > 10^40.)"""
    try:
        v = sp.N(diff, 15, maxn=400)
    except (ArithmeticError, ValueError, TypeError):
        return False
    if not isinstance(v, sp.Float):
        return v.is_number and v != 0 and v.is_zero is False
    return v != 0 and v._prec > 1  # 0.e-376 (precision 1) is sympy's "zero to all the digits it tried"


def _close(a, b, rel):
    (ar, ai), (br, bi) = a, b
    scale = max(abs(ar), abs(ai), abs(br), abs(bi))
    if scale == 0:
        return True
    return max(abs(ar - br), abs(ai - bi)) <= rel * scale


class SympyBackend:
    """Leaf and relation comparison with sympy (called by ``compare.Comparer`` in a worker)."""

    def leaf(self, p, g):
        try:
            a, b = to_sympy(p), to_sympy(g)
        except NotScalar:
            return False, "different_structure"
        except Undefined:
            return False, "undefined"
        except TooLarge:
            return False, "too_large"
        except (ValueError, TypeError, AttributeError):  # sympy rejects the expression (e.g. sin(oo))
            return False, "undefined"
        return self.compare_exprs(a, b, p, g)

    def compare_exprs(self, a, b, p=None, g=None):
        with localcontext(_DEC):
            try:
                return self._compare_exprs(a, b, p, g)
            except ArithmeticError:
                return False, "too_large"
            except (ValueError, TypeError, AttributeError):
                return False, "undefined"

    def _compare_exprs(self, a, b, p, g):
        if a == b:
            return True, "symbolic"
        symbols = a.free_symbols | b.free_symbols
        if not symbols:
            if a.is_Rational and b.is_Rational:
                return False, "different_value"
            va, vb = _num(a), _num(b)
            if va is None or vb is None:
                return (True, "symbolic") if sp.simplify(a - b) == 0 else (False, "different_value")
            if _close(va, vb, Decimal("1e-40")):
                if _surely_nonzero(a - b):  # agree to 40 digits yet differ: 10^50·sin 1 vs 10^50·sin 1 + 1
                    return False, "different_value"
                return True, "numeric"
            for node, dv, ov in ((p, va, vb), (g, vb, va)):
                places = _decimal_places(node) if node is not None else None
                if places and dv[1] == 0 and ov[1] == 0 and ov[0] != 0:
                    diff = abs(dv[0] - ov[0])
                    if diff <= Decimal(10) ** -places and diff <= REL_TOL * abs(ov[0]):
                        return True, "decimal_rounding"
            return False, "different_value"
        agree = 0
        for pt in _points(symbols):
            va, vb = _num(a.subs(pt), 30), _num(b.subs(pt), 30)
            if va is None or vb is None:
                continue
            if not _close(va, vb, Decimal("1e-20")):
                return False, "different_value"
            agree += 1
        if agree >= 3:
            return True, "equal_at_points"
        return (True, "symbolic") if sp.simplify(a - b) == 0 else (False, "different_value")

    def relation(self, pe, po, ge, go):
        with localcontext(_DEC):
            try:
                return self._relation(pe, po, ge, go)
            except ArithmeticError:
                return False, "too_large"

    def _relation(self, pe, po, ge, go):
        try:
            ap = to_sympy(pe[0]) - to_sympy(pe[1])
            ag = to_sympy(ge[0]) - to_sympy(ge[1])
        except (NotScalar, Undefined):
            return False, "different_relation"
        except TooLarge:
            return False, "too_large"
        symbols = ap.free_symbols | ag.free_symbols
        ratios = []
        for pt in _points(symbols)[:4] if symbols else [{}]:
            va, vb = _num(ap.subs(pt), 30), _num(ag.subs(pt), 30)
            if va is None or vb is None:
                continue
            if vb == (0, 0):
                if va != (0, 0):
                    return False, "different_relation"
                continue
            den = vb[0] ** 2 + vb[1] ** 2
            ratios.append(((va[0] * vb[0] + va[1] * vb[1]) / den, (va[1] * vb[0] - va[0] * vb[1]) / den))
        if not ratios or any(not _close(r, ratios[0], Decimal("1e-20")) for r in ratios):
            return False, "different_relation"
        r = ratios[0]
        if r == (0, 0):
            return False, "different_relation"
        if po[0] in ("=", "!="):
            return True, "equivalent_equation"
        if abs(r[1]) <= Decimal("1e-20") * abs(r[0]) and r[0] > 0:
            return True, "equivalent_inequality"
        return False, "different_inequality"


def latex2sympy_fallback(norm: str):
    """One normalised answer through latex2sympy2_extended (an ANTLR grammar; no eval of the input)
    for answers our grammar rejects. Returns a sympy object, or None when it fails or is a relation."""
    if len(norm) > 500:
        return None
    try:
        out = latex2sympy(norm, normalization_config=None, conversion_config=ConversionConfig(lowercase_symbols=False))
    except Exception:  # noqa: BLE001 - any failure of the fallback parser means "unparseable"
        return None
    if isinstance(out, sp.Expr) and not isinstance(out, sp.core.relational.Relational):
        return out
    return None
