"""What the Keras Guard needs from ``tf.distribute``: one decision for all replicas, taken
in-graph, and the replica that saw the non-finite value.

Design constraints: inside a replica context the gradients reaching ``optimizer.apply`` are
still the replica's own (Keras all-reduces them inside ``apply``), so each replica's check
is local. One ``all_reduce`` (SUM) of a ``num_replicas_in_sync``-float vector, where each
replica writes its own slot (1 = its loss or gradients are non-finite, +2 = its own loss
is), gives every replica every flag, so all veto together or apply together. The update
itself contains a ``merge_call`` (the gradient all-reduce), and TensorFlow forbids one under
``tf.cond`` in a replica context, so the veto is taken in the cross-replica context, as
Keras' own ``LossScaleOptimizer`` does. Only frameworks the program imported are used: this
module is imported by the Keras guard, which already imports TensorFlow.
Where a strategy supports no-merge-call (``MirroredStrategy`` and ``MultiWorkerMirroredStrategy``
when the step is XLA-compiled on all-GPU devices) the ``tf.cond`` is taken in the replica
context directly: the same flags agree. On CPU, ``MultiWorkerMirroredStrategy`` takes the merge_call path; the flag
``all_reduce`` and the vetoed update's gradient all-reduce are then collectives between the
worker processes, and every worker takes the same branch because every worker holds the
same all-reduced flags (tests/distributed/test_keras_multiworker.py).

Under ``MultiWorkerMirroredStrategy`` a worker holds only its own replicas' parts of a batch,
and a custom training loop (Keras 3.15's ``fit`` fails under that strategy, docs/at-scale.md)
hands the Guard no batch at all: ``not_rerun_here`` then says where the failure was seen
instead of calling it a failure that did not reproduce.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from nanscope.core import rules
from nanscope.core.diagnosis import Diagnosis
from nanscope.core.enums import Category

__all__ = [
    "strategy_of",
    "replicas",
    "agree_in_graph",
    "apply_if",
    "local_batches",
    "local_replicas",
    "not_rerun_here",
    "seen_replicas",
    "LOCAL_LOSS",
]

LOCAL_LOSS = 2.0


def strategy_of(model: Any) -> Any:
    """The model's ``tf.distribute`` strategy (the one it was built under), or None."""
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None and tf.distribute.has_strategy():
        strategy = tf.distribute.get_strategy()
    return strategy


def replicas(model: Any = None) -> int:
    """Replicas in sync under the model's strategy (1 without one)."""
    strategy = strategy_of(model)
    return int(strategy.num_replicas_in_sync) if strategy is not None else 1


