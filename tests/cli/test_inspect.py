"""`nanscope inspect` on framework-free formats: safetensors, Keras-layout .keras/.h5 files
written here with h5py (the real Keras files are tested in tests/keras)."""

import io
import json
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest

from nanscope.audit import inspect
from nanscope.audit.checkpoint import read_checkpoint, write_safetensors
from nanscope.cli.main import main


def _weights(poison=False):
    t = {
        "conv.weight": np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32),
        "bn.weight": np.ones(4, np.float32),
        "bn.bias": np.zeros(4, np.float32),
        "bn.running_mean": np.zeros(4, np.float32),
        "bn.running_var": np.full(4, 0.5, np.float32),
        "bn.num_batches_tracked": np.array(7, np.int64),
        "fc.weight": np.full((2, 4), 0.1, np.float32),
    }
    if poison:
        t["bn.running_var"][1] = np.nan
        t["fc.weight"][1, 2] = -np.inf
        t["conv.weight"][0, 0, 0, 0] = 70000.0
    return t


def test_safetensors_findings(tmp_path):
    p = tmp_path / "m.safetensors"
    write_safetensors(p, _weights(poison=True))
    out = tmp_path / "r.json"
    assert main(["inspect", str(p), "--json", str(out)]) == 1
    f = {(x["category"], x["severity"]): x for x in json.loads(out.read_text())["findings"]}
    assert f[("corrupt_norm_statistics", "error")]["where"]["tensor"] == "bn.running_var"
    assert f[("nonfinite_parameters", "error")]["where"]["tensors"] == ["fc.weight"]
    assert f[("overflow", "warning")]["where"]["tensor"] == "conv.weight"
    assert len(f) == 3


def test_clean_safetensors_and_bfloat16(tmp_path, capsys):
    p = tmp_path / "ok.safetensors"
    write_safetensors(p, _weights())
    assert main(["inspect", str(p)]) == 0 and "clean" in capsys.readouterr().out
    # bfloat16 tensor with an Inf, written by hand (numpy has no bfloat16)
    bf = (np.array([1.0, np.inf, 2.0], np.float32).view(np.uint32) >> 16).astype(np.uint16)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    (tmp_path / "bf.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + bf.tobytes()
    )
    ck = read_checkpoint(tmp_path / "bf.safetensors")
    assert ck.dtypes["w"] == "bfloat16" and np.isinf(ck.tensors["w"][1])
    (f,) = inspect(tmp_path / "bf.safetensors").findings
    assert f.category == "nonfinite_parameters" and f.dtype == "bfloat16"


def _keras_zip(path, var):
    buf = io.BytesIO()
    with h5py.File(buf, "w") as h:
        g = h.create_group("layers/batch_normalization/vars")
        g.attrs["name"] = "bn"
        for i, a in enumerate([np.ones(3), np.zeros(3), np.zeros(3), var]):
            g[str(i)] = np.asarray(a, np.float32)
        d = h.create_group("layers/dense/vars")
        d.attrs["name"] = "head"
        d["0"] = np.ones((3, 2), np.float32)
        d["1"] = np.zeros(2, np.float32)
        o = h.create_group("optimizer/vars")
        o.attrs["name"] = "adam"
        o["0"] = np.array(5.0, np.float32)
        o["1"] = np.array(1e-3, np.float32)
    config = {
        "class_name": "Functional",
        "config": {
            "layers": [
                {
                    "class_name": "BatchNormalization",
                    "config": {"name": "bn", "center": True, "scale": True},
                },
                {"class_name": "Dense", "config": {"name": "head"}},
            ]
        },
    }
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", json.dumps(config))
        z.writestr("metadata.json", "{}")
        z.writestr("model.weights.h5", buf.getvalue())


def test_keras_layout_without_keras(tmp_path):
    _keras_zip(tmp_path / "ok.keras", np.ones(3))
    r = inspect(tmp_path / "ok.keras")
    assert r.findings == [] and r.stats["norm_layers"] == 1 and "head" in r.stats["layers"]
    _keras_zip(tmp_path / "bad.keras", np.array([1.0, -2.0, np.nan]))
    (f,) = inspect(tmp_path / "bad.keras").findings
    assert (
        f.category == "corrupt_norm_statistics" and f.where_found["tensor"] == "bn.moving_variance"
    )
    assert f.framework == "keras" and "keras.repair_norm_statistics" in f.fixes[0]
    # Keras's own names, never torch's running_var:
    assert f.evidence == [
        "bn: moving_variance: 1 NaN of 3",
        "bn: moving_variance: 1 negative (min -2)",
    ]


def test_legacy_h5_layout(tmp_path):
    with h5py.File(tmp_path / "old.h5", "w") as h:
        h.attrs["layer_names"] = [b"bn1"]
        h["model_weights/bn1/bn1/moving_variance:0"] = np.array([1.0, np.inf], np.float32)
        h["model_weights/bn1/bn1/moving_mean:0"] = np.zeros(2, np.float32)
    (f,) = inspect(tmp_path / "old.h5").findings
    assert f.where_found["tensor"] == "bn1.moving_variance" and f.evidence == [
        "bn1: moving_variance: 1 +Inf of 2"
    ]


def test_bad_inputs_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "x.txt").write_text("hi")
    (tmp_path / "zip.keras").write_bytes(b"PK\x03\x04 not really")
    for name in ("missing.pt", "empty.safetensors", "x.txt", "zip.keras"):
        assert main(["inspect", str(tmp_path / name), "--json", str(tmp_path / "r.json")]) == 2, (
            name
        )
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "internal error" not in err, err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("kind", ["truncate", "bitflip"])
def test_fuzzed_checkpoints_never_crash(tmp_path, capsys, kind):
    write_safetensors(tmp_path / "a.safetensors", _weights())
    _keras_zip(tmp_path / "a.keras", np.ones(3))
    with h5py.File(tmp_path / "a.h5", "w") as h:
        h["model_weights/bn1/bn1/moving_variance:0"] = np.ones(4, np.float32)
    rng = np.random.default_rng(2)
    for src in ("a.safetensors", "a.keras", "a.h5"):
        data = (tmp_path / src).read_bytes()
        for trial in range(10):
            if kind == "truncate":
                mutated = data[: int(rng.integers(1, len(data)))]
            else:
                b = bytearray(data)
                for _ in range(3):
                    i = int(rng.integers(0, len(b)))
                    b[i] ^= 1 << int(rng.integers(0, 8))
                mutated = bytes(b)
            victim = tmp_path / f"f{trial}{src[1:]}"
            victim.write_bytes(mutated)
            code = main(["inspect", str(victim)])
            err = capsys.readouterr().err
            assert code in (0, 1, 2) and "internal error" not in err and "Traceback" not in err, (
                src,
                trial,
                err,
            )


def test_subprocess_safetensors_imports_no_framework(tmp_path):
    write_safetensors(tmp_path / "m.safetensors", _weights(poison=True))
    code = (
        "import sys; from nanscope.cli.main import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules and 'tensorflow' not in sys.modules; sys.exit(rc)"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, "inspect", str(tmp_path / "m.safetensors")],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 1 and p.stderr == "" and "corrupt_norm_statistics" in p.stdout


def test_h5_without_weights_is_refused(tmp_path, capsys):
    with h5py.File(tmp_path / "data.h5", "w") as h:
        h.create_group("nothing/here")
    assert main(["inspect", str(tmp_path / "data.h5")]) == 2
    assert "no model weights" in capsys.readouterr().err
