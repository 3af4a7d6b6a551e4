"""A custom tf.GradientTape loop with a Keras loss on probabilities whose softmax saturated."""

import keras
import numpy as np
import tensorflow as tf

keras.utils.set_random_seed(0)
model = keras.Sequential(
    [
        keras.Input((6,)),
        keras.layers.Dense(8, activation="relu", name="hidden"),
        keras.layers.Dense(3, name="classifier"),
        keras.layers.Softmax(name="probs"),
    ]
)
optimizer = keras.optimizers.SGD(0.1)
x = np.random.rand(4, 6).astype("float32")
y = np.eye(3, dtype="float32")[[0, 1, 2, 0]]


def handwritten(y_true, p):
    return -tf.reduce_mean(tf.reduce_sum(y_true * tf.math.log(p), axis=-1))


for step in range(4):
    if step == 2:
        head = model.get_layer("classifier")
        head.kernel.assign(head.kernel * 1e4)
    with tf.GradientTape() as tape:
        probs = model(x, training=True)
        loss = handwritten(y, probs)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply(grads, model.trainable_variables)
print("training finished")
