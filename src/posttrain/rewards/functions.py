"""Built-in reward functions with TRL's contract: ``(prompts, completions, **columns) -> list[float | None]``.

``completions`` may be strings or message lists (``[{"role": "assistant", "content": ...}]``); every
dataset column arrives as a keyword. ``None`` means "skip this sample" (TRL averages over the rest).

Generation-prompt awareness (the bug of the seeds' own project): a chat template whose generation prompt
already opens a marker (``<start_working_out>``, ``<think>``) puts that marker in the *prompt*, and TRL
passes only the generated text to rewards, so a format check that looks for the opener fails on every
sample. Format rewards here prepend the opener the prompt left open: given explicitly as
``prompt_suffix`` (the trainer computes it with ``generation_suffix(tokenizer)``), found at the end of a
string prompt, or taken from a trailing assistant message (``continue_final_message``). When it cannot be
known (message-list prompts and no ``prompt_suffix``), a completion without the opener is read as if the
template had opened it: a sample is never punished for a marker the reward cannot see.
"""

from __future__ import annotations

import math
import re

from posttrain.verify import (
    DEFAULT_TAGS,
    FREE_TEXT_RULES,
    default_pool,
    extract_answer,
    extract_with_rule,
    gold_parseable,
    last_boxed,
)

GOLD_COLUMNS = ("answer", "solution", "ground_truth", "gold", "reward_model")


def completion_text(c) -> str:
    """The generated text of one completion (a string or a list of messages)."""
    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        return str(c.get("content") or "")
    if isinstance(c, (list, tuple)):
        return "".join(str(m.get("content") or "") if isinstance(m, dict) else str(m) for m in c)
    return "" if c is None else str(c)


def opened_prefix(prompt, openers, prompt_suffix: str | None = None) -> str | None:
    """The text the prompt leaves open at its end (a marker the generation prompt already emitted).

    Returns "" when the prompt is known to leave nothing open, and None when it cannot be known (a
    message-list prompt and no ``prompt_suffix``: the generation prompt is not in the messages).
    """
    if prompt_suffix is not None:
        return prompt_suffix
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[-1], dict):
        if prompt[-1].get("role") == "assistant":  # continue_final_message: the content is a prefix
            return str(prompt[-1].get("content") or "")
        return None
    if isinstance(prompt, str):
        tail = prompt[-400:]
        for opener in openers:
            idx = tail.rfind(opener)
            if opener and idx >= 0 and not tail[idx + len(opener) :].strip():
                return tail[idx:]
        return ""
    return None


def with_opener(prompt, completion: str, opener: str, prompt_suffix: str | None = None) -> str:
    """prefix + completion; when the prefix is unknown and the completion lacks the opener, assume the
    template opened it (never punish a sample for a marker we cannot see)."""
    prefix = opened_prefix(prompt, [opener], prompt_suffix)
    if prefix is None:
        return completion if opener in completion else opener + completion
    return prefix + completion


def generation_suffix(tokenizer, messages=None) -> str:
    """What ``add_generation_prompt=True`` appends to a rendered conversation (e.g. ``<think>\\n``).

    ``tokenizer`` is a Hugging Face tokenizer with a chat template, or a callable
    ``render(messages, add_generation_prompt) -> str``.
    """
    msgs = messages or [{"role": "user", "content": "2+2?"}]
    if callable(tokenizer) and not hasattr(tokenizer, "apply_chat_template"):
        without, with_ = tokenizer(msgs, False), tokenizer(msgs, True)
    else:
        without = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        with_ = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return with_[len(without) :] if with_.startswith(without) else ""


def _column(columns: dict, name: str | None, n: int, who: str):
    names = (name,) if name else GOLD_COLUMNS
    for key in names:
        if key in columns and columns[key] is not None:
            values = list(columns[key])
            if len(values) != n:
                raise ValueError(f"{who}: column {key!r} has {len(values)} values for {n} completions")
            if key == "reward_model":
                values = [v.get("ground_truth") if isinstance(v, dict) else v for v in values]
            return values
    have = ", ".join(sorted(k for k in columns if not k.startswith("_"))) or "none"
    want = name or " / ".join(GOLD_COLUMNS)
    raise ValueError(f"{who} needs the gold answer column {want!r}; the batch has columns: {have}")


def _gold_answer(g) -> str:
    g = "" if g is None else str(g)
    if "####" in g:  # a GSM8K solution: the answer follows ####
        return extract_answer(g, "gsm8k") or ""
    return g


class RewardFunction:
    """Base class: a callable with ``__name__`` and optional ``metrics()``."""

    __name__ = "reward"

    def metrics(self) -> dict:
        """What happened since the last call, logged as ``rewards/<name>/<key>`` with each GRPO step: counts and
        seconds (added up over a step's rounds and processes); a key named ``running_*`` is a state instead
        (the latest value, averaged over processes)."""
        return {}


