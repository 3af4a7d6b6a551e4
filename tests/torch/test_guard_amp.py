"""The Guard with a GradScaler: the scaler's own overflow skips are not false alarms, a
collapsing loss scale is diagnosed, and a NaN loss is still a failure."""

import inspect
import warnings

import torch
import torch.nn as nn

from nanscope.core.enums import Category
from nanscope.core.rules import loss_scale_collapse
from nanscope.torch import Guard


def setup(init_scale, loss_factor=1.0, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)

    def train_step(batch):
        x, y = batch
        loss = ((net(x) - y) ** 2).mean() * loss_factor
        scaler.scale(loss).backward()
        return loss

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(12)]
    return net, opt, scaler, train_step, batches


def test_scaler_overflow_steps_are_silent_and_training_matches_unguarded():
    # init_scale 2**125: scaled gradients overflow float32 at first; GradScaler skips and halves.
    net, opt, scaler, train_step, batches = setup(2.0**125, loss_factor=100.0)
    for b in batches:
        opt.zero_grad(set_to_none=True)
        train_step(b)
        scaler.step(opt)
        scaler.update()
    plain = [p.detach().clone() for p in net.parameters()]
    plain_scale = scaler.get_scale()

    net, opt, scaler, train_step, batches = setup(2.0**125, loss_factor=100.0)
    guard = Guard(net, opt, scaler=scaler, policy="skip", reports=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in batches:
            guard.step(train_step, b)
    assert [str(w.message) for w in caught] == []
    assert guard.skipped == 0 and guard.last is None
    assert scaler.get_scale() == plain_scale < 2.0**125  # the scaler did skip some steps
    assert all(torch.equal(a, b) for a, b in zip(plain, net.parameters(), strict=True))


def test_a_collapsing_loss_scale_is_diagnosed():
    # Gradients that overflow step after step (the scale cannot come down fast enough):
    # GradScaler skips every update; after max_consecutive in a row (the rule's) it is a collapse.
    net, opt, scaler, train_step, batches = setup(2.0**127, loss_factor=1e4)
    guard = Guard(net, opt, scaler=scaler, policy="stop", reports=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in batches:
            guard.step(train_step, b)
            if guard.should_stop:
                break
    d = guard.last
    assert d.category is Category.OVERFLOW and "loss scale collapsed" in d.summary
    in_a_row = inspect.signature(loss_scale_collapse).parameters["max_consecutive"].default
    assert guard.should_stop and guard.steps == in_a_row
    assert f"{in_a_row} steps skipped in a row" in d.summary
    assert len(caught) == 1 and "loss scale" in str(caught[0].message)


def test_nan_loss_under_a_scaler_is_still_a_failure():
    net, opt, scaler, train_step, batches = setup(2.0**10)
    batches[3][0][5, 2] = float("nan")
    guard = Guard(net, opt, scaler=scaler, policy="skip", reports=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for b in batches:
            guard.step(train_step, b)  # the step after the failure must not trip over unscale_
    d = guard.last
    assert (d.category, d.samples, d.step) == (Category.NONFINITE_INPUT, [5], 3)
    assert guard.skipped == 1 and guard.steps == len(batches)
    assert all(torch.isfinite(p).all() for p in net.parameters())
