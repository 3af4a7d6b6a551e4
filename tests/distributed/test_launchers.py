"""Launchers: torchrun (``python -m torch.distributed.run``) starting a guarded DDP script, and
starting ``nanscope run`` on every rank (``--no-python nanscope run`` and ``-m nanscope run``),
which writes ONE report of all ranks naming the rank that saw the NaN first. Every launch is
bounded (subprocess timeouts), so a hang fails the test instead of CI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

# The suite's conftest, under the name pytest's importlib mode gives it.
helpers = sys.modules["tests.distributed.conftest"]
ROOT, WORKERS, free_port = helpers.ROOT, helpers.WORKERS, helpers.free_port

NANSCOPE = [sys.executable, "-m", "nanscope"]


def _env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **extra}


def torchrun(*args: str, timeout: float = 150, env: dict | None = None):
    """``torchrun --nproc-per-node 2 ARGS...`` on localhost, at most ``timeout`` seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env or _env()
    )


def test_torchrun_guarded_script(tmp_path):
    run = torchrun(str(WORKERS / "torchrun_train.py"), str(tmp_path), "guard")
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


def _report(run, out: Path) -> dict:
    assert out.is_file(), run.stderr[-4000:]
    return json.loads(out.read_text())


def test_nanscope_run_under_torchrun_names_the_rank(tmp_path):
    """DDP, rank 1's batch of step 2 holds a NaN: rank 1 stops at the model's output; rank 0 is
    left waiting in the gradient all-reduce and answers from there that it saw nothing."""
    out = tmp_path / "out.json"
    script = WORKERS / "ddp_train.py"
    start = time.monotonic()
    run = torchrun("--no-python", str(Path(sys.executable).parent / "nanscope"), "run",
                   str(script), "--bad-batch", "1:2", "--json", str(out))  # fmt: skip
    took = time.monotonic() - start
    doc = _report(run, out)
    assert run.returncode == 1, run.stderr[-3000:]
    d = doc["diagnosis"]
    assert (doc["status"], d["category"], d["phase"], d["step"]) == (
        "nonfinite",
        "nonfinite_input",
        "data",
        2,
    )
    assert d["ranks"] == [1] and d["samples"] == [3]
    assert doc["first"] == {
        "ranks": [1],
        "decided_by": "only",
        "why": "the only rank that saw a non-finite value",
    }
    r0, r1 = doc["per_rank"]
    assert r0["status"] == "clean" and r0["state"] in ("running", "raised"), r0
    assert (r1["status"], r1["step"], r1["first"]) == ("nonfinite", 2, True)
    # One report on the terminal (rank 1's), and rank 0's broken collective in one line.
    assert run.stderr.count("  per rank\n") == 1, run.stderr[-4000:]
    assert "rank 0  clean" in run.stderr and "rank 1  nonfinite" in run.stderr
    assert "_engine_run_backward" not in run.stderr  # no traceback of the broken all-reduce
    # Each rank's own result is beside the report, complete (written atomically).
    per_rank = {p.name: json.loads(p.read_text()) for p in (tmp_path / "out.ranks").glob("rank*")}
    assert per_rank["rank1.json"]["status"] == "nonfinite", per_rank
    print(f"torchrun --no-python nanscope run, 2 ranks: {took:.1f} s")


def test_both_ranks_fail_at_different_steps(tmp_path):
    """A seed sweep (ranks not in lock-step): rank 0 hits its NaN at step 3 first by the clock,
    rank 1 (slower) at step 1 later. The lower step decides: rank 1 saw it first."""
    out = tmp_path / "sweep.json"
    run = torchrun("-m", "nanscope", "run", str(WORKERS / "seed_sweep.py"),
                   "--bad-batch", "0:3", "--bad-batch", "1:1", "--slow", "1:1.5",
                   "--json", str(out))  # fmt: skip
    doc = _report(run, out)
    assert run.returncode == 1, run.stderr[-3000:]
    assert doc["diagnosis"]["ranks"] == [1] and doc["diagnosis"]["step"] == 1
    assert doc["first"]["decided_by"] == "step", doc["first"]
    assert "rank 1 saw it first: it failed at step 1, the earliest step" in "\n".join(
        doc["diagnosis"]["evidence"]
    )
    r0, r1 = doc["per_rank"]
    assert (r0["status"], r0["step"], r0["first"]) == ("nonfinite", 3, False)
    assert (r1["status"], r1["step"], r1["first"]) == ("nonfinite", 1, True)
    seen = {r: json.loads((tmp_path / "sweep.ranks" / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert seen[0]["seen_at"] < seen[1]["seen_at"]  # the clock alone would have named rank 0


def test_a_rank_that_died_is_named_missing(tmp_path):
    """A launcher that does not stop the other ranks (srun, a bare shell loop): rank 0 is
    killed at step 2, rank 1's batch of step 2 holds a NaN. Rank 1 waits for rank 0's answer
    at most NANSCOPE_RANK_TIMEOUT seconds, then names it as missing."""
    out, port = tmp_path / "out.json", str(free_port())
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, NANSCOPE_RANK_TIMEOUT="3")  # fmt: skip
        cmd = [*NANSCOPE, "run", "--json", str(out), str(WORKERS / "ddp_train.py")]
        cmd += ["--bad-batch", "1:2", "--die", "0:2"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True))
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == -signal.SIGKILL
    assert procs[1].returncode == 1, errs[1][-3000:]
    doc = _report(procs[1], out) if out.is_file() else pytest.fail(errs[1][-3000:])
    assert doc["diagnosis"]["ranks"] == [1] and doc["missing_ranks"] == [0]
    r0 = doc["per_rank"][0]
    assert r0["status"] == "missing" and "did not answer after rank 1 stopped" in r0["note"]
    assert "rank 0  missing" in errs[1]


def test_clean_run_under_torchrun(tmp_path):
    """No NaN: every rank's exit status is kept (0) and the report lists both ranks clean."""
    out = tmp_path / "out.json"
    run = torchrun("-m", "nanscope", "run", str(WORKERS / "ddp_train.py"), "--json", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    doc = _report(run, out)
    assert doc["status"] == "clean" and doc["diagnosis"] is None
    # Each rank writes its result before the report; the report written last saw both.
    assert [(e["status"], e["state"]) for e in doc["per_rank"]] == [("clean", "finished")] * 2
    assert "per rank" not in run.stderr
