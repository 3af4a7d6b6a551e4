"""`nanscope run` on an unchanged Lightning script: Lightning's automatic optimization calls
optimizer.step(closure), so forward, loss and backward run inside the step. The producer is
found as in a plain loop (it was reported as optimizer_state before the closure was watched)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"


def test_lightning_closure_names_the_log_in_training_step(tmp_path):
    out = tmp_path / "report.json"
    plain = subprocess.run(
        [sys.executable, str(SCRIPTS / "lit_closure_log.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert plain.returncode == 0 and "weights finite: False" in plain.stdout, plain.stderr[-2000:]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanscope",
            "run",
            "--json",
            str(out),
            str(SCRIPTS / "lit_closure_log.py"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    d = json.loads(out.read_text())["diagnosis"]
    assert (d["category"], d["phase"], d["op"], d["op_kind"], d["samples"], d["step"]) == (
        "op_domain",
        "loss",
        "aten::log",
        "log",
        [5],
        2,
    ), d
    assert d["location"]["function"] == "training_step" and d["location"]["file"].endswith(
        "lit_closure_log.py"
    )
    assert (
        "weights finite" not in proc.stdout
    )  # stopped at the failure, before the weights went bad
