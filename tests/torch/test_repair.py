"""`nanscope.torch.repair_norm_statistics` and `nanscope repair` on a real poisoned ResNet.

The failure is real: a NaN in one running_var makes every eval-mode output NaN while
train-mode outputs stay finite. The repair must make eval outputs finite, touch nothing but
BatchNorm statistics, never write over the input, and write nothing when it cannot verify."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from nanscope.audit import inspect
from nanscope.cli.main import main
from nanscope.torch import repair_norm_statistics

FACTORY = """
import torchvision

def make():
    return torchvision.models.resnet18(weights=None, num_classes=10)
"""


def _model():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)


def _poisoned():
    m = _model()
    with torch.no_grad():
        m.layer4[1].bn2.running_var[5] = float("nan")
        m.layer2[0].bn1.running_var[:] = -1.0
    return m


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
        for _ in range(n)
    ]


def test_api_repairs_eval_outputs_and_touches_only_bn_statistics():
    m = _poisoned()
    x = torch.rand(4, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        assert not torch.isfinite(m(x)).all()
    m.train()
    with torch.no_grad():
        assert torch.isfinite(m(x)).all()  # train mode uses batch statistics: finite
    params = {k: v.clone() for k, v in m.named_parameters()}
    m.eval()
    report = repair_norm_statistics(m, _batches())
    assert not m.training and all(not mod.training for mod in m.modules())  # mode restored
    assert m.layer4[1].bn2.momentum == 0.1
    assert {"layer4.1.bn2", "layer2.0.bn1"} <= set(report.changed)
    assert report.batches == 4 and report.outputs_finite is True
    assert (
        report.layers["layer2.0.bn1"]["before"]["negative"] == 128
        and report.layers["layer2.0.bn1"]["after"]["negative"] == 0
    )
    for k, v in m.named_parameters():
        assert torch.equal(v, params[k]), k
    with torch.no_grad():
        assert torch.isfinite(m(x)).all()
    assert "layer4.1.bn2" in str(report) and report.to_dict()["outputs_finite"] is True


def test_api_skips_nonfinite_batches_and_refuses_empty_data():
    m = _poisoned()
    bad = torch.rand(8, 3, 32, 32)
    bad[2, 0, 0, 0] = float("nan")
    report = repair_norm_statistics(m, [bad, *(_batches(2))])
    assert report.skipped_batches == 1 and report.batches == 2
    assert torch.isfinite(m.layer4[1].bn2.running_var).all()
    from nanscope.core.errors import BadInputError

    m2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    with torch.no_grad():
        m2[1].running_var[1] = float("nan")
    with pytest.raises(BadInputError):
        repair_norm_statistics(m2, [])
    assert torch.isnan(m2[1].running_var[1])  # nothing changed when nothing ran


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            imgs / f"{i:03d}.png"
        )
    m = _poisoned()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    torch.save(
        {"model": m.state_dict(), "optimizer": opt.state_dict(), "epoch": 7}, tmp_path / "bad.pt"
    )
    return tmp_path


def test_cli_recalibrate_writes_a_verified_copy(workdir, capsys):
    src = workdir / "bad.pt"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert inspect(src).exit_code == 1
    rc = main(
        [
            "repair",
            str(src),
            "-o",
            str(workdir / "fixed.pt"),
            "--recalibrate-bn",
            "--data",
            str(workdir / "imgs"),
            "--model",
            "mymodels:make",
            "--batch-size",
            "4",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "verified finite" in out and "layer4.1.bn2" in out
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest  # input untouched
    fixed = torch.load(workdir / "fixed.pt", weights_only=True)
    assert fixed["epoch"] == 7 and "optimizer" in fixed
    assert inspect(workdir / "fixed.pt").findings == []
    m = _model()
    m.load_state_dict(fixed["model"])
    m.eval()
    with torch.no_grad():
        assert torch.isfinite(m(torch.rand(2, 3, 32, 32))).all()


def test_cli_refusals(workdir, capsys):
    src = str(workdir / "bad.pt")
    np.save(
        workdir / "wrong.npy", np.zeros((4, 5), np.float32)
    )  # not images: the model cannot run on it
    cases = [
        [
            "repair",
            src,
            "-o",
            "x.pt",
            "--recalibrate-bn",
            "--data",
            "wrong.npy",
            "--model",
            "mymodels:make",
        ],
        ["repair", src, "-o", src, "--reset-bn"],  # never over the input
        ["repair", src, "-o", "x.pt", "--recalibrate-bn", "--data", "imgs"],  # no --model
        ["repair", src, "-o", "x.pt", "--recalibrate-bn", "--model", "mymodels:make"],  # no --data
        [
            "repair",
            src,
            "-o",
            "x.pt",
            "--recalibrate-bn",
            "--data",
            "imgs",
            "--model",
            "nomodule:make",
        ],
        ["repair", src, "-o", "no/dir/x.pt", "--reset-bn"],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "internal error" not in err, (argv, err)
    assert not (workdir / "x.pt").exists()


def test_cli_does_not_write_when_outputs_stay_nonfinite(workdir, capsys):
    m = _model()
    with torch.no_grad():
        m.fc.weight[0, 0] = float("nan")  # not a BatchNorm problem: recalibration cannot fix it
    torch.save(m.state_dict(), workdir / "w.pt")
    rc = main(
        [
            "repair",
            str(workdir / "w.pt"),
            "-o",
            str(workdir / "out.pt"),
            "--recalibrate-bn",
            "--data",
            "imgs",
            "--model",
            "mymodels:make",
        ]
    )
    assert rc == 1 and not (workdir / "out.pt").exists()
    assert "nothing written" in capsys.readouterr().err


def test_cli_reset_without_model_and_as_subprocess(workdir, capsys):
    assert main(["repair", "bad.pt", "-o", "reset.pt", "--reset-bn"]) == 0
    out = capsys.readouterr().out
    assert "accuracy usually drops" in out and "not verified" in out
    assert inspect(workdir / "reset.pt").findings == []
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanscope",
            "repair",
            "bad.pt",
            "-o",
            "fixed2.pt",
            "--recalibrate-bn",
            "--data",
            "imgs",
            "--model",
            "mymodels:make",
            "--max-batches",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=workdir,
    )
    assert p.returncode == 0 and "verified finite" in p.stdout, p.stderr


def test_cli_repairs_safetensors(workdir, capsys):
    from safetensors.torch import save_file

    save_file(_poisoned().state_dict(), str(workdir / "bad.safetensors"))
    rc = main(
        [
            "repair",
            str(workdir / "bad.safetensors"),
            "-o",
            str(workdir / "fixed.safetensors"),
            "--recalibrate-bn",
            "--data",
            "imgs",
            "--model",
            "mymodels:make",
            "--max-batches",
            "2",
        ]
    )
    assert rc == 0, capsys.readouterr()
    assert inspect(workdir / "bad.safetensors").exit_code == 1
    assert inspect(workdir / "fixed.safetensors").findings == []
