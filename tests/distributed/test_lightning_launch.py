"""``nanscope run`` on an unchanged Lightning DDP script (2 CPU processes, gloo), with a NaN in
rank 1's data only.

Under ``torchrun --nproc-per-node 2 -m nanscope run`` every rank is watched and the report
names rank 1, its step and sample. Run as ``nanscope run script.py``, Lightning starts rank 1
itself by running the script again: that rank is started under nanscope run too
(nanscope.cli.relaunch), and the report is the same. A healthy run prints and exits as without
nanscope. Every launch is bounded."""

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("pytorch_lightning")

helpers = sys.modules["tests.distributed.conftest"]
SCRIPT = str(helpers.WORKERS / "lit_ddp_train.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _report(tmp_path, cmd: list[str]) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "report.json"
    run = subprocess.run(
        [*cmd, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env=ENV,
    )
    assert run.returncode == 1 and out.is_file(), run.stderr[-3000:]
    assert "internal error" not in run.stderr
    return run, json.loads(out.read_text())


def _torchrun(*args: str) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    return [*cmd, "--master-addr", "127.0.0.1", "--master-port", str(helpers.free_port()), *args]


@pytest.fixture(scope="module")
def truth() -> tuple[int, list[int]]:
    """(step, rows) where rank 1 meets the NaN: the script's own print, without nanscope."""
    run = subprocess.run(
        _torchrun(SCRIPT), capture_output=True, text=True, timeout=180, cwd=helpers.ROOT, env=ENV
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = re.findall(r"rank 1 batch (\d+): bad rows (\[[\d, ]*\])", run.stdout)
    assert found and "rank 0 batch" not in run.stdout
    return int(found[0][0]), json.loads(found[0][1])


def test_every_rank_watched_under_torchrun(tmp_path, truth):
    _, doc = _report(tmp_path, _torchrun("-m", "nanscope", "run", SCRIPT))
    d = doc["diagnosis"]
    assert (d["category"], d["phase"], d["ranks"], d["step"], d["samples"]) == (
        "nonfinite_input",
        "data",
        [1],
        *truth,
    )
    assert d["details"]["dataset_rows"] == [27]


def test_the_rank_lightning_starts_itself_is_watched_too(tmp_path, truth):
    run, doc = _report(tmp_path, [sys.executable, "-m", "nanscope", "run", SCRIPT])
    d = doc["diagnosis"]
    assert (d["category"], d["phase"], d["ranks"], d["step"], d["samples"]) == (
        "nonfinite_input",
        "data",
        [1],
        *truth,
    )
    assert {r["rank"]: r["status"] for r in doc["per_rank"]} == {0: "clean", 1: "nonfinite"}
    assert "rank 1 saw it first" in run.stderr and "Traceback" not in run.stderr


def test_healthy_self_launched_run_is_unchanged(tmp_path):
    def launch(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*cmd, SCRIPT, "--clean"],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=tmp_path,
            env=ENV,
        )

    plain = launch(sys.executable)
    watched = launch(sys.executable, "-m", "nanscope", "run", "--json", str(tmp_path / "r.json"))
    assert (watched.returncode, plain.returncode) == (0, 0), watched.stderr[-3000:]
    # the same output (both ranks print, in either order), and so the same final weights
    lines = sorted(plain.stdout.splitlines())
    assert sorted(watched.stdout.splitlines()) == lines
    assert [x.split(":")[0] for x in lines] == ["rank 0", "rank 1"]
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "clean"
