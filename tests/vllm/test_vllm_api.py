"""The calls posttrain makes on CUDA, checked against the installed vLLM's own objects (no engine starts here):
the engine arguments for cuda and cpu are EngineArgs fields, the weight push is the worker method the CPU and the
CUDA workers share, the LoRA ranks are vLLM's, the sampling arguments build a real ``vllm.SamplingParams``."""

from __future__ import annotations

import dataclasses
import inspect
from typing import get_args

import pytest

pytest.importorskip("vllm", reason="needs vLLM: scripts/setup.sh vllm, then .venv-vllm/bin/python -m pytest tests/vllm")
pytestmark = pytest.mark.vllm

import vllm  # noqa: E402

from posttrain.grpo.config import VLLMConfig  # noqa: E402
from posttrain.rollout import SamplingParams  # noqa: E402
from posttrain.rollout.vllm import llm_kwargs, sampling_kwargs  # noqa: E402
from posttrain.rollout.vllm_engine import GiB, VLLM_LORA_RANKS, vllm_platform  # noqa: E402


def test_engine_arguments_are_vllms():
    fields = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
    for platform in ("cuda", "cpu"):
        kw, _ = llm_kwargs("m", VLLMConfig(enable_sleep_mode=None), world=2, rank=1, max_model_len=512,
                           dtype="bfloat16", platform=platform, free_ram=4 * GiB, env={})
        assert set(kw) <= fields, set(kw) - fields
    from vllm.config.parallel import DistributedExecutorBackend

    assert "external_launcher" in get_args(DistributedExecutorBackend)
    assert vllm_platform("test") == "cpu"  # this environment runs vLLM's CPU build
    from vllm.platforms import current_platform

    assert not current_platform.is_sleep_mode_available()  # why sleep mode is off on CPU


def test_weight_push_is_the_workers_reload_weights():
    """``collective_rpc("reload_weights", kwargs=...)`` lands in ``Worker.reload_weights``, which the CPU worker
    inherits from the CUDA worker, and reaches ``GPUModelRunner.reload_weights`` with these keywords."""
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    assert CPUWorker.reload_weights is Worker.reload_weights
    params = inspect.signature(GPUModelRunner.reload_weights).parameters
    assert {"weights_iterator", "weights_path", "is_checkpoint_format"} <= set(params)
    assert list(inspect.signature(vllm.LLM.collective_rpc).parameters)[:5] == ["self", "method", "timeout", "args",
                                                                               "kwargs"]


def test_lora_ranks_and_request_are_vllms():
    from vllm.config.lora import MaxLoRARanks
    from vllm.lora.request import LoRARequest

    assert VLLM_LORA_RANKS == get_args(MaxLoRARanks)
    assert list(inspect.signature(LoRARequest).parameters)[:3] == ["lora_name", "lora_int_id", "lora_path"]


def test_sampling_arguments_build_vllm_sampling_params():
    sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, max_new_tokens=12, stop_token_ids=(2,),
                        stop_strings=("</s>",), seed=3)
    made = vllm.SamplingParams(**sampling_kwargs(sp, seed=5))
    assert (made.temperature, made.top_p, made.top_k, made.min_p, made.max_tokens, made.seed, made.logprobs) == \
        (0.7, 0.9, 20, 0.05, 12, 5, 0)
