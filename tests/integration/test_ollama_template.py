"""The Ollama Modelfile renders every chat template posttrain ships exactly as the tokenizer's Jinja template.

The Modelfile posttrain writes is parsed and rendered by tests/ollama_render (Go's real ``text/template``, with a
transcription of Ollama's Modelfile parser and of what Ollama passes to the template), and every prompt is
compared with ``apply_chat_template``. Go comes from the Debian package golang-go (CI installs it); without it
the Go half is skipped and says so, and the Python transcription (``ollama_prompt``) is still checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from posttrain.config import ReasoningMarkers
from posttrain.data.templates import install_template
from posttrain.errors import UserError
from posttrain.export.ollama import (
    PROBES,
    chat_shape,
    go_template,
    jinja_prompt,
    modelfile_value,
    ollama_prompt,
    read_back,
    write_modelfile,
)
from posttrain.tiny import qwen_tokenizer

RENDERER = Path(__file__).resolve().parents[1] / "ollama_render"
LLAMA3_TEMPLATE = (  # Meta's Llama 3 instruct template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
ODD_SYSTEM = 'Reply with """\nthree quotes, a {{ .Content }}, a tab\there, a non-breaking\u00a0space and \u00e9.'
ODD_MARKERS = ReasoningMarkers(reasoning_start='<work "a">', reasoning_end="</work>", solution_start="{ans}",
                               solution_end="{/ans}")
