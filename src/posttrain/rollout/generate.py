"""The ``model.generate`` rollout: for models whose forward only their own ``generate`` can drive (Unsloth).

Why a second transformers-side engine: importing Unsloth replaces the decoder's ``forward`` (for Qwen3,
``Qwen3Model.forward = LlamaModel_fast_forward``, unsloth/models/qwen3.py ``pre_patch``). That forward indexes
``past_key_values[0][0]`` and returns a tuple of ``(K, V)`` tuples, so :class:`posttrain.rollout.hf.HFRolloutEngine`
(a ``DynamicCache`` passed to the decoder, then ``batch_repeat_interleave`` / ``batch_select_indices`` on it) fails
at the first rollout. Unsloth converts caches only inside its own ``generate`` wrapper (``unsloth_fast_generate``:
``for_inference``, ``_ensure_cache_is_dynamic``, its prepare-inputs hook turning the cache into legacy tuples, its
fast decode kernels, then ``for_training``), which is what TRL's GRPOTrainer calls with an Unsloth model. This
engine calls ``model.generate`` and nothing else, so on a plain transformers model it runs transformers' own
``generate`` (how the tests check it on CPU) and on an Unsloth model Unsloth's.

Same interface and outputs as the HF engine (``posttrain.rollout``), with these departures:

- **Random streams.** ``generate`` draws from one global generator, so a completion depends on the batch it was
  sampled in. The generator is seeded from ``(sampling.seed, the batch's prompt seeds)`` before each call: a
  rerun of the same step samples the same tokens, but a completion is not batch-invariant.
- **Log-probabilities** come from ``output_logits`` (the raw logits of each step, before temperature and
  filters), scaled by the temperature: the same quantity the HF engine returns. ``generate`` keeps every step's
  logits until it returns: T x N x vocabulary values (2.5 GB at 4 x 2048 x 151,936 in bf16).
- **Stop strings** use ``generate``'s ``stop_strings`` (with the tokenizer); the completion is then cut at the
  token that completed the string, as in the HF engine.
- **Modes.** An Unsloth model (it has ``for_inference``) is left in training mode: its ``generate`` calls
  ``for_inference`` and afterwards ``for_training`` with the gradient-checkpointing mode it found, which a plain
  ``model.eval()`` / ``model.train()`` would leave switched off. Other models are put in eval mode for the call.
- No shared prefill across a group (each prompt is repeated G times), no LoRA merge, no row removal:
  speed is Unsloth's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from posttrain.rollout import (Rollouts, SamplingParams, checked_request, completion_seed, rollout_pad_id,
                               stop_token_ids)


class GenerateRolloutEngine:
    """``generate(prompts, n, sampling, seeds=None) -> Rollouts`` through ``model.generate`` (see the module
    docstring). ``max_rows``: at most this many completions per ``generate`` call (whole groups)."""

    def __init__(self, model, tokenizer, *, max_rows: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_rows = max_rows
        self.pad_id = rollout_pad_id(tokenizer)

    def default_stop_ids(self) -> tuple[int, ...]:
        return stop_token_ids(self.model, self.tokenizer)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams, *,
                 seeds: Sequence[int] | None = None) -> Rollouts:
        prompts, seeds = checked_request(prompts, n, seeds)
        t0 = time.perf_counter()
        per_call = max(1, (self.max_rows or n * len(prompts)) // n)
        tokens: list[list[int]] = []
        logps: list[list[float]] = []
        reasons: list[str] = []
        was_training = self.model.training
        if not hasattr(self.model, "for_inference"):
            self.model.eval()  # Unsloth's generate switches modes itself and restores its gradient checkpointing
        try:
            for start in range(0, len(prompts), per_call):
                out = self._generate_call(prompts[start:start + per_call], n, sampling, seeds[start:start + per_call])
                tokens += out[0]
                logps += out[1]
                reasons += out[2]
        finally:
            self.model.train(was_training)
        T = max(1, max(len(t) for t in tokens))
        ids = torch.full((len(tokens), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(tokens), T), dtype=torch.long)
        lp = torch.zeros((len(tokens), T), dtype=torch.float32)
        for r, (t, lrow) in enumerate(zip(tokens, logps)):
            ids[r, :len(t)] = torch.tensor(t, dtype=torch.long)
            mask[r, :len(t)] = 1
            lp[r, :len(lrow)] = torch.tensor(lrow, dtype=torch.float32)
        texts = [self._text(t, reason, sampling) for t, reason in zip(tokens, reasons)]
        stats = {"time_s": time.perf_counter() - t0, "tokens": int(mask.sum()), "forward": "generate"}
        return Rollouts(prompt_ids=prompts, num_generations=n, completion_ids=ids, completion_mask=mask, texts=texts,
                        finish_reasons=reasons, logprobs=lp if sampling.logprobs else None, stats=stats)

    def generate_kwargs(self, sampling: SamplingParams) -> dict:
        """``model.generate`` keyword arguments for ``sampling`` (the caller adds the left-padded inputs, each prompt
        repeated ``n`` times: transformers refuses ``num_return_sequences`` > 1 for greedy decoding)."""
        kw = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": self.pad_id,
              "return_dict_in_generate": True, "output_logits": sampling.logprobs}
        if sampling.temperature == 0:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None)
        else:
            kw.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                      top_k=sampling.top_k if sampling.top_k > 0 else None,
                      min_p=sampling.min_p if sampling.min_p > 0 else None)
        if sampling.ignore_eos:
            kw["min_new_tokens"] = sampling.max_new_tokens  # EOS logits masked for sampling; logprobs stay raw
        else:
            kw["eos_token_id"] = list(sampling.stop_token_ids or self.default_stop_ids())
            if sampling.stop_strings:
                kw.update(stop_strings=list(sampling.stop_strings), tokenizer=self.tokenizer)
        return kw

    def _generate_call(self, prompts: list[list[int]], n: int, sampling: SamplingParams, seeds: list[int]):
        device = next(self.model.parameters()).device
        Lp = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), Lp), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(prompts), Lp), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at column Lp - 1
            input_ids[i, Lp - len(p):] = torch.tensor(p)
            attn[i, Lp - len(p):] = 1
        key = sampling.seed
        for s in seeds:
            key = completion_seed(key, s, n)
        # generate samples from the global generator: seed it for this call without disturbing training's stream
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(key)
            out = self.model.generate(input_ids=input_ids.repeat_interleave(n, 0).to(device),
                                      attention_mask=attn.repeat_interleave(n, 0).to(device),
                                      **self.generate_kwargs(sampling))
        new = out.sequences[:, Lp:].tolist()
        steps = None
        if sampling.logprobs:
            temperature = sampling.temperature if sampling.temperature > 0 else 1.0
            steps = torch.stack([torch.log_softmax(x.float() / temperature, dim=-1) for x in out.logits], dim=1)
            chosen = out.sequences[:, Lp:Lp + steps.shape[1]]
            steps = steps.gather(-1, chosen[..., None]).squeeze(-1).cpu().tolist()
        stop_ids = set() if sampling.ignore_eos else set(sampling.stop_token_ids or self.default_stop_ids())
        stop_strings = () if sampling.ignore_eos else tuple(sampling.stop_strings)
        tokens, logps, reasons = [], [], []
        for r, row in enumerate(new):
            cut, reason = self._cut(row, stop_ids, stop_strings, sampling.max_new_tokens)
            tokens.append(row[:cut])
            logps.append(steps[r][:cut] if steps is not None else [])
            reasons.append(reason)
        return tokens, logps, reasons

    def _cut(self, row: list[int], stop_ids: set, stop_strings: tuple, max_new: int) -> tuple[int, str]:
        """(tokens to keep, finish reason): up to and including the first stop token, or the token that completed
        a stop string; else everything ``generate`` produced (it pads finished rows, which a stop ends first)."""
        for k, t in enumerate(row):
            if t in stop_ids:
                return k + 1, "stop"
            if stop_strings:
                window = self.tokenizer.decode(row[max(0, k - 15):k + 1], skip_special_tokens=False)
                if any(s in window for s in stop_strings):
                    return k + 1, "stop"
        return min(len(row), max_new), "length"

    def _text(self, tokens: list[int], reason: str, sampling: SamplingParams) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if reason == "stop" and sampling.stop_strings:
            hits = [(text.find(s), s) for s in sampling.stop_strings if s in text]
            if hits:
                pos, s = min(hits)
                text = text[:pos + len(s)] if sampling.include_stop_str_in_output else text[:pos]
        return text


__all__ = ["GenerateRolloutEngine"]
