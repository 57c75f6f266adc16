"""A step that diverges stops the run, the last one included (reliability review R16b: lr=inf with one step saved
an all-NaN adapter with exit status 0): :func:`posttrain.distributed.finish_step` checks the loss and the
gradient norm before the update, and the updated weights after it."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from posttrain.distributed import DivergedError, finish_step, nonfinite_tensors


def setup(lr: float):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return Accelerator(cpu=True), model, opt, sched


def backward(model, scale: float = 1.0) -> float:
    loss = model(torch.ones(2, 4)).pow(2).mean() * scale
    loss.backward()
    return float(loss.detach())


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_a_sound_step_updates_and_reports():
    acc, model, opt, sched = setup(1e-2)
    before = weights(model)
    loss = backward(model)
    norm, lr = finish_step(acc, model, opt, sched, 1.0, loss=loss, step=1, advice="Lower train.lr")
    assert norm > 0 and lr == 1e-2
    assert all(not torch.equal(a, b) for a, b in zip(before, weights(model)))
    assert nonfinite_tensors(list(model.parameters())) == 0


def test_a_nonfinite_loss_or_gradient_stops_before_the_update():
    acc, model, opt, sched = setup(1e-2)
    before = weights(model)
    backward(model)
    with pytest.raises(DivergedError, match=r"loss is nan at step 3: training diverged \(no checkpoint written for "
                                            r"it\). Lower train.lr \(now 0.01\), or resume from the last checkpoint"):
        finish_step(acc, model, opt, sched, 1.0, loss=float("nan"), step=3, advice="Lower train.lr (now 0.01)")
    for p in model.parameters():  # a gradient that overflowed while the reported loss did not
        p.grad = torch.full_like(p, float("inf"))
    with pytest.raises(DivergedError, match="the gradient norm is (inf|nan) at step 1"):
        finish_step(acc, model, opt, sched, None, loss=1.0, step=1, advice="Lower train.lr")
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))  # the weights were not touched


def test_an_update_that_makes_the_weights_nonfinite_stops_the_last_step_too():
    """Finite loss and gradients, but the update carries a float32 weight past 3.4e38."""
    w = torch.nn.Parameter(torch.full((4,), -3e38))
    opt = torch.optim.AdamW([w], lr=1e38, betas=(0.0, 0.999), weight_decay=0.0)  # each weight moves by lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loss = (w * 1e-3).sum()
    loss.backward()
    with pytest.raises(DivergedError, match=r"the update \(learning rate 1e\+38\) left 1 of 1 trainable tensors "
                                            r"with non-finite values at step 1"):
        finish_step(Accelerator(cpu=True), torch.nn.ParameterList([w]), opt, sched, None, loss=float(loss),
                    step=1, advice="Lower train.lr")
    assert nonfinite_tensors([w]) == 1


def test_a_step_size_torch_cannot_represent_is_divergence_too():
    acc, model, opt, sched = setup(1e39)
    loss = backward(model)
    with pytest.raises(DivergedError, match=r"the optimizer step overflowed \(learning rate 1e\+39.*at step 2"):
        finish_step(acc, model, opt, sched, 1.0, loss=loss, step=2, advice="Lower train.lr")


def test_nonfinite_tensors_counts_each_tensor_once():
    a, b, c = torch.zeros(3), torch.tensor([1.0, float("nan"), float("inf")]), torch.tensor([-float("inf")])
    assert nonfinite_tensors([a, b, c]) == 2
    assert nonfinite_tensors([]) == 0
    big = torch.tensor([3e38, 3e38])  # finite values whose float32 sum overflows: not counted
    assert nonfinite_tensors([big]) == 0
    assert nonfinite_tensors([torch.full((4,), 6e4, dtype=torch.float16)]) == 0  # summed in float32, not float16
