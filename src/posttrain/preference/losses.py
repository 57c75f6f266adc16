"""Pure tensor math of preference learning (no models, no data): each function takes per-pair tensors and
returns the loss to minimise and its metrics under TRL's names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reward-model loss ``mean(-logsigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2)``.

    ``r_chosen`` and ``r_rejected`` are the scalar rewards of each pair, shape ``(pairs,)``; ``margin`` an
    optional per-pair margin (TRL's ``margin`` column); ``center_coef`` TRL's ``center_rewards_coefficient``
    (keeps the rewards near zero). Metrics (detached): ``accuracy`` (share of pairs with r_c > r_r),
    ``margin`` (mean r_c - r_r), ``mean_reward``, ``min_reward``, ``max_reward`` over both sides."""
    diff = r_chosen - r_rejected
    logits = diff - margin if margin is not None else diff
    loss = -F.logsigmoid(logits).mean()
    if center_coef:
        loss = loss + center_coef * torch.mean((r_chosen + r_rejected) ** 2)
    both = torch.cat([r_chosen, r_rejected]).detach().float()
    metrics = {"accuracy": (diff > 0).float().mean().detach(), "margin": diff.detach().float().mean(),
               "mean_reward": both.mean(), "min_reward": both.min(), "max_reward": both.max()}
    return loss, metrics


DPO_LOSS_TYPES = ("sigmoid", "ipo", "simpo", "robust")


def _smoothed_sigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1 - eps) logsigmoid(z) - eps logsigmoid(-z)``: a pair's label is wrong with probability ``eps``
    (conservative DPO, Mitchell 2023); ``eps = 0`` is the plain Bradley-Terry log-likelihood."""
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = loss * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
    return loss


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor | None = None,
             ref_rejected: torch.Tensor | None = None, *, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, simpo_gamma: float = 0.5, chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair loss of direct preference optimization and its per-pair metrics (TRL's names).

    Inputs, shape ``(pairs,)``: the policy's and the reference's log-probabilities of each completion summed over
    its tokens (the prompt excluded), and the completions' token counts (``ipo`` and ``simpo`` need them). With
    ``h_c = policy_chosen - ref_chosen`` and ``h_r = policy_rejected - ref_rejected`` (the implicit rewards / beta):

    - ``sigmoid`` (DPO):  ``-(1-eps) logsig(beta (h_c - h_r)) - eps logsig(-beta (h_c - h_r))`` (eps =
      ``label_smoothing``: conservative DPO, as TRL's DPOTrainer before 1.0 and TRL 1.16's CPOTrainer; TRL 1.16's
      DPOTrainer ignores ``label_smoothing`` for ``sigmoid``);
    - ``robust`` (rDPO, TRL 1.16's label-smoothed DPO): ``((1-eps) (-logsig(beta d)) + eps logsig(-beta d)) /
      (1 - 2 eps)``, ``d = h_c - h_r``; an unbiased loss under labels flipped with probability eps < 0.5;
    - ``ipo``: ``(h_c / n_c - h_r / n_r - 1 / (2 beta))^2``, the log-ratios averaged over each completion's
      tokens as TRL does (agreed with the IPO authors, see dpo_trainer.py); no label smoothing;
    - ``simpo`` (reference-free; the reference arguments are ignored): with the length-averaged log-probabilities
      ``a = policy / n``, ``-(1-eps) logsig(beta (a_c - a_r) - gamma) - eps logsig(-(beta (a_c - a_r) - gamma))``
      (TRL's CPOTrainer with ``loss_type=simpo``, ``cpo_alpha=0``).

    Metrics (detached, per pair, to be averaged by the caller): ``rewards/chosen`` = ``beta h_c`` (simpo:
    ``beta a_c``), ``rewards/rejected``, ``rewards/accuracies`` (1 where chosen's reward is higher),
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (the policy's; simpo: the averages, as TRL's
    CPOTrainer logs them)."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: expected one of {DPO_LOSS_TYPES}")
    if loss_type in ("ipo", "simpo") and (chosen_tokens is None or rejected_tokens is None):
        raise ValueError(f"loss_type {loss_type} averages over tokens: give chosen_tokens and rejected_tokens")
    if loss_type == "simpo":
        chosen = policy_chosen / chosen_tokens.clamp(min=1)
        rejected = policy_rejected / rejected_tokens.clamp(min=1)
        loss = _smoothed_sigmoid(beta * (chosen - rejected) - simpo_gamma, label_smoothing)
        reward_c, reward_r, logp_c, logp_r = beta * chosen, beta * rejected, chosen, rejected
    else:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"loss_type {loss_type} needs the reference log-probabilities")
        h_c, h_r = policy_chosen - ref_chosen, policy_rejected - ref_rejected
        if loss_type == "sigmoid":
            loss = _smoothed_sigmoid(beta * (h_c - h_r), label_smoothing)
        elif loss_type == "robust":
            z = beta * (h_c - h_r)
            loss = (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (
                1 - 2 * label_smoothing)
        else:  # ipo
            delta = h_c / chosen_tokens.clamp(min=1) - h_r / rejected_tokens.clamp(min=1)
            loss = (delta - 1 / (2 * beta)) ** 2
        reward_c, reward_r, logp_c, logp_r = beta * h_c, beta * h_r, policy_chosen, policy_rejected
    reward_c, reward_r = reward_c.detach().float(), reward_r.detach().float()
    metrics = {"rewards/chosen": reward_c, "rewards/rejected": reward_r,
               "rewards/accuracies": (reward_c > reward_r).float(), "rewards/margins": reward_c - reward_r,
               "logps/chosen": logp_c.detach().float(), "logps/rejected": logp_r.detach().float()}
    return loss, metrics
