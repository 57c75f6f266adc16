"""Pure tensor math for GRPO: group advantages, the clipped surrogate, the k3 KL estimator, loss aggregation,
the whole objective of a micro-batch (:func:`micro_batch_loss`), dynamic-sampling filters and masked statistics.
Token log-probabilities come from the shared chunked head (:func:`posttrain.losses.selective_log_softmax`).

Every function here takes tensors and returns tensors; nothing touches a model, a process group or a
config. ``tests/unit/test_grpo_losses.py`` checks each one by hand, against a plain per-sample loop, and
(for the loss types) against TRL's own ``GRPOTrainer._compute_loss`` on the same tensors.

Shapes: ``B`` completions, ``T`` completion positions (right-padded), ``mask`` (B, T) is 1 on scored tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


# --------------------------------------------------------------------------------------------------
# Advantages


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased (Bessel-corrected) standard deviation ignoring NaNs; NaN where fewer than two values."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    sq = torch.nanmean((x - mean) ** 2, dim=dim)
    count = (~torch.isnan(x)).sum(dim=dim) if dim is not None else (~torch.isnan(x)).sum()
    corr = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.full_like(sq, float("nan")))
    return torch.sqrt(sq * corr)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group",
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages ``A_i = (r_i - mean(group)) / (std + eps)``.

    ``rewards`` (B,) holds whole groups of ``num_generations`` consecutive completions of one prompt; NaN
    marks an unscorable completion (every reward returned None): it is left out of its group's mean and std
    and gets advantage 0. ``scale_rewards``: ``group`` divides by the group's std (DeepSeekMath), ``batch`` by
    the std of the whole batch (Dr. GRPO's critique, TRL's "batch"), ``none`` does not divide. The std is the
    unbiased one, as TRL's. Returns ``(advantages (B,), group_std (B,))``; ``group_std`` repeats each group's
    std for every member (used for ``frac_reward_zero_std`` and dynamic sampling).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if rewards.ndim != 1 or rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards are not whole groups of {num_generations}")
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    group_std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards == "group":
        advantages = advantages / (group_std + eps)
    elif scale_rewards == "batch":
        advantages = advantages / (nanstd(rewards) + eps)
    return torch.nan_to_num(advantages, nan=0.0), group_std


def zero_std_groups(rewards: torch.Tensor, num_generations: int, atol: float = 1e-6) -> torch.Tensor:
    """(B/G,) bool: groups whose rewards all agree (no learning signal). DAPO's dynamic sampling drops them.
    A group with fewer than two scorable rewards counts as agreeing."""
    grouped = rewards.view(-1, num_generations)
    std = nanstd(grouped, dim=1)
    return torch.isnan(std) | (std <= atol)


def mask_truncated(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Zero the loss mask of completions cut off at the length limit (DAPO's overlong filtering)."""
    return mask * (~truncated.bool()).unsqueeze(1).to(mask.dtype)


# --------------------------------------------------------------------------------------------------
# Per-token losses


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: ``exp(ref - logp) - (ref - logp) - 1`` (>= 0)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      epsilon_low: float = 0.2, epsilon_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective, negated: ``-min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)`` per token,
    with ``rho = exp(logp - old_logp)``. ``epsilon_high`` > ``epsilon_low`` is DAPO's clip-higher. Returns
    ``(per_token_loss (B, T), rho (B, T))``."""
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(1) if advantages.ndim == 1 else advantages
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * adv, clipped * adv), ratio


def truncated_importance_weights(train_logps: torch.Tensor, sampler_logps: torch.Tensor, cap: float,
                                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Truncated importance sampling (TIS) weights for tokens sampled by an inference engine (vLLM) whose
    log-probabilities differ from the trainer's: ``w = min(exp(logp_train_old - logp_sampler), cap)`` per token,
    detached (a constant factor on the policy loss, as TRL's ``token_truncate`` mode and verl's TIS). Tokens
    outside ``mask`` get weight 1."""
    if cap <= 0:
        raise ValueError("cap must be positive")
    w = torch.exp((train_logps - sampler_logps).detach().float()).clamp(max=cap)
    if mask is not None:
        w = torch.where(mask.bool(), w, torch.ones_like(w))
    return w


