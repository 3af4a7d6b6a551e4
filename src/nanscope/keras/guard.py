"""``nanscope.keras.Guard``: a ``model.fit`` callback that keeps a non-finite batch from
touching the model, keeps the batch, and diagnoses it.

Design constraints:
    * A callback alone cannot veto an update inside a compiled ``train_step``. On
      ``on_train_begin`` the guard therefore patches, on the instances only:
        - ``optimizer.scale_loss`` (every Keras ``train_step`` passes the loss through it) to
          see the loss tensor,
        - ``optimizer.apply`` so that, in-graph, the update runs under ``tf.cond`` only when
          the loss and the gradients are finite (the pattern Keras' own
          ``LossScaleOptimizer`` uses),
        - ``model.train_step`` to restore, in-graph, what the forward pass itself changed
          (BatchNorm moving statistics, metric accumulators) when the step was vetoed,
        - ``model.train_function`` (host side) to take the guard off if the step raises.
      Then it rebuilds the train function, so the step stays compiled exactly as the user set
      it (``jit_compile``, ``tf.function``). Everything is restored on ``on_train_end`` and
      before raising.
    * Same numbers as without the guard: Keras' own train function runs on Keras' own
      ``tf.data`` iterator, so the step is traced with the dataset's shapes (batch dimension
      ``None``). Pulling the batch on the host and handing the step a list instead (what the
      guard once did) traces it with the concrete batch shape; grappler's constant folding
      then turns a division by an element count (the gradient of BatchNorm's mean over
      16*6*6 values) into a multiplication by its rounded reciprocal: 1-ulp different
      weights. The batch of a failed step is therefore kept in-graph, written into
      shape-free variables only when that step failed (``_KeptBatch``). Under XLA (a
      resource may not change shape there) and under a multi-replica strategy, the guard
      still pulls the batch on the host. Known to differ still (issue 9): plain SGD where a
      gradient is itself a product (BatchNorm's gamma), which grappler's arithmetic
      optimizer reorders with the learning rate only while the gradient has one reader (the
      guard's check is a second); and ``jit_compile=True``, where the ``tf.cond`` around
      the update changes XLA's compiled arithmetic.
    * Healthy-step cost: one fused reduction (the squared gradient norm, finite iff every
      gradient is finite and the norm does not overflow float32), an in-graph copy of the
      non-trainable state (BatchNorm moving statistics, metric accumulators; policies that
      veto only) to restore on a veto, a ``tf.cond`` that keeps the batch (not taken), and
      one 5-float variable read on the host. No per-op work.
    * On failure only: the eager tracer re-runs that batch (``nanscope.keras.diagnose``).
    * Under a ``LossScaleOptimizer`` non-finite gradients are the loss scale's business (it
      skips the step and halves the scale): not a failure. A non-finite *loss* still is.
    * nanscope never breaks the training it watches: its own errors become a warning.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from nanscope.core import rules
from nanscope.core.diagnosis import Diagnosis
from nanscope.core.enums import Category, Phase, Policy
from nanscope.core.errors import NanscopeError, NonFiniteError, NonFiniteWarning  # noqa: F401 (re-exported)
from nanscope.core.guarding import STATE_PHASES, GuardState, Ledger
from nanscope.keras import distributed as _kdist
from nanscope.keras._util import state_variables

ACTIVE = 0  # guards installed right now (``nanscope run`` leaves fit's steps to them)


class _Stash:
    loss: Any = None


# status: [this step finite, its gradient norm, loss scale, loss-scale skip, failed steps of
# this call (summed in-graph, reset by the host after it read a failure)]
_HEALTHY = [1.0, 0.0, 0.0, 0.0, 0.0]


class _KeptBatch:
    """The batch of a call's last failed (or loss-scale-skipped) step, kept in-graph: written
    into shape-free variables under a ``tf.cond`` that only such a step takes, read on the host
    only after a failure.

    Why not keep it on the host (``next(iterator)``, then a list for the step)? Keras then
    calls its step with eager tensors, which traces it with the concrete batch shape instead
    of the dataset's (batch dimension ``None``), and grappler folds that shape into the
    arithmetic (a division by an element count becomes a multiplication by its rounded
    reciprocal): the guarded run's weights differ in the last bit. Dense batches only (a
    ragged or sparse one is pulled on the host); not under XLA, where a resource may not
    change shape.
    """

    def __init__(self) -> None:
        self.sets: list[tuple[Any, list[tf.Variable]]] = []  # (skeleton, slots) per trace kind
        self.which: tf.Variable | None = None  # the set last written, -1: none

    def write_if(self, failed: tf.Tensor, data: Any) -> None:
        leaves = tf.nest.flatten(data)
        if not all(t is None or isinstance(t, tf.Tensor) for t in leaves):
            return  # composite tensors: the host pulls such batches (``pulls`` in ``_install``)
        skeleton = tf.nest.map_structure(lambda t: None if t is None else t.dtype.name, data)
        tensors = [t for t in leaves if t is not None]
        index = next((i for i, (sk, _) in enumerate(self.sets) if sk == skeleton), None)
        if index is None:
            with tf.init_scope():
                if self.which is None:
                    self.which = tf.Variable(
                        -1, dtype=tf.int32, trainable=False, name="nanscope_kept_batch"
                    )
                slots = [
                    tf.Variable(
                        tf.zeros([0] * (t.shape.rank or 0), t.dtype),
                        shape=tf.TensorShape(None),
                        trainable=False,
                        name="nanscope_kept_batch",
                    )
                    for t in tensors
                ]
            self.sets.append((skeleton, slots))
            index = len(self.sets) - 1
        slots, which = self.sets[index][1], self.which

        def keep():
            for v, t in zip(slots, tensors, strict=True):
                v.assign(t)
            which.assign(index)
            return tf.constant(True)

        tf.cond(failed, keep, lambda: tf.constant(False))

    def read(self) -> Any:
        """The kept batch (eager tensors), or None when no step wrote one."""
        if self.which is None or int(self.which.numpy()) < 0:
            return None
        skeleton, slots = self.sets[int(self.which.numpy())]
        values = iter([v.read_value() for v in slots])
        return tf.nest.pack_sequence_as(
            skeleton, [None if leaf is None else next(values) for leaf in tf.nest.flatten(skeleton)]
        )


class Guard(GuardState, keras.callbacks.Callback):
    """Stop NaN/Inf at the step that makes it, keep the model clean, and say why.

    Args:
        policy: what to do with a non-finite step: ``"raise"`` (``NonFiniteError`` carrying
            the diagnosis), ``"skip"`` (drop the update, keep training), ``"stop"`` (drop the
            update and end training gracefully: ``model.stop_training``; a
            ``BackupAndRestore`` callback keeps its backup), ``"warn"`` (warn, and let the
            update through).
        loss: the loss to re-run for the diagnosis (default: the compiled one).
        ignore_index: the label meaning "no target" (e.g. 255), for ``invalid_target``.
        max_diagnoses: failures diagnosed in full; later ones are only counted.

    Attributes:
        diagnoses: every diagnosis made, in order.
        skipped: steps whose update was not applied.
        batch: the last batch that failed, as ``fit`` handed it to the step.

    Example:
        >>> import keras, numpy as np
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> model.compile("sgd", "mse")
        >>> x = np.array([[1.0, 2.0], [np.nan, 1.0]], "float32"); y = np.zeros((2, 1), "float32")
        >>> guard = Guard(policy="skip")
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     _ = model.fit(x, y, batch_size=2, verbose=0, callbacks=[guard])
        >>> guard.skipped, guard.diagnoses[0].category
        (1, <Category.NONFINITE_INPUT: 'nonfinite_input'>)
    """

    def __init__(
        self,
        policy: Policy | str = Policy.SKIP,
        *,
        loss: Callable | str | None = None,
        ignore_index: int | None = None,
        max_diagnoses: int = 10,
        max_skips_in_a_row: int = 10,
        on_failure: Callable[[Diagnosis], Any] | None = None,
        _session: Any = None,
    ) -> None:
        super().__init__()
        self.ledger = Ledger(policy, max_skips_in_a_row=max_skips_in_a_row, who="Keras Guard")
        self.loss = loss
        self.ignore_index = ignore_index
        self.max_diagnoses = max_diagnoses
        self.on_failure = on_failure
        self.batch: Any = None
        self._session = _session
        self._patches: list[tuple[object, str, bool, Any]] = []
        self._status: tf.Variable | None = None
        self._replica_flags: tf.Variable | None = None
        self._batches: list[Any] = []
        self._kept: _KeptBatch | None = None
        self._stash = _Stash()
        self._counted = False
        self._weights_finite_at_start = False

    # -- callback hooks ---------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._uninstall()
        try:
            if keras.backend.backend() != "tensorflow":
                # The guard patches the TensorFlow train step; other backends train unguarded.
                warnings.warn(
                    f"nanscope.keras.Guard supports the TensorFlow backend only; this fit on the "
                    f"{keras.backend.backend()} backend runs unguarded",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return
            from nanscope.keras.diagnose_step import check_weights

            # Once per fit: were the weights finite to begin with? Then weights found bad later
            # were written by an update made during this fit (phase "optimizer").
            self._weights_finite_at_start = check_weights(self.model) is None
            self._install()
        except Exception as err:
            self._uninstall()
            self._internal_error("installing the guard", err)

    def on_train_end(self, logs=None):
        self._uninstall()

    def on_train_batch_end(self, batch, logs=None):
        if self._status is None:
            return
        try:
            ok, norm, scale, scale_skipped, failed = (float(v) for v in self._status.numpy())
        except Exception as err:
            self._internal_error("reading the step status", err)
            return
        step = self.steps
        self.steps += 1
        if ok <= 0.5 or failed > 0.5:
            self._take_kept_batch()
            self._on_failure(step)
            return
        if scale_skipped <= 0.5:
            self.history.add(None, norm)
        if scale > 0:
            self._watch_loss_scale(step, scale, scale_skipped > 0.5)

    def _watch_loss_scale(self, step: int, scale: float, skipped: bool) -> None:
        """A LossScaleOptimizer skip is not a failure; a scale that keeps halving is (the
        gradients are non-finite whatever the scale): ``core.rules.loss_scale_collapse``."""
        history = self.ledger.loss_scale
        history.add(
            scale * 0.5 if skipped else scale, skipped_step=len(history.scales) if skipped else None
        )
        collapse = rules.loss_scale_collapse(
            history.scales, history.skipped, framework="keras", step=len(history.scales) - 1
        )
        if collapse is None:
            return
        history.clear()
        collapse.step = step
        self._take_kept_batch()
        self._on_failure(step, collapse=collapse)

    # -- failure ----------------------------------------------------------------------------
    def _take_kept_batch(self) -> None:
        """After a failed call: the batch the failed step kept in-graph (when the host did not
        pull the batches itself), and the status reset for the next call."""
        try:
            self._status.assign(_HEALTHY)
            if self._kept is not None and (batch := self._kept.read()) is not None:
                self._batches = [batch]
                self._kept.which.assign(-1)
        except Exception as err:
            self._internal_error("reading the kept batch", err)

    def _on_failure(self, step: int, collapse: Diagnosis | None = None) -> None:
        if len(self.diagnoses) >= self.max_diagnoses or (
            self.policy is Policy.WARN and self.diagnoses
        ):
            if self.policy is not Policy.WARN:  # vetoed in-graph already: counted, not re-diagnosed
                self.ledger.skipped += 1
            return
        d = self._diagnose(step)
        if collapse is not None:
            if d.category is Category.UNKNOWN:
                d = collapse
            else:  # the root cause, found by the unscaled eager re-run; the collapse is its symptom
                d.evidence += [f"symptom: {collapse.summary}", *collapse.evidence]
        self.ledger.record(d)
        policy = self.ledger.act(d, unrecoverable=d.phase in STATE_PHASES)
        if self.on_failure is not None:
            self.on_failure(d)  # the user's callable: its errors are the user's
        if policy is Policy.RAISE:
            self._uninstall()
            raise (self._session.fail(d) if self._session is not None else NonFiniteError(d))
        self.ledger.say(d, self.ledger.outcome_text(policy))
        if policy is Policy.STOP:
            self.model.stop_training = True
            _keep_backups()

    def _diagnose(self, step: int) -> Diagnosis:
        from nanscope.keras.diagnose_step import diagnose, diagnose_train_step

        lr = _learning_rate(self.model.optimizer)
        own_step = self.loss is None and type(self.model).train_step is not keras.Model.train_step
        try:
            for batch, replica in (
                (part, r) for b in self._batches for r, part in _kdist.local_batches(b, self.model)
            ):
                if own_step:  # the user's train_step, re-run as written (its own loss)
                    d = diagnose_train_step(
                        self.model,
                        batch,
                        step=step,
                        grad_norms=list(self.history.grad_norm),
                        learning_rate=lr,
                    )
                else:
                    d = diagnose(
                        self.model,
                        batch,
                        self.loss,
                        step=step,
                        ignore_index=self.ignore_index,
                        grad_norms=list(self.history.grad_norm),
                        learning_rate=lr,
                    )
                if d is not None:
                    self.batch = batch
                    return self._name_replica(self._blame_an_earlier_update(d, lr), replica)
            self.batch = self._batches[0] if self._batches else None
        except NanscopeError as err:
            return rules.not_localized("loss or gradient", str(err), framework="keras", step=step)
        except Exception as err:
            self._internal_error("diagnosing the failed step", err)
            return rules.not_localized("loss or gradient", err, framework="keras", step=step)
        d = _kdist.not_rerun_here(self._batches, self._replica_flags, self.model, step=step)
        if d is not None:  # tf.distribute: the failed part of the batch was not re-run here
            return d
        # The compiled step saw it, the eager re-run of the same batch from the same state did not.
        return self._name_replica(
            rules.not_reproduced(
                "loss or gradient",
                framework="keras",
                step=step,
                phase=Phase.BACKWARD,
                compiled="the XLA-compiled train step"
                if getattr(self.model, "jit_compile", False)
                else None,
                evidence=[
                    "the eager re-run of the kept batch (`guard.batch`) stayed finite op by op"
                ],
            ),
            None,
        )

    def _name_replica(self, d: Diagnosis, replica: int | None) -> Diagnosis:
        """tf.distribute: ``ranks`` = the replica whose own batch reproduced it, else the ones
        whose in-graph check saw it first (their flags)."""
        if self._replica_flags is None or self._replica_flags.shape[0] <= 1:
            return d
        seen = _kdist.seen_replicas([float(f) for f in self._replica_flags.numpy()])
        d.ranks = [replica] if replica is not None else seen
        how = (
            "its own part of the batch reproduces it"
            if replica is not None
            else "its in-graph check saw it"
        )
        d.evidence.append(
            f"replica{'s' if len(d.ranks) > 1 else ''} {', '.join(map(str, d.ranks))} "
            f"saw it first: {how}; every replica kept the update out"
        )
        return d

    def _blame_an_earlier_update(self, d: Diagnosis, lr: float | None) -> Diagnosis:
        """Weights that were finite when fit began and are not now were written by an update
        whose gradients were finite (the guard vetoes the others): ``rules.written_by_update``."""
        if (
            d.category is not Category.NONFINITE_PARAMETERS
            or not self._weights_finite_at_start
            or d.step is None
        ):
            return d
        d.evidence.insert(
            0,
            "the weights were finite when training began; the previous update (finite "
            "gradients) made them non-finite",
        )
        return rules.written_by_update(
            d, step=d.step, grad_norms=list(self.history.grad_norm), lr=lr
        )

    def _internal_error(self, where: str, err: BaseException) -> None:
        from nanscope.keras.runner import report_internal_error

        report_internal_error(self._session, f"nanscope's Keras fit guard, {where}", err)

    # -- patching ---------------------------------------------------------------------------
    def _patch(self, obj: object, name: str, new: Any) -> Any:
        had = name in vars(obj)
        old = getattr(obj, name)
        self._patches.append((obj, name, had, vars(obj).get(name)))
        object.__setattr__(obj, name, new)
        return old

    def _uninstall(self) -> None:
        global ACTIVE
        if self._counted:
            ACTIVE, self._counted = ACTIVE - 1, False
        if not self._patches:
            return
        for obj, name, had, old in reversed(self._patches):
            if had:
                object.__setattr__(obj, name, old)
            else:
                try:
                    object.__delattr__(obj, name)
                except AttributeError:
                    pass
        self._patches.clear()
        model = self.model
        if model is not None:
            model.train_function = None  # the next fit traces a clean step again

    def _install(self) -> None:
        global ACTIVE
        model = self.model
        opt = getattr(model, "optimizer", None)
        if opt is None:
            return
        if not opt.built and model.built and model.trainable_variables:
            opt.build(model.trainable_variables)  # else built in the traced step, as Keras does
        lso = isinstance(opt, keras.optimizers.LossScaleOptimizer)
        veto = self.policy is not Policy.WARN
        strategy = _kdist.strategy_of(model)
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            distributed = tf.distribute.has_strategy()  # a strategy other than the default one
        # The batch is kept in-graph (so Keras' own step runs on Keras' own iterator) except
        # under XLA and under a strategy: there the host pulls it (``train_function`` below).
        kept = self._kept = (
            None if distributed or getattr(model, "jit_compile", False) is True else _KeptBatch()
        )
        self._batches = []
        status = self._status = tf.Variable(
            _HEALTHY,
            dtype=tf.float32,
            trainable=False,
            name="nanscope_status",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        # tf.distribute: each replica's flags (1 = non-finite, +2 = its own loss), all-reduced in-graph
        n = _kdist.replicas(model)
        with _kdist.strategy_of(model).scope() if n > 1 else contextlib.nullcontext():
            flags = self._replica_flags = tf.Variable(
                tf.zeros([n]),
                trainable=False,
                name="nanscope_replicas",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
        stash = self._stash

        orig_scale_loss = self._patch(opt, "scale_loss", None)

        def scale_loss(loss):
            stash.loss = loss
            return orig_scale_loss(loss)

        object.__setattr__(opt, "scale_loss", scale_loss)

        orig_apply = self._patch(opt, "apply", None)

        def apply(grads, trainable_variables=None):
            grads = list(grads)
            if not opt.built and trainable_variables is not None:  # what Keras' apply does first
                with keras.src.backend.name_scope(opt.name, caller=opt):
                    opt.build(list(trainable_variables))
                opt.built = True
            grads_ok, norm = _gradient_norm(grads)
            if (
                lso
            ):  # report the unscaled norm; non-finite scaled gradients are the scale's business
                scale = tf.cast(opt.dynamic_scale, tf.float32)
                scale_skipped = tf.cast(tf.logical_not(grads_ok), tf.float32)
                norm = norm / scale
                ok = tf.constant(True)
            else:
                scale, scale_skipped = tf.constant(0.0), tf.constant(0.0)
                ok = grads_ok
            loss_bad = tf.constant(False)
            if stash.loss is not None:
                loss_bad = tf.logical_not(
                    tf.reduce_all(tf.math.is_finite(tf.cast(stash.loss, tf.float32)))
                )
                ok = tf.logical_and(ok, tf.logical_not(loss_bad))
            ok, seen = _kdist.agree_in_graph(ok, loss_bad)  # all replicas decide together
            if seen is not None:
                flags.assign(seen)
            status.assign(
                tf.concat(
                    [tf.stack([tf.cast(ok, tf.float32), norm, scale, scale_skipped]), status[4:]], 0
                )
            )
            if not veto:
                return orig_apply(grads, trainable_variables)

            _kdist.apply_if(
                ok, orig_apply, grads, trainable_variables
            )  # tf.distribute: in cross-replica context

        object.__setattr__(opt, "apply", apply)

        orig_train_step = self._patch(model, "train_step", None)

        def train_step(data):
            stash.loss = None
            state = state_variables(
                model
            )  # at trace time: a subclassed model has them from its 2nd trace
            saved = [tf.identity(v.value) for v in state] if veto else []
            if distributed:
                status.assign(_HEALTHY)
            else:  # the failed-steps count runs on over the steps of one call
                status.assign(tf.concat([_HEALTHY[:4], status[4:]], 0))
            logs = orig_train_step(data)
            if stash.loss is None and isinstance(logs, dict) and logs.get("loss") is not None:
                # A train_step override that never calls optimizer.scale_loss: watch its logged loss.
                logged = tf.reduce_all(tf.math.is_finite(tf.cast(logs["loss"], tf.float32)))
                status.assign(
                    tf.tensor_scatter_nd_min(status, [[0]], [tf.cast(logged, tf.float32)])
                )
            if not distributed:
                failed = status[0] <= 0.5
                if kept is not None:  # a failed or loss-scale-skipped step keeps its batch
                    kept.write_if(tf.logical_or(failed, status[3] > 0.5), data)
                status.assign(
                    tf.tensor_scatter_nd_add(status, [[4]], [tf.cast(failed, tf.float32)])
                )
            if veto and saved:

                def restore():
                    for v, s in zip(state, saved, strict=True):
                        v.assign(s)
                    return tf.constant(False)

                if (
                    _kdist.replicas(model) > 1
                ):  # no assign under tf.cond in a replica context (merge_call)
                    applied = status[0] > 0.5
                    for v, s in zip(state, saved, strict=True):
                        v.assign(tf.where(applied, v.value, s))
                else:
                    tf.cond(status[0] > 0.5, lambda: tf.constant(True), restore)
            return logs

        object.__setattr__(model, "train_step", train_step)
        model.make_train_function(force=True)
        inner = model.train_function
        guard = self

        def pulls(iterator: Any) -> bool:
            """Whether the host must take this call's batches from the iterator itself."""
            return (
                kept is None
                or not isinstance(iterator, tf.data.Iterator)
                or not all(
                    isinstance(spec, tf.TensorSpec | tf.OptionalSpec)
                    or type(spec).__name__ == "NoneTensorSpec"
                    for spec in tf.nest.flatten(iterator.element_spec)
                )
            )

        def train_function(iterator):
            if not pulls(iterator):
                guard._batches = []
                try:
                    return inner(iterator)  # Keras' own path: its iterator, its trace
                except (StopIteration, tf.errors.OutOfRangeError):
                    raise  # the end of an epoch
                except BaseException:
                    guard._uninstall()
                    raise
            batches = []
            for _ in range(max(1, int(getattr(model, "steps_per_execution", 1) or 1))):
                try:
                    batches.append(next(iterator))
                except (StopIteration, tf.errors.OutOfRangeError):
                    break
            if not batches:
                raise StopIteration
            guard._batches = batches
            try:
                return inner(iter(batches))
            except BaseException:
                guard._uninstall()
                raise

        self._patch(model, "train_function", train_function)
        ACTIVE, self._counted = ACTIVE + 1, True


