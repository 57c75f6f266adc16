"""The seeds' four reward functions (Unsloth's Qwen3 GRPO notebook) with their exact scores.

Preset ``unsloth_math`` = ``format_exact`` + ``format_approx`` + ``answer_tiers`` + ``number_match``
(upstream names: match_format_exactly, match_format_approximately, check_answer, check_numbers).
The scores and quirks are kept on purpose so a posttrain run reproduces the notebook's reward scale:

* ``format_exact``: +3.0 when ``<end_working_out> … <SOLUTION>(answer)</SOLUTION>`` ends the text
  (then only whitespace and an optional EOS token), else 0.
* ``format_approx``: for each of ``<end_working_out>``, ``<SOLUTION>``, ``</SOLUTION>``: +0.5 if it occurs
  exactly once, else -1.0 (range -3 … +1.5). The opener is not counted (the template emits it).
* ``answer_tiers``: no match -2.0; exact string +5.0; equal after strip +3.5; numeric ratio in
  [0.9, 1.1] +2.0, in [0.8, 1.2] +1.5, otherwise -2.5; non-numeric or division by zero -4.5.
* ``number_match``: the first number after ``<SOLUTION>``; no number -2.5; equal as floats +3.5,
  else -1.5; a conversion error 0.

``verifier=True`` (off by default, so the notebook's scale is kept exactly) lets ``answer_tiers`` read the
answer the way ``math_accuracy`` and ``posttrain eval`` do: a guess inside ``<SOLUTION>`` that posttrain's
verifier finds equal to the answer, though not the same string (``\\frac{1}{2}`` for ``0.5``, ``1,234`` for
``1234``), scores the "equal after strip" tier (+3.5) instead of the ratio or non-numeric tiers.

One deliberate change, the fix of the seeds' project bug: the text checked is the opener the prompt
left open + the completion (see ``functions.opened_prefix``; an unknown generation prompt is assumed to
have opened the reasoning), and ``format_exact`` (with the default ``require_opener=True``) requires the
reasoning opener at the start. With the upstream template the opener comes from the generation prompt,
so well-formed completions score exactly as upstream (a test checks this against the upstream code on
400 random completions); with the project's ``<think>`` template they no longer score 0 on every sample.
"""

from __future__ import annotations

import re

from posttrain.config import ReasoningMarkers
from posttrain.rewards.functions import RewardFunction, completion_text, opened_prefix
from posttrain.verify import default_pool

_EOS_DEFAULT = r"(?:<\|endoftext\|>|<\|im_end\|>|</s>|<eos>|<\|eot_id\|>)"


class _UnslothBase(RewardFunction):
    def __init__(self, markers: ReasoningMarkers | None = None, eos_token: str | None = None,
                 prompt_suffix: str | None = None, answer_column: str = "answer", require_opener: bool = True,
                 verifier: bool = False, **marker_overrides):
        m = markers or ReasoningMarkers()
        if marker_overrides:
            m = ReasoningMarkers(**{**m.model_dump(), **marker_overrides})
        self.markers = m
        self.prompt_suffix = prompt_suffix
        self.answer_column = answer_column
        self.require_opener = require_opener
        self.verifier = verifier  # answer_tiers: the verifier's equality as the +3.5 tier (see the module doc)
        eos = re.escape(eos_token) if eos_token else _EOS_DEFAULT
        body = (rf"{re.escape(m.reasoning_end)}.*?{re.escape(m.solution_start)}(.+?){re.escape(m.solution_end)}"
                rf"[\s]{{0,}}(?:{eos})?[\s]{{0,}}$")
        self.match_format = re.compile(body, re.MULTILINE | re.DOTALL)
        self.match_format_with_opener = re.compile(rf"^\s*{re.escape(m.reasoning_start)}.*?" + body,
                                                   re.MULTILINE | re.DOTALL)
        self.match_numbers = re.compile(rf"{re.escape(m.solution_start)}.*?[\s]{{0,}}([-]?[\d\.\,]{{1,}})",
                                        re.MULTILINE | re.DOTALL)

    def texts(self, prompts, completions):
        """opener left open by the prompt + completion (see functions.with_opener)."""
        prompts = prompts if prompts is not None else [None] * len(completions)
        out = []
        for p, c in zip(prompts, completions):
            text = completion_text(c)
            prefix = opened_prefix(p, [self.markers.reasoning_start, self.markers.solution_start], self.prompt_suffix)
            if prefix is None:  # unknown generation prompt: assume it opened the reasoning
                prefix = "" if self.markers.reasoning_start in text else self.markers.reasoning_start
            out.append(prefix + text)
        return out

    def answers(self, columns, n):
        if self.answer_column not in columns:
            have = ", ".join(sorted(columns)) or "none"
            raise ValueError(f"{self.__name__} needs the column {self.answer_column!r}; the batch has: {have}")
        values = list(columns[self.answer_column])
        if len(values) != n:
            raise ValueError(f"{self.__name__}: {len(values)} answers for {n} completions")
        return ["" if a is None else str(a) for a in values]


