"""``posttrain rm``: a Bradley-Terry outcome reward model, readable top to bottom: setup -> loop -> save.

Objective (TRL's RewardTrainer, :func:`posttrain.preference.losses.bradley_terry_loss`): for pairs with rewards
``r_c`` (chosen) and ``r_r`` (rejected) and an optional per-pair margin ``m``,
``mean(-logsigmoid(r_c - r_r - m)) + center_rewards_coefficient * mean((r_c + r_r)^2)`` over the pairs of one
optimizer step (every micro-batch of every process: each micro-batch's mean is weighted by its share of the
step's pairs, and DDP's averaging is multiplied back, so the split into micro-batches and processes does not
change the gradient). A reward is the scalar head's output at the last non-pad token of prompt + answer
(:mod:`posttrain.preference.reward_model`). A micro-batch's pairs go through one forward in which each pair's
prompt and the answers' common beginning are computed once and both answers' remaining tokens on their key/value
cache (:mod:`posttrain.preference.pair_batch`, as DPO does): the rewards of the whole sequences, for fewer
positions, with the head applied only at the token it reads. The frozen weights compute through
:func:`posttrain.fastpath.training`, as in SFT and DPO.

Metrics under TRL's names, per step and (``val_`` prefix, as SFT's ``val_loss``) on the validation pairs:
``loss``, ``accuracy`` (share of pairs with r_c > r_r; a tie counts as wrong), ``margin`` (mean r_c - r_r),
``mean_reward``, ``min_reward``, ``max_reward`` (over both sides).

Batches: as SFT's (:func:`posttrain.sft.plan_epoch`: seeded shuffle per epoch, steps of similar length within
blocks of 16 steps); a pair's length is its longer side. Full fine-tuning, LoRA (a ``SEQ_CLS`` adapter whose
head trains and is saved with it) and QLoRA (4-bit base) as in SFT. Differences from TRL: no truncation either
(over-long pairs are dropped and counted, :mod:`posttrain.preference.data`); the head and the loss run outside
autocast (float32 for a float32 model) when ``train.compute_dtype`` autocasts the decoder to bfloat16.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftConfig, PeftModel, get_peft_model

from posttrain.distributed import accumulation, backward, finish_step
from posttrain.errors import UserError
from posttrain.evaluation.metrics import wilson_interval
from posttrain import fastpath
from posttrain.models import decoder_and_head, prepare_for_training, resolve_compute_dtype, trainable_summary
from posttrain.optim import build_optimizer, build_scheduler
from posttrain.preference.config import RMRecipe
from posttrain.preference.data import PreferencePair, load_pairs, pad_token_id, split_pairs
from posttrain.preference.data import plan_steps
from posttrain.preference.losses import bradley_terry_loss
from posttrain.preference.pair_batch import PairBatch, pair_hidden
from posttrain.preference.reward_model import load_sequence_classifier
from posttrain.runs import peak_memory_mb
from posttrain.session import TrainingSession
from posttrain.sft import micro_batches, plan_epoch


class RMLoss(torch.nn.Module):
    """Wraps the model so that the whole loss runs inside ``forward`` (DDP sees every parameter use)."""

    def __init__(self, model, compute_dtype: torch.dtype | None, center_coef: float):
        super().__init__()
        self.model, self.compute_dtype, self.center_coef = model, compute_dtype, center_coef

    def forward(self, batch: PairBatch, margin=None):
        """(mean loss over the micro-batch's pairs, the detached rewards: chosen then rejected)."""
        rewards = pair_scores(self.model, batch, self.compute_dtype)
        r_c, r_r = rewards.chunk(2)
        loss, _ = bradley_terry_loss(r_c, r_r, margin, self.center_coef)
        return loss, rewards.detach()


def pair_scores(model, batch: PairBatch, compute_dtype: torch.dtype | None) -> torch.Tensor:
    """(2B,) float32 rewards of a :class:`PairBatch` (chosen, then rejected): the score head at each sequence's
    last non-pad token, which is what the sequence classifier's own forward reads, with each pair's shared
    beginning computed once. The head runs outside autocast, in its weight's dtype."""
    hidden = pair_hidden(model, batch, compute_dtype).index_select(0, batch.last)
    score = decoder_and_head(model)[1]
    return score(hidden.to(score.weight.dtype))[:, 0].float()


# ---------------------------------------------------------------------------------------------- setup


def load_for_training(cfg: RMRecipe, verbose: bool = True):
    """(model, tokenizer): the base with a one-label head, ``init_adapter`` merged in, prepared as SFT prepares
    (4-bit, gradient checkpointing), with a ``SEQ_CLS`` LoRA adapter (its head trains and is saved with it)."""
    if cfg.model.backend != "hf":
        raise UserError("posttrain rm supports model.backend=hf only")
    if cfg.model.load_in_4bit and cfg.lora is None:
        raise UserError("model.load_in_4bit=true needs a lora: section (QLoRA); 4-bit weights cannot be trained "
                        "directly")
    model, tok = load_sequence_classifier(cfg.model, verbose=verbose)
    if cfg.init_adapter:
        path = Path(cfg.init_adapter)
        if not (path / "adapter_config.json").is_file():
            raise UserError(f"init_adapter={path}: no adapter_config.json there; give the adapter/ directory of an "
                            "SFT run (e.g. runs/sft/adapter)")
        saved = PeftConfig.from_pretrained(str(path))
        saved.task_type = None  # an SFT (causal LM) adapter on the same decoder: merged as a plain adapter
        model = PeftModel.from_pretrained(model, str(path), config=saved).merge_and_unload()
        if verbose:
            print(f"[posttrain] merged the adapter {path} into the base")
    model = prepare_for_training(model, cfg.model, None)
    if cfg.lora is not None:
        if cfg.model.gradient_checkpointing and not cfg.model.load_in_4bit:
            model.enable_input_require_grads()
        model = get_peft_model(model, _peft_config(cfg.lora, model))
    model.train()
    if verbose:
        print("[posttrain] " + trainable_summary(model))
    return model, tok


def _peft_config(lora, model) -> PeftLoraConfig:
    """PEFT's LoRA config for a reward model: task SEQ_CLS, so PEFT trains the ``score`` head fully and saves it
    with the adapter (``modules_to_save``)."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if isinstance(lora.target_modules, list):
        missing = [t for t in lora.target_modules if t not in names]
        if missing:
            raise UserError(f"lora.target_modules: {missing} not found in the model; its module names include "
                            f"{sorted(n for n in names if n.endswith('proj'))[:12]}")
    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, use_rslora=lora.use_rslora, use_dora=lora.use_dora,
                          bias=lora.bias, task_type="SEQ_CLS")


# ---------------------------------------------------------------------------------------------- batches


def margins(pairs: list[PreferencePair]) -> torch.Tensor | None:
    """The pairs' margins (0 where a row has none), or None when no pair has one."""
    if not any(p.margin is not None for p in pairs):
        return None
    return torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)


