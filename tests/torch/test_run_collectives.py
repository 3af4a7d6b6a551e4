"""``nanscope run``'s replay on a rank alone: what a collective brought in is taken as it was,
never asked for again (the other ranks are not in the replay: gloo aborts, NCCL hangs), and a
parameter whose memory FSDP freed after use is not read from freed memory.

In process, on a one-rank gloo group (the multi-rank FSDP2 / tensor-parallel runs are in
tests/distributed/test_run_dtensor.py)."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from nanscope.core.errors import NonFiniteError
from nanscope.core.session import RunSession
from nanscope.torch import runner

HERE = Path(__file__)
SOURCE = HERE.read_text().splitlines()


def _line(text: str) -> int:
    """The first line of this file that holds ``text``: the model's code, above its tests."""
    return next(i for i, line in enumerate(SOURCE, 1) if text in line)


pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is absent")


@pytest.fixture
def group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=30),
    )
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _watched(train: Any) -> tuple[RunSession, NonFiniteError | None]:
    session = RunSession(script="train.py")
    runner.attach(session, "torch")
    try:
        train()
        return session, None
    except NonFiniteError as err:
        return session, err
    finally:
        session.close()


class AllReducedLog(nn.Module):
    """A hand-written tensor-parallel block: the partial sums are all-reduced, then logged."""

    def __init__(self, bias: float) -> None:
        super().__init__()
        self.up = nn.Linear(4, 6)
        self.down = nn.Linear(6, 2)
        with torch.no_grad():
            self.up.weight.uniform_(0.0, 0.1)
            self.up.bias.fill_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        dist.all_reduce(h)  # in place, c10d::allreduce_
        return self.down(torch.log(h))  # log after the all-reduce


class AllGatheredLog(AllReducedLog):
    """The same block with the units gathered from every rank (``c10d::allgather_``, whose
    result is a list of lists of tensors)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        parts = [torch.empty_like(h) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, h)
        return self.down(torch.log(torch.cat(parts, dim=1)[:, :6]))  # log after the all-gather


def _train(model: nn.Module, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.rand(5, 4, generator=g), torch.randint(0, 2, (5,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("block", [AllReducedLog, AllGatheredLog])
def test_a_log_after_a_collective_is_named_from_the_kept_result(group, block):
    torch.manual_seed(0)
    model = block(bias=-1.0)  # every hidden unit negative: log is NaN at the first step
    session, err = _watched(lambda: _train(model))
    assert err is not None
    d = err.diagnosis
    assert (d.category.value, d.op, d.phase.value) == ("op_domain", "aten::log", "forward")
    where = "all-reduce" if block is AllReducedLog else "all-gather"
    assert d.location is not None and Path(d.location.file).resolve() == HERE.resolve()
    assert d.location.line == _line(f"# log after the {where}")
    assert d.samples == [0, 1, 2, 3, 4]  # every row: every unit is negative
    assert not session.internal_errors


def test_past_what_is_kept_the_replay_says_so_and_never_runs_the_collective_again(
    group, monkeypatch
):
    monkeypatch.setattr(runner, "_RECEIVED_BYTES", 0)
    torch.manual_seed(0)
    model = AllReducedLog(bias=-1.0)
    session, err = _watched(lambda: _train(model))
    assert err is not None
    d = err.diagnosis
    assert d.category.value == "unknown"
    said = " ".join(d.evidence)
    assert "c10d::allreduce_ brought in from the other ranks" in said, said
    assert "keeps at most 0 MiB" in said, said
    assert not session.internal_errors  # a limit, said in the diagnosis: not a bug of ours


def test_healthy_all_reduced_training_is_unchanged(group):
    torch.manual_seed(0)
    plain = AllReducedLog(bias=1.0)
    watched = AllReducedLog(bias=1.0)
    watched.load_state_dict(plain.state_dict())
    _train(plain)
    session, err = _watched(lambda: _train(watched))
    assert err is None and not session.internal_errors
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b)


class FreesAfterUse(nn.Module):
    """What FSDP does with a gathered parameter: its memory is allocated before the layer runs,
    filled, and freed again (the storage resized to 0) once the layer is done."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((3, 4), 0.1))
        self.full = torch.empty(3, 4)  # the "unsharded" buffer
        self.full.untyped_storage().resize_(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        storage = self.full.untyped_storage()
        storage.resize_(self.full.numel() * self.full.element_size())
        flat = self.full.view(-1)  # FSDP copies the gathered values in through views
        with torch.no_grad():
            flat.copy_(self.weight.reshape(-1))
        out = x @ self.full.t()
        out = torch.sqrt(out)  # negative pre-activations: NaN (the sqrt of freed memory)
        storage.resize_(0)
        return out


def test_memory_freed_after_use_is_not_read_by_the_replay():
    torch.manual_seed(0)
    model = FreesAfterUse()
    session, err = _watched(lambda: model(-torch.rand(2, 4) - 0.5).sum().item())
    assert err is not None
    d = err.diagnosis
    assert (d.category.value, d.op) == ("op_domain", "aten::sqrt"), d
    assert d.location is not None and d.location.line == _line("(the sqrt of freed memory)")
    assert d.samples == [0, 1]
    assert not session.internal_errors
