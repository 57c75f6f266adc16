"""Tokens of the answer grammar (see latex_parse.py): numbers (decimals, e-notation, repeating
decimals), commands, one-letter identifiers and operators. Linear time, capped at MAX_TOKENS."""

from __future__ import annotations

import re
from fractions import Fraction

MAX_TOKENS = 4000
MAX_NUMBER_DIGITS = 400


class ParseError(ValueError):
    """The text is not an answer this grammar understands (or exceeds its limits)."""


_TOKEN_RE = re.compile(
    r"\s*(?:"
    r"(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+(?![\d.]))?)"
    r"|(?P<cmd>\\(?:[a-zA-Z]+|[{}%\\,;!| ]))"
    r"|(?P<word>(?<![a-zA-Z])(?:arcsin|arccos|arctan|sinh|cosh|tanh|sin|cos|tan|cot|sec|csc|log|ln|exp|sqrt|pi)(?![a-zA-Z]))"
    r"|(?P<id>[a-zA-Z])"
    r"|(?P<op>\*\*|[-+*/^_!=<>,;|&()\[\]{}%':.])"
    r")"
)


def tokenize(s: str) -> list[tuple[str, str]]:
    toks: list[tuple[str, str]] = []
    pos, n = 0, len(s)
    while pos < n:
        m = _TOKEN_RE.match(s, pos)
        if not m or m.end() == pos:
            if s[pos:].strip() == "":
                break
            raise ParseError(f"unexpected character {s[pos]!r}")
        pos = m.end()
        kind = m.lastgroup
        val = m.group(kind)
        if kind == "cmd" and val in ("\\text", "\\begin", "\\end"):
            j = pos
            while j < n and s[j] == " ":
                j += 1
            if j >= n or s[j] != "{":
                raise ParseError(f"{val} without an argument")
            close = s.find("}", j)
            if close < 0:
                raise ParseError("unclosed brace")
            arg = s[j + 1 : close]
            pos = close + 1
            if val == "\\begin" and arg == "array":  # skip the column spec {cc}
                m2 = re.match(r"\s*\{[^{}]*\}", s[pos:])
                if m2:
                    pos += m2.end()
            toks.append(({"\\text": "text", "\\begin": "begin", "\\end": "end"}[val], arg))
        elif kind == "cmd" and val == "\\overline" and toks and toks[-1][0] == "num":
            m2 = re.match(r"\s*\{\s*(\d{1,40})\s*\}", s[pos:])
            if not m2:
                raise ParseError("bad \\overline")
            toks[-1] = ("num", toks[-1][1] + "r" + m2.group(1))  # repeating decimal 0.1\overline{6}
            pos += m2.end()
        elif kind == "word":  # plain-text function names: sqrt(2), sin x, pi/2
            toks.append(("cmd", "\\" + val))
        else:
            toks.append((kind, val))
        if len(toks) > MAX_TOKENS:
            raise ParseError("answer too long to parse")
    return toks


def number(text: str) -> tuple:
    rep = None
    if "r" in text:
        text, rep = text.split("r")
    mant, _, exp = text.lower().partition("e")
    if len(mant) > MAX_NUMBER_DIGITS or len(exp) > 4:
        raise ParseError("number too long")
    ip, _, fp = mant.partition(".")
    value = Fraction(int(ip or "0"))
    if fp:
        value += Fraction(int(fp), 10 ** len(fp))
    places = len(fp) if fp else None
    if rep:
        value += Fraction(int(rep), (10 ** len(rep) - 1) * 10 ** len(fp))
        places = None  # 0.\overline{3} is exact
    if exp:
        e = int(exp)
        value *= Fraction(10) ** e
        places = (places or 0) - e
        places = places if places > 0 else None
    return ("num", value, places)


def collapse_parens(s: str) -> str:
    """Drop redundant paren pairs: ``((X))`` -> ``(X)`` (linear; matched pairs via a stack)."""
    if "((" not in s:
        return s
    stack, match = [], {}
    for i, c in enumerate(s):
        if c == "(":
            stack.append(i)
        elif c == ")" and stack:
            match[stack.pop()] = i
    drop = set()
    for i, j in match.items():
        if match.get(i + 1) == j - 1:
            drop.update((i, j))
    return "".join(c for k, c in enumerate(s) if k not in drop) if drop else s


