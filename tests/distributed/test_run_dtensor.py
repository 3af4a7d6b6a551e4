"""``nanscope run`` under torchrun on DTensor models (issue 11): tensor parallel
(``parallelize_module`` with ``ColwiseParallel`` / ``RowwiseParallel``) and FSDP2
(``fully_shard``), 2 gloo processes, a NaN that appears on rank 1 only. Every check nanscope
makes on a DTensor is local (``to_local()``: no collective a rank would issue alone), so the
report names rank 1 quickly instead of waiting out the process group's timeout. Every launch is
bounded (subprocess timeout), and each test must finish well inside it."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("torch.distributed.tensor.parallel")

helpers = sys.modules["tests.distributed.conftest"]
ROOT, WORKERS, free_port = helpers.ROOT, helpers.WORKERS, helpers.free_port

LIMIT_S = 60  # each launch; a wait on a collective the other rank never joins is 60 s (gloo)


def _torchrun(*args: str):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    start = time.monotonic()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=LIMIT_S, cwd=ROOT, env=env)
    return run, time.monotonic() - start


def _watched(tmp_path, worker: str, *flags: str):
    out = tmp_path / "out.json"
    run, took = _torchrun(
        "-m", "nanscope", "run", str(WORKERS / worker), *flags, "--json", str(out)
    )
    assert out.is_file(), run.stderr[-4000:]
    assert "internal error" not in run.stderr, run.stderr[-4000:]
    return run, json.loads(out.read_text()), took


def _losses(text: str) -> list[str]:
    return sorted(re.findall(r"rank \d: last loss [-\d.]+", text))  # the ranks' prints interleave


def _line_of(worker: str, code: str) -> int:
    """The line of ``worker`` that holds ``code`` (one line only)."""
    lines = (WORKERS / worker).read_text().splitlines()
    found = [n for n, line in enumerate(lines, start=1) if code in line]
    assert len(found) == 1, found
    return found[0]


def _weights(text: str) -> list[str]:
    return sorted(re.findall(r"rank \d: weights [0-9a-f]{16}", text))


@pytest.mark.parametrize("worker", ["tp_train.py", "fsdp2_train.py"])
def test_healthy_dtensor_script_is_unchanged(tmp_path, worker):
    plain, _ = _torchrun(str(WORKERS / worker))
    assert plain.returncode == 0, plain.stderr[-3000:]
    run, doc, took = _watched(tmp_path, worker)
    assert run.returncode == 0, run.stderr[-3000:]
    assert doc["status"] == "ok" or doc.get("diagnosis") is None, doc
    assert _losses(run.stdout) == _losses(plain.stdout) and len(_losses(plain.stdout)) == 2
    assert _weights(run.stdout) == _weights(plain.stdout) and len(_weights(plain.stdout)) == 2
    print(f"{worker} healthy under nanscope run: {took:.1f} s")


def test_tp_nan_batch_on_rank_1(tmp_path):
    run, doc, took = _watched(tmp_path, "tp_train.py", "--bad-batch", "1:2")
    assert run.returncode == 1, run.stderr[-3000:]
    d = doc["diagnosis"]
    assert (d["category"], d["phase"], d["step"], d["ranks"]) == ("nonfinite_input", "data", 2, [1])
    assert d["samples"] == [3] and d["location"]["file"].endswith("tp_train.py")
    assert "replay of the step failed" not in json.dumps(doc)
    # rank 0's value came through the row-parallel all-reduce: no op of its own made it
    assert {r["rank"]: r["category"] for r in doc["per_rank"]} == {
        0: "unknown",
        1: "nonfinite_input",
    }
    assert took < 45, f"{took:.1f} s: something waited on a collective"


def test_tp_log_of_a_negative_column_on_rank_1(tmp_path):
    run, doc, took = _watched(tmp_path, "tp_train.py", "--bad-column", "1:2")
    assert run.returncode == 1, run.stderr[-3000:]
    d = doc["diagnosis"]
    assert (d["category"], d["op"], d["phase"], d["step"], d["ranks"]) == (
        "op_domain",
        "aten::log",
        "forward",
        2,
        [1],
    )
    assert d["location"]["file"].endswith("tp_train.py")
    assert d["location"]["line"] == _line_of("tp_train.py", "torch.log(h)")
    assert took < 45, f"{took:.1f} s: something waited on a collective"


# FSDP2: rank 1 stops at its model output and replays its forward alone, while rank 0 goes
# on into the backward's all-gather. The replay takes the all-gathered parameters as they were
# (copied when the script first read them) instead of gathering them again, and the gathered
# parameters FSDP freed after the forward get stand-ins instead of being read from freed memory.


def test_fsdp2_nan_batch_on_rank_1(tmp_path):
    run, doc, took = _watched(tmp_path, "fsdp2_train.py", "--bad-batch", "1:2")
    assert run.returncode == 1, run.stderr[-3000:]
    d = doc["diagnosis"]
    assert (d["category"], d["phase"], d["step"], d["ranks"]) == ("nonfinite_input", "data", 2, [1])
    assert d["samples"] == [3]
    assert "replay of the step failed" not in json.dumps(doc)
    # rank 0 saw nothing of its own: it was in the backward's collectives when rank 1 stopped
    assert {r["rank"]: r["status"] for r in doc["per_rank"]} == {0: "clean", 1: "nonfinite"}
    assert took < 45, f"{took:.1f} s: something waited on a collective"


def test_fsdp2_sqrt_of_a_negative_on_rank_1(tmp_path):
    run, doc, took = _watched(tmp_path, "fsdp2_train.py", "--bad-sqrt", "1:2")
    assert run.returncode == 1, run.stderr[-3000:]
    d = doc["diagnosis"]
    assert (d["category"], d["op"], d["step"], d["ranks"]) == ("op_domain", "aten::sqrt", 2, [1])
    assert d["samples"] == [2]
    assert d["location"]["file"].endswith("fsdp2_train.py")
    assert d["location"]["line"] == _line_of("fsdp2_train.py", "torch.sqrt(")
    assert "replay of the step failed" not in json.dumps(doc)
    assert took < 45, f"{took:.1f} s: something waited on a collective"
