"""An Ollama ``Modelfile`` beside a GGUF: ``ollama create NAME -f Modelfile`` then ``ollama run NAME``.

Ollama does not run Jinja chat templates; it runs a Go ``text/template``. How it renders a chat request
(ollama/ollama server/routes.go ``ChatHandler``, server/prompt.go, template/template.go):

1. the Modelfile's SYSTEM becomes the first message when the request does not start with a system message;
2. consecutive messages of one role are merged (joined by a blank line);
3. the TEMPLATE runs on ``.Messages`` (each with ``.Role``, ``.Content``, ``.Thinking``), ``.Think`` and
   ``.IsThinkSet``. A template that shows ``.Thinking`` between ``<think>`` tags inside ``range .Messages`` makes
   the model "thinking": ``think`` then defaults to true and the reply's ``<think>`` block is returned apart.

posttrain writes a TEMPLATE for three shapes of chat template, read off the tokenizer's own template by rendering
it: ChatML (posttrain's ``chatml``; with Qwen3's thinking rules for ``qwen3``; Qwen and SmolLM2 tokenizers, with
the default system prompt a template injects), Llama 3 headers, and posttrain's ``reasoning`` template (system
text + EOS, the user's raw text, assistant text + EOS, a generation prompt that opens the reasoning marker).
Before writing it, :func:`chat_shape` renders a set of conversations both with the Jinja template and the way
Ollama renders the Go template (:func:`ollama_prompt`, a transcription of the rules above and of the templates
below) and keeps the TEMPLATE only if every prompt is identical; otherwise the Modelfile says why and leaves it
out. tests/ollama_render runs the written Modelfile through Go's real ``text/template`` to hold the two equal.

Quoting: Ollama's Modelfile parser has no escapes. A triple-quoted value ends at the first line end that follows a
closing triple quote, and characters that are not printable (other than space, tab and line ends) are dropped.
Every value written here is read back with a transcription of that parser (:func:`read_back`) and must come back
unchanged; literal template text that could collide with it (quotes, braces, non-ASCII) is written as a Go string
literal (``{{ "..." }}``), which Go's template parser unescapes, and a system prompt that cannot be written as
SYSTEM is rendered by the template itself.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path

CHATML, LLAMA3, REASONING = "chatml", "llama3", "reasoning"
THINK_BLOCK = "<think>\n\n</think>\n\n"  # Qwen3's generation prompt with enable_thinking=false
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"

# Conversations the Go template must render exactly as the Jinja template does: as a chat request reaches
# Ollama (each ends with a user turn; Ollama always opens the assistant's turn). "thinking" is the reasoning an
# Ollama client sends back apart from the content (Jinja: reasoning_content).
_Q = 'What is 12 + 30? Say "42" or {{ .System }} \u2014 "quoted", with a\nsecond line'
PROBES: list[tuple[list[dict], bool | None]] = [
    ([{"role": "user", "content": "Hi"}], None),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": _Q}], None),
    ([{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
      {"role": "user", "content": "And 3 + 3?"}], None),
    ([{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "1 + 1?"},
      {"role": "assistant", "content": "2", "thinking": "one and one"}, {"role": "user", "content": _Q},
      {"role": "assistant", "content": "The answer is 42."}, {"role": "user", "content": "Thanks!"}], None),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "system", "content": "Now answer in French."}, {"role": "user", "content": "c"}], None),
    ([{"role": "user", "content": "Hi"}], False),
]


@dataclass(frozen=True)
class ChatShape:
    """What a Go template needs to know of a chat template. ``eos``: the text that ends a reasoning-template
    turn; ``generation``: its generation prompt; ``thinking``: Qwen3's rules (reasoning shown only after the last
    user turn, ``think=false`` pre-fills an empty think block)."""

    kind: str
    default_system: str | None = None
    eos: str = ""
    generation: str = ""
    thinking: bool = False

    @property
    def end_of_turn(self) -> str:
        return {CHATML: IM_END, LLAMA3: EOT}.get(self.kind, self.eos)


# --------------------------------------------------------------------------------------------------
# Go templates


def _go_string(s: str) -> str:
    """A Go interpreted string literal that is plain printable ASCII (safe inside any Modelfile value)."""
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def _lit(s: str) -> str:
    """Literal text of a Go template: as it is when nothing in it can collide with the template's delimiters or
    the Modelfile's quoting, else a string-literal action."""
    if not s:
        return ""
    plain = all(" " <= ch <= "~" or ch in "\n\t" for ch in s) and not any(c in s for c in '{}"\\')
    return s if plain else "{{ " + _go_string(s) + " }}"