def per_token_grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, *,
                        ref_logps: torch.Tensor | None = None, beta: float = 0.0, epsilon_low: float = 0.2,
                        epsilon_high: float | None = None, is_weights: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Clipped surrogate (times the importance weights ``is_weights`` when given: TIS) plus ``beta`` times the k3
    KL to the reference. Returns ``(loss, ratio, kl or None)``."""
    loss, ratio = clipped_surrogate(logps, old_logps, advantages, epsilon_low, epsilon_high)
    if is_weights is not None:
        loss = loss * is_weights
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps")
        kl = k3_kl(logps, ref_logps)
        loss = loss + beta * kl
    return loss, ratio, kl


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, *,
                   max_completion_length: int | None = None, num_items: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce (B, T) per-token losses of one micro-batch to a scalar, as TRL defines each ``loss_type``:

    - ``grpo``: mean over sequences of each sequence's token mean (DeepSeekMath; biased towards short answers)
    - ``bnpo``: token mean over this micro-batch
    - ``dr_grpo``: token sum / (B * max_completion_length) (Dr. GRPO: a constant normalizer)
    - ``dapo``: token sum / ``num_items``, the completion tokens of the *whole* batch (all micro-batches, all
      processes), so the batch's loss is one token mean however it is split (DAPO)

    The caller divides grpo/bnpo/dr_grpo by the number of micro-batches (gradient accumulation), as TRL does.
    """
    mask = mask.to(per_token_loss.dtype)
    total = (per_token_loss * mask).sum()
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo needs max_completion_length")
        return total / (per_token_loss.shape[0] * max_completion_length)
    if loss_type == "dapo":
        denom = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=per_token_loss.dtype)
        return total / denom.clamp(min=1.0)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


# --------------------------------------------------------------------------------------------------
# Statistics (what users watch)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def clip_fractions(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float = 0.2,
                   epsilon_high: float | None = None) -> dict[str, torch.Tensor]:
    """TRL's ``clip_ratio/*``: the fraction of tokens whose ratio left the trust region on the side where the
    clip binds (below ``1 - eps_low`` with A < 0, above ``1 + eps_high`` with A > 0). ``*_mean`` are token
    means over the batch; ``low_min`` / ``high_max`` are the min / max over sequences of per-sequence means."""
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(1) if advantages.ndim == 1 else advantages
    low = ((ratio < 1 - epsilon_low) & (adv < 0)).float()
    high = ((ratio > 1 + epsilon_high) & (adv > 0)).float()
    m = mask.float()
    seq_n = m.sum(-1)
    has = seq_n > 0
    seq_low = (low * m).sum(-1)[has] / seq_n[has]
    seq_high = (high * m).sum(-1)[has] / seq_n[has]
    nan = torch.tensor(float("nan"))
    return {
        "clip_ratio/low_mean": masked_mean(low, m),
        "clip_ratio/low_min": seq_low.min() if seq_low.numel() else nan,
        "clip_ratio/high_mean": masked_mean(high, m),
        "clip_ratio/high_max": seq_high.max() if seq_high.numel() else nan,
        "clip_ratio/region_mean": masked_mean(torch.clamp(low + high, max=1.0), m),
    }


# --------------------------------------------------------------------------------------------------
# The whole objective of one micro-batch


@dataclass(frozen=True)
class Objective:
    """The settings of GRPO's loss (see :func:`micro_batch_loss`)."""

    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    entropy_coef: float = 0.0
    importance_sampling_cap: float | None = None
    max_completion_length: int | None = None


def micro_batch_loss(obj: Objective, logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                     mask: torch.Tensor, entropy: torch.Tensor, *, num_micro_batches: int, num_items: float,
                     ref_logps: torch.Tensor | None = None, sampler_logps: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The loss one micro-batch contributes to the step's gradient (its share of the step's objective):

        l      = per_token_grpo_loss(logps, old, A, ref, beta, eps)  (x TIS weights with a sampler's logps)
        loss   = aggregate_loss(l, mask, loss_type, num_items)       (dapo: / tokens of the whole step)
                 / num_micro_batches                                 (grpo, bnpo, dr_grpo: gradient accumulation)
                 - entropy_coef * masked_mean(entropy) / num_micro_batches

    ``num_items``: the completion tokens of the whole step over all processes, divided by the number of
    processes (DDP averages gradients). Returns ``(loss, ratio, kl or None)``."""
    is_w = None
    if obj.importance_sampling_cap and sampler_logps is not None:
        is_w = truncated_importance_weights(old_logps, sampler_logps, obj.importance_sampling_cap, mask)
    ptl, ratio, kl = per_token_grpo_loss(logps, old_logps, advantages, ref_logps=ref_logps, beta=obj.beta,
                                         epsilon_low=obj.epsilon_low, epsilon_high=obj.epsilon_high, is_weights=is_w)
    loss = aggregate_loss(ptl, mask, obj.loss_type, max_completion_length=obj.max_completion_length,
                          num_items=num_items)
    if obj.loss_type != "dapo":
        loss = loss / num_micro_batches
    if obj.entropy_coef:
        loss = loss - obj.entropy_coef * masked_mean(entropy, mask) / num_micro_batches
    return loss, ratio, kl
