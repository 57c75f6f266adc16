"""Prompt styles for evaluation: how a problem becomes a prompt, where the answer is read from, and when
generation may stop early.

| style       | template (default)        | user message                               | answer read from           | stops on        |
|-------------|---------------------------|--------------------------------------------|----------------------------|-----------------|
| reasoning   | the seeds' GRPO template  | the raw problem (the template's system     | last <SOLUTION>...</SOLUTION> | </SOLUTION>, EOS |
|             | (``reasoning``)           | prompt asks for working out + SOLUTION)    |                            |                 |
| boxed       | the model's own template  | problem + "Please reason step by step, and | last complete \\boxed{}    | EOS             |
|             | (``tokenizer``)           | put your final answer within \\boxed{}."   |                            |                 |
| chat        | the model's own template  | the raw problem                            | ``auto``: boxed, tags,     | EOS             |
|             | (``tokenizer``)           |                                            | "final answer is", ####    |                 |

The boxed instruction is the one Qwen2.5-Math and DeepSeek-R1 report their numbers with. A completion is
*format compliant* when its style's answer is there and closed (a truncated ``\\boxed{`` or an unclosed
``<SOLUTION>`` is a format failure, never a crash). The published protocols (few-shot exemplars, their stop rules
and readers) are :mod:`posttrain.evaluation.protocols`; an evaluation uses either a style or a protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config import ReasoningMarkers
from posttrain.errors import UserError
from posttrain.verify import extract_answer

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class PromptStyle:
    name: str
    default_template: str
    instruction: str | None      # appended to the problem as a new paragraph
    answer_style: str            # posttrain.verify.extract_answer style


STYLES = {
    "reasoning": PromptStyle("reasoning", "reasoning", None, "tags"),
    "boxed": PromptStyle("boxed", "tokenizer", BOXED_INSTRUCTION, "boxed"),
    "chat": PromptStyle("chat", "tokenizer", None, "auto"),
}


def get_style(name: str) -> PromptStyle:
    if name not in STYLES:
        raise UserError(f"prompt style {name!r} is not one of {', '.join(STYLES)}")
    return STYLES[name]


def build_prompt(tokenizer, problem: str, style: PromptStyle, *, template: str | None = None,
                 markers: ReasoningMarkers | None = None, system_prompt: str | None = None) -> str:
    """The full prompt text (special tokens included) ending with the generation prompt."""
    from posttrain.data.templates import render_messages

    template = template or style.default_template
    content = problem if style.instruction is None else f"{problem}\n{style.instruction}"
    messages = [{"role": "user", "content": content}]
    if system_prompt is not None and template != "reasoning":
        messages.insert(0, {"role": "system", "content": system_prompt})
    if template == "tokenizer":
        if not tokenizer.chat_template:
            raise UserError(f"prompt style {style.name} uses the model's own chat template, but this tokenizer has "
                            "none (a base model?): pass --template chatml, qwen3 or reasoning, or --prompt reasoning")
        return render_messages(tokenizer, messages, add_generation_prompt=True)
    return render_messages(tokenizer, messages, template=template, markers=markers or ReasoningMarkers(),
                           system_prompt=system_prompt if template == "reasoning" else None,
                           add_generation_prompt=True)


def stop_strings(style: PromptStyle, markers: ReasoningMarkers | None = None) -> list[str]:
    markers = markers or ReasoningMarkers()
    return [markers.solution_end] if style.answer_style == "tags" else []


def extract(completion: str, style: PromptStyle, *, markers: ReasoningMarkers | None = None, prompt: str = "",
            last_number: bool = False) -> str | None:
    """The answer in a completion by the style's rule (``last_number``: fall back to the last number)."""
    markers = markers or ReasoningMarkers()
    tags = ((markers.solution_start, markers.solution_end),)
    if style.answer_style == "auto":
        tags += (("<answer>", "</answer>"),)
    return extract_answer(completion, style=style.answer_style, tags=tags, prompt_suffix=prompt[-200:],
                          last_number=last_number)
