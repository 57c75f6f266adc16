"""Loss masks from exact assistant spans, on the real Qwen vocabulary."""

import pytest

from posttrain.config import DataConfig, ReasoningMarkers
from posttrain.data.formats import standardize
from posttrain.data.templates import install_template, render_messages
from posttrain.data.tokenize import encode_messages, prepare_sft_data
from posttrain.errors import UserError
from posttrain.losses import IGNORE_INDEX

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, since 3+3=6."},
]


def targets(tok, ex):
    """Decoded runs of consecutive target tokens."""
    runs, cur = [], []
    for t, l in zip(ex["input_ids"], ex["labels"]):
        if l != IGNORE_INDEX:
            assert l == t
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


@pytest.fixture()
def tok(qwen_tok):
    import copy

    return copy.deepcopy(qwen_tok)


def test_chatml_multi_turn_trains_exactly_the_assistant_turns(tok):
    install_template(tok, "chatml")
    ex = encode_messages(tok, CHAT)
    assert targets(tok, ex) == ["It is 4.<|im_end|>\n", "6, since 3+3=6.<|im_end|>\n"]
    assert tok.eos_token == "<|im_end|>"  # the trained end-of-turn token is what generation stops on


def test_qwen3_template_trains_thinking_of_the_last_turn(tok):
    install_template(tok, "qwen3")
    chat = CHAT[:-1] + [{"role": "assistant", "content": "<think>add them</think>6."}]
    runs = targets(tok, encode_messages(tok, chat))
    assert runs[-1] == "<think>\nadd them\n</think>\n\n6.<|im_end|>\n"
    assert runs[0].startswith("It is 4.<|im_end|>")


def test_reasoning_template_on_a_base_tokenizer(tiny_qwen3_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen3_base)
    assert tok.chat_template is None and tok.eos_token == "<|endoftext|>"
    m = ReasoningMarkers()
    install_template(tok, "reasoning", m)
    prompt = render_messages(tok, CHAT[1:2], add_generation_prompt=True)
    assert prompt.endswith("What is 2+2?<start_working_out>")
    assert prompt.startswith("You are given a problem.\nThink about") and "<|endoftext|>What is" in prompt
    answer = "<start_working_out>2+2=4<end_working_out><SOLUTION>4</SOLUTION>"
    ex = encode_messages(tok, [CHAT[1], {"role": "assistant", "content": answer}])
    # the opener belongs to the generation prompt; everything after it, and the EOS, is trained
    assert targets(tok, ex) == ["2+2=4<end_working_out><SOLUTION>4</SOLUTION><|endoftext|>"]
    full = encode_messages(tok, [CHAT[1], {"role": "assistant", "content": answer}], train_on="all")
    assert full["labels"] == full["input_ids"]


def test_mask_is_exact_when_the_tokenizer_merges_across_the_boundary(tok):
    """'?<' style merges: a token that straddles the turn boundary is a target (it carries assistant text),
    and no token wholly inside the prompt is."""
    install_template(tok, "reasoning")
    msgs = [{"role": "user", "content": "x?"}, {"role": "assistant", "content": "<start_working_out>y"}]
    ex = encode_messages(tok, msgs)
    text = tok.apply_chat_template(msgs, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text.index("y<|im_end|>") if "y<|im_end|>" in text else text.rindex("y")
    for (s, e), label in zip(enc["offset_mapping"], ex["labels"]):
        assert (label != IGNORE_INDEX) == (e > start)


def test_sharegpt_aliases_are_standardized():
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
            {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "a"},
                               {"from": "gpt", "value": "b"}]}]
    out = standardize(rows, "auto")
    assert out[0]["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert [m["role"] for m in out[1]["messages"]] == ["system", "user", "assistant"]
    with pytest.raises(UserError, match="row 1: unknown role 'robot'"):
        standardize([{"messages": [{"role": "robot", "content": "x"}]}], "openai", source="f.jsonl")


def test_filters_numeric_answers_length_and_sampling(tok, tmp_path):
    from tests.conftest import write_jsonl

    rows = [{"problem": f"p{i}", "generated_solution": "<think>" + "word " * (3 + 80 * (i % 2)) + "</think>",
             "expected_answer": a} for i, a in enumerate(["3", "-2", "0.8960", "\\frac{1}{2}", "x+1", "7"])]
    path = write_jsonl(tmp_path / "omr.jsonl", rows)
    cfg = DataConfig(path=str(path), format="columns", template="reasoning", numeric_answer_only=True,
                     max_length=90, train_on="all", columns={"problem": "problem"})
    train, val, stats = prepare_sft_data(cfg, tok)
    assert stats.dropped_non_numeric == 2
    assert stats.dropped_too_long == 2  # rows 2 and 6 (1-based, as the file's lines) have the long solution
    assert [e["row"] for e in train] == [1, 3]
    cfg.drop_long = False
    with pytest.raises(UserError, match="omr.jsonl row 2: .* tokens exceeds data.max_length=90"):
        prepare_sft_data(cfg, tok)
    cfg.drop_long, cfg.max_length = True, 10
    with pytest.raises(UserError, match="no examples left after filtering"):
        prepare_sft_data(cfg, tok)


def test_bad_data_errors_name_file_and_column(tok, tmp_path):
    from tests.conftest import write_jsonl

    with pytest.raises(UserError, match="file not found: .*missing.jsonl"):
        prepare_sft_data(DataConfig(path=str(tmp_path / "missing.jsonl")), tok)
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "reply": "r"}])
    with pytest.raises(UserError, match="column 'prompt' not found"):
        prepare_sft_data(DataConfig(path=str(path), format="prompt_completion"), tok)
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(UserError, match="bad.jsonl:2: not valid JSON"):
        prepare_sft_data(DataConfig(path=str(tmp_path / "bad.jsonl")), tok)


def test_base_model_without_chat_template_is_a_clear_error(tiny_qwen3_base, tmp_path):
    from transformers import AutoTokenizer

    from tests.conftest import write_jsonl

    tok = AutoTokenizer.from_pretrained(tiny_qwen3_base)
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    with pytest.raises(UserError, match="no chat template .*set data.template to chatml, qwen3 or reasoning"):
        prepare_sft_data(DataConfig(path=str(path)), tok)
