"""Mixed precision for PyTorch: headroom, overflow localization, loss-scale forensics.

    headroom(model, batch, loss_fn)   per layer: max |activation| and |gradient| against the
                                      float16 limits, sorted by risk, before anything overflows
    locate_overflow(model, inputs)    the first module whose reduced-precision output is Inf
                                      while the same module in float32 stays finite
    watch_scaler(scaler, optimizer)   a GradScaler whose step() says whether it was taken,
                                      records every skipped step and diagnoses a collapse

Design constraints:
    - Explaining, not training: ``headroom`` and ``locate_overflow`` run one extra forward (and
      backward) on a batch the caller gives; they never touch ``.grad``, parameters, buffers,
      the training flag or the RNG state (gradients are taken with ``torch.autograd.grad``,
      the float32 re-run uses a deep copy of the one module that overflowed).
    - ``watch_scaler`` sits on the training path: it reads the verdict of the finite check
      GradScaler already makes while unscaling (falling back to one fused
      ``torch._foreach_norm`` over the gradients) and does per-parameter work only on a
      skipped step. Its own errors become warnings; it never stops training.
    - Root causes and fix texts come from ``nanscope.core.rules`` / ``nanscope.core.fixes``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nanscope.core.diagnosis import Diagnosis
from nanscope.core.enums import OpKind, Phase
from nanscope.core.headroom import HeadroomReport, LayerHeadroom
from nanscope.core.limits import dtype_name, limits
from nanscope.core.rules import ProducerEvidence, classify_producer, loss_scale_collapse
from nanscope.core.source import user_location
from nanscope.core.summary import fmt
from nanscope.torch._util import samples_of, summary_of
from nanscope.torch.checks import param_names
from nanscope.torch.diagnose import call_model

__all__ = [
    "HeadroomReport",
    "LayerHeadroom",
    "ScalerWatch",
    "headroom",
    "locate_overflow",
    "watch_scaler",
]

_OP_OF_MODULE = {
    torch.nn.Linear: "aten::linear",
    torch.nn.Conv1d: "aten::conv1d",
    torch.nn.Conv2d: "aten::conv2d",
    torch.nn.Conv3d: "aten::conv3d",
    torch.nn.LayerNorm: "aten::layer_norm",
    torch.nn.Softmax: "aten::softmax",
    torch.nn.BatchNorm1d: "aten::batch_norm",
    torch.nn.BatchNorm2d: "aten::batch_norm",
    torch.nn.GroupNorm: "aten::group_norm",
    torch.nn.Embedding: "aten::embedding",
}


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list | tuple):
        return [t for o in obj for t in _tensors(o)]
    return [
        t
        for t in (getattr(obj, k, None) for k in ("logits", "last_hidden_state"))
        if isinstance(t, torch.Tensor)
    ]


def _float_tensors(obj: Any) -> list[torch.Tensor]:
    return [t for t in _tensors(obj) if t.is_floating_point()]


def _absmax(ts: list[torch.Tensor]) -> float:
    vals = [t.detach().abs().amax().float().item() for t in ts if t.numel()]
    return max(vals) if vals else 0.0


class _KeepBuffers:
    """Restore every buffer on exit: a train-mode forward updates BatchNorm running stats."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.saved = [(b, b.detach().clone()) for b in self.model.buffers()]

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for b, old in self.saved:
                b.copy_(old)


# -- headroom -------------------------------------------------------------------------------


def _flush_fraction(t: torch.Tensor, dtype: torch.dtype) -> float:
    g = t.detach().float()
    nonzero = g != 0
    n = int(nonzero.sum())
    if n == 0:
        return 0.0
    flushed = nonzero & (g.to(dtype) == 0)
    return int(flushed.sum()) / n


