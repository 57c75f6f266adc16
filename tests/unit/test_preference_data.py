"""Preference pairs: explicit and implicit prompts, text and messages, margins, what is dropped and counted, and
the errors that name the file, row and key. Real Qwen tokenizer (tiny model fixture), real files."""

from __future__ import annotations

import pytest

from posttrain.errors import UserError
from posttrain.preference.config import PreferenceDataConfig
from posttrain.preference.data import load_pairs, split_pairs, synthetic_pairs
from tests.conftest import write_jsonl

USER = [{"role": "user", "content": "What is 2 + 3?"}]
GOOD = [{"role": "assistant", "content": "2 + 3 = 5."}]
BAD = [{"role": "assistant", "content": "2 + 3 = 6."}]


def cfg(path="pairs.jsonl", **kw) -> PreferenceDataConfig:
    return PreferenceDataConfig(path=str(path), **kw)


def test_explicit_messages_split_prompt_and_answer_at_the_generation_prompt(qwen_tok):
    pair = load_pairs(cfg(), qwen_tok, rows=[{"prompt": USER, "chosen": GOOD, "rejected": BAD}]).pairs[0]
    full = qwen_tok.apply_chat_template(USER + GOOD, tokenize=False)
    assert pair.prompt_ids + pair.chosen_ids == qwen_tok(full, add_special_tokens=False)["input_ids"]
    assert qwen_tok.decode(pair.prompt_ids).endswith("<|im_start|>assistant\n")
    assert qwen_tok.decode(pair.chosen_ids).endswith("2 + 3 = 5.<|im_end|>\n")
    assert qwen_tok.decode(pair.rejected_ids).endswith("2 + 3 = 6.<|im_end|>\n")
    assert (pair.margin, pair.row) == (None, 1)


def test_implicit_and_string_prompts_give_the_same_pairs_as_explicit_messages(qwen_tok):
    explicit = load_pairs(cfg(), qwen_tok, rows=[{"prompt": USER, "chosen": GOOD, "rejected": BAD}]).pairs
    implicit = load_pairs(cfg(), qwen_tok, rows=[{"chosen": USER + GOOD, "rejected": USER + BAD}]).pairs
    as_text = load_pairs(cfg(), qwen_tok, rows=[{"prompt": USER[0]["content"], "chosen": GOOD, "rejected": BAD}]).pairs
    assert explicit == implicit == as_text


def test_ultrafeedback_rows_with_a_null_prompt_column_are_implicit(qwen_tok):
    """UltraFeedback-binarized: a prompt column and conversations that repeat it; columns.prompt null reads the
    conversations alone (an explicit prompt would put the user turn in twice)."""
    explicit = load_pairs(cfg(), qwen_tok, rows=[{"prompt": USER, "chosen": GOOD, "rejected": BAD}]).pairs
    rows = [{"prompt": USER[0]["content"], "chosen": USER + GOOD, "rejected": USER + BAD, "score_chosen": 8.0}]
    assert load_pairs(cfg(columns={"prompt": None}), qwen_tok, rows=rows).pairs == explicit
    doubled = load_pairs(cfg(), qwen_tok, rows=rows).pairs[0]   # the default reads the prompt column too
    assert qwen_tok.decode(doubled.prompt_ids + doubled.chosen_ids).count(USER[0]["content"]) == 2


def test_text_pairs_get_eos_and_an_implicit_text_prompt_is_the_shared_tokens(qwen_tok):
    eos = qwen_tok.eos_token
    pair = load_pairs(cfg(), qwen_tok, rows=[{"prompt": "Q: 2+3?\nA:", "chosen": " 5", "rejected": " 6"}]).pairs[0]
    assert pair.prompt_ids + pair.chosen_ids == qwen_tok("Q: 2+3?\nA: 5" + eos, add_special_tokens=False)["input_ids"]
    assert qwen_tok.decode(pair.chosen_ids) == " 5" + eos
    implicit = load_pairs(cfg(), qwen_tok, rows=[{"chosen": "Q: 2+3?\nA: 5", "rejected": "Q: 2+3?\nA: 6"}]).pairs[0]
    assert implicit.prompt_ids + implicit.chosen_ids == pair.prompt_ids + pair.chosen_ids
    # Qwen splits digits off, so the shared tokens end with the space; the answers start where they differ
    assert qwen_tok.decode(implicit.prompt_ids) == "Q: 2+3?\nA: "
    assert qwen_tok.decode(implicit.chosen_ids) == "5" + eos and qwen_tok.decode(implicit.rejected_ids) == "6" + eos


def test_custom_columns_margin_and_role_aliases(qwen_tok):
    rows = [{"q": "hi", "good": [{"from": "gpt", "value": "hello"}], "bad": [{"role": "bot", "content": "go away"}],
             "m": 1.5}]
    columns = {"prompt": "q", "chosen": "good", "rejected": "bad", "margin": "m"}
    pair = load_pairs(cfg(columns=columns), qwen_tok, rows=rows).pairs[0]
    assert pair.margin == 1.5 and qwen_tok.decode(pair.chosen_ids).endswith("hello<|im_end|>\n")


