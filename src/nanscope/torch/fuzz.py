"""The PyTorch runner of ``nanscope.fuzz_loss``: one edge case -> value, gradient, diagnosis.

Design constraints: each case gets fresh tensors (the user's example is never touched). The
cheap check (value and gradients finite?) runs first; only a failing case is re-run under
``nanscope.torch.trace.trace_step``, which names the producer op, its line and the cause.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from nanscope.core import rules
from nanscope.fuzz import Case, CaseResult

__all__ = ["CaseResult", "run_case"]


def _tensors(case: Case) -> tuple[list[Any], dict[str, Any], list[torch.Tensor]]:
    leaves: list[torch.Tensor] = []

    def conv(slot: str, a: Any) -> Any:
        if not isinstance(a, np.ndarray):
            return a
        t = torch.from_numpy(np.array(a, copy=True))
        if t.is_floating_point():
            if case.float16:
                t = t.half()
            if slot in case.grad:
                t.requires_grad_(True)
                leaves.append(t)
        return t

    args = [conv(str(i), a) for i, a in enumerate(case.args)]
    kwargs = {k: conv(k, v) for k, v in case.kwargs.items()}
    return args, kwargs, leaves


def _loss_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, list | tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict):
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    raise TypeError(f"the loss returned {type(out).__name__}, not a tensor")


def _step(fn, args, kwargs):
    def step():
        loss = _loss_of(fn(*args, **kwargs))
        if loss.requires_grad:
            loss.float().sum().backward()
        return loss

    return step


def run_case(fn, case: Case) -> CaseResult:
    """Run ``fn`` on one case; diagnose it if the value or a gradient is non-finite."""
    args, kwargs, leaves = _tensors(case)
    try:
        with warnings.catch_warnings():  # the edge cases are meant to provoke warnings
            warnings.simplefilter("ignore")
            loss = _step(fn, args, kwargs)()
    except Exception as err:  # the loss rejects this input (e.g. a label out of range)
        return CaseResult(
            f"error: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
        )
    value_ok = bool(torch.isfinite(loss.detach()).all())
    grads_ok = all(t.grad is None or bool(torch.isfinite(t.grad).all()) for t in leaves)
    if value_ok and grads_ok:
        return CaseResult("finite")
    outcome = "non-finite value" if not value_ok else "non-finite gradient"
    args, kwargs, _ = _tensors(case)
    try:
        from nanscope.torch.trace import trace_step

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            diagnosis = trace_step(_step(fn, args, kwargs))
    except Exception as err:  # the tracer must never hide the finding
        diagnosis = rules.not_localized(
            "loss" if not value_ok else "gradient", err, framework="torch"
        )
    if diagnosis is None:
        diagnosis = rules.unexplained("loss" if not value_ok else "gradient", framework="torch")
    return CaseResult(outcome, diagnosis)
