"""The Keras Guard under tf.distribute.MirroredStrategy on 2 logical CPU devices. Scenarios:

* input: a NaN in the part of step 2's global batch that replica 1 gets -> every replica
  keeps the update out, weights bit-identical on both replicas, replica 1 named;
* flip: the test's own layer flips an exponent bit of one activation, once, on replica 1
  (an in-graph counter; the eager re-run of the batch never flips) -> transient, replica 1 named.
"""

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

from nanscope.keras import Guard  # noqa: E402

out = Path(sys.argv[1])
warnings.simplefilter("ignore")
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
BATCH, STEP = 8, 2  # global batch 8: replica 0 gets rows 0-3 of it, replica 1 rows 4-7


COUNTER = []


class FlipOnce(keras.layers.Layer):
    """Test-only fault injector: on replica 1, at the training call number STEP, flip bit 30
    (the exponent's top bit) of one activation in [1, 2): it becomes NaN. Only once."""

    def build(self, shape):
        # Not a layer weight: the guard would restore it with the rest of the state on the veto,
        # and the fault would fire again.
        COUNTER[:] = [
            tf.Variable(0.0, trainable=False, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        ]

    def call(self, x, training=False):
        if not training:
            return x
        ctx = tf.distribute.get_replica_context()
        replica = ctx.replica_id_in_sync_group if ctx is not None else -1
        fire = tf.logical_and(tf.equal(COUNTER[0], STEP), tf.equal(replica, 1))
        if ctx is not None:
            COUNTER[0].assign_add(1.0)
        bits = tf.bitcast(x, tf.int32)
        flipped = tf.bitcast(
            tf.bitwise.bitwise_xor(bits, tf.constant(1 << 30, tf.int32)), tf.float32
        )
        big = tf.reshape(tf.logical_and(tf.abs(x) >= 1.0, tf.abs(x) < 2.0), [-1])
        first = tf.one_hot(
            tf.argmax(tf.cast(big, tf.int32)), tf.size(big), on_value=True, off_value=False
        )
        mask = tf.reshape(tf.logical_and(first, big), tf.shape(x))
        return tf.where(tf.logical_and(fire, mask), flipped, x)


def replica_weights(model):
    return [
        [np.asarray(r).tobytes() for r in strategy.experimental_local_results(v)]
        for v in model.weights
    ]


def run(scenario):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        layers = [keras.Input((6,)), keras.layers.Dense(8)]
        if scenario == "flip":
            layers.append(FlipOnce())
        layers += [keras.layers.Activation("tanh"), keras.layers.Dense(3)]
        model = keras.Sequential(layers)
        model.compile(
            optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4 * BATCH, 6)).astype("float32") * (3.0 if scenario == "flip" else 1.0)
    y = rng.integers(0, 3, 4 * BATCH)
    if scenario == "input":
        x[BATCH * STEP + 5, 1] = np.nan  # row 5 of step 2's global batch: replica 1's row 1
    snaps = []

    class Snap(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            snaps.append(replica_weights(model))

    snaps.append(replica_weights(model))
    guard = Guard(policy="skip")
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, callbacks=[guard, Snap()], verbose=0)
    d = guard.last
    return {
        "skipped": guard.skipped,
        "diagnosis": d.fields_dict() if d else None,
        "applied": [snaps[i] != snaps[i - 1] for i in range(1, len(snaps))],
        "replicas_equal": all(len(set(v)) == 1 for s in snaps for v in s),
        "finite": all(bool(np.isfinite(np.asarray(v)).all()) for v in model.weights),
    }


result = {"replicas": strategy.num_replicas_in_sync, "input": run("input"), "flip": run("flip")}
(out / "rank0.json").write_text(json.dumps(result))