class FormatExact(_UnslothBase):
    __name__ = "format_exact"

    def __call__(self, prompts, completions, **columns):
        rx = self.match_format_with_opener if self.require_opener else self.match_format
        return [3.0 if rx.search(t) is not None else 0.0 for t in self.texts(prompts, completions)]


class FormatApprox(_UnslothBase):
    __name__ = "format_approx"

    def __call__(self, prompts, completions, **columns):
        m = self.markers
        out = []
        for t in self.texts(prompts, completions):
            score = 0.0
            for marker in (m.reasoning_end, m.solution_start, m.solution_end):
                score += 0.5 if t.count(marker) == 1 else -1.0
            out.append(score)
        return out


class AnswerTiers(_UnslothBase):
    __name__ = "answer_tiers"

    def __call__(self, prompts, completions, **columns):
        answers = self.answers(columns, len(completions))
        guesses = [m.group(1) if m else None for m in map(self.match_format.search, self.texts(prompts, completions))]
        equal = self._verified(guesses, answers) if self.verifier else set()
        return [self.score(g, a, i in equal) for i, (g, a) in enumerate(zip(guesses, answers))]

    def _verified(self, guesses, answers) -> set[int]:
        """Indices whose guess the verifier finds equal to the answer (the guess read as a tag's content)."""
        todo = [i for i, g in enumerate(guesses) if g is not None and g.strip() != answers[i].strip()]
        verdicts = default_pool().verify_many([(guesses[i].strip(), answers[i], "tags") for i in todo])
        return {i for i, v in zip(todo, verdicts) if v.equal}

    @staticmethod
    def score(guess: str | None, true_answer: str, verified: bool = False) -> float:
        if guess is None:
            return -2.0
        if guess == true_answer:
            return 5.0
        if guess.strip() == true_answer.strip() or verified:
            return 3.5
        try:
            ratio = float(guess) / float(true_answer)
        except (ValueError, ZeroDivisionError, OverflowError):
            return -4.5
        if 0.9 <= ratio <= 1.1:
            return 2.0
        if 0.8 <= ratio <= 1.2:
            return 1.5
        return -2.5


class NumberMatch(_UnslothBase):
    __name__ = "number_match"

    def __call__(self, prompts, completions, **columns):
        answers = self.answers(columns, len(completions))
        out = []
        for t, true_answer in zip(self.texts(prompts, completions), answers):
            m = self.match_numbers.search(t)
            if m is None:
                out.append(-2.5)
                continue
            try:
                gold = float(true_answer.strip())
                guess = float(m.group(1).strip().replace(",", ""))
            except (ValueError, OverflowError):
                out.append(0.0)
                continue
            out.append(3.5 if guess == gold else -1.5)
        return out


PRESET = (FormatExact, FormatApprox, AnswerTiers, NumberMatch)