def go_template(shape: ChatShape, embed_system: bool = False) -> str:
    """The Go TEMPLATE for ``shape``. ``embed_system``: the template itself adds ``shape.default_system`` when the
    conversation does not start with a system message (used when it cannot be written as SYSTEM)."""
    if shape.kind == REASONING:
        eos = _lit(shape.eos)
        body = ('{{- range $i, $m := .Messages }}{{ if eq .Role "system" }}{{ if eq $i 0 }}{{ .Content }}' + eos
                + '{{ end }}{{ else if eq .Role "user" }}{{ .Content }}{{ else if eq .Role "assistant" }}{{ .Content }}'
                + eos + "{{ end }}{{ end }}" + _lit(shape.generation))
        default = _go_string(shape.default_system or "")
        head = "{{ " + default + " }}" + eos
    elif shape.kind == LLAMA3:
        body = ("{{- range .Messages }}" + HEADER + "{{ .Role }}" + END_HEADER + "\n\n{{ .Content }}" + EOT
                + "{{ end }}" + HEADER + "assistant" + END_HEADER + "\n\n")
        head = HEADER + "system" + END_HEADER + "\n\n{{ " + _go_string(shape.default_system or "") + " }}" + EOT
    elif shape.thinking:
        body = ('{{- $lastUser := -1 }}{{ range $i, $m := .Messages }}{{ if eq .Role "user" }}{{ $lastUser = $i }}'
                "{{ end }}{{ end }}"
                "{{- range $i, $m := .Messages }}" + IM_START + "{{ .Role }}\n"
                '{{ if and (eq .Role "assistant") (gt $i $lastUser) }}<think>\n{{ .Thinking }}\n</think>\n\n{{ end }}'
                "{{ .Content }}" + IM_END + "\n{{ end }}" + IM_START + "assistant\n"
                "{{ if and $.IsThinkSet (not $.Think) }}" + THINK_BLOCK + "{{ end }}")
        head = IM_START + "system\n{{ " + _go_string(shape.default_system or "") + " }}" + IM_END + "\n"
    else:
        body = ("{{- range .Messages }}" + IM_START + "{{ .Role }}\n{{ .Content }}" + IM_END + "\n{{ end }}"
                + IM_START + "assistant\n")
        head = IM_START + "system\n{{ " + _go_string(shape.default_system or "") + " }}" + IM_END + "\n"
    if embed_system and shape.default_system is not None:
        return '{{- if and .Messages (ne (index .Messages 0).Role "system") }}' + head + "{{ end }}" + body
    return body


