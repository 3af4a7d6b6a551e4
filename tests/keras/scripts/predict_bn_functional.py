"""Notebook style: a functional CNN trains, then a BatchNormalization's moving variance is
overwritten by a bad checkpoint merge (negative values): ``model.predict`` is NaN."""

import keras
import numpy as np

keras.utils.set_random_seed(0)
inputs = keras.Input((8, 8, 3))
h = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
h = keras.layers.BatchNormalization(name="conv_bn")(h)
h = keras.layers.ReLU()(h)
h = keras.layers.GlobalAveragePooling2D()(h)
outputs = keras.layers.Dense(3, name="logits")(h)
model = keras.Model(inputs, outputs)
model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
x = np.random.rand(40, 8, 8, 3).astype("float32")
y = np.random.randint(0, 3, 40)
model.fit(x, y, epochs=1, batch_size=8, verbose=0)
bn = model.get_layer("conv_bn")
gamma, beta, mean, var = bn.get_weights()
var[1] = -4.0  # a variance below -epsilon: rsqrt of a negative number
bn.set_weights([gamma, beta, mean, var])
pred = model.predict(x, batch_size=16, verbose=0)
print("prediction finite:", bool(np.isfinite(pred).all()))
