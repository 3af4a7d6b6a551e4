"""``nanscope run`` for TensorFlow / Keras scripts: attach the guard to an unchanged script.

Design constraints:
    * ``attach(session, "tensorflow")`` can run while ``keras`` is still half-imported
      (TensorFlow imports it lazily): it only records the session. The patches go in with
      ``attach(session, "keras")``, once Keras is importable.
    * ``keras.Model.fit`` gets a ``Guard(policy="raise")`` unless the script passes its own.
    * Custom ``tf.GradientTape`` loops, eager: the ops between ``GradientTape.__enter__`` and
      ``tape.gradient`` are recorded (no numeric work per op); ``optimizer.apply`` checks the
      gradients with one reduction, and on a non-finite gradient the recording is replayed
      through the tracer (``nanscope.keras.trace.Recorder``).
    * Custom loops whose step is a ``tf.function``: in-graph, ``apply`` updates only under
      ``tf.cond(finite)`` and raises a flag variable; after each eager call of a
      ``tf.function`` the flag is read (one scalar), and a flagged step's Python function is
      re-run eagerly (``run_functions_eagerly``) and recorded, to be explained as above. The
      re-run never applies an update.
    * A failure ends the script with ``raise session.fail(diagnosis)``; nanscope's own errors go
      to ``session.internal_error`` and never stop the script.
"""

from __future__ import annotations

import functools
import inspect
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

_state: dict[str, Any] = {"session": None, "patched": False}
_TRACE_IT = "call `nanscope.keras.diagnose(model, (x, y), loss_fn)` on the failing batch for a per-op trace"


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

@dataclass
class _LastStep:
    """The last training-mode call of a top-level model, and the recorded ops of the step."""

    recorder: Any  # nanscope.keras.trace.Recorder
    model: Any = None
    x: Any = None
    depth: int = 0
    norms: list[float] = field(default_factory=list)
    step: int = 0
    target: Any = None  # what tape.gradient differentiated (the loss)


def _patch_custom_loops(session: Any) -> None:
    import keras
    import tensorflow as tf

    from nanscope.core.enums import Phase
    from nanscope.keras.guard import _squared_norm
    from nanscope.keras.trace import Recorder

    last = _LastStep(Recorder())
    recorder = last.recorder
    model_call = keras.Model.__call__

    @functools.wraps(model_call)
    def call(self, *args, **kwargs):
        outer = last.depth == 0
        last.depth += 1
        try:
            out = model_call(self, *args, **kwargs)
        finally:
            last.depth -= 1
        if outer and (kwargs.get("training") is True or recorder.active) and tf.executing_eagerly():
            try:
                last.model, last.x = weakref.ref(self), args[0] if args else kwargs.get("inputs")
            except Exception as err:
                session.internal_error("watching the model call", err)
        return out

    keras.Model.__call__ = call

    tape_enter, tape_gradient = tf.GradientTape.__enter__, tf.GradientTape.gradient

    @functools.wraps(tape_enter)
    def enter(self):
        if tf.executing_eagerly() and not _in_guarded_fit():
            try:
                recorder.start()
            except Exception as err:
                session.internal_error("recording the step", err)
        return tape_enter(self)

    @functools.wraps(tape_gradient)
    def gradient(self, target, *args, **kwargs):
        if not recorder.active:
            return tape_gradient(self, target, *args, **kwargs)
        recorder.phase = Phase.BACKWARD
        try:
            return tape_gradient(self, target, *args, **kwargs)
        finally:
            recorder.stop()
            last.target = target

    tf.GradientTape.__enter__, tf.GradientTape.gradient = enter, gradient

    from keras.src.optimizers.base_optimizer import BaseOptimizer

    apply = BaseOptimizer.apply

    compiled: dict[str, Any] = {"flag": None, "replaying": False}

    @functools.wraps(apply)
    def checked_apply(self, grads, trainable_variables=None):
        if isinstance(self, keras.optimizers.LossScaleOptimizer) or _in_guarded_fit():
            return apply(self, grads, trainable_variables)
        if not tf.executing_eagerly():  # traced inside the script's own tf.function
            return _graph_apply(self, grads, trainable_variables)
        recorder.stop()
        try:
            last.step = int(self.iterations.numpy())  # optimizer steps so far, compiled ones included
        except Exception:
            pass
        try:
            grads = list(grads)
            norm = math.sqrt(float(_squared_norm(grads)))
        except Exception as err:
            session.internal_error("checking the gradients", err)
            norm = 0.0
        if not math.isfinite(norm):
            d = _diagnose_custom_step(last, grads, trainable_variables, session)
            if d is not None:
                raise session.fail(d)
        elif compiled["replaying"]:
            raise _ReplayStayedFinite
        else:
            last.norms = [*last.norms[-63:], norm]
        recorder.records = []
        return apply(self, grads, trainable_variables)

    def _graph_apply(self, grads, trainable_variables):
        """In-graph: apply only finite gradients, and flag the step for the host."""
        try:
            grads = list(grads)
            if compiled["flag"] is None:
                with tf.init_scope():
                    compiled["flag"] = tf.Variable(False, trainable=False, name="nanscope_nonfinite_step")
            if not self.built:
                with tf.init_scope():
                    self.build(list(trainable_variables) if trainable_variables is not None else [])
                    self.built = True
            flag = compiled["flag"]
            ok = tf.math.is_finite(_squared_norm(grads))
        except Exception as err:
            session.internal_error("guarding the compiled step", err)
            return apply(self, grads, trainable_variables)
        flag.assign(tf.logical_or(flag, tf.logical_not(ok)))

        def update():
            apply(self, grads, trainable_variables)
            return tf.constant(True)

        tf.cond(ok, update, lambda: tf.constant(False))

    BaseOptimizer.apply = checked_apply

    # After a compiled step flagged non-finite gradients (its update was not applied), re-run
    # the step's Python function eagerly, recorded, to explain it.
    from tensorflow.python.eager.polymorphic_function import polymorphic_function

    function_call = polymorphic_function.Function.__call__

    @functools.wraps(function_call)
    def call_function(self, *args, **kwargs):
        out = function_call(self, *args, **kwargs)
        flag = compiled["flag"]
        if flag is None or compiled["replaying"] or not tf.executing_eagerly() or _in_guarded_fit():
            return out
        try:
            failed = bool(flag.numpy())
        except Exception as err:
            session.internal_error("reading the compiled step's flag", err)
            return out
        if failed:
            flag.assign(False)
            _replay(self, args, kwargs)
        return out

    def _replay(function, args, kwargs):
        from nanscope.core.diagnosis import Diagnosis
        from nanscope.core.enums import Category, Phase

        compiled["replaying"] = True
        eager_before = tf.config.functions_run_eagerly()
        tf.config.run_functions_eagerly(True)
        try:
            function.python_function(*args, **kwargs)
            evidence = "the eager re-run of the step did not reach the optimizer"
        except _ReplayStayedFinite:
            evidence = "the eager re-run of the step stayed finite: the compiled (graph/XLA) step differs numerically"
        finally:
            tf.config.run_functions_eagerly(eager_before)
            compiled["replaying"] = False
            recorder.stop()
        raise session.fail(Diagnosis(
            Category.UNKNOWN, f"a compiled step ({getattr(function, '__name__', 'tf.function')}) made the gradients non-finite",
            phase=Phase.BACKWARD, step=last.step, framework="keras", evidence=[evidence, "its update was not applied"],
            fixes=[_TRACE_IT]))

    polymorphic_function.Function.__call__ = call_function


