"""Free-text answer rules: what careful graders read when a completion has no box, no tags and no phrase.

* ``last_math_env``: the content of the last complete math environment (``$…$``, ``$$…$$``, ``\\[…\\]``,
  ``\\(…\\)``, ``align``/``equation``…), as lm-eval's Minerva/Hendrycks readers and math-verify do. Of a
  multi-line display the last line counts, and of ``A \\Rightarrow B`` the part after the last arrow.
  ``$`` followed by a number and then a word or the end of a sentence (``costs $5 per hour``, ``is $40.``)
  is a currency sign, not math. A lone letter (``for all $x$``) is a mention, not an answer, unless it is
  the only environment. Environments that end the text joined only by commas/"and"/"or" form one list
  when they are all plain values or all assign the same name (``$x = 2$ and $x = -3$``), not when they
  are steps (``$k - 1 = 1$ and $k = 2$``). ``[asy]`` drawings are skipped. A text that ends inside an open
  environment (cut off) gives nothing: the model was still writing.
* ``final_sentence``: the value stated at the end of the last sentence, ``Therefore the largest n is 34.``,
  ``so x = 7.``: a short value (a number, or math with at most two plain words) after is/are/equals/=/gives,
  or a last line that is only a value (``1.22 J.``), or the one number of a concluding sentence (``So Janet
  makes $18 every day.``); the caller prefers it when it comes after the last math environment.
* ``is_prose``: two plain words in a row outside LaTeX commands (``the answer``): the text is not itself an
  answer, so the rules above are needed. ``no solution`` is prose too; callers fall back to it last.
* ``after_thinking``: only the text after the last ``</think>`` is searched; an opened and never closed
  ``<think>`` means the model never gave its final answer (``None``).
* ``part_spans``: "(a) … (b) …": the text of each part, in order.
* ``strip_drawings`` / ``strip_afterword``: ``[asy]`` code, and a closing remark ("Note …") that concludes
  nothing, are not where the answer is.

Every function is one linear scan (no regular expression with nested quantifiers over the whole text), so
a 100,000-character trace costs milliseconds.
"""

from __future__ import annotations

import re

_DISPLAY = r"(?:align|equation|eqnarray|gather|multline|flalign)\*?"
_ENV_TOKEN_RE = re.compile(r"\\\\|\\\$|\$\$|\$|\\\[|\\\]|\\\(|\\\)|\\begin\{" + _DISPLAY + r"\}|\\end\{" + _DISPLAY + r"\}")
_CURRENCY_AFTER_RE = re.compile(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s+[A-Za-z]{2,}|[.,;:!?](?=\s+[A-Za-z(]|\s*$)|\s*$)")
_CLOSERS = {"$$": "$$", "$": "$", "\\[": "\\]", "\\(": "\\)"}
_INNER_ALIGN_RE = re.compile(r"\\(?:begin|end)\{(?:aligned|split|gathered|alignedat)\*?\}(?:\{\d+\})?")
_ROW_TOKEN_RE = re.compile(r"\\\\|\\begin\{[a-zA-Z*]+\}|\\end\{[a-zA-Z*]+\}")
_ASY_RE = re.compile(r"\[asy\]|\[/asy\]")
_ARROW_RE = re.compile(r"\\(?:Rightarrow|implies|Longrightarrow|Leftrightarrow|Longleftrightarrow|iff|therefore|to)(?![a-zA-Z])")
_LEAD_RE = re.compile(r"^(?:\s|\\q?quad(?![a-zA-Z])|\\[,;:!]|&|=)+")
_MENTION_RE = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?'?")
_NAMED_RE = re.compile(r"([A-Za-z](?:_\{?\w+\}?)?)\s*=[^=<>]*")
_REL_CHARS_RE = re.compile(r"=|<|>|\\[lg]eq?(?![a-zA-Z])|\\neq?(?![a-zA-Z])")
_CMD_RE = re.compile(r"\\[a-zA-Z]+\*?")
_TEXT_ARG_RE = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mbox|operatorname)\s*\{[^{}]*\}")
_PROSE_RE = re.compile(r"(?<![A-Za-z\\])(?=[A-Za-z]*[a-z])[A-Za-z]{2,}[ \t\n]+[A-Za-z]{2,}(?![A-Za-z])")
_SENTENCE_END_RE = re.compile(r"(?:(?<!\d)\.(?!\d)|[!?;\n]|(?<=\d)\.(?=\s)|,\s*(?=(?:so|hence|thus|therefore)\b))")
CLAUSE_RE = re.compile(r"[,;]\s+(?!(?:and|or)\b)(?=[A-Za-z]{3,})|\s+(?:since|because|as|which|where|when)\s+")
_VERB_RE = re.compile(r"(?i)(?:\b(?:is|are|was|equals?|be|gives?|gets?|got|receives?|obtain|yields?)\b|"
                      r"\b(?:simplifies|reduces|comes|equal|amounts|evaluates)\s+to\b|=|:)\s*")