class MathAccuracy(RewardFunction):
    """1.0 when the extracted answer equals the gold (posttrain's verifier), 0.0 when it does not or
    there is no answer, None when the gold cannot be parsed (the sample is skipped, never rewarded).

    The answer is read as ``posttrain eval`` reads it: ``extract_with_rule`` with ``style`` (default ``auto``:
    box, tags, "the answer is", DAPO's "Answer:", ``####``, then the last math environment or the value closing
    the last sentence; a ``<think>`` never closed gives no answer), and the verifier applies that rule's policy
    (docs/verifier.md). ``metrics()`` counts ``free_text`` answers (read by a free-text rule rather than a box,
    tag or phrase) beside time-outs, skipped golds and missing answers.

    >>> math_accuracy([""], [r"... so \\boxed{\\frac{1}{2}}"], answer=["0.5"])   # doctest: +SKIP
    [1.0]
    """

    __name__ = "math_accuracy"

    def __init__(self, answer_column=None, style="auto", tags=DEFAULT_TAGS, last_number=False,
                 timeout=2.0, pool=None, prompt_suffix=None):
        self.answer_column = answer_column
        self.style = style
        self.tags = tuple(tuple(t) for t in tags)
        self.last_number = last_number
        self.timeout = timeout
        self.pool = pool
        self.prompt_suffix = prompt_suffix
        self._counts = {"timeouts": 0, "unparseable_gold": 0, "no_answer": 0, "free_text": 0}

    def __call__(self, prompts, completions, **columns):
        n = len(completions)
        golds = _column(columns, self.answer_column, n, self.__name__)
        prompts = prompts if prompts is not None else [None] * n
        openers = [t[0] for t in self.tags]
        found = []
        for p, c in zip(prompts, completions):
            prefix = opened_prefix(p, openers, self.prompt_suffix) or ""
            found.append(extract_with_rule(completion_text(c), self.style, tags=self.tags,
                                           last_number=self.last_number, prompt_suffix=prefix))
        pool = self.pool if self.pool is not None else default_pool()
        todo = [i for i, f in enumerate(found) if f.answer is not None]
        self._counts["free_text"] += sum(1 for i in todo if found[i].rule in FREE_TEXT_RULES)
        verdicts = pool.verify_many([(found[i].answer, _gold_answer(golds[i]), found[i].rule) for i in todo],
                                    timeout=self.timeout)
        by_index = dict(zip(todo, verdicts))
        out: list[float | None] = []
        for i in range(n):
            v = by_index.get(i)
            if v is None:
                if not gold_parseable(_gold_answer(golds[i])):
                    self._counts["unparseable_gold"] += 1
                    out.append(None)
                else:
                    self._counts["no_answer"] += 1
                    out.append(0.0)
            elif v.reason == "unparseable_gold":
                self._counts["unparseable_gold"] += 1
                out.append(None)
            else:
                if v.reason == "timeout":
                    self._counts["timeouts"] += 1
                out.append(1.0 if v.equal else 0.0)
        return out

    def metrics(self):
        out, self._counts = dict(self._counts), {k: 0 for k in self._counts}
        return out


class BoxedFormat(RewardFunction):
    """1.0 when the completion ends its work with a complete, non-empty ``\\boxed{}``; else 0.0."""

    __name__ = "boxed_format"

    def __call__(self, prompts, completions, **columns):
        return [1.0 if last_boxed(completion_text(c)) is not None else 0.0 for c in completions]


class ThinkFormat(RewardFunction):
    """1.0 when the text (with the opener the prompt left open) is ``<think>…</think>`` followed by an
    answer, with exactly one opener (TRL's ``think_format_reward`` rule); else 0.0."""

    __name__ = "think_format"

    def __init__(self, open_tag="<think>", close_tag="</think>", prompt_suffix=None):
        self.open_tag, self.close_tag, self.prompt_suffix = open_tag, close_tag, prompt_suffix
        o, c = re.escape(open_tag), re.escape(close_tag)
        self._re = re.compile(rf"^\s*{o}(?!.*{o})(.*?){c}(.*)$", re.DOTALL)

    def __call__(self, prompts, completions, **columns):
        prompts = prompts if prompts is not None else [None] * len(completions)
        out = []
        for p, c in zip(prompts, completions):
            text = with_opener(p, completion_text(c), self.open_tag, self.prompt_suffix)
            m = self._re.match(text)
            out.append(1.0 if m and m.group(1).strip() and m.group(2).strip() else 0.0)
        return out


class SoftOverlong(RewardFunction):
    """DAPO's overlong shaping: 0 up to ``max_length - cache_length`` tokens, then a linear ramp down
    to -1 at ``max_length``, and -1 beyond. Lengths come from ``completion_ids`` (TRL passes them),
    ``completion_lengths``, or ``tokenizer``; without any of them it raises (no silent guess)."""

    __name__ = "soft_overlong"

    def __init__(self, max_length=1024, cache_length=256, tokenizer=None):
        if not 0 < cache_length <= max_length:
            raise ValueError(f"soft_overlong needs 0 < cache_length <= max_length, got {cache_length}, {max_length}")
        self.max_length, self.cache_length, self.tokenizer = max_length, cache_length, tokenizer

    def score(self, length: int) -> float:
        expected = self.max_length - self.cache_length
        if length <= expected:
            return 0.0
        if length <= self.max_length:
            return (expected - length) / self.cache_length
        return -1.0

    def __call__(self, prompts, completions, completion_ids=None, completion_lengths=None, **columns):
        if completion_ids is not None:
            lengths = [len(ids) for ids in completion_ids]
        elif completion_lengths is not None:
            lengths = [int(x) for x in completion_lengths]
        elif self.tokenizer is not None:
            lengths = [len(self.tokenizer(completion_text(c), add_special_tokens=False)["input_ids"]) for c in completions]
        else:
            raise ValueError("soft_overlong needs token lengths: pass completion_ids (TRL does), "
                             "completion_lengths, or build it with tokenizer=...")
        return [self.score(n) for n in lengths]


def nan_to_none(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x
