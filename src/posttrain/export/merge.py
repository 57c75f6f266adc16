"""Merge a LoRA adapter into dense 16-bit weights and save them as a plain transformers checkpoint.

The merge is ``W' = W + (alpha / r) * B @ A`` (PEFT's ``merge_and_unload``), done in the precision the model was
loaded in (float32 on CPU). A 4-bit (QLoRA) base is dequantized first, so ``W`` is exactly the NF4 weight the
adapter was trained against (Unsloth's ``merged_16bit``); merging into 4-bit weights instead would round most of
the LoRA update away. The result is cast to the output dtype (bfloat16 by default) only after the merge.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.rollout import stop_token_ids

DTYPES = ("bfloat16", "float16", "float32")


def merge(model):
    """PeftModel -> plain transformers model with the adapter folded in (a plain model is returned as is)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload(safe_merge=True)
    return model


def cast(model, dtype: str):
    import torch

    return model.to(getattr(torch, dtype))


def save_merged(model, tok, out_dir: str | Path, *, max_shard_size: str = "5GB") -> Path:
    """Write safetensors shards, config, a generation config that stops on every EOS id (for a model that
    generates), and the tokenizer with its chat template."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    if not model.can_generate():  # a reward model (sequence classifier): weights, config and tokenizer only
        model.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
        tok.save_pretrained(out)
        return out
    eos = stop_token_ids(model, tok)
    gen = model.generation_config if model.generation_config is not None else GenerationConfig()
    gen.eos_token_id = list(eos) if len(eos) > 1 else eos[0]
    gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    if tok.bos_token_id is not None:
        gen.bos_token_id = tok.bos_token_id
    model.generation_config = gen
    model.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
    tok.save_pretrained(out)
    return out
