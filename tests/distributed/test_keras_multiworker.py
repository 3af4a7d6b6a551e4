"""The Keras Guard under tf.distribute.MultiWorkerMirroredStrategy: 2 worker processes on
localhost, each with its own TF_CONFIG, one CPU replica each (TensorFlow runs in the workers
only, never in the pytest process).

Keras 3.15's ``model.fit`` fails under this strategy with or without nanscope
(``test_keras_fit_fails_under_multiworker_without_nanscope`` records it), so the guarded run
is a custom training loop (``strategy.run``) with the Guard driven by ``CallbackList``."""

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


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def launch_tf_workers(worker: str, out: Path, n: int = 2, timeout: float = 90) -> list[dict]:
    """Start ``n`` TF_CONFIG workers of ``workers/<worker>``, wait at most ``timeout`` seconds in
    all (every worker still running then is killed and the test fails with their logs), and
    return each worker's rank<i>.json."""
    cluster = {"worker": [f"localhost:{p}" for p in _free_ports(n)]}
    procs, logs = [], []
    for i in range(n):
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
            TF_CPP_MIN_LOG_LEVEL="2",
            PYTHONFAULTHANDLER="1",
            OMP_NUM_THREADS="1",
        )
        logs.append(open(out / f"worker{i}.log", "w"))  # noqa: SIM115 - closed below
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKERS / worker), str(out)],
                cwd=ROOT,
                env=env,
                stdout=logs[-1],
                stderr=subprocess.STDOUT,
            )
        )
    deadline = time.monotonic() + timeout
    try:
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for log in logs:
            log.close()
    text = {i: (out / f"worker{i}.log").read_text()[-3000:] for i in range(n)}
    if len(codes) < n or None in codes:
        pytest.fail(f"{worker}: workers still running after {timeout} s, killed\n{text}")
    for i, rc in enumerate(codes):
        assert rc == 0, f"worker {i} exited {rc}\n{text[i]}"
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(n)]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    return launch_tf_workers("keras_multiworker.py", tmp_path_factory.mktemp("mwms"))


def test_multiworker_workers_keep_the_update_out_together(guarded):
    w0, w1 = guarded
    for w in (w0, w1):
        assert w["replicas"] == 2
        assert w["skipped"] == 1 and w["applied"] == [True, True, False, True], w["task"]
        assert w["finite"]
        assert w["state"][2] == w["state"][3]  # weights and momentum as before the bad step
        d = w["diagnosis"]
        assert (d["step"], d["ranks"]) == (2, [1]), d  # both workers name replica 1 (worker 1)
        assert any("replica 1 saw it first" in e for e in d["evidence"]), d
    assert w0["state"] == w1["state"]  # bit-identical across the workers after every step


def test_multiworker_diagnosis_says_where_the_batch_was_not_rerun(guarded):
    w0, w1 = guarded
    for w in (w0, w1):
        # not "transient": the Guard in a custom loop re-ran no batch, so nothing "stayed finite"
        assert w["diagnosis"]["category"] == "unknown", w["diagnosis"]
    assert any("in worker 1; this worker (0)" in e for e in w0["diagnosis"]["evidence"])
    assert any("handed no batch" in e for e in w1["diagnosis"]["evidence"])


def test_keras_fit_fails_under_multiworker_without_nanscope(tmp_path):
    """Plain Keras: the reason the guarded test runs a custom loop. When this fails, Keras' fit
    works under the strategy: guard fit there too (docs/at-scale.md)."""
    for w in launch_tf_workers("keras_multiworker_fit.py", tmp_path):
        assert w["error"] is not None and "PerReplica" in w["error"], w
