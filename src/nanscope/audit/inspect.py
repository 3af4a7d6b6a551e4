"""``nanscope.audit.inspect``: what in a saved model will make training or inference non-finite.

Design constraints:
    - Works on plain numpy (``nanscope.audit.checkpoint`` reads the file); imports no framework
      (``.pt``/``.pth`` files too: torch only under ``trust_pickle``).
    - Root causes come from ``nanscope.core.rules`` (nonfinite_parameters,
      corrupt_norm_statistics / norm_statistics_problems, optimizer_state), fix texts from
      ``nanscope.core.fixes``: the live guards and this offline audit cannot disagree.
    - One fused statistics pass per tensor (``nanscope.core.stats``); the per-layer table of
      magnitudes goes to ``stats["layers"]``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nanscope.audit.checkpoint import Checkpoint, read_checkpoint
from nanscope.core.diagnosis import AuditReport, Finding
from nanscope.core.enums import Category, Phase
from nanscope.core.fixes import audit_fixes
from nanscope.core.limits import LIMITS
from nanscope.core.rules import (
    corrupt_norm_statistics,
    nonfinite_parameters,
    norm_statistics_problems,
    optimizer_state,
)
from nanscope.core.stats import ArrayStats, array_stats
from nanscope.core.summary import TensorSummary, fmt, summarize

HALF_MAX = LIMITS["float16"].max
RELATIVE_EXTREME = 1e5  # a channel's running variance this many times the layer's median is suspect


def inspect(path: str | Path, *, trust_pickle: bool = False) -> AuditReport:
    """Audit a checkpoint: non-finite tensors, corrupt BatchNorm statistics, float16 headroom.

    Args:
        path: ``.pt``/``.pth`` (state dict or training checkpoint with optimizer state),
            ``.safetensors``, Keras ``.keras`` or ``.h5``.
        trust_pickle: allow full unpickling of PyTorch files (runs code from the file: only
            for files you trust).

    Example:
        >>> import tempfile, os, numpy as np
        >>> from nanscope.audit.checkpoint import write_safetensors
        >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> write_safetensors(p, {"bn.running_mean": np.zeros(3, np.float32),
        ...                       "bn.running_var": np.array([1, np.nan, 1], np.float32)})
        >>> r = inspect(p)
        >>> r.findings[0].category, r.findings[0].where_found["tensor"], r.exit_code
        (<Category.CORRUPT_NORM_STATISTICS: 'corrupt_norm_statistics'>, 'bn.running_var', 1)
    """
    return analyze(read_checkpoint(path, trust_pickle=trust_pickle))


def _is_float(a: np.ndarray) -> bool:
    return a.dtype.kind == "f"


def analyze(ck: Checkpoint) -> AuditReport:
    """The findings and the per-layer table for a checkpoint already read."""
    fw = ck.framework
    stats_of: dict[str, ArrayStats] = {
        n: array_stats(a) for n, a in ck.tensors.items() if a.dtype.kind in "fiub"
    }
    findings: list[Finding] = []

    # BatchNorm statistics: NaN/Inf, negative variance, extreme values (absolute and per layer).
    norm_tensors: set[str] = set()
    bad_layers: dict[str, list[str]] = {}
    bad_tensors: list[str] = []
    for layer, (mean_name, var_name) in ck.norm_layers.items():
        mean = ck.tensors.get(mean_name) if mean_name else None
        var = ck.tensors.get(var_name) if var_name else None
        norm_tensors.update(n for n in (mean_name, var_name) if n)
        # The statistics' own names (torch running_var, keras moving_variance) label the problems.
        labels = (_leaf(mean_name) or "running_mean", _leaf(var_name) or "running_var")
        problems = norm_statistics_problems(
            _summary(mean, ck, mean_name), _summary(var, ck, var_name), names=labels
        )
        if var is not None and _is_float(var) and var.size > 1:
            problems += _relative_extremes(var, labels[1])
        if problems:
            bad_layers[layer] = problems
            bad_tensors += [
                n
                for n, label in ((var_name, labels[1]), (mean_name, labels[0]))
                if n and any(p.startswith(label + ":") for p in problems)
            ]
    if bad_layers:
        d = corrupt_norm_statistics(bad_layers, framework=fw)
        d.fixes = [f.replace("CKPT", str(ck.path.name)) for f in d.fixes]
        findings.append(
            Finding.of(
                d, {"tensor": bad_tensors[0], "tensors": bad_tensors, "layers": list(bad_layers)}
            )
        )

    # Non-finite parameters and other buffers.
    bad = {
        n: _summary(ck.tensors[n], ck, n)
        for n, s in stats_of.items()
        if s.nonfinite and n not in norm_tensors
    }
    if bad:
        d = nonfinite_parameters(bad, framework=fw, phase=Phase.STATE, kind="tensor")
        findings.append(Finding.of(d, {"tensor": next(iter(bad)), "tensors": list(bad)}))

    # Weights that a cast to float16 would turn into Inf.
    over = {
        n: s
        for n, s in stats_of.items()
        if s.count
        and _absmax(s) > HALF_MAX
        and ck.dtypes.get(n) != "float16"
        and n not in norm_tensors
        and _is_float(ck.tensors[n])
    }
    if over:
        names = list(over)
        findings.append(
            Finding(
                category=Category.OVERFLOW,
                phase=Phase.STATE,
                framework=fw,
                dtype="float16",
                summary=f"{len(names)} tensor{'s' if len(names) != 1 else ''} exceed float16's "
                f"range (65504): casting the model to half makes them Inf: "
                f"{', '.join(names[:3])}{' …' if len(names) > 3 else ''}",
                evidence=[f"{n}: max |x| {fmt(_absmax(over[n]))}" for n in names[:10]],
                fixes=audit_fixes("half_overflow", fw),
                where_found={"tensor": names[0], "tensors": names},
                severity="warning",
            )
        )

    # Optimizer state: non-finite moments or learning rate; moments beyond float16.
    opt_stats = {n: array_stats(a) for n, a in ck.optimizer.items() if a.dtype.kind in "fiu"}
    bad_opt = {n: _summary(ck.optimizer[n], ck, n) for n, s in opt_stats.items() if s.nonfinite}
    lr = ck.hyper.get("lr")
    if bad_opt or (lr is not None and not math.isfinite(lr)):
        d = optimizer_state(
            bad_opt or {"lr": summarize(np.array([lr]))},
            framework=fw,
            eps=ck.hyper.get("eps"),
            lr=lr,
        )
        d.phase = Phase.STATE
        names = list(bad_opt) or ["lr"]
        findings.append(Finding.of(d, {"tensor": names[0], "tensors": names}))
    big_opt = [
        n for n, s in opt_stats.items() if s.count and _absmax(s) > HALF_MAX and n not in bad_opt
    ]
    if big_opt:
        findings.append(
            Finding(
                category=Category.OPTIMIZER_STATE,
                phase=Phase.STATE,
                framework=fw,
                dtype="float16",
                summary=f"{len(big_opt)} optimizer state tensor{'s' if len(big_opt) != 1 else ''} "
                f"exceed float16's range: optimizer state kept in half would be Inf: "
                f"{', '.join(big_opt[:3])}",
                evidence=[f"{n}: max |x| {fmt(_absmax(opt_stats[n]))}" for n in big_opt[:10]],
                fixes=audit_fixes("optimizer_half_overflow", fw),
                where_found={"tensor": big_opt[0], "tensors": big_opt},
                severity="warning",
            )
        )

    stats = {
        "format": ck.format,
        "file": str(ck.path),
        "tensors": len(ck.tensors),
        "parameters": int(sum(a.size for a in ck.tensors.values())),
        "optimizer_tensors": len(ck.optimizer),
        "norm_layers": len(ck.norm_layers),
        "layers": _layer_table(ck, stats_of),
    }
    if ck.hyper:
        stats["optimizer"] = {
            k: v if math.isfinite(v) else str(v) for k, v in ck.hyper.items()
        }  # JSON has no NaN
    if ck.notes:
        stats["notes"] = list(ck.notes)
    return AuditReport(findings, stats, framework=fw, title=f"inspect {ck.path.name}")


def _summary(a: np.ndarray | None, ck: Checkpoint, name: str | None) -> TensorSummary | None:
    if a is None:
        return None
    return summarize(np.asarray(a), ck.dtypes.get(name or "", None))


def _absmax(s: ArrayStats) -> float:
    return max(abs(s.min), abs(s.max)) if s.count else 0.0


def _leaf(name: str | None) -> str | None:
    return name.rsplit(".", 1)[-1] if name else None


def _relative_extremes(var: np.ndarray, label: str) -> list[str]:
    v = np.asarray(var, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return []
    med = float(np.median(np.abs(v)))
    if med <= 0:
        return []
    far = v[np.abs(v) > RELATIVE_EXTREME * max(med, 1e-2)]
    if (
        far.size == 0 or float(np.abs(far).max()) > 1e6
    ):  # none, or already named by the absolute rule
        return []
    return [
        f"{label}: {far.size} channel{'s' if far.size != 1 else ''} extreme relative to the layer "
        f"(max {fmt(float(np.abs(far).max()))}, layer median {fmt(med)})"
    ]


def _layer_table(ck: Checkpoint, stats_of: dict[str, ArrayStats]) -> dict[str, dict]:
    """Per layer: number of values, max |x|, std, non-finite count, dtype."""
    table: dict[str, dict] = {}
    for name, s in stats_of.items():
        layer = name.rsplit(".", 1)[0] if "." in name else name
        row = table.setdefault(
            layer, {"numel": 0, "max_abs": 0.0, "nonfinite": 0, "dtype": ck.dtypes.get(name)}
        )
        row["numel"] += s.size
        row["max_abs"] = max(row["max_abs"], _absmax(s))
        row["nonfinite"] += s.nonfinite
    return table