_VALUE_START_RE = re.compile(r"[-+(\[\\\d$]|[A-Za-z](?![A-Za-z])")
_PART_RE = re.compile(r"\b[Pp]art\s*\(?([a-h])\b\)?|(?:^|(?<=[\s.;:,*{]))\(([a-h])\)|^[ \t]*([a-h])\)", re.MULTILINE)
MATH_WORDS = {"sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "sqrt", "pi", "lim", "det", "gcd",
              "lcm", "max", "min", "mod", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "and", "or", "inf",
              "infty", "deg", "dx", "dy", "dt", "dz"}
_WORD_RE = re.compile(r"(?<![\\A-Za-z])(?=[A-Za-z]*[a-z])[A-Za-z]{2,}(?![A-Za-z])")
_SHORT_WORDS = {"so", "is", "it", "we", "as", "at", "be", "by", "if", "in", "of", "on", "to", "an", "no", "us", "do",
                "am", "are"}
_DELIM_ENDS_RE = re.compile(r"^(?:\$+|\\[(\[])|(?:\$+|\\[)\]])$")
SEPARATOR_RE = re.compile(r"[\s$,;.]*(?:(?:and|or|&|\\text\{\s*(?:and|or)\s*\}|\\quad|\\qquad)[\s$,;.]*)?"
                          r"(?:[A-Za-z](?:_\{?\w+\}?)?\s*=\s*)?")  # "\boxed{3} or x = \boxed{-5}"
_NOT_ANSWERS = {"correct", "right", "wrong", "incorrect", "true", "false", "not", "clear", "valid", "below",
                "above", "as", "that", "this", "the", "follows", "given", "unknown", "done"}
_AFTERWORD_RE = re.compile(
    r"\n\s*\n\s*(?=(?:Note|Remark|Alternatively|Check|We (?:can|may|might) (?:also |even )?(?:check|verify|have)))"
    r"|\s\((?=(?:Note|Remark|Alternatively|Check|We (?:can|may|might) (?:also |even )?(?:check|verify|have))[^()]*\)\s*\.?\s*$)")
_CONCLUSION_RE = re.compile(r"(?i)\b(?:hence|therefore|thus|so the|answer|final|we get|we obtain)\b")
_BARE_VALUE_RE = re.compile(r"[-+]?\$?\d[\d,.]*(?:\s*[A-Za-z/%{}~^\-\d\s]{0,30})$")
_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?![\w.]*\d)")
_CONCLUDES_RE = re.compile(r"(?i)\s*(?:so|thus|therefore|hence|in total|altogether|finally|in all|overall)\b")
MAX_FINAL_SENTENCE = 300
_PART_JOIN_RE = re.compile(r"[\s,;]*(?:\b(?:and|while|whereas)\b)?[\s,;]*(?:\b(?:for|in)\b)?\s*$")


def strip_drawings(text: str) -> str:
    """The text without ``[asy]…[/asy]`` blocks (their labels are ``$…$`` but never answers)."""
    if "[asy]" not in text:
        return text
    out, pos, depth = [], 0, 0
    for m in _ASY_RE.finditer(text):
        if m.group(0) == "[asy]":
            if depth == 0:
                out.append(text[pos : m.start()])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                pos = m.end()
    if depth == 0:
        out.append(text[pos:])
    return "".join(out)


