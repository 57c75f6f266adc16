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
"""

from __future__ import annotations

import math
import random
import resource
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from posttrain.checkpoint import collect_rank_rng, load_checkpoint, save_checkpoint
from posttrain.config import SFTRecipe, save_recipe
from posttrain.data.tokenize import prepare_sft_data
from posttrain.distributed import (accelerator_kwargs, accumulation, backward, check_launch, finish_step,
                                   full_trainable_state, prepare, sharded_optimizer)
from posttrain.errors import UserError
from posttrain.losses import IGNORE_INDEX, chunked_cross_entropy_sum, shift_labels, shift_labels_packed
from posttrain.models import (autocast_to, decoder_and_head, load_starting_model, resolve_compute_dtype,
                              resolve_device)
from posttrain.optim import build_optimizer, build_scheduler
from posttrain.tracking import MetricsLogger

MEGA_STEPS = 16


class LossModule(torch.nn.Module):
    """Wraps the model so the whole loss runs inside ``forward`` (DDP sees every parameter use)."""

    def __init__(self, model, chunk_size: int, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.compute_dtype = compute_dtype  # autocast dtype of the decoder layers; the head stays in its own

    def forward(self, input_ids, attention_mask, position_ids, labels):
        decoder, head = decoder_and_head(self.model)
        with autocast_to(input_ids.device.type, self.compute_dtype):
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state
        if self.compute_dtype is not None:
            hidden = hidden.to(head.weight.dtype)
        return chunked_cross_entropy_sum(hidden, head, labels, self.chunk_size)


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


class GracefulStop:
    """Ctrl-C / SIGTERM finish the current step, write a checkpoint and stop (a second Ctrl-C aborts)."""

    def __init__(self):
        self.requested = False
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("[posttrain] stopping after this step (a checkpoint will be written); Ctrl-C again to abort",
              flush=True)

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def save_final(model, tokenizer, run_dir: Path, is_peft: bool, state_dict: dict | None = None) -> Path:
    """The adapter (or full model) and the tokenizer with its chat template, written atomically.
    ``state_dict``: whole trainable weights gathered from sharded parameters (FSDP2, ZeRO-3)."""
    name = "adapter" if is_peft else "model"
    final = run_dir / name
    tmp = run_dir / f".tmp-{name}"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


# ---------------------------------------------------------------------------------------------- training


def train(cfg: SFTRecipe, resume: bool = False) -> Path:
    from accelerate import Accelerator

    device = resolve_device(cfg.model.device)
    accelerator = Accelerator(cpu=not device.startswith("cuda"), **accelerator_kwargs(cfg.train.grad_accum))
    check_launch(accelerator)
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = str(accelerator.device) if world > 1 else device
    run_dir = Path(cfg.output_dir)
    if not resume and is_main and (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise UserError(f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose another "
                        "output_dir")
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)

    if cfg.model.backend == "unsloth":
        from posttrain.unsloth_backend import load_unsloth

        model, tok = load_unsloth(cfg.model, cfg.lora, max_seq_length=cfg.data.max_length, seed=cfg.train.seed,
                                  num_processes=world, verbose=is_main)
    else:
        model, tok = load_starting_model(cfg.model, cfg.lora, cfg.init_adapter, cfg.init_adapter_mode, verbose=is_main)
    train_set, val_set, stats = prepare_sft_data(cfg.data, tok)
    if is_main:
        print(f"[posttrain] data: {stats.summary()}")
        save_recipe(cfg, run_dir)
    if cfg.train.packing:
        train_set = pack_examples(train_set, cfg.data.max_length)
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * world
    steps_per_epoch = len(train_set) // global_batch
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_set)} training examples cannot fill one step of {global_batch} "
                        f"(train.batch_size x train.grad_accum x processes); lower them or add data")
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else math.ceil(cfg.train.epochs * steps_per_epoch)

    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    compute = resolve_compute_dtype(cfg.train.compute_dtype, model, cpu_auto=False)
    if is_main and compute is not None:
        print(f"[posttrain] compute: decoder layers in {str(compute).replace('torch.', '')}, head and loss in float32")
    loss_module, optimizer, scheduler = prepare(accelerator, LossModule(model, cfg.train.loss_chunk_size, compute),
                                                optimizer, scheduler)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") and
                next(model.parameters()).dtype == torch.bfloat16 else nullcontext())

    start_step = 0
    if resume:
        state = load_checkpoint(run_dir, model, optimizer, scheduler, rank=rank)
        if state is None:
            raise UserError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
        start_step = state["step"]
        if is_main:
            print(f"[posttrain] resumed from step {start_step}")
    logger = MetricsLogger(run_dir, cfg.train.report_to, total_steps, resume_step=start_step, enabled=is_main,
                           title="sft", config=cfg.model_dump(mode="json"))
    lengths = [len(e["input_ids"]) for e in train_set]
    plans: dict[int, list[list[int]]] = {}
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    stop = GracefulStop()
    for step in range(start_step, total_steps):
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in plans:
            plans = {epoch: plan_epoch(lengths, global_batch, cfg.train.seed, epoch, cfg.train.group_by_length)}
        step_examples = [train_set[i] for i in plans[epoch][index]]
        step_examples.sort(key=lambda e: -len(e["input_ids"]))
        batches = [collate(mb, pad_id, cfg.train.packing)
                   for mb in micro_batches(step_examples, cfg.train.batch_size, rank, world)]
        targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        counts = torch.tensor([targets, sum(b["real_tokens"] for b in batches),
                               sum(b["input_ids"].numel() for b in batches)], dtype=torch.float64, device=device)
        if world > 1:
            counts = accelerator.reduce(counts, reduction="sum")
        global_targets = max(float(counts[0]), 1.0)

        t0 = time.perf_counter()
        loss_sum = 0.0
        for j, batch in enumerate(batches):
            sync = j == len(batches) - 1
            with accumulation(accelerator, loss_module, sync), autocast:
                loss = loss_module(*_inputs(batch, device)) * (world / global_targets)
                backward(accelerator, loss)
            loss_sum += float(loss.detach()) / world
        if world > 1:
            loss_sum = float(accelerator.reduce(torch.tensor(loss_sum, device=device), reduction="sum"))
        if not math.isfinite(loss_sum):
            raise UserError(f"loss is {loss_sum} at step {step + 1}: training diverged (no checkpoint written for it). "
                            f"Lower train.lr (now {cfg.train.lr}), check the data, or resume from the last checkpoint")
        grad_norm, lr = finish_step(accelerator, model, optimizer, scheduler, cfg.train.max_grad_norm)
        dt = time.perf_counter() - t0

        metrics = {"loss": loss_sum, "grad_norm": grad_norm, "lr": lr, "epoch": step / steps_per_epoch,
                   "target_tokens": int(counts[0]), "tokens": int(counts[1]),
                   "tokens_per_s": float(counts[1]) / dt, "padding_pct": 100 * (1 - float(counts[1]) / float(counts[2])),
                   "step_time": dt, "peak_memory_mb": peak_memory_mb(device)}
        done = step + 1
        if val_set and cfg.train.eval_every and (done % cfg.train.eval_every == 0 or done == total_steps):
            metrics["val_loss"] = evaluate_loss(loss_module, val_set, cfg.train.batch_size, pad_id, device)
        if done % cfg.train.log_every == 0 or done == total_steps:
            logger.log(done, metrics)
        interrupted = stop.requested and done < total_steps
        if interrupted or (cfg.train.save_every and done % cfg.train.save_every == 0 and done < total_steps):
            accelerator.wait_for_everyone()
            save_checkpoint(run_dir, done, model, optimizer, scheduler, {"epoch": epoch, "index": index + 1},
                            keep=cfg.train.keep_checkpoints, rank=rank)
            accelerator.wait_for_everyone()
            if is_main:
                collect_rank_rng(run_dir, done, world)
        if interrupted:
            logger.close()
            raise UserError(f"interrupted after step {done}; checkpoint saved. Continue with --resume")
    stop.restore()
    logger.close()
    accelerator.wait_for_everyone()
    out = run_dir
    state = full_trainable_state(model) if sharded_optimizer(model) else None  # a collective: every rank
    if is_main:
        out = save_final(accelerator.unwrap_model(loss_module).model, tok, run_dir, cfg.lora is not None, state)
        print(f"[posttrain] saved {out}")
    return out
