"""String normalisation of an answer before it is parsed.

Every rule here is a plain, linear-time text substitution (no regular expression with nested
quantifiers), so a 100,000-character answer is normalised in milliseconds. What the rules do and why is
written down in ``docs/verifier.md``; the short version:

* math delimiters (``$``, ``\\(``, ``\\[``), ``\\left``/``\\right``, spacing commands and ``\\displaystyle``
  are dropped; ``\\dfrac``/``\\tfrac`` become ``\\frac``; unicode symbols become LaTeX;
* thousands separators are joined: ``1\\,234``, ``1{,}234`` and ``1 234`` always, ``1,234`` only when the
  caller says commas are thousands separators (the gold is a single value, see ``verifier.py``);
* currency (``\\$``, ``USD``), degree signs and trailing unit words or ``\\text{ cm}`` are removed;
* ``\\text{ or }`` / ``\\text{and}`` between answers become list commas;
* ``\\approx``, ``\\simeq``, ``≈`` are one relation (``\\approx``), ``pct``/``percent`` are ``%``.

An answer longer than ``MAX_ANSWER_CHARS`` only has its whitespace collapsed, and is never cut: the
verifier compares such answers as whole strings (a cut prefix once made two different 100,000-digit numbers
"the same string").
"""

from __future__ import annotations

import re

MAX_ANSWER_CHARS = 2000  # longer answers are compared as strings only (see verifier.py)

_UNICODE = {
    "\u2212": "-", "\u2013": "-", "\u2014": "-", "\u00d7": r"\times ", "\u00b7": r"\cdot ", "\u22c5": r"\cdot ",
    "\u00f7": r"\div ", "\u03c0": r"\pi ", "\u221e": r"\infty ", "\u221a": r"\sqrt", "\u222a": r"\cup ",
    "\u2229": r"\cap ", "\u00b1": r"\pm ", "\u2213": r"\mp ", "\u2264": r"\leq ", "\u2265": r"\geq ",
    "\u2260": r"\neq ", "\u2208": r"\in ", "\u2205": r"\emptyset ", "\u00b0": "", "\u2009": " ",
    "\u202f": " ", "\u00a0": " ", "\u2032": "'", "\u2248": r"\approx ", "\uff0c": ",", "\u3002": ".", "\u00bd": "1/2",
    "\u2044": "/", "\u00bc": "1/4", "\u00be": "3/4", "\u20ac": "", "\u00a3": "", "\u00a5": "",
}
_UNICODE_RE = re.compile("|".join(re.escape(k) for k in _UNICODE))

