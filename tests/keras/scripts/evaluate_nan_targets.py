"""A Sequential regressor; the held-out targets have NaN in two rows of the second batch:
``model.evaluate`` returns a NaN loss."""

import keras
import numpy as np


def make_data(n, rng):
    x = rng.normal(size=(n, 5)).astype("float32")
    return x, (x @ np.arange(1, 6, dtype="float32"))[:, None]


def main():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x_train, y_train = make_data(64, rng)
    x_test, y_test = make_data(24, rng)
    y_test[[9, 13]] = np.nan  # rows 1 and 5 of batch 1 (batch_size 8)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    model.fit(x_train, y_train, epochs=2, batch_size=16, verbose=0)
    loss, mae = model.evaluate(x_test, y_test, batch_size=8, verbose=0)
    print("test loss", loss)


if __name__ == "__main__":
    main()
