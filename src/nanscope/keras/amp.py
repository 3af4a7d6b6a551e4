"""Mixed precision for Keras 3: headroom per layer, and what LossScaleOptimizer's skips hide.

    headroom(model, batch, loss_fn)   per layer: max |activation| and |gradient| against the
                                      float16 limits, sorted by risk (same report as torch)
    LossScaleMonitor(batch=...)       a ``fit`` callback: scale history, every skipped step,
                                      and a loud diagnosis when the dynamic scale collapses

Design constraints:
    - ``headroom`` runs one extra eager forward/backward on the caller's batch through a
      functional view of the model (``keras.Model(model.inputs, [layer outputs])``); it
      changes no variable. It needs a built functional or Sequential model.
    - The monitor only reads ``LossScaleOptimizer.dynamic_scale`` after each batch (one scalar
      read); per-variable gradients are computed once, when the scale has collapsed, on the
      batch given to it. Its own errors become warnings; it never stops training unless
      asked (``stop_on_collapse=True``).
    - Root causes and fix texts come from ``nanscope.core.rules`` / ``nanscope.core.fixes``;
      the report objects are shared with torch (``nanscope.core.headroom``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from nanscope.core.diagnosis import Diagnosis
from nanscope.core.headroom import HeadroomReport, LayerHeadroom
from nanscope.core.limits import dtype_name
from nanscope.core.rules import loss_scale_collapse
from nanscope.core.summary import fmt

__all__ = ["HeadroomReport", "LayerHeadroom", "LossScaleMonitor", "headroom"]


def _absmax(t: Any) -> float:
    a = np.asarray(tf.cast(t, tf.float32))
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a)))


def _flush_fraction(g: Any, dtype: str) -> float:
    a = np.asarray(tf.cast(g, tf.float32))
    nonzero = a != 0
    n = int(nonzero.sum())
    if n == 0:
        return 0.0
    np_dtype = np.float16 if dtype == "float16" else np.float32
    return int((nonzero & (a.astype(np_dtype) == 0)).sum()) / n


def headroom(
    model: keras.Model,
    batch: Any,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    *,
    dtype: str = "float16",
) -> HeadroomReport:
    """Measure every layer's largest activation (and gradient) against float16's limits.

    Args:
        model: a built functional or Sequential Keras model.
        batch: the inputs, or ``(inputs, targets)`` when ``loss_fn`` is given.
        loss_fn: ``loss_fn(y_true, y_pred)`` (Keras order), e.g.
            ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``.
        dtype: the reduced dtype to measure against.

    Example:
        >>> import keras, numpy as np
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")])
        >>> headroom(m, np.ones((2, 4), "float32")).layers[0].name
        'd'
    """
    name = dtype_name(dtype)
    x, y = (batch[0], batch[1]) if loss_fn is not None else (batch, None)
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    try:
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        view = keras.Model(inputs, [layer.output for layer in layers] + list(model.outputs))
    except (ValueError, AttributeError, TypeError) as err:
        from nanscope.core.errors import BadInputError

        raise BadInputError(
            f"headroom needs a built functional or Sequential model ({err})"
        ) from None
    with tf.GradientTape() as tape:
        outs = view(x, training=False)
        acts, preds = outs[: len(layers)], outs[len(layers) :]
        loss = loss_fn(y, preds[0] if len(preds) == 1 else preds) if loss_fn is not None else None
    grads: list[Any] = []
    params: dict[str, float] = {}
    if loss is not None:
        variables = list(model.trainable_variables)
        all_grads = tape.gradient(loss, list(acts) + variables)
        grads = all_grads[: len(acts)]
        for v, g in zip(variables, all_grads[len(acts) :], strict=True):
            if g is not None:
                params[v.path] = _flush_fraction(g, name)
    rows = []
    for i, layer in enumerate(layers):
        g = grads[i] if grads else None
        rows.append(
            LayerHeadroom(
                layer.name,
                type(layer).__name__,
                _absmax(acts[i]),
                None if g is None else _absmax(g),
                None if g is None else _flush_fraction(g, name),
                name,
            )
        )
    rows.sort(key=lambda r: (-r.risk, -(r.grad_underflow or 0.0)))
    return HeadroomReport(rows, name, params)


class LossScaleMonitor(keras.callbacks.Callback):
    """Watch a ``LossScaleOptimizer`` during ``fit``: skipped steps, scale history, collapse.

    Keras skips the update and halves the scale whenever a gradient is non-finite, silently.
    This callback records each skip (``skipped``: step numbers), the scale after every step
    (``scales``) and, when the scale falls below ``min_scale`` or ``max_consecutive`` steps in
    a row are skipped, builds ``diagnosis`` and warns once. Give it ``batch=(x, y)`` to name
    the variables whose gradients are non-finite at that point.

    Example:
        >>> monitor = LossScaleMonitor()
        >>> monitor.scales, monitor.skipped, monitor.diagnosis
        ([], [], None)
    """

    def __init__(
        self,
        optimizer: Any = None,
        *,
        batch: Any = None,
        max_consecutive: int = 10,
        min_scale: float = 1.0,
        stop_on_collapse: bool = False,
    ) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.batch = batch
        self.max_consecutive = max_consecutive
        self.min_scale = min_scale
        self.stop_on_collapse = stop_on_collapse
        self.scales: list[float] = []
        self.skipped: list[int] = []
        self.nonfinite_loss_steps = 0
        self.diagnosis: Diagnosis | None = None
        self._step = 0
        self._before: float | None = None

    def _scale(self, *, initial: bool = False) -> float | None:
        opt = (
            self.optimizer if self.optimizer is not None else getattr(self.model, "optimizer", None)
        )
        var = getattr(opt, "dynamic_scale", None)
        if var is None and initial:  # built on the first apply: the scale it starts from
            scale = getattr(opt, "initial_scale", None)
            return None if scale is None else float(scale)
        return None if var is None else float(np.asarray(var))

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        try:
            self._before = self._scale(initial=True)
        except Exception as err:
            _internal("on_train_batch_begin", err)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        try:
            self._observe(logs or {})
        except Exception as err:
            _internal("on_train_batch_end", err)
        finally:
            self._step += 1

    def _observe(self, logs: dict) -> None:
        after = self._scale()
        if after is None:
            return
        self.scales.append(after)
        if self._before is not None and after < self._before:
            self.skipped.append(self._step)
            loss = logs.get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                self.nonfinite_loss_steps += 1
        if self.diagnosis is not None or not self.skipped:
            return
        d = loss_scale_collapse(
            self.scales,
            self.skipped,
            framework="keras",
            step=self._step,
            nonfinite_loss_steps=self.nonfinite_loss_steps,
            min_scale=self.min_scale,
            max_consecutive=self.max_consecutive,
        )
        if d is None:
            return
        if self.batch is not None:
            bad, loss_finite = self._bad_variables(after)
            if bad or loss_finite is False:
                d = loss_scale_collapse(
                    self.scales,
                    self.skipped,
                    framework="keras",
                    step=self._step,
                    bad_parameters=bad,
                    min_scale=self.min_scale,
                    max_consecutive=self.max_consecutive,
                    nonfinite_loss_steps=max(self.nonfinite_loss_steps, int(loss_finite is False)),
                )
        self.diagnosis = d
        warnings.warn(f"nanscope: {d}", RuntimeWarning, stacklevel=2)
        if self.stop_on_collapse:
            self.model.stop_training = True

    def _bad_variables(self, scale: float) -> tuple[list[str], bool | None]:
        x, y = self.batch[0], self.batch[1]
        with tf.GradientTape() as tape:
            y_pred = self.model(x, training=False)
            loss = self.model.compute_loss(x=x, y=y, y_pred=y_pred)
            scaled = tf.cast(loss, tf.float32) * scale
        variables = list(self.model.trainable_variables)
        grads = tape.gradient(scaled, variables)
        bad = [
            v.path
            for v, g in zip(variables, grads, strict=True)
            if g is not None and not bool(tf.reduce_all(tf.math.is_finite(tf.cast(g, tf.float32))))
        ]
        return bad, bool(tf.reduce_all(tf.math.is_finite(tf.cast(loss, tf.float32))))

    def summary(self) -> str:
        """The skipped steps and the scale history, one line."""
        return (
            f"LossScaleOptimizer: {len(self.skipped)} of {self._step} steps skipped "
            f"(steps {', '.join(map(str, self.skipped[-10:]))}); scale "
            + (" → ".join(fmt(s) for s in self.scales[-8:]) if self.scales else "n/a")
        )


def _internal(where: str, err: Exception) -> None:
    warnings.warn(
        f"nanscope: internal error in LossScaleMonitor.{where} ({type(err).__name__}: {err}); "
        "training continues unobserved",
        RuntimeWarning,
        stacklevel=3,
    )
