"""``nanscope.torch.repair_norm_statistics``: recompute BatchNorm running statistics from data.

Design constraints:
    - The way stochastic weight averaging re-estimates them (``torch.optim.swa_utils.update_bn``):
      running statistics are reset, ``momentum=None`` gives a cumulative moving average (every
      batch weighs the same), and forward passes run in train mode under ``no_grad``. No
      weight changes; only ``running_mean``, ``running_var`` and ``num_batches_tracked``.
    - Batches whose inputs hold NaN/Inf are skipped (they are what poisons statistics).
    - Leave no trace: each module's ``training`` flag, each BatchNorm's ``momentum`` and the
      grad mode are restored in ``finally``.
    - ``reset_norm_statistics`` (mean 0, variance 1) is the fallback when there is no data; it
      discards what the model learned about activation scale.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from nanscope.core.errors import BadInputError
from nanscope.core.summary import fmt
from nanscope.torch._util import tree_finite as _finite  # also used by cli/repair.py

_NORM = nn.modules.batchnorm._BatchNorm


@dataclass
class NormRepairReport:
    """What a repair changed: per layer, the statistics before and after.

    ``outputs_finite`` is the eval-mode check on the data after the repair (None if not run).
    """

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    batches: int = 0
    skipped_batches: int = 0
    method: str = "recalibrated"
    outputs_finite: bool | None = None

    @property
    def changed(self) -> list[str]:
        """Layers whose statistics were non-finite/negative before or moved noticeably."""
        return [n for n, d in self.layers.items() if d["changed"]]

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "batches": self.batches,
            "skipped_batches": self.skipped_batches,
            "outputs_finite": self.outputs_finite,
            "changed": self.changed,
            "layers": self.layers,
        }

    def __str__(self) -> str:
        head = (
            f"{self.method} BatchNorm statistics of {len(self.layers)} layers"
            + (
                f" over {self.batches} batches"
                if self.method == "recalibrated"
                else " to mean 0, variance 1"
            )
            + (
                f" ({self.skipped_batches} non-finite batches skipped)"
                if self.skipped_batches
                else ""
            )
        )
        lines = [head]
        for name in self.changed[:20]:
            b, a = self.layers[name]["before"], self.layers[name]["after"]
            lines.append(f"  {name}: running_var {_describe(b)} -> {_describe(a)}")
        if len(self.changed) > 20:
            lines.append(f"  … {len(self.changed) - 20} more layers changed")
        if self.outputs_finite is not None:
            lines.append(
                "  eval-mode outputs on the data: "
                + ("finite" if self.outputs_finite else "STILL NON-FINITE")
            )
        return "\n".join(lines)


def _describe(s: dict) -> str:
    bad = f", {s['nonfinite']} non-finite" if s["nonfinite"] else ""
    neg = f", {s['negative']} negative" if s["negative"] else ""
    return f"[{fmt(s['min'])}, {fmt(s['max'])}]{bad}{neg}"


def _var_summary(bn: nn.Module) -> dict[str, Any]:
    v = bn.running_var.detach().float().cpu().numpy()
    f = v[np.isfinite(v)]
    return {
        "min": float(f.min()) if f.size else None,
        "max": float(f.max()) if f.size else None,
        "nonfinite": int(v.size - f.size),
        "negative": int((f < 0).sum()),
        "mean_of_running_mean": float(np.nanmean(bn.running_mean.detach().float().cpu().numpy())),
    }


def norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """BatchNorm layers (1d/2d/3d, SyncBatchNorm) that keep running statistics."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, _NORM) and m.track_running_stats and m.running_var is not None
    }


def _inputs_of(batch: Any) -> Any:
    if isinstance(batch, list | tuple):
        return batch[0]
    if isinstance(batch, dict):
        for k in ("input", "inputs", "x", "image", "images", "pixel_values"):
            if k in batch:
                return batch[k]
        return next(iter(batch.values()))
    return batch


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return x.to(device) if isinstance(x, torch.Tensor) else x


