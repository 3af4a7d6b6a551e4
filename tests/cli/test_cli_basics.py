"""The CLI shell: one-line errors with exit 2, script pass-through, clean runs are silent."""

import json
import subprocess
import sys

from nanscope.cli.main import main


def test_missing_script_is_one_line_exit_2(capsys, tmp_path):
    assert main(["run", str(tmp_path / "nope.py")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def test_unwritable_json_fails_before_running(capsys, tmp_path):
    script = tmp_path / "s.py"
    marker = tmp_path / "ran"
    script.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    assert main(["run", "--json", str(tmp_path / "no" / "x.json"), str(script)]) == 2
    assert not marker.exists()


def test_clean_script_keeps_its_exit_status_and_argv(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import sys\nprint(sys.argv[1:])\nsys.exit(3)\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanscope",
            "run",
            str(script),
            "--lr",
            "1",
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 3, out.stderr
    assert out.stdout.strip() == "['--lr', '1']" and out.stderr == ""
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "clean"


def test_bad_usage_is_exit_2():
    out = subprocess.run(
        [sys.executable, "-m", "nanscope", "frobnicate"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_closed_pipe_is_quiet(tmp_path):
    """`nanscope ... | head` must not print an internal error when head stops reading."""
    import numpy as np

    arr = np.random.default_rng(0).normal(size=(64, 3, 4, 4)).astype("float32")
    arr[5, 0, 0, 0] = np.nan
    np.save(tmp_path / "x.npy", arr)
    out = subprocess.run(
        f"{sys.executable} -m nanscope data {tmp_path / 'x.npy'} | head -c 1",
        shell=True,
        capture_output=True,
        text=True,
    )
    assert "internal error" not in out.stderr and "Traceback" not in out.stderr