def math_envs(text: str) -> tuple[list[tuple[int, int, int, int]], bool]:
    """(content start, content end, opener start, closer end) of the complete math environments in order,
    and whether the text ends inside one."""
    spans: list[tuple[int, int, int, int]] = []
    open_tok, open_start, open_end = None, 0, 0
    for m in _ENV_TOKEN_RE.finditer(text):
        tok = m.group(0)
        if tok in ("\\\\", "\\$"):
            continue
        if open_tok is None:
            if tok.startswith("\\begin"):
                open_tok, open_start, open_end = "\\end" + tok[6:], m.start(), m.end()
            elif tok in _CLOSERS:
                if tok == "$" and _CURRENCY_AFTER_RE.match(text, m.end()):
                    continue  # "$5 per hour", "is $40." : a price
                open_tok, open_start, open_end = tok, m.start(), m.end()
        elif tok == _CLOSERS.get(open_tok, open_tok) or (open_tok == "$" and tok == "$$"):
            spans.append((open_end, m.start(), open_start, m.end()))
            open_tok = None
    return spans, open_tok is not None


def _last_row(content: str) -> str:
    """The last non-empty line of a display (``\\\\`` outside any inner ``\\begin…\\end``, e.g. a matrix)."""
    content = _INNER_ALIGN_RE.sub(" ", content)
    rows, depth, start = [], 0, 0
    for m in _ROW_TOKEN_RE.finditer(content):
        tok = m.group(0)
        if tok.startswith("\\begin"):
            depth += 1
        elif tok.startswith("\\end"):
            depth -= 1
        elif depth == 0:
            rows.append(content[start : m.start()])
            start = m.end()
    rows.append(content[start:])
    rows = [r for r in rows if r.strip(" \t\n&")]
    return rows[-1] if rows else ""


def _env_content(text: str, start: int, end: int) -> str:
    """The answer part of one environment: its last line, after the last implication arrow."""
    content = text[start:end]
    if "\\\\" in content:
        content = _last_row(content)
    if "&" in content and "\\begin" not in content:
        content = content.replace("&", " ")
    content = _ARROW_RE.split(content)[-1]
    content = content.strip().strip(".,;:").strip()
    return _LEAD_RE.sub("", content).strip().strip(".,;:").strip()


def _mention(content: str) -> bool:
    return _MENTION_RE.fullmatch(content) is not None


def _groupable(contents: list[str]) -> bool:
    """Environments that form one list: all plain values, or all ``name = value`` for the same name."""
    if not any(_REL_CHARS_RE.search(c) for c in contents):
        return True
    names = [_NAMED_RE.fullmatch(c) for c in contents]
    return all(names) and len({m.group(1) for m in names}) == 1


def last_math_env(text: str) -> tuple[str | None, int]:
    """(the answer in the last complete math environment, where that environment ends), or (None, -1)."""
    spans, cut = math_envs(text)
    if cut:
        return None, -1
    contents = [_env_content(text, a, b) for a, b, _, _ in spans]
    candidates = [k for k in range(len(spans)) if contents[k]]
    if not candidates:
        return None, -1
    k = next((k for k in reversed(candidates) if not _mention(contents[k])), candidates[-1])
    j = k
    while j > 0 and contents[j - 1] and SEPARATOR_RE.fullmatch(text, spans[j - 1][3], spans[j][2]) \
            and _groupable(contents[j - 1 : k + 1]):
        j -= 1
    return ", ".join(contents[j : k + 1]), spans[k][3]


def whole_env(text: str) -> str | None:
    """The content when ``text`` is one math environment and punctuation (``$4$.``), else None."""
    spans, cut = math_envs(text)
    if cut or len(spans) != 1:
        return None
    start, end, open_start, close_end = spans[0]
    if text[:open_start].strip(" \t\n,;:.") or text[close_end:].strip(" \t\n,;:."):
        return None
    return _env_content(text, start, end) or None


def is_prose(text: str) -> bool:
    """Two plain words in a row outside LaTeX commands and ``\\text{}``: sentences, not an answer."""
    stripped = _CMD_RE.sub(" ", _TEXT_ARG_RE.sub(" ", text))
    return _PROSE_RE.search(stripped) is not None


def has_words_beside_math(norm: str) -> bool:
    """A word next to numbers or commands (``thus 7``, ``so x = 7``, ``5 dogs``): a fragment of a sentence or a
    labelled value, not a bare answer. Text answers (``Evelyn``), math words (``sqrt``), products of
    variables (``xy``) and capital names of points (``AB = 4``) do not count."""
    stripped = _CMD_RE.sub(" ", _TEXT_ARG_RE.sub(" ", norm))
    words = [w for w in _WORD_RE.findall(stripped)
             if w.lower() in _SHORT_WORDS or (len(w) > 2 and w.lower() not in MATH_WORDS)]
    return bool(words) and re.search(r"[\d\\=<>]", norm) is not None


