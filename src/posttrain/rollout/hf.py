"""The transformers rollout backend: our own decode loop over a model's forward with a KV cache.

What makes it cheaper than ``model.generate`` on the same model:

1. **One prefill per prompt.** The prompts of a batch are prefilled once (left-padded, logits only at the last
   position) and the KV cache is repeated G times along the batch, so a group's G samples share the prompt's
   prefill instead of computing it G times.
2. **Merged LoRA while generating.** A decode step costs what the base model costs: no extra LoRA matmuls and
   no PEFT dispatch per layer. On a CPU with oneDNN each LoRA layer computes with one packed copy of
   ``W + BA`` (:mod:`posttrain.fastpath.onednn`; the base weights are never written). Elsewhere the adapter is folded
   into the base weights for the rollout and taken out afterwards (:func:`posttrain.fastpath.weights.merged_lora`): fp32 weights in place
   (``W += BA``, then ``W -= BA``: the round trip moves a weight by at most an ulp), 16-bit weights backed up to
   host memory and restored exactly; 4-bit weights are left unmerged (folding into NF4 would re-quantize them).
3. **A lean forward where it applies** (:mod:`posttrain.fastpath.lean`: Llama-family models on CPU): fused
   q/k/v and gate/up matmuls on packed weights and a preallocated KV cache, instead of transformers' forward
   and its ``DynamicCache``; other models run through transformers' forward (``stats["forward"]`` says which).
4. **Finished rows leave the batch.** When a completion stops, its row is removed from the input, the
   attention mask and every layer's KV cache, so the remaining decode steps cost only what is still running.
5. **16-bit compute where it is fast** (``compute_dtype``): the decoder's matmuls run in bf16 with their weights
   cast once per rollout. The head runs in its own dtype (float32 on CPU), so GRPO's sampler log-probabilities
   come from float32 logits as its training log-probabilities do; ``head_dtype`` (evaluation and batch generation:
   only the sampled or greedy token matters there) runs a packed head in the compute dtype too, as vLLM
   does for a bf16 model (its logits are still turned to float32 before sampling).
6. **Per-completion random streams.** Each completion samples from its own generator keyed by
   ``(seed, prompt seed, sample index)``; sampling is batch-invariant and reproducible across restarts and
   process counts.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from posttrain import fastpath
from posttrain.models import autocast_to, decoder_and_head, returned_cache, with_cache
from posttrain.rollout import (Rollouts, SamplingParams, checked_request, completion_seed, rollout_pad_id,
                               stop_token_ids)


# --------------------------------------------------------------------------------------------------
# Sampling


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Set the logits outside top-k, the top-p nucleus, and below ``min_p * max prob`` to -inf (in that order)."""
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p  # the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        thresh = probs.amax(dim=-1, keepdim=True) * min_p
        logits = logits.masked_fill(probs < thresh, float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, sampling: SamplingParams, generators: Sequence[torch.Generator]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from float32 ``logits`` (B, V). Returns ``(tokens (B,), logprobs (B,))``, the
    log-probability under the temperature-scaled distribution before filtering (what the trainer scores)."""
    if sampling.temperature == 0:
        tokens = logits.argmax(-1)
        if not sampling.logprobs:  # not wanted (evaluation): no pass over the vocabulary for them
            return tokens, torch.zeros(tokens.shape, device=tokens.device)
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
        return tokens, logprobs
    scaled = logits / sampling.temperature if sampling.temperature != 1.0 else logits
    logprobs_all = torch.log_softmax(scaled, dim=-1) if sampling.logprobs else None
    if (sampling.top_k and sampling.top_k < logits.shape[-1]) or sampling.top_p < 1.0 or sampling.min_p > 0.0:
        probs = torch.softmax(filter_logits(scaled, sampling.top_k, sampling.top_p, sampling.min_p), dim=-1)
    elif logprobs_all is None:
        probs = torch.softmax(scaled, dim=-1)
    else:  # nothing filtered: the probabilities are the log-probabilities' exp (no second softmax)
        probs = logprobs_all.exp()
    # inverse-CDF sampling: one uniform number per row from that row's own generator, then a vectorized
    # search in the float64 cumulative distribution (torch.multinomial per row is ~25 ms at 150k tokens)
    cdf = probs.cumsum(-1, dtype=torch.float64)  # (no float64 copy of the probabilities first)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64, device=g.device) for g in generators])
    u = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
    if logprobs_all is None:
        return tokens, torch.zeros(tokens.shape, device=tokens.device)
    return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# Engine


class HFRolloutEngine:
    """``generate(prompts, n, sampling, seeds=None) -> Rollouts`` on a transformers (optionally PEFT) model.

    ``max_rows``: at most this many completions decode together (prompts are taken in whole groups, longest
    first); ``None`` decodes the whole batch at once. ``merge``: see :func:`posttrain.fastpath.weights.merged_lora`.
    """

    def __init__(self, model, tokenizer, *, merge: str = "auto", max_rows: int | None = None,
                 compute_dtype: torch.dtype | None = None, lean: bool = True,
                 head_dtype: torch.dtype | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.merge = merge
        self.max_rows = max_rows
        self.compute_dtype = compute_dtype  # e.g. bfloat16: decoder layers in bf16, the head in its own dtype
        self.head_dtype = head_dtype  # the packed head's matmul dtype (None: its own; see the module docstring)
        self.pad_id = rollout_pad_id(tokenizer)
        self.lean = lean  # the lean decoder forward where it applies (CPU, Llama-family; see rollout.lean)
        self.prepacked_cache: dict = {}  # frozen weights packed for oneDNN, kept across rollouts (and steps)

    def default_stop_ids(self) -> tuple[int, ...]:
        return stop_token_ids(self.model, self.tokenizer)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams, *,
                 seeds: Sequence[int] | None = None) -> Rollouts:
        prompts, seeds = checked_request(prompts, n, seeds)
        t0 = time.perf_counter()
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths decode together
        per_chunk = max(1, (self.max_rows or n * len(prompts)) // n)
        results: dict[int, tuple] = {}
        stats = {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0}
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with fastpath.rollout(model, self.compute_dtype, merge=self.merge, use_lean=self.lean,
                                  cache=self.prepacked_cache, head_dtype=self.head_dtype) as weights:
                for start in range(0, len(order), per_chunk):
                    idx = order[start:start + per_chunk]
                    out = self._generate_chunk([prompts[i] for i in idx], n, sampling, [seeds[i] for i in idx], stats,
                                               weights)
                    for k, i in enumerate(idx):
                        results[i] = tuple(part[k * n:(k + 1) * n] for part in out)
        finally:
            model.train(was_training)
        tokens = [t for i in range(len(prompts)) for t in results[i][0]]
        logps = [lp for i in range(len(prompts)) for lp in results[i][1]]
        reasons = [r for i in range(len(prompts)) for r in results[i][2]]
        T = max(len(t) for t in tokens)
        ids = torch.full((len(tokens), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(tokens), T), dtype=torch.long)
        lp = torch.zeros((len(tokens), T), dtype=torch.float32)
        for r, (t, l) in enumerate(zip(tokens, logps)):
            ids[r, :len(t)] = torch.tensor(t, dtype=torch.long)
            mask[r, :len(t)] = 1
            lp[r, :len(t)] = torch.tensor(l, dtype=torch.float32)
        texts = [self._text(t, reason, sampling) for t, reason in zip(tokens, reasons)]
        stats["time_s"] = time.perf_counter() - t0
        stats["tokens"] = int(mask.sum())
        return Rollouts(prompt_ids=prompts, num_generations=n, completion_ids=ids, completion_mask=mask, texts=texts,
                        finish_reasons=reasons, logprobs=lp if sampling.logprobs else None, stats=stats)

    def _text(self, tokens: list[int], reason: str, sampling: SamplingParams) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if reason == "stop" and sampling.stop_strings:
            hits = [(text.find(s), s) for s in sampling.stop_strings if s in text]
            if hits:
                pos, s = min(hits)
                text = text[:pos + len(s)] if sampling.include_stop_str_in_output else text[:pos]
        return text

    def _generate_chunk(self, prompts: list[list[int]], n: int, sampling: SamplingParams, seeds: list[int],
                        stats: dict, weights: fastpath.RolloutWeights) -> tuple[list[list[int]], list[list[float]], list[str]]:
        model = self.model
        device = next(model.parameters()).device
        P, N = len(prompts), len(prompts) * n
        Lp = max(len(p) for p in prompts)
        runner = _LeanRunner(weights) if weights.decoder is not None else _HFRunner(self, weights.head)
        stats["forward"] = "lean" if weights.decoder is not None else "transformers"
        # the lean runner prefills the prefix every prompt shares (a system prompt) once: columns 0 .. S-1
        shared = _shared_prefix(prompts) if isinstance(runner, _LeanRunner) else 0
        input_ids = torch.full((P, Lp), self.pad_id, dtype=torch.long)
        attn = torch.zeros((P, Lp), dtype=torch.long)
        for i, p in enumerate(prompts):  # the shared prefix, then left padding: every prompt ends at column Lp - 1
            input_ids[i, :shared] = torch.tensor(p[:shared])
            input_ids[i, Lp - len(p) + shared:] = torch.tensor(p[shared:])
            attn[i, :shared] = 1
            attn[i, Lp - len(p) + shared:] = 1
        input_ids, attn = input_ids.to(device), attn.to(device)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)

        t0 = time.perf_counter()
        logits = runner.prefill(input_ids, attn, positions, Lp + sampling.max_new_tokens, shared=shared)
        if n > 1:
            runner.repeat(n)  # the group's G samples share one prefill
            logits = logits.repeat_interleave(n, dim=0)
        stats["prefill_s"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        gen_device = device if device.type == "cuda" else torch.device("cpu")
        gens = []
        for i in range(P):
            for j in range(n):
                g = torch.Generator(device=gen_device)
                g.manual_seed(completion_seed(sampling.seed, seeds[i], j))
                gens.append(g)
        stop_ids = set(sampling.stop_token_ids or self.default_stop_ids()) if not sampling.ignore_eos else set()
        stop_strings = tuple(sampling.stop_strings) if not sampling.ignore_eos else ()
        window = 2 + max((len(self.tokenizer.encode(s, add_special_tokens=False)) for s in stop_strings), default=0)

        tokens: list[list[int]] = [[] for _ in range(N)]
        logps: list[list[float]] = [[] for _ in range(N)]
        reasons = ["length"] * N
        rows = list(range(N))  # original row of each active batch position
        attn = attn.repeat_interleave(n, dim=0)
        next_pos = attn.sum(-1, keepdim=True)  # position id of the next token
        for step in range(sampling.max_new_tokens):
            tok, lp = sample_tokens(logits, sampling, [gens[r] for r in rows])
            tok_list, lp_list = tok.tolist(), lp.tolist()
            keep = []
            for k, r in enumerate(rows):
                tokens[r].append(tok_list[k])
                logps[r].append(lp_list[k])
                done = tok_list[k] in stop_ids
                if not done and stop_strings:
                    tail = self.tokenizer.decode(tokens[r][-window:], skip_special_tokens=False)
                    done = any(s in tail for s in stop_strings)
                if done:
                    reasons[r] = "stop"
                else:
                    keep.append(k)
            stats["decode_steps"] += 1
            if not keep or step == sampling.max_new_tokens - 1:
                break
            if len(keep) < len(rows):  # finished rows stop costing compute
                sel = torch.tensor(keep, device=device)
                runner.select(sel)
                attn, next_pos, tok = attn[sel], next_pos[sel], tok[sel.to(tok.device)]
                rows = [rows[k] for k in keep]
            attn = torch.cat([attn, attn.new_ones((len(rows), 1))], dim=-1)
            logits = runner.step(tok.to(device)[:, None], attn, next_pos)
            next_pos = next_pos + 1
        stats["decode_s"] += time.perf_counter() - t0
        return tokens, logps, reasons


def _shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens all ``prompts`` share (0 for one prompt), leaving each at least one of its own
    (the prefill's logits come from each prompt's last token)."""
    if len(prompts) < 2:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = next((k for k in range(n) if p[k] != first[k]), n)
    return n


class _HFRunner:
    """Prefill and decode steps through transformers' own forward and a ``DynamicCache``."""

    def __init__(self, engine: HFRolloutEngine, head):
        from transformers import DynamicCache

        self.engine, self.head = engine, head
        self.cache = DynamicCache(config=engine.model.config)

    def _forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        decoder, _ = decoder_and_head(self.engine.model)
        with autocast_to(input_ids.device.type, self.engine.compute_dtype):
            out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          **with_cache(decoder, self.cache))
        self.cache = returned_cache(out)
        return self.head(out.last_hidden_state[:, -1])

    def prefill(self, input_ids, attn, positions, max_len: int, shared: int = 0) -> torch.Tensor:
        return self._forward(input_ids, attn, positions)

    def step(self, tok, attn, next_pos) -> torch.Tensor:
        return self._forward(tok, attn, next_pos)

    def repeat(self, n: int) -> None:
        self.cache.batch_repeat_interleave(n)

    def select(self, idx: torch.Tensor) -> None:
        self.cache.batch_select_indices(idx)


