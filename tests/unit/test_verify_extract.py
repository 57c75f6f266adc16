"""Answer extraction by style: boxes with brace matching, tags, GSM8K, final answer, DAPO, fallbacks."""

import time

import pytest

from posttrain.verify import extract_answer
from posttrain.verify.extract import find_boxes


@pytest.mark.parametrize(
    "text,style,expected",
    [
        (r"so $x = \boxed{\frac{1}{2}}$.", "boxed", r"\frac{1}{2}"),
        (r"first \boxed{3}, on reflection \boxed{5}", "boxed", "5"),
        (r"\boxed{\left\{1, 2\right\}}", "boxed", r"\left\{1, 2\right\}"),
        (r"\boxed{a_{n}^{2}}", "boxed", r"a_{n}^{2}"),
        (r"escaped braces \boxed{\{1,\}2\}}", "boxed", r"\{1,\}2\}"),
        (r"\fbox{7}", "boxed", "7"),
        (r"TeX style: \boxed 5$", "boxed", "5"),
        (r"\boxed{}", "boxed", None),
        (r"\boxed{  }", "boxed", None),
        (r"\boxed{3} and then \boxed{\frac{1}{", "boxed", None),
        ("no box here 42", "boxed", None),
        ("<SOLUTION>42</SOLUTION>", "tags", "42"),
        ("<answer> 7 </answer>", "tags", "7"),
        ("<SOLUTION>1</SOLUTION> retry <SOLUTION>2</SOLUTION>", "tags", "2"),
        ("<SOLUTION>1</SOLUTION> retry <SOLUTION>2", "tags", None),
        ("<SOLUTION></SOLUTION>", "tags", None),
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "gsm8k", "72"),
        ("#### 1,234", "gsm8k", "1,234"),
        ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "final_answer", r"\frac{3}{4}"),
        ("The final answer is 12.", "final_answer", "12"),
        ("Step 1...\nAnswer: 34", "dapo", "34"),
        ("Answer: $-7$", "dapo", "-7"),
        ("the result is 3 and then 17 apples", "auto", None),
    ],
)
def test_styles(text, style, expected):
    assert extract_answer(text, style) == expected


def test_auto_order_prefers_box_then_tags_then_phrases():
    assert extract_answer(r"<answer>1</answer> \boxed{2}") == "2"
    assert extract_answer("<answer>1</answer> Answer: 3") == "1"
    assert extract_answer("The final answer is 4. #### 5") == "4"
    assert extract_answer("Answer: 6\n#### 7") == "6"
    assert extract_answer("#### 8") == "8"
    # a truncated box means no answer: an earlier box or a later phrase does not stand in for it
    assert extract_answer(r"\boxed{1} ... \boxed{2") is None


def test_last_number_fallback_only_when_asked():
    text = "so we get 3 apples and 1,250 pears"
    assert extract_answer(text) is None
    assert extract_answer(text, last_number=True) == "1,250"
    assert extract_answer("no box, 12", "boxed", last_number=True) == "12"
    assert extract_answer("no box", "boxed", last_number=True) is None


def test_prompt_text_is_never_the_answer():
    prompt = r"Problem: simplify \boxed{x^2 - 1} over x - 1. The value 17 appears here."
    completion = " I could not finish"
    assert extract_answer(prompt + completion, prompt=prompt) is None
    assert extract_answer(prompt + completion, prompt=prompt, last_number=True) is None
    assert extract_answer(prompt + r" so \boxed{x+1}", prompt=prompt) == "x+1"


def test_tag_opened_by_the_generation_prompt():
    # the chat template's generation prompt ended with <SOLUTION>: the completion starts inside the tag
    assert extract_answer("42</SOLUTION>", "tags", prompt_suffix="<SOLUTION>") == "42"
    assert extract_answer("42</SOLUTION>", "tags") is None
    assert extract_answer("still thinking", "tags", prompt_suffix="<SOLUTION>") is None


def test_custom_tags():
    tags = [("[[", "]]")]
    assert extract_answer("work [[9]]", "tags", tags=tags) == "9"


def test_unknown_style_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown answer style 'latex'.*boxed"):
        extract_answer("x", "latex")


def test_non_string_input_gives_none():
    assert extract_answer(None) is None
    assert extract_answer("") is None


def test_find_boxes_reports_truncation():
    assert find_boxes(r"\boxed{1} \boxed{2}") == (["1", "2"], False)
    assert find_boxes(r"\boxed{1} \boxed{\frac{2}") == (["1"], True)


@pytest.mark.parametrize(
    "junk",
    [r"\boxed{" * 5000, "{" * 100_000, "x" * 100_000 + r"\boxed{1}", ("#### " + "9" * 50 + "\n") * 2000,
     "Answer: " * 20_000, "<SOLUTION>" * 20_000],
)
def test_pathological_text_is_linear(junk):
    t = time.perf_counter()
    for style in ("auto", "boxed", "tags", "gsm8k", "final_answer", "dapo"):
        extract_answer(junk, style, last_number=True)
    assert time.perf_counter() - t < 1.0
