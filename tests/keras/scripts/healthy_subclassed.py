"""Healthy: a subclassed model (variables created on the first batch), a custom train_step,
a GradientTape fine-tuning loop; fit, evaluate, predict. argv[1]: where to np.save the weights."""

import sys

import keras
import numpy as np
import tensorflow as tf


class Regressor(keras.Model):
    def __init__(self):
        super().__init__()
        self.body = keras.layers.Dense(12, activation="gelu")
        self.norm = keras.layers.BatchNormalization()
        self.head = keras.layers.Dense(1)

    def call(self, x, training=False):
        return self.head(self.norm(self.body(x), training=training))


class TrackedRegressor(Regressor):
    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
        self.optimizer.apply(
            tape.gradient(loss, self.trainable_variables), self.trainable_variables
        )
        return {"loss": loss}


def main(path):
    keras.utils.set_random_seed(0)
    x = np.random.rand(64, 5).astype("float32")
    y = x @ np.array([[1.0], [-2.0], [0.5], [0.0], [3.0]], "float32")
    model = Regressor()
    model.compile(optimizer="adam", loss="mse")
    print(
        "fit",
        [f"{v:.8f}" for v in model.fit(x, y, epochs=3, batch_size=16, verbose=0).history["loss"]],
    )
    tracked = TrackedRegressor()
    tracked.compile(optimizer="sgd", loss="mse")
    print(
        "tracked",
        [f"{v:.8f}" for v in tracked.fit(x, y, epochs=2, batch_size=32, verbose=0).history["loss"]],
    )
    opt = keras.optimizers.SGD(1e-2)
    for i in range(0, 64, 16):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x[i : i + 16], training=True) - y[i : i + 16]))
        opt.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    print("evaluate", f"{model.evaluate(x, y, verbose=0):.8f}")
    print("predict", np.round(model.predict(x[:5], verbose=0), 6).ravel().tolist())
    np.save(path, np.concatenate([w.ravel() for w in model.get_weights() + tracked.get_weights()]))


if __name__ == "__main__":
    main(sys.argv[1])
