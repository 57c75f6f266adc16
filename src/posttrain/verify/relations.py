"""Relations as answers: named values, chains, conditions as sets, and equations up to a constant factor.

The policy (docs/verifier.md, "Equations, named answers and conditions"):

* **Named answers.** ``L = v`` states the answer ``v`` when ``L`` is a *name* (names.py: ``x``, ``f(x)``,
  ``|AB|``, ``(p,q)``, ``\\frac{NO}{BO}``, ``a_{10}``...) or when no member has a variable (``5+5+1 = 11``:
  arithmetic shown on the way). A chain of three or more members (``x = 5+5+1 = 11``,
  ``A+B+C = 2+2+3 = 7``) is a computation and states its last member; with ``\\approx``
  (``x = \\frac{22}{7} \\approx 3.14``) the last exact member counts too. Otherwise (``2x+1 = 7``,
  ``x^2 = 4``, ``\\sin x = \\frac12``) a clean answer is an equation to solve and never equals a bare value.
* **Free text.** When the answer was read from free text (a math environment or a sentence, not a box or a
  clean answer), ``L = v`` states ``v`` (``$a+b = -1$.``, ``$(19x-4x)+(1-81) = 15x-80$.``), as Minerva's
  grader reads it (``split("=")[-1]``): in running text the last equation states what was found.
* A chain ending in a lone name (``36 - 7 - 2 - 10 = 17 = x``) states the member before the name.
* **Conditions as sets.** A condition on one quantity with constant bounds (``0 < x \\le 3``, ``x > 2``,
  ``0 < f(x) < 1``, ``1 \\le |z| \\le \\frac32``) describes a set: an interval, or for ``|z|`` the union
  ``[-\\frac32,-1] \\cup [1,\\frac32]``. A gold condition accepts the equivalent interval or union. A predicted
  condition on a lone variable is refused against a gold interval (``inequality_for_interval``: it could be
  the problem's own condition copied, math-verify's rule); one on a compound quantity (``f(x)``, ``|z|``)
  is itself a way to write the set (a range, a region) and is compared as that set.
"""

from __future__ import annotations

from posttrain.verify.algebra import (
    TRANSCENDENTAL,
    NeedSymbolic,
    NotScalar,
    Poly,
    TooLarge,
    Undefined,
    real_sign,
)
from posttrain.verify.evaluate import Inf, evaluate

_FLIP = {">": "<", ">=": "<=", "=": "=", "~=": "~="}
_NEG_INF, _INF = ("neg", ("const", "inf")), ("const", "inf")


def names_of(rel) -> tuple:
    return rel[3] if len(rel) > 3 else (False,) * len(rel[1])


def orient(rel):
    """(members, ops, name flags) with ``>``/``>=`` turned round into ``<``/``<=``; ``\\approx`` reads as ``=``."""
    exprs, ops, names = list(rel[1]), list(rel[2]), list(names_of(rel))
    if ops and all(o in (">", ">=") for o in ops):
        exprs, ops, names = exprs[::-1], [_FLIP[o] for o in ops[::-1]], names[::-1]
    return exprs, ["=" if o == "~=" else o for o in ops], names


def has_symbol(node) -> bool:
    if isinstance(node, tuple):
        if node and node[0] == "sym":
            return True
        return any(has_symbol(c) for c in node[1:])
    if isinstance(node, list):
        return any(has_symbol(c) for c in node)
    return False


def answer_values(rel, free_text: bool = False):
    """The values a relation states for a named quantity (see the module doc), or None."""
    exprs, ops = rel[1], rel[2]
    names = names_of(rel)
    if not ops or any(o not in ("=", "~=") for o in ops):
        return None
    if len(exprs) == 2 and exprs[0][0] == "sym" and exprs[1][0] == "sym":
        return [exprs[1]]
    stated = names[0] or exprs[0][0] == "sym" or len(exprs) > 2 or not any(has_symbol(e) for e in exprs)
    if not stated and len(exprs) == 2 and (names[1] or exprs[1][0] == "sym"):
        return [exprs[0]]  # 3 = x
    if stated or free_text:
        last = len(exprs) - 1
        if last > 1 and (names[last] or exprs[last][0] == "sym"):
            last -= 1  # 36 - 7 - 2 - 10 = 17 = x
        out = [exprs[last]]
        if "~=" in ops and ops.index("~=") >= 1:
            out.append(exprs[ops.index("~=")])  # x = 22/7 ≈ 3.14: the exact value too
        return out
    return None


def named_tuple(items):
    """``x = 1, y = 2`` -> the tuple (1, 2): assignments to different one-letter names, ordered by name
    (x, y, z; a, b, c; p, q), as a tuple answer lists them; None otherwise."""
    if len(items) < 2 or not all(it[0] == "rel" and it[2] == ["="] and it[1][0][0] == "sym" for it in items):
        return None
    names = [it[1][0][1] for it in items]
    if len(set(names)) != len(names) or not all(len(n) == 1 for n in names):
        return None
    ordered = sorted(items, key=lambda it: it[1][0][1])
    return ("brack", "(", ")", [it[1][1] for it in ordered])


