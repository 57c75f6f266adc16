"""Batched generation for evaluation, on the GRPO rollout engine (:class:`posttrain.rollout.hf.HFRolloutEngine`):
one prefill per prompt, LoRA folded into the base weights while generating, finished rows leaving the batch,
stop strings (the answer's closing tag) checked on the last few tokens of each row, and per-completion
seeded random streams (a sampled completion does not depend on the other prompts of its batch).

Every decoding knob is explicit: nothing is read from the model's ``generation_config`` (Qwen3's top_k=20 or
Qwen2.5's repetition_penalty=1.05 would silently change what is measured); only its end-of-sequence ids are
(:func:`posttrain.rollout.stop_token_ids`, the rule every stage shares).

The same call on vLLM (``posttrain eval --backend vllm``) is :mod:`posttrain.evaluation.vllm_backend`.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.rollout import SamplingParams, stop_token_ids
from posttrain.rollout.hf import HFRolloutEngine


@dataclass
class Completion:
    text: str            # the generated text, cut after the stop string (kept) or before the EOS token
    n_tokens: int        # generated tokens, counting the EOS token or the tokens of the stop string
    finish: str          # "eos" | "stop" | "length"


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 512, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, stop: list[str] | tuple[str, ...] = (),
             seed: int | None = None, seeds: list[int] | None = None, compute_dtype=None) -> list[Completion]:
    """Complete each prompt (already rendered text, special tokens included) once. ``temperature=0`` is greedy.
    ``seeds``: one per prompt, keying its random stream with ``seed`` (default: the prompt's index, so a
    completion then depends on its place in the batch; give stable per-sample seeds to make it batch-invariant).
    ``compute_dtype`` (e.g. ``torch.bfloat16``) runs the decoder's matmuls and a packed head in it; ``None``: the
    model's dtype.
    """
    if not prompts:
        return []
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    eos = stop_token_ids(model, tokenizer)
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k if temperature > 0 else 0,
                              max_new_tokens=max_new_tokens, stop_token_ids=eos, stop_strings=tuple(stop),
                              seed=seed or 0, logprobs=False)
    engine = HFRolloutEngine(model, tokenizer, compute_dtype=compute_dtype, head_dtype=compute_dtype)
    ro = engine.generate(ids, 1, sampling, seeds=list(seeds) if seeds is not None else list(range(len(ids))))
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
