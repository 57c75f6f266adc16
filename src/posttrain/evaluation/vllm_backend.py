"""``posttrain eval --backend vllm``: the evaluation runner's ``generate`` call on a ``vllm.LLM``.

One engine per base model: every adapter evaluated on that model is served by the same engine with a
``LoRARequest`` (``enable_lora``, ``max_lora_rank`` rounded up to a rank vLLM allows), and the engine is shut
down before the next base model starts (two engines at 0.85 of a GPU do not fit). What it shares with the
transformers backend, so that the two give the same greedy completions in float32:

- the dtype: ``--dtype auto`` is resolved as the transformers backend resolves it (bf16 on CUDA, float32 on
  CPU) and passed to vLLM by name (vLLM's own ``auto`` drops a float32 checkpoint to bf16 on CPU);
- the prompt tokens: the runner's tokenizer (the adapter's, when saved) with ``add_special_tokens=False``, sent as
  token ids (vLLM would otherwise tokenize the text with the base tokenizer and add a second BOS for templates
  that start with one);
- the stop tokens (:func:`posttrain.rollout.stop_token_ids`) and stop strings.

vLLM schedules its own batches, so the runner hands it up to :attr:`VLLMEvalGenerator.prompts_per_call`
completions per call rather than ``--batch-size`` (an interrupted run loses at most that many).
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.errors import UserError
from posttrain.evaluation.generation import Completion
from posttrain.models import resolve_dtype
from posttrain.rollout import SamplingParams, completion_seed, stop_token_ids
from posttrain.rollout.vllm import sampling_kwargs
from posttrain.rollout.vllm_engine import (platform_kwargs, require_vllm, shutdown_engine, vllm_lora_rank,
                                           vllm_platform)


def adapter_rank(adapter: str | Path) -> int:
    """The LoRA rank of a saved PEFT adapter; vLLM cannot serve ``bias`` or ``modules_to_save`` adapters."""
    path = Path(adapter) / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--adapter {adapter}: cannot read {path} ({exc})") from None
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise UserError(f"--adapter {adapter}: vLLM serves LoRA adapters without bias and modules_to_save (this one "
                        f"has bias={cfg.get('bias')!r}, modules_to_save={cfg.get('modules_to_save')}); "
                        "use --backend hf")
    return int(cfg.get("r", 16))


class VLLMEvalGenerator:
    """Evaluation through vLLM: the same call as :func:`posttrain.evaluation.generation.generate`. The runner
    treats the generator as the model (``eval``/``train``/``training``)."""

    training = False
    prompts_per_call = 1024

    def __init__(self, model_path: str, adapters: list[str] | tuple[str, ...] = (), *, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.85, enforce_eager: bool = False, max_model_len: int | None = None):
        vllm = require_vllm()
        platform = vllm_platform("eval --backend vllm")
        dtype_name = str(resolve_dtype(dtype, "cuda" if platform == "cuda" else "cpu")).removeprefix("torch.")
        memory, line = platform_kwargs(platform, gpu_memory_utilization=gpu_memory_utilization, sleep=False,
                                       key="eval --gpu-memory-utilization")
        kw = {"model": model_path, **memory, "dtype": dtype_name, "enable_prefix_caching": True,
              "enforce_eager": enforce_eager}
        if max_model_len:
            kw["max_model_len"] = max_model_len
        self.adapter_ids = {str(a): i + 1 for i, a in enumerate(dict.fromkeys(map(str, adapters)))}
        if self.adapter_ids:
            rank = max(adapter_rank(a) for a in self.adapter_ids)
            kw.update(enable_lora=True, max_loras=1, max_lora_rank=vllm_lora_rank(rank, f"--adapter (rank {rank})"))
        print(f"[posttrain] {line}; dtype {dtype_name}" + (" (--dtype auto, resolved as the transformers backend "
                                                           "does)" if dtype == "auto" else ""), flush=True)
        self.vllm = vllm
        self.dtype_name = dtype_name  # what metrics.json records as the evaluation's compute dtype
        self.llm = vllm.LLM(**kw)
        self.lora = None

    def use_adapter(self, adapter: str | None) -> None:
        """Serve ``adapter`` (one given at construction) from now on; None: the bare model."""
        if adapter is None:
            self.lora = None
            return
        from vllm.lora.request import LoRARequest  # vLLM is an optional extra

        i = self.adapter_ids[str(adapter)]
        self.lora = LoRARequest(f"adapter-{i}", i, str(adapter))

    def close(self) -> None:
        shutdown_engine(self.llm)
        self.llm = None

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def generate(self, model, tokenizer, prompts: list[str], *, max_new_tokens: int = 512, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, stop=(), seed: int | None = None,
                 seeds: list[int] | None = None) -> list[Completion]:
        sp = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k if temperature > 0 else 0,
                            max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids(None, tokenizer),
                            stop_strings=tuple(stop), logprobs=False, seed=seed or 0)
        keys = list(seeds) if seeds is not None else list(range(len(prompts)))  # as generation.generate
        params = [self.vllm.SamplingParams(**sampling_kwargs(
                      sp, seed=None if seed is None else completion_seed(seed, keys[i], 0) & 0x7FFFFFFF))
                  for i in range(len(prompts))]
        ids = [{"prompt_token_ids": tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts]
        outs = self.llm.generate(ids, sampling_params=params, lora_request=self.lora, use_tqdm=False)
        results = []
        for o in outs:
            c = o.outputs[0]
            finish = "length" if c.finish_reason == "length" else ("stop" if isinstance(c.stop_reason, str) else "eos")
            results.append(Completion(text=c.text, n_tokens=len(c.token_ids), finish=finish))
        return results
