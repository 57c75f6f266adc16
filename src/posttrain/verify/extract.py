"""Final-answer extraction from a completion, by a named style.

Styles: ``boxed`` (last complete ``\\boxed{}``/``\\fbox{}``, brace-matched), ``tags`` (last
``<SOLUTION>…</SOLUTION>`` or ``<answer>…</answer>``; configurable), ``gsm8k`` (``#### N``),
``final_answer`` ("The final answer is …", Minerva's format), ``dapo`` (DAPO's ``Answer: …`` line), and
``auto`` (that order, boxed first). A last-number fallback runs only when ``last_number=True``.

Rules: a truncated box (the text ends inside it) or an empty box yields no answer; an earlier box does not
stand in for it, because the model's final answer is the one it was writing. Only the completion is
searched: when ``prompt`` is given and the text starts with it, the prompt part is cut off first, so a
number or box copied from the problem is never taken as the answer. Every scan is linear in the text.
"""

from __future__ import annotations

import re

STYLES = ("auto", "boxed", "tags", "gsm8k", "final_answer", "dapo")
DEFAULT_TAGS = (("<SOLUTION>", "</SOLUTION>"), ("<answer>", "</answer>"))

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_BRACE_RE = re.compile(r"\\.|[{}]", re.DOTALL)
_GSM8K_RE = re.compile(r"####\s*([^\n]*)")
_FINAL_RE = re.compile(r"(?i)(?:final answer|the answer) is\s*:?\s*")
_DAPO_RE = re.compile(r"(?i)\banswer\s*:\s*([^\n]+)")
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


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


def find_boxes(text: str) -> tuple[list[str], bool]:
    """Contents of the top-level boxes in order, and whether the text ends inside an unclosed box."""
    out: list[str] = []
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
            out.append(text[i + 1 : close].strip())
            end = close + 1
        else:  # TeX form: \boxed 5
            m2 = re.match(r"[^\s$]+", text[i : i + 200])
            if m2 and i > m.end():
                out.append(m2.group(0))
                end = i + m2.end()
    return out, False


def last_boxed(text: str) -> str | None:
    boxes, truncated = find_boxes(text)
    if truncated or not boxes or not boxes[-1]:
        return None
    return boxes[-1]


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


def _final_answer(text: str) -> str | None:
    last = None
    for m in _FINAL_RE.finditer(text):
        last = m
    if last is None:
        return None
    rest = text[last.end() : last.end() + 1000]
    if rest.startswith("$"):
        dollars = "$$" if rest.startswith("$$") else "$"
        close = rest.find(dollars, len(dollars))
        if close > 0:
            return rest[len(dollars) : close].strip() or None
    rest = re.split(r"\n|\.\s*I hope it is correct|\.(?:\s|$)", rest, maxsplit=1)[0]
    return rest.strip().rstrip(".").strip() or None


def _dapo(text: str) -> str | None:
    last = None
    for m in _DAPO_RE.finditer(text):
        last = m
    if last is None:
        return None
    ans = last.group(1).strip().strip("$").strip().rstrip(".").strip()
    return ans or None


def _gsm8k(text: str) -> str | None:
    last = None
    for m in _GSM8K_RE.finditer(text):
        last = m
    if last is None:
        return None
    return last.group(1).strip().rstrip(".").strip() or None


def _last_number(text: str) -> str | None:
    last = None
    for m in _NUMBER_RE.finditer(text):
        last = m
    return last.group(0).rstrip(",") if last else None


def extract_answer(
    text: str,
    style: str = "auto",
    *,
    tags=DEFAULT_TAGS,
    last_number: bool = False,
    prompt: str | None = None,
    prompt_suffix: str = "",
) -> str | None:
    """The final answer in ``text`` by ``style``, or None.

    >>> extract_answer(r"so $x=2$ and \\boxed{\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> extract_answer("<SOLUTION>42</SOLUTION>", "tags")
    '42'
    >>> extract_answer("... 18 eggs.\\n#### 18", "gsm8k")
    '18'
    """
    if style not in STYLES:
        raise ValueError(f"unknown answer style {style!r}; choose one of {', '.join(STYLES)}")
    if not isinstance(text, str) or not text:
        return None
    if prompt and text.startswith(prompt):
        text = text[len(prompt) :]
    if style == "boxed" or (style == "auto" and _BOX_RE.search(text)):
        boxes, truncated = find_boxes(text)
        if boxes or truncated:
            return last_boxed(text)
        return _last_number(text) if last_number else None
    if style in ("tags", "auto"):
        seen, found = _tags(text, tags, prompt_suffix)
        if seen:
            return found
        if style == "tags":
            return _last_number(text) if last_number else None
    found = None
    if style in ("final_answer", "auto"):
        found = _final_answer(text)
    if style in ("dapo", "auto") and found is None:
        found = _dapo(text)
    if style in ("gsm8k", "auto") and found is None:
        found = _gsm8k(text)
    if found is None and last_number:
        found = _last_number(text)
    return found
