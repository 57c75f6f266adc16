"""Supervised fine-tuning (full, LoRA, QLoRA), readable top to bottom: setup -> loop -> save.

Objective: the mean next-token cross-entropy over the target tokens of one optimizer step's whole global
batch (every micro-batch of every process): ``sum(CE over targets) / (number of targets)``. Each micro-batch
contributes its summed CE divided by the global target count, so k micro-batches of b examples give the
same gradient as one batch of k*b, and N processes the same as one (DDP averages, so each process scales
by N). Padding never enters the sums.

Batches: each epoch shuffles the examples (seeded), cuts them into mega-batches of 16 optimizer steps,
sorts each mega-batch by length so that a step holds examples of similar length (less padding; the
padding fraction is logged), and shuffles the order of steps within it. A step's examples depend only on
the global batch size, not on how it is split into micro-batches and processes.

Packing (``train.packing``) concatenates examples into rows of ``data.max_length`` tokens with position
ids restarting at each example; transformers turns those position ids into a block-diagonal causal mask
(sdpa, eager) or varlen kernels (flash-attention), so no example attends to another, and no target
crosses an example boundary.

Numerics: with a 16-bit compute dtype (``train.compute_dtype``) the decoder's matmuls run in it, and so does a
frozen head where the fast path packs it (a LoRA model on CPU), as under TRL's bf16 autocast; the log-softmax and
the loss are float32. GRPO and DPO keep float32 logits: their log-probabilities enter ratios and differences.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from posttrain import fastpath
from posttrain.config import SFTRecipe
from posttrain.data.tokenize import prepare_sft_data
from posttrain.distributed import accumulation, backward, finish_step
from posttrain.errors import UserError
from posttrain.losses import (IGNORE_INDEX, Head, chunked_cross_entropy_sum, module_head, shift_labels,
                              shift_labels_packed)
from posttrain.models import autocast_to, decoder_and_head, resolve_compute_dtype
from posttrain.optim import build_optimizer, build_scheduler
from posttrain.runs import peak_memory_mb
from posttrain.session import TrainingSession

MEGA_STEPS = 16


class LossModule(torch.nn.Module):
    """Wraps the model so the whole loss runs inside ``forward`` (DDP sees every parameter use)."""

    def __init__(self, model, chunk_size: int, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.compute_dtype = compute_dtype  # autocast dtype of the decoder layers (the head: see the docstring)

    def forward(self, input_ids, attention_mask, position_ids, labels, head: Head | None = None):
        """The summed cross-entropy of the batch's targets. ``head``: the language-model head as the fast path
        gives it (:func:`posttrain.fastpath.training`); the model's own head when None."""
        decoder, head_module = decoder_and_head(self.model)
        with autocast_to(input_ids.device.type, self.compute_dtype):
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state
        return chunked_cross_entropy_sum(hidden, head or module_head(head_module), labels, self.chunk_size)


# ---------------------------------------------------------------------------------------------- batching


