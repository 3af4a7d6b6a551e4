"""`nanscope demo`: the built-in segmentation run goes NaN in validation and is diagnosed as
expected (exit 0), with the contract's text and JSON; bad usage exits 2 in one line."""

from __future__ import annotations

import json
import subprocess
import sys

from nanscope.cli.main import main as cli_main


def test_demo_diagnoses_the_empty_validation_mask(tmp_path, capsys):
    out = tmp_path / "demo.json"
    rc = cli_main(
        ["demo", "--steps", "2", "--json", str(out), "--html", str(tmp_path / "demo.html")]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert "validation loss: nan" in text
    assert "nanscope: invalid_target in loss" in text and "0 valid targets" in text
    assert "diagnosed as expected" in text
    d = json.loads(out.read_text())["diagnosis"]
    assert (d["category"], d["phase"], d["op_kind"], d["samples"]) == (
        "invalid_target",
        "loss",
        "cross_entropy",
        [0],
    )
    assert d["details"]["bad_batches"] == [5]
    page = (
        tmp_path / "demo.html"
    ).read_text()  # the report, with the empty frame's mask as a thumbnail
    assert f"report written to {(tmp_path / 'demo.html').as_uri()}" in text
    assert "invalid_target" in page and 'class="thumb mask"' in page and "all ignore_index" in page


def test_demo_unwritable_json_is_one_line_exit_2(tmp_path, capsys):
    rc = cli_main(["demo", "--json", str(tmp_path / "missing" / "x.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cannot write" in err


def test_demo_without_torch_names_the_install_command():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from nanscope.cli.main import main\nsys.exit(main(['demo']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "nanscope: error: torch is not installed; install it with: pip install 'nanscope[torch]'"
    )
