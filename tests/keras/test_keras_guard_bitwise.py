"""A healthy fit under the Guard ends with the same weights, bit for bit, as without it
(issue 9): Keras' own step on Keras' own ``tf.data`` iterator, for the three ways to build a
model and the common optimizers.

The data has a batch size (12) whose BatchNorm element count is not a power of two and a
short last batch, so a step traced with a concrete batch shape (the guard once handed the
step a list of host-pulled batches) would let grappler's constant folding turn the division
by that count into a multiplication by its rounded reciprocal, and show here.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from nanscope.keras import Guard

ROWS, BATCH = 40, 12  # batches of 12, 12, 12 and 4


class Regressor(keras.Model):
    def __init__(self):
        super().__init__()
        self.body = keras.layers.Dense(8, activation="relu")
        self.norm = keras.layers.BatchNormalization()
        self.head = keras.layers.Dense(1)

    def call(self, x, training=False):
        return self.head(self.norm(self.body(x), training=training))


def build(style: str, norm: bool = True) -> keras.Model:
    layers = [
        keras.layers.Dense(8, activation="relu"),
        *([keras.layers.BatchNormalization()] if norm else []),
        keras.layers.Dense(1),
    ]
    if style == "sequential":
        return keras.Sequential([keras.Input((5,)), *layers])
    if style == "functional":
        inputs = h = keras.Input((5,))
        for layer in layers:
            h = layer(h)
        return keras.Model(inputs, h)
    return Regressor()


OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.05),
    "sgd_momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(1e-2),
    "adamw": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.01),
}


def final_weights(style: str, optimizer: str, guarded: bool, norm: bool = True) -> bytes:
    keras.utils.set_random_seed(0)
    x = np.random.rand(ROWS, 5).astype("float32")
    y = x @ np.array([[1.0], [-2.0], [0.5], [0.0], [3.0]], "float32")
    model = build(style, norm)
    model.compile(OPTIMIZERS[optimizer](), "mse")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    callbacks = [Guard(policy="raise")] if guarded else []
    model.fit(data, epochs=2, verbose=0, callbacks=callbacks)
    return b"".join(np.ascontiguousarray(w).tobytes() for w in model.get_weights())


_REORDERED = (  # the xfail below, on one more case
    "issue 9, second cause, not fixed: on this CPU (AMD EPYC, 2026-12-02) grappler's arithmetic "
    "optimizer rounds SGD-with-momentum on the subclassed model apart too; with "
    "arithmetic_optimization off the two runs match (test below)"
)


@pytest.mark.parametrize(
    "optimizer, style",
    [
        pytest.param(
            o,
            st,
            marks=[pytest.mark.xfail(strict=False, reason=_REORDERED)]
            if (o, st) == ("sgd_momentum", "subclassed")
            else [],
        )
        for o in ("sgd", "sgd_momentum", "adam", "adamw")
        for st in ("functional", "sequential", "subclassed")
    ],
)
def test_guarded_fit_ends_with_the_same_weights_bit_for_bit(style, optimizer):
    assert final_weights(style, optimizer, guarded=True) == final_weights(
        style, optimizer, guarded=False
    )


def test_without_grappler_s_reordering_momentum_is_bit_identical_in_every_style():
    """What the xfail says: the only difference is grappler's rewrite of the update."""
    before = tf.config.optimizer.get_experimental_options()
    tf.config.optimizer.set_experimental_options({"arithmetic_optimization": False})
    try:
        for style in ("functional", "sequential", "subclassed"):
            guarded = final_weights(style, "sgd_momentum", guarded=True)
            assert guarded == final_weights(style, "sgd_momentum", guarded=False), style
    finally:
        tf.config.optimizer.set_experimental_options(
            {"arithmetic_optimization": before.get("arithmetic_optimization", True)}
        )


class GeluRegressor(keras.Model):
    def __init__(self):
        super().__init__()
        self.body = keras.layers.Dense(12, activation="gelu")
        self.norm = keras.layers.BatchNormalization()
        self.head = keras.layers.Dense(1)

    def call(self, x, training=False):
        return self.head(self.norm(self.body(x), training=training))


@pytest.mark.xfail(
    strict=False,  # whether the two orders round apart depends on the values (and the CPU)
    reason="issue 9, second cause, not fixed: grappler's arithmetic optimizer "
    "(MinimizeBroadcasts) reorders plain SGD's lr * (sum * rsqrt) (BatchNorm gamma's gradient) "
    "into (lr * sum) * rsqrt only while that gradient has a single reader; the guard's "
    "in-graph check is a second one (and its tf.cond a Switch before the update)",
)
def test_sgd_on_a_product_gradient_is_reordered_without_the_guard_only():
    def weights(guarded):
        keras.utils.set_random_seed(0)
        x = np.random.rand(ROWS, 5).astype("float32")
        y = x @ np.array([[1.0], [-2.0], [0.5], [0.0], [3.0]], "float32")
        model = GeluRegressor()
        model.compile(keras.optimizers.SGD(0.05), "mse")
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
        model.fit(data, epochs=2, verbose=0, callbacks=[Guard(policy="raise")] if guarded else [])
        return b"".join(np.ascontiguousarray(w).tobytes() for w in model.get_weights())

    assert weights(True) == weights(False)
