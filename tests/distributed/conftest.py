"""Multi-process helpers: every test launches real worker processes (gloo on localhost, or
TF_CONFIG workers) with bounded waits, so a broken test fails instead of hanging CI.

The workers are plain scripts under ``workers/``; each rank writes ``rank<R>.json`` into the
test's tmp folder. One process per rank (no ``mp.spawn``): a rank can then die on its own
(the kill test) while the others are watched.

Every torch worker drops what holds its process group (the DDP / FSDP model, the device mesh,
the Guard) and runs the garbage collector before ``destroy_process_group()``. A group still
alive then is torn down while Python shuts down, and a gloo worker thread that is just
releasing the last all-reduce needs the GIL to free it: Python ends that thread, and the
process aborts with "terminate called without an active exception" (gdb: ``~AsyncWork`` ->
``SafePyObject`` decref -> ``take_gil`` -> ``pthread_exit`` -> ``std::terminate``). That is
torch 2.14.1 on its own: without nanscope, ddp_train.py exited that way in 5 of 20 runs here,
tp_train.py in 5 of 15, fsdp2_train.py in 4 of 15; with the lines, 0 of 24."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKERS = Path(__file__).parent / "workers"
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks(list):
    """The ranks' (returncode, output) after a launch, and their JSON results."""

    def __init__(self, procs, out: Path) -> None:
        super().__init__(procs)
        self.out = out

    def result(self, rank: int) -> dict:
        return json.loads((self.out / f"rank{rank}.json").read_text())

    def results(self) -> list[dict]:
        return [self.result(r) for r in range(len(self))]


def launch(
    worker: str, world: int, out: Path, *args: str, timeout: float = 150, env: dict | None = None
) -> Ranks:
    """Start ``world`` processes of ``workers/<worker>`` (RANK / WORLD_SIZE / MASTER_* set) and
    wait for all of them, at most ``timeout`` seconds in all; on a timeout every rank still
    running is killed and the test fails with their output."""
    port = free_port()
    procs = []
    for rank in range(world):
        e = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            PYTHONHASHSEED="0",
            PYTHONFAULTHANDLER="1",
            TF_CPP_MIN_LOG_LEVEL="2",
            OMP_NUM_THREADS="1",
            **(env or {}),
        )
        log = open(out / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(WORKERS / worker), str(out), *args],
                    cwd=ROOT,
                    env=e,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    deadline = time.monotonic() + timeout
    done = []
    try:
        for p, _log in procs:
            try:
                rc = p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q, _ in procs:
                    q.kill()
                logs = "\n".join(
                    f"--- rank {r}\n{(out / f'rank{r}.log').read_text()[-2500:]}"
                    for r in range(world)
                )
                pytest.fail(f"{worker}: ranks still running after {timeout} s, killed\n{logs}")
            done.append(rc)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
            log.close()
    return Ranks([(rc, (out / f"rank{r}.log").read_text()) for r, rc in enumerate(done)], out)


def assert_ok(ranks: Ranks) -> None:
    for r, (rc, log) in enumerate(ranks):
        assert rc == 0, f"rank {r} exited {rc}\n{log[-3000:]}"


@pytest.fixture
def ranks_of():
    """``ranks_of(worker, world, tmp_path, *args, timeout=..., ok=True)``: launch and (by default)
    assert that every rank exited 0."""

    def run(worker: str, world: int, out: Path, *args: str, ok: bool = True, **kw) -> Ranks:
        ranks = launch(worker, world, out, *args, **kw)
        if ok:
            assert_ok(ranks)
        return ranks

    return run
