"""``nanscope run`` for TensorFlow / Keras scripts: attach the guard to an unchanged script.

Design constraints:
    * One ``KerasRunner`` per run session. ``attach(session, "tensorflow")`` can run while
      ``keras`` is still half-imported (TensorFlow imports it lazily): it only creates the
      runner. The patches go in with ``attach(session, "keras")``, once Keras is importable.
      Every patched attribute is recorded and put back by ``detach`` (registered in
      ``session.cleanups``), so an in-process ``nanscope run`` leaves no trace.
    * Only the TensorFlow backend is watched here. Keras 3 on the torch backend runs its ops
      through PyTorch, which ``nanscope.torch.runner`` already watches (it attached when Keras
      imported torch): this runner steps aside without importing TensorFlow. Other backends
      (jax) get one line saying the script runs unwatched.
    * ``keras.Model.fit`` gets a ``Guard(policy="raise")`` unless the script passes its own.
    * Inference and evaluation (``predict``, ``predict_on_batch``, ``evaluate``,
      ``test_on_batch``, an eager ``model(x, training=False)``) are checked after the call,
      on what it returned (one pass over the outputs or the loss): only a non-finite result
      re-reads the offending batch and explains it (``nanscope.keras.evaluate``).
    * Custom ``tf.GradientTape`` loops, eager: the ops between ``GradientTape.__enter__`` and
      ``tape.gradient`` are recorded (no numeric work per op); ``tape.gradient`` checks the
      loss it differentiates (one scalar) and ``optimizer.apply`` the gradients (one
      reduction); on a non-finite one the recording is replayed through the tracer
      (``nanscope.keras.trace.Recorder``).
    * Custom loops whose step is a ``tf.function``: in-graph, ``apply`` updates only under
      ``tf.cond(finite)`` and raises a flag variable; after each eager call of a
      ``tf.function`` the flag is read (one scalar), and a flagged step's Python function is
      re-run eagerly (``run_functions_eagerly``) and recorded, to be explained as above. The
      re-run never applies an update.
    * A failure ends the script with ``raise session.fail(diagnosis)``. nanscope's own errors
      never stop the script: the runner takes its patches off, warns once (naming nanscope,
      not the script, as the culprit) and the script runs on unwatched.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import sys
import traceback
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

from nanscope.core.guarding import internal_error_text  # one text everywhere (re-exported)

__all__ = ["KerasRunner", "attach", "detach", "internal_error_text"]

_NANSCOPE_DIR = os.path.normcase(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_RUNNERS: dict[int, KerasRunner] = {}


def attach(session: Any, module_name: str) -> None:
    """Instrument TensorFlow/Keras for one ``nanscope run`` session."""
    runner = _RUNNERS.get(id(session))
    if runner is None:
        runner = _RUNNERS[id(session)] = KerasRunner(session)
        session.cleanups.append(lambda: detach(session))
    if module_name == "keras":
        runner.attach_keras()


def detach(session: Any) -> None:
    """Take off everything ``attach`` put on for ``session``."""
    runner = _RUNNERS.pop(id(session), None)
    if runner is not None:
        runner.remove()


# -- nanscope's own errors ------------------------------------------------------------------------


def report_internal_error(session: Any, where: str, err: BaseException) -> None:
    """Warn once per message: through the session when there is one (``nanscope run``)."""
    if session is not None and hasattr(session, "internal_error"):
        session.internal_error(where, err)
    else:
        warnings.warn(internal_error_text(where, err), RuntimeWarning, stacklevel=3)


def _raised_by_nanscope(err: BaseException) -> bool:
    """True when the innermost frame of code that is not a framework's is nanscope's own."""
    from nanscope.core.source import is_user_file

    last = None
    for fs in traceback.extract_tb(err.__traceback__):
        path = os.path.normcase(os.path.abspath(fs.filename))
        if path.startswith(_NANSCOPE_DIR):
            if not path.endswith(os.path.join("keras", "runner.py")) or fs.name not in ("fit",):
                last = "nanscope"
        elif is_user_file(fs.filename):
            last = "user"
    return last == "nanscope"


# -- the runner -------------------------------------------------------------------------------


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


class _ReplayStayedFinite(Exception):
    """The eager re-run of a compiled step reached the optimizer with finite gradients."""


class KerasRunner:
    """The instrumentation of one watched script (TensorFlow backend)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.attached = False
        self.disabled = False
        self.patches: list[tuple[object, str, bool, Any]] = []  # (owner, name, had its own, old)
        self.api_depth = 0  # inside fit / evaluate / predict: their own model calls are theirs
        self.last: _LastStep | None = None
        self.compiled: dict[str, Any] = {"flag": None, "replaying": False}
        self.validation: tuple[Any, Any] | None = None  # fit's (validation_data, batch size)

    @property
    def off(self) -> bool:
        return self.disabled or self.session.diagnosis is not None

    # -- install / remove --------------------------------------------------------------------
    def attach_keras(self) -> None:
        if self.attached:
            return
        self.attached = True
        try:
            import keras

            backend = keras.backend.backend()
        except Exception as err:
            self.internal_error("nanscope's Keras backend check", err)
            return
        if backend == "torch":
            return  # its ops are PyTorch's: nanscope.torch.runner watches them
        if backend != "tensorflow":
            print(
                f"nanscope: Keras on the {backend} backend is not supported yet; this script runs unwatched "
                "(set KERAS_BACKEND=tensorflow or KERAS_BACKEND=torch to have it watched)",
                file=sys.stderr,
            )
            return
        try:
            self._patch_fit()
            self._patch_inference()
            self._patch_custom_loops()
        except Exception as err:
            self.internal_error("installing nanscope's Keras watchers", err)

    def patch(self, owner: object, name: str, new: Any) -> None:
        self.patches.append((owner, name, name in vars(owner), vars(owner).get(name)))
        setattr(owner, name, new)

    def remove(self) -> None:
        """Put back every patched attribute, newest first; stop recording."""
        while self.patches:
            owner, name, had, old = self.patches.pop()
            if had:
                setattr(owner, name, old)
            else:
                with contextlib.suppress(AttributeError):
                    delattr(owner, name)
        if self.last is not None:
            with contextlib.suppress(Exception):
                self.last.recorder.stop()
            self.last = None

    def internal_error(self, where: str, err: BaseException) -> None:
        """A bug of ours: take every patch off and let the script run on unwatched."""
        self.disabled = True
        with contextlib.suppress(Exception):
            self.remove()
        report_internal_error(self.session, where, err)

    @contextlib.contextmanager
    def _inside_api(self):
        self.api_depth += 1
        try:
            yield
        finally:
            self.api_depth -= 1

    # -- model.fit ------------------------------------------------------------------------------
    def _patch_fit(self) -> None:
        import keras

        from nanscope.core.errors import NonFiniteError
        from nanscope.keras.guard import Guard

        runner, session = self, self.session
        original = keras.Model.fit
        signature = inspect.signature(original)

        @functools.wraps(original)
        def fit(model, *args, **kwargs):
            if runner.off:
                return original(model, *args, **kwargs)
            guard = None
            try:
                bound = signature.bind(model, *args, **kwargs)
                callbacks = list(bound.arguments.get("callbacks") or [])
                if not any(isinstance(cb, Guard) for cb in callbacks):
                    guard = Guard(policy="raise", _session=session)
                    callbacks.append(guard)
                bound.arguments["callbacks"] = callbacks
                guarded_args, guarded_kwargs = bound.args[1:], bound.kwargs
                runner.validation = (
                    bound.arguments.get("validation_data"),
                    bound.arguments.get("validation_batch_size")
                    or bound.arguments.get("batch_size"),
                )
                reiterable = not hasattr(bound.arguments.get("x"), "__next__")
            except Exception as err:
                runner.internal_error("nanscope's Keras fit watcher", err)
                return original(model, *args, **kwargs)
            with runner._inside_api():
                try:
                    return original(model, *guarded_args, **guarded_kwargs)
                except NonFiniteError:
                    raise
                except Exception as err:
                    # Our own bug before the first step ran (a trace-time error in the guard's
                    # patches): run the same fit again, unwatched. Anything else is the script's.
                    if (
                        guard is None
                        or _steps_done(guard) > 0
                        or not reiterable
                        or not _raised_by_nanscope(err)
                    ):
                        raise
                    guard._uninstall()
                    runner.internal_error("nanscope's Keras fit watcher", err)
                    return original(model, *args, **kwargs)
                finally:
                    runner.validation = None
                    if (
                        guard is not None
                    ):  # fit may end in an error (a failed validation) without on_train_end
                        guard._uninstall()

        self.patch(keras.Model, "fit", fit)

    # -- predict / evaluate -------------------------------------------------------------------
    def _patch_inference(self) -> None:
        import keras

        runner = self

        def watch(name: str, check: Any) -> None:
            original = getattr(keras.Model, name)
            signature = inspect.signature(original)

            @functools.wraps(original)
            def wrapper(model, *args, **kwargs):
                if runner.off or runner.api_depth > 1:
                    return original(model, *args, **kwargs)
                with runner._inside_api():
                    result = original(model, *args, **kwargs)
                if runner.api_depth == 0 or name == "evaluate":
                    runner._after_inference(model, name, check, signature, args, kwargs, result)
                return result

            self.patch(keras.Model, name, wrapper)

        watch("predict", "outputs")
        watch("predict_on_batch", "outputs")
        watch("evaluate", "loss")
        watch("test_on_batch", "loss")

    def _after_inference(
        self,
        model: Any,
        name: str,
        check: str,
        signature: Any,
        args: tuple,
        kwargs: dict,
        result: Any,
    ) -> None:
        """Raise the diagnosis when ``result`` (outputs, or the loss) is non-finite."""
        try:
            from nanscope.keras import evaluate

            if check == "outputs":
                bad = not evaluate.finite_values(result)
            else:
                bad = not evaluate.finite_values(evaluate.loss_of(result))
            if not bad:
                return
            bound = signature.bind(model, *args, **kwargs).arguments
            data = evaluate.CallData.of(name, bound, validation=self.validation)
            with self._inside_api():  # the re-run's own model calls are not the script's
                d = evaluate.explain_call(
                    model, data, outputs=result if check == "outputs" else None
                )
        except Exception as err:
            self.internal_error(f"nanscope's Keras {name} watcher", err)
            return
        if d is not None:
            raise self.session.fail(d)

    def _after_model_call(self, model: Any, x: Any, training: Any, out: Any) -> None:
        try:
            from nanscope.keras import evaluate

            if evaluate.finite_values(out):
                return
            call = f"model(x, training={training})"
            with self._inside_api():
                d = evaluate.explain_call(
                    model, evaluate.CallData(call=call, x=x, single=True), outputs=out
                )
        except Exception as err:
            self.internal_error("nanscope's Keras model-call watcher", err)
            return
        if d is not None:
            raise self.session.fail(d)

    # -- custom loops -----------------------------------------------------------------------------
    def _patch_custom_loops(self) -> None:
        import keras
        import tensorflow as tf

        from nanscope.core.enums import Phase
        from nanscope.keras.guard import _gradient_norm
        from nanscope.keras.trace import Recorder

        runner, session = self, self.session
        last = self.last = _LastStep(Recorder())
        recorder = last.recorder
        model_call = keras.Model.__call__

        @functools.wraps(model_call)
        def call(model, *args, **kwargs):
            if runner.off:
                return model_call(model, *args, **kwargs)
            outer = last.depth == 0
            last.depth += 1
            try:
                out = model_call(model, *args, **kwargs)
            finally:
                last.depth -= 1
            if not outer or not tf.executing_eagerly():
                return out
            training = kwargs.get("training")
            x = args[0] if args else kwargs.get("inputs")
            if training is True or recorder.active:
                try:
                    last.model, last.x = weakref.ref(model), x
                except Exception as err:
                    runner.internal_error("nanscope's Keras custom-loop watcher", err)
            elif runner.api_depth == 0 and not _in_guarded_fit() and not _symbolic(out):
                runner._after_model_call(model, x, training, out)
            return out

        self.patch(keras.Model, "__call__", call)

        tape_enter, tape_gradient = tf.GradientTape.__enter__, tf.GradientTape.gradient

        @functools.wraps(tape_enter)
        def enter(tape):
            if not runner.off and tf.executing_eagerly() and not _in_guarded_fit():
                try:
                    recorder.start()
                except Exception as err:
                    runner.internal_error("nanscope's Keras custom-loop recorder", err)
            return tape_enter(tape)

        @functools.wraps(tape_gradient)
        def gradient(tape, target, *args, **kwargs):
            if not recorder.active or runner.off:
                return tape_gradient(tape, target, *args, **kwargs)
            recorder.phase = Phase.BACKWARD
            try:
                grads = tape_gradient(tape, target, *args, **kwargs)
            finally:
                recorder.stop()
                last.target = target
            runner._check_loss(target, grads, args[0] if args else kwargs.get("sources"))
            return grads

        self.patch(tf.GradientTape, "__enter__", enter)
        self.patch(tf.GradientTape, "gradient", gradient)

        from keras.src.optimizers.base_optimizer import BaseOptimizer

        apply = BaseOptimizer.apply
        compiled = self.compiled

        @functools.wraps(apply)
        def checked_apply(opt, grads, trainable_variables=None):
            if (
                runner.off
                or isinstance(opt, keras.optimizers.LossScaleOptimizer)
                or _in_guarded_fit()
            ):
                return apply(opt, grads, trainable_variables)
            if not tf.executing_eagerly():  # traced inside the script's own tf.function
                return _graph_apply(opt, grads, trainable_variables)
            recorder.stop()
            try:
                last.step = int(
                    opt.iterations.numpy()
                )  # optimizer steps so far, compiled ones included
            except Exception:
                pass
            try:
                grads = list(grads)
                ok, norm_t = _gradient_norm(grads)
                norm = float(norm_t) if bool(ok) else math.nan
            except Exception as err:
                runner.internal_error("nanscope's Keras gradient check", err)
                return apply(opt, grads, trainable_variables)
            if not math.isfinite(norm):
                d = _diagnose_custom_step(last, grads, trainable_variables, runner)
                if d is not None:
                    raise session.fail(d)
            elif compiled["replaying"]:
                raise _ReplayStayedFinite
            else:
                last.norms = [*last.norms[-63:], norm]
            recorder.records = []
            last.target = None
            result = apply(opt, grads, trainable_variables)
            last.step += 1  # the step a loss checked at the next tape.gradient belongs to
            return result

        def _graph_apply(opt, grads, trainable_variables):
            """In-graph: apply only finite gradients, and flag the step for the host."""
            try:
                grads = list(grads)
                if compiled["flag"] is None:
                    with tf.init_scope():
                        compiled["flag"] = tf.Variable(
                            False, trainable=False, name="nanscope_nonfinite_step"
                        )
                if not opt.built:
                    with tf.init_scope():
                        opt.build(
                            list(trainable_variables) if trainable_variables is not None else []
                        )
                        opt.built = True
                flag = compiled["flag"]
                ok = _gradient_norm(grads)[0]
            except Exception as err:
                runner.internal_error("nanscope's Keras compiled-step guard", err)
                return apply(opt, grads, trainable_variables)
            flag.assign(tf.logical_or(flag, tf.logical_not(ok)))

            def update():
                apply(opt, grads, trainable_variables)
                return tf.constant(True)

            tf.cond(ok, update, lambda: tf.constant(False))

        self.patch(BaseOptimizer, "apply", checked_apply)

        # After a compiled step flagged non-finite gradients (its update was not applied), re-run
        # the step's Python function eagerly, recorded, to explain it.
        from tensorflow.python.eager.polymorphic_function import polymorphic_function

        function_call = polymorphic_function.Function.__call__

        @functools.wraps(function_call)
        def call_function(function, *args, **kwargs):
            out = function_call(function, *args, **kwargs)
            flag = compiled["flag"]
            if (
                flag is None
                or runner.off
                or compiled["replaying"]
                or not tf.executing_eagerly()
                or _in_guarded_fit()
            ):
                return out
            try:
                failed = bool(flag.numpy())
            except Exception as err:
                runner.internal_error("nanscope's Keras compiled-step check", err)
                return out
            if failed:
                flag.assign(False)
                _replay(function, args, kwargs)
            return out

        def _replay(function, args, kwargs):
            from nanscope.core import rules

            compiled["replaying"] = True
            eager_before = tf.config.functions_run_eagerly()
            tf.config.run_functions_eagerly(True)
            name = getattr(function, "__name__", "tf.function")
            try:
                function.python_function(*args, **kwargs)
                d = rules.not_localized(
                    "gradient",
                    "the eager re-run of the step did not reach the optimizer",
                    framework="keras",
                    step=last.step,
                    evidence=[
                        f"the compiled step {name} made the gradients non-finite",
                        "its update was not applied",
                    ],
                )
            except _ReplayStayedFinite:
                d = rules.not_reproduced(
                    "gradient",
                    framework="keras",
                    step=last.step,
                    compiled=name,
                    phase=Phase.BACKWARD,
                    evidence=["its update was not applied"],
                )
            finally:
                tf.config.run_functions_eagerly(eager_before)
                compiled["replaying"] = False
                recorder.stop()
            raise session.fail(d)

        self.patch(polymorphic_function.Function, "__call__", call_function)

    def _check_loss(self, target: Any, grads: Any, sources: Any) -> None:
        """A loss that ``tape.gradient`` differentiates must be finite, optimizer step or not."""
        from nanscope.keras.trace import all_finite

        last = self.last
        try:
            if last is None or all_finite(target):
                return
            flat = list(grads) if isinstance(grads, list | tuple) else [grads]
            variables = list(sources) if isinstance(sources, list | tuple) else None
            d = _diagnose_custom_step(last, flat, variables, self)
        except Exception as err:
            self.internal_error("nanscope's Keras loss check", err)
            return
        if d is not None:
            raise self.session.fail(d)


