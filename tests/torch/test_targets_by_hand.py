"""What a batch tensor is, decided by what consumed it, with hand-written losses: combined
with the model's output and never read by the model, it is a target (``invalid_target``);
read by the model it is an input (``nonfinite_input``), even when the loss uses it too."""

from __future__ import annotations

import torch
import torch.nn as nn

from nanscope.torch.trace import trace_step


def _data(bad_x: bool, bad_y: bool):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 4, generator=g), torch.rand(6, 4, generator=g)
    if bad_x:
        x[2, 1] = float("nan")
    if bad_y:
        y[4, 0] = float("nan")
    return x, y


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))


def test_l1_by_hand_on_a_nan_target_is_invalid_target():
    model, (x, y) = _model(), _data(bad_x=False, bad_y=True)
    d = trace_step(lambda: (model(x) - y).abs().mean(), model=model)
    assert (d.category, d.phase, d.samples) == ("invalid_target", "data", [4])


def test_autoencoder_input_also_in_the_loss_stays_an_input():
    model, (x, _) = _model(), _data(bad_x=True, bad_y=False)
    d = trace_step(lambda: ((model(x) - x) ** 2).mean(), model=model)
    assert (d.category, d.phase, d.samples) == ("nonfinite_input", "data", [2])


def test_denoising_input_through_noise_then_model_stays_an_input():
    model, (x, noise) = _model(), _data(bad_x=True, bad_y=False)

    def step():
        clean = x.clone()
        return ((model(x + 0.1 * noise) - clean) ** 2).mean()

    d = trace_step(step, model=model)
    assert (d.category, d.samples) == ("nonfinite_input", [2])


def test_bad_input_with_a_clean_target_is_an_input():
    model, (x, y) = _model(), _data(bad_x=True, bad_y=False)
    d = trace_step(lambda: ((model(x) - y) ** 2).mean(), model=model)
    assert d.category == "nonfinite_input"


def test_a_tensor_combined_with_something_else_than_the_output_is_not_called_a_target():
    """A NaN mixed into the loss with a constant, never with the model's output: no evidence
    that it is a target, so it stays what an unread batch tensor is by default (an input)."""
    model, (x, y) = _model(), _data(bad_x=False, bad_y=True)
    d = trace_step(lambda: model(x).mean() + (y * 2).mean(), model=model)
    assert d.category == "nonfinite_input"
