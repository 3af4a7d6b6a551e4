"""Failures made inside ``optimizer.step()``: ``nanscope run`` records the step's ops (the
for-loop, foreach and fused implementations of torch's optimizers, and the user's own
``Optimizer`` subclasses) and names the op that made the update non-finite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanscope.core.errors import NonFiniteError
from nanscope.core.session import RunSession
from nanscope.torch import runner

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


# -- in process: the healthy step is not recorded; a failed one is run again, then undone -----


def _watched(train: Any) -> tuple[Any, NonFiniteError | None]:
    """``train()`` under the runner ``nanscope run`` attaches; the diagnosis it raised."""
    session = RunSession(script="train.py")
    runner.attach(session, "torch")
    try:
        return train(runner._RUNNERS[id(session)]), None
    except NonFiniteError as err:
        return None, err
    finally:
        session.close()


def _bits(tensors: Any) -> list[bytes]:
    """Exact bytes (NaN included) of tensors, in order."""
    return [t.detach().contiguous().view(torch.uint8).numpy().tobytes() for t in tensors]


def _everything(model: nn.Module, opt: torch.optim.Optimizer) -> list[bytes]:
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return _bits([*model.parameters(), *state, torch.get_rng_state()])


def test_healthy_step_is_copied_not_recorded_into_the_same_buffers_each_step():
    """The healthy path: the step's ops pass unrecorded; one copy of parameters and state is
    taken before it, into buffers allocated once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    seen = []

    def train(r: runner.Runner) -> None:
        # The optimizer's own post hooks fire before nanscope's global one: the step's records.
        opt.register_step_post_hook(
            lambda *_: seen.append((len(r.records), r._before_step, r._step_buffers.get(opt)))
        )
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    _watched(train)
    assert [records for records, _, _ in seen] == [0, 0, 0]
    # Step 1 creates the state (step, exp_avg, exp_avg_sq: absent before); then one buffer.
    assert [len(copy.tensors) for _, copy, _ in seen] == [4, 16, 16]
    assert seen[1][2] is seen[2][2] and seen[1][2] is not seen[0][2]


class NoisyNormalizedSGD(torch.optim.Optimizer):
    """Normalized SGD with gradient noise and a warm-up counted by the optimizer itself:
    ``p -= lr * min(1, t / warmup) * (g + noise) / ||g||``. A parameter whose gradient is
    exactly 0 (a head not used on this batch) divides by a zero norm."""

    def __init__(self, params, lr=0.1, noise=1e-3, warmup=10):
        super().__init__(params, dict(lr=lr, noise=noise, warmup=warmup))
        self.t = 0

    @torch.no_grad()
    def step(self, closure=None):
        self.t += 1
        for group in self.param_groups:
            scale = group["lr"] * min(1.0, self.t / group["warmup"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                noisy = p.grad + group["noise"] * torch.randn_like(p)
                p.sub_(scale * noisy / p.grad.norm())  # NORM_LINE


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.main, self.aux = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.main(h), self.aux(h)


def _two_heads_step(held: dict[str, Any]) -> None:
    """One step of a two-head model whose auxiliary loss is weighted 0 during warm-up (its
    head's gradient is exactly 0), with an LR scheduler and the script's own step hooks (an
    EMA of the weights, a call counter); what the script holds goes in ``held`` (the step may
    raise)."""
    torch.manual_seed(0)
    model = TwoHeads()
    opt = NoisyNormalizedSGD(model.parameters())
    torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # it wraps opt.step
    ema = [p.detach().clone() for p in model.parameters()]
    calls: list[str] = []
    held.update(model=model, opt=opt, ema=ema, calls=calls)
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))

    def ema_update(*_: Any) -> None:
        calls.append("post")
        with torch.no_grad():
            torch._foreach_lerp_(ema, list(model.parameters()), 0.1)

    opt.register_step_post_hook(ema_update)
    x, y, y_aux = torch.randn(8, 6), torch.randint(0, 3, (8,)), torch.randn(8)
    aux_weight = 0.0  # warm-up: the main task first
    opt.zero_grad()
    logits, aux = model(x)
    loss = F.cross_entropy(logits, y) + aux_weight * F.mse_loss(aux.squeeze(1), y_aux)
    loss.backward()
    opt.step()


def _held_bits(held: dict[str, Any]) -> tuple:
    opt = held["opt"]
    return (
        _everything(held["model"], opt),
        _bits(held["ema"]),
        held["calls"],
        opt.t,
        [g["lr"] for g in opt.param_groups],
    )


def test_failed_step_is_named_then_leaves_exactly_what_the_scripts_own_step_left():
    """The step is run again, recorded, to name the division; the script's hooks ran once and
    the weights, state, EMA, optimizer attributes, LR and RNG are the script's own, bit for bit."""
    plain: dict[str, Any] = {}
    torch.manual_seed(1)
    _two_heads_step(plain)
    assert not all(bool(p.isfinite().all()) for p in plain["model"].parameters())
    plain_rng = torch.get_rng_state()

    watched: dict[str, Any] = {}
    torch.manual_seed(1)
    _, err = _watched(lambda _r: _two_heads_step(watched))
    assert err is not None, "the zero-norm division was not caught"
    d = err.diagnosis
    assert (d.phase, d.op, d.module) == ("optimizer", "aten::div", "aux")
    assert d.location is not None and d.location.function == "step"
    assert any(e.startswith("inside optimizer.step(), updating aux.") for e in d.evidence)
    assert _bits([torch.get_rng_state()]) == _bits([plain_rng])
    assert _held_bits(watched) == _held_bits(plain)
    assert watched["calls"] == ["pre", "post"]


class SkippingSGD(torch.optim.SGD):
    """SGD that refuses a step on a gradient spike (the script catches it and skips the batch)."""

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if float(torch.stack([g.norm() for g in grads]).norm()) > 0.1:
            raise RuntimeError("gradient spike: batch skipped")
        return super().step(closure)


def test_a_step_that_raised_leaves_the_next_steps_watched():
    """A step that raises never reaches its post hook: the next forward is watched again, and
    a log(0) in its loss is named there."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = SkippingSGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    skipped = []

    def train(_r: runner.Runner) -> None:
        for scale in (1.0, 1e4):  # a spike, then logits that saturate the softmax
            opt.zero_grad()
            probs = torch.softmax(model(x) * scale, 1)
            loss = -(F.one_hot(y, 3) * torch.log(probs)).sum(1).mean()
            loss.backward()
            try:
                opt.step()
            except RuntimeError as err:
                skipped.append(str(err))

    _, err = _watched(train)
    assert skipped == ["gradient spike: batch skipped"]
    assert err is not None and (err.diagnosis.phase, err.diagnosis.op) == ("loss", "aten::log")