class _LeanRunner:
    """Prefill and decode steps through :class:`posttrain.fastpath.lean.LeanDecoder` and its preallocated cache."""

    def __init__(self, weights: fastpath.RolloutWeights):
        self.lean, self.head, self.cache, self.col, self.shared = weights.decoder, weights.head, None, 0, 0

    def prefill(self, input_ids, attn, positions, max_len: int, shared: int = 0) -> torch.Tensor:
        """``shared``: the first columns hold the same tokens in every row; they are computed for row 0 only
        and their keys and values copied to the other rows (a row's keys and values depend only on its own
        tokens before them)."""
        P, Lp = input_ids.shape
        self.cache = self.lean.new_cache(P, max_len, input_ids.device)
        causal = torch.ones((Lp, Lp), dtype=torch.bool, device=input_ids.device).tril()
        eye = torch.eye(Lp, dtype=torch.bool, device=input_ids.device)  # a padding query attends to itself (no NaN)
        keep = (causal & attn.bool()[:, None, :]) | eye
        if shared:
            self.lean.forward(input_ids[:1, :shared], positions[:1, :shared], causal[None, None, :shared, :shared],
                              self.cache[:, :, :1], 0)
            self.cache[:, :, 1:, :, :shared] = self.cache[:, :, :1, :, :shared]
        hidden = self.lean.forward(input_ids[:, shared:], positions[:, shared:], keep[:, None, shared:], self.cache,
                                   shared)
        self.col, self.shared = Lp, shared
        return self.head(hidden)

    def step(self, tok, attn, next_pos) -> torch.Tensor:
        hidden = self.lean.forward(tok, next_pos, attn.bool()[:, None, None, :], self.cache, self.col, self.shared)
        self.col += 1
        return self.head(hidden)

    def repeat(self, n: int) -> None:
        self.cache = self.cache.repeat_interleave(n, dim=2)

    def select(self, idx: torch.Tensor) -> None:
        """Keep rows ``idx`` (ascending, as the engine passes them), moved to the front in place: a new cache per
        finished row would cost a fresh allocation and a copy of every column at most decode steps."""
        rows = idx.tolist()
        if any(b <= a for a, b in zip(rows, rows[1:])):
            self.cache = self.cache.index_select(2, idx)
            return
        for j, i in enumerate(rows):
            if i != j:
                self.cache[:, :, j, :, :self.col] = self.cache[:, :, i, :, :self.col]
        self.cache = self.cache[:, :, :len(rows)]


__all__ = ["HFRolloutEngine", "filter_logits", "sample_tokens"]
