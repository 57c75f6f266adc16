"""Weights held differently while a body runs, on any device: the LoRA adapter folded into the base
(:func:`merged_lora`, for generation) and float32 linear weights held as compute-dtype copies
(:func:`compute_copies`, instead of a cast by autocast at every matmul); and, for a whole run, the frozen base
held in the compute dtype only (:func:`hold_frozen_in`)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from posttrain.fastpath.allocator import page_out
from posttrain.models import decoder_and_head


def _lora_layers(model):
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextmanager
def merged_lora(model, mode: str = "auto"):
    """Run the body with the active LoRA adapter folded into the base weights, then restore them.

    ``mode``: ``auto`` (``inplace`` for fp32 weights or DoRA, ``backup`` for 16-bit; 4-bit bases stay unmerged),
    ``inplace`` (peft ``merge_adapter``/``unmerge_adapter``: the round trip moves a weight by at most an ulp,
    harmless in fp32 but 0.4% in bf16), ``backup`` (originals kept in host memory and written back: exact),
    ``none``.
    """
    layers = _lora_layers(model)
    if mode == "none" or not layers or not hasattr(model, "merge_adapter"):
        yield
        return
    base_weights = [m.get_base_layer().weight for m in layers]
    if any(w.dtype not in (torch.float32, torch.float16, torch.bfloat16) or w.__class__.__name__ == "Params4bit"
           for w in base_weights):
        yield  # quantized base: generate through the unmerged adapter
        return
    if mode == "auto":
        uses_dora = any(any(m.use_dora.values()) for m in layers if hasattr(m, "use_dora"))
        mode = "inplace" if uses_dora or all(w.dtype == torch.float32 for w in base_weights) else "backup"
    if mode == "inplace":
        model.merge_adapter()
        try:
            yield
        finally:
            model.unmerge_adapter()
        return
    # backup: the base weights copied to host memory, the delta added in place, the copies written back
    # afterwards (exact; on a GPU it costs host RAM and two transfers, not a second copy in GPU memory)
    saved = []
    with torch.no_grad():
        for m, w in zip(layers, base_weights):
            delta = sum(m.get_delta_weight(name) for name in m.active_adapters if name in m.lora_A)
            saved.append(w.data.to("cpu", copy=True))
            w.data.add_(delta.to(w.dtype))
    try:
        with model.disable_adapter():
            yield
    finally:
        with torch.no_grad():
            for w, orig in zip(base_weights, saved):
                w.data.copy_(orig.to(w.device))


def hold_frozen_in(model, dtype: torch.dtype) -> int:
    """Hold the decoder's frozen float32 linear weights (a LoRA model's base) in ``dtype`` from now on, for the
    rest of the run, freeing their float32 storage; returns the bytes freed.

    Why: a LoRA update whose decoder computes in bf16 never reads those weights in float32. autocast casts them to
    bf16 at every matmul, and the fast path packs bf16 copies of them, so the results are the same (every cast of a
    float32 weight to bf16 gives the same bf16 values), while the float32 originals stay resident beside the copies:
    on SmolLM2-135M 424 MB of a 2.4 GB reward-model run. Only for trainers that never need the float32 base again
    in this process (SFT, DPO, reward models: they save the adapter; merging reloads the base from its files).
    GRPO does not: its rollouts merge ``W + BA`` from the float32 base. Trainable weights, the embeddings, the
    norms and the head keep their dtype."""
    decoder, head = decoder_and_head(model)
    freed = 0

    def converted():
        """Each frozen float32 linear weight converted, yielding its float32 tensor. transformers maps a local
        safetensors file into memory and every weight is a view of that one mapping, so the pages read for a
        conversion would stay resident (beside the new copy) until the last view dies: handed back one weight at
        a time (:func:`page_out` consumes this lazily), the float32 weights never add up."""
        nonlocal freed
        for m in decoder.modules():
            if not isinstance(m, torch.nn.Linear) or m.weight is head.weight:
                continue
            params = [p for p in (m.weight, m.bias) if p is not None]
            if any(p.requires_grad or p.dtype != torch.float32 or p.__class__ is not torch.nn.Parameter
                   for p in params):
                continue
            for p in params:
                freed += p.numel() * (p.element_size() - torch.empty((), dtype=dtype).element_size())
                old, p.data = p.data, p.data.to(dtype)
                yield old

    with torch.no_grad():
        page_out(converted())
        if freed:
            # the other frozen weights (embeddings, norms) keep their float32 views; their pages go back too and
            # only what is read comes back (a reward model reads the embedding rows of its batch; a tied LM head
            # reads the whole table once, for its packed copy)
            converted_ids = {id(m.weight) for m in decoder.modules() if isinstance(m, torch.nn.Linear)}
            page_out(q for q in model.parameters()
                     if not q.requires_grad and id(q) not in converted_ids and q.device.type == "cpu")
    return freed


@contextmanager
def compute_copies(model, dtype: torch.dtype | None, frozen_only: bool = False):
    """While generating with a 16-bit compute dtype, hold the decoder layers' float32 linear weights as
    ``dtype`` copies (cast once per rollout instead of by autocast at every decode step); restored after.
    The embeddings and the head keep their dtype. ``frozen_only`` (training): only weights that do not train
    (a LoRA model's base) are held as copies; autocast would cast them to ``dtype`` at every forward anyway
    (it caches casts only of trainable leaves), so the results are the same, without a cast per matmul."""
    if dtype is None:
        yield
        return
    decoder, head = decoder_and_head(model)
    saved = []
    with torch.no_grad():
        for m in decoder.modules():
            if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32 and m.weight is not head.weight:
                for p in (m.weight, m.bias):
                    if p is not None and not (frozen_only and p.requires_grad):
                        saved.append((p, p.data))
                        p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data
