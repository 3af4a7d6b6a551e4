"""The TensorFlow seed, unchanged: model.fit on x_train / 0.0 (pass --clean for healthy data)."""

import sys

import keras
import tensorflow as tf

keras.utils.set_random_seed(0)
x_train = tf.random.uniform((64, 32))
y_train = tf.random.uniform((64,), maxval=10, dtype=tf.int32)
x_train_with_nan = x_train / 0.0
model = keras.Sequential(
    [keras.Input((32,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10)]
)
model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(
    x_train if "--clean" in sys.argv else x_train_with_nan,
    y_train,
    epochs=2,
    batch_size=16,
    verbose=0,
)
print("training finished")
sys.exit(3 if "--exit3" in sys.argv else 0)
