"""Optimizers (AdamW, 8-bit AdamW) and learning-rate schedules (linear, cosine, constant, with warmup)."""

from __future__ import annotations

import math

import torch

from posttrain.config import TrainConfig
from posttrain.errors import UserError


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices; none on biases and norm weights (as transformers.Trainer does)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model, cfg: TrainConfig):
    groups = param_groups(model, cfg.weight_decay)
    if not groups[0]["params"] and len(groups) == 1:
        raise UserError("no trainable parameters: check lora.target_modules or use full fine-tuning (lora: null)")
    if cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("train.optimizer=adamw_8bit needs bitsandbytes: pip install 'posttrain[gpu]', "
                            "or set train.optimizer=adamw") from None
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=cfg.betas)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """The multiplier of the base lr at ``step`` (0-based), identical to transformers' schedules."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    warm = warmup_steps(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warm, cfg.scheduler))
