"""Preference pairs: rows with a prompt, a chosen and a rejected answer -> token ids, shared by ``posttrain rm`` and
``posttrain dpo``.

Row forms (TRL's): an explicit prompt (``prompt``, ``chosen``, ``rejected``) or an implicit one (``chosen`` and
``rejected`` hold the whole conversation and their shared beginning is the prompt), each as plain text or as
messages (a string prompt with message answers becomes one user turn). Optional per-row ``margin``. Column
names come from ``data.columns``.

Tokens: messages are rendered with the chat template (installed as in SFT); the prompt is the conversation up to
the answer rendered with the generation prompt, and the answer's tokens are what the full conversation adds after
it. Plain text is used as written with the EOS token appended when missing (as TRL's RewardTrainer does); an
implicit text prompt is the longest common token prefix of the two sides. So ``prompt_ids + chosen_ids`` is
always the tokenization of the whole chosen text (or, when a template's prompt does not tokenize as a prefix of
the conversation, the prompt's tokens followed by the answer's).

Dropped and counted, the first such row named (``PairData.summary``): a pair whose chosen or rejected side is
over ``max_length`` tokens (``too_long``; TRL drops these as well, although its docs say it truncates), whose
chosen equals its rejected (``identical``), or with an empty side (``empty``). A missing column, a value of the
wrong type, a margin that is not a finite number, or a tokenizer without a pad token is a ``UserError`` naming
the file, the row and the key.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import NamedTuple

from posttrain.data.formats import ROLE_ALIASES
from posttrain.data.loading import load_rows
from posttrain.data.templates import install_template
from posttrain.data.tokenize import CHARS_PER_TOKEN_CAP, split_validation, surely_longer
from posttrain.errors import UserError
from posttrain.preference.config import PreferenceDataConfig

REASONS = ("too_long", "identical", "empty")


@dataclass(frozen=True)
class PreferencePair:
    """One tokenized pair; ``chosen_ids`` and ``rejected_ids`` are the answer tokens only (the prompt excluded);
    ``row`` is the 1-based row of the source."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float | None
    row: int


@dataclass
class PairData:
    pairs: list[PreferencePair]
    dropped: dict[str, int]  # reason (REASONS) -> count
    rows: int = 0
    first_dropped: dict[str, int] = field(default_factory=dict)  # reason -> the first row dropped for it
    source: str = ""

    def summary(self) -> str:
        why = {"too_long": "over data.max_length", "identical": "chosen equals rejected", "empty": "an empty side"}
        parts = [f"{n} {why[r]} (first: row {self.first_dropped[r]})" for r, n in self.dropped.items() if n]
        return (f"{self.rows} rows of {self.source} -> {len(self.pairs)} pairs"
                + (f"; dropped: {', '.join(parts)}" if parts else ""))


def pad_token_id(tokenizer, what: str = "model.name") -> int:
    """The tokenizer's pad id; a tokenizer with neither a pad nor an EOS token cannot batch pairs."""
    if tokenizer.pad_token_id is None:
        raise UserError(f"the tokenizer of {what} has no pad token (and no EOS token to pad with): batches of pairs "
                        "need one. Set tokenizer.pad_token in the model's tokenizer_config.json, or use a model "
                        "whose tokenizer has one")
    return tokenizer.pad_token_id


