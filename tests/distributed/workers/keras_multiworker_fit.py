"""Plain Keras, no nanscope: ``model.fit`` under tf.distribute.MultiWorkerMirroredStrategy on
2 TF_CONFIG workers. Keras 3.15 fails before the first step (``_maybe_symbolic_build`` hands
``strategy.reduce`` the whole (x, y) batch, which the multi-worker strategy cannot reduce).
Each worker writes rank<task>.json: how fit ended. When Keras fixes it, this says so."""

import json
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

out = Path(sys.argv[1])
strategy = tf.distribute.MultiWorkerMirroredStrategy()
with strategy.scope():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss="mse")
x = np.ones((16, 6), "float32")
try:
    model.fit(x, np.zeros((16, 3), "float32"), batch_size=8, epochs=1, verbose=0)
    error = None
except Exception as err:  # what Keras raises: recorded, not hidden
    error = f"{type(err).__name__}: {str(err).splitlines()[0]}"
result = {"keras": keras.__version__, "tensorflow": tf.__version__, "error": error}
(out / f"rank{strategy.cluster_resolver.task_id}.json").write_text(json.dumps(result))
