"""Structural comparison of two parsed answers: the equivalence policy lives here.

``Comparer(symbolic=None).answers(pred_ast, gold_ast) -> (equal, reason)``. With ``symbolic=None`` (the
in-process fast path) anything that needs sympy raises ``NeedSymbolic`` and the caller sends the pair to
a worker process, where the same code runs with ``symbolic=SympyBackend()``.

Policy (see docs/verifier.md for the reasons):
* solution lists and sets are unordered and duplicates collapse; ``a \\pm b`` is the list ``a+b, a-b``;
* tuples and intervals are ordered and an interval's bracket types must match, except next to ±∞;
  vectors of three or more entries may use ( ) or [ ]; a one-row/column matrix equals a tuple;
* ``x = 3`` equals ``3`` either way round, and so do named answers and chains (``f(x) = 1``, ``|AB| = 1``,
  ``x = 5+5+1 = 11``; relations.py); ``x \\in S`` equals ``S``;
* equations are equal when (lhs - rhs) of one is a non-zero constant multiple of the other's; inequalities
  when the multiple is positive and the strictness is the same (direction is respected);
* a gold condition on one quantity matches the equivalent interval or union; a gold interval does not match
  a predicted inequality in a lone variable (the model could copy the condition from the problem:
  math-verify's rule), but does match a condition on a compound quantity (``0 < f(x) < 1``, ``|z| \\le 2``);
* percent: gold ``50\\%`` accepts ``50\\%`` or ``50``; a predicted ``p\\%`` matches gold ``p`` or ``p/100``;
* numbers are exact; a decimal literal may stand for a value with no finite decimal expansion (1/3, √2, π)
  when it has that value rounded or truncated: |d - v| <= one unit in its last place and <= 1e-4·|v|.
"""

from __future__ import annotations

from decimal import Decimal

from posttrain.verify.algebra import (
    RF,
    Budget,
    NeedSymbolic,
    NotScalar,
    Poly,
    TooLarge,
    Undefined,
    approx,
    is_finite_decimal,
    real_sign,
)
from posttrain.verify.evaluate import Inf, canonical_bigpow, evaluate
from posttrain.verify.latex_parse import expand_pm
from posttrain.verify.relations import (
    answer_values,
    clear_denominators,
    condition_set,
    named_tuple,
    orient,
    reduce_chain,
    split_by_variables,
)

REL_TOL = Decimal("1e-4")
_COLLECTIONS = ("list", "set", "empty")


def _collection(node):
    kind = node[0]
    if kind == "list":
        items, out_kind = node[1], "list"
    elif kind == "set":
        items, out_kind = node[1], "set"
    elif kind == "empty":
        return "set", []
    else:
        items, out_kind = [node], "one"
    out = []
    for it in items:
        out.extend(expand_pm(it))
    if out_kind == "one" and len(out) > 1:
        out_kind = "list"
    return out_kind, out


def _is_inf(node, sign):
    if sign > 0:
        return node == ("const", "inf")
    return node == ("neg", ("const", "inf"))


def _decimal_places(node):
    while node[0] == "neg":
        node = node[1]
    return node[2] if node[0] == "num" else None


def proportional(N1: Poly, N2: Poly, B):
    """N1 = c·N2 for a constant c != 0? -> sign of c (1, -1, or 0 when c is not a known real); else None."""
    if N1.is_zero() or N2.is_zero():
        return 1 if N1.is_zero() and N2.is_zero() else None
    g1, g2 = split_by_variables(N1), split_by_variables(N2)
    if g1.keys() != g2.keys():
        return None
    m0 = min(g1)
    a0, b0 = g1[m0], g2[m0]
    for m in g1:
        if g1[m].mul(b0, B) != a0.mul(g2[m], B):
            return None
    s = real_sign(RF(a0, b0))
    return s if s is not None else 0


