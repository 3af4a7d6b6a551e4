"""Keras 3 on the torch backend with nanscope.keras.Guard() passed by hand: fit must run as
without it (the guard supports the TensorFlow backend only and says so)."""

import keras
import numpy as np

import nanscope.keras

keras.utils.set_random_seed(0)
model = keras.Sequential(
    [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
)
model.compile("sgd", "mse")
history = model.fit(
    np.random.rand(16, 4).astype("float32"),
    np.random.rand(16, 1).astype("float32"),
    epochs=1,
    batch_size=8,
    verbose=0,
    callbacks=[nanscope.keras.Guard()],
)
print("backend", keras.backend.backend(), "loss", f"{history.history['loss'][0]:.6f}")
