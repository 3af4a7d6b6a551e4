"""NanGuard under Lightning DDP: 2 processes on gloo (CPU), only rank 1 sees the bad batch.

Both ranks must skip the same step (no rank steps while another skips, nothing hangs), and the
diagnosis names rank 1 as the rank that saw it first. The run is a subprocess with a bounded
timeout, so a hang fails the test instead of blocking the suite.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import lit_models as M

SCRIPT = Path(__file__).parent / "lit_ddp_script.py"


def test_both_ranks_skip_the_same_step_and_rank_1_is_named(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in results:
        assert r["skipped"] == 1, r
        assert r["unchanged"] == [M.BAD_BATCH], r  # the same step, on both ranks
        assert r["global_step"] == 6 and r["finite"]
        d = r["diagnosis"]["diagnosis"]
        assert d["category"] == "op_domain" and d["op_kind"] == "log" and d["phase"] == "loss"
        assert d["ranks"] == [1]
        assert d["step"] == M.BAD_BATCH
    assert results[0]["weights"] == results[1]["weights"]  # DDP replicas stayed in sync
    bundles = list((tmp_path / "reports").iterdir())
    assert len(bundles) == 1  # written once, by the rank that saw it first
