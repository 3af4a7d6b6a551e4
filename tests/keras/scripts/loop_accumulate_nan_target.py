"""Gradient accumulation in an eager GradientTape loop: 4 micro-batches per update; the third
micro-batch's targets hold NaN (sample 1), and the script ends before the update."""

import keras
import numpy as np
import tensorflow as tf

keras.utils.set_random_seed(0)
model = keras.Sequential(
    [keras.Input((3,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)]
)
optimizer = keras.optimizers.Adam(1e-3)
loss_fn = keras.losses.MeanSquaredError()
micro = [
    (np.random.rand(4, 3).astype("float32"), np.random.rand(4, 1).astype("float32"))
    for _ in range(3)
]
micro[2][1][1] = np.nan
accumulated = [tf.zeros_like(v) for v in model.trainable_variables]
for x, y in micro:
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    accumulated = [a + g for a, g in zip(accumulated, grads, strict=True)]
    print("micro-batch loss", float(loss))