_DELIMS_RE = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\$")
_LEFTRIGHT_RE = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|Biggl|Biggr|big|Big|bigg|Bigg)(?![a-zA-Z])\s*(\.)?")
_SPACING_RE = re.compile(r"\\(?:displaystyle|textstyle|scriptstyle|limits|nolimits)(?![a-zA-Z])|\\!")
_THIN_THOUSANDS_RE = re.compile(r"(?<=\d)(?:\\,|\{,\}|\\ |~|\\;|\\:|\\thinspace(?![a-zA-Z]))(?=\d{3}(?!\d))")
_SPACE_THOUSANDS_RE = re.compile(r"(?<![\d.])(\d{1,3})((?: \d{3})+)(?![\d.])")
_COMMA_THOUSANDS_RE = re.compile(r"(?<![\d.,])(\d{1,3})((?:,\d{3})+)(?![\d,])")
_DECIMAL_COMMA_RE = re.compile(r"(?<=\d)\{,\}(?=\d)")
_SPACES_RE = re.compile(r"\\(?:,|;|:| |quad|qquad|enspace|thinspace|medspace|thickspace)(?![a-zA-Z])|~")
_FRAC_RE = re.compile(r"\\[dtc]frac(?![a-zA-Z])")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])|\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])|\^\s*\{\s*\\text\{\s*o\s*\}\s*\}")
_TEXT_CMD_RE = re.compile(r"\\(?:textnormal|textbf|textit|textrm|textsf|texttt|textup|mbox|hbox|mathrm|mathbf|mathit|mathsf|boldsymbol|bold|bm|operatorname|mathup|emph)\s*\{")
_REL_RE = [
    (re.compile(r"\\(?:leqslant|leq|le|leqq)(?![a-zA-Z])|<=|=<"), r"\\leq "),
    (re.compile(r"\\(?:geqslant|geq|ge|geqq)(?![a-zA-Z])|>=|=>"), r"\\geq "),
    (re.compile(r"\\(?:neq|ne)(?![a-zA-Z])|(?<![\d)}!])!="), r"\\neq "),  # 7!=5040 is a factorial
    (re.compile(r"\\lt(?![a-zA-Z])"), "<"),
    (re.compile(r"\\gt(?![a-zA-Z])"), ">"),
    (re.compile(r"\\(?:approx|simeq|thickapprox|doteq|sim)(?![a-zA-Z])"), r"\\approx "),
    (re.compile(r"\s*\\pmod\s*(?:\{[^{}]*\}|\w+)|\s*\(\s*\\(?:bmod|mod)\s*\w+\s*\)"), ""),  # "\pmod{7}": a note
    (re.compile(r"\\equiv(?![a-zA-Z])"), "="),
    (re.compile(r"(?<=\d)\s+x\s+(?=10\s*\^)"), r"\\times "),  # 4.4 x 10^7
]
_EMPTY_RE = re.compile(r"\\(?:varnothing|emptyset)(?![a-zA-Z])|\\\{\s*\\\}|\{\s*\}")
_ANGLE_RE = re.compile(r"\\langle(?![a-zA-Z])|\\rangle(?![a-zA-Z])")
_BRACE_CMD_RE = re.compile(r"\\lbrace(?![a-zA-Z])|\\rbrace(?![a-zA-Z])")
_CURRENCY_RE = re.compile(r"\\\$|\\(?:euro|pounds|yen)(?![a-zA-Z])|\b(?:USD|US\$|EUR|GBP)\b|\bRs\.?(?=\s*\d)")
_WORD_SEP_RE = re.compile(r"\s*(?:\\text\{\s*(?:or|and)\s*\}|(?<![a-zA-Z\\])(?:or|and)(?![a-zA-Z]))\s*")
_PERCENT_RE = re.compile(r"\\%|\\percent(?![a-zA-Z])|\s*\bper\s?cent\b|\s*\bpct\b\.?")
_UNIT_WORDS = (
    r"square\s+units?|sq\.?\s*units?|cubic\s+units?|units?|square\s+(?:feet|foot|meters?|inches|cm|centimeters?|miles?|yards?)|"
    r"cm|mm|km|meters?|metres?|centimeters?|kilometers?|millimeters?|inches|inch|feet|foot|ft|miles?|yards?|yds?|"
    r"degrees?|radians?|dollars?|cents?|euros?|pounds?|hours?|hrs?|minutes?|mins?|seconds?|secs?|days?|weeks?|"
    r"months?|years?|kg|grams?|kilograms?|lbs?|ounces?|oz|liters?|litres?|ml|gallons?|mph|km/h|m/s|people|persons?|"
    r"students?|apples?|marbles?|books?|pages?|points?|times|ways?|items?|boxes?|eggs?|cookies?|tickets?"
)
_UNIT_TAIL_RE = re.compile(r"(?<=[\d}).])\s+(?:" + _UNIT_WORDS + r")(?:\s*\^\s*\{?[23]\}?)?\s*\.?\s*$", re.IGNORECASE)
_TRAILING_RE = re.compile(r"(?:\s|\.|\\\\|;|,|\\quad|\\qquad)+$")
_SQRT_DIGIT_RE = re.compile(r"\\sqrt\s*(\d)")
_WS_RE = re.compile(r"\s+")


def _unwrap_brace_arg(s: str, start: int) -> tuple[str, int] | None:
    """Return (content, index after the closing brace) for the group opening at s[start] == '{'."""
    depth = 0
    i = start
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return s[start + 1 : i], i + 1
        i += 1
    return None


def _rewrite_text_commands(s: str) -> str:
    """``\\mathrm{x}`` -> ``x`` for one letter; other text-like commands -> ``\\text{...}``."""
    out = []
    pos = 0
    for _ in range(200):
        m = _TEXT_CMD_RE.search(s, pos)
        if not m:
            break
        arg = _unwrap_brace_arg(s, m.end() - 1)
        if arg is None:
            break
        content, after = arg
        out.append(s[pos : m.start()])
        stripped = content.strip()
        if len(stripped) == 1 and stripped.isalpha() or stripped.startswith("\\") or not stripped:
            out.append(stripped)  # \mathrm{i}, \mathbf{v}, \operatorname{\sin}
        elif "operatorname" in m.group(0) and stripped.isalpha():
            out.append("\\" + stripped + " ")  # \operatorname{lcm} -> \lcm
        else:
            out.append("\\text{" + content + "}")
        pos = after
    out.append(s[pos:])
    return "".join(out)


