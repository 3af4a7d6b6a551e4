"""An eager GradientTape loop fed x_train / 0.0; the model is called without training=."""

import keras
import tensorflow as tf

keras.utils.set_random_seed(0)
model = keras.Sequential(
    [keras.Input((8,)), keras.layers.Dense(4, name="hidden"), keras.layers.Dense(1, name="out")]
)
optimizer = keras.optimizers.SGD(0.01)
x_train = tf.random.uniform((4, 8)) / 0.0
for _step in range(2):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x_train)))
    optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
print("training finished")
