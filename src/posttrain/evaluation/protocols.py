r"""Evaluation protocols: named presets that measure a model the way a published number was measured, so that our
accuracy and the paper's can be put side by side (``posttrain eval --protocol NAME``, or ``protocol:`` in a
pipeline's eval stage). A protocol fixes the prompt text (instruction, few-shot exemplars, their layout), the stop
rules, the token budget and the answer reading; decoding stays greedy unless ``samples`` says otherwise.

- ``boxed-0shot``: DeepSeekMath-Instruct / -RL 7B on GSM8K and MATH (zero-shot chain of thought). The problem,
  then ``\nPlease reason step by step, and put your final answer within \boxed{}.`` as the user turn of the
  model's chat template (plain text: ``User: {that}\n\nAssistant:``). Stops on EOS; 1024 tokens; reads the last
  ``\boxed{}``, else the last number.
- ``gsm8k-8shot``: DeepSeekMath-Base 7B on GSM8K (8-shot chain of thought). Wei et al.'s eight exemplars as
  ``Q: {question}\nA: {answer}`` separated by three newlines, then ``Q: {problem}\nA:``. Stops on ``\nQ:`` or
  EOS; 1024 tokens; reads "The answer is N", else the last number.
- ``math-4shot``: DeepSeekMath-Base 7B on MATH (4-shot Minerva chain of thought; Qwen3-Base also reports 4-shot).
  The four Minerva exemplars as ``Problem:\n{question}\n\nSolution:\n{answer}`` separated by a blank line,
  then ``Problem:\n{problem}\n\nSolution:``. Stops on ``\nProblem:`` or EOS; 1024 tokens; reads "The final
  answer is $X$", else the last number.
- ``lighteval-gsm8k-5shot``: the SmolLM2 model cards' GSM8K (5-shot). Five GSM8K train rows as
  ``Question: {question}\nAnswer: {answer}`` separated by a blank line, then ``Question: {problem}\nAnswer:``.
  Stops on ``Question`` or EOS; 256 tokens; reads ``#### N`` only.

Sources: DeepSeekMath's harness (github.com/deepseek-ai/DeepSeek-Math ``evaluation/``, commit b8b0f8c:
``few_shot_prompts/``, ``infer/run_cot_eval.py`` (``max_tokens=1024`` with vLLM, greedy, stop words),
``run_subset_parallel.py`` (``markup_question``: the boxed instruction), ``data_processing/answer_extraction.py``
(the readers)); lighteval at the commit SmolLM2's evaluation pins (ea46419: ``default_prompts.gsm8k``,
``gsm8k_normalizer``; the task in huggingface/smollm ``text/evaluation/smollm2/tasks.py``: 5 shots, 256 tokens,
stop ``Question:``/``Question``). The exemplar texts and their provenance: :mod:`posttrain.evaluation.fewshot`.

Formats. The published base-model protocols (gsm8k-8shot, math-4shot) are plain text by default, as their harnesses
feed them to base models. boxed-0shot and lighteval-gsm8k-5shot render through the model's chat template by
default (DeepSeekMath-Instruct's harness writes ``User: ..\n\nAssistant:``, which is its chat template; lighteval
ran SmolLM2-Instruct with ``--use_chat_template``), and fall back to plain text when the tokenizer has none.
``template: plain`` forces plain text; ``template: tokenizer | chatml | qwen3`` forces chat, where each exemplar
becomes a user turn (its query) and an assistant turn (the protocol's answer prefix and answer), as lighteval and
lm-evaluation-harness (``--fewshot_as_multiturn``) do. Plain text starts with the special tokens the tokenizer
adds by default (a Llama-style BOS), as those harnesses tokenize it.

Answer reading goes through :func:`posttrain.verify.extract_answer` with the protocol's style; the strict reading
is what ``format_rate`` counts. Where the published reader falls back to the last number (DeepSeekMath's does),
the protocol turns ``last_number`` on by default; an explicit ``last_number`` or ``max_new_tokens`` wins over the
protocol's. Departures from the published harnesses, all small: DeepSeekMath's reader tries "The answer is"
before the last number when a zero-shot completion has no box; lighteval reads the first ``#### N`` and we the
last (generation stops at the next ``Question`` either way); lighteval samples its five exemplars at random, we
use the first five train rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config import EvalConfig
from posttrain.data.templates import render_messages
from posttrain.errors import UserError
from posttrain.evaluation.fewshot import GSM8K_8SHOT_COT, GSM8K_TRAIN_FIRST_5, MINERVA_MATH_4SHOT, Shot
from posttrain.evaluation.prompts import BOXED_INSTRUCTION, PromptStyle, build_prompt, get_style, stop_strings


@dataclass(frozen=True)
class Protocol:
    name: str
    summary: str                  # one line: what it reproduces
    shots: tuple[Shot, ...]       # exemplars in prompt order; () for zero-shot
    query: str                    # a problem in plain text; {problem} is the problem with the instruction
    chat_query: str               # a problem as the user turn of a chat
    answer_prefix: str            # between an exemplar's query and its answer
    separator: str                # between exemplars, and between the last one and the problem
    instruction: str              # appended to every problem ("" for none)
    chat_by_default: bool         # the model's chat template when it has one (else plain text)
    stop: tuple[str, ...]         # stop strings besides the model's EOS
    max_new_tokens: int
    answer_style: str             # posttrain.verify.extract_answer style (the strict reading)
    last_number: bool             # the published reader falls back to the last number
    source: str

    @property
    def style(self) -> PromptStyle:
        return PromptStyle(self.name, "tokenizer" if self.chat_by_default else "plain", None, self.answer_style)

    def plain(self, problem: str) -> str:
        """The prompt as plain text (before the tokenizer's default special tokens)."""
        shots = [self.query.format(problem=s.question) + self.answer_prefix + s.answer for s in self.shots]
        return self.separator.join([*shots, self.query.format(problem=problem + self.instruction)])

    def messages(self, problem: str) -> list[dict]:
        """The prompt as a conversation: each exemplar a user and an assistant turn, then the problem."""
        out = []
        for s in self.shots:
            out += [{"role": "user", "content": self.chat_query.format(problem=s.question)},
                    {"role": "assistant", "content": self.answer_prefix + s.answer}]
        return out + [{"role": "user", "content": self.chat_query.format(problem=problem + self.instruction)}]


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in [
    Protocol("boxed-0shot", "zero-shot chain of thought with the answer in \\boxed{} (DeepSeekMath-Instruct / -RL)",
             (), "User: {problem}\n\nAssistant:", "{problem}", "", "", "\n" + BOXED_INSTRUCTION, True, (),
             1024, "boxed", True, "DeepSeek-Math evaluation/: run_subset_parallel.py markup_question, "
             "infer/run_cot_eval.py (prompt_format sft)"),
    Protocol("gsm8k-8shot", "GSM8K 8-shot chain of thought, Wei et al.'s exemplars (DeepSeekMath-Base)",
             GSM8K_8SHOT_COT, "Q: {problem}\nA:", "Q: {problem}\nA:", " ", "\n\n\n", "", False, ("\nQ:",),
             1024, "final_answer", True, "DeepSeek-Math evaluation/few_shot_prompts/cot_gsm_8_shot.py"),
    Protocol("math-4shot", "MATH 4-shot Minerva chain of thought (DeepSeekMath-Base; Qwen3-Base reports 4-shot)",
             MINERVA_MATH_4SHOT, "Problem:\n{problem}\n\nSolution:", "Problem:\n{problem}\n\nSolution:", "\n",
             "\n\n", "", False, ("\nProblem:",), 1024, "final_answer", True,
             "DeepSeek-Math evaluation/few_shot_prompts/cot_minerva_math_4_shot.py"),
    Protocol("lighteval-gsm8k-5shot", "GSM8K 5-shot as lighteval runs it for the SmolLM2 model cards",
             GSM8K_TRAIN_FIRST_5, "Question: {problem}\nAnswer:", "Question: {problem}\nAnswer:", " ", "\n\n",
             "", True, ("Question",), 256, "gsm8k", False,
             "lighteval ea46419 default_prompts.gsm8k; huggingface/smollm text/evaluation/smollm2/tasks.py"),
]}
NAMES = tuple(PROTOCOLS)


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise UserError(f"protocol {name!r} is not one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def resolve(settings: EvalConfig) -> EvalConfig:
    """``settings`` with the protocol's token budget and last-number fallback where they were not given."""
    if settings.protocol is None:
        return settings
    p = get_protocol(settings.protocol)
    given = settings.model_fields_set
    updates = {key: getattr(p, key) for key in ("max_new_tokens", "last_number") if key not in given}
    return settings.model_copy(update=updates) if updates else settings


def _default_special_prefix(tokenizer) -> str:
    """The special tokens the tokenizer puts before a text by default (a Llama-style BOS), as text."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    extra = len(full) - len(plain)
    return tokenizer.decode(full[:extra]) if extra > 0 and full[extra:] == plain else ""


def render(tokenizer, problem: str, protocol: Protocol, *, template: str | None = None,
           system_prompt: str | None = None) -> str:
    """The full prompt text (special tokens included) in the format ``template`` picks (see the module doc)."""
    if template == "reasoning":
        raise UserError(f"protocol {protocol.name} renders through the model's chat template or as plain text; "
                        "template reasoning is for prompt reasoning (set template to tokenizer, chatml, qwen3 or "
                        "plain, or leave it out)")
    chat = template in ("tokenizer", "chatml", "qwen3") or (
        template is None and protocol.chat_by_default and bool(tokenizer.chat_template))
    if not chat:
        if system_prompt is not None:
            raise UserError(f"protocol {protocol.name} is rendered as plain text here, which has no system prompt: "
                            "drop system_prompt, or set template to tokenizer, chatml or qwen3")
        return _default_special_prefix(tokenizer) + protocol.plain(problem)
    if template == "tokenizer" and not tokenizer.chat_template:
        raise UserError("template tokenizer: this tokenizer has no chat template (a base model?); use template "
                        "plain, chatml or qwen3")
    messages = protocol.messages(problem)
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return render_messages(tokenizer, messages, template=template if template in ("chatml", "qwen3") else None,
                           add_generation_prompt=True)


# --------------------------------------------------------------------------------------------------
# one entry point for the runner: a protocol, or one of the prompt styles of posttrain.evaluation.prompts


def answer_rules(settings: EvalConfig) -> tuple[PromptStyle, list[str]]:
    """How answers are read (a ``PromptStyle`` for ``prompts.extract``) and the stop strings."""
    if settings.protocol is not None:
        p = get_protocol(settings.protocol)
        return p.style, list(p.stop)
    style = get_style(settings.prompt)
    return style, stop_strings(style, settings.markers)


def prompt_text(tokenizer, problem: str, settings: EvalConfig) -> str:
    """The prompt for one problem under ``settings`` (its protocol, or its prompt style)."""
    if settings.protocol is not None:
        return render(tokenizer, problem, get_protocol(settings.protocol), template=settings.template,
                      system_prompt=settings.system_prompt)
    return build_prompt(tokenizer, problem, get_style(settings.prompt), template=settings.template,
                        markers=settings.markers, system_prompt=settings.system_prompt)
