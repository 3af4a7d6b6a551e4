"""The Hugging Face Trainer under ``torchrun --nproc-per-node 2`` (DDP on gloo, CPU) with
nanscope's callback: a tiny BERT regressor whose table has one missing score (NaN label), which
the Trainer's distributed sampler hands to one rank only.

Without nanscope the Trainer logs a finite loss at that step (its NaN filter, then the mean over
ranks) and every later one, while every weight on both ranks turns NaN. With it, both ranks
skip that one step, the weights stay finite and equal across ranks, and the diagnosis names the
rank, step and sample that held the row, as that rank's own data loader read it. The unchanged
script under ``torchrun ... nanscope run`` names the same. A healthy table trains to the same
bits with and without nanscope. Every launch is bounded."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

helpers = sys.modules["tests.distributed.conftest"]
BAD_ROW, BATCH = 21, 4  # as in the worker


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(helpers.free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=180, cwd=helpers.ROOT, env=env
    )


def _launch(tmp_path, mode: str, *flags: str) -> list[dict]:
    out = tmp_path / mode
    out.mkdir()
    run = _torchrun(str(helpers.WORKERS / "hf_trainer_ddp.py"), str(out), mode, *flags)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert (r["world"], r["wrapped"], r["global_step"]) == (2, "DistributedDataParallel", 6)
    return ranks


def _where(ranks: list[dict]) -> tuple[int, int, int]:
    """(rank, step, sample) of the missing score, from what each rank's loader read."""
    found = [
        (r, i // BATCH, i % BATCH)
        for r, d in enumerate(ranks)
        for i, row in enumerate(d["read"])
        if row == BAD_ROW
    ]
    assert len(found) == 1, found
    return found[0]


def _assert_names(d: dict, rank: int, step: int, sample: int) -> None:
    assert (d["category"], d["phase"], d["ranks"], d["step"], d["samples"]) == (
        "invalid_target",
        "data",
        [rank],
        step,
        [sample],
    )


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> list[dict]:
    """The run without nanscope."""
    return _launch(tmp_path_factory.mktemp("hf"), "plain")


def test_without_nanscope_the_trainer_says_nothing(plain):
    assert _where(plain)[1] < 6
    for r in plain:  # finite logs, NaN weights
        assert r["finite"] is False
        assert all(loss == loss for loss in r["losses"]) and len(r["losses"]) == 6


def test_missing_label_on_one_rank_is_skipped_on_both_and_named(tmp_path, plain):
    rank, step, sample = _where(plain)

    guarded = _launch(tmp_path, "guard")
    assert _where(guarded) == (rank, step, sample)  # the same order of rows as without nanscope
    for r in guarded:
        assert r["skipped"] == 1 and r["finite"] is True
        d = r["diagnosis"]
        _assert_names(d, rank, step, sample)
        assert "dropna" in d["fixes"][0]  # a missing value: drop or fill it
    assert guarded[0]["weights"] == guarded[1]["weights"]  # the replicas never diverged
    assert guarded[0]["losses"][:step] == plain[0]["losses"][:step]  # same run up to there


def test_the_unchanged_script_under_nanscope_run_names_the_same(tmp_path, plain):
    rank, step, sample = _where(plain)
    out = tmp_path / "report.json"
    worker = str(helpers.WORKERS / "hf_trainer_ddp.py")
    run = _torchrun("-m", "nanscope", "run", worker, str(tmp_path), "plain", "--json", str(out))
    assert run.returncode == 1 and out.is_file(), run.stderr[-3000:]
    assert "internal error" not in run.stderr
    d = json.loads(out.read_text())["diagnosis"]
    _assert_names(d, rank, step, sample)
    assert "first op to read it: aten::mse_loss in MSELoss" in d["evidence"]


def test_healthy_table_trains_to_the_same_bits(tmp_path):
    plain = _launch(tmp_path, "plain", "--clean")
    guarded = _launch(tmp_path, "guard", "--clean")
    for p, g in zip(plain, guarded, strict=True):
        assert g["skipped"] == 0 and g["diagnosis"] is None
        assert (g["weights"], g["losses"]) == (p["weights"], p["losses"])
