"""The chunked head log-softmax shared by every trainer (posttrain.losses.selective_log_softmax): against full
logits and autograd, with a trainable or frozen head, a prepacked head, and the entropy as a metric."""

from __future__ import annotations

import math

import pytest
import torch

import posttrain.losses as losses
from posttrain.losses import Head, linear_head, selective_log_softmax

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_matches_full_logits_and_gradients(temperature):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(101, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 101, (37,), generator=g)

    logps, ent = selective_log_softmax(hidden, linear_head(weight), targets, temperature=temperature, chunk_size=8,
                                       entropy=True, entropy_grad=True)
    full = torch.log_softmax((hidden @ weight.T) / temperature, dim=-1)
    ref = full.gather(-1, targets[:, None]).squeeze(-1)
    ref_ent = -(full.exp() * full).sum(-1)
    torch.testing.assert_close(logps, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)

    (logps.sum() + 0.1 * ent.sum()).backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (ref.sum() + 0.1 * ref_ent.sum()).backward()
    torch.testing.assert_close(gh, hidden.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("keep_probs", [True, False])
@pytest.mark.parametrize("temperature, bias", [(1.0, False), (0.7, True)])
def test_fused_backward_equals_autograd_through_full_logits(temperature, bias, keep_probs, monkeypatch):
    """The hand-written backward (entropy as a metric only) gives autograd's gradients for hidden, weight, bias,
    with the chunk's probabilities kept from the forward or the logits rebuilt."""

    monkeypatch.setattr(losses, "KEEP_PROBS_BYTES", 2**40 if keep_probs else 0)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(29, 16, generator=g, requires_grad=True)
    weight = torch.randn(101, 16, generator=g, requires_grad=True)
    b = torch.randn(101, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(0, 101, (29,), generator=g)
    upstream = torch.randn(29, generator=g)

    logps, ent = selective_log_softmax(hidden, linear_head(weight, b), targets, temperature=temperature, chunk_size=8,
                                       entropy=True)
    assert not ent.requires_grad
    (logps * upstream).sum().backward()
    grads = [x.grad.clone() for x in (hidden, weight, b) if x is not None]
    for x in (hidden, weight, b):
        if x is not None:
            x.grad = None
    logits = torch.nn.functional.linear(hidden, weight, b) / temperature
    ref = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(logps, ref, rtol=1e-5, atol=1e-5)
    (ref * upstream).sum().backward()
    for got, x in zip(grads, [x for x in (hidden, weight, b) if x is not None]):
        torch.testing.assert_close(got, x.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("keep_probs", [True, False])
def test_a_packed_frozen_head_gives_the_same_log_probs_and_hidden_gradient(keep_probs, monkeypatch):
    from posttrain.fastpath import onednn

    if not onednn.available("cpu"):
        pytest.skip("oneDNN packed linears unavailable")
    monkeypatch.setattr(losses, "KEEP_PROBS_BYTES", 2**40 if keep_probs else 0)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(29, 16, generator=g, requires_grad=True)
    weight = torch.randn(101, 16, generator=g)  # frozen
    targets = torch.randint(0, 101, (29,), generator=g)
    upstream = torch.randn(29, generator=g)
    pw = onednn.PrepackedWeight(weight)
    got, ent = selective_log_softmax(hidden, Head(pw.linear, pw.grad_input, vocab=101), targets, chunk_size=8,
                                     entropy=True)
    (gh,) = torch.autograd.grad((got * upstream).sum(), hidden)
    ref, ref_ent = selective_log_softmax(hidden, linear_head(weight), targets, chunk_size=8, entropy=True)
    (gref,) = torch.autograd.grad((ref * upstream).sum(), hidden)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, gref, rtol=1e-4, atol=1e-5)


def test_selective_log_softmax_entropy_is_detached_as_a_metric():
    hidden = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(9, 4)
    logps, ent = selective_log_softmax(hidden, linear_head(weight), torch.zeros(5, dtype=torch.long), entropy=True)
    assert logps.requires_grad and not ent.requires_grad
    # a uniform distribution has entropy log V
    _, ent = selective_log_softmax(torch.zeros(3, 4), linear_head(weight), torch.zeros(3, dtype=torch.long),
                                   entropy=True)
    torch.testing.assert_close(ent, torch.full((3,), math.log(9)))


