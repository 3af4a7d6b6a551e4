"""`nanscope inspect` and `nanscope repair` on real Keras files: a trained model whose
BatchNormalization moving_variance is poisoned, so predict() is NaN while fit() is not."""

import json

import keras
import numpy as np
import pytest

from nanscope.audit import inspect
from nanscope.cli.main import main


def _model():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(2, name="head")(x)
    m = keras.Model(inp, out)
    m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return m


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("keras")
    rng = np.random.default_rng(0)
    x = rng.random((32, 8, 8, 3), dtype=np.float32)
    m = _model()
    m.fit(x, rng.random((32, 2), dtype=np.float32), batch_size=8, epochs=1, verbose=0)
    m.save(d / "ok.keras")
    m.save_weights(d / "ok.weights.h5")
    var = m.get_layer("bn").moving_variance.numpy().copy()
    var[1] = np.nan
    var[2] = -3.0
    m.get_layer("bn").moving_variance.assign(var)
    assert not np.isfinite(m.predict(x[:4], verbose=0)).all()  # the real failure: inference is NaN
    m.save(d / "bad.keras")
    np.save(d / "x.npy", x)
    return d


def test_clean_keras_file_and_weights_are_silent(files):
    for name in ("ok.keras", "ok.weights.h5"):
        r = inspect(files / name)
        assert r.findings == [], (name, [str(f) for f in r.findings])
        assert r.stats["norm_layers"] == 1 and r.framework == "keras"
    assert inspect(files / "ok.keras").stats["optimizer_tensors"] > 0


def test_poisoned_moving_variance_is_named(files, tmp_path):
    out = tmp_path / "r.json"
    assert main(["inspect", str(files / "bad.keras"), "--json", str(out)]) == 1
    (f,) = json.loads(out.read_text())["findings"]
    assert (
        f["category"] == "corrupt_norm_statistics" and f["where"]["tensor"] == "bn.moving_variance"
    )
    assert f["module"] == "bn" and any("1 NaN of 4" in e for e in f["evidence"])
    assert "nanscope.keras.repair_norm_statistics" in f["fixes"][0]


def test_repair_recalibrates_and_verifies(files, tmp_path, capsys):
    fixed = tmp_path / "fixed.keras"
    rc = main(
        [
            "repair",
            str(files / "bad.keras"),
            "-o",
            str(fixed),
            "--recalibrate-bn",
            "--data",
            str(files / "x.npy"),
            "--batch-size",
            "8",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "verified finite" in out
    assert inspect(fixed).findings == []
    m = keras.saving.load_model(fixed)
    assert np.isfinite(m.predict(np.load(files / "x.npy")[:4], verbose=0)).all()
    assert (
        main(["repair", str(files / "bad.keras"), "-o", str(files / "bad.keras"), "--reset-bn"])
        == 2
    )
    assert (
        main(["repair", str(files / "bad.keras"), "-o", str(tmp_path / "x.h5"), "--reset-bn"]) == 2
    )


def test_reset_bn_fallback(files, tmp_path, capsys):
    out = tmp_path / "reset.keras"
    assert main(["repair", str(files / "bad.keras"), "-o", str(out), "--reset-bn"]) == 0
    assert "accuracy usually drops" in capsys.readouterr().out
    assert inspect(out).findings == []


FACTORY = """
import keras

def make():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(2, name="head")(x))
"""


def test_repair_weights_file_with_model_factory(files, tmp_path, monkeypatch, capsys):
    (tmp_path / "kmodels.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    m = keras.saving.load_model(files / "bad.keras")
    m.save_weights(tmp_path / "bad.weights.h5")
    assert inspect(tmp_path / "bad.weights.h5").exit_code == 1
    rc = main(
        [
            "repair",
            str(tmp_path / "bad.weights.h5"),
            "-o",
            str(tmp_path / "fixed.weights.h5"),
            "--recalibrate-bn",
            "--data",
            str(files / "x.npy"),
            "--model",
            "kmodels:make",
        ]
    )
    assert rc == 0, capsys.readouterr()
    assert inspect(tmp_path / "fixed.weights.h5").findings == []