_TEXT_RE = re.compile(r"\\text\s*\{")


def _simplify_text(s: str) -> str:
    """``\\text{13}`` -> ``13``; ``\\text{(C)}`` -> ``(C)``; a trailing ``\\text{ cm}^2`` after a value is a unit."""
    out = []
    pos = 0
    for _ in range(200):
        m = _TEXT_RE.search(s, pos)
        if not m:
            break
        arg = _unwrap_brace_arg(s, m.end() - 1)
        if arg is None:
            break
        content, after = arg
        before = "".join(out) + s[pos : m.start()]
        c = content.strip()
        tail = s[after:]
        unit_tail = re.match(r"\s*(?:\^\s*\{?[23]\}?)?\s*\.?\s*$", tail)
        if re.fullmatch(r"[-+]?[\d.,]+|\(?[A-Ea-e]\)?", c):
            piece = c
        elif re.fullmatch(r"or|and|,", c):
            piece = ","
        elif unit_tail and before.strip() and re.search(r"[\d})a-zA-Z]\s*$", before) and re.fullmatch(r"[A-Za-z][A-Za-z .'/\-]*(?:\^\{?[23]\}?)?", c):
            out.append(s[pos : m.start()])
            pos = after + unit_tail.end()
            continue
        else:
            piece = "\\text{" + c + "}"
        out.append(s[pos : m.start()])
        out.append(piece)
        pos = after
    out.append(s[pos:])
    return "".join(out)


def normalize(s: str, *, comma_thousands: bool = False) -> str:
    """Normalise one answer string (already extracted from its box or tags).

    ``comma_thousands`` joins ``1,234`` into ``1234``; the verifier turns it on when the gold is a single
    value (the gold's style decides whether a comma separates answers or digit groups).
    """
    s = s.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return _WS_RE.sub(" ", s.replace("\x00", "")).strip()
    s = s.replace("\x00", "").replace("\\\\", "\x00")  # protect the row separator \\ from the rules below
    s = _UNICODE_RE.sub(lambda m: _UNICODE[m.group(0)], s)
    s = _CURRENCY_RE.sub("", s)
    s = _DELIMS_RE.sub(" ", s)
    s = _LEFTRIGHT_RE.sub("", s)
    s = _SPACING_RE.sub("", s)
    s = _THIN_THOUSANDS_RE.sub("", s)
    s = _DECIMAL_COMMA_RE.sub(".", s)
    s = _SPACES_RE.sub(" ", s)
    s = _SPACE_THOUSANDS_RE.sub(lambda m: m.group(1) + m.group(2).replace(" ", ""), s)
    if comma_thousands:
        s = _COMMA_THOUSANDS_RE.sub(lambda m: m.group(1) + m.group(2).replace(",", ""), s)
    s = _FRAC_RE.sub(r"\\frac", s)
    s = _DEGREE_RE.sub("", s)
    s = _PERCENT_RE.sub("%", s)
    s = _rewrite_text_commands(s)
    s = _simplify_text(s)
    for rx, repl in _REL_RE:
        s = rx.sub(repl, s)
    s = _EMPTY_RE.sub(r"\\emptyset ", s)
    s = _ANGLE_RE.sub(lambda m: "(" if "langle" in m.group(0) else ")", s)
    s = _BRACE_CMD_RE.sub(lambda m: "\\{" if "lbrace" in m.group(0) else "\\}", s)
    s = _SQRT_DIGIT_RE.sub(r"\\sqrt{\1}", s)
    s = _WORD_SEP_RE.sub(",", s) if ("or" in s or "and" in s) else s
    s = _UNIT_TAIL_RE.sub("", s)
    s = _TRAILING_RE.sub("", s)
    s = _WS_RE.sub(" ", s).strip()
    s = s.strip(",").strip()
    return s.replace("\x00", "\\\\")


def compact(s: str) -> str:
    """The form used for plain string equality: no spaces, no braces around single tokens."""
    s = s.replace(" ", "")
    return re.sub(r"\{(\w)\}", r"\1", s) if "{" in s else s
