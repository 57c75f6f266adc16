"""DPO / IPO / rDPO / SimPO losses (posttrain.preference.losses.dpo_loss) on hand-made per-pair tensors:
against TRL 1.16's own code where it is a callable function (CPOTrainer.cpo_loss: SimPO and label-smoothed
sigmoid), against TRL 1.16 DPOTrainer._compute_loss's formulas (cited by line) where its loss is inside a method
that needs a model (tests/integration/test_dpo.py calls that method itself on a real model), and against a plain
per-pair Python loop."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from posttrain.preference.losses import dpo_loss

BETA = 0.3


@pytest.fixture
def pairs():
    g = torch.Generator().manual_seed(0)
    n = 16
    pc, pr = -torch.rand(n, generator=g, dtype=torch.float64) * 40, -torch.rand(n, generator=g, dtype=torch.float64) * 40
    rc, rr = pc + torch.randn(n, generator=g, dtype=torch.float64) * 3, pr + torch.randn(n, generator=g, dtype=torch.float64) * 3
    nc, nr = torch.randint(1, 30, (n,), generator=g), torch.randint(1, 30, (n,), generator=g)
    return pc, pr, rc, rr, nc, nr


def trl_dpo_per_pair(pc, pr, rc, rr, nc, nr, loss_type, beta, eps):
    """TRL 1.16 trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss with f_divergence_type reverse_kl
    (chosen_logratios: line 1350, chosen_scores = chosen_logratios: line 1354, delta_score: line 1383),
    ``completion_mask.chunk(2)`` sums being the token counts."""
    chosen_scores, rejected_scores = pc - rc, pr - rr
    delta_score = chosen_scores - rejected_scores
    if loss_type == "sigmoid":  # line 1388
        return -F.logsigmoid(beta * delta_score)
    if loss_type == "ipo":  # lines 1399-1404
        ipo_delta = chosen_scores / nc.clamp(min=1.0) - rejected_scores / nr.clamp(min=1.0)
        return (ipo_delta - 1 / (2 * beta)) ** 2
    if loss_type == "robust":  # lines 1429-1431
        clean = -(1 - eps) * F.logsigmoid(beta * delta_score)
        flipped = -eps * F.logsigmoid(-beta * delta_score)
        return (clean - flipped) / (1 - 2 * eps)
    raise AssertionError(loss_type)


def trl_cpo_loss(policy_chosen, policy_rejected, loss_type, beta, eps, gamma):
    """TRL 1.16's own CPOTrainer.cpo_loss (trl/experimental/cpo/cpo_trainer.py), called unbound on the
    trainer's attributes it reads; -> (losses, chosen_rewards, rejected_rewards)."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    trainer = SimpleNamespace(alpha=0.0, beta=beta, label_smoothing=eps, loss_type=loss_type, simpo_gamma=gamma,
                              accelerator=SimpleNamespace(device=torch.device("cpu")))
    return CPOTrainer.cpo_loss(trainer, policy_chosen, policy_rejected)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.1), ("robust", 0.3)])
def test_matches_trl_dpo_trainer_formulas(pairs, loss_type, eps):
    pc, pr, rc, rr, nc, nr = pairs
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=loss_type, label_smoothing=eps,
                             chosen_tokens=nc, rejected_tokens=nr)
    expected = trl_dpo_per_pair(pc, pr, rc, rr, nc, nr, loss_type, BETA, eps)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    # TRL's metrics (lines 1580-1601): rewards are beta * log-ratio, logps the policy's summed log-probs
    torch.testing.assert_close(metrics["rewards/chosen"], (BETA * (pc - rc)).float())
    torch.testing.assert_close(metrics["rewards/margins"], (BETA * ((pc - rc) - (pr - rr))).float())
    torch.testing.assert_close(metrics["rewards/accuracies"], ((pc - rc) > (pr - rr)).float())
    torch.testing.assert_close(metrics["logps/rejected"], pr.float())


def test_label_smoothed_sigmoid_is_conservative_dpo_as_trl_cpo(pairs):
    """sigmoid with label smoothing = cDPO; TRL 1.16's CPOTrainer computes it on ``policy_chosen -
    policy_rejected``, so fed the DPO log-ratios it gives the DPO loss exactly."""
    pc, pr, rc, rr, _, _ = pairs
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type="sigmoid", label_smoothing=0.2)
    trl, _, _ = trl_cpo_loss(pc - rc, pr - rr, "sigmoid", BETA, 0.2, 0.0)
    torch.testing.assert_close(loss, trl, rtol=1e-12, atol=1e-12)
    plain, _ = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type="sigmoid")
    assert not torch.allclose(loss, plain)  # the smoothing does act


