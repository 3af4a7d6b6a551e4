"""``nanscope run`` for TensorFlow / Keras scripts: attach the guard to an unchanged script.

Design constraints:
    * ``attach(session, "tensorflow")`` can run while ``keras`` is still half-imported
      (TensorFlow imports it lazily): it only records the session. The patches go in with
      ``attach(session, "keras")``, once Keras is importable.
    * ``keras.Model.fit`` gets a ``Guard(policy="raise")`` unless the script passes its own.
    * Custom ``tf.GradientTape`` loops: the optimizer's ``apply`` checks the gradients with one
      reduction when it runs eagerly; on a non-finite gradient it re-runs the last training-mode
      forward pass (and the last Keras loss called on its output) under the tracer. Inside a
      ``tf.function`` the check is left out (documented in docs/keras.md).
    * A failure ends the script with ``raise session.fail(diagnosis)``; nanscope's own errors go
      to ``session.internal_error`` and never stop the script.
"""

from __future__ import annotations

import functools
import inspect
import math
import weakref
from typing import Any

_state: dict[str, Any] = {"session": None, "patched": False}


def attach(session: Any, module_name: str) -> None:
    """Instrument TensorFlow/Keras for one ``nanscope run`` session."""
    _state["session"] = session
    if module_name != "keras" or _state["patched"]:
        return
    _state["patched"] = True
    _patch_fit(session)
    _patch_custom_loops(session)


# -- model.fit ------------------------------------------------------------------------------

def _patch_fit(session: Any) -> None:
    import keras

    from nanscope.keras.guard import Guard

    original = keras.Model.fit
    signature = inspect.signature(original)

    @functools.wraps(original)
    def fit(self, *args, **kwargs):
        try:
            bound = signature.bind(self, *args, **kwargs)
            callbacks = list(bound.arguments.get("callbacks") or [])
            if not any(isinstance(cb, Guard) for cb in callbacks):
                callbacks.append(Guard(policy="raise", _session=session))
            bound.arguments["callbacks"] = callbacks
            args, kwargs = bound.args[1:], bound.kwargs
        except Exception as err:
            session.internal_error("adding the guard to fit", err)
        return original(self, *args, **kwargs)

    keras.Model.fit = fit


# -- custom loops -----------------------------------------------------------------------------

class _LastStep:
    """The last training-mode call of a top-level model and the last Keras loss on its output."""

    model: Any = None
    x: Any = None
    y_pred_id: int | None = None
    loss: Any = None
    y_true: Any = None
    depth: int = 0
    norms: list[float] = []
    step: int = 0


def _patch_custom_loops(session: Any) -> None:
    import keras
    import tensorflow as tf

    last = _LastStep()
    last.norms = []
    model_call = keras.Model.__call__

    @functools.wraps(model_call)
    def call(self, *args, **kwargs):
        if last.depth or not tf.executing_eagerly() or kwargs.get("training") is not True:
            last.depth += 1
            try:
                return model_call(self, *args, **kwargs)
            finally:
                last.depth -= 1
        last.depth += 1
        try:
            out = model_call(self, *args, **kwargs)
        finally:
            last.depth -= 1
        try:
            last.model, last.x, last.y_pred_id = weakref.ref(self), args[0] if args else kwargs.get("inputs"), id(out)
            last.loss = last.y_true = None
        except Exception as err:
            session.internal_error("watching the model call", err)
        return out

    keras.Model.__call__ = call

    loss_call = keras.losses.Loss.__call__

    @functools.wraps(loss_call)
    def loss_wrapper(self, y_true, y_pred, *args, **kwargs):
        if tf.executing_eagerly() and id(y_pred) == last.y_pred_id:
            last.loss, last.y_true = self, y_true
        return loss_call(self, y_true, y_pred, *args, **kwargs)

    keras.losses.Loss.__call__ = loss_wrapper

    from keras.src.optimizers.base_optimizer import BaseOptimizer

    apply = BaseOptimizer.apply

    @functools.wraps(apply)
    def checked_apply(self, grads, trainable_variables=None):
        if tf.executing_eagerly() and not isinstance(self, keras.optimizers.LossScaleOptimizer):
            try:
                grads = list(grads)
                norm = _norm(grads)
            except Exception as err:
                session.internal_error("checking the gradients", err)
                norm = 0.0
            if not math.isfinite(norm):
                d = _diagnose_custom_step(last, grads, trainable_variables, session)
                if d is not None:
                    raise session.fail(d)
            else:
                last.norms = [*last.norms[-63:], norm]
            last.step += 1
        return apply(self, grads, trainable_variables)

    BaseOptimizer.apply = checked_apply


def _norm(grads: list) -> float:
    import tensorflow as tf

    parts = [tf.reduce_sum(tf.square(tf.cast(g.values if isinstance(g, tf.IndexedSlices) else g, tf.float32)))
             for g in grads if g is not None]
    return math.sqrt(float(tf.add_n(parts))) if parts else 0.0


def _diagnose_custom_step(last: _LastStep, grads: list, variables: Any, session: Any):
    import tensorflow as tf

    from nanscope.core import rules
    from nanscope.core.diagnosis import Diagnosis
    from nanscope.core.enums import Category, Phase
    from nanscope.core.summary import summarize
    from nanscope.core.trend import is_exploding
    from nanscope.keras.diagnose_step import check_batch, check_weights, diagnose, trace_step
    from nanscope.keras.trace import all_finite, to_numpy

    try:
        model = last.model() if last.model is not None else None
        step = last.step
        if model is not None and last.x is not None:
            if last.loss is not None:
                d = diagnose(model, (last.x, last.y_true), last.loss, step=step, grad_norms=last.norms)
                if d is not None:
                    return d
            if (d := check_batch(last.x, step=step)) is not None:
                return d
            if (d := check_weights(model, step=step)) is not None:
                return d
            d = trace_step(model, last.x, None, None, lambda x, y, y_pred, sw: tf.zeros(()), step=step)
            if d is not None and d.phase is Phase.FORWARD:
                return d
        names = [getattr(v, "path", getattr(v, "name", "?")) for g, v in zip(grads, variables or [], strict=False)
                 if g is not None and not all_finite(g)]
        if is_exploding([*last.norms, math.inf]):
            return rules.exploding_gradients(last.norms, framework="keras", step=step)
        first = next((g for g in grads if g is not None and not all_finite(g)), None)
        ev = [f"non-finite gradients of {len(names)} variables: {', '.join(names[:5])}"]
        if first is not None:
            ev.append(f"first: {summarize(to_numpy(first), first.dtype.name).describe()}")
        ev.append("the forward pass was finite; the loss was not a Keras loss object, so it could not be re-run")
        return Diagnosis(Category.UNKNOWN, "the gradients became non-finite in a custom training loop",
                         phase=Phase.BACKWARD, step=step, framework="keras", evidence=ev,
                         fixes=["call `nanscope.keras.diagnose(model, (x, y), loss_fn)` on the failing batch for a per-op trace"])
    except Exception as err:
        session.internal_error("diagnosing the custom training step", err)
        return None
