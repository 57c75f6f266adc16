"""Batched generation for evaluation, on the GRPO rollout engine (:class:`posttrain.rollout.hf.HFRolloutEngine`):
one prefill per prompt, LoRA folded into the base weights while generating, finished rows leaving the batch,
stop strings (the answer's closing tag) checked on the last few tokens of each row, and per-completion
seeded random streams (a sampled completion does not depend on the other prompts of its batch).

Every decoding knob is explicit: nothing is read from the model's ``generation_config`` (Qwen3's top_k=20 or
Qwen2.5's repetition_penalty=1.05 would silently change what is measured); only its end-of-sequence ids are
(:func:`posttrain.rollout.stop_token_ids`, the rule every stage shares).

:class:`VLLMEvalGenerator` is the same call on vLLM (``posttrain eval --backend vllm``, CUDA only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.errors import UserError
from posttrain.rollout import SamplingParams, stop_token_ids
from posttrain.rollout.hf import HFRolloutEngine
from posttrain.rollout.vllm import INSTALL_HINT, require_vllm, sampling_kwargs


@dataclass
class Completion:
    text: str            # the generated text, cut after the stop string (kept) or before the EOS token
    n_tokens: int        # generated tokens, counting the EOS token or the tokens of the stop string
    finish: str          # "eos" | "stop" | "length"


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 512, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, stop: list[str] | tuple[str, ...] = (),
             seed: int | None = None, compute_dtype=None) -> list[Completion]:
    """Complete each prompt (already rendered text, special tokens included) once. ``temperature=0`` is greedy.
    ``compute_dtype`` (e.g. ``torch.bfloat16``) runs the decoder layers under autocast; ``None``: the model's dtype.
    """
    if not prompts:
        return []
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    eos = stop_token_ids(model, tokenizer)
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k if temperature > 0 else 0,
                              max_new_tokens=max_new_tokens, stop_token_ids=eos, stop_strings=tuple(stop),
                              seed=seed or 0, logprobs=False)
    engine = HFRolloutEngine(model, tokenizer, compute_dtype=compute_dtype)
    ro = engine.generate(ids, 1, sampling, seeds=list(range(len(ids))))
    results = []
    for r, reason in enumerate(ro.finish_reasons):
        body = ro.completion_ids[r, :int(ro.lengths[r])].tolist()
        ended_on_eos = reason == "stop" and bool(body) and body[-1] in eos
        text = tokenizer.decode(body[:-1] if ended_on_eos else body, skip_special_tokens=False)
        hit = min((text.find(s) + len(s) for s in stop if s in text), default=None)
        if hit is not None:
            text, finish = text[:hit], "stop"
        else:
            finish = "eos" if ended_on_eos else "length"
        results.append(Completion(text=text, n_tokens=len(body), finish=finish))
    return results


class VLLMEvalGenerator:
    """Evaluation through vLLM: the same call as :func:`generate`; a LoRA adapter is served with ``LoRARequest``
    (no merge). The evaluation runner treats the generator as the model (``eval``/``train``/``training``)."""

    training = False

    def __init__(self, model_path: str, adapter: str | None = None, *, gpu_memory_utilization: float = 0.85,
                 dtype: str = "auto", max_model_len: int | None = None):
        vllm = require_vllm()
        if not torch.cuda.is_available():
            raise UserError(f"eval --backend vllm needs a CUDA GPU; none is visible here. {INSTALL_HINT}")
        kw = {"model": model_path, "gpu_memory_utilization": gpu_memory_utilization, "dtype": dtype,
              "enable_prefix_caching": True}
        if max_model_len:
            kw["max_model_len"] = max_model_len
        self.lora = None
        if adapter:
            from vllm.lora.request import LoRARequest  # vLLM is an optional extra

            cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
            kw.update(enable_lora=True, max_lora_rank=max(int(cfg.get("r", 16)), 8))
            self.lora = LoRARequest("adapter", 1, str(adapter))
        self.vllm = vllm
        self.llm = vllm.LLM(**kw)

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def generate(self, model, tokenizer, prompts: list[str], *, max_new_tokens: int = 512, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, stop=(), seed: int | None = None) -> list[Completion]:
        sp = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                            stop_strings=tuple(stop), logprobs=False, seed=seed or 0)
        params = [self.vllm.SamplingParams(**sampling_kwargs(sp, seed=None if seed is None else seed + i))
                  for i in range(len(prompts))]
        outs = self.llm.generate(list(prompts), sampling_params=params, lora_request=self.lora, use_tqdm=False)
        results = []
        for o in outs:
            c = o.outputs[0]
            finish = "length" if c.finish_reason == "length" else ("stop" if isinstance(c.stop_reason, str) else "eos")
            results.append(Completion(text=c.text, n_tokens=len(c.token_ids), finish=finish))
        return results
