"""`nanscope show` without any framework: a hand-written bundle is printed; missing, foreign,
truncated or corrupt bundles are a one-line error with exit 2; torch is never imported."""

import hashlib
import json
import subprocess
import sys

import pytest

from nanscope.cli.main import main
from nanscope.core.diagnosis import Diagnosis


def make_bundle(folder, state=b"\x80\x02fake tensor bytes" * 8):
    folder.mkdir()
    (folder / "state.pt").write_bytes(state)
    d = Diagnosis(
        "op_domain",
        "log received 1 zero (sample 3)",
        phase="loss",
        op="aten::log",
        samples=[3],
        step=17,
        evidence=["log input: float32[8]: min 0, max 0.9, 1 zero"],
        fixes=["clamp the argument"],
        framework="torch",
        bundle=str(folder),
    )
    doc = d.to_dict()
    doc["bundle"] = {
        "format": 1,
        "created": "2026-11-22T03:00:00Z",
        "torch": "2.14.1",
        "state_file": "state.pt",
        "state_bytes": len(state),
        "state_sha256": hashlib.sha256(state).hexdigest(),
        "model_tensors": 4,
        "model_parameters": 1234,
        "optimizer": "SGD",
        "optimizer_state_tensors": 0,
        "batch": ["batch[0]: float32[8, 3]"],
        "left_out": [],
        "rng": ["cpu"],
    }
    (folder / "diagnosis.json").write_text(json.dumps(doc))
    return folder


def test_show_prints_diagnosis_and_contents(tmp_path, capsys):
    b = make_bundle(tmp_path / "b")
    assert main(["show", str(b)]) == 0
    out = capsys.readouterr().out
    assert "op_domain in loss, step 17" in out and "aten::log" in out and "samples   3" in out
    assert (
        "1,234 parameters" in out and "batch[0]: float32[8, 3]" in out and "SHA-256 verified" in out
    )
    assert main(["show", str(b / "diagnosis.json"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (
        doc["status"] == "nonfinite"
        and doc["diagnosis"]["category"] == "op_domain"
        and doc["bundle"]["format"] == 1
    )


@pytest.mark.parametrize(
    "damage",
    [
        "missing",
        "plain_file",
        "empty_dir",
        "truncated_state",
        "corrupt_state",
        "truncated_json",
        "no_state",
    ],
)
def test_bad_bundles_are_one_line_exit_2(tmp_path, capsys, damage):
    b = make_bundle(tmp_path / "b")
    target = b
    if damage == "missing":
        target = tmp_path / "nope"
    elif damage == "plain_file":
        target = tmp_path / "x.txt"
        target.write_text("hello")
    elif damage == "empty_dir":
        target = tmp_path / "empty"
        target.mkdir()
    elif damage == "truncated_state":
        (b / "state.pt").write_bytes((b / "state.pt").read_bytes()[:10])
    elif damage == "corrupt_state":
        data = bytearray((b / "state.pt").read_bytes())
        data[5] ^= 0xFF
        (b / "state.pt").write_bytes(bytes(data))
    elif damage == "truncated_json":
        text = (b / "diagnosis.json").read_text()
        (b / "diagnosis.json").write_text(text[: len(text) // 2])
    elif damage == "no_state":
        (b / "state.pt").unlink()
    before = {p: p.read_bytes() for p in b.iterdir()}
    assert main(["show", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nanscope: error:")
    assert {p: p.read_bytes() for p in b.iterdir()} == before  # never touches the user's files


def test_show_as_a_subprocess_imports_no_framework(tmp_path):
    b = make_bundle(tmp_path / "b")
    code = (
        "import sys; from nanscope.cli.main import main; rc = main(['show', sys.argv[1]]); "
        "assert 'torch' not in sys.modules and 'tensorflow' not in sys.modules, 'framework imported'; sys.exit(rc)"
    )
    ok = subprocess.run([sys.executable, "-c", code, str(b)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    (b / "state.pt").write_bytes(b"short")
    bad = subprocess.run(
        [sys.executable, "-m", "nanscope", "show", str(b)], capture_output=True, text=True
    )
    assert (
        bad.returncode == 2
        and bad.stderr.count("\n") == 1
        and "truncated" in bad.stderr
        and "Traceback" not in bad.stderr
    )
