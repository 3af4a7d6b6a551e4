"""torchrun (``python -m torch.distributed.run``) starting a guarded DDP script: every rank
takes the same decision and names rank 1. The launch is bounded."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")


def test_torchrun_guarded_script(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers, root = Path(__file__).parent / "workers", Path(__file__).resolve().parents[2]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        str(workers / "torchrun_train.py"),
        str(tmp_path),
        "guard",
    ]
    run = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=150,
        cwd=root,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["local_rank"] for r in results] == ["0", "1"]
    for r in results:
        d = r["diagnosis"]
        assert r["skipped"] == 1 and (d["category"], d["ranks"], d["step"]) == (
            "nonfinite_input",
            [1],
            2,
        )