def _steps_done(guard: Any) -> int:
    """Steps the guard saw end (its ledger's count; ``_step`` before the ledger)."""
    ledger = getattr(guard, "ledger", None)
    return int(getattr(ledger, "steps", None) or getattr(guard, "_step", 0) or 0)


def _symbolic(out: Any) -> bool:
    """A functional model being built (``res(keras.Input(...))``): no values to check."""
    import keras

    return any(isinstance(t, keras.KerasTensor) for t in keras.tree.flatten(out))


def _in_guarded_fit() -> bool:
    """True inside ``fit`` (whose Guard checks in-graph, and explains failures itself)."""
    from nanscope.keras import guard

    return guard.ACTIVE > 0


def _diagnose_custom_step(last: _LastStep, grads: list, variables: Any, runner: KerasRunner):
    from nanscope.core import rules
    from nanscope.core.enums import Category
    from nanscope.core.summary import bad_rows, summarize
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
        if (target := _external_loss_input(last)) is not None:
            a = to_numpy(target)
            return rules.nonfinite_input(
                "y",
                summarize(a, target.dtype.name),
                bad_rows(a),
                framework="keras",
                step=step,
                category=Category.INVALID_TARGET,
            )
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
        names = [
            getattr(v, "path", getattr(v, "name", "?"))
            for g, v in zip(grads, variables or [], strict=False)
            if g is not None and not all_finite(g)
        ]
        if last.target is not None and not all_finite(last.target):
            what, ev = (
                "loss",
                [f"loss: {summarize(to_numpy(last.target), last.target.dtype.name).describe()}"],
            )
        else:
            what, ev = (
                "gradient",
                [f"non-finite gradients of {len(names)} variables: {', '.join(names[:5])}"],
            )
            if bad:
                ev.append(f"first: {summarize(to_numpy(bad[0]), bad[0].dtype.name).describe()}")
        return rules.unexplained(
            what,
            framework="keras",
            step=step,
            why="in a custom training loop, no recorded op "
            "made it non-finite (ops outside the GradientTape are not recorded)",
            evidence=ev,
        )
    except Exception as err:
        runner.internal_error("nanscope's Keras custom-step diagnosis", err)
        return None


def _external_loss_input(last: _LastStep) -> Any:
    """A non-finite tensor the loss read that no recorded op made and that is not the model's
    input: the targets (``loss_fn(y, model(x))``)."""
    import tensorflow as tf

    from nanscope.core.enums import Phase
    from nanscope.keras.trace import all_finite, is_float

    inputs = {id(t) for t in tf.nest.flatten(last.x)} if last.x is not None else set()
    produced: set[int] = set()
    for _op, ins, _attrs, outs, _layer, _path, _location, phase in last.recorder.records:
        if phase is Phase.LOSS:
            for t in ins:
                if (
                    id(t) not in produced
                    and id(t) not in inputs
                    and is_float(t)
                    and not all_finite(t)
                ):
                    return t
        produced.update(id(t) for t in outs)
    return None
