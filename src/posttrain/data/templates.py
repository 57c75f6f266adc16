"""Chat templates: the tokenizer's own, and built-ins ``chatml`` (Qwen instruct), ``qwen3`` (with its thinking
blocks) and ``reasoning`` (the seeds' GRPO template with configurable markers).

Built-ins are Jinja strings installed on the tokenizer (``tokenizer.chat_template``), so a saved tokenizer,
an exported model and ``posttrain chat`` all render exactly what training saw.
"""

from __future__ import annotations

from posttrain.config import ReasoningMarkers
from posttrain.errors import UserError

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3's rules for thinking: an assistant turn's reasoning (``reasoning_content`` or the text inside
# <think>...</think>) is rendered only for turns after the last user message; the generation prompt opens the
# assistant turn, and ``enable_thinking=false`` pre-fills an empty think block.
QWEN3 = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}{%- set reasoning = message.get('reasoning_content') or '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_user %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def reasoning_system_prompt(m: ReasoningMarkers) -> str:
    """The seeds' system prompt, word for word (the two solution tags are adjacent, as in the notebook)."""
    return (f"You are given a problem.\nThink about the problem and provide your working out.\n"
            f"Place it between {m.reasoning_start} and {m.reasoning_end}.\n"
            f"Then, provide your solution between {m.solution_start}{m.solution_end}")


def _jinja_str(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def reasoning_template(m: ReasoningMarkers, system_prompt: str | None = None) -> str:
    """The seeds' GRPO template: system + EOS, the user's raw text, assistant + EOS, and a generation prompt
    that opens the reasoning marker."""
    system = _jinja_str(system_prompt if system_prompt is not None else reasoning_system_prompt(m))
    return (
        "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + eos_token }}"
        "{%- set loop_messages = messages[1:] %}"
        "{%- else %}{{- " + system + " + eos_token }}{%- set loop_messages = messages %}{%- endif %}"
        "{%- for message in loop_messages %}"
        "{%- if message['role'] == 'user' %}{{- message['content'] }}"
        "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- " + _jinja_str(m.reasoning_start) + " }}{%- endif %}"
    )


def install_template(tokenizer, template: str, markers: ReasoningMarkers | None = None,
                     system_prompt: str | None = None) -> None:
    """Put the chosen chat template on the tokenizer, and make the end-of-turn token its EOS so that
    generation stops where training taught it to (the Qwen base ``<|endoftext|>`` vs ``<|im_end|>`` pitfall)."""
    markers = markers or ReasoningMarkers()
    if template == "tokenizer":
        if not tokenizer.chat_template:
            raise UserError("data.template=tokenizer but this tokenizer has no chat template (a base model?): "
                            "set data.template to chatml, qwen3 or reasoning")
        return
    if template == "reasoning":
        tokenizer.chat_template = reasoning_template(markers, system_prompt)
        return
    tokenizer.chat_template = {"chatml": CHATML, "qwen3": QWEN3}[template]
    if system_prompt is not None:
        raise UserError(f"data.system_prompt applies to the reasoning template; with template={template} "
                        "put a system message in the data instead")
    end = "<|im_end|>"
    if tokenizer.convert_tokens_to_ids(end) in (None, tokenizer.unk_token_id):
        tokenizer.add_special_tokens({"additional_special_tokens": [end]})
    tokenizer.eos_token = end


def render_messages(tokenizer, messages: list[dict], template: str | None = None,
                    markers: ReasoningMarkers | None = None, system_prompt: str | None = None,
                    add_generation_prompt: bool = False, **kwargs) -> str:
    """Render a conversation to text with the tokenizer's template (installing ``template`` first if given)."""
    if template is not None:
        install_template(tokenizer, template, markers, system_prompt)
    elif not tokenizer.chat_template:
        raise UserError("this tokenizer has no chat template: choose data.template (chatml, qwen3 or reasoning)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **kwargs)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the exact character span of every assistant turn (its content and
    end-of-turn marker), found by rendering the conversation up to each turn: the text added by turn i is
    render(messages[:i+1]) minus render(messages[:i], add_generation_prompt=True)."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if full.startswith(upto):
            if upto.startswith(before):
                spans.append((len(before), len(upto)))
                continue
            # The generation prompt pre-fills part of the turn (the reasoning template opens its marker):
            # the turn then starts where the previous messages end.
            plain = tokenizer.apply_chat_template(messages[:i], tokenize=False) if i else ""
            if upto.startswith(plain):
                spans.append((len(plain), len(upto)))
                continue
        # Templates that rewrite earlier turns (Qwen3 drops old thinking): locate the turn's own text.
        content = msg["content"].split("</think>")[-1].strip()
        start = full.find(content, spans[-1][1] if spans else 0)
        if not content or start < 0:
            raise UserError(f"cannot locate assistant turn {i} in the rendered conversation; "
                            "use data.train_on=all or another data.template")
        end = start + len(content)
        eos = tokenizer.eos_token or ""
        if eos and full.startswith(eos, end):
            end += len(eos)
        spans.append((start, end))
    return full, spans
