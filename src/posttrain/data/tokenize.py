"""Tokenize standardized rows into ``input_ids`` and ``labels`` (loss masks), and apply the SFT filters.

Loss masking is by exact spans: the characters of each assistant turn are known from the template
(``templates.assistant_spans``), the whole conversation is tokenized once with character offsets, and a
token is a target when it overlaps an assistant span. No marker tokens are searched for, so a tokenizer
that merges text across a turn boundary cannot shift the mask. The assistant's end-of-turn token lies
inside its span and is trained, so the model learns to stop.

Huge rows cost what they are worth: tokenizing takes about 250 bytes of memory per character (one 50 MB row took
12.9 GB before it was dropped), so a row far longer than ``data.max_length`` tokens of any real text is judged
from a prefix (:func:`surely_longer`) and dropped without being tokenized whole.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from posttrain.config import DataConfig
from posttrain.data.formats import ROW_KEY, column_names, is_numeric_answer, standardize
from posttrain.data.loading import load_rows
from posttrain.data.templates import assistant_spans, install_template
from posttrain.errors import UserError
from posttrain.losses import IGNORE_INDEX


@dataclass
class DataStats:
    rows: int = 0
    dropped_non_numeric: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    train: int = 0
    val: int = 0
    target_tokens: int = 0
    tokens: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.rows} rows -> {self.train} train / {self.val} val; dropped: {self.dropped_non_numeric} "
                f"non-numeric answers, {self.dropped_too_long} over the length limit, {self.dropped_no_target} "
                f"without target tokens; {self.tokens:,} tokens, {self.target_tokens:,} trained")


# Characters per token above which no real text goes, measured with the SmolLM2 and Qwen tokenizers on GSM8K, MATH,
# AIME, AMC and Minerva problems and solutions (2.7-2.8 on average, at most 4.6 for one text), posttrain's Python
# source (3.4-3.9, at most 4.6) and its Markdown docs (3.1-3.5); only runs of one character go beyond (Qwen:
# 16 for tabs, 64 for dashes, 128 for spaces).
CHARS_PER_TOKEN_CAP = 32


def surely_longer(tokenizer, text: str, max_tokens: int) -> bool:
    """Whether ``text`` has more than ``max_tokens`` tokens, decided without tokenizing a huge text whole. Exact,
    not a guess: text up to ``max_tokens * CHARS_PER_TOKEN_CAP`` characters is never judged here (False: the
    caller tokenizes it); a longer one is surely longer when that prefix alone has twice ``max_tokens`` tokens
    (the factor absorbs the token cut at the prefix's end), or when it has more characters than ``max_tokens``
    tokens of the vocabulary's longest token can cover. What is left (runs of spaces of 32-128 characters per
    token) is at most ``max_tokens`` times the longest token long, and cheap to tokenize."""
    cap = max_tokens * CHARS_PER_TOKEN_CAP
    if len(text) <= cap:
        return False
    if len(tokenizer(text[:cap], add_special_tokens=False)["input_ids"]) > 2 * max_tokens:
        return True
    return len(text) > max_tokens * max(map(len, tokenizer.get_vocab()))


def encode_messages(tokenizer, messages: list[dict], train_on: str = "assistant",
                    max_tokens: int | None = None) -> dict | None:
    """Tokens and loss mask of a conversation; None when it surely has more than ``max_tokens`` tokens."""
    if max_tokens is not None and sum(len(m["content"]) for m in messages) > max_tokens * CHARS_PER_TOKEN_CAP:
        if surely_longer(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False), max_tokens):
            return None
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if train_on == "all":
        return {"input_ids": ids, "labels": list(ids)}
    labels = [IGNORE_INDEX] * len(ids)
    for i, (s, e) in enumerate(enc["offset_mapping"]):
        if any(s < span_end and e > span_start for span_start, span_end in spans):
            labels[i] = ids[i]
    return {"input_ids": ids, "labels": labels}


def encode_text(tokenizer, text: str, max_tokens: int | None = None) -> dict | None:
    """Tokens of a plain text (all trained) with EOS; None when it surely has more than ``max_tokens`` tokens."""
    if max_tokens is not None and surely_longer(tokenizer, text, max_tokens):
        return None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}


def prepare_sft_data(cfg: DataConfig, tokenizer, rows: list[dict] | None = None):
    """Load, standardize, template, tokenize and filter. -> (train examples, val examples, stats)."""
    stats = DataStats()
    rows = load_rows(cfg) if rows is None else rows
    stats.rows = len(rows)
    rows = [{**r, ROW_KEY: i} for i, r in enumerate(rows, 1)]  # errors name the row of the source (1-based)
    if cfg.numeric_answer_only:
        key = (cfg.columns.answer if cfg.columns else None) or "expected_answer"
        if key not in rows[0]:
            raise UserError(f"data.numeric_answer_only needs the answer column {key!r} (columns: "
                            f"{column_names(rows[0])}); set data.columns.answer")
        kept = [r for r in rows if is_numeric_answer(r.get(key))]
        stats.dropped_non_numeric = len(rows) - len(kept)
        rows = kept
    if cfg.sample is not None and cfg.sample < len(rows):
        rows = random.Random(cfg.seed).sample(rows, cfg.sample)
    install_template(tokenizer, cfg.template, cfg.markers, cfg.system_prompt)
    std = standardize(rows, cfg.format, columns=cfg.columns, template=cfg.template, markers=cfg.markers,
                      source=cfg.path)
    examples = []
    for row in std:
        i = row.pop(ROW_KEY)
        if "text" in row and "messages" not in row:
            ex = encode_text(tokenizer, row["text"], cfg.max_length)
        else:
            ex = encode_messages(tokenizer, row["messages"], cfg.train_on, cfg.max_length)
        if ex is None or len(ex["input_ids"]) > cfg.max_length:
            if not cfg.drop_long:
                size = f"{len(ex['input_ids'])} tokens" if ex else "far more tokens than that"
                raise UserError(f"{cfg.path} row {i}: {size} exceeds data.max_length={cfg.max_length}; raise "
                                "data.max_length or set data.drop_long=true")
            stats.dropped_too_long += 1
            continue
        if all(label == IGNORE_INDEX for label in ex["labels"][1:]):
            stats.dropped_no_target += 1
            continue
        ex["row"] = i
        examples.append(ex)
    if not examples:
        raise UserError(f"data: no examples left after filtering {cfg.path} ({stats.summary()}); "
                        "raise data.max_length, drop data.numeric_answer_only, or check the data")
    train, val = split_validation(examples, cfg.val_size, cfg.seed)
    stats.train, stats.val = len(train), len(val)
    stats.tokens = sum(len(e["input_ids"]) for e in train)
    stats.target_tokens = sum(sum(1 for t in e["labels"][1:] if t != IGNORE_INDEX) for e in train)
    return train, val, stats


def split_validation(items: list, val_size: float | int, seed: int, what: str = "examples") -> tuple[list, list]:
    """(train, validation), each in the original order: ``val_size`` items (a fraction below 1, or a count) drawn
    with ``seed``. Taking every item for validation is an error."""
    n = int(round(val_size * len(items))) if isinstance(val_size, float) and val_size < 1 else int(val_size)
    if n >= len(items):
        raise UserError(f"data.val_size={val_size} leaves no training {what} out of {len(items)}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    return [x for k, x in enumerate(items) if k not in held], [x for k, x in enumerate(items) if k in held]
