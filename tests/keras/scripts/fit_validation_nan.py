"""fit with validation_data whose labels hold an Inf in sample 3: training is fine, the
validation loss is Inf."""

import keras
import numpy as np

keras.utils.set_random_seed(0)
x, y = np.random.rand(48, 3).astype("float32"), np.random.rand(48, 1).astype("float32")
x_val, y_val = np.random.rand(8, 3).astype("float32"), np.random.rand(8, 1).astype("float32")
y_val[3] = np.inf
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)])
model.compile("adam", "mse")
history = model.fit(x, y, validation_data=(x_val, y_val), epochs=2, batch_size=16, verbose=0)
print("val_loss", history.history["val_loss"])
