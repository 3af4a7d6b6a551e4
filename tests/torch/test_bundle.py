"""Repro bundles written by the Guard: safe to load (weights_only), atomic, shown by
`nanscope show`, and replayed bit-for-bit by nanscope.torch.replay."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from nanscope.cli.main import main
from nanscope.core.enums import Category, Phase
from nanscope.core.errors import BadInputError
from nanscope.torch import Guard, replay
from nanscope.torch.bundle import load_state


class DropNet(nn.Module):
    """Which rows end up all-zero (and so log(0)) depends on the dropout mask: the RNG."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.bn = nn.BatchNorm1d(3)
        self.drop = nn.Dropout(0.6)

    def forward(self, x):
        return self.drop(torch.relu(self.bn(self.fc(x))))


def build(seed=0):
    torch.manual_seed(seed)
    net = DropNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    grads = []

    def train_step(batch):
        x, shift = batch
        h = net(x)
        loss = torch.log(h.sum(dim=1) + shift).mean()  # log(0) where a row is all dropped / relu'd
        loss.backward()
        grads.append({n: p.grad.detach().clone() for n, p in net.named_parameters()})
        return loss

    return net, opt, train_step, grads


def failing_run(tmp_path):
    net, opt, train_step, grads = build()
    g = torch.Generator().manual_seed(3)
    # Two healthy steps first (shift 1), so the bundle holds Adam moments; then log(h + 0).
    batches = [
        (torch.randn(16, 6, generator=g), torch.full((16,), 1.0 if i < 2 else 0.0))
        for i in range(20)
    ]
    guard = Guard(net, opt, policy="skip", reports=str(tmp_path / "reports"))
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for batch in batches:
            n = len(grads)
            guard.step(train_step, batch)
            if guard.last is not None:
                return guard, grads[n], batches  # the gradients of the failed step (first call)
    pytest.fail("the dropout model never produced log(0)")


def test_bundle_holds_only_safe_tensors_and_loads_with_weights_only(tmp_path):
    guard, _, _ = failing_run(tmp_path)
    folder = Path(guard.last.bundle)
    assert folder.parent == tmp_path / "reports" and folder.name.startswith(
        f"step{guard.last.step:06d}-op_domain"
    )
    assert sorted(p.name for p in folder.iterdir()) == ["diagnosis.json", "samples.npz", "state.pt"]
    assert not [
        p for p in folder.parent.iterdir() if p.name.startswith(".")
    ]  # no temporary leftovers
    state = torch.load(folder / "state.pt", weights_only=True)
    assert set(state) >= {"model", "optimizer", "batch", "rng", "step"}
    assert guard.last.step >= 2 and state["step"] == guard.last.step
    assert (
        "bn.running_mean" in state["model"] and state["optimizer"]["state"]
    )  # Adam moments from before the step
    assert torch.isfinite(state["model"]["bn.running_mean"]).all()  # the pre-step statistics


def test_replay_reproduces_the_failure_bit_for_bit(tmp_path):
    guard, original_grads, _ = failing_run(tmp_path)
    d = guard.last
    assert (d.category, d.op_kind, d.phase) == (Category.OP_DOMAIN, "log", Phase.LOSS) and d.samples

    # Offline: a fresh model and optimizer (different seed), and a different global RNG.
    net, opt, train_step, grads = build(seed=123)
    torch.manual_seed(999)
    again = replay(d.bundle, net, opt, train_step)
    assert (again.category, again.op, again.op_kind, again.samples) == (
        d.category,
        d.op,
        d.op_kind,
        d.samples,
    )
    replayed = grads[-1]
    for name, g in original_grads.items():
        assert torch.equal(~torch.isfinite(g), ~torch.isfinite(replayed[name])), name
        assert torch.equal(torch.nan_to_num(g), torch.nan_to_num(replayed[name])), name


def test_bundle_keeps_non_tensor_batch_parts_out_safely(tmp_path):
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    class Meta:
        pass

    def train_step(batch):
        loss = torch.sqrt(net(batch["x"]) - 10).sum()  # sqrt of a negative number
        loss.backward()
        return loss

    guard = Guard(net, opt, policy="skip", reports=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        guard.step(train_step, {"x": torch.ones(3, 2), "ids": ["a", "b", "c"], "meta": Meta()})
    state = load_state(guard.last.bundle)
    assert state["batch"]["ids"] == ["a", "b", "c"] and state["batch"]["meta"] is None
    assert torch.equal(state["batch"]["x"], torch.ones(3, 2))


def test_show_prints_the_diagnosis_and_contents(tmp_path, capsys):
    guard, _, _ = failing_run(tmp_path)
    assert main(["show", guard.last.bundle]) == 0
    out = capsys.readouterr().out
    assert (
        "op_domain in loss" in out
        and "log" in out
        and "state.pt" in out
        and "SHA-256 verified" in out
    )
    assert "Adam" in out and "batch[0]: float32[16, 6]" in out


def test_truncated_or_foreign_bundle_is_one_line_exit_2(tmp_path, capsys):
    guard, _, _ = failing_run(tmp_path)
    state = Path(guard.last.bundle) / "state.pt"
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])
    assert main(["show", guard.last.bundle]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated" in err
    with pytest.raises(BadInputError, match="truncated"):
        load_state(guard.last.bundle)
    net, opt, train_step, _ = build()
    with pytest.raises(BadInputError):
        replay(guard.last.bundle, net, opt, train_step)
    out = subprocess.run(
        [sys.executable, "-m", "nanscope", "show", guard.last.bundle],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stderr.count("\n") == 1


def test_a_pickle_that_is_not_tensors_is_refused(tmp_path):
    guard, _, _ = failing_run(tmp_path)
    folder = Path(guard.last.bundle)
    import json

    from nanscope.core.bundle import sha256

    torch.save({"model": {}, "evil": Path("x")}, folder / "state.pt")  # an arbitrary object
    doc = json.loads((folder / "diagnosis.json").read_text())
    doc["bundle"]["state_bytes"] = (folder / "state.pt").stat().st_size
    doc["bundle"]["state_sha256"] = sha256(folder / "state.pt")
    (folder / "diagnosis.json").write_text(json.dumps(doc))
    with pytest.raises(BadInputError, match="cannot load repro bundle"):
        load_state(folder)