def test_long_identical_and_empty_pairs_are_dropped_counted_and_the_first_row_named(qwen_tok):
    long = [{"role": "assistant", "content": "many words " * 200}]
    rows = [{"prompt": USER, "chosen": GOOD, "rejected": BAD},
            {"prompt": USER, "chosen": long, "rejected": BAD},
            {"prompt": USER, "chosen": GOOD, "rejected": GOOD},
            {"prompt": USER, "chosen": GOOD, "rejected": [{"role": "assistant", "content": "  "}]},
            {"prompt": USER, "chosen": BAD, "rejected": long}]
    data = load_pairs(cfg(max_length=64), qwen_tok, rows=rows)
    assert [p.row for p in data.pairs] == [1]
    assert data.dropped == {"too_long": 2, "identical": 1, "empty": 1}
    summary = data.summary()
    assert "5 rows of pairs.jsonl -> 1 pairs" in summary and "2 over data.max_length (first: row 2)" in summary
    assert "1 chosen equals rejected (first: row 3)" in summary and "1 an empty side (first: row 4)" in summary
    with pytest.raises(UserError, match="no pairs left.*2 over data.max_length"):
        load_pairs(cfg(max_length=64), qwen_tok, rows=rows[1:3] + rows[4:])


def test_a_huge_text_is_dropped_without_tokenizing_it_whole(qwen_tok):
    huge = "word " * 2_000_000  # 10 MB
    data = load_pairs(cfg(max_length=32), qwen_tok, rows=[{"prompt": "q", "chosen": "a", "rejected": "b"},
                                                          {"prompt": "q", "chosen": huge, "rejected": "b"}])
    assert data.dropped["too_long"] == 1 and len(data.pairs) == 1


def test_missing_columns_wrong_types_and_bad_margins_name_file_row_and_key(qwen_tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                              {"prompt": "q", "chosen": "a"}])
    with pytest.raises(UserError, match=r"p\.jsonl row 2: column 'rejected' not found .*set data\.columns"):
        load_pairs(cfg(path), qwen_tok)
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                              {"chosen": "a", "rejected": "b"}])
    with pytest.raises(UserError, match=r"q\.jsonl row 2: column 'prompt' not found.*every row needs one"):
        load_pairs(cfg(path), qwen_tok)
    bad_rows = {"margin": ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, r"'margin' is 'big'"),
                "types": ({"prompt": "q", "chosen": 3, "rejected": "b"}, r"'chosen' is int"),
                "mixed": ({"prompt": "q", "chosen": "a", "rejected": BAD}, "both be text or both be messages"),
                "role": ({"prompt": USER, "chosen": [{"role": "robot", "content": "x"}], "rejected": BAD},
                         "message 1 of 'chosen'")}
    for row, message in bad_rows.values():
        with pytest.raises(UserError, match=rf"row 1: .*{message}"):
            load_pairs(cfg(), qwen_tok, rows=[row])
    with pytest.raises(UserError, match=r"row 1: 'margin' is nan"):
        load_pairs(cfg(), qwen_tok, rows=[{"prompt": "q", "chosen": "a", "rejected": "b", "margin": float("nan")}])


def test_a_tokenizer_without_a_pad_token_is_refused(qwen_tok):
    import copy

    tok = copy.deepcopy(qwen_tok)
    tok.pad_token = None
    tok.eos_token = None
    with pytest.raises(UserError, match="no pad token"):
        load_pairs(cfg(), tok, rows=[{"prompt": "q", "chosen": "a", "rejected": "b"}])


def test_a_base_tokenizer_without_a_chat_template_needs_one_for_messages(qwen_tok):
    import copy

    tok = copy.deepcopy(qwen_tok)
    tok.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        load_pairs(cfg(), tok, rows=[{"prompt": USER, "chosen": GOOD, "rejected": BAD}])
    pair = load_pairs(cfg(), tok, rows=[{"prompt": USER, "chosen": GOOD, "rejected": BAD}], template="chatml").pairs[0]
    assert tok.decode(pair.prompt_ids) == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"


def test_files_samples_and_the_validation_split(qwen_tok, tmp_path):
    rows = synthetic_pairs(n=20, seed=1)
    assert all(r["chosen"] != r["rejected"] and r["answer"] in r["chosen"][0]["content"] for r in rows)
    path = write_jsonl(tmp_path / "syn.jsonl", rows)
    data = load_pairs(cfg(path, sample=12, seed=5), qwen_tok)
    assert data.rows == 20 and len(data.pairs) == 12 and len({p.row for p in data.pairs}) == 12
    assert data.pairs == load_pairs(cfg(path, sample=12, seed=5), qwen_tok).pairs
    train, val = split_pairs(data.pairs, 0.25, seed=0)
    assert len(val) == 3 and len(train) == 9 and not {p.row for p in train} & {p.row for p in val}
    assert split_pairs(data.pairs, 0.25, seed=0) == (train, val)
    with pytest.raises(UserError, match="leaves no training pairs"):
        split_pairs(data.pairs, 12, seed=0)
