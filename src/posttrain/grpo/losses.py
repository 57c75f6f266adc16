"""Pure tensor math for GRPO: token log-probabilities, group advantages, the clipped surrogate, the k3 KL
estimator, loss aggregation, dynamic-sampling filters and masked statistics.

Every function here takes tensors and returns tensors; nothing touches a model, a process group or a
config. ``tests/unit/test_grpo_losses.py`` checks each one by hand, against a plain per-sample loop, and
(for the loss types) against TRL's own ``GRPOTrainer._compute_loss`` on the same tensors.

Shapes: ``B`` completions, ``T`` completion positions (right-padded), ``mask`` (B, T) is 1 on scored tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


# --------------------------------------------------------------------------------------------------
# Token log-probabilities (chunked selective log-softmax) and entropy


def _logits(hidden: torch.Tensor, weight, bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """float32 ``hidden @ weight.T + bias`` over temperature; ``weight`` may be a frozen packed weight
    (:class:`posttrain.fastpath.onednn.PackedWeight`, its bias included)."""
    logits = weight.linear(hidden).float() if hasattr(weight, "linear") else F.linear(hidden, weight, bias).float()
    return logits / temperature if temperature != 1.0 else logits


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 temperature: float, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable log-probabilities and entropy of one chunk (checkpointed when the entropy trains)."""
    logits = _logits(hidden, weight, bias, temperature)
    logz = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    if with_entropy:  # H = logZ - sum_v p_v * logit_v  (a batched dot product: no second (N, V) product)
        probs = torch.softmax(logits, dim=-1)
        entropy = logz - torch.bmm(probs.unsqueeze(1), logits.unsqueeze(2)).view(-1)
    else:
        entropy = logps.new_zeros(())
    return logps, entropy


@torch.no_grad()
def _chunk_probs(hidden: torch.Tensor, weight, bias: torch.Tensor | None, targets: torch.Tensor, temperature: float,
                 with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_chunk_logps`` without autograd, in fewer passes over the (N, V) chunk: one exp gives logZ, the
    probabilities and the entropy. Returns ``(logps, entropy, logz, probs)``."""
    logits = _logits(hidden, weight, bias, temperature)
    peak = logits.amax(-1, keepdim=True)
    probs = (logits - peak).exp_()
    total = probs.sum(-1, keepdim=True)
    logz = (peak + total.log()).squeeze(-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    probs.div_(total)
    if with_entropy:  # H = logZ - sum_v p_v * logit_v
        entropy = logz - torch.bmm(probs.unsqueeze(1), logits.unsqueeze(2)).view(-1)
    else:
        entropy = logps.new_zeros(())
    return logps, entropy, logz, probs


class _FusedChunkLogps(torch.autograd.Function):
    """``_chunk_logps`` with a hand-written backward (the entropy as a detached metric), forming
    ``d logp / d logits = onehot - p`` in place. With ``keep_probs`` the forward keeps the chunk's probabilities
    (N, V) for the backward; without, it keeps only ``logZ`` (N,) and the backward rebuilds the logits (one
    more head matmul). Autograd through a checkpointed ``_chunk_logps`` would recompute the entropy too and run
    logsumexp's own backward over the whole (N, V) chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, with_entropy: bool, keep_probs: bool = False):
        logps, entropy, logz, probs = _chunk_probs(hidden, weight, bias, targets, temperature, with_entropy)
        saved = probs if keep_probs else logz
        if isinstance(weight, torch.Tensor):
            ctx.save_for_backward(hidden, weight, bias, targets, saved)
            ctx.packed = None
        else:  # a frozen packed weight (not a tensor)
            ctx.save_for_backward(hidden, bias, targets, saved)
            ctx.packed = weight
        ctx.temperature, ctx.keep_probs, ctx.done = temperature, keep_probs, False
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        if ctx.packed is None:
            hidden, weight, bias, targets, saved = ctx.saved_tensors
        else:
            (hidden, bias, targets, saved), weight = ctx.saved_tensors, ctx.packed
        if ctx.done:
            raise RuntimeError("the chunked log-softmax backward runs once (its buffers are reused in place)")
        ctx.done = True
        t = ctx.temperature
        with torch.no_grad():
            if ctx.keep_probs:
                g = saved.mul_(-grad_logps.unsqueeze(-1))                         # -grad * p (p kept)
            else:
                g = _logits(hidden, weight, bias, t)
                g.sub_(saved.unsqueeze(-1)).exp_().mul_(-grad_logps.unsqueeze(-1))   # -grad * p
            g.scatter_add_(-1, targets.unsqueeze(-1), grad_logps.unsqueeze(-1))     # + grad * onehot
            if t != 1.0:
                g.div_(t)
            if not ctx.needs_input_grad[0]:
                gh = None
            elif hasattr(weight, "grad_input"):  # a frozen packed weight: no weight gradient
                gh = weight.grad_input(g).to(hidden.dtype)
            else:
                gh = g.to(hidden.dtype) @ weight
            gw = g.t().to(weight.dtype) @ hidden if ctx.packed is None and ctx.needs_input_grad[1] else None
            gb = g.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return gh, gw, gb, None, None, None, None


KEEP_PROBS_BYTES = 256 * 2**20  # keep float32 probabilities for the backward while a call's total is below this


def selective_log_softmax(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0, chunk_size: int = 1024,
                          entropy: bool = False, entropy_grad: bool = False, packed=None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log softmax(hidden @ weight.T / temperature)[target]`` for each row, and optionally the entropy of
    that distribution, without ever holding more than ``chunk_size`` rows of float32 logits.

    ``hidden`` (N, H) are the final hidden states at the positions to score, ``targets`` (N,) the token that
    follows each. Returns float32 ``(logps (N,), entropy (N,) or None)``. Under autograd a chunk's logits are
    not kept: its probabilities are, while all chunks' together take at most ``KEEP_PROBS_BYTES`` (256 MB: one
    head matmul less per chunk); beyond that they are rebuilt in the backward pass (by :class:`_FusedChunkLogps`,
    or by checkpointing when the entropy itself carries a gradient). The entropy carries a
    gradient only with ``entropy_grad`` (an entropy bonus); as a metric it is detached. ``packed``: the same
    weight (and bias), frozen and packed for oneDNN (:mod:`posttrain.fastpath.onednn`): used for the matmuls instead.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    logps_out, ent_out = [], []
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if packed is not None and not weight.requires_grad:
        weight, bias = packed, None
    vocab = weight.shape[0]
    keep_probs = hidden.shape[0] * vocab * 4 <= KEEP_PROBS_BYTES
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if grad and not entropy_grad:
            lp, ent = _FusedChunkLogps.apply(h, weight, bias, t, temperature, entropy, keep_probs)
        elif grad:
            lp, ent = checkpoint(_chunk_logps, h, weight, bias, t, temperature, entropy, use_reentrant=False)
        else:
            lp, ent = _chunk_probs(h, weight, bias, t, temperature, entropy)[:2]
        logps_out.append(lp)
        ent_out.append(ent if entropy_grad else ent.detach())
    if not logps_out:
        empty = hidden.new_zeros((0,), dtype=torch.float32)
        return empty, (empty if entropy else None)
    logps = torch.cat(logps_out)
    return logps, (torch.cat(ent_out) if entropy else None)


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