def clean_value(value: str | None) -> str | None:
    """A candidate answer cut from a sentence, or None when it reads as words rather than a value."""
    if value is None:
        return None
    value = _DELIM_ENDS_RE.sub("", value.strip().rstrip(".,;:!").strip()).strip().rstrip(".,;:!").strip()
    if not value or len(value) > 1000 and not value[:1].isdigit():
        return None
    if value.lower() in _NOT_ANSWERS or is_prose(value):
        return None
    return value


def final_sentence(text: str) -> tuple[str | None, int]:
    """(the value closing the last sentence, where that value starts), or (None, -1):
    ``… the largest n is 34.``"""
    tail = text.rstrip()
    tail = tail[:-1] if tail.endswith((".", "!")) else tail
    cut = max(0, len(tail) - MAX_FINAL_SENTENCE)
    window = tail[cut:]
    start = 0
    for m in _SENTENCE_END_RE.finditer(window):
        if m.end() < len(window):
            start = m.end()
    sentence = window[start:]
    verbs = list(_VERB_RE.finditer(sentence))
    after_math = max(sentence.rfind("$"), sentence.rfind("\\)"), sentence.rfind("\\]"))
    if any(v.start() > after_math for v in verbs):  # "namely $\theta = \lambda/d$, gives 1.2": after the math
        verbs = [v for v in verbs if v.start() > after_math]
    for v in verbs[:6]:  # the first verb with a clean value: "x = 3 or x = -2" whole, "… is 5, since …" cut
        value = sentence[v.end():]
        if not _VALUE_START_RE.match(value):
            continue
        if not re.search(r"[\d\\]", value) and len(value.strip()) > 1:
            continue  # "is odd": words, not a value
        clause = CLAUSE_RE.search(value)
        value = clean_value(value[: clause.start()] if clause else value)
        if value is not None:
            return value, cut + start + v.end()
    if not verbs and _BARE_VALUE_RE.match(sentence.strip()):  # a last line that is only a value: "1.22 J."
        value = clean_value(sentence)
        if value is not None:
            return value, cut + start
    numbers = _NUMBER_RE.findall(sentence)
    if len(numbers) == 1 and _CONCLUDES_RE.match(sentence):  # "So Janet makes $18 every day."
        return numbers[0].replace(",", ""), cut + start + sentence.find(numbers[0])
    return None, -1


def strip_afterword(text: str) -> str:
    """The text without a closing remark after the answer: a last paragraph starting "Note", "Remark",
    "Alternatively", "We can check", or such a parenthesis at the very end, when it concludes nothing
    (no "hence", "therefore", "answer"...)."""
    window = len(text) - min(len(text), 2000)
    for m in _AFTERWORD_RE.finditer(text, window):
        rest = text[m.end() :]
        if not _CONCLUSION_RE.search(rest) and (m.group(0).strip() == "(" or "\n\n" not in rest.strip()):
            return text[: m.start()]
    return text


def after_thinking(text: str) -> str | None:
    """The text after the last ``</think>``; None when a ``<think>`` was opened and never closed."""
    close = text.rfind("</think>")
    if close >= 0:
        after = text[close + len("</think>"):]
        return after if after.strip() else text[:close]
    if "<think>" in text:
        return None
    return text


def part_spans(text: str) -> list[str]:
    """The texts of parts (a), (b), … when the text labels at least two consecutive parts, else []."""
    marks = []
    for m in _PART_RE.finditer(text):
        letter = (m.group(1) or m.group(2) or m.group(3)).lower()
        if (not marks and letter == "a") or (marks and ord(letter) == ord(marks[-1][0]) + 1):
            marks.append((letter, m.end(), m.start()))
    if len(marks) < 2:
        return []
    out = []
    for i, (_, end, _) in enumerate(marks):
        stop = marks[i + 1][2] if i + 1 < len(marks) else len(text)
        out.append(_PART_JOIN_RE.sub("", text[end:stop]))  # "… is 3, and for part (b) …": not part of 3
    return out
