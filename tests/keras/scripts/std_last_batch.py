"""Keras functional model whose custom layer standardizes features by the batch's sample
standard deviation (ddof=1). 9 samples with batch_size=4 leave a last batch of one: N - 1 = 0."""

import keras
import numpy as np
import tensorflow as tf


class BatchStandardize(keras.layers.Layer):
    def call(self, x):
        mean = tf.reduce_mean(x, axis=0)
        std = tf.sqrt(tf.experimental.numpy.var(x, axis=0, ddof=1, dtype=tf.float32))
        return (x - mean) / (std + 1e-5)


keras.utils.set_random_seed(0)
inputs = keras.Input((6,))
outputs = keras.layers.Dense(2)(BatchStandardize(name="standardize")(inputs))
model = keras.Model(inputs, outputs)
model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
x = np.random.default_rng(0).normal(size=(9, 6)).astype("float32")
y = (x.sum(1) > 0).astype("int64")
model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
print("final weights finite:", all(np.isfinite(w).all() for w in model.get_weights()))
