"""A subclassed model with its own train_step (no compiled loss, no optimizer.scale_loss):
a hand-written cross-entropy takes log of a softmax that saturates on step 2."""

import keras
import numpy as np
import tensorflow as tf


class Classifier(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="relu", name="hidden")
        self.logits = keras.layers.Dense(3, name="logits")
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def call(self, x):
        return tf.nn.softmax(self.logits(self.hidden(x)))

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            p = self(x, training=True)
            loss = -tf.reduce_mean(tf.reduce_sum(y * tf.math.log(p), axis=-1))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables, strict=True))
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    @property
    def metrics(self):
        return [self.loss_tracker]


class Blowup(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 1:  # a bad weight update lands: the logits saturate
            head = self.model.logits
            head.kernel.assign(head.kernel * 1e4)


keras.utils.set_random_seed(0)
model = Classifier()
model.compile(optimizer=keras.optimizers.SGD(0.1))
x = np.random.rand(16, 6).astype("float32")
y = np.eye(3, dtype="float32")[np.arange(16) % 3]
model.fit(x, y, epochs=1, batch_size=4, verbose=0, callbacks=[Blowup()])
print("training finished")
