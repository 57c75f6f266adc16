"""Published reference numbers stand beside ours with a mark wherever the comparison is not like for like:
another protocol, a protocol only approximately the published one, another test set (MATH-500 against the full
MATH test set), or a subset of the test set."""

from __future__ import annotations

from posttrain.evaluation.protocols import PROTOCOLS
from posttrain.evaluation.references import REFERENCES, marks, reference_table, references_for


def ref(model: str, test_set: str):
    return next(r for r in REFERENCES if r.model == model and r.test_set == test_set)


def test_the_issue_numbers_are_in_the_table():
    got = {(r.model, r.test_set): r.accuracy for r in REFERENCES}
    assert got[("DeepSeekMath-Base 7B", "gsm8k")] == 64.2 and got[("DeepSeekMath-Base 7B", "math")] == 36.2
    assert got[("DeepSeekMath-Instruct 7B", "gsm8k")] == 82.9 and got[("DeepSeekMath-Instruct 7B", "math")] == 46.8
    assert got[("DeepSeekMath-RL 7B", "gsm8k")] == 88.2 and got[("DeepSeekMath-RL 7B", "math")] == 51.7
    assert got[("Qwen3-4B-Base", "gsm8k")] == 87.79 and got[("Qwen3-4B-Base", "math")] == 54.10
    assert all(r.protocol is None or r.protocol in PROTOCOLS for r in REFERENCES)
    assert all(r.source for r in REFERENCES)


def test_same_protocol_and_whole_test_set_is_like_for_like():
    assert marks(ref("DeepSeekMath-Base 7B", "gsm8k"), "gsm8k", 1319, "gsm8k-8shot") == []
    assert marks(ref("DeepSeekMath-RL 7B", "gsm8k"), "gsm8k", 1319, "boxed-0shot") == []


def test_each_difference_is_marked():
    dsm_math = ref("DeepSeekMath-Base 7B", "math")
    assert marks(dsm_math, "math500", 500, "math-4shot") == ["≠ test set (MATH-500 vs MATH test, 5,000)"]
    assert marks(ref("DeepSeekMath-Base 7B", "gsm8k"), "gsm8k", 200, "gsm8k-8shot") == ["subset (200 of 1,319)"]
    qwen_gsm8k = marks(ref("Qwen3-4B-Base", "gsm8k"), "gsm8k", 1319, "gsm8k-8shot")
    assert qwen_gsm8k == ["≠ protocol (ours gsm8k-8shot, theirs 4-shot CoT)"]
    qwen_math = marks(ref("Qwen3-4B-Base", "math"), "math500", 500, "math-4shot")
    assert qwen_math[0].startswith("≈ protocol") and qwen_math[1].startswith("≠ test set (MATH-500")
    style = marks(ref("DeepSeekMath-Instruct 7B", "gsm8k"), "gsm8k", 1319, None)
    assert style == ["≠ protocol (ours a prompt style, theirs boxed-0shot)"]
    assert marks(dsm_math, "math500", 100, "gsm8k-8shot") == [
        "≠ protocol (ours gsm8k-8shot, theirs math-4shot)", "≠ test set (MATH-500 vs MATH test, 5,000)"]


def test_reference_table_rows_and_marks():
    table = reference_table("gsm8k", 1319, "gsm8k-8shot", model="Qwen/Qwen3-4B-Base")
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert len(rows) == len(references_for("gsm8k")) == 5
    assert rows["DeepSeekMath-Base 7B"].endswith("| yes |") and "| 64.2 |" in rows["DeepSeekMath-Base 7B"]
    assert "≠ protocol" in rows["Qwen3-4B-Base (same model)"]
    assert "≠ protocol (ours gsm8k-8shot, theirs boxed-0shot)" in rows["DeepSeekMath-RL 7B"]
    math = reference_table("math500", 500, "math-4shot")
    assert math.count("≠ test set (MATH-500 vs MATH test, 5,000)") == 4        # every MATH row is the full set
    assert reference_table("synthetic", 360, None) == "" and reference_table("aime24", 30, None) == ""