@torch.inference_mode()
def pair_rewards(model, pairs: list[PreferencePair], pad_id: int, batch_size: int,
                 compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected) of ``pairs``, ``batch_size`` sequences (half as many pairs) per forward."""
    was_training = model.training
    model.eval()
    device, n = next(model.parameters()).device, max(1, batch_size // 2)
    scores = [pair_scores(model, PairBatch.build(pairs[k:k + n], pad_id).to(device), compute_dtype).view(2, -1)
              for k in range(0, len(pairs), n)]
    model.train(was_training)
    both = torch.cat(scores, dim=1).cpu() if scores else torch.zeros(2, 0)
    return both[0], both[1]


def pair_metrics(r_c: torch.Tensor, r_r: torch.Tensor, pairs: list[PreferencePair], center_coef: float = 0.0,
                 prefix: str = "") -> dict:
    """The loss and TRL's metrics of scored pairs, plus the 95% Wilson interval of the accuracy."""
    loss, m = bradley_terry_loss(r_c, r_r, margins(pairs), center_coef)
    out = {"loss": float(loss), **{k: float(v) for k, v in m.items()}}
    lo, hi = wilson_interval(float((r_c > r_r).sum()), len(pairs))
    out.update({"accuracy_ci95_low": lo, "accuracy_ci95_high": hi, "pairs": len(pairs)})
    return {prefix + k: v for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- training


def train(cfg: RMRecipe, resume: bool = False, allow_changes: list[str] | tuple[str, ...] = (),
          rows: list[dict] | None = None) -> Path:
    """Train the reward model as the recipe says; ``rows`` replace the recipe's data (tests)."""
    t = cfg.train
    if t.packing:
        raise UserError("train.packing does not apply to reward models (each sequence is scored on its own); set "
                        "train.packing=false")
    run = TrainingSession(cfg, resume, "rm", allow_changes=allow_changes)
    model, tok = load_for_training(cfg, verbose=run.is_main)
    data = load_pairs(cfg.data, tok, rows=rows)
    if run.is_main:
        print(f"[posttrain] data: {data.summary()}")
    train_set, val_set = split_pairs(data.pairs, cfg.data.val_size, cfg.data.seed)
    run.save_recipe()
    pad_id = pad_token_id(tok)
    global_batch, steps_per_epoch, total_steps = plan_steps(len(train_set), t, run.world)

    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t, total_steps)
    compute = resolve_compute_dtype(t.compute_dtype, model)
    loss_module, optimizer, scheduler = run.prepare(RMLoss(model, compute, cfg.rm.center_rewards_coefficient),
                                                    optimizer, scheduler)
    device = run.device
    prepacked: dict = {}  # frozen weights the fast path prepacked once for the run
    copies = run.launch in ("single", "ddp")
    start_step = run.begin(model, optimizer, scheduler, total_steps)["step"]
    lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in train_set]
    plans: dict[int, list[list[int]]] = {}

    for step in range(start_step, total_steps):
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in plans:
            plans = {epoch: plan_epoch(lengths, global_batch, t.seed, epoch, t.group_by_length)}
        step_pairs = [train_set[i] for i in sorted(plans[epoch][index], key=lambda i: -lengths[i])]
        batches = micro_batches(step_pairs, t.batch_size, run.rank, run.world)
        t0 = time.perf_counter()
        rewards, tokens = [], 0
        with fastpath.training(model, compute, cache=prepacked, copies=copies, hold=True,
                               recompute_attention=True):
            for j, mb in enumerate(batches):
                batch = PairBatch.build(mb, pad_id).to(device)
                margin = margins(mb)
                with accumulation(run.accelerator, loss_module, j == len(batches) - 1):
                    loss, r = loss_module(batch, margin.to(device) if margin is not None else None)
                    backward(run.accelerator, loss * (len(mb) * run.world / global_batch))
                rewards.append(r.view(2, -1))
                tokens += int(batch.counts[0])
        r_all = torch.cat(rewards, dim=1)  # (2, this process's pairs)
        if run.world > 1:
            r_all = run.accelerator.gather(r_all.t().contiguous()).t()  # (pairs, 2) per rank, rank by rank
        metrics = pair_metrics(r_all[0].cpu(), r_all[1].cpu(), _gathered(step_pairs, batches, run.world),
                               cfg.rm.center_rewards_coefficient)
        grad_norm, lr = finish_step(run.accelerator, model, optimizer, scheduler, t.max_grad_norm,
                                    loss=metrics["loss"], step=step + 1,
                                    advice=f"Lower train.lr (now {t.lr}), check the data")
        dt = time.perf_counter() - t0
        for key in ("accuracy_ci95_low", "accuracy_ci95_high", "pairs"):
            metrics.pop(key)
        metrics.update({"grad_norm": grad_norm, "learning_rate": lr, "epoch": step / steps_per_epoch,
                        "tokens": tokens * run.world, "tokens_per_s": tokens * run.world / dt, "step_time": dt,
                        "peak_memory_mb": peak_memory_mb(device)})
        done = step + 1
        if val_set and t.eval_every and (done % t.eval_every == 0 or done == total_steps):
            r_c, r_r = pair_rewards(model, val_set, pad_id, 2 * t.batch_size, compute)
            metrics.update(pair_metrics(r_c, r_r, val_set, cfg.rm.center_rewards_coefficient, prefix="val_"))
        run.end_step(done, metrics, model, optimizer, scheduler, {"epoch": epoch, "index": index + 1})
    return run.finish(loss_module, model, tok, cfg.lora is not None)


