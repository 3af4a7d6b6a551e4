"""The Keras Guard under tf.distribute.MultiWorkerMirroredStrategy: 2 worker processes on
localhost, each told its place by TF_CONFIG, one CPU replica each. Keras 3.15's own
``model.fit`` fails under this strategy (docs/at-scale.md), so the script trains the way the
TensorFlow multi-worker guide does: a custom loop, ``strategy.run`` over a distributed
dataset, the Keras model and optimizer, the Guard driven through ``keras.callbacks.CallbackList``.

Scenario input: a NaN in worker 1's part of step 2's batch -> every worker keeps the update
out (weights and momentum bit-identical across workers, equal to their values before the
step), replica 1 named. Each worker writes rank<task>.json into argv[1].
"""

import json
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from nanscope.keras import Guard

out = Path(sys.argv[1])
warnings.simplefilter("ignore")
strategy = tf.distribute.MultiWorkerMirroredStrategy()
task = strategy.cluster_resolver.task_id
PER_REPLICA, STEP = 4, 2

rng = np.random.default_rng(0)
x = rng.normal(size=(4 * PER_REPLICA * strategy.num_replicas_in_sync, 6)).astype("float32")
y = rng.integers(0, 3, len(x))
x[2 * STEP * PER_REPLICA + 2 + 1, 1] = np.nan  # global row 19: worker 1's 2nd row at step 2


def dataset_fn(ctx):
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)  # worker w: rows w, w+2, ...
    return ds.batch(ctx.get_per_replica_batch_size(PER_REPLICA * ctx.num_replicas_in_sync))


with strategy.scope():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
    )
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    model.compile(optimizer=optimizer, loss=loss_fn)  # tells the Guard the optimizer and loss
    optimizer.build(model.trainable_variables)

batches = strategy.distribute_datasets_from_function(dataset_fn)


@tf.function
def train_step(batch):
    def replica_step(xb, yb):
        with tf.GradientTape() as tape:
            per_sample = loss_fn(yb, model(xb, training=True))
            loss = tf.nn.compute_average_loss(
                per_sample, global_batch_size=PER_REPLICA * strategy.num_replicas_in_sync
            )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    return strategy.reduce("SUM", strategy.run(replica_step, args=batch), axis=None)


def state():
    return [np.asarray(v).tobytes().hex() for v in model.weights + optimizer.variables]


guard = Guard(policy="skip")
callbacks = keras.callbacks.CallbackList([guard], model=model)
snaps = [state()]
callbacks.on_train_begin()
for step, batch in enumerate(batches):
    callbacks.on_train_batch_begin(step)
    loss = train_step(batch)
    callbacks.on_train_batch_end(step, {"loss": float(loss)})
    snaps.append(state())
callbacks.on_train_end()

d = guard.last
(out / f"rank{task}.json").write_text(
    json.dumps(
        {
            "task": task,
            "replicas": strategy.num_replicas_in_sync,
            "skipped": guard.skipped,
            "applied": [snaps[i] != snaps[i - 1] for i in range(1, len(snaps))],
            "state": snaps,
            "finite": all(bool(np.isfinite(np.asarray(v)).all()) for v in model.weights),
            "diagnosis": d.fields_dict() if d else None,
        }
    )
)
