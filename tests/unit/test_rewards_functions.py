"""Built-in rewards: the Unsloth preset's exact scores, generation-prompt awareness (the seeds' bug),
math_accuracy, boxed_format, think_format, soft_overlong."""

import random
import re

import pytest

from posttrain.rewards import generation_suffix, get_reward_funcs
from posttrain.rewards.functions import BoxedFormat, MathAccuracy, SoftOverlong, ThinkFormat
from posttrain.rewards.unsloth import AnswerTiers, FormatApprox, FormatExact, NumberMatch
from posttrain.verify import Verdict, default_pool

RS, RE, SS, SE = "<start_working_out>", "<end_working_out>", "<SOLUTION>", "</SOLUTION>"
SYSTEM = ("You are given a problem.\nThink about the problem and provide your working out.\n"
          f"Place it between {RS} and {RE}.\nThen, provide your solution between {SS}{SE}")
TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + eos_token }}"
    "{% set loop_messages = messages[1:] %}{% else %}{{ 'SYSTEM' + eos_token }}{% set loop_messages = messages %}"
    "{% endif %}{% for message in loop_messages %}{% if message['role'] == 'user' %}{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'OPENER' }}{% endif %}"
)


def make_tokenizer(opener):
    """A real HF tokenizer carrying the seeds' reasoning chat template (generation prompt = opener)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0, "<|endoftext|>": 1}, unk_token="<unk>")),
                                  eos_token="<|endoftext|>", unk_token="<unk>")
    tok.chat_template = TEMPLATE.replace("OPENER", opener)
    return tok


# ---------------------------------------------------------------- upstream reference (seed_notebooks.md §3), verbatim logic
UP_FORMAT = re.compile(rf"{RE}.*?{SS}(.+?){SE}[\s]{{0,}}(?:<\|endoftext\|>)?[\s]{{0,}}$", re.MULTILINE | re.DOTALL)
UP_NUMBERS = re.compile(SS + r".*?[\s]{0,}([-]?[\d\.\,]{1,})", re.MULTILINE | re.DOTALL)


def up_exact(r):
    return 3.0 if UP_FORMAT.search(r) is not None else 0


def up_approx(r):
    return sum(0.5 if r.count(m) == 1 else -1.0 for m in (RE, SS, SE))


def up_check_answer(r, true_answer):
    m = UP_FORMAT.search(r)
    if m is None:
        return -2.0
    guess = m.group(1)
    if guess == true_answer:
        return 5.0
    if guess.strip() == true_answer.strip():
        return 3.5
    try:
        ratio = float(guess) / float(true_answer)
        if 0.9 <= ratio <= 1.1:
            return 2.0
        if 0.8 <= ratio <= 1.2:
            return 1.5
        return -2.5
    except Exception:  # noqa: BLE001 - upstream's bare except
        return -4.5


def up_check_numbers(r, true_answer):
    m = UP_NUMBERS.search(r)
    if m is None:
        return -2.5
    try:
        return 3.5 if float(m.group(1).strip().replace(",", "")) == float(true_answer.strip()) else -1.5
    except Exception:  # noqa: BLE001
        return 0


PIECES = ["think ", "6*7=42 ", RE, SS, SE, "42", " 42 ", "41", "35", "10", "abc", "1,234", "\n", "<|endoftext|>",
          " ", "x", "-3", "0.5", r"\frac{1}{2}", "."]


def test_unsloth_preset_reproduces_upstream_scores_exactly():
    rng = random.Random(0)
    completions = [f"Let me think{RE}{SS}42{SE}", f"{RE}{SS}42{SE}\nextra", f"{RE}{SS}42{SE} extra", ""]
    completions += ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, 12))) for _ in range(400)]
    answers = [rng.choice(["42", "1234", "0", "-3", "abc", "0.5"]) for _ in completions]
    prompts = [f"{SYSTEM}<|endoftext|>What is 6*7?{RS}"] * len(completions)  # the rendered upstream prompt
    fe, fa, at, nm = get_reward_funcs(["unsloth_math"])
    assert [f.__name__ for f in (fe, fa, at, nm)] == ["format_exact", "format_approx", "answer_tiers", "number_match"]
    kw = {"answer": answers}
    assert fe(prompts, completions, **kw) == [up_exact(c) for c in completions]
    assert fa(prompts, completions, **kw) == [up_approx(c) for c in completions]
    assert at(prompts, completions, **kw) == [up_check_answer(c, a) for c, a in zip(completions, answers)]
    assert nm(prompts, completions, **kw) == [up_check_numbers(c, a) for c, a in zip(completions, answers)]


@pytest.mark.parametrize(
    "completion,answer,tiers,numbers",
    [
        (f"w{RE}{SS}42{SE}", "42", 5.0, 3.5),
        (f"w{RE}{SS} 42 {SE}", "42", 3.5, 3.5),
        (f"w{RE}{SS}41{SE}", "42", 2.0, -1.5),
        (f"w{RE}{SS}35{SE}", "42", 1.5, -1.5),
        (f"w{RE}{SS}10{SE}", "42", -2.5, -1.5),
        (f"w{RE}{SS}abc{SE}", "42", -4.5, -2.5),
        (f"w{RE}{SS}1{SE}", "0", -4.5, -1.5),
        (f"w{RE}{SS}1,234{SE}", "1234", -4.5, 3.5),
        (f"w{RE}{SS}" + r"\frac{1}{2}" + SE, "0.5", -4.5, -1.5),
        ("no format at all 42", "42", -2.0, -2.5),
        (f"w{RE}{SS}42{SE}", r"\frac{1}{2}", -4.5, 0.0),
    ],
)
def test_answer_tiers_and_number_match_table(completion, answer, tiers, numbers):
    prompts = [f"Q{RS}"]
    assert AnswerTiers()(prompts, [completion], answer=[answer]) == [tiers]
    assert NumberMatch()(prompts, [completion], answer=[answer]) == [numbers]


def test_format_rewards_see_the_opener_of_the_upstream_template():
    tok = make_tokenizer(RS)
    assert generation_suffix(tok) == RS
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 6*7?"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    good = f"6*7 = 42{RE}{SS}42{SE}"
    # string prompts (rendered), message prompts with the suffix, and message prompts without it all score 3
    assert FormatExact()([rendered], [good]) == [3.0]
    assert FormatExact(prompt_suffix=generation_suffix(tok))([msgs], [[{"role": "assistant", "content": good}]]) == [3.0]
    assert FormatExact()([msgs], [good]) == [3.0]
    # a prompt known to open nothing: the model had to write the opener itself
    assert FormatExact()(["What is 6*7?"], [good]) == [0.0]
    assert FormatExact()(["What is 6*7?"], [RS + good]) == [3.0]


def test_seeds_project_bug_is_fixed_with_the_think_template():
    """The project's 3-part notebook: the generation prompt appends <think>; TRL passes only the
    generated text, so its regex (which starts at <think>) never matched and format scored 0 always."""
    tok = make_tokenizer("<think>")
    suffix = generation_suffix(tok)
    assert suffix == "<think>"
    msgs = [{"role": "system", "content": "3-part system prompt"}, {"role": "user", "content": "What is 6*7?"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    completion = "6*7 is 42</think><response>It is 42.</response><SOLUTION>42</SOLUTION>"
    project_regex = re.compile(r"<think>.*?</think>\s*<response>.*?</response>\s*<SOLUTION>(.+?)</SOLUTION>\s*$", re.DOTALL)
    assert project_regex.search(completion) is None  # the bug: the opener is in the prompt, not the completion
    markers = dict(reasoning_start="<think>", reasoning_end="</think>")
    assert FormatExact(**markers)([rendered], [completion]) == [3.0]
    assert FormatExact(prompt_suffix=suffix, **markers)([msgs], [completion]) == [3.0]
    assert AnswerTiers(**markers)([rendered], [completion], answer=["42"]) == [5.0]
    assert ThinkFormat()([rendered], [completion]) == [1.0]
    assert ThinkFormat(prompt_suffix=suffix)([msgs], [completion]) == [1.0]
    # a second opener in the completion is not a clean think block
    assert ThinkFormat()([rendered], ["<think>again</think> 42"]) == [0.0]


def test_format_approx_counts_an_opener_the_prompt_opened():
    # the generation prompt opened <SOLUTION>: the completion's single </SOLUTION> closes it
    assert FormatApprox(prompt_suffix=SS)([None], [f"{RE}?{SE}"]) == [0.5 + 0.5 + 0.5]
    assert FormatApprox()([f"Q{SS}"], [f"{RE}?{SE}"]) == [0.5 + 0.5 + 0.5]  # found at the end of the prompt
    assert FormatApprox()(["Q"], [f"{RE}?{SE}"]) == [0.5 - 1.0 + 0.5]
    assert FormatApprox()([f"x{RS}"], [f"{RE}{SS}1{SE}{SE}"]) == [0.5 + 0.5 - 1.0]


@pytest.fixture(scope="module")
def pool():
    return default_pool()


def test_math_accuracy(pool):
    acc = MathAccuracy(pool=pool)
    comps = [r"so \boxed{\frac{1}{2}}", r"\boxed{3}", "I give up", r"\boxed{0.5}", r"answer \boxed{1",
             [{"role": "assistant", "content": r"\boxed{\sin^2 x + \cos^2 x}"}], r"\boxed{7}"]
    golds = ["0.5", "4", "7", r"\frac12", "1", "1", r"\int"]
    out = acc([None] * len(comps), comps, answer=golds)
    assert out == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, None]
    m = acc.metrics()
    assert m["unparseable_gold"] == 1 and m["no_answer"] == 2 and m["timeouts"] == 0
    assert acc.metrics()["no_answer"] == 0  # metrics reset after reading


def test_math_accuracy_gold_columns_and_styles(pool):
    acc = MathAccuracy(pool=pool)
    assert acc(None, [r"\boxed{72}"], solution=["Natalia sold 48 ... #### 72"]) == [1.0]
    assert acc(None, [r"\boxed{72}"], reward_model=[{"ground_truth": "72", "style": "rule"}]) == [1.0]
    assert acc(None, [r"\boxed{}"], answer=[""]) == [None]
    dapo = MathAccuracy(style="dapo", pool=pool)
    assert dapo(None, ["work\nAnswer: 34"], answer=["34"]) == [1.0]
    tags = MathAccuracy(style="tags", pool=pool)
    assert tags(None, ["<SOLUTION>1,234</SOLUTION>"], answer=["1234"]) == [1.0]
    with pytest.raises(ValueError, match="gold answer column.*the batch has columns: question"):
        acc(None, [r"\boxed{1}"], question=["q"])


def test_math_accuracy_counts_timeouts():
    class StubPool:
        def verify_many(self, pairs, timeout=None):
            return [Verdict(False, "timeout") for _ in pairs]

    acc = MathAccuracy(pool=StubPool())
    assert acc(None, [r"\boxed{x}"] * 3, answer=["1"] * 3) == [0.0, 0.0, 0.0]
    assert acc.metrics()["timeouts"] == 3


def test_boxed_format():
    assert BoxedFormat()(None, [r"\boxed{1}", r"\boxed{}", r"\boxed{1", "none", r"\fbox{2}"]) == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_soft_overlong_matches_dapo_formula():
    so = SoftOverlong(max_length=100, cache_length=20)
    ids = [[0] * n for n in (10, 80, 90, 100, 101, 500)]
    assert so(None, ["x"] * 6, completion_ids=ids) == [0.0, 0.0, -0.5, -1.0, -1.0, -1.0]
    assert so(None, ["x"], completion_lengths=[85]) == [-0.25]
    with pytest.raises(ValueError, match="needs token lengths"):
        so(None, ["x"])
    with pytest.raises(ValueError, match="cache_length"):
        SoftOverlong(max_length=10, cache_length=20)


def test_answer_tiers_with_the_verifier_reads_answers_as_math_accuracy_does():
    prompts = [f"Q{RS}"] * 4
    comps = [f"w{RE}{SS}" + r"\frac{1}{2}" + SE, f"w{RE}{SS}1,234{SE}", f"w{RE}{SS}41{SE}", f"w{RE}{SS}42{SE}"]
    answers = ["0.5", "1234", "42", "42"]
    assert AnswerTiers()(prompts, comps, answer=answers) == [-4.5, -4.5, 2.0, 5.0]  # the notebook's scale
    assert AnswerTiers(verifier=True)(prompts, comps, answer=answers) == [3.5, 3.5, 2.0, 5.0]
    fe, fa, at, nm = get_reward_funcs([{"name": "unsloth_math", "verifier": True}])
    assert at(prompts, comps, answer=answers) == [3.5, 3.5, 2.0, 5.0]
    assert fe(prompts, comps, answer=answers) == FormatExact()(prompts, comps, answer=answers)


def test_math_accuracy_reads_free_text_and_counts_it(pool):
    acc = MathAccuracy(pool=pool)
    comps = ["Therefore the largest n is 34.", r"We find $a+b = -1+5 = 4$.", "<think>so \\boxed{4}", r"\boxed{4}"]
    assert acc(None, comps, answer=["34", "4", "4", "4"]) == [1.0, 1.0, 0.0, 1.0]
    m = acc.metrics()
    assert m["free_text"] == 2 and m["no_answer"] == 1
    assert MathAccuracy(style="boxed", pool=pool)(None, comps[:2], answer=["34", "4"]) == [0.0, 0.0]
