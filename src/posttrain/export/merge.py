"""Merge a LoRA adapter into dense 16-bit weights and save them as a plain transformers checkpoint.

The merge is ``W' = W + (alpha / r) * B @ A`` (PEFT's ``get_delta_weight``; DoRA rescales each output row), always
computed in float32 and cast to the output dtype (bfloat16 by default) once, after the merge:

- A dense base (``merge``): PEFT's ``merge_and_unload`` in the precision the model was loaded in (float32 on CPU;
  on GPU a bf16 base is bf16 already, and ``W + BA`` is rounded to bf16 once either way).
- A 4-bit (QLoRA) base (``merge_4bit``): each adapted layer's NF4 weight is dequantized to float32 (bitsandbytes'
  ``dequantize_4bit`` with the layer's quant state, double quantization included), the adapter's update is added
  in float32, and only the sum is cast to the output dtype, one layer at a time (memory: the 4-bit model plus one
  float32 layer). So ``W`` is exactly the NF4 weight the adapter was trained against, as in Unsloth's
  ``merged_16bit`` (which dequantizes to the 16-bit compute dtype first, then merges in float32). Dequantizing the
  whole model to bf16 first (transformers' ``model.dequantize()`` on GPU) would round ``W`` and then ``W + BA``
  again; merging into the 4-bit weights instead would re-quantize and lose most of the update.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from posttrain.errors import UserError
from posttrain.rollout import stop_token_ids

DTYPES = ("bfloat16", "float16", "float32")


def merge(model):
    """PeftModel -> plain transformers model with the adapter folded in (a plain model is returned as is)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload(safe_merge=True)
    return model


def dequantized_fp32(weight) -> torch.Tensor:
    """The float32 values of a bitsandbytes 4-bit weight: its quant state with the output dtype set to float32 (the
    NF4 code times the block's absmax, itself dequantized first under double quantization)."""
    import bitsandbytes.functional as bnbf

    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bnb 0.50 repacks a CPU weight for its AVX512-BF16 kernel at the first no-grad eval forward, with its
        # absmax rounded to bf16 (lossy: bitsandbytes/functional.py _convert_weight_packed_for_cpu); merge a fresh load
        raise RuntimeError("this 4-bit weight was repacked by bitsandbytes' CPU inference kernel; merge a model that "
                           "has not run an inference forward on CPU")
    state = copy.copy(state)
    state.dtype = torch.float32
    return bnbf.dequantize_4bit(weight.data, state)


def merge_4bit(model, dtype: str):
    """A PeftModel on a 4-bit base -> a plain model in ``dtype``: every LoRA layer merged in float32 and every other
    4-bit layer dequantized (the module docstring); the remaining weights are cast to ``dtype``."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    out_dtype = getattr(torch, dtype)
    done: list[str] = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(prefix + ".") for prefix in done):
            continue  # inside a layer already replaced
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), bnb.nn.Linear4bit):
            _replace(model, name, _linear(*_merged_fp32(module, name), out_dtype))
            done.append(name)
        elif isinstance(module, bnb.nn.Linear4bit):
            _replace(model, name, _linear(dequantized_fp32(module.weight), module.bias, out_dtype))
            done.append(name)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()  # unwraps what is left (modules_to_save); no LoRA layer remains
    if getattr(model, "hf_quantizer", None) is not None:  # what transformers' own dequantize() removes after it
        model.hf_quantizer.remove_quantization_config(model)
    model.is_loaded_in_4bit = False
    return model.to(out_dtype)


def _merged_fp32(module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of one 4-bit LoRA layer with its active adapters merged, in float32 (as PEFT's
    ``Linear4bit.merge`` does it, without re-quantizing)."""
    from peft.utils.other import transpose

    base = module.get_base_layer()
    w = dequantized_fp32(base.weight)
    bias = base.bias.float() if base.bias is not None else None
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        delta = module.get_delta_weight(adapter).float()
        if adapter in module.lora_variant:  # DoRA: the magnitude over the row norm of the unmerged W + delta
            norm = module.lora_magnitude_vector[adapter].get_weight_norm(
                w, transpose(delta, module.fan_in_fan_out), scaling=1).detach()
            scale = module.lora_magnitude_vector[adapter].weight.float() / norm
            w = transpose(scale.view(-1, 1), module.fan_in_fan_out) * (w + delta)
        else:
            w = w + delta
        if module.lora_bias[adapter]:
            bias = bias + module.lora_B[adapter].bias.float()
    if not torch.isfinite(w).all():
        raise UserError(f"merging the adapter into {name} gave NaN or infinite weights: the adapter is broken; "
                        "export it with --format adapter and check its training metrics")
    return w, bias


def _linear(weight: torch.Tensor, bias, dtype) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return layer


def _replace(model, name: str, new) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def cast(model, dtype: str):
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
