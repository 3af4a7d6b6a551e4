"""Under mixed_float16, the first layer whose float16 output overflowed is named, with its
max |activation| against 65504, and the fix keeps that layer in float32."""

import keras
import numpy as np
import pytest

from nanscope.core.enums import Category, OpKind, Phase
from nanscope.core.errors import NonFiniteError
from nanscope.keras import Guard, diagnose


def mlp():
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(32, activation="relu", name="proj"),
            keras.layers.Dense(32, name="wide"),
            keras.layers.Dense(3, name="logits"),
            keras.layers.Activation("linear", dtype="float32", name="out_float32"),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def test_float16_overflow_names_the_layer_and_keeps_it_in_float32(mixed_float16):
    model = mlp()
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x = np.random.rand(8, 16).astype("float32") * 4
    y = np.random.randint(0, 3, 8)
    model.fit(
        x, y, batch_size=8, verbose=0, callbacks=[Guard(policy="raise")]
    )  # healthy in float16
    wide = model.get_layer("wide")
    wide.kernel.assign(wide.kernel * 30000.0)  # activations now past 65504 (fine in float32)
    with pytest.raises(NonFiniteError) as info:
        model.fit(x, y, batch_size=8, verbose=0, callbacks=[Guard(policy="raise")])
    d = info.value.diagnosis
    assert d.category is Category.OVERFLOW and d.phase is Phase.FORWARD
    assert (
        d.module == "wide"
        and d.dtype == "float16"
        and d.op == "MatMul"
        and d.op_kind is OpKind.MATMUL
    )
    line = next(e for e in d.evidence if "max |activation|" in e)
    biggest = float(line.split("float32: ")[1].split(",")[0])
    assert biggest > 65504 and "65504" in line
    assert "dtype='float32'" in d.fixes[0] and "wide" in d.fixes[0]
    assert any("bfloat16" in f for f in d.fixes)


def test_same_model_in_float32_is_clean():
    model = mlp()
    wide = model.get_layer("wide")
    x = np.random.rand(8, 16).astype("float32") * 4
    model(x)
    wide.kernel.assign(wide.kernel * 30000.0)
    assert diagnose(model, (x, np.random.randint(0, 3, 8))) is None


def test_a_loss_scale_that_keeps_halving_is_a_failure_with_its_root_cause(mixed_float16):
    import tensorflow as tf

    class Distance(keras.layers.Layer):
        def call(self, inputs):
            a, b = inputs
            return tf.sqrt(tf.reduce_sum(tf.square(a - b), axis=-1, keepdims=True))

    left, right = keras.Input((5,)), keras.Input((5,))
    embed = keras.layers.Dense(4, name="embed")
    dist = Distance(name="distance")([embed(left), embed(right)])
    model = keras.Model([left, right], keras.layers.Dense(1, name="score", dtype="float32")(dist))
    model.compile(keras.optimizers.SGD(0.01), "mse")
    a = np.random.rand(48, 5).astype("float32")
    b = a + 0.2
    b[::4] = a[::4]  # every batch of 4 holds an identical pair: sqrt at 0, every step skipped
    guard = Guard(policy="raise")
    with pytest.raises(NonFiniteError) as info:
        model.fit(
            (a, b),
            np.ones((48, 1), "float32"),
            batch_size=4,
            shuffle=False,
            verbose=0,
            callbacks=[guard],
        )
    d = info.value.diagnosis
    assert (
        d.category is Category.SINGULAR_GRADIENT and d.module == "distance" and d.op == "SqrtGrad"
    )
    assert d.samples == [0] and d.step == 9  # the 10th skip in a row
    assert any(e.startswith("symptom: ") for e in d.evidence)
