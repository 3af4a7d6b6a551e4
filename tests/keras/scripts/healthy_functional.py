"""Healthy: a functional model with BatchNormalization and Dropout; fit (with validation),
evaluate, predict. argv[1]: where to np.save the final weights."""

import sys

import keras
import numpy as np

keras.utils.set_random_seed(0)
inputs = keras.Input((6,))
h = keras.layers.Dense(16, activation="relu")(inputs)
h = keras.layers.BatchNormalization()(h)
h = keras.layers.Dropout(0.2)(h)
outputs = keras.layers.Dense(3, activation="softmax")(h)
model = keras.Model(inputs, outputs)
model.compile(
    optimizer=keras.optimizers.Adam(1e-2),
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
)
x = np.random.rand(96, 6).astype("float32")
y = (x.sum(axis=1) > 3).astype("int64") + (x[:, 0] > 0.5)
history = model.fit(x, y, validation_split=0.25, epochs=3, batch_size=16, verbose=0)
print("loss", [f"{v:.8f}" for v in history.history["loss"]])
print("val_loss", [f"{v:.8f}" for v in history.history["val_loss"]])
print("evaluate", [f"{v:.8f}" for v in model.evaluate(x, y, batch_size=32, verbose=0)])
pred = model.predict(x[:10], verbose=0)
print("predict", np.round(pred, 6).tolist())
print("call", float(model(x[:4], training=False).numpy().sum()))
np.save(sys.argv[1], np.concatenate([w.ravel() for w in model.get_weights()]))
