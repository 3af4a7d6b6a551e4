"""An activity penalty added with add_loss takes log of ReLU activations (zeros: -inf), and
a later custom layer takes sqrt of a value that goes negative for some samples: the penalty's
log came first, and only the loss sees it."""

import keras
import numpy as np
import tensorflow as tf


class LogPenalty(keras.layers.Layer):
    def call(self, h):
        self.add_loss(-0.01 * tf.reduce_mean(tf.math.log(h)))
        return h


class SqrtHead(keras.layers.Layer):
    def call(self, z):
        return tf.sqrt(z)


keras.utils.set_random_seed(0)
inputs = keras.Input((4,))
h = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
h = LogPenalty(name="penalty")(h)
z = keras.layers.Dense(1, name="pre")(h)
outputs = SqrtHead(name="sqrt_head")(z)
model = keras.Model(inputs, outputs)
model.compile("sgd", "mse")
x = np.random.normal(size=(8, 4)).astype("float32")
model.fit(x, np.ones((8, 1), "float32"), epochs=1, batch_size=8, verbose=0)
print("training finished")
