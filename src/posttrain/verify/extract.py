"""Final-answer extraction from a completion, by a named style, reporting which rule found it.

Styles: ``boxed`` (last complete ``\\boxed{}``/``\\fbox{}``, brace-matched), ``tags`` (last
``<SOLUTION>…</SOLUTION>`` or ``<answer>…</answer>``; configurable), ``gsm8k`` (``#### N``),
``final_answer`` ("The final answer is …", Minerva's format), ``dapo`` (DAPO's ``Answer: …`` line): the
strict modes, each reading only its own format. ``auto`` reads a completion the way careful graders do
(Minerva/lm-eval, math-verify), strongest anchor first:

====================  ==============================================================================
rule                  what it reads
====================  ==============================================================================
``parts``             "(a) … (b) …" or "part (a) … part (b)": each part's answer by the rules below
``box`` / ``boxes``   the last box; boxes joined only by commas, "and", "or" at the end are one list
``tags``              the last closed answer tag
``final_answer``      "The final answer is X", "the answer is X" (Minerva: "… X. I hope it is correct.")
``answer_line``       DAPO's "Answer: X"
``gsm8k``             "#### X"
``whole``             the whole text, when it is one line of math rather than sentences
``math_env``          the last ``$…$``, ``$$…$$``, ``\\[…\\]``, ``\\(…\\)`` (freetext.py)
``final_sentence``    "Therefore the largest n is 34." (freetext.py); the later of the two wins
``last_number``       the last number, only when ``last_number=True``
====================  ==============================================================================

No answer: ``truncated_box`` / ``empty_box`` (a box the text ends inside, or an empty one: an earlier
box does not stand in, because the model's final answer is the one it was writing), ``unfinished_think``
(a ``<think>`` never closed: the trace has no final answer yet), ``no_answer``. With ``auto``, only the
text after the last ``</think>`` is read, so candidates along a reasoning trace are never the answer.
Only the completion is searched: when ``prompt`` is given and the text starts with it, the prompt part is
cut off first, so a number or box copied from the problem is never taken as the answer. Every scan is
linear in the text.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from posttrain.verify.freetext import (
    CLAUSE_RE,
    SEPARATOR_RE,
    after_thinking,
    clean_value,
    final_sentence,
    has_words_beside_math,
    is_prose,
    last_math_env,
    part_spans,
    strip_afterword,
    strip_drawings,
    whole_env,
)
from posttrain.verify.normalize import normalize

STYLES = ("auto", "boxed", "tags", "gsm8k", "final_answer", "dapo")
# rules that read an answer out of running text: the verifier then reads ``L = v`` as the result ``v``
FREE_TEXT_RULES = ("math_env", "final_sentence", "final_answer", "answer_line", "parts")
DEFAULT_TAGS = (("<SOLUTION>", "</SOLUTION>"), ("<answer>", "</answer>"))

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_BRACE_RE = re.compile(r"\\.|[{}]", re.DOTALL)
_TEX_ARG_RE = re.compile(r"[^\s$]+")
_GSM8K_RE = re.compile(r"####\s*([^\n]*)")
_FINAL_RE = re.compile(r"(?i)(?:\bfinal answer|\bthe answer|\bmy answer)\s+(?:is|would be|will be|should be)\b\s*:?\s*"
                       r"|\u7b54\u6848\u662f\s*")
_DAPO_RE = re.compile(r"(?im)^[ \t>#*_]*(?:final\s+)?answer\s*:[ \t*_]*")
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_VALUE_END_RE = re.compile(r"\n|\.\s*I hope it is correct|(?<!\d)\.(?!\d)|\.(?=\s|$)")


class Extracted(NamedTuple):
    """The answer text (None when there is none) and the rule that decided it (see the module doc)."""

    answer: str | None
    rule: str


def _match_brace(text: str, open_idx: int) -> int:
    """Index of the '}' closing the '{' at open_idx, or -1 when the text ends first."""
    depth = 0
    for m in _BRACE_RE.finditer(text, open_idx):
        tok = m.group(0)
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return -1


def box_spans(text: str) -> tuple[list[tuple[str, int, int]], bool]:
    """(content, start, end) of the top-level boxes in order, and whether the text ends inside a box."""
    out: list[tuple[str, int, int]] = []
    end = 0
    for m in _BOX_RE.finditer(text):
        if m.start() < end:
            continue  # nested inside the previous box
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            close = _match_brace(text, i)
            if close < 0:
                return out, True
            out.append((text[i + 1 : close].strip(), m.start(), close + 1))
            end = close + 1
        elif i > m.end():  # TeX form: \boxed 5 (the whole argument, however long: never a cut prefix)
            m2 = _TEX_ARG_RE.match(text, i)
            if m2:
                out.append((m2.group(0), m.start(), m2.end()))
                end = m2.end()
    return out, False


def find_boxes(text: str) -> tuple[list[str], bool]:
    """Contents of the top-level boxes in order, and whether the text ends inside an unclosed box."""
    spans, truncated = box_spans(text)
    return [c for c, _, _ in spans], truncated


def last_boxed(text: str) -> str | None:
    boxes, truncated = find_boxes(text)
    if truncated or not boxes or not boxes[-1]:
        return None
    return boxes[-1]


def _boxed(text: str, group: bool) -> Extracted:
    spans, truncated = box_spans(text)
    if truncated:
        return Extracted(None, "truncated_box")
    if not spans:
        return Extracted(None, "no_answer")
    if not spans[-1][0]:
        return Extracted(None, "empty_box")
    first = len(spans) - 1
    while group and first > 0 and spans[first - 1][0] and \
            SEPARATOR_RE.fullmatch(text, spans[first - 1][2], spans[first][1]):
        first -= 1
    if first < len(spans) - 1:  # "\boxed{1}, \boxed{2} and \boxed{3}": one answer in several boxes
        return Extracted(", ".join(c for c, _, _ in spans[first:]), "boxes")
    return Extracted(spans[-1][0], "box")


def _tags(text: str, tags, prompt_suffix: str = "") -> tuple[bool, str | None]:
    """(a tag was seen, its content); content is None when the last tag is unclosed or empty."""
    for open_tag, close_tag in tags:
        close = text.rfind(close_tag)
        last_open = text.rfind(open_tag)
        opened_by_prompt = prompt_suffix.rstrip().endswith(open_tag)
        if close < 0:
            if last_open >= 0 or opened_by_prompt:
                return True, None  # opened and never closed: truncated
            continue
        if last_open > close:
            return True, None  # a newer answer was opened and not finished
        start = text.rfind(open_tag, 0, close)
        if start < 0:
            if opened_by_prompt:  # the generation prompt opened the tag
                return True, text[:close].strip() or None
            continue
        return True, text[start + len(open_tag) : close].strip() or None
    return False, None


def _phrase_value(rest: str) -> str | None:
    """The value that follows "the answer is": a whole math environment, else up to the sentence end."""
    rest = rest.lstrip("*").lstrip()
    if rest.startswith("$") or rest.startswith("\\[") or rest.startswith("\\("):
        dollars = "$$" if rest.startswith("$$") else rest[:2] if rest.startswith("\\") else "$"
        closer = {"\\[": "\\]", "\\(": "\\)"}.get(dollars, dollars)
        close = rest.find(closer, len(dollars))
        if close > 0:
            return clean_value(rest[len(dollars) : close])
    m = _VALUE_END_RE.search(rest)
    value = rest[: m.start()] if m else rest
    value = value.strip().rstrip("*").strip()
    m2 = CLAUSE_RE.search(value)  # "5, since 2+3 = 5": keep the value, drop the clause that explains it
    return clean_value(value[: m2.start()] if m2 else value)


def _final_answer(text: str) -> str | None:
    for m in reversed(list(_FINAL_RE.finditer(text))[-3:]):
        value = _phrase_value(text[m.end() :])
        if value is not None:
            return value
    return None


def _last_match(rx, text: str):
    last = None
    for m in rx.finditer(text):
        last = m
    return last


def _dapo(text: str) -> str | None:
    """DAPO's ``Answer: X`` on a line of its own (``**Answer:** X`` too); X may be a display below it."""
    last = _last_match(_DAPO_RE, text)
    if last is None:
        return None
    return _phrase_value(text[last.end() :])


