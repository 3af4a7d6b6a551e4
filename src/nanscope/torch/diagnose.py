"""``diagnose(model, batch, loss_fn)``: one training step, fully instrumented, explained.

Order of the checks, cheapest and most basic first: the batch (``check_batch``), what the
model stores (``check_model_state``), the optimizer's state (``check_optimizer_state``),
then forward + loss + backward under the tracer (``trace_step``).

Design constraints: leaves no trace. The model's and every submodule's training flag, grad
mode, the CPU (and CUDA) RNG state, every parameter's ``.grad`` and every buffer (BatchNorm
running statistics move in a train-mode forward) are restored, so the model is byte-for-byte
what it was. No optimizer step is taken.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

from nanscope.core.adapter import split_batch as _split_batch
from nanscope.core.diagnosis import Diagnosis
from nanscope.torch._util import TORCH
from nanscope.torch.bundle import rng_state, set_rng_state
from nanscope.torch.checks import check_batch, check_model_state, check_optimizer_state
from nanscope.torch.trace import trace_step

__all__ = ["diagnose"]


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` from a batch: ``nanscope.core.adapter.split_batch`` (a pair, a
    dict with target keys such as ``labels``/``mask``, a sequence ending with the targets)."""
    return _split_batch(batch, TORCH)


def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    """``model(x)``, ``model(*inputs)`` for a tuple/list, ``model(**inputs)`` for a dict."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@contextmanager
def preserved(model: torch.nn.Module):
    """Restore training flags, grad mode, RNG state, ``.grad`` and buffers on exit."""
    modes = [(m, m.training) for m in model.modules()]
    grad_mode = torch.is_grad_enabled()
    rng = rng_state()
    grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for p, g in grads:
            p.grad = g
        for m, training in modes:
            m.training = training
        set_rng_state(rng)
        torch.set_grad_enabled(grad_mode)


def diagnose(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    step: int | None = None,
) -> Diagnosis | None:
    """Run one instrumented training step on ``batch`` and explain its first non-finite value.

    ``batch`` is ``(inputs, targets)`` (or a dict, or inputs alone); the step is
    ``loss_fn(model(inputs), targets).backward()``. Returns ``None`` when everything stayed
    finite. The model is left exactly as it was (no optimizer step is taken).

    Example:
        >>> net = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
        >>> d = diagnose(net, (x, None), lambda out, _: (out / out.abs()).sum())
        >>> print(d.category, d.op_kind, d.samples)
        op_domain div [1]
    """
    inputs, targets = split_batch(batch)
    d = check_batch(inputs, targets, step=step)
    if d is None:
        d = check_model_state(model, step=step)
    if d is None and optimizer is not None:
        d = check_optimizer_state(optimizer, step=step, model=model)
    if d is not None:
        return d

    def one_step() -> torch.Tensor:
        loss = loss_fn(call_model(model, inputs), targets)
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.backward()
        return loss

    with preserved(model):
        torch.set_grad_enabled(True)
        for p in model.parameters():
            p.grad = None
        return trace_step(one_step, model=model, step=step)