def load_pairs(cfg: PreferenceDataConfig, tokenizer, *, template: str | None = None,
               rows: list[dict] | None = None) -> PairData:
    """Load (or take ``rows``), check and tokenize the pairs. ``template``: the chat template for messages
    (default ``cfg.template``); it is installed on ``tokenizer`` as SFT does."""
    pad_token_id(tokenizer)
    rows = load_rows(cfg) if rows is None else rows
    if not rows:
        raise UserError(f"data: {cfg.path} has no rows")
    numbered = list(enumerate(rows, 1))
    if cfg.sample is not None and cfg.sample < len(numbered):
        numbered = sorted(random.Random(cfg.seed).sample(numbered, cfg.sample))
    out = PairData(pairs=[], dropped={r: 0 for r in REASONS}, rows=len(rows), source=cfg.path)
    cols = cfg.columns
    explicit = cols.prompt is not None and cols.prompt in rows[0]
    installed = False
    for i, row in numbered:
        where = f"{cfg.path} row {i}"
        prompt, chosen, rejected = _columns(row, cols, explicit, where)
        margin = _margin(row, cols.margin, where)
        reason = _problem(chosen, rejected)
        if reason is None and isinstance(chosen, list) and not installed:
            install_template(tokenizer, template or cfg.template, cfg.markers, cfg.system_prompt)
            installed = True
        if reason is None:
            texts = _render(tokenizer, prompt, chosen, rejected, where)
            pair = None if texts is None else _tokenize(tokenizer, *texts, cfg.max_length, margin, i)
            reason = ("empty" if texts is None else "too_long" if pair is None else
                      "identical" if pair.chosen_ids == pair.rejected_ids else
                      "empty" if not (pair.chosen_ids and pair.rejected_ids) else None)
        if reason is not None:
            out.dropped[reason] += 1
            out.first_dropped.setdefault(reason, i)
            continue
        out.pairs.append(pair)
    if not out.pairs:
        raise UserError(f"data: no pairs left ({out.summary()}); check the columns, or raise data.max_length")
    return out


class StepPlan(NamedTuple):
    global_batch: int     # pairs per optimizer step, all processes together
    steps_per_epoch: int
    total: int            # optimizer steps of the run


def plan_steps(n_pairs: int, train, world: int) -> StepPlan:
    """The steps of a preference run: ``train.max_steps``, else ``train.epochs`` over ``n_pairs`` training pairs.
    A set too small to fill one step (``batch_size x grad_accum x processes`` pairs) is an error."""
    global_batch = train.batch_size * train.grad_accum * world
    steps_per_epoch = n_pairs // global_batch
    if steps_per_epoch == 0:
        raise UserError(f"{n_pairs} training pairs cannot fill one step of {global_batch} pairs (train.batch_size x "
                        "train.grad_accum x processes); lower them or add data")
    total = train.max_steps if train.max_steps > 0 else math.ceil(train.epochs * steps_per_epoch)
    return StepPlan(global_batch, steps_per_epoch, total)


def split_pairs(pairs: list, val_size: float | int, seed: int) -> tuple[list, list]:
    """(train, validation) pairs, split as SFT splits its examples."""
    return split_validation(pairs, val_size, seed, "pairs")


# --------------------------------------------------------------------------------------------------- rows


def _columns(row: dict, cols, explicit: bool, where: str):
    """(prompt or None, chosen, rejected), each a text or a list of messages."""
    keys = [cols.prompt] if explicit else []
    for key in keys + [cols.chosen, cols.rejected]:
        if key not in row:
            raise UserError(f"{where}: column {key!r} not found (columns: {sorted(row)}); set data.columns"
                            + (" (the first row has a prompt column, so every row needs one)" if key == cols.prompt
                               else ""))
    chosen = _value(row[cols.chosen], where, cols.chosen)
    rejected = _value(row[cols.rejected], where, cols.rejected)
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise UserError(f"{where}: {cols.chosen!r} and {cols.rejected!r} must both be text or both be messages")
    prompt = _value(row[cols.prompt], where, cols.prompt) if explicit else None
    if isinstance(prompt, list) and not isinstance(chosen, list):
        raise UserError(f"{where}: the prompt is messages but {cols.chosen!r} is text; give the answers as "
                        "[{\"role\": \"assistant\", \"content\": ...}] or the prompt as text")
    if isinstance(prompt, str) and isinstance(chosen, list):
        prompt = [{"role": "user", "content": prompt}]
    return prompt, chosen, rejected


