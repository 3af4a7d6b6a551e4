"""A subclassed model served batch by batch with ``predict_on_batch``; one request carries a
NaN feature (sample 2 of the second batch)."""

import keras
import numpy as np


class Scorer(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="tanh", name="hidden")
        self.out = keras.layers.Dense(1, name="score")

    def call(self, x):
        return self.out(self.hidden(x))


keras.utils.set_random_seed(0)
model = Scorer()
model.compile(optimizer="sgd", loss="mse")
x = np.random.rand(32, 6).astype("float32")
model.fit(x, np.random.rand(32, 1).astype("float32"), epochs=1, batch_size=8, verbose=0)
requests = [np.random.rand(4, 6).astype("float32") for _ in range(3)]
requests[1][2, 3] = np.nan
for batch in requests:
    scores = model.predict_on_batch(batch)
    print("scores finite:", bool(np.isfinite(scores).all()))