# Conversations beyond the probes, for posttrain's own templates: a conversation that ends with the assistant
# (Ollama closes the turn and opens a new one, as add_generation_prompt does), thinking after the last user turn.
TRAILING = [([{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2", "thinking": "one, one"}],
             None),
            ([{"role": "system", "content": "S"}, {"role": "user", "content": "u"}, {"role": "assistant",
                                                                                     "content": "a"}], None)]
INLINE_THINK = [([{"role": "user", "content": "1 + 1?"},
                  {"role": "assistant", "content": "<think>\none and one\n</think>\n\n2"},
                  {"role": "user", "content": "2 + 2?"}], None)]


def _qwen(template: str | None = None, base: bool = False, **kw):
    try:
        tok = qwen_tokenizer(base=base)
    except (UserError, ValueError, ImportError) as exc:
        pytest.skip(f"no Qwen tokenizer here: {exc}")
    if template:
        install_template(tok, template, **kw)
    return tok


def _smollm2(template: str | None = None):
    from transformers import AutoTokenizer

    from posttrain.models import materialize_alias

    try:
        tok = AutoTokenizer.from_pretrained(materialize_alias("smollm2-135m-instruct"))
    except UserError as exc:
        pytest.skip(str(exc))
    if template:
        install_template(tok, template)
    return tok


def _chatml_odd_default():
    """SmolLM2's kind of template (ChatML that injects a default system prompt) with a system prompt that cannot be
    a SYSTEM line."""
    tok = _qwen()
    tok.chat_template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\n' + " + json.dumps(ODD_SYSTEM) + " + '<|im_end|>\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    return tok


def _llama3():
    """A tokenizer that adds BOS itself and carries Meta's Llama 3 template (the vocabulary does not matter:
    templates render text)."""
    from tokenizers.processors import TemplateProcessing

    tok = _qwen()
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    tok._tokenizer.post_processor = TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    tok.chat_template = LLAMA3_TEMPLATE
    assert tok("a")["input_ids"][0] == bos
    return tok


# name -> (tokenizer factory, GGUF architecture, extra conversations that must match too)
TEMPLATES = {
    "chatml": (lambda: _qwen("chatml"), "qwen3", TRAILING),
    "qwen3": (lambda: _qwen("qwen3"), "qwen3", TRAILING + INLINE_THINK),
    "reasoning (Qwen base)": (lambda: _qwen("reasoning", base=True), "qwen3", TRAILING),
    "reasoning (quickstart: SmolLM2)": (lambda: _smollm2("reasoning"), "llama", TRAILING),
    "reasoning, odd markers and system prompt": (
        lambda: _qwen("reasoning", base=True, markers=ODD_MARKERS, system_prompt=ODD_SYSTEM), "qwen3", TRAILING),
    "reasoning, empty system prompt": (lambda: _qwen("reasoning", base=True, system_prompt=""), "qwen3", TRAILING),
    "tokenizer: SmolLM2": (lambda: _smollm2(), "llama", []),
    "tokenizer: tiny Qwen3": (lambda: _qwen(), "qwen3", INLINE_THINK),
    "tokenizer: Llama 3": (_llama3, "llama", []),
    "tokenizer: ChatML, odd default system prompt": (_chatml_odd_default, "llama", []),
}


def _go_renderer(tmp_path_factory) -> Path | None:
    if shutil.which("go") is None:
        return None
    out = tmp_path_factory.mktemp("ollama_render") / "ollama-render"
    env = {**os.environ, "GOPROXY": "off", "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    env.setdefault("GOCACHE", str(out.parent / "gocache"))
    proc = subprocess.run(["go", "build", "-o", str(out), "."], cwd=RENDERER, env=env, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    binary = _go_renderer(tmp_path_factory)

    def render(modelfile: str, arch: str, cases) -> dict:
        if binary is None:
            pytest.skip("Go is not installed (apt-get install golang-go): Ollama's text/template cannot be run; "
                        "the Python transcription of it is still tested")
        payload = {"modelfile": modelfile, "arch": arch,
                   "cases": [{"messages": m, "think": think} for m, think in cases]}
        proc = subprocess.run([str(binary)], input=json.dumps(payload), capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    return render


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_ollama_renders_the_chat_template_exactly(name, go_render, tmp_path):
    make_tok, arch, extra = TEMPLATES[name]
    tok = make_tok()
    shape, why = chat_shape(tok)
    assert shape is not None, why
    cases = PROBES + extra
    want = [jinja_prompt(tok, m, think) for m, think in cases]
    # the Python transcription that decides, at export time, whether a TEMPLATE is written
    if not any(c in INLINE_THINK for c in extra):
        assert [ollama_prompt(shape, m, think) for m, think in cases] == want
    final = tmp_path / "exports" / "gguf"
    modelfile = write_modelfile(tmp_path, "m-q8_0.gguf", tok, [tok.eos_token], final_dir=final).read_text()
    assert f"-f {final.resolve() / 'Modelfile'} " in modelfile.splitlines()[0]
    got = go_render(modelfile, arch, cases)
    assert got["template"] == go_template(shape, embed_system=got["system"] is None)
    for (messages, think), w, g, err in zip(cases, want, got["prompts"], got["errors"]):
        assert err is None and g == w, (messages, think, err, g, w)
    assert shape.end_of_turn in got["stop"] and tok.eos_token in got["stop"]
    assert got["thinking"] == shape.thinking  # Ollama returns Qwen3's <think> block apart, and only there


def test_the_shapes_posttrain_ships():
    assert chat_shape(_qwen("qwen3"))[0].thinking and not chat_shape(_qwen("chatml"))[0].thinking
    shape = chat_shape(_smollm2("reasoning"))[0]
    assert (shape.kind, shape.eos, shape.generation) == ("reasoning", "<|im_end|>", "<start_working_out>")
    assert shape.default_system.startswith("You are given a problem.\nThink about the problem")
    smollm2 = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert chat_shape(_smollm2())[0].default_system == smollm2


def test_odd_system_prompt_is_rendered_by_the_template_not_written_as_system(tmp_path):
    """Ollama's parser has no escapes: a system prompt with a triple quote at a line end, or characters it drops,
    cannot be a SYSTEM line; the template then carries it as a Go string literal."""
    tok = _qwen("reasoning", base=True, markers=ODD_MARKERS, system_prompt=ODD_SYSTEM)
    text = write_modelfile(tmp_path, "m.gguf", tok, ["<|endoftext|>"]).read_text()
    assert "\nSYSTEM " not in text and "\\u00a0" in text
    assert chat_shape(tok)[0].default_system == ODD_SYSTEM


def test_modelfile_values_read_back_as_ollama_reads_them():
    assert read_back('"""a\n"b"\n"""') == 'a\n"b"\n'
    assert read_back('"<|im_end|>"') == "<|im_end|>"
    assert read_back('"""say """\nmore"""') is None  # the value ends at the first line end after """
    assert read_back('"""x\u200by"""') == "xy"  # unprintable runes are dropped
    for s in ["plain", 'a "quoted" word', 'ends with a quote"', 'x"""y', "line\nbreak", '"""', "tab\tand  spaces "]:
        assert read_back(modelfile_value(s)) == s
    for s in ['say """\nmore', "zero\u200bwidth", "nb\u00a0sp", 'a"""  \nb']:
        assert modelfile_value(s) is None


LLAMA31_LIKE = (  # Llama 3.1's shape: a system turn always, with a preamble before the system prompt
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\n{{ sys }}<|eot_id|>"
    "{% for m in msgs %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.mark.parametrize("make, template, why", [
    (_qwen, "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}", "none of"),
    (_llama3, LLAMA31_LIKE, "renders a conversation system/user differently"),
    (_qwen, ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
             "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"), "fails on"),
])
def test_templates_it_cannot_reproduce_get_no_template_line(make, template, why, tmp_path):
    tok = make()
    tok.chat_template = template
    shape, reason = chat_shape(tok)
    assert shape is None and why in reason, reason
    notes = []
    text = write_modelfile(tmp_path, "m.gguf", tok, ["<|im_end|>"], log=notes.append).read_text()
    assert not any(line.startswith("TEMPLATE ") for line in text.splitlines()) and reason in text
    assert len(notes) == 1 and reason in notes[0]  # the export says so, not only the file
