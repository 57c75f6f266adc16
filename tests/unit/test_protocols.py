"""Published evaluation protocols render as documented (exemplars in order, their layout, the problem last),
stop and budget as the published harnesses, read the exemplars' own answers back, and never take an exemplar
from a test split. Tokenizers: Qwen's real vocabulary as a base model (no chat template) and as an instruct model
(Qwen3's chat template)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import get_args

import pytest
from pydantic import ValidationError

from posttrain.config import EvalConfig
from posttrain.errors import UserError
from posttrain.evaluation.fewshot import GSM8K_8SHOT_COT, GSM8K_TRAIN_FIRST_5, MINERVA_MATH_4SHOT
from posttrain.evaluation.prompts import BOXED_INSTRUCTION, extract
from posttrain.evaluation.protocols import PROTOCOLS, answer_rules, get_protocol, prompt_text, render, resolve
from posttrain.verify import verify

SHARED = Path(__file__).resolve().parents[3] / "shared" / "benchmarks"
PROBLEM = "Tom has 3 apples and buys 4 more. How many apples does he have?"


@pytest.fixture(scope="module")
def base_tok():
    from posttrain.tiny import qwen_tokenizer

    return qwen_tokenizer(base=True)


@pytest.fixture(scope="module")
def chat_tok():
    from posttrain.tiny import qwen_tokenizer

    return qwen_tokenizer(base=False)


def test_config_offers_exactly_the_shipped_protocols():
    literal = next(a for a in get_args(EvalConfig.model_fields["protocol"].annotation) if get_args(a))
    assert set(get_args(literal)) == set(PROTOCOLS)


def test_gsm8k_8shot_is_deepseekmaths_plain_prompt(base_tok, chat_tok):
    text = render(base_tok, PROBLEM, get_protocol("gsm8k-8shot"))
    blocks = text.split("\n\n\n")                      # DeepSeekMath's separator between exemplars
    assert len(blocks) == 9
    for block, shot in zip(blocks, GSM8K_8SHOT_COT):
        assert block == f"Q: {shot.question}\nA: {shot.answer}"
    assert blocks[-1] == f"Q: {PROBLEM}\nA:"
    assert [re.search(r"The answer is (\d+)\.$", b).group(1) for b in blocks[:8]] == \
        ["6", "5", "39", "8", "9", "29", "33", "8"]
    assert blocks[0].startswith("Q: There are 15 trees in the grove.")
    # a base-model protocol: plain text even when the tokenizer has a chat template
    assert render(chat_tok, PROBLEM, get_protocol("gsm8k-8shot")) == text
    style, stops = answer_rules(EvalConfig(protocol="gsm8k-8shot"))
    assert stops == ["\nQ:"] and style.answer_style == "final_answer"
    settings = resolve(EvalConfig(protocol="gsm8k-8shot"))
    assert settings.max_new_tokens == 1024 and settings.last_number is True


def test_math_4shot_is_the_minerva_prompt(base_tok):
    text = render(base_tok, PROBLEM, get_protocol("math-4shot"))
    assert text.startswith("Problem:\nFind the domain of the expression $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.}\n\n"
                           "Solution:\nThe expressions inside each square root must be non-negative.")
    assert text.endswith(f"I hope it is correct.\n\nProblem:\n{PROBLEM}\n\nSolution:")
    assert text.count("Problem:\n") == 5 and text.count("\n\nSolution:\n") == 4
    finals = re.findall(r"Final Answer: The final answer is \$(.+?)\$\. I hope it is correct\.", text)
    assert finals == ["[2,5)", "24", "16", "-\\frac{2}{3}"]
    assert "30n&=480\\\\\n\\Rightarrow" in text          # the LaTeX line break survives as two backslashes
    assert answer_rules(EvalConfig(protocol="math-4shot"))[1] == ["\nProblem:"]


def test_boxed_0shot_chat_and_plain(base_tok, chat_tok):
    p = get_protocol("boxed-0shot")
    chat = render(chat_tok, PROBLEM, p)
    expected = chat_tok.apply_chat_template([{"role": "user", "content": f"{PROBLEM}\n{BOXED_INSTRUCTION}"}],
                                            tokenize=False, add_generation_prompt=True)
    assert chat == expected and chat.count("<|im_start|>user") == 1
    assert render(base_tok, PROBLEM, p) == f"User: {PROBLEM}\n{BOXED_INSTRUCTION}\n\nAssistant:"
    assert answer_rules(EvalConfig(protocol="boxed-0shot"))[1] == []          # the model's EOS only


def test_lighteval_5shot_as_chat_turns_and_as_plain_text(base_tok, chat_tok):
    p = get_protocol("lighteval-gsm8k-5shot")
    chat = render(chat_tok, PROBLEM, p)
    assert chat.count("<|im_start|>user\nQuestion: ") == 6 and chat.count("<|im_start|>assistant\n") == 6
    for shot in GSM8K_TRAIN_FIRST_5:
        assert f"<|im_start|>user\nQuestion: {shot.question}\nAnswer:<|im_end|>" in chat
        assert shot.answer.split("\n")[-1] in chat                           # the "#### N" line
    assert chat.endswith(f"Question: {PROBLEM}\nAnswer:<|im_end|>\n<|im_start|>assistant\n")
    plain = render(base_tok, PROBLEM, p)
    assert plain.split("\n\n")[0] == f"Question: {GSM8K_TRAIN_FIRST_5[0].question}\nAnswer: " \
                                     f"{GSM8K_TRAIN_FIRST_5[0].answer}"
    assert plain.endswith(f"#### 624\n\nQuestion: {PROBLEM}\nAnswer:")
    assert answer_rules(EvalConfig(protocol="lighteval-gsm8k-5shot"))[1] == ["Question"]
    settings = resolve(EvalConfig(protocol="lighteval-gsm8k-5shot"))
    assert settings.max_new_tokens == 256 and settings.last_number is False


@pytest.mark.parametrize("name, shots, golds", [
    ("gsm8k-8shot", GSM8K_8SHOT_COT, ["6", "5", "39", "8", "9", "29", "33", "8"]),
    ("math-4shot", MINERVA_MATH_4SHOT, ["[2,5)", "24", "16", "-\\frac{2}{3}"]),
    ("lighteval-gsm8k-5shot", GSM8K_TRAIN_FIRST_5, ["72", "10", "5", "42", "624"]),
])
def test_each_protocol_reads_its_own_exemplars_answers(name, shots, golds):
    style, _ = answer_rules(EvalConfig(protocol=name))
    for shot, gold in zip(shots, golds, strict=True):
        got = extract(shot.answer, style)
        assert got is not None and verify(got, gold).equal, (got, gold)


def test_boxed_reading_and_its_last_number_fallback():
    style, _ = answer_rules(EvalConfig(protocol="boxed-0shot"))
    assert extract("so 3 + 4 = 7 and \\boxed{7}.", style) == "7"
    assert extract("so 3 + 4 = 7.", style) is None                           # not format compliant ...
    assert extract("so 3 + 4 = 7.", style, last_number=True) == "7"          # ... but the fallback reads it


def test_formats_can_be_forced_and_bad_combinations_are_refused(base_tok, chat_tok):
    lighteval = get_protocol("lighteval-gsm8k-5shot")
    assert "<|im_start|>" not in render(chat_tok, PROBLEM, lighteval, template="plain")
    from posttrain.tiny import qwen_tokenizer

    fresh = qwen_tokenizer(base=True)          # template chatml installs itself into the tokenizer it renders with
    forced = render(fresh, PROBLEM, get_protocol("gsm8k-8shot"), template="chatml")
    assert forced.count("<|im_start|>user\nQ: ") == 9 and forced.count("<|im_start|>assistant\n") == 9
    with pytest.raises(UserError, match="template reasoning is for prompt reasoning"):
        render(chat_tok, PROBLEM, lighteval, template="reasoning")
    with pytest.raises(UserError, match="no system prompt"):
        render(base_tok, PROBLEM, get_protocol("gsm8k-8shot"), system_prompt="be brief")
    with pytest.raises(UserError, match="no chat template"):
        render(base_tok, PROBLEM, lighteval, template="tokenizer")
    with pytest.raises(ValidationError, match="prompt and protocol are both set"):
        EvalConfig(protocol="gsm8k-8shot", prompt="boxed")
    with pytest.raises(ValidationError, match="template plain renders a protocol"):
        EvalConfig(template="plain")
    explicit = resolve(EvalConfig(protocol="gsm8k-8shot", max_new_tokens=7, last_number=False))
    assert explicit.max_new_tokens == 7 and explicit.last_number is False     # given values win
    assert resolve(EvalConfig()).max_new_tokens == 1024                       # no protocol: untouched
    assert EvalConfig(protocol="math-4shot").fingerprint()["protocol"] == "math-4shot"  # eval_config.json has it
    assert "protocol" not in EvalConfig().to_dict()           # earlier runs' saved settings still compare equal
    assert prompt_text(chat_tok, PROBLEM, EvalConfig(protocol="boxed-0shot")) == render(
        chat_tok, PROBLEM, get_protocol("boxed-0shot"))


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs shared/benchmarks (the public test sets)")
def test_no_exemplar_comes_from_a_test_split():
    def texts(name, field):
        return {json.loads(line)[field].strip() for line in (SHARED / name).read_text().splitlines() if line.strip()}

    gsm8k_test = texts("gsm8k.jsonl", "question")
    math_test = texts("math500.jsonl", "problem") | texts("minerva_math.jsonl", "problem")
    assert len(gsm8k_test) > 1000 and len(math_test) > 700
    for shot in (*GSM8K_8SHOT_COT, *GSM8K_TRAIN_FIRST_5):
        assert shot.question.strip() not in gsm8k_test
    for shot in MINERVA_MATH_4SHOT:
        assert shot.question.strip() not in math_test
