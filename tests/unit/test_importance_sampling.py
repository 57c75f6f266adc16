"""Truncated importance sampling (TIS): weights checked by hand, and where they enter the GRPO loss."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.grpo.losses import k3_kl, per_token_grpo_loss, truncated_importance_weights


def test_weights_by_hand():
    train = torch.tensor([[0.0, -1.0, -2.0, -0.5]])
    sampler = torch.tensor([[-1.0, 0.0, -2.0, -3.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = truncated_importance_weights(train, sampler, cap=2.0, mask=mask)
    # exp(1) = 2.718 -> capped at 2; exp(-1) = 0.368; exp(0) = 1; masked position -> 1 (exp(2.5) would be 12.2)
    assert w[0].tolist() == pytest.approx([2.0, math.exp(-1.0), 1.0, 1.0])
    assert not w.requires_grad


def test_weights_are_constants_even_when_inputs_need_grad():
    train = torch.tensor([-0.3, -1.2], requires_grad=True)
    w = truncated_importance_weights(train, torch.tensor([-0.5, -1.0]), cap=3.0)
    assert not w.requires_grad
    assert w.tolist() == pytest.approx([math.exp(0.2), math.exp(-0.2)])
    with pytest.raises(ValueError, match="cap must be positive"):
        truncated_importance_weights(train, train, cap=0.0)


def test_weights_scale_the_surrogate_but_not_the_kl():
    logps = torch.tensor([[-1.0, -2.0]])
    old = logps.clone()
    ref = torch.tensor([[-1.5, -1.0]])
    adv = torch.tensor([2.0])
    w = torch.tensor([[0.5, 3.0]])
    plain, _, kl = per_token_grpo_loss(logps, old, adv, ref_logps=ref, beta=0.1)
    weighted, _, kl_w = per_token_grpo_loss(logps, old, adv, ref_logps=ref, beta=0.1, is_weights=w)
    # ratio 1 on-policy: surrogate = -A = -2 per token; KL = k3(logp, ref)
    expected_kl = k3_kl(logps, ref)
    assert plain[0].tolist() == pytest.approx((-2.0 + 0.1 * expected_kl)[0].tolist())
    assert weighted[0].tolist() == pytest.approx((-2.0 * w + 0.1 * expected_kl)[0].tolist())
    assert torch.equal(kl, kl_w)