class Comparer:
    def __init__(self, symbolic=None, free_text: bool = False):
        self.B = Budget()
        self.symbolic = symbolic
        self.free_text = free_text  # the prediction was read from running text (relations.py, "Free text")
        self._values: dict[int, tuple] = {}  # id(node) -> (node, value or exception): each item evaluated once

    def _evaluate(self, node):
        hit = self._values.get(id(node))
        if hit is not None and hit[0] is node:
            if isinstance(hit[1], Exception):
                raise hit[1]
            return hit[1]
        try:
            v = evaluate(node, self.B)
        except (NeedSymbolic, TooLarge, Undefined, NotScalar, ZeroDivisionError) as exc:
            self._values[id(node)] = (node, exc)
            raise
        self._values[id(node)] = (node, v)
        return v

    # ------------------------------------------------------------ collections
    def answers(self, p, g):
        pk, pitems = _collection(p)
        gk, gitems = _collection(g)
        if gk == "list" and pk == "one" and all(it[0] == "rel" for it in gitems):
            sets = [condition_set(it) for it in gitems]  # x < -1 or x > 2: one set, a union
            if all(sets) and len({repr(subj) for subj, _ in sets}) == 1:
                parts = [q for _, shape in sets for q in (shape[1] if shape[0] == "union" else [shape])]
                gk, gitems = "one", [("union", parts)]
        if pk == "one" and gk == "one":
            return self.item(pitems[0], gitems[0])
        for a, b, flip in ((pitems, gitems, False), (gitems, pitems, True)):
            tup = named_tuple(a) if len(b) == 1 and b[0][0] == "brack" else None
            if tup is not None:  # x = 1, y = 2 against (1, 2): the values in the order of their names
                return self.item(b[0], tup) if flip else self.item(tup, b[0])
        pu, gu = self._dedupe(pitems), self._dedupe(gitems)
        if len(pu) != len(gu):
            return False, "different_count"
        unused = list(range(len(pu)))
        for gi in gu:
            for j in unused:
                if self.item(pu[j], gi)[0]:
                    unused.remove(j)
                    break
            else:
                return False, "different_elements"
        return True, "same_elements"

    def _dedupe(self, items):
        out = []
        for it in items:
            if not any(self.item(it, o)[0] for o in out):
                out.append(it)
        return out

    # ------------------------------------------------------------ one answer
    def item(self, p, g):
        if g[0] == "in" and p[0] != "in":
            g = g[2]
        if p[0] == "in" and g[0] != "in":
            p = p[2]
        if p[0] == "in" and g[0] == "in":
            if p[1] != g[1]:
                return False, "different_variable"
            p, g = p[2], g[2]
        if g[0] == "rel" and p[0] != "rel":
            values = answer_values(g)
            if values is not None:
                return self._any_value(p, values, gold_side=True)
            cond = condition_set(g)
            if cond is None or p[0] not in ("brack", "union"):
                return False, "relation_vs_value"
            g = cond[1]
        if p[0] == "rel" and g[0] != "rel":
            values = answer_values(p, self.free_text)
            if values is not None:
                return self._any_value(g, values, gold_side=False)
            cond = condition_set(p)
            if cond is None or g[0] not in ("brack", "union"):
                return False, "relation_vs_value"
            if cond[0][0] == "var":
                return False, "inequality_for_interval"
            p = cond[1]
        pk, gk = p[0], g[0]
        if pk == "rel" and gk == "rel":
            return self.relation(reduce_chain(p), reduce_chain(g))
        if pk in _COLLECTIONS or gk in _COLLECTIONS:
            return self.answers(p, g)
        if pk == "union" or gk == "union":
            return self._union(p, g)
        if pk == "matrix" or gk == "matrix":
            return self._matrix(p, g)
        if pk == "brack" and gk == "brack":
            return self._brack(p, g)
        if pk == "brack" or gk == "brack":
            return False, "different_structure"
        if pk == "based" or gk == "based":
            return self._based(p, g)
        if pk == "text" or gk == "text":
            if pk == gk and " ".join(p[1].lower().split()) == " ".join(g[1].lower().split()):
                return True, "same_text"
            return False, "different_text"
        return self.leaf(p, g)

    def _any_value(self, other, values, gold_side):
        """A named answer (``x = 5+5+1 = 11``) against a value: equal when one stated value is."""
        out = (False, "relation_vs_value")
        for v in values:
            out = self.item(other, v) if gold_side else self.item(v, other)
            if out[0]:
                return out
        return out

    @staticmethod
    def _based(p, g):
        """52_8 equals 52_{8}; a bare 52 equals 52_8 (the base subscript is notation); 42 does not."""
        def digits(n):
            if n[0] == "based":
                return n[1], n[2]
            if n[0] == "num" and n[2] is None and n[1].denominator == 1 and n[1] >= 0:
                return str(n[1].numerator), None
            return None, None

        (dp, bp), (dg, bg) = digits(p), digits(g)
        if dp is None or dg is None:
            return False, "different_structure"
        if dp == dg and (bp is None or bg is None or bp == bg):
            return True, "same_numeral"
        return False, "different_value"

    def _brack(self, p, g):
        pi, gi = p[3], g[3]
        if len(pi) != len(gi):
            return False, "different_length"
        if len(gi) == 2:
            if p[1] != g[1] and not (_is_inf(gi[0], -1) and _is_inf(pi[0], -1)):
                return False, "different_brackets"
            if p[2] != g[2] and not (_is_inf(gi[1], 1) and _is_inf(pi[1], 1)):
                return False, "different_brackets"
        for a, b in zip(pi, gi):
            ok, why = self.item(a, b)
            if not ok:
                return False, why
        return True, "same_elements"

    def _union(self, p, g):
        def parts(n):
            return n[1] if n[0] == "union" else [n]

        pp, gp = parts(p), parts(g)
        if len(pp) != len(gp):
            return False, "different_count"
        unused = list(range(len(pp)))
        for b in gp:
            for j in unused:
                if self.item(pp[j], b)[0]:
                    unused.remove(j)
                    break
            else:
                return False, "different_elements"
        return True, "same_elements"

    def _matrix(self, p, g):
        def cells(n):
            if n[0] == "matrix":
                return n[1], n[2]
            if n[0] == "brack" and n[1] + n[2] in ("()", "[]"):
                rows = n[3]
                if len(rows) > 1 and all(r[0] == "brack" and r[1] + r[2] in ("()", "[]") for r in rows) \
                        and len({len(r[3]) for r in rows}) == 1:
                    return "matrix", [r[3] for r in rows]  # [[1, 2], [3, 4]]: rows of a matrix
                return "vector", [rows]
            return None, None

        pk, prow = cells(p)
        gk, grow = cells(g)
        if pk is None or gk is None:
            return False, "different_structure"
        if "vector" in (pk, gk):  # a tuple equals a one-row or one-column matrix
            if pk == "det" or gk == "det":
                return False, "different_structure"
            pflat = [c for r in prow for c in r] if len(prow) == 1 or all(len(r) == 1 for r in prow) else None
            gflat = [c for r in grow for c in r] if len(grow) == 1 or all(len(r) == 1 for r in grow) else None
            if pflat is None or gflat is None or len(pflat) != len(gflat):
                return False, "different_shape"
            pairs = zip(pflat, gflat)
        else:
            if pk != gk:
                return False, "different_structure"
            if len(prow) != len(grow) or len(prow[0]) != len(grow[0]):
                return False, "different_shape"
            pairs = ((a, b) for ra, rb in zip(prow, grow) for a, b in zip(ra, rb))
        for a, b in pairs:
            ok, why = self.item(a, b)
            if not ok:
                return False, why
        return True, "same_elements"

    # ------------------------------------------------------------ relations
    def relation(self, p, g):
        pe, po, _ = orient(p)
        ge, go, _ = orient(g)
        if po != go:
            return False, "different_relation"
        if len(po) > 1:
            pc, gc = condition_set(p), condition_set(g)
            if pc is not None and gc is not None and pc[0] == gc[0]:
                return self.item(pc[1], gc[1])
            for a, b in zip(pe, ge):
                ok, why = self.item(a, b)
                if not ok:
                    return False, why
            return True, "same_relation"
        try:
            ap = evaluate(("add", [pe[0], ("neg", pe[1])]), self.B)
            ag = evaluate(("add", [ge[0], ("neg", ge[1])]), self.B)
            if isinstance(ap, Inf) or isinstance(ag, Inf):
                raise NeedSymbolic("infinite relation")
            np_, shifted_p = clear_denominators(ap.num)
            ng, shifted_g = clear_denominators(ag.num)
            if po[0] not in ("=", "!=") and (shifted_p or shifted_g):
                raise NeedSymbolic("inequality with a variable in a denominator")
            c = proportional(np_, ng, self.B)
            if po[0] in ("=", "!="):
                if c is not None:
                    return True, "equivalent_equation"
                if ap.den.variables() or ag.den.variables():
                    raise NeedSymbolic("equation with variable denominators")
                return False, "different_equation"
            sp_, sg = real_sign(RF(ap.den)), real_sign(RF(ag.den))
            if not sp_ or not sg:
                raise NeedSymbolic("inequality with a denominator of unknown sign")
            if c is not None and c * sp_ * sg > 0:
                return True, "equivalent_inequality"
            return False, "different_inequality"
        except (NeedSymbolic, TooLarge) as exc:
            if self.symbolic is None:
                raise NeedSymbolic(str(exc)) from None
            return self.symbolic.relation(pe, po, ge, go)
        except (Undefined, NotScalar):
            return False, "different_relation"

    # ------------------------------------------------------------ scalars
    def leaf(self, p, g):
        if g[0] == "pct":  # gold 50%: the prediction gives the number of percent, with or without %
            return self.value(p[1] if p[0] == "pct" else p, g[1])
        if p[0] == "pct":  # prediction p%: either the number of percent or the fraction p/100
            ok, why = self.value(p[1], g)
            return (ok, why) if ok else self.value(p, g)
        return self.value(p, g)

    def value(self, p, g):
        vals, need = [], None
        for node in (p, g):
            try:
                vals.append(self._evaluate(node))
            except (NeedSymbolic,) as exc:
                need = exc
                vals.append(None)
            except TooLarge as exc:
                vals.append(exc)
            except (Undefined, ZeroDivisionError):
                return False, "undefined"
            except NotScalar:
                return False, "different_structure"
        vp, vg = vals
        if need is not None and not any(isinstance(v, TooLarge) for v in vals):
            if self.symbolic is None:
                raise need
            return self.symbolic.leaf(p, g)
        if isinstance(vp, TooLarge) or isinstance(vg, TooLarge):
            return self._too_large(vp, vg)
        if isinstance(vp, Inf) or isinstance(vg, Inf):
            return (vp == vg), ("same_infinity" if vp == vg else "different_value")
        try:
            if vp.equals(vg, self.B):
                return True, "exact"
        except (NeedSymbolic, TooLarge) as exc:
            if self.symbolic is None:
                raise NeedSymbolic(str(exc)) from None
            return self.symbolic.leaf(p, g)
        if self._decimal_close(p, vp, vg) or self._decimal_close(g, vg, vp):
            return True, "decimal_rounding"
        return False, "different_value"

    @staticmethod
    def _too_large(vp, vg):
        bp = [v.bigpow if isinstance(v, TooLarge) else None for v in (vp, vg)]
        if all(isinstance(v, TooLarge) for v in (vp, vg)):
            a, b = (canonical_bigpow(x) if x else None for x in bp)
            if a is not None and b is not None:
                return (a == b), ("exact" if a == b else "different_value")
            return False, "too_large"
        if any(b is not None for b in bp) and not any(isinstance(v, Inf) for v in (vp, vg)):
            # b^e whose reduced numerator or denominator exceeds every cap cannot equal an in-cap value
            return False, "different_magnitude"
        return False, "too_large"

    @staticmethod
    def _decimal_close(dnode, dval, other):
        """``dnode`` is a decimal literal standing for ``other`` rounded or truncated (see module doc)."""
        places = _decimal_places(dnode)
        if not places or not isinstance(other, RF) or is_finite_decimal(other):
            return False
        d = dval.rational()
        ap = approx(other)
        if d is None or ap is None:
            return False
        re_, im_ = ap
        if im_ != 0 or re_ == 0:
            return False
        diff = abs(Decimal(d.numerator) / Decimal(d.denominator) - re_)
        return diff <= Decimal(10) ** -places and diff <= REL_TOL * abs(re_)