def headroom(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    *,
    dtype: torch.dtype | str = torch.float16,
) -> HeadroomReport:
    """Measure every layer's largest activation (and gradient) against a reduced dtype's limits.

    Run it in float32 on a real batch before switching to float16: layers whose magnitudes
    come within a few doublings of 65504 will overflow first (the T5 feed-forward ``wo``).

    Args:
        model: the model, in float32 (or whatever it trains in).
        batch: the inputs, or ``(inputs, targets)`` when ``loss_fn`` is given.
        loss_fn: ``loss_fn(output, targets)``; with it, output gradients and the float16
            underflow of parameter gradients are measured too.
        dtype: the reduced dtype to measure against (float16 or bfloat16).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        >>> report = headroom(net, (torch.randn(8, 4), torch.randn(8, 1)), torch.nn.functional.mse_loss)
        >>> report.layers[0].status, len(report.layers)
        ('ok', 3)
    """
    name = dtype_name(dtype)
    tdtype = getattr(torch, name)
    inputs, targets = (batch[0], batch[1]) if loss_fn is not None else (batch, None)
    names = {m: n for n, m in model.named_modules()}
    seen: dict[str, tuple[str, list[torch.Tensor]]] = {}

    def hook(module, args, output):
        n = names.get(module, "?")
        if n and n not in seen:  # first call of a shared module
            seen[n] = (type(module).__name__, _float_tensors(output))

    handles = [m.register_forward_hook(hook) for n, m in model.named_modules() if n]
    was_training = model.training
    try:
        # Dropout must not move the user's RNG, nor BatchNorm its running statistics.
        with torch.random.fork_rng(devices=[]), _KeepBuffers(model), torch.enable_grad():
            output = call_model(model, inputs)
            loss = loss_fn(output, targets) if loss_fn is not None else None
            grads: dict[str, list[torch.Tensor | None]] = {}
            param_underflow: dict[str, float] = {}
            if loss is not None and loss.requires_grad:
                outs = [
                    (n, i, t)
                    for n, (_, ts) in seen.items()
                    for i, t in enumerate(ts)
                    if t.requires_grad
                ]
                params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
                wrt = [t for _, _, t in outs] + [p for _, p in params]
                gs = torch.autograd.grad(loss, wrt, allow_unused=True)
                for (n, _, _), g in zip(outs, gs[: len(outs)], strict=True):
                    grads.setdefault(n, []).append(g)
                for (n, _), g in zip(params, gs[len(outs) :], strict=True):
                    if g is not None:
                        param_underflow[n] = _flush_fraction(g, tdtype)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    rows = []
    for n, (kind, ts) in seen.items():
        gl = [g for g in grads.get(n, []) if g is not None]
        under = None
        if gl:
            counts = [(_flush_fraction(g, tdtype), int((g != 0).sum())) for g in gl]
            total = sum(c for _, c in counts)
            under = sum(f * c for f, c in counts) / total if total else 0.0
        rows.append(LayerHeadroom(n, kind, _absmax(ts), _absmax(gl) if gl else None, under, name))
    rows.sort(key=lambda r: (-r.risk, -(r.grad_underflow or 0.0)))
    return HeadroomReport(rows, name, param_underflow)


# -- overflow localization ------------------------------------------------------------------


