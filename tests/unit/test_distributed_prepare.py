"""What posttrain hands accelerate before ``prepare``, pinned against accelerate's real plugin objects built the way
``accelerate launch`` builds them from the shipped configs (their environment variables), in one process:

- FSDP2: the decoder-layer classes of the model inside posttrain's loss wrapper reach the plugin, and accelerate's
  own auto-wrap policy then picks exactly the decoder layers (it picked nothing from the wrapper);
- DeepSpeed: ``train_micro_batch_size_per_gpu`` is an integer before ``prepare`` (accelerate refuses "auto"
  without a DataLoader), and on CPU accelerate is asked for DeepSpeed on gloo rather than its CPU mode.
The multi-process runs of the same paths are in tests/integration/test_accelerate_cpu.py.
"""

from __future__ import annotations

import pytest
import torch

from posttrain.distributed import (accelerator_kwargs, no_split_modules, set_deepspeed_micro_batch,
                                   wrap_decoder_layers)
from posttrain.errors import UserError
from posttrain.recipes import ROOT

CONFIGS = ROOT / "accelerate"


def launch_env(name: str) -> dict[str, str]:
    """The environment ``accelerate launch --config_file <shipped NAME>`` gives its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "x.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.fixture()
def wrapper(tiny_qwen3):
    from transformers import AutoModelForCausalLM

    from posttrain.config import LoraConfig
    from posttrain.models import apply_lora
    from posttrain.sft import LossModule

    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32), LoraConfig(r=4, alpha=8))
    return LossModule(model, chunk_size=16)


def fsdp_plugin(monkeypatch, **env):
    from accelerate.utils import FullyShardedDataParallelPlugin

    for k, v in {**launch_env("fsdp2_8gpu"), **env}.items():
        if k.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(k, v)
    return FullyShardedDataParallelPlugin()


def test_fsdp2_auto_wrap_reaches_the_decoder_layers(wrapper, monkeypatch):
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    plugin = fsdp_plugin(monkeypatch)
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap is None
    assert getattr(wrapper, "_no_split_modules", None) is None  # what accelerate read before: nothing to wrap
    wrap_decoder_layers(plugin, wrapper)
    assert plugin.transformer_cls_names_to_wrap == no_split_modules(wrapper) == ["Qwen3DecoderLayer"]
    plugin.set_auto_wrap_policy(wrapper)  # what accelerate's _prepare_fsdp2 calls first, on the wrapper
    policy = fsdp2_prepare_auto_wrap_policy(plugin, wrapper)
    wrapped = [name for name, m in wrapper.named_modules() if policy(m)]
    assert wrapped == ["model.base_model.model.model.layers.0", "model.base_model.model.model.layers.1"]


def test_fsdp2_layer_classes_from_the_config_are_kept(wrapper, monkeypatch):
    plugin = fsdp_plugin(monkeypatch, FSDP_TRANSFORMER_CLS_TO_WRAP="Qwen3MLP")
    wrap_decoder_layers(plugin, wrapper)
    assert plugin.transformer_cls_names_to_wrap == ["Qwen3MLP"]


def test_fsdp2_model_without_layer_classes_is_refused(monkeypatch):
    plugin = fsdp_plugin(monkeypatch)
    with pytest.raises(UserError, match="fsdp_transformer_layer_cls_to_wrap"):
        wrap_decoder_layers(plugin, torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_deepspeed_micro_batch_is_set_before_prepare(name, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    for k, v in launch_env(name).items():
        if k.startswith(("ACCELERATE_", "DEEPSPEED_")):
            monkeypatch.setenv(k, v)
    plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == int(name[-1])
    # the condition of accelerate's "requires you to pass at least one of training or evaluation dataloaders"
    assert plugin.is_auto("train_micro_batch_size_per_gpu")
    set_deepspeed_micro_batch(plugin, 4)
    assert not plugin.is_auto("train_micro_batch_size_per_gpu")
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 4
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 2  # a user's own integer is kept
    set_deepspeed_micro_batch(plugin, 4)
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 2


def test_accelerator_arguments_per_launch(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert accelerator_kwargs(2, "cpu") == {"cpu": True}
    assert accelerator_kwargs(2, "cuda:0") == {"cpu": False}
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    gpu = accelerator_kwargs(2, "cuda:0")
    assert gpu == {"cpu": False, "gradient_accumulation_steps": 2}
    cpu = accelerator_kwargs(2, "cpu")  # accelerate's CPU mode would drop the DeepSpeed config: gloo instead
    assert cpu["cpu"] is False and cpu["gradient_accumulation_steps"] == 2
    assert [h.to_kwargs()["backend"] for h in cpu["kwargs_handlers"]] == ["gloo"]