def _gradient_norm(grads: list) -> tuple[tf.Tensor, tf.Tensor]:
    """(every gradient finite, the global norm), in-graph: one fused float32 sum of squares.

    That sum overflows once the norm passes ~1.8e19 while every gradient is still finite, so
    an Inf sum is settled exactly (a finiteness test and a float64 norm) in a branch that only
    runs then: a finite update is never called non-finite, and healthy steps pay nothing more.
    """
    parts = [g.values if isinstance(g, tf.IndexedSlices) else g for g in grads if g is not None]
    if not parts:
        return tf.constant(True), tf.constant(0.0)
    sq = tf.add_n([tf.reduce_sum(tf.square(tf.cast(g, tf.float32))) for g in parts])

    def exact():
        finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(g)) for g in parts]))
        sq64 = tf.add_n([tf.reduce_sum(tf.square(tf.cast(g, tf.float64))) for g in parts])
        return finite, tf.cast(tf.sqrt(sq64), tf.float32)

    return tf.cond(tf.math.is_finite(sq), lambda: (tf.constant(True), tf.sqrt(sq)), exact)


def _learning_rate(opt: Any) -> float | None:
    try:
        lr = opt.learning_rate
        return float(lr.numpy() if hasattr(lr, "numpy") else lr)
    except Exception:
        return None


def _keep_backups() -> None:
    """A stopped run did not finish: ``BackupAndRestore`` must keep its backup (Keras deletes it
    in ``on_train_end`` however training ended). The callbacks are found in ``fit``'s frame."""
    f = sys._getframe(1)
    callbacks = None
    while f is not None and callbacks is None:
        for v in f.f_locals.values():
            if isinstance(v, keras.callbacks.CallbackList):
                callbacks = v.callbacks
                break
        f = f.f_back
    for cb in callbacks or []:
        if isinstance(cb, keras.callbacks.BackupAndRestore) and "on_train_end" not in vars(cb):
            original = cb.on_train_end

            def on_train_end(logs=None, _cb=cb, _original=original):
                keep, _cb.delete_checkpoint = _cb.delete_checkpoint, False
                try:
                    _original(logs)
                finally:
                    _cb.delete_checkpoint = keep
                    del _cb.on_train_end

            cb.on_train_end = on_train_end