def _value(value, where: str, key: str):
    """A text, or a list of standardized messages (role aliases as in SFT)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{where}: {key!r} is {type(value).__name__}; expected text or a list of messages")
    out = []
    for j, m in enumerate(value, 1):
        role = ROLE_ALIASES.get(str(m.get("role", m.get("from", ""))).lower()) if isinstance(m, dict) else None
        content = m.get("content", m.get("value")) if isinstance(m, dict) else None
        if role is None or not isinstance(content, str):
            raise UserError(f"{where}: message {j} of {key!r} is not {{\"role\": ..., \"content\": \"...\"}} with a "
                            f"known role ({', '.join(sorted(ROLE_ALIASES))}): {str(m)[:60]}")
        out.append({"role": role, "content": content})
    return out


def _margin(row: dict, key: str, where: str) -> float | None:
    if key not in row:
        return None
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: {key!r} is {value!r}; a margin must be a finite number (or leave the column out)")
    return float(value)


def _problem(chosen, rejected) -> str | None:
    def empty(side):
        return not side.strip() if isinstance(side, str) else not any(m["content"].strip() for m in side)

    if empty(chosen) or empty(rejected):
        return "empty"
    return "identical" if chosen == rejected else None


# --------------------------------------------------------------------------------------------------- tokens


def _render(tok, prompt, chosen, rejected, where: str):
    """(prompt text or None for an implicit text prompt, chosen text, rejected text): whole sequences; None when
    one side of an implicit conversation is the other's beginning (nothing left to compare)."""
    if isinstance(chosen, str):
        eos = tok.eos_token or ""
        c, r = (prompt or "") + chosen, (prompt or "") + rejected
        c, r = (t if t.endswith(eos) else t + eos for t in (c, r))
        return prompt, c, r
    if prompt is None:  # implicit: the shared messages are the prompt
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    if not chosen or not rejected:
        return None
    c = tok.apply_chat_template(prompt + chosen, tokenize=False)
    r = tok.apply_chat_template(prompt + rejected, tokenize=False)
    if not prompt:
        return "", c, r
    for gen in (True, False):  # a template whose generation prompt opens the answer differently: plain prompt
        p = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=gen)
        if c.startswith(p) and r.startswith(p):
            return p, c, r
    raise UserError(f"{where}: the chat template renders the prompt differently inside the conversation, so the "
                    "answer cannot be separated from it; choose another data.template")


def _tokenize(tok, prompt: str | None, chosen: str, rejected: str, max_length: int, margin, row: int):
    """The pair's token ids, or None when a side is over ``max_length`` tokens."""
    if any(len(t) > max_length * CHARS_PER_TOKEN_CAP and surely_longer(tok, t, max_length) for t in (chosen, rejected)):
        return None
    c = tok(chosen, add_special_tokens=False)["input_ids"]
    r = tok(rejected, add_special_tokens=False)["input_ids"]
    if len(c) > max_length or len(r) > max_length:
        return None
    if prompt is None:  # implicit text prompt: the shared tokens
        k = 0
        while k < min(len(c), len(r)) and c[k] == r[k]:
            k += 1
        p = c[:k]
    else:
        p = tok(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        if c[:len(p)] != p or r[:len(p)] != p:  # the prompt does not tokenize as a prefix: tokenize apart
            c = p + tok(chosen[len(prompt):], add_special_tokens=False)["input_ids"]
            r = p + tok(rejected[len(prompt):], add_special_tokens=False)["input_ids"]
            if len(c) > max_length or len(r) > max_length:
                return None
    return PreferencePair(prompt_ids=list(p), chosen_ids=c[len(p):], rejected_ids=r[len(p):], margin=margin, row=row)


# --------------------------------------------------------------------------------------------------- generator


def synthetic_pairs(split: str = "train", n: int = 64, difficulty: str | int = "easy", seed: int = 0) -> list[dict]:
    """Verifiable pairs from the built-in synthetic problems (``data.path:
    posttrain.preference.data:synthetic_pairs``): chosen is the worked solution with its correct answer, rejected
    the same working with a wrong final answer (off by 1 to 9), in messages form with an explicit prompt. A
    reward model must check the arithmetic to rank them: a test of learned correctness, not of style."""
    from posttrain.data.synthetic import problems

    rng = random.Random(f"posttrain-pairs|{split}|{difficulty}|{seed}")
    out = []
    for p in problems(split, n=n, difficulty=difficulty, seed=seed):
        wrong = int(p["answer"]) + rng.choice([-1, 1]) * rng.randint(1, 9)
        lines = p["solution"].split("\n")
        bad = "\n".join(lines[:-1] + [f"The answer is {wrong}."])
        out.append({"prompt": [{"role": "user", "content": p["problem"]}],
                    "chosen": [{"role": "assistant", "content": p["solution"]}],
                    "rejected": [{"role": "assistant", "content": bad}], "answer": p["answer"]})
    return out
