"""``nanscope run`` on a script that starts its other ranks in a way nanscope does not follow
(``multiprocessing``): rank 0 sees the NaN of rank 1 arrive through DDP's all-reduce. The
report says so, names no cause it cannot know, and gives the command that watches every rank.
Bounded launch."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

helpers = sys.modules["tests.distributed.conftest"]


def test_a_value_from_an_unwatched_rank_says_how_to_watch_every_rank(tmp_path):
    script, out = str(helpers.WORKERS / "mp_ranks.py"), tmp_path / "r.json"
    cmd = [sys.executable, "-m", "nanscope", "run", "--json", str(out), script]
    run = subprocess.run(
        [*cmd, str(helpers.free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 1 and out.is_file(), run.stderr[-3000:]
    d = json.loads(out.read_text())["diagnosis"]
    assert (d["category"], d["step"]) == ("unknown", 2)
    assert d["details"]["arrived_through"] == "c10d::allreduce_"
    assert any("rank 0 of 2, the only one nanscope run watched" in e for e in d["evidence"])
    assert d["fixes"] == [
        f"watch every rank: run the script as one rank per process under `torchrun "
        f"--nproc-per-node 2 -m nanscope run {script}`; the report then names the rank whose op "
        "made the value"
    ]
