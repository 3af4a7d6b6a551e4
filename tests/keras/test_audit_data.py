"""`nanscope.data.audit` on a tf.data.Dataset, batched and unbatched, without importing torch."""

import sys

import numpy as np
import tensorflow as tf

from nanscope.data import audit


def _arrays():
    rng = np.random.default_rng(0)
    x = rng.random((12, 4, 4, 3), dtype=np.float32)
    x[5, 0, 0, 0] = np.inf
    y = np.eye(3, dtype=np.float32)[np.arange(12) % 3]
    y[8] = [0.5, 0.4, 0.3]  # soft label row that sums to 1.2
    return x, y


def test_tf_dataset_batched_and_unbatched():
    x, y = _arrays()
    for ds in (
        tf.data.Dataset.from_tensor_slices((x, y)),
        tf.data.Dataset.from_tensor_slices((x, y)).batch(5),
    ):
        r = audit(ds)
        (nan,) = [f for f in r.findings if f.category == "nonfinite_input"]
        (soft,) = [f for f in r.findings if f.category == "invalid_target"]
        assert nan.samples == [5] and soft.samples == [8] and "1.2" in soft.evidence[0]
        assert r.framework == "keras" and r.stats["samples"] == 12
    assert "torch" not in sys.modules
