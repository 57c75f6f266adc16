"""The Unsloth model backend (``model.backend: unsloth``; extra ``[unsloth]``; one CUDA GPU, one process).

Only Unsloth's public API is used: ``FastLanguageModel.from_pretrained(model_name, max_seq_length, dtype,
load_in_4bit, ...)`` and ``FastLanguageModel.get_peft_model(model, r, target_modules, lora_alpha, lora_dropout,
bias, use_gradient_checkpointing, random_state, use_rslora)``, exactly the calls of the seeds' notebooks. The
model it returns is a PEFT model, so posttrain's own SFT and GRPO loops train it unchanged; nothing in Unsloth,
TRL or transformers is patched by posttrain (importing unsloth patches transformers itself: that is Unsloth's
choice, made when the user asks for this backend).

Where Unsloth differs from the transformers backend, posttrain adapts or refuses before training starts:

- **Dtype.** ``from_pretrained`` converts only the strings "float16"/"bfloat16" and then asserts
  ``dtype in (None, torch.float16, torch.bfloat16, torch.float32)`` (unsloth/models/loader.py), so the dtype is
  passed as a torch dtype.
- **GRPO rollouts.** Unsloth's patched decoder forward takes legacy tuple caches only, so GRPO decodes through
  ``model.generate`` (:mod:`posttrain.rollout.generate`) and trains without the shared-prompt KV cache.
- **Packing** is refused (``SFTRecipe``): Unsloth's training forward drops ``attention_mask`` and separates packed
  examples only when given ``packed_seq_lengths``, which posttrain does not pass.
- **Versions.** Unsloth pins transformers and TRL (2026.10.9: ``transformers>=4.52.4,<=5.17.0``,
  ``trl>=0.18.2,<=1.15.0``), below what a fresh posttrain environment installs; :func:`check_versions` warns when
  the installed ones are outside the range the installed Unsloth declares.

Not exercised by CI (Unsloth needs a CUDA GPU); the keyword mappings and checks are pure functions, unit-tested in
``tests/unit/test_unsloth_backend.py``.
"""

from __future__ import annotations

import importlib.metadata
import warnings

import torch
from packaging.requirements import Requirement
from packaging.version import Version

from posttrain.config import LoraConfig, ModelConfig
from posttrain.errors import UserError

INSTALL_HINT = "pip install 'posttrain[unsloth]' on a machine with an NVIDIA GPU, or set model.backend=hf"


def from_pretrained_kwargs(cfg: ModelConfig, max_seq_length: int) -> dict:
    """``model:`` section -> ``FastLanguageModel.from_pretrained`` keyword arguments."""
    if cfg.gguf_file or cfg.name.endswith(".gguf"):
        raise UserError("model.backend=unsloth cannot load a .gguf file; give a hub id or a model directory")
    # None: Unsloth picks bf16 where supported, else fp16; a string other than float16/bfloat16 fails its assert
    dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    kw = {"model_name": cfg.name, "max_seq_length": max_seq_length, "dtype": dtype, "load_in_4bit": cfg.load_in_4bit,
          "trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kw["revision"] = cfg.revision
    return kw


def get_peft_model_kwargs(lora: LoraConfig, gradient_checkpointing: bool, seed: int) -> dict:
    """``lora:`` section -> ``FastLanguageModel.get_peft_model`` keyword arguments."""
    if lora.use_dora:
        raise UserError("lora.use_dora=true is not available with model.backend=unsloth; set lora.use_dora=false "
                        "or model.backend=hf")
    return {"r": lora.r, "target_modules": lora.target_modules, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "bias": lora.bias,
            "use_gradient_checkpointing": "unsloth" if gradient_checkpointing else False,
            "random_state": seed, "use_rslora": lora.use_rslora}


PINNED = ("transformers", "trl")


def version_conflicts(requires: list[str], installed: dict[str, str]) -> list[str]:
    """Unsloth's unconditional requirements (``importlib.metadata.requires("unsloth")``) on transformers and TRL
    that the ``installed`` versions break, as "name installed (unsloth needs spec)"."""
    out = []
    for line in requires:
        req = Requirement(line)
        if req.name.lower() not in PINNED or req.marker is not None or req.name.lower() not in installed:
            continue  # an extra's requirement, or a package that is not installed (then nothing imports it)
        have = installed[req.name.lower()]
        if not req.specifier.contains(Version(have), prereleases=True):
            out.append(f"{req.name} {have} (unsloth needs {req.specifier})")
    return out


def check_versions() -> None:
    """Warn when the installed transformers/TRL are outside what the installed Unsloth declares: Unsloth patches
    their internals, and a pip install of posttrain alongside can move them past its pins."""
    try:
        requires = importlib.metadata.requires("unsloth") or []
    except importlib.metadata.PackageNotFoundError:
        return
    installed = {}
    for name in PINNED:
        try:
            installed[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    bad = version_conflicts(requires, installed)
    if bad:
        warnings.warn(f"model.backend=unsloth: {'; '.join(bad)}. Unsloth patches these libraries and is tested only "
                      "within its pins; install them in a separate environment: pip install 'posttrain[unsloth]' "
                      "(pip then picks versions inside both ranges), or use model.backend=hf", stacklevel=2)


def check_environment(num_processes: int, cuda: bool) -> None:
    if num_processes > 1:
        raise UserError(f"model.backend=unsloth runs in one process on one GPU, but {num_processes} processes were "
                        "launched: run it without accelerate launch, or use model.backend=hf for DDP/FSDP")
    if not cuda:
        raise UserError(f"model.backend=unsloth needs a CUDA GPU; none is visible here. {INSTALL_HINT}")


def load_unsloth(cfg: ModelConfig, lora: LoraConfig | None, *, max_seq_length: int, seed: int, num_processes: int,
                 verbose: bool = True):
    """(model, tokenizer) from Unsloth, LoRA applied when ``lora`` is given."""
    check_environment(num_processes, torch.cuda.is_available())
    check_versions()
    try:
        from unsloth import FastLanguageModel
    except ImportError:
        raise UserError(f"model.backend=unsloth needs the unsloth package: {INSTALL_HINT}") from None
    model, tok = FastLanguageModel.from_pretrained(**from_pretrained_kwargs(cfg, max_seq_length))
    if lora is not None:
        model = FastLanguageModel.get_peft_model(model, **get_peft_model_kwargs(lora, cfg.gradient_checkpointing, seed))
    elif cfg.load_in_4bit:
        raise UserError("model.load_in_4bit=true needs a lora: section (QLoRA)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.train()
    if verbose:
        from posttrain.models import trainable_summary

        print(f"[posttrain] loaded {cfg.name} with Unsloth (max_seq_length={max_seq_length}); "
              + trainable_summary(model))
    return model, tok
