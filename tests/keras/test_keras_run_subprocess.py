"""`nanscope run` as users run it (a subprocess): healthy scripts are untouched bit for bit,
Keras on the torch backend is left to the PyTorch runner, and the seed 002 scenario, unchanged,
is diagnosed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).parent / "scripts"
SEED_002 = (
    Path(__file__).resolve().parents[3]
    / "shared"
    / "seeds"
    / "scenarios"
    / "s002_resnet101v2_predict_nan.py"
)
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONHASHSEED": "0"}


def python(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or ENV,
    )


def _nanscope_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "nanscope" in line]


@pytest.mark.parametrize(
    "script",
    [
        "healthy_functional.py",
        "healthy_sequential.py",
        "healthy_subclassed.py",
    ],
)
def test_healthy_script_is_unchanged_bit_for_bit(tmp_path, script):
    plain = python(SCRIPTS / script, tmp_path / "plain.npy")
    watched = python(
        "-m",
        "nanscope",
        "run",
        "--json",
        tmp_path / "r.json",
        SCRIPTS / script,
        tmp_path / "watched.npy",
    )
    assert plain.returncode == 0, plain.stderr
    assert watched.returncode == plain.returncode, watched.stderr
    assert watched.stdout == plain.stdout and watched.stdout
    assert _nanscope_lines(watched.stderr) == []
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "clean"
    a, b = np.load(tmp_path / "plain.npy"), np.load(tmp_path / "watched.npy")
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


TORCH_ENV = {**ENV, "KERAS_BACKEND": "torch"}


def test_keras_on_the_torch_backend_is_left_to_the_torch_runner(tmp_path):
    """The Keras runner steps aside (no TypeError from the guard, no import of nanscope.keras);
    the script's output and exit status are its own. The process never imports torchvision."""
    script = SCRIPTS / "torch_backend_fit.py"
    plain = python(script, env=TORCH_ENV)
    watched = python("-m", "nanscope", "run", "--json", tmp_path / "r.json", script, env=TORCH_ENV)
    assert plain.returncode == 0, plain.stderr
    assert "backend torch" in plain.stdout
    assert watched.returncode == 0 and watched.stdout == plain.stdout, watched.stderr
    assert "TypeError" not in watched.stderr and "nanscope.keras" not in watched.stderr
    assert json.loads((tmp_path / "r.json").read_text())["framework"] == "torch"


def test_keras_guard_on_the_torch_backend_steps_aside_with_one_warning():
    proc = python(SCRIPTS / "torch_backend_guard.py", env=TORCH_ENV)
    assert proc.returncode == 0, proc.stderr
    assert "backend torch loss" in proc.stdout and "TypeError" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "RuntimeWarning" in line] == [
        line
        for line in proc.stderr.splitlines()
        if "nanscope.keras.Guard supports the TensorFlow backend only" in line
    ]
    assert "nanscope.keras.Guard supports the TensorFlow backend only" in proc.stderr


def test_keras_on_the_torch_backend_nan_input_is_diagnosed(tmp_path):
    """Keras 3 on the torch backend is watched by the torch runner (meta tensors Keras builds
    its model with hold no values and are not checked)."""
    proc = python(
        "-m",
        "nanscope",
        "run",
        "--json",
        tmp_path / "r.json",
        SCRIPTS / "torch_backend_fit.py",
        "--nan",
        env=TORCH_ENV,
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert proc.returncode == 1, proc.stderr
    assert report["status"] == "nonfinite" and report["framework"] == "torch"
    assert (
        report["diagnosis"]["category"] == "nonfinite_input"
        and report["diagnosis"]["phase"] == "data"
    )
    assert "internal error" not in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    not SEED_002.exists(), reason="the seed scenarios are not checked out beside this repository"
)
def test_seed_002_resnet101v2_predict_nan_unchanged(tmp_path):
    """About 90 s on the 2-core VM (ResNet101V2 fit in mixed_float16 on CPU); the diagnosis ~5 s."""
    proc = python("-m", "nanscope", "run", "--json", tmp_path / "r.json", SEED_002, timeout=900)
    assert proc.returncode == 1, proc.stderr[-3000:]
    d = json.loads((tmp_path / "r.json").read_text())["diagnosis"]
    assert (
        d["category"] == "corrupt_norm_statistics"
        and d["phase"] == "state"
        and d["op_kind"] == "batch_norm"
    )
    assert d["module"] in ("post_bn", "conv5_block3_2_bn")
    assert set(d["details"]["layers"]) == {"post_bn", "conv5_block3_2_bn"}
    assert d["samples"] == [0, 1, 2, 3]
    assert d["evidence"][0] == "in model.predict, batch 0 (inference)"
    assert "prediction finite" not in proc.stdout