def locate_overflow(
    model: torch.nn.Module,
    inputs: Any,
    *,
    dtype: torch.dtype | str | None = None,
    device_type: str | None = None,
    step: int | None = None,
) -> Diagnosis | None:
    """Find the first module whose reduced-precision output overflowed, and prove it in float32.

    Runs one forward pass of ``model`` on ``inputs`` (under ``torch.autocast(device_type,
    dtype)`` when ``dtype`` is given; as is for a model already in float16). The first module
    to finish with a non-finite output from finite inputs is re-run alone in float32 (a copy,
    autocast off): if that stays finite, the cause is an overflow of the reduced dtype.

    Returns:
        A ``Diagnosis`` (category ``overflow``, phase ``forward``, ``module`` the dotted path,
        fixes: keep that module in float32, switch to bfloat16, scale the branch), the
        tracer's verdict when float32 fails too, or None when the forward stays finite.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2)).half()
        >>> locate_overflow(net, torch.ones(1, 2, dtype=torch.float16)) is None
        True
    """
    names = {m: n for n, m in model.named_modules()}
    found: list[tuple[str, torch.nn.Module, tuple, dict, Any, Any]] = []

    def hook(module, args, kwargs, output):
        if found:
            return
        outs = _float_tensors(output)
        if not outs or all(bool(torch.isfinite(t).all()) for t in outs):
            return
        if any(not bool(torch.isfinite(t).all()) for t in _float_tensors((args, kwargs))):
            return  # a propagator, not the producer
        found.append((names.get(module, ""), module, args, kwargs, output, user_location()))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()]
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]), _KeepBuffers(model), torch.no_grad():
            if dtype is not None:
                dev = device_type or next((p.device.type for p in model.parameters()), "cpu")
                with torch.autocast(dev, dtype=getattr(torch, dtype_name(dtype))):
                    call_model(model, inputs)
            else:
                call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not found:
        return None
    name, module, args, kwargs, output, location = found[0]
    out_t = next(t for t in _float_tensors(output) if not bool(torch.isfinite(t).all()))
    in_ts = _float_tensors((args, kwargs))
    f32 = _rerun_float32(module, args, kwargs)
    op = _OP_OF_MODULE.get(type(module)) or f"{type(module).__name__}.forward"
    f32_max = _absmax(f32) if f32 is not None else None
    f32_finite = f32 is not None and all(bool(torch.isfinite(t).all()) for t in f32)
    extra = []
    if f32_finite:
        lim = limits(out_t.dtype)
        extra.append(
            f"the same module recomputed in float32 is finite: max |output| {fmt(f32_max)}"
            + (
                f" > {fmt(lim.max)} ({dtype_name(out_t.dtype)} max)"
                if lim and f32_max and f32_max > lim.max
                else ""
            )
        )
    else:
        extra.append(
            "the same module recomputed in float32 is non-finite too: not a precision problem"
        )
    ev = ProducerEvidence(
        op=op,
        phase=Phase.FORWARD,
        op_kind=OpKind.of(op),
        module=name or None,
        step=step,
        inputs=[summary_of(t) for t in in_ts],
        output=summary_of(out_t),
        samples=samples_of(out_t),
        location=location,
        extra_evidence=extra,
        framework="torch",
        details={
            "float32_recompute_finite": f32_finite,
            "float32_absmax": f32_max,
            "module_type": type(module).__name__,
        },
    )
    return classify_producer(ev)