class _ReplayStayedFinite(Exception):
    """The eager re-run of a compiled step reached the optimizer with finite gradients."""


def _in_guarded_fit() -> bool:
    """True inside ``fit`` (whose Guard checks in-graph, and explains failures itself)."""
    from nanscope.keras import guard

    return guard.ACTIVE > 0


def _diagnose_custom_step(last: _LastStep, grads: list, variables: Any, session: Any):
    from nanscope.core import rules
    from nanscope.core.diagnosis import Diagnosis
    from nanscope.core.enums import Category, Phase
    from nanscope.core.summary import summarize
    from nanscope.core.trend import is_exploding
    from nanscope.keras._util import batch_size_of
    from nanscope.keras.diagnose_step import check_batch, check_weights
    from nanscope.keras.trace import all_finite, diagnosis_from_trace, to_numpy

    try:
        model = last.model() if last.model is not None else None
        step = last.step
        if last.x is not None and (d := check_batch(last.x, step=step)) is not None:
            return d
        if model is not None and (d := check_weights(model, step=step)) is not None:
            return d
        bad = [g for g in grads if g is not None and not all_finite(g)]
        if last.recorder.records:
            n = batch_size_of(last.x) if last.x is not None else None
            trace = last.recorder.replay(external=last.x)
            failed = last.target if last.target is not None and not all_finite(last.target) else bad
            d = diagnosis_from_trace(trace, failed, batch_size=n, step=step)
            if d is not None:
                return rules.with_history(d, last.norms)
        if is_exploding(last.norms):
            return rules.exploding_gradients(last.norms, framework="keras", step=step)
        names = [getattr(v, "path", getattr(v, "name", "?")) for g, v in zip(grads, variables or [], strict=False)
                 if g is not None and not all_finite(g)]
        ev = [f"non-finite gradients of {len(names)} variables: {', '.join(names[:5])}"]
        if bad:
            ev.append(f"first: {summarize(to_numpy(bad[0]), bad[0].dtype.name).describe()}")
        return Diagnosis(Category.UNKNOWN, "the gradients became non-finite in a custom training loop",
                         phase=Phase.BACKWARD, step=step, framework="keras", evidence=ev,
                         fixes=[_TRACE_IT])
    except Exception as err:
        session.internal_error("diagnosing the custom training step", err)
        return None