def repair_norm_statistics(
    model: nn.Module,
    loader: Iterable,
    *,
    max_batches: int | None = None,
    verify: bool = True,
    verify_batches: int = 4,
) -> NormRepairReport:
    """Recompute every BatchNorm layer's running mean and variance from ``loader``.

    Args:
        model: the model, changed in place (only BatchNorm running statistics).
        loader: batches of inputs: a DataLoader, a list of tensors, or ``(inputs, targets)``
            pairs (targets are ignored). Use training-like data with the usual preprocessing.
        max_batches: stop after this many batches (default: the whole loader).
        verify: afterwards, check that eval-mode outputs are finite on the first batches.
        verify_batches: how many batches that check runs on.

    Returns:
        A :class:`NormRepairReport`: which layers changed, before/after, whether outputs are finite.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> with torch.no_grad():
        ...     m[1].running_var[0] = float("nan")
        >>> r = repair_norm_statistics(m, [torch.randn(8, 3, 8, 8) for _ in range(3)])
        >>> r.changed, r.outputs_finite, bool(torch.isfinite(m[1].running_var).all())
        (['1'], True, True)
    """
    layers = norm_layers(model)
    report = NormRepairReport()
    if not layers:
        return report
    before = {n: _var_summary(m) for n, m in layers.items()}
    saved = {
        n: (
            m.running_mean.clone(),
            m.running_var.clone(),
            None if m.num_batches_tracked is None else m.num_batches_tracked.clone(),
        )
        for n, m in layers.items()
    }
    training = {m: m.training for m in model.modules()}
    momentum = {n: m.momentum for n, m in layers.items()}
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    first_batches: list[Any] = []
    try:
        for m in layers.values():
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the batches
        model.train()
        with torch.no_grad():
            for batch in loader:
                if max_batches is not None and report.batches >= max_batches:
                    break
                x = _to(_inputs_of(batch), device)
                if not _finite(x):
                    report.skipped_batches += 1
                    continue
                model(x)
                report.batches += 1
                if verify and len(first_batches) < verify_batches:
                    first_batches.append(x)
        if not report.batches:
            for n, m in layers.items():  # nothing to average over: put the old statistics back
                rm, rv, nb = saved[n]
                m.running_mean.copy_(rm)
                m.running_var.copy_(rv)
                if nb is not None:
                    m.num_batches_tracked.copy_(nb)
            raise BadInputError(
                "no usable batch to recompute BatchNorm statistics from "
                + (
                    "(every batch held NaN/Inf)"
                    if report.skipped_batches
                    else "(the data is empty)"
                )
            )
    finally:
        for n, m in layers.items():
            m.momentum = momentum[n]
        for m, flag in training.items():
            m.train(flag)
    if verify and first_batches:
        try:
            model.eval()
            with torch.no_grad():
                report.outputs_finite = all(_finite(model(x)) for x in first_batches)
        finally:
            for m, flag in training.items():
                m.train(flag)
    for n, m in layers.items():
        after = _var_summary(m)
        b = before[n]
        moved = (
            b["nonfinite"]
            or b["negative"]
            or b["min"] is None
            or not np.allclose(
                saved[n][1].float().cpu().numpy(),
                m.running_var.float().cpu().numpy(),
                rtol=1e-3,
                atol=1e-6,
                equal_nan=False,
            )
        )
        report.layers[n] = {"before": b, "after": after, "changed": bool(moved)}
    return report


def reset_norm_statistics(model: nn.Module) -> NormRepairReport:
    """Fallback without data: running mean 0, running variance 1 in every BatchNorm layer.

    This discards what the model learned about its activations' scale: eval outputs become
    finite but usually less accurate; prefer :func:`repair_norm_statistics` when data exists.
    """
    report = NormRepairReport(method="reset")
    for n, m in norm_layers(model).items():
        b = _var_summary(m)
        m.reset_running_stats()
        report.layers[n] = {"before": b, "after": _var_summary(m), "changed": True}
    return report
