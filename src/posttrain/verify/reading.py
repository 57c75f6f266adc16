"""What each side of a pair says: the gold's answer and the prediction's final answer, as text.

The gold is authoritative and written the way datasets write answers: its boxes (all of them: several
boxes are one multi-part answer), a GSM8K ``#### N`` line, parts "(a) … (b) …", or else the whole string;
only a gold that reads as sentences goes through the free-text rules. The prediction goes through
``extract.extract_with_rule`` (``auto``), whose rule the verdict reports; when the gold has several parts,
all the prediction's boxes form its list. A prediction in sentences that no rule reads is taken whole (a
text answer such as "no solution").

Two spellings depend on the gold (docs/verifier.md):
* the decimal comma: ``1,22`` is 1.22 when the gold is one value and the comma cannot be a thousands
  separator (not 1-3 digits then exactly 3, or a leading 0); otherwise a comma separates answers;
* a multiple-choice gold (``\\text{(B)}``, ``C``) reads only the letter a prediction starts with
  (``(B) 3(1 + r/10)^x = 7``: the option and its text);
* a label after a number (``5 dogs``, ``12 m^2``, ``3 hours``) is dropped when the other side has no letters
  at all: a plain number cannot be compared with a labelled one any other way, and a variable is never
  dropped (single-letter units only from a fixed list, and only after a space).
"""

from __future__ import annotations

import re

from posttrain.verify.extract import (
    Extracted,
    extract_with_rule,
    find_boxes,
    looks_like_answer,
)
from posttrain.verify.freetext import MATH_WORDS, is_prose, part_spans

_DECIMAL_COMMA_RE = re.compile(r"\s*([-+]?)(\d+),(\d+)\s*")
_SHORT_UNITS = {"m", "s", "g", "h", "L", "l", "K", "N", "J", "W", "V", "A", "F", "C", "T", "B", "M"}
_UNIT_START_RE = re.compile(r"\s|(?=\\text\{|\{\s*~?\s*[A-Za-z]|\\AA|\\mu|\\Omega|\[)")
_UNIT_PIECE_RE = re.compile(
    r"\s*(?:(\\text\{[^{}]*\})|\{\s*~?\s*([A-Za-z]+)\s*\}|\\(?:AA|mu|Omega|ohm)(?![a-zA-Z])|([A-Za-z]{1,12})"
    r"|/|\\cdot(?![a-zA-Z])|\[[^\[\]]{0,20}\])(?:\s*\^\s*(?:\{\s*-?\d+\s*\}|-?\d))?")
_E_NOTATION_RE = re.compile(r"(?<=\d)[eE](?=[-+]?\d)")
_LETTER_RE = re.compile(r"[A-Za-z]")
_CMD_RE = re.compile(r"\\[a-zA-Z]+")


def _boxes(s: str, depth: int = 0) -> list[str] | None:
    """All boxes of ``s`` (``\\boxed{\\boxed{4}}`` unwrapped), [] when truncated, None when there is none."""
    if "\\boxed" not in s and "\\fbox" not in s:
        return None
    boxes, truncated = find_boxes(s)
    if truncated or not boxes:
        return []
    if depth < 4 and len(boxes) == 1 and ("\\boxed" in boxes[0] or "\\fbox" in boxes[0]):
        return _boxes(boxes[0], depth + 1)
    return boxes


def read_gold(gold: str) -> tuple[str, bool]:
    """(the gold answer text, whether it has several parts)."""
    boxes = _boxes(gold)
    if boxes is not None:
        return ", ".join(boxes), len(boxes) > 1
    if "####" in gold:
        found = extract_with_rule(gold, "gsm8k")
        if found.answer is not None:
            return found.answer, False
    parts = part_spans(gold)
    if parts and all(p.strip() for p in parts):
        answers = [extract_with_rule(p).answer for p in parts]
        if all(a is not None for a in answers):
            return ", ".join(answers), True
    if "\n" in gold.strip() or (len(gold) < 4000 and is_prose(gold) and not looks_like_answer(gold)):
        found = extract_with_rule(gold, whole=False)
        if found.answer is not None:
            return found.answer, False
    return gold, False


def read_prediction(prediction: str, gold_multi: bool) -> Extracted:
    """The prediction's answer and the rule that found it."""
    if gold_multi:
        boxes = _boxes(prediction)
        if boxes is not None:
            return Extracted(", ".join(boxes), "boxes") if boxes else Extracted(None, "truncated_box")
    found = extract_with_rule(prediction)
    if found.answer is None:
        if found.rule == "no_answer" and prediction.strip():
            return Extracted(prediction.strip(), "whole")
        return found
    inner = _boxes(found.answer)  # \boxed{\boxed{4}}
    if inner:
        return Extracted(", ".join(inner), found.rule)
    return found


def decimal_comma(pred: str) -> str:
    """``1,22`` -> ``1.22`` when the comma cannot be a thousands separator (the caller checks the gold)."""
    m = _DECIMAL_COMMA_RE.fullmatch(pred)
    if not m:
        return pred
    sign, left, right = m.groups()
    if 1 <= len(left) <= 3 and len(right) == 3 and not (left.startswith("0")):
        return pred  # 1,234: a thousands separator
    return f"{sign}{left}.{right}"


def letter_free(norm: str) -> bool:
    """No letters outside LaTeX commands and e-notation: a plain number, fraction, radical..."""
    return _LETTER_RE.search(_CMD_RE.sub("", _E_NOTATION_RE.sub("", norm))) is None


def _units_from(norm: str, pos: int) -> bool:
    """Is ``norm[pos:]`` all unit pieces (``\text{ kcal} m^{-2} \text{yr}^{-1}``, ``{~J}``, ``rad / s``)?"""
    words = 0
    while pos < len(norm) and norm[pos:].strip(" ."):
        m = _UNIT_PIECE_RE.match(norm, pos)
        if not m or m.end() == pos:
            return False
        word = m.group(3)
        if word is not None:
            if word.lower() in MATH_WORDS or (len(word) == 1 and word not in _SHORT_UNITS):
                return False  # 2 \pi, 2 i, 5 x: not a unit
            words += 1
        elif m.group(1) or m.group(2) or "\\" in m.group(0):
            words += 1
        pos = m.end()
    return words > 0


def strip_label(norm: str) -> str:
    """``5 dogs`` -> ``5``, ``12 m^2`` -> ``12``, ``11000 \text{kcal} m^{-2} \text{yr}^{-1}`` -> ``11000``: the
    units or label after the last number (see the module doc); a letter glued to the number stays."""
    if len(norm) > 2000:
        return norm
    for m in re.finditer(r"[\d})](?=\s|\\text\{|\{|\\AA|\\mu|\\Omega|\[)", norm):
        start = m.end()
        if _UNIT_START_RE.match(norm, start) and _units_from(norm, start):
            return norm[:start].rstrip()
    return norm


_CHOICE_RE = re.compile(r"\(?([A-E])\)?")
_LEADING_CHOICE_RE = re.compile(r"(?:\\text\{\s*)?\(([A-E])\)\}?\s+\S")


def choice_letter(pred: str, gold: str) -> str:
    """``(B) 3(1 + r/10)^x = 7`` -> ``(B)`` when the gold is a choice letter (see the module doc)."""
    if not _CHOICE_RE.fullmatch(gold.replace("\\text{", "").replace("}", "").strip()):
        return pred
    m = _LEADING_CHOICE_RE.match(pred)
    return f"({m.group(1)})" if m else pred
