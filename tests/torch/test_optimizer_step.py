"""Failures made inside ``optimizer.step()``: ``nanscope run`` records the step's ops (the
for-loop, foreach and fused implementations of torch's optimizers, and the user's own
``Optimizer`` subclasses) and names the op that made the update non-finite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIOS = Path(__file__).parent / "scenarios"


def _run(*args: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "nanscope", "run", "--json", str(out), *args],
        cwd=SCENARIOS,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return proc, json.loads(out.read_text())["diagnosis"] if out.exists() else None


@pytest.mark.parametrize(
    "impl, op, source",
    [
        ("--foreach", "aten::_foreach_addcdiv_", "(_multi_tensor_adam)"),
        ("--fused", "aten::_fused_adam_", "(_fused_adam)"),
    ],
)
def test_adam_eps0_multi_tensor_implementations_name_their_op(impl, op, source, tmp_path):
    """A multi-tensor op is one op per parameter: the parameter whose update went bad is named."""
    proc, d = _run("adam_eps0.py", impl, tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert (d["category"], d["phase"], d["op"], d["module"]) == (
        "optimizer_state",
        "optimizer",
        op,
        "0",
    )
    assert d["summary"].startswith("eps=0, so the optimizer's update divided 0 / 0")
    inside = next(e for e in d["evidence"] if e.startswith("inside optimizer.step()"))
    assert "updating 0.weight" in inside and inside.endswith(source), inside
    if impl == "--foreach":  # a division, with its operands: the denominator's zeros
        assert d["op_kind"] == "div"
        assert any(e.startswith("div input 1: float32[50, 8]: min 0,") for e in d["evidence"])


def test_healthy_adam_runs_identically_with_its_step_recorded(tmp_path):
    """The recorded step changes no number: a healthy run prints exactly what it prints alone."""
    script = tmp_path / "healthy_adam.py"
    script.write_text(
        (SCENARIOS / "adam_eps0.py").read_text().replace("eps=0.0", "eps=1e-8")
        + "print([round(float(p.sum()), 6) for p in model.parameters()])\n"
    )
    for impl in ("", "--foreach"):
        args = [str(script)] + ([impl] if impl else [])
        plain = subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        proc, d = _run(*args, tmp_path=tmp_path)
        assert plain.returncode == 0 and proc.returncode == 0, proc.stderr
        assert proc.stdout == plain.stdout and d is None