def _gsm8k(text: str) -> str | None:
    last = _last_match(_GSM8K_RE, text)
    if last is None:
        return None
    return last.group(1).strip().rstrip(".").strip() or None


def _last_number(text: str) -> str | None:
    last = _last_match(_NUMBER_RE, text)
    return last.group(0).rstrip(",") if last else None


def looks_like_answer(text: str) -> bool:
    """One line of math (units, "or", a set of envs allowed), not sentences: the text may be the answer."""
    s = text.strip()
    if not s or "\n" in s:
        return False
    if len(s) > 4000:
        return not is_prose(s[:4000])
    norm = normalize(s)
    return not is_prose(norm) and not has_words_beside_math(norm)


def _auto(text: str, tags, prompt_suffix: str, whole: bool) -> Extracted:
    """The ``auto`` rules on one text (a part, or the whole completion after thinking)."""
    if _BOX_RE.search(text):
        found = _boxed(text, group=True)
        if found.rule != "no_answer":
            return found
    seen, content = _tags(text, tags, prompt_suffix)
    if seen:
        return Extracted(content, "tags")
    for rule, fn in (("final_answer", _final_answer), ("answer_line", _dapo), ("gsm8k", _gsm8k)):
        value = fn(text)
        if value is not None:
            return Extracted(value, rule)
    if whole and looks_like_answer(text):
        return Extracted(whole_env(text) or text.strip().strip(",;:").strip(), "whole")
    text = strip_drawings(text)
    found = _weak(strip_afterword(text))
    return found if found.answer is not None else _weak(text)