def agree_in_graph(ok: tf.Tensor, loss_bad: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor | None]:
    """(every replica finite, the replicas' flags) in-graph; flags is None outside a replica
    context of a multi-replica strategy (then ``ok`` comes back as it was)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return ok, None
    mine = 1.0 - tf.cast(ok, tf.float32) + LOCAL_LOSS * tf.cast(loss_bad, tf.float32)
    onehot = (
        tf.one_hot(ctx.replica_id_in_sync_group, ctx.num_replicas_in_sync, dtype=tf.float32) * mine
    )
    seen = ctx.all_reduce(tf.distribute.ReduceOp.SUM, onehot)
    return tf.equal(tf.reduce_sum(seen), 0.0), seen


def apply_if(
    ok: tf.Tensor, update: Callable[..., Any], grads: list, trainable_variables: Any
) -> None:
    """``update(grads, trainable_variables)`` on every replica when ``ok`` (the same on all of
    them), else nothing anywhere."""
    ctx = tf.distribute.get_replica_context()
    no_merge = tf.__internal__.distribute.strategy_supports_no_merge_call()
    if ctx is None or ctx.num_replicas_in_sync <= 1 or no_merge:

        def run():
            update(grads, trainable_variables)
            return tf.constant(True)

        tf.cond(ok, run, lambda: tf.constant(False))
        return

    def cross(distribution, ok, grads, trainable_variables):
        ok_one = distribution.experimental_local_results(ok)[0]  # equal on every replica

        def run():
            distribution.extended.call_for_each_replica(update, args=(grads, trainable_variables))
            return tf.constant(True)

        tf.cond(ok_one, run, lambda: tf.constant(False))

    ctx.merge_call(cross, args=(ok, grads, trainable_variables))


def local_batches(batch: Any, model: Any = None) -> list[tuple[int, Any]]:
    """(replica id, that replica's part) for the parts of a batch a distributed dataset handed
    to the step that live in this process (all of them under MirroredStrategy; this worker's
    under MultiWorkerMirroredStrategy); a plain batch is one part, replica 0."""
    strategy = strategy_of(model)
    parts = tf.nest.flatten(batch, expand_composites=False)
    if strategy is None or not any(isinstance(p, tf.distribute.DistributedValues) for p in parts):
        return [(0, batch)]
    per = [
        list(strategy.experimental_local_results(p))
        if isinstance(p, tf.distribute.DistributedValues)
        else None
        for p in parts
    ]
    n_local = max(len(p) for p in per if p is not None)
    first = _worker(strategy) * n_local
    return [
        (
            first + i,
            tf.nest.pack_sequence_as(
                batch, [p[i] if p is not None else v for p, v in zip(per, parts, strict=True)]
            ),
        )
        for i in range(n_local)
    ]


def seen_replicas(flags: list[float]) -> list[int]:
    """Replicas whose own loss was non-finite, else those whose check was."""
    by_loss = [r for r, f in enumerate(flags) if int(f) & int(LOCAL_LOSS)]
    return by_loss or [r for r, f in enumerate(flags) if int(f) & 1]


def _worker(strategy: Any) -> int:
    """This process's worker index (0 outside a multi-worker strategy)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return (getattr(resolver, "task_id", 0) or 0) if resolver is not None else 0


def local_replicas(model: Any = None) -> list[int]:
    """The replica ids (``replica_id_in_sync_group``) that live in this process: all of them
    under MirroredStrategy, this worker's under MultiWorkerMirroredStrategy (worker ``w`` with
    ``n`` local devices holds ``w*n .. w*n+n-1``, as ``local_batches`` numbers them)."""
    strategy = strategy_of(model)
    if strategy is None:
        return [0]
    n_local = len(getattr(strategy.extended, "worker_devices", ())) or 1
    first = _worker(strategy) * n_local
    return list(range(first, first + n_local))


def not_rerun_here(
    batches: list[Any], flags: Any, model: Any = None, *, step: int | None = None
) -> Diagnosis | None:
    """The diagnosis when this process could not re-run the failed part of the batch, or None
    (then the re-run stood a chance, and a finite re-run means the failure did not reproduce).

    Two cases, both multi-replica: the Guard was handed no batch (a custom training loop drives
    it through ``keras.callbacks.CallbackList``; ``fit`` hands it the batch), or every replica
    whose check saw the failure lives in another worker process (MultiWorkerMirroredStrategy:
    this worker holds only its own part of the batch). ``ranks`` names those replicas either
    way, from the in-graph flags every worker shares.
    """
    values = [float(f) for f in (flags.numpy() if hasattr(flags, "numpy") else flags or [])]
    if len(values) <= 1:
        return None
    seen = seen_replicas(values)
    here = local_replicas(model)
    elsewhere = bool(seen) and not set(seen) & set(here)
    if not seen or (batches and not elsewhere):
        return None
    strategy = strategy_of(model)
    names = ", ".join(map(str, seen))
    where = f"replica{'s' if len(seen) > 1 else ''} {names}"
    if elsewhere:
        n_local = len(here)
        workers = sorted({r // n_local for r in seen})
        why = (
            f"{where} saw it first, in worker{'s' if len(workers) > 1 else ''} "
            f"{', '.join(map(str, workers))}; this worker ({_worker(strategy)}) holds "
            f"replica{'s' if n_local > 1 else ''} {', '.join(map(str, here))}, whose check was "
            "finite: the failed part of the batch lives in the worker named"
        )
    else:
        why = (
            f"{where} saw it first (its in-graph check); the Guard was handed no batch to re-run "
            "(a custom training loop: `fit` hands it the batch), so the op was not traced"
        )
    return Diagnosis(
        Category.UNKNOWN,
        f"the loss or gradient was non-finite on {where}; every replica took the same decision",
        framework="keras",
        step=step,
        evidence=[why, "the replicas' flags were all-reduced in-graph: one decision for all"],
        fixes=[
            "trace the failing batch by hand on the worker that holds it: "
            "`nanscope.keras.diagnose(model, batch, loss)`",
            *rules.fixes_for(Category.UNKNOWN, framework="keras"),
        ],
        ranks=seen,
    )
