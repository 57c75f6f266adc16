"""GRPO math: each function by hand, against a plain per-sample loop, and each loss type against TRL's own
``GRPOTrainer._compute_loss`` run on the same tensors."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from posttrain.grpo.losses import (
    Objective,
    micro_batch_loss,
    aggregate_loss,
    clip_fractions,
    clipped_surrogate,
    group_advantages,
    k3_kl,
    mask_truncated,
    masked_mean,
    per_token_grpo_loss,
    zero_std_groups,
)

torch.set_default_dtype(torch.float32)


# ---- advantages ----------------------------------------------------------------------------------


def _loop_advantages(rewards: list[float], G: int, scale: str, eps: float = 1e-4) -> list[float]:
    out = []
    batch = [r for r in rewards if not math.isnan(r)]
    bmean = sum(batch) / len(batch)
    bstd = math.sqrt(sum((r - bmean) ** 2 for r in batch) / (len(batch) - 1))
    for start in range(0, len(rewards), G):
        group = [r for r in rewards[start:start + G] if not math.isnan(r)]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1)) if len(group) > 1 else float("nan")
        for r in rewards[start:start + G]:
            if math.isnan(r):
                out.append(0.0)
            elif scale == "group":
                out.append(0.0 if math.isnan(std) else (r - mean) / (std + eps))
            elif scale == "batch":
                out.append((r - mean) / (bstd + eps))
            else:
                out.append(r - mean)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_a_plain_loop(scale):
    rewards = [1.0, 0.0, 0.0, 3.0, 2.0, 2.0, 2.0, 2.0, -1.0, float("nan"), 5.0, 0.5]
    adv, std = group_advantages(torch.tensor(rewards), 4, scale)
    torch.testing.assert_close(adv, torch.tensor(_loop_advantages(rewards, 4, scale)), rtol=1e-5, atol=1e-6)
    assert std[4:8].eq(0).all() and std[0] > 0


def test_group_advantages_by_hand():
    # group [0, 1]: mean 0.5, unbiased std sqrt(0.5) -> +-0.5 / 0.70711
    adv, _ = group_advantages(torch.tensor([0.0, 1.0]), 2, "group", eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-0.70711, 0.70711]), rtol=1e-4, atol=1e-5)
    adv, _ = group_advantages(torch.tensor([0.0, 1.0, 4.0, 4.0]), 2, "none")
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5, 0.0, 0.0]))


def test_zero_std_groups_and_truncation_mask():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, float("nan"), 2.0])
    assert zero_std_groups(r, 2).tolist() == [True, False, True]
    mask = torch.ones(3, 4)
    out = mask_truncated(mask, torch.tensor([False, True, False]))
    assert out.sum(-1).tolist() == [4.0, 0.0, 4.0]


# ---- per-token losses ----------------------------------------------------------------------------


def test_clipped_surrogate_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.5]]))  # ratios 1.5, 0.5, 1.1, 1.5 against old = 0
    old = torch.zeros(1, 4)
    # A = +1: ratio 1.5 clipped to 1.2 (eps_high 0.2); ratio 0.5 not clipped (min picks 0.5)
    loss, ratio = clipped_surrogate(logp, old, torch.tensor([1.0]), 0.2)
    torch.testing.assert_close(loss, -torch.tensor([[1.2, 0.5, 1.1, 1.2]]))
    # A = -1: ratio 0.5 clipped to 0.8 -> -(-0.8); ratio 1.5 kept (min(-1.5, -1.2) = -1.5)
    loss, _ = clipped_surrogate(logp, old, torch.tensor([-1.0]), 0.2)
    torch.testing.assert_close(loss, torch.tensor([[1.5, 0.8, 1.1, 1.5]]))
    # clip-higher: eps_high 0.28 lets 1.5 reach 1.28
    loss, _ = clipped_surrogate(logp, old, torch.tensor([1.0]), 0.2, 0.28)
    torch.testing.assert_close(loss, -torch.tensor([[1.28, 0.5, 1.1, 1.28]]))
    frac = clip_fractions(ratio, torch.tensor([1.0]), torch.ones(1, 4), 0.2, 0.28)
    assert frac["clip_ratio/high_mean"].item() == pytest.approx(0.5)
    assert frac["clip_ratio/low_mean"].item() == 0.0


def test_k3_kl_by_hand():
    logp = torch.tensor([math.log(0.5), math.log(0.2)])
    ref = torch.tensor([math.log(0.5), math.log(0.4)])
    # r = ref/pi: 1 -> 0 ; 2 -> 2 - ln 2 - 1
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([0.0, 1 - math.log(2)]))


def test_aggregations_by_hand():
    ptl = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate_loss(ptl, mask, "grpo").item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate_loss(ptl, mask, "bnpo").item() == pytest.approx(10.0 / 4)
    assert aggregate_loss(ptl, mask, "dr_grpo", max_completion_length=5).item() == pytest.approx(10.0 / 10)
    assert aggregate_loss(ptl, mask, "dapo", num_items=8).item() == pytest.approx(10.0 / 8)
    with pytest.raises(ValueError, match="loss_type"):
        aggregate_loss(ptl, mask, "nope")


def _loop_loss(logps, old, ref, adv, mask, loss_type, beta, el, eh, max_len, num_items):
    """The objective written one sample and one token at a time."""
    B, T = len(logps), len(logps[0])
    per_seq, total, count = [], 0.0, 0
    for i in range(B):
        s, n = 0.0, 0
        for t in range(T):
            if not mask[i][t]:
                continue
            rho = math.exp(logps[i][t] - old[i][t])
            a = adv[i]
            term = -min(rho * a, min(max(rho, 1 - el), 1 + eh) * a)
            if beta:
                d = ref[i][t] - logps[i][t]
                term += beta * (math.exp(d) - d - 1)
            s += term
            n += 1
        per_seq.append(s / max(n, 1))
        total += s
        count += n
    if loss_type == "grpo":
        return sum(per_seq) / B
    if loss_type == "bnpo":
        return total / max(count, 1)
    if loss_type == "dr_grpo":
        return total / (B * max_len)
    return total / num_items


def _tensors(seed=0, B=6, T=7):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g) * 3
    old = logps + 0.3 * torch.randn(B, T, generator=g)
    ref = logps + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 7, 2])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return logps, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_vectorized_loss_equals_per_sample_loop(loss_type, beta):
    logps, old, ref, adv, mask = _tensors()
    ptl, _, _ = per_token_grpo_loss(logps, old, adv, ref_logps=ref, beta=beta, epsilon_low=0.2, epsilon_high=0.28)
    got = aggregate_loss(ptl, mask, loss_type, max_completion_length=9, num_items=40)
    want = _loop_loss(logps.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), loss_type, beta,
                      0.2, 0.28, 9, 40)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


# ---- against TRL's own computation ---------------------------------------------------------------


def _trl_loss(loss_type, logps, old, ref, adv, mask, entropies, *, beta, el, eh, max_len, grad_accum, num_items):
    """Run TRL's ``GRPOTrainer._compute_loss`` on given tensors: the model forward is replaced by a method that
    returns ``logps`` (what the forward would have produced); everything after it is TRL's code."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    B, T = logps.shape
    acc = SimpleNamespace(num_processes=1, reduce=lambda x, reduction="sum": x, gather=lambda x: x,
                          gather_for_metrics=lambda x: x)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropies, None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=el, epsilon_high=eh, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=grad_accum, max_completion_length=max_len, accelerator=acc,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=grad_accum),
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
        "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": torch.tensor(float(num_items)),
    }
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_each_loss_type_equals_trl_on_the_same_tensors(loss_type, beta):
    pytest.importorskip("trl")
    logps, old, ref, adv, mask = _tensors(seed=1)
    logps = logps.clone().requires_grad_(True)
    entropies = torch.rand_like(logps) * 2
    grad_accum, num_items = 2, int(mask.sum()) * 2  # this micro-batch is half of the step's tokens

    trl_loss, trl_metrics = _trl_loss(loss_type, logps, old, ref, adv, mask, entropies, beta=beta, el=0.2, eh=0.28,
                                      max_len=7, grad_accum=grad_accum, num_items=num_items)
    objective = Objective(loss_type=loss_type, beta=beta, epsilon_low=0.2, epsilon_high=0.28, max_completion_length=7)
    ours, ratio, kl = micro_batch_loss(objective, logps, old, adv, mask, entropies, num_micro_batches=grad_accum,
                                       num_items=num_items, ref_logps=ref)
    torch.testing.assert_close(ours, trl_loss, rtol=1e-6, atol=1e-7)
    g_ours, = torch.autograd.grad(ours, logps, retain_graph=True)
    g_trl, = torch.autograd.grad(trl_loss, logps)
    torch.testing.assert_close(g_ours, g_trl)

    # the metrics users watch, with TRL's names and values
    fr = clip_fractions(ratio.detach(), adv, mask, 0.2, 0.28)
    for key, value in fr.items():
        assert value.item() == pytest.approx(trl_metrics[key], abs=1e-6), key
    assert masked_mean(entropies, mask).item() == pytest.approx(trl_metrics["entropy"], rel=1e-6)
    if beta:
        assert masked_mean(kl.detach(), mask).item() == pytest.approx(trl_metrics["kl"], rel=1e-6)