def reduce_chain(rel):
    """``x = 5+5+1 = 11`` -> ``x = 11`` (a named chain compared with another relation)."""
    exprs, ops = rel[1], rel[2]
    names = names_of(rel)
    if len(exprs) > 2 and (names[0] or exprs[0][0] == "sym") and all(o in ("=", "~=") for o in ops):
        return ("rel", [exprs[0], exprs[-1]], ["="], (names[0], names[-1]))
    return rel


def _subject(node, is_name):
    """What a condition is about: ('var', x), ('abs', z, center) for |z - center|, ('name', node) for f(x);
    None for a bound."""
    if node[0] == "sym":
        return ("var", node[1])
    if node[0] == "abs" and node[1][0] == "sym":
        return ("abs", node[1][1], None)
    if node[0] == "abs" and node[1][0] == "add" and len(node[1][1]) == 2 and node[1][1][0][0] == "sym" \
            and not has_symbol(node[1][1][1]):  # |x - 1| < 2
        return ("abs", node[1][1][0][1], _neg(node[1][1][1]))
    if is_name:
        return ("name", node)
    return None


def _bound(node) -> bool:
    return not has_symbol(node)


def condition_set(rel):
    """(subject, the set a condition describes) for a condition on one quantity with constant bounds, else
    None: ``0 < x \\le 3`` -> (('var','x'), (0, 3]); ``1 \\le |z| \\le 2`` -> (('abs','z'), [-2,-1] ∪ [1,2])."""
    if rel[0] != "rel":
        return None
    exprs, ops, names = orient(rel)
    if not ops or not all(o in ("<", "<=") for o in ops):
        return None
    if len(exprs) == 3:
        subj = _subject(exprs[1], names[1])
        if subj is None or not (_bound(exprs[0]) and _bound(exprs[2])):
            return None
        lo, hi, lo_closed, hi_closed = exprs[0], exprs[2], ops[0] == "<=", ops[1] == "<="
    elif len(exprs) == 2:
        left, right = _subject(exprs[0], names[0]), _subject(exprs[1], names[1])
        if left is not None and _bound(exprs[1]):  # x < a
            subj, lo, hi, lo_closed, hi_closed = left, _NEG_INF, exprs[1], False, ops[0] == "<="
        elif right is not None and _bound(exprs[0]):  # a < x
            subj, lo, hi, lo_closed, hi_closed = right, exprs[0], _INF, ops[0] == "<=", False
        else:
            return None
    else:
        return None
    if subj[0] != "abs":
        return subj, _interval(lo, hi, lo_closed, hi_closed)
    shape = _abs_set(lo, hi, lo_closed, hi_closed, subj[2])
    return (subj, shape) if shape is not None else None


def _interval(lo, hi, lo_closed, hi_closed):
    return ("brack", "[" if lo_closed else "(", "]" if hi_closed else ")", [lo, hi])


def _neg(node):
    if node == _INF:
        return _NEG_INF
    return node[1] if node[0] == "neg" else ("neg", node)


def _sign(node):
    if node == _NEG_INF:
        return -1
    try:
        v = evaluate(node)
    except (NeedSymbolic, TooLarge, Undefined, NotScalar, ZeroDivisionError):
        return None
    if isinstance(v, Inf):
        return v.sign
    return real_sign(v)


def _at(center, node, sign):
    """center + sign·node, with ±∞ kept as the plain constants the interval rules recognise."""
    if node in (_INF, _NEG_INF):
        return node if sign > 0 else _neg(node)
    value = node if sign > 0 else _neg(node)
    return value if center is None else ("add", [center, value])


def _abs_set(lo, hi, lo_closed, hi_closed, center=None):
    """{z : lo ⊲ |z - center| ⊲ hi} as an interval or a union of two (None when a bound's sign is unknown)."""
    s = _sign(lo)
    if s is None:
        return None
    if s < 0 or (s == 0 and lo_closed):  # no lower limit on |z|
        return _interval(_at(center, hi, -1), _at(center, hi, 1), hi_closed, hi_closed)
    return ("union", [_interval(_at(center, hi, -1), _at(center, lo, -1), hi_closed, lo_closed),
                      _interval(_at(center, lo, 1), _at(center, hi, 1), lo_closed, hi_closed)])


# ---------------------------------------------------------------- equations up to a constant factor
def split_by_variables(P: Poly):
    groups: dict = {}
    for (n, k, m), c in P.t.items():
        var = tuple(xe for xe in m if xe[0] not in TRANSCENDENTAL)
        const = tuple(xe for xe in m if xe[0] in TRANSCENDENTAL)
        groups.setdefault(var, {})[(n, k, const)] = c
    return {v: Poly(d) for v, d in groups.items()}


def clear_denominators(P: Poly):
    """Multiply by the monomial that makes every variable exponent >= 0 (y - 1/x -> xy - 1).

    Returns (polynomial, whether a variable factor was multiplied in)."""
    low: dict[str, int] = {}
    for (_, _, m) in P.t:
        for x, e in m:
            if x not in TRANSCENDENTAL and e < low.get(x, 0):
                low[x] = e
    if not low:
        return P, False
    t = {}
    for (n, k, m), c in P.t.items():
        d = dict(m)
        for x, e in low.items():
            d[x] = d.get(x, 0) - e
        t[(n, k, tuple(sorted((x, e) for x, e in d.items() if e)))] = c
    return Poly(t), True
