"""`nanscope run` on TensorFlow/Keras scripts, unchanged, in a subprocess: same JSON contract."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"


def run(tmp_path, script, *args):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "nanscope", "run", "--json", str(out), str(SCRIPTS / script), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    return proc, json.loads(out.read_text())


def test_fit_seed_is_diagnosed_with_the_contract_json(tmp_path):
    proc, report = run(tmp_path, "fit_seed.py")
    assert proc.returncode == 1, proc.stderr
    assert report["status"] == "nonfinite" and report["framework"] == "keras"
    d = report["diagnosis"]
    assert d["category"] == "nonfinite_input" and d["phase"] == "data" and d["step"] == 0
    assert d["samples"] == list(range(16))
    assert "training finished" not in proc.stdout
    assert "nonfinite_input" in proc.stderr and "Traceback" not in proc.stderr


def test_clean_script_keeps_its_exit_status_and_reports_clean(tmp_path):
    proc, report = run(tmp_path, "fit_seed.py", "--clean", "--exit3")
    assert proc.returncode == 3, proc.stderr
    assert report == {"schema": 1, "status": "clean", "framework": "keras", "diagnosis": None}
    assert "training finished" in proc.stdout and "nanscope" not in proc.stderr


def test_clean_compiled_loop_is_silent(tmp_path):
    proc, report = run(tmp_path, "compiled_loop.py", "--clean")
    assert proc.returncode == 0, proc.stderr
    assert (
        report["status"] == "clean"
        and "training finished" in proc.stdout
        and "nanscope" not in proc.stderr
    )


def test_custom_gradient_tape_loop_names_the_log(tmp_path):
    proc, report = run(tmp_path, "custom_loop.py")
    assert proc.returncode == 1, proc.stderr
    d = report["diagnosis"]
    assert (
        d["category"] == "op_domain"
        and d["phase"] == "loss"
        and d["op"] == "Log"
        and d["op_kind"] == "log"
    )
    assert d["step"] == 2
    assert (
        d["location"]["file"].endswith("custom_loop.py")
        and d["location"]["function"] == "handwritten"
    )


def test_compiled_custom_loop_is_replayed_eagerly_and_explained(tmp_path):
    proc, report = run(tmp_path, "compiled_loop.py")
    assert proc.returncode == 1, proc.stderr
    d = report["diagnosis"]
    assert (
        d["category"] == "singular_gradient" and d["phase"] == "backward" and d["op"] == "SqrtGrad"
    )
    assert d["module"] == "distance" and d["samples"] == [4] and d["step"] == 3
    assert (
        d["location"]["file"].endswith("compiled_loop.py") and d["location"]["function"] == "call"
    )
    assert "training finished" not in proc.stdout


def test_eager_loop_with_bad_inputs_is_nonfinite_input(tmp_path):
    proc, report = run(tmp_path, "loop_bad_input.py")
    assert proc.returncode == 1, proc.stderr
    d = report["diagnosis"]
    assert (
        d["category"] == "nonfinite_input" and d["phase"] == "data" and d["samples"] == [0, 1, 2, 3]
    )
