"""An in-process `nanscope run` of a PyTorch script leaves no trace: the global module hooks,
the optimizer step hooks, the dispatch-mode stack, grad / anomaly mode and every attribute of
the classes a runner could patch are exactly as before, after a clean run and after a failure."""

from __future__ import annotations

import json
import runpy
import subprocess
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules import module as nn_module
from torch.optim import optimizer as optim_module

from nanscope.cli.main import main

SCRIPT = textwrap.dedent("""
    import sys

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    for step in range(3):
        if step == 2 and "--nan" in sys.argv:
            x[3, 1] = float("nan")
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print("loss", round(loss.item(), 6))
    model.eval()
    with torch.no_grad():
        print("eval", round(model(x).sum().item(), 6))
""")

_HOOK_REGISTRIES = [
    name
    for name in dir(nn_module)
    if name.startswith("_global_") and name.endswith(("hooks", "always_called", "with_kwargs"))
]
_OPTIMIZER_REGISTRIES = [name for name in dir(optim_module) if name.startswith("_global_optimizer")]
_CLASSES = [
    torch.Tensor,
    torch._C.TensorBase,
    torch.nn.Module,
    torch.optim.Optimizer,
    torch.optim.Adam,
    torch.autograd.Function,
    torch.autograd.graph.Node,
    torch.nn.Sequential,
    torch.nn.Linear,
]
_MODULES = [torch, F, torch.autograd, torch.nn.modules.module, subprocess]  # Popen: relaunch


def _state() -> dict:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return {
        "hooks": {name: dict(getattr(nn_module, name)) for name in _HOOK_REGISTRIES},
        "optimizer hooks": {
            name: dict(getattr(optim_module, name)) for name in _OPTIMIZER_REGISTRIES
        },
        "dispatch modes": list(_get_current_dispatch_mode_stack()),
        "grad enabled": torch.is_grad_enabled(),
        "anomaly": (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
        "default dtype": torch.get_default_dtype(),
        "class attributes": {(c.__qualname__, k): v for c in _CLASSES for k, v in vars(c).items()},
        "module attributes": {
            (m.__name__, k): v
            for m in _MODULES
            for k, v in vars(m).items()
            if callable(v) or isinstance(v, type)
        },
    }


def _diff(before: dict, after: dict) -> list[str]:
    out = []
    for key in before:
        b, a = before[key], after[key]
        if isinstance(b, dict) and key.endswith("attributes"):
            out += [
                f"{key}: {k}" for k in b.keys() | a.keys() if b.get(k, None) is not a.get(k, None)
            ]
        elif b != a:
            out.append(f"{key}: {b!r} -> {a!r}")
    return out


def test_the_registries_are_the_ones_torch_has():
    assert (
        "_global_forward_pre_hooks" in _HOOK_REGISTRIES
        and "_global_forward_hooks" in _HOOK_REGISTRIES
    )
    assert {"_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"} <= set(
        _OPTIMIZER_REGISTRIES
    )


@pytest.mark.parametrize("args, code", [([], 0), (["--nan"], 1)], ids=["clean", "failure"])
def test_run_leaves_no_trace(tmp_path, capsys, args, code):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    # torch's own one-time patches (Optimizer wraps its subclass's step on first use) happen
    # in a plain run first, so that what is compared is nanscope's doing only.
    runpy.run_path(str(script), run_name="__main__")
    capsys.readouterr()
    before = _state()
    rc = main(["run", "--json", str(tmp_path / "r.json"), str(script), *args])
    after = _state()
    assert rc == code, capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["status"] == (
        "clean" if code == 0 else "nonfinite"
    )
    assert _diff(before, after) == []
    # and the process still computes as before: no mode, no hook sees this
    assert torch.ones(2).sum().item() == 2.0
