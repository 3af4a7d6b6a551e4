"""Keras mixed precision on real CPU runs: headroom flags the T5 `wo` layer, LossScaleOptimizer forensics."""

import sys
import warnings

import keras
import numpy as np
import pytest

from nanscope.core.enums import Category, Phase
from nanscope.keras.amp import LossScaleMonitor, headroom


def t5_block(wo_scale, dtype="float32"):
    """A T5-like feed-forward block (wi -> relu -> wo, residual) whose wo output grows with its kernel."""
    keras.utils.set_random_seed(0)
    x = keras.Input((16,))
    h = keras.layers.LayerNormalization(name="norm", dtype=dtype)(x)
    h = keras.layers.Dense(64, activation="relu", use_bias=False, name="wi", dtype=dtype)(h)
    h = keras.layers.Dense(16, use_bias=False, name="wo", dtype=dtype)(h)
    h = keras.layers.Add(name="residual", dtype=dtype)([x, h])
    h = keras.layers.LayerNormalization(name="final_norm", dtype=dtype)(h)
    out = keras.layers.Dense(4, name="head", dtype="float32")(h)
    model = keras.Model(x, out)
    wo = model.get_layer("wo")
    wo.kernel.assign(wo.kernel.numpy() * wo_scale)
    return model


def batch():
    rng = np.random.default_rng(1)
    return rng.normal(size=(16, 16)).astype("float32"), rng.integers(0, 4, (16,))


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_headroom_flags_wo_before_float16_overflows(tmp_path):
    model = t5_block(13000.0)
    x, y = batch()
    weights = [w.copy() for w in model.get_weights()]
    report = headroom(model, (x, y), LOSS)
    top = report.layers[0]
    assert top.name == "wo" and top.status == "danger" and 4096 < top.act_absmax < 65504
    assert (
        report["head"].status == "ok"
        and 0 < top.grad_absmax < np.inf
        and 0 <= top.grad_underflow <= 1
    )
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights(), strict=True))
    assert report.to_dict()["layers"][0]["name"] == "wo" and "wo" in str(report)
    report.plot(tmp_path / "headroom.png")
    assert (tmp_path / "headroom.png").stat().st_size > 1000
    # The warning was right: the same block in mixed_float16 with a little more growth overflows there.
    mixed = t5_block(50000.0, dtype="mixed_float16")
    half = headroom(mixed, (x, y), LOSS)
    assert half.layers[0].name == "wo" and half.layers[0].status == "overflow"
    assert half["wi"].status == "ok"
    assert "torch" not in sys.modules


def _fit(model, monitor, steps, initial_scale):
    x, y = batch()
    opt = keras.mixed_precision.LossScaleOptimizer(
        keras.optimizers.SGD(0.01), initial_scale=initial_scale
    )
    model.compile(optimizer=opt, loss=LOSS, jit_compile=False)
    model.fit(
        np.tile(x, (steps, 1)),
        np.tile(y, steps),
        batch_size=16,
        epochs=1,
        verbose=0,
        callbacks=[monitor],
        shuffle=False,
    )


def test_loss_scale_monitor_diagnoses_a_collapsing_scale():
    model = t5_block(50000.0, dtype="mixed_float16")
    monitor = LossScaleMonitor(batch=batch())
    with pytest.warns(RuntimeWarning, match="loss scale collapsed"):
        _fit(model, monitor, 6, initial_scale=8.0)
    assert monitor.skipped == [0, 1, 2, 3, 4, 5] and monitor.scales[:3] == [4.0, 2.0, 1.0]
    d = monitor.diagnosis
    assert d.category is Category.OVERFLOW and d.dtype == "float16" and d.framework == "keras"
    assert d.phase is Phase.FORWARD and "headroom" in d.fixes[0] and "bfloat16" in d.fixes[1]
    assert any("wo" in p for p in d.details["bad_parameters"])
    assert "6 of 6 steps skipped" in monitor.summary()


def test_loss_scale_monitor_is_silent_on_a_healthy_run():
    model = t5_block(1.0, dtype="mixed_float16")
    monitor = LossScaleMonitor()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _fit(model, monitor, 4, initial_scale=2.0**15)
    assert monitor.diagnosis is None and monitor.skipped == [] and len(monitor.scales) == 4
