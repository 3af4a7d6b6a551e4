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
Strategies that support no-merge-call (``MultiWorkerMirroredStrategy``, ``MirroredStrategy``
on some setups) take the ``tf.cond`` in the replica context directly: the same flags agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

__all__ = [
    "strategy_of",
    "replicas",
    "agree_in_graph",
    "apply_if",
    "local_batches",
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
    resolver = getattr(strategy, "cluster_resolver", None)
    first = (getattr(resolver, "task_id", 0) or 0) * n_local if resolver is not None else 0
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
