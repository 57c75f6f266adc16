"""The Unsloth backend's keyword mappings (pure) and its refusals; Unsloth itself needs a CUDA GPU and is not
installed here."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from posttrain.config import ConfigError, LoraConfig, ModelConfig, load_recipe
from posttrain.errors import UserError
from posttrain.unsloth_backend import (
    check_environment,
    check_versions,
    from_pretrained_kwargs,
    get_peft_model_kwargs,
    load_unsloth,
    version_conflicts,
)


def test_from_pretrained_kwargs_follow_the_notebook():
    cfg = ModelConfig(name="unsloth/Qwen3-14B", load_in_4bit=True, backend="unsloth")
    assert from_pretrained_kwargs(cfg, 2048) == {"model_name": "unsloth/Qwen3-14B", "max_seq_length": 2048,
                                                 "dtype": None, "load_in_4bit": True, "trust_remote_code": False}
    kw = from_pretrained_kwargs(ModelConfig(name="m", dtype="bfloat16", revision="v1"), 512)
    assert kw["dtype"] is torch.bfloat16 and kw["revision"] == "v1" and kw["load_in_4bit"] is False
    # Unsloth converts only "float16"/"bfloat16" strings, then asserts dtype in (None, fp16, bf16, fp32)
    assert from_pretrained_kwargs(ModelConfig(name="m", dtype="float32"), 512)["dtype"] is torch.float32
    with pytest.raises(UserError, match="cannot load a .gguf"):
        from_pretrained_kwargs(ModelConfig(name="x.gguf"), 512)


def test_get_peft_model_kwargs_follow_the_notebook():
    lora = LoraConfig(r=32, alpha=64, dropout=0.0, use_rslora=True)
    kw = get_peft_model_kwargs(lora, gradient_checkpointing=True, seed=3407)
    assert kw == {"r": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"],
                  "lora_alpha": 64, "lora_dropout": 0.0, "bias": "none", "use_gradient_checkpointing": "unsloth",
                  "random_state": 3407, "use_rslora": True}
    assert get_peft_model_kwargs(lora, False, 0)["use_gradient_checkpointing"] is False
    with pytest.raises(UserError, match="use_dora=true is not available with model.backend=unsloth"):
        get_peft_model_kwargs(LoraConfig(use_dora=True), False, 0)


def test_refused_on_cpu_and_with_several_processes():
    with pytest.raises(UserError, match="runs in one process on one GPU, but 2 processes"):
        check_environment(2, cuda=True)
    with pytest.raises(UserError, match=r"needs a CUDA GPU.*pip install 'posttrain\[unsloth\]'"):
        check_environment(1, cuda=False)
    check_environment(1, cuda=True)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_load_names_the_problem_here():
    """On this machine (no CUDA, no unsloth) loading stops with one clear error before touching the model."""
    import torch

    expected = "needs a CUDA GPU" if not torch.cuda.is_available() else "needs the unsloth package"
    with pytest.raises(UserError, match=expected):
        load_unsloth(ModelConfig(name="m", backend="unsloth"), LoraConfig(), max_seq_length=128, seed=0,
                     num_processes=1)


def test_config_key():
    cfg = load_recipe(None, ["model.name=m", "data.path=d", "model.backend=unsloth"])
    assert cfg.model.backend == "unsloth"
    with pytest.raises(ConfigError, match="model.backend"):
        load_recipe(None, ["model.name=m", "data.path=d", "model.backend=vllm"])


# Unsloth 2026.10.9's unconditional pins and one of its extras' (read from its wheel's METADATA)
UNSLOTH_REQUIRES = [
    "transformers!=4.53.0,!=4.54.0,!=4.55.0,!=4.55.1,!=4.57.0,!=4.57.4,!=4.57.5,!=5.0.0,!=5.1.0,<=5.17.0,>=4.52.4",
    "trl!=0.19.0,<=1.15.0,>=0.18.2",
    'trl>=0.18.2; extra == "colab-no-deps"',
    "peft!=0.11.0,>=0.18.0",
]


def test_version_conflicts_name_the_package_and_the_pin():
    bad = version_conflicts(UNSLOTH_REQUIRES, {"transformers": "5.24.0", "trl": "1.16.0", "peft": "0.1"})
    assert bad == [("transformers 5.24.0 (unsloth needs !=4.53.0,!=4.54.0,!=4.55.0,!=4.55.1,!=4.57.0,!=4.57.4,"
                    "!=4.57.5,!=5.0.0,!=5.1.0,<=5.17.0,>=4.52.4)"), "trl 1.16.0 (unsloth needs !=0.19.0,<=1.15.0,>=0.18.2)"]
    assert version_conflicts(UNSLOTH_REQUIRES, {"transformers": "5.17.0", "trl": "1.15.0"}) == []
    assert version_conflicts(UNSLOTH_REQUIRES, {"transformers": "5.1.0"})[0].startswith("transformers 5.1.0")


def test_check_versions_is_silent_without_unsloth():
    if importlib.util.find_spec("unsloth") is not None:
        pytest.skip("unsloth is installed here")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_versions()


def test_packing_is_refused_with_unsloth():
    with pytest.raises(ConfigError, match="train.packing=true with model.backend=unsloth"):
        load_recipe(None, ["model.name=m", "data.path=d", "model.backend=unsloth", "train.packing=true"])
    assert load_recipe(None, ["model.name=m", "data.path=d", "train.packing=true"]).train.packing
