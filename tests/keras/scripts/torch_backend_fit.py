"""Keras 3 on the torch backend (run with KERAS_BACKEND=torch): a Sequential fit; --nan puts a
NaN in sample 5."""

import sys

import keras
import numpy as np

keras.utils.set_random_seed(0)
model = keras.Sequential(
    [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
)
model.compile("adam", "mse")
x = np.random.rand(32, 4).astype("float32")
y = np.random.rand(32, 1).astype("float32")
if "--nan" in sys.argv:
    x[5, 1] = np.nan
history = model.fit(x, y, epochs=1, batch_size=8, verbose=0)
print("backend", keras.backend.backend(), "loss", f"{history.history['loss'][0]:.6f}")
print("torchvision imported:", "torchvision" in sys.modules)