def _gathered(step_pairs: list[PreferencePair], batches: list[list[PreferencePair]], world: int) -> list:
    """The pairs in the order of the gathered rewards (for their margins): this process's pairs when alone; with
    several processes the margins of every process's pairs, rank by rank (each takes every world-th micro-batch)."""
    if world == 1:
        return [p for mb in batches for p in mb]
    size = len(batches[0]) if batches else 0
    chunks = [step_pairs[i:i + size] for i in range(0, len(step_pairs), size)]
    return [p for rank in range(world) for mb in chunks[rank::world] for p in mb]


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate(model_path: str, data, *, base: str | None = None, device: str = "auto", dtype: str = "auto",
             batch_size: int = 16, template: str | None = None) -> dict:
    """``posttrain eval-rm``: the pairwise accuracy of a reward model (a ``posttrain rm`` run directory, adapter,
    model directory or hub id) on held-out pairs (``data``: a ``PreferenceDataConfig``), with its 95% Wilson
    interval, the loss and TRL's reward metrics, and what was dropped from the data."""
    from posttrain.preference.reward_model import load_reward_model

    model, tok = load_reward_model(model_path, base=base, device=device, dtype=dtype)
    pairs = load_pairs(data, tok, template=template)
    t0 = time.perf_counter()
    r_c, r_r = pair_rewards(model, pairs.pairs, pad_token_id(tok, model_path), batch_size)
    out = pair_metrics(r_c, r_r, pairs.pairs)
    out.update({"model": model_path, "data": data.path, "rows": pairs.rows, "dropped": pairs.dropped,
                "seconds": time.perf_counter() - t0})
    return out
