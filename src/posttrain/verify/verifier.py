"""The answer-equivalence ladder (``posttrain.verify.verify`` runs it; this module never starts processes).

Rungs, cheapest first:
1. prepare: read each side's answer (reading.py: the gold's boxes or text; the prediction's final answer
   by the ``auto`` extraction rules, reported as ``Verdict.rule``), normalise (normalize.py);
2. equal normalised strings;
3. text answers (``\\text{Evelyn}``, words) compared case-insensitively;
4. our own grammar (latex_parse.py) + exact algebra (algebra.py, evaluate.py) + structure rules
   (compare.py): numbers, radicals, i, π, polynomials and rational functions, lists, sets, tuples,
   intervals, matrices, equations and inequalities. This runs in-process: every operation is capped, so
   it is provably short (no pool, no IPC);
5. what needs sympy (functions, roots of expressions, answers our grammar rejects) goes to a worker
   process with a hard wall-clock limit (pool.py); a timeout is the verdict ``timeout``. ``verify_fast`` is
   rungs 1-4, ``verify_symbolic`` all five (it runs inside a worker).

Several boxes: in a gold they are one multi-part answer (a list); in a prediction the last box is the
answer (or the last boxes joined only by commas/"and"), unless the gold has several parts, in which case
all the prediction's boxes form the list.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from posttrain.verify.algebra import NeedSymbolic, TooLarge
from posttrain.verify.compare import Comparer
from posttrain.verify.extract import FREE_TEXT_RULES, Extracted
from posttrain.verify.latex_parse import ParseError, parse
from posttrain.verify.normalize import MAX_ANSWER_CHARS, compact, normalize
from posttrain.verify.reading import (
    choice_letter,
    decimal_comma,
    letter_free,
    read_gold,
    read_prediction,
    strip_label,
)

DEFAULT_TIMEOUT = 2.0
_COMMA_NUMBER_RE = re.compile(r"^\s*\$?\s*-?\d{1,3}(,\d{3})+(\.\d+)?\s*$")
_WORDS_RE = re.compile(r"^[A-Za-z][A-Za-z' \-]*$")
_TEXT_WRAP_RE = re.compile(r"^\\text\{(.*)\}$")
_MATH_WORD_RE = re.compile(r"(?<![a-zA-Z])(?:sqrt|frac|pi|infty|arcsin|arccos|arctan|sinh|cosh|tanh|sin|cos|tan|cot|sec|csc|log|ln|exp)(?![a-zA-Z])")


@dataclass(frozen=True)
class Verdict:
    """The result of one comparison. ``reason`` is a short code (see docs/verifier.md); ``rule`` names the
    extraction rule that read the prediction's answer (``box``, ``final_answer``, ``math_env``, ``whole``...;
    see extract.py), so a verdict says both why it was decided and where the answer was taken from."""

    equal: bool
    reason: str
    pred_normalized: str = ""
    gold_normalized: str = ""
    rule: str = ""

    def __bool__(self) -> bool:
        return self.equal

    def __str__(self) -> str:
        where = f"; answer read by rule {self.rule}" if self.rule else ""
        return f"{'equal' if self.equal else 'not equal'} ({self.reason}{where})"

    def to_dict(self) -> dict:
        return asdict(self)


def _is_text(norm: str) -> str | None:
    m = _TEXT_WRAP_RE.match(norm)
    if m and "\\" not in m.group(1):
        return m.group(1)
    if _WORDS_RE.match(norm) and re.search(r"[A-Za-z]{3}", norm) and not _MATH_WORD_RE.search(norm):
        return norm
    return None


def _text_key(s: str) -> str:
    return " ".join(s.lower().replace("-", " ").split())


def _same_text(pred: str, gold: str) -> bool:
    """Equal text answers; a sentence that ends with the gold's words says it too ("there is no solution"
    for "no solution"), unless it negates them."""
    if pred == gold:
        return True
    if not pred.endswith(" " + gold) or len(pred.split()) > len(gold.split()) + 6:
        return False
    return not re.search(r"\b(?:not|never|isn't|isnt|cannot)\b|n't\b", pred[: -len(gold)])


class _Prepared:
    __slots__ = ("pred", "gold", "pred_ast", "gold_ast", "verdict", "pred_err", "gold_err", "rule")


def _stage(prediction: str, gold: str, rule: str | None = None) -> _Prepared:
    """Rungs 1-3 and the parse. Sets ``.verdict`` when already decided."""
    st = _Prepared()
    st.verdict = None
    st.pred_ast = st.gold_ast = None
    st.pred_err = st.gold_err = None
    gold_ans, multi = read_gold(gold or "")
    if rule is not None:  # already extracted (rewards, eval): read by ``rule``, not read again
        found = Extracted(prediction or None, rule)
    else:
        found = read_prediction(prediction or "", multi)
    st.rule = found.rule
    pred_ans = found.answer or ""
    gnorm = normalize(gold_ans)
    if _COMMA_NUMBER_RE.match(gnorm):  # a gold "1,234" (or "\\$32,\\!348") on its own is one number
        gnorm = normalize(gold_ans, comma_thousands=True)
    # the gold's style decides what a comma in the prediction is: with no comma left in the gold (its own
    # digit groups are joined above), "1,234" is one number and "1,22" is 1.22; otherwise commas separate
    single = not multi and "," not in gnorm
    pnorm = normalize(decimal_comma(pred_ans) if single else pred_ans, comma_thousands=single)
    pnorm = choice_letter(pnorm, gnorm)
    if letter_free(gnorm) and not letter_free(pnorm):
        pnorm = strip_label(pnorm)  # "5 dogs", "12 m^2" against a plain number
    elif letter_free(pnorm) and not letter_free(gnorm):
        gnorm = strip_label(gnorm)
    st.gold = gnorm
    if gnorm and len(gnorm) <= MAX_ANSWER_CHARS:
        try:
            st.gold_ast = parse(gnorm)
        except ParseError as exc:
            st.gold_err = str(exc)
    st.pred = pnorm
    if not gnorm:
        st.verdict = Verdict(False, "unparseable_gold", pnorm, gnorm)
        return st
    if not pnorm:
        st.verdict = Verdict(False, "no_prediction", pnorm, gnorm)
        return st
    if compact(pnorm) == compact(gnorm):
        st.verdict = Verdict(True, "same_string", pnorm, gnorm)
        return st
    if len(pnorm) > MAX_ANSWER_CHARS or len(gnorm) > MAX_ANSWER_CHARS:
        # whole strings were compared above (never a cut prefix); too long for anything but equal strings
        st.verdict = Verdict(False, "too_long", pnorm[:200], gnorm[:200])
        return st
    gt, pt = _is_text(gnorm), _is_text(pnorm)
    if gt is not None or pt is not None:
        if gt is not None and pt is not None:
            eq = _same_text(_text_key(pt), _text_key(gt))
            st.verdict = Verdict(eq, "same_text" if eq else "different_text", pnorm, gnorm)
            return st
        if gt is not None and st.gold_ast is None:
            st.verdict = Verdict(False, "different_text", pnorm, gnorm)
            return st
    try:
        st.pred_ast = parse(pnorm)
    except ParseError as exc:
        st.pred_err = str(exc)
        _last_member_instead(st)
    return st


def _last_member_instead(st: _Prepared) -> None:
    """``9\\&2 = \\frac{\\sqrt{27}}{4} = \\frac{3\\sqrt3}{4}`` (the left side beyond our grammar): a chain, or
    free text, states its last member (relations.py); parse that when the gold is not a relation."""
    cut = _top_level_equals(st.pred)
    if not cut or _top_level_equals(st.gold) or not (st.rule in FREE_TEXT_RULES or len(cut) > 1):
        return
    last = st.pred[cut[-1] + 1 :].strip()
    try:
        st.pred_ast, st.pred, st.pred_err = parse(last), last, None
    except ParseError:
        pass


def _top_level_equals(norm: str) -> list[int]:
    """Positions of the last character of each ``=`` or ``\\approx`` outside brackets and braces."""
    out, depth = [], 0
    for i, c in enumerate(norm):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and (c == "=" or (c == "x" and norm.endswith("\\approx", 0, i + 1))):
            out.append(i)
    return out


def _finish(st: _Prepared, comparer: Comparer) -> Verdict:
    """Rung 4 (and 5 when ``comparer`` has a symbolic backend). May raise NeedSymbolic."""
    if st.gold_ast is None or st.pred_ast is None:
        raise NeedSymbolic("a side our grammar does not parse")
    try:
        equal, reason = comparer.answers(st.pred_ast, st.gold_ast)
    except ParseError:  # e.g. too many \pm to expand
        return Verdict(False, "too_complex", st.pred, st.gold)
    return Verdict(equal, reason, st.pred, st.gold)


def verify_fast(prediction: str, gold: str, rule: str | None = None) -> Verdict | None:
    """The in-process rungs; None when the pair needs sympy (a worker process). ``rule``: the prediction is
    an answer already extracted by that rule (``extract_with_rule``), taken as it is."""
    st = _stage(prediction, gold, rule)
    v = _fast(st)
    return None if v is None else replace(v, rule=st.rule)


def _fast(st: _Prepared) -> Verdict | None:
    if st.verdict is not None:
        return st.verdict
    if st.gold_ast is None and not _may_parse_elsewhere(st.gold):
        return Verdict(False, "unparseable_gold", st.pred, st.gold)
    if st.pred_ast is None and st.gold_ast is not None and not _may_parse_elsewhere(st.pred):
        return Verdict(False, "unparseable_prediction", st.pred, st.gold)
    try:
        return _finish(st, Comparer(free_text=st.rule in FREE_TEXT_RULES))
    except NeedSymbolic:
        return None


def _may_parse_elsewhere(norm: str) -> bool:
    """latex2sympy2_extended might parse what our grammar rejects only when LaTeX commands are present."""
    return "\\" in norm and len(norm) <= 500


def gold_parseable(gold: str) -> bool:
    """Can this gold be compared at all? (False: empty, or rejected by every parser we have.)"""
    gold_ans, _ = read_gold(gold or "")
    norm = normalize(gold_ans)
    if not norm:
        return False
    if _is_text(norm) is not None or _may_parse_elsewhere(norm):
        return True
    try:
        parse(norm)
        return True
    except (ParseError, RecursionError):
        return False


def verify_symbolic(prediction: str, gold: str, rule: str | None = None) -> Verdict:
    """All rungs including sympy; runs inside a worker process (pool.py)."""
    st = _stage(prediction, gold, rule)
    return replace(_symbolic(st), rule=st.rule)


def _symbolic(st: _Prepared) -> Verdict:
    import sympy as sp  # here, not at the top: only worker processes pay for sympy

    from posttrain.verify.symbolic import SympyBackend, latex2sympy_fallback, to_sympy

    if st.verdict is not None:
        return st.verdict
    backend = SympyBackend()
    if st.gold_ast is not None and st.pred_ast is not None:
        try:
            return _finish(st, Comparer(symbolic=backend, free_text=st.rule in FREE_TEXT_RULES))
        except Exception as exc:  # noqa: BLE001 - report sympy's failure as a verdict
            if isinstance(exc, (MemoryError, RecursionError, TooLarge)):
                return Verdict(False, "too_large", st.pred, st.gold)
            return Verdict(False, f"error:{type(exc).__name__}", st.pred, st.gold)
    # one side (or both) only parses with latex2sympy2_extended: compare as scalars
    sides = []
    for ast, norm in ((st.pred_ast, st.pred), (st.gold_ast, st.gold)):
        expr = None
        try:
            expr = to_sympy(ast) if ast is not None else latex2sympy_fallback(norm)
        except Exception:  # noqa: BLE001 - a structure or an unsupported node: not comparable as a scalar
            expr = None
        sides.append(expr)
    a, b = sides
    if b is None:
        return Verdict(False, "unparseable_gold", st.pred, st.gold)
    if a is None:
        return Verdict(False, "unparseable_prediction", st.pred, st.gold)
    try:
        if isinstance(a, sp.Expr) and isinstance(b, sp.Expr):
            eq, reason = backend.compare_exprs(a, b)
        else:
            eq = a == b
            reason = "symbolic" if eq else "different_value"
        return Verdict(bool(eq), reason, st.pred, st.gold)
    except Exception as exc:  # noqa: BLE001
        return Verdict(False, f"error:{type(exc).__name__}", st.pred, st.gold)

