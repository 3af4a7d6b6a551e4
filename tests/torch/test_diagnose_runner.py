"""The `nanscope run` runner beyond the scenario scripts: inference-only scripts (the model's
output is what matters), intentional -inf outputs stay silent, and nanscope's own errors
never stop the user's script."""

from __future__ import annotations

import json
import textwrap

import pytest
from torch.utils._python_dispatch import _get_current_dispatch_mode

import nanscope.torch.runner as runner_module
from nanscope.cli.main import main as cli_main

INFERENCE = """
import torch, torch.nn as nn

class Ratio(nn.Module):
    def forward(self, x):
        return x / x.sum(dim=1, keepdim=True)

model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), Ratio()).eval()
with torch.no_grad():
    nn.init.eye_(model[0].weight)
    x = torch.rand(3, 4) + 0.1
    x[1] = -1.0   # ReLU cuts every activation of sample 1: its sum is 0
    y = model(x)
print("done", file=open({out!r}, "w"))
"""

MASKED_OUTPUT = """
import torch, torch.nn as nn

class MaskedLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
    def forward(self, x, allowed):
        return self.fc(x).masked_fill(~allowed, float("-inf")).log_softmax(-1)

model = MaskedLogits()
allowed = torch.tensor([[True, True, False, False, True]] * 2)
with torch.no_grad():
    out = model(torch.randn(2, 4), allowed)
print(int(torch.isinf(out).sum()))
"""

TRAINING = """
import sys, torch, torch.nn as nn
model = nn.Linear(3, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(3):
    opt.zero_grad()
    loss = (model(torch.randn(4, 3)) ** 2).mean()
    loss.backward()
    opt.step()
print("trained", loss.item())
sys.exit(0)
"""


def run(tmp_path, source, **fmt):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source.format(**fmt) if fmt else source))
    report = tmp_path / "report.json"
    rc = cli_main(["run", str(script), "--json", str(report)])
    assert _get_current_dispatch_mode() is None
    return rc, json.loads(report.read_text())


def test_inference_only_script_stops_at_the_model_output(tmp_path, capsys):
    marker = tmp_path / "reached_the_end"
    rc, report = run(tmp_path, INFERENCE, out=str(marker))
    d = report["diagnosis"]
    assert rc == 1 and not marker.exists()  # stopped at the failure
    assert (d["category"], d["phase"], d["op_kind"], d["module"], d["samples"]) == (
        "op_domain",
        "forward",
        "div",
        "2",
        [1],
    )


def test_intentional_minus_inf_in_the_output_is_silent(tmp_path, capsys):
    rc, report = run(tmp_path, MASKED_OUTPUT)
    assert rc == 0 and report["status"] == "clean"
    assert capsys.readouterr().out.strip() == "4"  # the script saw its own -inf values unchanged


def test_our_internal_error_is_a_warning_and_the_script_finishes(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated nanscope bug")

    monkeypatch.setattr(runner_module, "user_frame", broken)  # fault injection inside the recorder
    with pytest.warns(
        RuntimeWarning, match="nanscope: internal error in watching the PyTorch script"
    ):
        rc, report = run(tmp_path, TRAINING)
    assert rc == 0 and report["status"] == "clean"
    assert "trained" in capsys.readouterr().out


CONSTANT_INF = """
import torch
best = torch.tensor(float("inf"))          # the usual "best loss so far"
w = torch.nn.Parameter(torch.ones(2))
opt = torch.optim.SGD([w], lr=0.1)
for step in range(3):
    opt.zero_grad()
    loss = (w ** 2).sum()
    loss.backward()
    opt.step()
    print("best was", best.item())
    best = torch.minimum(best, loss.detach())
"""


def test_the_scripts_own_infinite_constant_is_not_a_failure(tmp_path, capsys):
    rc, report = run(tmp_path, CONSTANT_INF)
    assert rc == 0 and report["status"] == "clean"
    assert "best was inf" in capsys.readouterr().out


def test_a_failed_replay_still_stops_the_script_with_a_diagnosis(tmp_path, capsys, monkeypatch):
    def broken_replay(self):
        raise RuntimeError("simulated replay bug")

    monkeypatch.setattr(runner_module.Runner, "replay", broken_replay)  # fault injection
    script = tmp_path / "script.py"
    script.write_text(
        TRAINING.replace(
            "(model(torch.randn(4, 3)) ** 2).mean()",
            "torch.log(model(torch.randn(4, 3)) * 0).mean()",
        )
    )
    report = tmp_path / "report.json"
    with pytest.warns(RuntimeWarning, match="replaying the failing step"):
        rc = cli_main(["run", str(script), "--json", str(report)])
    d = json.loads(report.read_text())["diagnosis"]
    assert rc == 1 and d["category"] == "unknown" and "simulated replay bug" in d["evidence"][0]