def plan_epoch(lengths: list[int], global_batch: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """Example indices of each optimizer step of one epoch (an incomplete last step is dropped)."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    steps = []
    mega = global_batch * MEGA_STEPS
    for start in range(0, len(order) - global_batch + 1, mega):
        block = order[start:start + mega]
        block = block[: len(block) - len(block) % global_batch]
        if group_by_length:
            block.sort(key=lambda i: -lengths[i])
        chunk = [block[i:i + global_batch] for i in range(0, len(block), global_batch)]
        rng.shuffle(chunk)
        steps.extend(chunk)
    return steps


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """First-fit-decreasing packing into rows of at most ``max_length`` tokens; position ids restart per
    example."""
    rows: list[dict] = []
    for ex in sorted(examples, key=lambda e: -len(e["input_ids"])):
        n = len(ex["input_ids"])
        row = next((r for r in rows if len(r["input_ids"]) + n <= max_length), None)
        if row is None:
            row = {"input_ids": [], "labels": [], "position_ids": []}
            rows.append(row)
        row["input_ids"] += ex["input_ids"]
        row["labels"] += ex["labels"]
        row["position_ids"] += list(range(n))
    return rows


def collate(examples: list[dict], pad_id: int, packed: bool) -> dict:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    pos = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
        pos[i, :n] = torch.tensor(e["position_ids"]) if packed else torch.arange(n)
    if packed:
        # padding gets its own position run so the mask keeps it apart; labels there are ignored
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            pos[i, n:] = torch.arange(width - n)
        return {"input_ids": ids, "attention_mask": None, "position_ids": pos,
                "labels": shift_labels_packed(labels, pos), "real_tokens": int(mask.sum())}
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": shift_labels(labels),
            "real_tokens": int(mask.sum())}


def micro_batches(step_examples: list[dict], batch_size: int, rank: int, world: int) -> list[list[dict]]:
    """Split one step's examples (sorted by length) into micro-batches of ``batch_size``; this process takes
    every ``world``-th."""
    chunks = [step_examples[i:i + batch_size] for i in range(0, len(step_examples), batch_size)]
    return chunks[rank::world]


# ---------------------------------------------------------------------------------------------- helpers


@torch.no_grad()
def evaluate_loss(loss_module, examples: list[dict], batch_size: int, pad_id: int, device: str) -> float:
    loss_module.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_id, packed=False)
        total += float(loss_module(*_inputs(batch, device)))
        count += int((batch["labels"] != IGNORE_INDEX).sum())
    loss_module.train()
    return total / max(count, 1)


def _inputs(batch: dict, device: str):
    mask = batch["attention_mask"]
    return (batch["input_ids"].to(device), mask.to(device) if mask is not None else None,
            batch["position_ids"].to(device), batch["labels"].to(device))


# ---------------------------------------------------------------------------------------------- training


def train(cfg: SFTRecipe, resume: bool = False, allow_changes: list[str] | tuple[str, ...] = ()) -> Path:
    t = cfg.train
    run = TrainingSession(cfg, resume, "sft", allow_changes=allow_changes)
    model, tok = run.load_model()
    train_set, val_set, stats = prepare_sft_data(cfg.data, tok)
    if run.is_main:
        print(f"[posttrain] data: {stats.summary()}")
    run.save_recipe()
    if t.packing:
        train_set = pack_examples(train_set, cfg.data.max_length)
    global_batch = t.batch_size * t.grad_accum * run.world
    steps_per_epoch = len(train_set) // global_batch
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_set)} training examples cannot fill one step of {global_batch} "
                        f"(train.batch_size x train.grad_accum x processes); lower them or add data")
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_per_epoch)

    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t, total_steps)
    compute = resolve_compute_dtype(t.compute_dtype, model)
    if run.is_main and compute is not None:
        name = str(compute).replace('torch.', '')
        print(f"[posttrain] compute: decoder layers and a frozen head in {name}, log-softmax and loss in float32")
    loss_module, optimizer, scheduler = run.prepare(LossModule(model, t.loss_chunk_size, compute), optimizer, scheduler)
    device = run.device
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") and
                next(model.parameters()).dtype == torch.bfloat16 else nullcontext())
    start_step = run.begin(model, optimizer, scheduler, total_steps)["step"]
    lengths = [len(e["input_ids"]) for e in train_set]
    plans: dict[int, list[list[int]]] = {}
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    prepacked: dict = {}  # frozen weights the fast path prepacked once for the run

    for step in range(start_step, total_steps):
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in plans:
            plans = {epoch: plan_epoch(lengths, global_batch, t.seed, epoch, t.group_by_length)}
        step_examples = sorted((train_set[i] for i in plans[epoch][index]), key=lambda e: -len(e["input_ids"]))
        batches = [collate(mb, pad_id, t.packing)
                   for mb in micro_batches(step_examples, t.batch_size, run.rank, run.world)]
        targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        counts = torch.tensor([targets, sum(b["real_tokens"] for b in batches),
                               sum(b["input_ids"].numel() for b in batches)], dtype=torch.float64, device=device)
        if run.world > 1:
            counts = run.accelerator.reduce(counts, reduction="sum")
        global_targets = max(float(counts[0]), 1.0)

        t0 = time.perf_counter()
        loss_sum = 0.0
        with fastpath.training(model, compute, cache=prepacked, copies=run.launch in ("single", "ddp"),
                               hold=True, head_dtype=compute, recompute_attention=True) as head:
            for j, batch in enumerate(batches):
                with accumulation(run.accelerator, loss_module, j == len(batches) - 1), autocast:
                    loss = loss_module(*_inputs(batch, device), head) * (run.world / global_targets)
                    backward(run.accelerator, loss)
                loss_sum += float(loss.detach()) / run.world
        if run.world > 1:
            loss_sum = float(run.accelerator.reduce(torch.tensor(loss_sum, device=device), reduction="sum"))
        grad_norm, lr = finish_step(run.accelerator, model, optimizer, scheduler, t.max_grad_norm, loss=loss_sum,
                                    step=step + 1, advice=f"Lower train.lr (now {t.lr}), check the data")
        dt = time.perf_counter() - t0

        metrics = {"loss": loss_sum, "grad_norm": grad_norm, "learning_rate": lr, "epoch": step / steps_per_epoch,
                   "target_tokens": int(counts[0]), "tokens": int(counts[1]),
                   "tokens_per_s": float(counts[1]) / dt,
                   "padding_pct": 100 * (1 - float(counts[1]) / float(counts[2])),
                   "step_time": dt, "peak_memory_mb": peak_memory_mb(device)}
        done = step + 1
        if val_set and t.eval_every and (done % t.eval_every == 0 or done == total_steps):
            metrics["val_loss"] = evaluate_loss(loss_module, val_set, t.batch_size, pad_id, device)
        run.end_step(done, metrics, model, optimizer, scheduler, {"epoch": epoch, "index": index + 1})
    return run.finish(loss_module, model, tok, cfg.lora is not None)