@pytest.mark.parametrize("eps,gamma", [(0.0, 0.5), (0.1, 1.2)])
def test_simpo_matches_trl_cpo_trainer(pairs, eps, gamma):
    pc, pr, _, _, nc, nr = pairs
    loss, metrics = dpo_loss(pc, pr, beta=2.0, loss_type="simpo", label_smoothing=eps, simpo_gamma=gamma,
                             chosen_tokens=nc, rejected_tokens=nr)
    # CPOTrainer gets length-averaged log-probs for simpo (average_log_prob=True, cpo_trainer.py line 850)
    trl, trl_rc, trl_rr = trl_cpo_loss(pc / nc, pr / nr, "simpo", 2.0, eps, gamma)
    torch.testing.assert_close(loss, trl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(metrics["rewards/chosen"], trl_rc.float())
    torch.testing.assert_close(metrics["rewards/rejected"], trl_rr.float())
    # reference-free: any reference given is ignored
    with_ref, _ = dpo_loss(pc, pr, pc * 0 + 7, pr * 0 - 7, beta=2.0, loss_type="simpo", label_smoothing=eps,
                           simpo_gamma=gamma, chosen_tokens=nc, rejected_tokens=nr)
    torch.testing.assert_close(with_ref, loss)


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def loop_loss(pc, pr, rc, rr, nc, nr, loss_type, beta, eps, gamma):
    """The same losses one pair at a time in plain Python floats, from the papers' formulas."""
    out = []
    for i in range(len(pc)):
        hc, hr = float(pc[i] - rc[i]), float(pr[i] - rr[i])
        if loss_type == "sigmoid":
            z = beta * (hc - hr)
            out.append(-(1 - eps) * _logsig(z) - eps * _logsig(-z))
        elif loss_type == "robust":
            z = beta * (hc - hr)
            out.append((-(1 - eps) * _logsig(z) + eps * _logsig(-z)) / (1 - 2 * eps))
        elif loss_type == "ipo":
            out.append((hc / int(nc[i]) - hr / int(nr[i]) - 1 / (2 * beta)) ** 2)
        else:
            z = beta * (float(pc[i]) / int(nc[i]) - float(pr[i]) / int(nr[i])) - gamma
            out.append(-(1 - eps) * _logsig(z) - eps * _logsig(-z))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.25), ("ipo", 0.0), ("robust", 0.2),
                                           ("simpo", 0.0), ("simpo", 0.1)])
def test_matches_a_plain_per_pair_loop(pairs, loss_type, eps):
    pc, pr, rc, rr, nc, nr = pairs
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=loss_type, label_smoothing=eps, simpo_gamma=0.4,
                             chosen_tokens=nc, rejected_tokens=nr)
    torch.testing.assert_close(loss, loop_loss(pc, pr, rc, rr, nc, nr, loss_type, BETA, eps, 0.4),
                               rtol=1e-10, atol=1e-10)
    assert loss.shape == pc.shape and set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                                       "rewards/margins", "logps/chosen", "logps/rejected"}


def test_gradient_pushes_chosen_up_and_rejected_down(pairs):
    pc, pr, rc, rr, nc, nr = (t.clone() for t in pairs)
    for loss_type in ("sigmoid", "ipo", "simpo", "robust"):
        c, r = pc.clone().requires_grad_(), pr.clone().requires_grad_()
        # (cDPO's smoothing pulls back pairs already far apart; rDPO's never does)
        loss, _ = dpo_loss(c, r, rc, rr, beta=BETA, loss_type=loss_type, label_smoothing=0.1 * (loss_type == "robust"),
                           chosen_tokens=nc, rejected_tokens=nr)
        loss.mean().backward()
        if loss_type != "ipo":  # IPO regresses to a target margin: pairs already past it are pulled back
            assert (c.grad < 0).all() and (r.grad > 0).all(), loss_type


def test_at_the_reference_dpo_is_log2_and_rewards_are_zero(pairs):
    pc, pr = pairs[:2]
    loss, metrics = dpo_loss(pc, pr, pc, pr, beta=BETA)
    torch.testing.assert_close(loss, torch.full_like(pc, math.log(2)))
    assert metrics["rewards/margins"].abs().max() == 0 and metrics["rewards/accuracies"].sum() == 0


def test_bad_arguments_are_named():
    t = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type 'kto'"):
        dpo_loss(t, t, t, t, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(t, t, t, t, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(t, t, beta=0.1, loss_type="sigmoid")
