"""Cheap, explicit checks of what a training step starts from: the batch, the model's
stored state, the optimizer's state.

Each returns a ``Diagnosis`` or ``None`` (nothing wrong). The category is always decided by
``nanscope.core.rules``; this module only collects evidence (tensor summaries, names).

Design constraints: read-only (nothing here changes a tensor or a mode); one reduction per
tensor at most on the healthy path; summaries (numpy copies) only for the bad tensors;
``Guard`` and ``nanscope run`` call these on a failure, ``diagnose`` before its traced step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nanscope.core import rules
from nanscope.core.adapter import check_batch as _check_batch
from nanscope.core.diagnosis import Diagnosis
from nanscope.core.enums import Phase
from nanscope.core.limits import dtype_name, limits
from nanscope.torch._util import (
    TORCH,
    all_finite,
    is_float,
    is_norm_layer,
    summary_of,
)

__all__ = ["check_batch", "check_model_state", "check_optimizer_state"]


def check_batch(inputs: Any, targets: Any = None, *, step: int | None = None) -> Diagnosis | None:
    """Non-finite values in a batch: inputs -> ``nonfinite_input``, targets -> ``invalid_target``.

    ``inputs`` and ``targets`` may be tensors or nested tuples / lists / dicts of tensors.
    ``samples`` are the batch indices (dim 0) of the bad rows.

    Example:
        >>> x = torch.ones(4, 3); x[2, 1] = float("nan")
        >>> d = check_batch(x, torch.zeros(4))
        >>> d.category, d.samples, d.phase
        (<Category.NONFINITE_INPUT: 'nonfinite_input'>, [2], <Phase.DATA: 'data'>)
        >>> check_batch(torch.ones(2, 3)) is None
        True
    """
    return _check_batch(inputs, targets, TORCH, step=step)


def check_model_state(model: torch.nn.Module, *, step: int | None = None) -> Diagnosis | None:
    """Non-finite parameters / buffers (``nonfinite_parameters``) or bad normalization
    statistics (``corrupt_norm_statistics``: running_mean / running_var NaN, Inf, negative or
    extreme), named by their dotted path in ``model``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> check_model_state(net) is None
        True
        >>> with torch.no_grad():
        ...     net[1].running_var[0] = float("nan")
        >>> d = check_model_state(net)
        >>> d.category, d.module
        (<Category.CORRUPT_NORM_STATISTICS: 'corrupt_norm_statistics'>, '1')
    """
    bad_params = {n: summary_of(p) for n, p in model.named_parameters() if not all_finite(p)}
    if bad_params:
        return rules.nonfinite_parameters(bad_params, framework="torch", step=step)
    layers: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        if not is_norm_layer(m) or not getattr(m, "track_running_stats", False):
            continue
        mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        if mean is None or var is None:
            continue
        # Healthy statistics pass with two reductions; summaries only for suspicious ones.
        v = var.detach()
        if (
            all_finite(mean)
            and all_finite(var)
            and bool((v >= 0).all())
            and float(torch.maximum(mean.detach().abs().max(), v.abs().max())) <= 1e6
        ):
            continue
        problems = rules.norm_statistics_problems(summary_of(mean), summary_of(var))
        if problems:
            layers[name] = problems
    if layers:
        return rules.corrupt_norm_statistics(layers, framework="torch", step=step)
    bad_buffers = {
        n: summary_of(b) for n, b in model.named_buffers() if is_float(b) and not all_finite(b)
    }
    if bad_buffers:
        return rules.nonfinite_parameters(bad_buffers, framework="torch", step=step, kind="buffer")
    return None


def param_names(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None) -> dict[int, str]:
    """``id(parameter) -> name``: its path in ``model``, else ``param_groups[i].params[j]``."""
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    out = {}
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            out[id(p)] = names.get(id(p), f"param_groups[{gi}].params[{pi}]")
    return out


def check_optimizer_state(
    optimizer: torch.optim.Optimizer,
    *,
    step: int | None = None,
    model: torch.nn.Module | None = None,
) -> Diagnosis | None:
    """The optimizer's own state went non-finite (``optimizer_state``).

    Looks at every state tensor (Adam's ``exp_avg``, ``exp_avg_sq``, momentum buffers), every
    group's learning rate, and, when a parameter is already non-finite, at whether the group's
    ``eps`` even exists in that parameter's dtype (Adam ``eps=1e-8`` rounds to 0 in float16,
    so an update divides by zero). Pass ``model`` to name parameters by their path.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([w], lr=float("nan"))
        >>> check_optimizer_state(opt).category
        <Category.OPTIMIZER_STATE: 'optimizer_state'>
        >>> check_optimizer_state(torch.optim.SGD([w], lr=0.1)) is None
        True
    """
    names = param_names(optimizer, model)
    bad = {}
    eps = lr = dtype = None
    for group in optimizer.param_groups:
        g_lr = group.get("lr")
        g_lr = float(g_lr) if g_lr is not None else None
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and is_float(value) and not all_finite(value):
                    bad[f"{names[id(p)]}.{key}"] = summary_of(value)
                    dtype = dtype or dtype_name(p.dtype)
            if g_lr is not None and not math.isfinite(g_lr):
                lr = g_lr
            g_eps = group.get("eps")
            lim = limits(p.dtype)
            if (
                isinstance(g_eps, float)
                and lim is not None
                and g_eps < lim.subnormal / 2
                and not all_finite(p)
            ):
                # The update divided by (sqrt(v) + eps) where eps rounded to 0 in this dtype.
                bad[names[id(p)]] = summary_of(p)
                eps, dtype = g_eps, dtype_name(p.dtype)
        if lr is not None:
            break
    if not bad and lr is None:
        return None
    if eps is None:
        eps = next(
            (g.get("eps") for g in optimizer.param_groups if isinstance(g.get("eps"), float)), None
        )
    d = rules.optimizer_state(bad, framework="torch", eps=eps, param_dtype=dtype, step=step, lr=lr)
    if lr is not None and not bad:
        d.summary = f"the learning rate is {lr!r}"
    d.phase = Phase.OPTIMIZER
    return d
