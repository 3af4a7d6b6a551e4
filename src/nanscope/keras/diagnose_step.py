"""``nanscope.keras.diagnose``: one instrumented eager training step on one batch.

(The module is not called ``diagnose.py``: importing a submodule sets it as an attribute of
the package, which would shadow the ``nanscope.keras.diagnose`` function.)

Design constraints:
    * Cheap checks first (the batch, then the weights), the per-op trace only if those are
      clean: forward (``training=True``), loss and backward under ``tf.GradientTape``, every
      eager op watched by ``nanscope.keras.trace.Tracer``.
    * Leaves no trace: no update is applied, and the variables a training-mode forward pass
      changes (BatchNorm moving statistics, random seeds, metric accumulators) are restored
      byte for byte in ``finally``.
    * Every decision goes through ``nanscope.core.rules``; every fix text through
      ``nanscope.core.fixes`` (``framework="keras"``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from nanscope.core import rules
from nanscope.core.adapter import check_batch as _check_batch
from nanscope.core.diagnosis import Diagnosis
from nanscope.core.enums import Phase
from nanscope.core.summary import summarize
from nanscope.keras._util import (
    KERAS,
    VariableSnapshot,
    batch_size_of,
    owned_variables,
    state_variables,
    to_tensors,
    unpack,
)
from nanscope.keras.trace import Tracer, all_finite, diagnosis_from_trace, is_float, to_numpy

_FW = "keras"
_FLOAT32_MAX = 3.4028234663852886e38


def diagnose(
    model: keras.Model,
    batch: Any,
    loss: Callable | str | None = None,
    *,
    step: int | None = None,
    ignore_index: int | None = None,
    grad_norms: Sequence[float] | None = None,
    learning_rate: float | None = None,
) -> Diagnosis | None:
    """Run one instrumented training step on ``batch`` and say where NaN/Inf came from.

    No update is applied and the model is left exactly as it was.

    Args:
        model: a built Keras model.
        batch: ``x``, ``(x, y)`` or ``(x, y, sample_weight)``, as ``model.fit`` reads it.
        loss: ``loss(y_true, y_pred)``, a Keras loss name, or None for the loss the model
            was compiled with (``model.compute_loss``).
        step: the optimizer step, reported in the diagnosis.
        ignore_index: the label that means "no target" (e.g. 255 in segmentation masks), so
            that a loss averaged over zero valid targets is named ``invalid_target``. Read from
            the loss's ``ignore_class`` when it has one.
        grad_norms: gradient-norm history of the preceding steps (oldest first): tells an
            explosion from a one-off.
        learning_rate: reported as evidence for exploding gradients.

    Returns:
        The ``Diagnosis``, or None when the step stayed finite.

    Example:
        >>> import keras, numpy as np
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        >>> x = np.array([[1.0, 2.0, 3.0], [np.inf, 0.0, 1.0]], dtype="float32")
        >>> d = diagnose(model, (x, np.zeros((2, 1), "float32")), "mse")
        >>> d.category, d.phase, d.samples
        (<Category.NONFINITE_INPUT: 'nonfinite_input'>, <Phase.DATA: 'data'>, [1])
    """
    entry = sys._getframe(1)
    x, y, sample_weight = (to_tensors(p) for p in unpack(batch))
    if (d := check_batch(x, y, step=step)) is not None:
        return d
    if (d := check_weights(model, step=step)) is not None:
        return d
    loss_fn = _loss_function(model, loss)
    if ignore_index is None:
        ignore_index = _ignore_index(model, loss)
    return trace_step(
        model,
        x,
        y,
        sample_weight,
        loss_fn,
        entry=entry,
        step=step,
        ignore_index=ignore_index,
        grad_norms=grad_norms,
        learning_rate=learning_rate,
    )


# -- cheap checks ------------------------------------------------------------------------------


def check_batch(x: Any, y: Any = None, *, step: int | None = None) -> Diagnosis | None:
    """``nonfinite_input`` when the inputs hold NaN/Inf, ``invalid_target`` for the targets."""
    return _check_batch(x, y, KERAS, step=step, names=("x", "y"))


def check_weights(model: keras.Model, *, step: int | None = None) -> Diagnosis | None:
    """``nonfinite_parameters`` when a trainable weight is already NaN/Inf."""
    bad = {}
    for name, v, _layer in owned_variables(model):
        t = getattr(v, "value", v)  # keras.Variable -> the backend tensor
        if not v.trainable or not is_float(t):
            continue
        a = to_numpy(t)
        if a is not None and not np.isfinite(a).all():
            bad[name] = summarize(a, t.dtype.name)
    if not bad:
        return None
    return rules.nonfinite_parameters(bad, framework=_FW, step=step)


# -- the traced step ---------------------------------------------------------------------------


def trace_step(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any,
    loss_fn: Callable,
    *,
    entry=None,
    step: int | None = None,
    ignore_index: int | None = None,
    grad_norms: Sequence[float] | None = None,
    learning_rate: float | None = None,
) -> Diagnosis | None:
    """Forward, loss and backward of one step under the tracer; no update, state restored."""
    n = batch_size_of(x)
    snapshot = VariableSnapshot(state_variables(model))
    try:
        with Tracer(entry=entry) as tracer:
            tracer.mark_external((x, y))
            with tf.GradientTape() as tape:
                y_pred = model(x, training=True)
                tracer.phase = Phase.LOSS
                value = loss_fn(x, y, y_pred, sample_weight)
            tracer.phase = Phase.BACKWARD
            variables = list(model.trainable_variables)
            grads = tape.gradient(value, variables) if variables else []
        tr = tracer.trace
        valid = None
        if ignore_index is not None and y is not None:
            valid = int(np.count_nonzero(to_numpy(y) != ignore_index))
        if not all_finite(value):
            # The loss first: its values come from every producer that reached it, the model
            # output's and those only the loss sees (add_loss terms); the earliest is named.
            failed = value
        elif not all_finite(y_pred):
            failed = y_pred
        else:
            failed = [g for g in grads if g is not None and not all_finite(g)] or None
        norm = _global_norm(grads)  # float64: finite even where float32's sum of squares is not
        history = [*(grad_norms or [])] + (
            [norm] if norm is not None and math.isfinite(norm) and norm > 0 else []
        )
        if failed is None:
            if (
                norm is not None and norm * norm > _FLOAT32_MAX
            ):  # every gradient finite, the norm past float32
                return rules.exploding_gradients(
                    history, framework=_FW, step=step, lr=learning_rate
                )
            return None
        d = diagnosis_from_trace(
            tr,
            failed,
            batch_size=n,
            step=step,
            valid_targets=valid,
            ignore_index=ignore_index,
            gradients_only=failed is not y_pred and failed is not value,
        )
        if d is None:
            return rules.unexplained(
                "loss" if failed is value else "gradient",
                framework=_FW,
                step=step,
                phase=Phase.LOSS if all_finite(y_pred) else Phase.FORWARD,
            )
        return rules.with_history(d, history, lr=learning_rate)
    finally:
        snapshot.restore()


def diagnose_train_step(
    model: keras.Model,
    batch: Any,
    *,
    step: int | None = None,
    grad_norms: Sequence[float] | None = None,
    learning_rate: float | None = None,
) -> Diagnosis | None:
    """Like ``diagnose``, for a model whose ``train_step`` is the user's own: that
    ``train_step`` is re-run eagerly on ``batch`` with its ops recorded, its optimizer update
    captured (never applied), and every variable it changed restored; then explained.
    """
    from nanscope.keras.trace import Recorder

    x, y, _ = (to_tensors(p) for p in unpack(batch))
    if (d := check_batch(x, y, step=step)) is not None:
        return d
    if (d := check_weights(model, step=step)) is not None:
        return d
    opt = model.optimizer
    seen: dict[str, Any] = {"grads": None, "target": None}
    recorder = Recorder()
    tape_gradient = tf.GradientTape.gradient

    def gradient(tape, target, *args, **kwargs):
        recorder.phase = Phase.BACKWARD
        try:
            return tape_gradient(tape, target, *args, **kwargs)
        finally:
            recorder.phase = Phase.FORWARD
            seen["target"] = target

    def apply(grads, trainable_variables=None):
        seen["grads"] = list(grads)  # captured, never applied

    had_apply, old_apply = "apply" in vars(opt), vars(opt).get("apply")
    snapshot = VariableSnapshot(state_variables(model) + list(opt.variables))
    tf.GradientTape.gradient = gradient
    object.__setattr__(opt, "apply", apply)
    try:
        recorder.start()
        logs = type(model).train_step(model, batch)
    finally:
        recorder.stop()
        tf.GradientTape.gradient = tape_gradient
        if had_apply:
            object.__setattr__(opt, "apply", old_apply)
        else:
            object.__delattr__(opt, "apply")
        snapshot.restore()
    grads = [g for g in seen["grads"] or [] if g is not None]
    loss = seen["target"]
    logged = logs.get("loss") if isinstance(logs, dict) else None
    if loss is not None and not all_finite(loss):
        failed = loss
    elif logged is not None and not all_finite(logged):
        failed = logged
    else:
        failed = [g for g in grads if not all_finite(g)] or None
    if failed is None:
        return None
    tr = recorder.replay(external=(x, y))
    d = diagnosis_from_trace(
        tr,
        failed,
        batch_size=batch_size_of(x),
        step=step,
        gradients_only=failed is not loss and failed is not logged,
    )
    if d is None:
        return None
    return rules.with_history(d, [*(grad_norms or [])], lr=learning_rate)


def _global_norm(grads: list) -> float | None:
    sq = 0.0
    for g in grads:
        a = to_numpy(g) if g is not None and is_float(g) else None
        if a is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                sq += float(np.sum(np.square(a.astype(np.float64))))
    return math.sqrt(sq) if grads else None


def _loss_function(model: keras.Model, loss: Callable | str | None) -> Callable:
    """``f(x, y, y_pred, sample_weight) -> scalar`` for the user's loss or the compiled one."""
    if loss is None:
        overridden = type(model).compute_loss is not keras.Model.compute_loss
        if not overridden and getattr(model, "loss", None) is None and not model.losses:
            from nanscope.core.errors import BadInputError

            raise BadInputError(
                "the model is not compiled with a loss: pass loss=, e.g. diagnose(model, batch, 'mse')"
            )
        return lambda x, y, y_pred, sw: model.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sw, training=True
        )
    fn = keras.losses.get(loss) if isinstance(loss, str) else loss
    return lambda x, y, y_pred, sw: fn(y, y_pred) if sw is None else fn(y, y_pred, sw)


def _ignore_index(model: keras.Model, loss: Any) -> int | None:
    for candidate in (loss, getattr(model, "loss", None)):
        for obj in (candidate, getattr(candidate, "fn", None)):
            ic = getattr(obj, "ignore_class", None)
            if ic is None:
                ic = (getattr(obj, "_fn_kwargs", None) or {}).get("ignore_class")
            if ic is not None:
                return int(ic)
    return None
