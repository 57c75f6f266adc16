"""Is the left side of ``L = value`` a *name for the answer* rather than part of an equation to solve?

Answers are often written as ``f(x) = 1``, ``|AB| = 1``, ``(p,q) = (3,2)``, ``\\frac{NO}{BO} = \\frac{1}{\\sqrt6}``,
``m\\angle ABC = 30``, ``a_{10} = 7``: the left side names the quantity asked for, the right side is the
answer. ``2x + 1 = 7`` or ``x^2 = 4`` are equations (their left side computes something from a variable).
The parser (latex_parse.py) asks ``is_name`` about each member of a relation, on its tokens, because the
tree no longer shows ``f(x)`` apart from ``f·x``.

A name is, in tokens (no numbers except in subscripts and function arguments, no operators):
* a run of symbols: ``x``, ``AB``, ``a_{n}``, ``x'``, ``\\theta``, ``m\\angle ABC``, ``\\overline{AB}``, ``\\text{Area}``;
* a function of anything: ``f(x)``, ``f(3)``, ``g^{-1}(2)``, ``P(A)``;
* ``|name|``, ``[ABC]`` (an area), ``\\frac{name}{name}`` or ``name/name``, and a tuple of names ``(p, q)``.
"""

from __future__ import annotations

GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "iota",
    "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi", "chi", "psi",
    "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega",
}
NAME_CMDS = {"angle", "triangle", "measuredangle"}  # parsed as symbols
DECORATIONS = {"overline", "vec", "hat", "bar", "widehat", "overrightarrow", "tilde", "dot"}  # \vec{v} -> v

_Tok = tuple[str, str]


def is_name(toks: list[_Tok]) -> bool:
    """Do these tokens (one member of a relation) spell a name (see the module doc)?"""
    if not toks:
        return False
    end = _name(toks, 0)
    return end == len(toks)


def _at(t, i, kind, val=None) -> bool:
    return i < len(t) and t[i][0] == kind and (val is None or t[i][1] == val)


def _group(t, i, opener, closer) -> int:
    """Index after the group opened at t[i] (balanced), or -1."""
    depth = 0
    for j in range(i, min(len(t), i + 200)):
        if t[j] == ("op", opener):
            depth += 1
        elif t[j] == ("op", closer):
            depth -= 1
            if depth == 0:
                return j + 1
    return -1


def _name(t, i) -> int:
    """Index after the name starting at t[i], or -1."""
    if _at(t, i, "cmd", "\\frac"):
        a = _braced_seq(t, i + 1)
        b = _braced_seq(t, a) if a > 0 else -1
        return b
    if _at(t, i, "op", "|"):
        j = _seq(t, i + 1)
        return j + 1 if j > 0 and _at(t, j, "op", "|") else -1
    if _at(t, i, "op", "[") or _at(t, i, "op", "("):
        closer = "]" if t[i][1] == "[" else ")"
        j = _seq(t, i + 1)
        while j > 0 and closer == ")" and _at(t, j, "op", ","):
            j = _seq(t, j + 1)
        return j + 1 if j > 0 and _at(t, j, "op", closer) else -1
    j = _seq(t, i)
    if j < 0:
        return -1
    if _at(t, j, "op", "/"):
        return _seq(t, j + 1)
    head = j - i
    if _at(t, j, "op", "^") and _at(t, j + 1, "op", "{"):  # g^{-1}(2)
        k = _group(t, j + 1, "{", "}")
        if k > 0 and _at(t, k, "op", "("):
            j = k
    if _at(t, j, "op", "(") and head <= 4:  # f(x), P(A), f'(x): a function of anything
        return _group(t, j, "(", ")")
    return j


def _braced_seq(t, i) -> int:
    if not _at(t, i, "op", "{"):
        return -1
    j = _seq(t, i + 1)
    return j + 1 if j > 0 and _at(t, j, "op", "}") else -1


def _seq(t, i) -> int:
    """Index after a run of one or more name atoms starting at t[i], or -1."""
    j = _atom(t, i)
    if j < 0:
        return -1
    while True:
        k = _atom(t, j)
        if k < 0:
            return j
        j = k


def _atom(t, i) -> int:
    if i >= len(t):
        return -1
    kind, val = t[i]
    if kind == "text":
        return i + 1
    if kind == "id":
        j = i + 1
    elif kind == "cmd" and (val[1:] in GREEK or val[1:] in NAME_CMDS):
        j = i + 1
    elif kind == "cmd" and val[1:] in DECORATIONS:
        return _braced_seq(t, i + 1) if _at(t, i + 1, "op", "{") else _atom(t, i + 1)
    else:
        return -1
    if _at(t, j, "op", "_"):  # a_1, a_{n+1}
        if _at(t, j + 1, "op", "{"):
            j = _group(t, j + 1, "{", "}")
        elif j + 1 < len(t) and t[j + 1][0] in ("num", "id"):
            j += 2
        else:
            return -1
    while j > 0 and _at(t, j, "op", "'"):
        j += 1
    return j
