"""Tokenize standardized rows into ``input_ids`` and ``labels`` (loss masks), and apply the SFT filters.

Loss masking is by exact spans: the characters of each assistant turn are known from the template
(``templates.assistant_spans``), the whole conversation is tokenized once with character offsets, and a
token is a target when it overlaps an assistant span. No marker tokens are searched for, so a tokenizer
that merges text across a turn boundary cannot shift the mask. The assistant's end-of-turn token lies
inside its span and is trained, so the model learns to stop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from posttrain.config import DataConfig
from posttrain.data.formats import is_numeric_answer, standardize
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


def encode_messages(tokenizer, messages: list[dict], train_on: str = "assistant") -> dict:
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


def encode_text(tokenizer, text: str) -> dict:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}


def prepare_sft_data(cfg: DataConfig, tokenizer, rows: list[dict] | None = None):
    """Load, standardize, template, tokenize and filter. -> (train examples, val examples, stats)."""
    stats = DataStats()
    rows = load_rows(cfg) if rows is None else rows
    stats.rows = len(rows)
    rows = [{**r, "_row": i} for i, r in enumerate(rows)]  # errors name the row of the source file
    if cfg.numeric_answer_only:
        key = (cfg.columns.answer if cfg.columns else None) or "expected_answer"
        if key not in rows[0]:
            raise UserError(f"data.numeric_answer_only needs the answer column {key!r} (columns: {sorted(rows[0])}); "
                            "set data.columns.answer")
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
        i = row.pop("_row")
        if "text" in row and "messages" not in row:
            ex = encode_text(tokenizer, row["text"])
        else:
            ex = encode_messages(tokenizer, row["messages"], cfg.train_on)
        if len(ex["input_ids"]) > cfg.max_length:
            if not cfg.drop_long:
                raise UserError(f"{cfg.path} row {i}: {len(ex['input_ids'])} tokens exceeds data.max_length="
                                f"{cfg.max_length}; raise data.max_length or set data.drop_long=true")
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
    val_n = int(round(cfg.val_size * len(examples))) if isinstance(cfg.val_size, float) and cfg.val_size < 1 \
        else int(cfg.val_size)
    if val_n >= len(examples):
        raise UserError(f"data.val_size={cfg.val_size} leaves no training examples out of {len(examples)}")
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    val = [examples[i] for i in sorted(order[:val_n])]
    train = [examples[i] for i in sorted(order[val_n:])]
    stats.train, stats.val = len(train), len(val)
    stats.tokens = sum(len(e["input_ids"]) for e in train)
    stats.target_tokens = sum(sum(1 for t in e["labels"][1:] if t != IGNORE_INDEX) for e in train)
    return train, val, stats
