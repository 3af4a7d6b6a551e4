"""Healthy: a Sequential CNN on a tf.data pipeline; fit, evaluate, predict_on_batch,
test_on_batch. argv[1]: where to np.save the final weights."""

import sys

import keras
import numpy as np
import tensorflow as tf

keras.utils.set_random_seed(0)
x = np.random.rand(64, 8, 8, 1).astype("float32")
y = (x.mean(axis=(1, 2, 3)) > 0.5).astype("float32")
train = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
model = keras.Sequential(
    [
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.Flatten(),
        keras.layers.Dense(1, activation="sigmoid"),
    ]
)
model.compile(optimizer="rmsprop", loss="binary_crossentropy", jit_compile=False)
model.fit(train, epochs=2, verbose=0)
print("evaluate", f"{model.evaluate(train, verbose=0):.8f}")
print("predict_on_batch", np.round(model.predict_on_batch(x[:3]), 6).ravel().tolist())
print("test_on_batch", f"{float(model.test_on_batch(x[:16], y[:16])):.8f}")
np.save(sys.argv[1], np.concatenate([w.ravel() for w in model.get_weights()]))
