"""A plain batched generation helper for evaluation: ``model.generate`` with left padding, greedy or sampled,
stopping each sequence on an end-of-sequence token or on a stop string (the answer's closing tag).

Kept deliberately small; the GRPO rollout engine (``posttrain.rollout``) may replace it later. Stop strings are
checked by decoding only the last few tokens of each row at every step, which costs microseconds next to a
forward pass and, unlike transformers' ``stop_strings``, needs no precomputation over a 150k vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Completion:
    text: str            # the generated text, cut after the stop string (kept) or before the EOS token
    n_tokens: int        # generated tokens, counting the EOS token or the tokens of the stop string
    finish: str          # "eos" | "stop" | "length"


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a sequence: the tokenizer's EOS (a template may have changed it) and the model's."""
    ids: list[int] = []
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


def _stop_criteria(tokenizer, stops: list[str], prompt_len: int):
    import torch
    from transformers import StoppingCriteria

    tail = max(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in stops) + 3

    class StopOnStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            gen = input_ids[:, prompt_len:][:, -tail:]
            texts = tokenizer.batch_decode(gen, skip_special_tokens=False)
            return torch.tensor([any(s in t for s in stops) for t in texts], device=input_ids.device)

    return StopOnStrings()


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 512, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, stop: list[str] | tuple[str, ...] = (),
             seed: int | None = None) -> list[Completion]:
    """Complete each prompt (already rendered text, special tokens included) once. ``temperature=0`` is greedy."""
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList

    if not prompts:
        return []
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    prompt_len = enc["input_ids"].shape[1]
    sample = temperature > 0
    # Every decoding knob is set explicitly: transformers fills unset ones from the model's generation_config
    # (Qwen3's top_k=20, Qwen2.5's repetition_penalty=1.05), which would silently change what is measured.
    # (Greedy ignores temperature/top_p/top_k; they are set to the library defaults so no warning is printed.)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature if sample else 1.0,
        top_p=top_p if sample else 1.0, top_k=top_k if sample else 50, repetition_penalty=1.0, min_new_tokens=0,
        no_repeat_ngram_size=0, eos_token_id=eos_ids, pad_token_id=pad_id, num_beams=1, use_cache=True)
    criteria = StoppingCriteriaList([_stop_criteria(tokenizer, list(stop), prompt_len)]) if stop else None
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(**enc, generation_config=gen_cfg, stopping_criteria=criteria)
    gen = out[:, prompt_len:].tolist()

    ends = set(eos_ids) | {pad_id}
    results = []
    for row in gen:
        end = next((i for i, t in enumerate(row) if t in ends), None)
        body = row[:end] if end is not None else row
        text = tokenizer.decode(body, skip_special_tokens=False)
        hit = min((text.find(s) + len(s) for s in stop if s in text), default=None)
        if hit is not None:
            text, finish, n = text[:hit], "stop", len(body)
        elif end is not None and row[end] in eos_ids:
            finish, n = "eos", len(body) + 1
        elif end is not None:            # stopped on a pad token that is not an EOS: treat as an end
            finish, n = "eos", len(body) + 1
        else:
            finish, n = "length", len(body)
        results.append(Completion(text=text, n_tokens=n, finish=finish))
    return results