def _weak(text: str) -> Extracted:
    """The later of the last math environment and the value closing the last sentence."""
    env, env_end = last_math_env(text)
    sent, sent_start = final_sentence(text)
    if sent is not None and (env is None or env_end <= sent_start):  # the value comes after the last math
        return Extracted(sent, "final_sentence")
    if env is not None:
        return Extracted(env, "math_env")
    return Extracted(None, "no_answer")


def extract_with_rule(
    text: str,
    style: str = "auto",
    *,
    tags=DEFAULT_TAGS,
    last_number: bool = False,
    prompt: str | None = None,
    prompt_suffix: str = "",
    whole: bool = True,
) -> Extracted:
    """The final answer in ``text`` by ``style`` and the rule that found it (see the module doc).

    ``whole=False`` turns off the ``whole`` rule (``auto`` only). ``last_number=True`` adds the last-number
    fallback to any style.

    >>> extract_with_rule("Final Answer: The final answer is 34. I hope it is correct.")
    Extracted(answer='34', rule='final_answer')
    >>> extract_with_rule(r"So we get \\[ 12 \\]")
    Extracted(answer='12', rule='math_env')
    """
    if style not in STYLES:
        raise ValueError(f"unknown answer style {style!r}; choose one of {', '.join(STYLES)}")
    if not isinstance(text, str) or not text:
        return Extracted(None, "no_answer")
    if prompt and text.startswith(prompt):
        text = text[len(prompt) :]
    if style == "auto":
        opened = prompt_suffix.rfind("<think>")
        if opened >= 0 and "</think>" not in prompt_suffix[opened:]:
            text = "<think>" + text  # the generation prompt opened the thinking block
        found = _auto_with_parts(text, tags, prompt_suffix, whole)
    else:
        found = _strict(text, style, tags, prompt_suffix)
    if found.answer is None and last_number and found.rule in ("no_answer",):
        number = _last_number(text)
        if number is not None:
            return Extracted(number, "last_number")
    return found


def _auto_with_parts(text: str, tags, prompt_suffix: str, whole: bool) -> Extracted:
    body = after_thinking(text)
    if body is None:
        return Extracted(None, "unfinished_think")
    parts = part_spans(body)
    if parts:
        answers = [_auto(p, tags, prompt_suffix, whole).answer for p in parts]
        if all(a is not None for a in answers):
            return Extracted(", ".join(answers), "parts")
    return _auto(body, tags, prompt_suffix, whole)


def _strict(text: str, style: str, tags, prompt_suffix: str) -> Extracted:
    if style == "boxed":
        return _boxed(text, group=False)
    if style == "tags":
        seen, content = _tags(text, tags, prompt_suffix)
        return Extracted(content, "tags") if seen else Extracted(None, "no_answer")
    fn = {"final_answer": _final_answer, "dapo": _dapo, "gsm8k": _gsm8k}[style]
    value = fn(text)
    rule = {"final_answer": "final_answer", "dapo": "answer_line", "gsm8k": "gsm8k"}[style]
    return Extracted(value, rule) if value is not None else Extracted(None, "no_answer")


def extract_answer(
    text: str,
    style: str = "auto",
    *,
    tags=DEFAULT_TAGS,
    last_number: bool = False,
    prompt: str | None = None,
    prompt_suffix: str = "",
) -> str | None:
    """The final answer in ``text`` by ``style``, or None (``extract_with_rule`` also says which rule).

    >>> extract_answer(r"so $x=2$ and \\boxed{\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> extract_answer("<SOLUTION>42</SOLUTION>", "tags")
    '42'
    >>> extract_answer("... 18 eggs.\\n#### 18", "gsm8k")
    '18'
    """
    return extract_with_rule(text, style, tags=tags, last_number=last_number, prompt=prompt,
                             prompt_suffix=prompt_suffix).answer
