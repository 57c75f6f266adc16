"""An Ollama ``Modelfile`` beside a GGUF: ``ollama create NAME -f Modelfile`` then ``ollama run NAME``.

Ollama does not run Jinja chat templates; it needs a Go template. posttrain writes one for the two template
families it recognises by rendering the model's own Jinja template (ChatML: Qwen, SmolLM; Llama 3 headers), a
default system prompt when the Jinja template injects one (SmolLM2 does), and a ``stop`` line for every
end-of-turn token. For any other template the Modelfile says so and leaves TEMPLATE out (Ollama then falls
back to the template it detects from the GGUF's ``tokenizer.chat_template``, or to raw prompts).
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    '{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
    '{{- range .Messages }}{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
    '{{ end }}{{- end }}<|im_start|>assistant\n'
)
LLAMA3 = (
    '{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
    '{{- range .Messages }}{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
    '{{ .Content }}<|eot_id|>{{ end }}{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n'
)


def _render(tok, messages) -> str | None:
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:
        return None


def template_family(tok) -> tuple[str | None, str | None]:
    """-> (Go template or None, default system prompt the Jinja template adds on its own or None)."""
    user = [{"role": "user", "content": "@@USER@@"}]
    text = _render(tok, user)
    if text is None:
        return None, None
    if "<|im_start|>user\n@@USER@@<|im_end|>" in text:
        go, head = CHATML, "<|im_start|>system\n"
        end = "<|im_end|>"
    elif "<|start_header_id|>user<|end_header_id|>\n\n@@USER@@<|eot_id|>" in text:
        go, head = LLAMA3, "<|start_header_id|>system<|end_header_id|>\n\n"
        end = "<|eot_id|>"
    else:
        return None, None
    default_system = None
    if head in text:
        start = text.index(head) + len(head)
        default_system = text[start:text.index(end, start)]
    return go, default_system


def _quote(s: str) -> str:
    return '"""' + s.replace('"""', '\\"\\"\\"') + '"""'


def write_modelfile(out_dir: Path, gguf_name: str, tok, stop_tokens: list[str], sampling: dict | None = None) -> Path:
    go, default_system = template_family(tok)
    lines = [f"# Ollama: ollama create my-model -f {out_dir.name}/Modelfile && ollama run my-model",
             f"FROM ./{gguf_name}"]
    if go:
        lines.append(f"TEMPLATE {_quote(go)}")
    else:
        lines.append("# posttrain could not translate this chat template to Ollama's Go template syntax; "
                     "add a TEMPLATE line if Ollama does not detect it from the GGUF")
    if default_system:
        lines.append(f"SYSTEM {_quote(default_system)}")
    for t in stop_tokens:
        lines.append(f'PARAMETER stop "{t}"')
    for k, v in (sampling or {}).items():
        lines.append(f"PARAMETER {k} {v}")
    path = out_dir / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path
