"""``accelerate launch`` starting a guarded accelerate loop on 2 processes (gloo, CPU): the
model is wrapped in DDP and the optimizer in AcceleratedOptimizer; one rank's batch holds a
NaN, every rank skips that step, the weights (and momentum) stay bit-identical across ranks
and equal to their values before it, and the diagnosis names the rank. The launch is bounded.

On CPU, ``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate 1.15:
``--cpu`` goes to its simple launcher, which starts several only through mpirun with
``--mpirun_hostfile``); ``--multi_gpu --num_processes 2`` goes through torchrun, and the
script's ``Accelerator(cpu=True)`` then runs on gloo."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("accelerate")

helpers = sys.modules["tests.distributed.conftest"]  # the suite's conftest (importlib mode)


def test_accelerate_launch_guarded_loop_skips_together(tmp_path):
    hf_home = tmp_path / "hf"  # no accelerate config file: none is read, none is needed
    hf_home.mkdir()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    cmd += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", "--main_process_port", str(helpers.free_port())]
    cmd += [str(helpers.WORKERS / "accelerate_train.py"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(hf_home)}
    run = subprocess.run(
        cmd, capture_output=True, text=True, timeout=150, cwd=helpers.ROOT, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert (r["world"], r["ddp"], r["optimizer"]) == (
            2,
            "DistributedDataParallel",
            "AcceleratedOptimizer",
        )
        d = r["diagnosis"]
        assert (r["skipped"], r["steps"]) == (1, 5)
        assert (d["category"], d["ranks"], d["step"], d["samples"]) == (
            "nonfinite_input",
            [1],
            2,
            [3],
        )
        states = r["digests"]  # before step 0, after step 0, ..., after step 4
        assert states[3] == states[2]  # step 2 was skipped: nothing changed, to the bit
        assert len(set(states)) == len(states) - 1  # every other step changed the weights
    assert r0["digests"] == r1["digests"]  # the ranks never diverged