def ollama_prompt(shape: ChatShape, messages: list[dict], think: bool | None = None) -> str:
    """The prompt Ollama renders from ``go_template(shape)`` with SYSTEM ``shape.default_system`` (or that prompt
    embedded in the template) for a chat request of ``messages`` (``think``: the request's think option; None =
    not given)."""
    msgs = [dict(m) for m in messages]
    if shape.default_system is not None and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": shape.default_system})
    merged: list[dict] = []
    for m in msgs:  # Ollama's collate
        if merged and merged[-1]["role"] == m["role"] and m["role"] != "tool":
            merged[-1]["content"] += "\n\n" + m["content"]
        else:
            merged.append(m)
    if shape.kind == REASONING:
        out = []
        for i, m in enumerate(merged):  # a system message counts only first (the Jinja reads messages[0])
            if (m["role"] == "system" and i == 0) or m["role"] == "assistant":
                out.append(m["content"] + shape.eos)
            elif m["role"] == "user":
                out.append(m["content"])
        return "".join(out) + shape.generation
    if shape.kind == LLAMA3:
        return "".join(f"{HEADER}{m['role']}{END_HEADER}\n\n{m['content']}{EOT}" for m in merged) + \
            f"{HEADER}assistant{END_HEADER}\n\n"
    last_user = max((i for i, m in enumerate(merged) if m["role"] == "user"), default=-1)
    out = []
    for i, m in enumerate(merged):
        out.append(f"{IM_START}{m['role']}\n")
        if shape.thinking and m["role"] == "assistant" and i > last_user:
            out.append(f"<think>\n{m.get('thinking', '')}\n</think>\n\n")
        out.append(m["content"] + IM_END + "\n")
    out.append(IM_START + "assistant\n")
    if shape.thinking and think is False:  # (a thinking template makes Ollama default think to true)
        out.append(THINK_BLOCK)
    return "".join(out)


# --------------------------------------------------------------------------------------------------
# Reading the tokenizer's template


def jinja_prompt(tok, messages: list[dict], think: bool | None = None) -> str:
    """The tokenizer's rendering of a chat request as Ollama would see it: generation prompt opened, the
    BOS text left out when the tokenizer adds BOS itself (llama.cpp adds it when Ollama tokenizes)."""
    msgs = [{"role": m["role"], "content": m["content"],
             **({"reasoning_content": m["thinking"]} if m.get("thinking") else {})} for m in messages]
    kwargs = {} if think is None else {"enable_thinking": think}
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kwargs)
    bos = tok.bos_token
    if bos and text.startswith(bos) and _adds_bos(tok):
        text = text[len(bos):]
    return text


def _adds_bos(tok) -> bool:
    with_special = tok("a", add_special_tokens=True)["input_ids"]
    return tok.bos_token_id is not None and len(with_special) > len(tok("a", add_special_tokens=False)["input_ids"]) \
        and with_special[0] == tok.bos_token_id


def _guess_shape(tok) -> ChatShape | None:
    u = "@@USER@@"
    plain = jinja_prompt(tok, [{"role": "user", "content": u}])
    bare = tok.apply_chat_template([{"role": "user", "content": u}], tokenize=False, add_generation_prompt=False)
    no_think = jinja_prompt(tok, [{"role": "user", "content": u}], think=False)
    for kind, head, turn in ((CHATML, f"{IM_START}system\n", f"{IM_START}user\n{u}{IM_END}\n"),
                             (LLAMA3, f"{HEADER}system{END_HEADER}\n\n", f"{HEADER}user{END_HEADER}\n\n{u}{EOT}")):
        if turn in plain:
            end = IM_END if kind == CHATML else EOT
            before = plain[:plain.index(turn)]
            default = before[len(head):-len(end) - (kind == CHATML)] if before.startswith(head) else None
            return ChatShape(kind, default_system=default,
                             thinking=kind == CHATML and no_think == plain + THINK_BLOCK)
    eos = tok.eos_token or ""
    if eos and bare.endswith(eos + u) and plain.startswith(bare):
        return ChatShape(REASONING, default_system=bare[:-len(eos + u)], eos=eos, generation=plain[len(bare):])
    return None


