"""The std/var-over-one-element rule (core) seen from Keras: TensorFlow's sample standard
deviation (``tf.experimental.numpy.var(ddof=1)``) divides by N - 1 in a ``RealDiv``, so the
producer is that division, 0/0, in the layer that called it; ``keras.ops.std`` and
``tf.math.reduce_std`` are population statistics and never reach it."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"


def test_sample_std_over_the_last_batch_of_one(tmp_path):
    out = tmp_path / "report.json"
    plain = subprocess.run(
        [sys.executable, str(SCRIPTS / "std_last_batch.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert plain.returncode == 0 and "final weights finite: False" in plain.stdout, plain.stderr
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanscope",
            "run",
            "--json",
            str(out),
            str(SCRIPTS / "std_last_batch.py"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert proc.returncode == 1, proc.stderr
    d = json.loads(out.read_text())["diagnosis"]
    assert (d["category"], d["phase"], d["op_kind"], d["module"], d["step"]) == (
        "op_domain",
        "forward",
        "div",
        "standardize",
        2,
    ), d
    assert "0/0" in d["summary"] and d["samples"] == [0]
    assert (
        d["location"]["file"].endswith("std_last_batch.py") and d["location"]["function"] == "call"
    )
