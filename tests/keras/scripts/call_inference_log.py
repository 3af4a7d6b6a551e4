"""A custom layer takes log of its inputs; called as ``model(x, training=False)`` in an eager
evaluation loop, a zero feature in sample 1 makes -inf."""

import keras
import numpy as np
import tensorflow as tf


class LogFeatures(keras.layers.Layer):
    def call(self, x):
        return tf.math.log(x)


class Evaluator:
    def __init__(self, model):
        self.model = model

    def run(self, x):
        scores = self.model(x, training=False)
        return float(tf.reduce_mean(scores))


keras.utils.set_random_seed(0)
model = keras.Sequential(
    [keras.Input((4,)), LogFeatures(name="log_features"), keras.layers.Dense(2, name="head")]
)
x = np.random.uniform(0.5, 1.0, (6, 4)).astype("float32")
x[1, 2] = 0.0
print("mean score", Evaluator(model).run(x))