def chat_shape(tok) -> tuple[ChatShape | None, str]:
    """-> (the shape of the tokenizer's chat template, "") when a Go template reproduces it on every probe
    conversation, else (None, why not)."""
    try:
        shape = _guess_shape(tok)
    except Exception as exc:  # noqa: BLE001 - a template that cannot render a plain conversation
        return None, f"the chat template does not render a plain user message ({type(exc).__name__}: {exc})"
    if shape is None:
        return None, "it is none of ChatML, Llama 3 and posttrain's reasoning template"
    for messages, think in PROBES:
        try:
            want = jinja_prompt(tok, messages, think)
        except Exception as exc:  # noqa: BLE001
            return None, f"the chat template fails on {_roles(messages)} ({type(exc).__name__}: {exc})"
        if ollama_prompt(shape, messages, think) != want:
            return None, f"a Go template renders {_roles(messages)} differently from the chat template"
    return shape, ""


def _roles(messages: list[dict]) -> str:
    return "a conversation " + "/".join(m["role"] for m in messages)


# --------------------------------------------------------------------------------------------------
# The Modelfile


def _printable(ch: str) -> bool:
    """Go's unicode.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space."""
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def read_back(value: str) -> str | None:
    """What Ollama's Modelfile parser reads for a command's value written as ``value``; None when the value
    would end before its last character (the rest would be parsed as further commands)."""
    buf = []
    for i, ch in enumerate(value + "\n"):
        if ch in "\r\n":
            text, ok = _unquote("".join(buf).strip())
            if ok:
                return text if i >= len(value) else None
            buf.append(ch)
        elif ch in " \t" or _printable(ch):
            buf.append(ch)
    return None


def modelfile_value(s: str) -> str | None:
    """``s`` quoted so that Ollama reads it back exactly, or None if it cannot be (no escapes exist)."""
    triple, single = '"""' + s + '"""', '"' + s + '"'
    for q in ((triple, single) if "\n" in s or '"' in s else (single, triple)):
        if read_back(q) == s:
            return q
    return None


def write_modelfile(out_dir: Path, gguf_name: str, tok, stop_tokens: list[str], sampling: dict | None = None,
                    final_dir: Path | None = None, log=None) -> Path:
    """Write ``out_dir/Modelfile``. ``final_dir``: where the export ends up (``out_dir`` may be a staging folder
    that is renamed afterwards); the comment's ``ollama create`` command names it. ``log(message)`` hears why a
    TEMPLATE could not be written (Ollama would then run the model on prompts it guesses)."""
    where = Path(final_dir if final_dir is not None else out_dir).resolve()
    lines = [f"# Ollama: ollama create my-model -f {where / 'Modelfile'} && ollama run my-model",
             f"FROM ./{gguf_name}"]
    shape, why = chat_shape(tok)
    if shape is not None:
        # Ollama ignores an empty SYSTEM: an empty default system prompt is rendered by the template too
        system = modelfile_value(shape.default_system) if shape.default_system else None
        template = modelfile_value(go_template(shape, embed_system=system is None))
        if template is None:  # cannot happen: the template text is printable, with no triple quote at a line end
            shape, why = None, "its Go template cannot be quoted for a Modelfile"
    if shape is not None:
        lines.append(f"TEMPLATE {template}")
        if system is not None:
            lines.append(f"SYSTEM {system}")
        stop_tokens = [*stop_tokens, shape.end_of_turn]
    else:
        lines.append(f"# posttrain wrote no TEMPLATE: {why}. Ollama will try to detect the template from the GGUF's "
                     "tokenizer.chat_template; add a TEMPLATE line if it does not")
        if log is not None:
            log(f"note: the Ollama Modelfile has no TEMPLATE ({why}); Ollama will guess the chat format")
    for t in dict.fromkeys(stop_tokens):
        value = modelfile_value(t) if t else None
        lines.append(f"PARAMETER stop {value}" if value else f"# stop token {t!r} cannot be written in a Modelfile")
    for k, v in (sampling or {}).items():
        lines.append(f"PARAMETER {k} {v}")
    path = out_dir / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path


__all__ = [
    "PROBES",
    "ChatShape",
    "chat_shape",
    "go_template",
    "jinja_prompt",
    "modelfile_value",
    "ollama_prompt",
    "read_back",
    "write_modelfile",
]