def _rerun_float32(module: torch.nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor] | None:
    def up(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.detach().float()
        if isinstance(x, list | tuple):
            return type(x)(up(v) for v in x)
        if isinstance(x, dict):
            return {k: up(v) for k, v in x.items()}
        return x

    try:
        twin = copy.deepcopy(module).float()
        dev = next((p.device.type for p in twin.parameters()), "cpu")
        with torch.no_grad(), torch.autocast(dev, enabled=False):
            return _float_tensors(twin(*up(args), **up(kwargs)))
    except Exception:  # a module that cannot run alone: say so, never crash
        return None


# -- loss-scale forensics -------------------------------------------------------------------


@dataclass
class SkippedStep:
    """One optimizer step GradScaler skipped: the scale then, and whose gradients were bad."""

    step: int
    scale: float
    parameters: list[str]
    loss_finite: bool | None = None

    def __str__(self) -> str:
        bad = ", ".join(self.parameters[:4]) + (" …" if len(self.parameters) > 4 else "")
        return f"step {self.step}: skipped at scale {fmt(self.scale)}; non-finite gradients in {bad or '(none found)'}"


class ScalerWatch:
    """A ``torch.amp.GradScaler`` that reports what its silent skips hide.

    Use it exactly like the scaler (``scale``, ``unscale_``, ``step``, ``update``, and every
    other attribute pass through); ``step()`` returns True when the update was applied.
    After each ``update()``: ``scales`` (history), ``skipped`` (``SkippedStep`` list) and,
    once the scale collapses, ``diagnosis`` (also raised as a warning, once).
    """

    def __init__(
        self,
        scaler: torch.amp.GradScaler,
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module | None = None,
        *,
        max_consecutive: int = 10,
        min_scale: float = 1.0,
    ) -> None:
        self.scaler = scaler
        self.optimizer = optimizer
        self.max_consecutive = max_consecutive
        self.min_scale = min_scale
        self.scales: list[float] = []
        self.skipped: list[SkippedStep] = []
        self.diagnosis: Diagnosis | None = None
        self.steps = 0
        self._names = param_names(optimizer, model)
        self._last_loss_finite: bool | None = None
        self._pending: SkippedStep | None = None
        self._taken: bool | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scaler, name)

    def scale(self, outputs: Any) -> Any:
        try:
            ts = _float_tensors(outputs)
            self._last_loss_finite = (
                all(bool(torch.isfinite(t.detach()).all()) for t in ts) if ts else None
            )
        except Exception as err:  # never break training
            _internal("scale", err)
        return self.scaler.scale(outputs)

    def _grads(self, optimizer) -> list[tuple[int, torch.Tensor]]:
        return [
            (id(p), p.grad)
            for g in optimizer.param_groups
            for p in g["params"]
            if p.grad is not None
        ]

    def step(
        self, optimizer: torch.optim.Optimizer | None = None, *args: Any, **kwargs: Any
    ) -> bool:
        """``scaler.step(optimizer)``; returns whether the update was applied (False: skipped)."""
        opt = optimizer or self.optimizer
        if not self.scaler.is_enabled():
            self.scaler.step(opt, *args, **kwargs)
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(opt, *args, **kwargs)
        finite = True
        try:
            finite = self._step_was_taken(opt)
            if not finite:
                bad = [
                    self._names.get(i, "?")
                    for i, g in self._grads(opt)
                    if not bool(torch.isfinite(g).all())
                ]
                self._pending = SkippedStep(self.steps, scale, bad, self._last_loss_finite)
        except Exception as err:
            _internal("step", err)
        return finite

    def _step_was_taken(self, opt: torch.optim.Optimizer) -> bool:
        # GradScaler already ran one fused finite check while unscaling; reading its verdict
        # costs nothing more. Its bookkeeping is private, so fall back to our own fused check.
        state = getattr(self.scaler, "_per_optimizer_states", {}).get(id(opt))
        found = state.get("found_inf_per_device") if isinstance(state, dict) else None
        if found:
            return not any(bool(v.item()) for v in found.values())
        grads = [g for _, g in self._grads(opt)]
        if not grads:
            return True
        # The norm of all gradients is finite iff every entry is (overflow gives Inf, never wraps).
        norms = torch._foreach_norm(grads)
        return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        self.scaler.update(new_scale)
        try:
            self._after_update()
        except Exception as err:
            _internal("update", err)
        finally:
            self.steps += 1
            self._pending = None

    def _after_update(self) -> None:
        if not self.scaler.is_enabled():
            return
        self.scales.append(float(self.scaler.get_scale()))
        if self._pending is not None:
            self.skipped.append(self._pending)
        if self.diagnosis is not None or not self.skipped:
            return
        bad = sorted({n for s in self.skipped[-self.max_consecutive :] for n in s.parameters})
        d = loss_scale_collapse(
            self.scales,
            [s.step for s in self.skipped],
            bad_parameters=bad,
            nonfinite_loss_steps=sum(
                1 for s in self.skipped[-self.max_consecutive :] if s.loss_finite is False
            ),
            framework="torch",
            step=self.steps,
            min_scale=self.min_scale,
            max_consecutive=self.max_consecutive,
        )
        if d is not None:
            d.evidence.extend(str(s) for s in self.skipped[-3:])
            self.diagnosis = d
            warnings.warn(f"nanscope: {d}", RuntimeWarning, stacklevel=3)

    def summary(self) -> str:
        """The skipped steps and the scale history, one line each."""
        head = f"GradScaler: {len(self.skipped)} of {self.steps} steps skipped; scale " + (
            " → ".join(fmt(s) for s in self.scales[-8:]) if self.scales else "n/a"
        )
        return "\n".join([head] + [f"  {s}" for s in self.skipped[-20:]])


def watch_scaler(
    scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module | None = None,
    **kwargs: Any,
) -> ScalerWatch:
    """Wrap a GradScaler: ``step()`` returns whether the update happened; skips are explained.

    Args:
        scaler: a ``torch.amp.GradScaler``.
        optimizer: the optimizer it steps (its parameters are checked on a skipped step).
        model: optional, to name parameters (``ffn.wo.weight``) instead of group indices.
        max_consecutive: skipped steps in a row that count as a collapse (default 10).
        min_scale: a scale below this counts as a collapse (default 1.0).

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> scaler = watch_scaler(torch.amp.GradScaler("cpu"), opt, net)
        >>> scaler.scale(net(torch.ones(1, 2)).sum()).backward()
        >>> scaler.step(opt), scaler.update(), scaler.skipped
        (True, None, [])
    """
    return ScalerWatch(scaler, optimizer, model, **kwargs)


def _internal(where: str, err: Exception) -> None:
    warnings.warn(
        f"nanscope: internal error in watch_scaler.{where} ({type(err).__name__}: {err}); "
        "training continues unobserved",
        RuntimeWarning,
        stacklevel=3,
    )
