"""`nanscope inspect` on real PyTorch checkpoints: a torchvision ResNet with a poisoned
running_var, a training checkpoint with Adam state, and a malicious pickle that must not run."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

from nanscope.audit import inspect
from nanscope.cli.main import main


def _resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A resnet18 after a few real Adam steps (so BN statistics and exp_avg_sq are real)."""
    model = _resnet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(4, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (4,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    folder = tmp_path_factory.mktemp("ckpt")
    clean = folder / "clean.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}, clean)
    return model, opt, clean


def _poison(model, opt, path):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["layer4.1.bn2.running_var"][5] = float("nan")
    sd["layer3.0.bn1.running_var"][2] = -4.0
    torch.save({"model": sd, "optimizer": opt.state_dict(), "epoch": 3}, path)
    return sd


def test_healthy_training_checkpoint_is_clean(trained):
    _, _, clean = trained
    r = inspect(clean)
    assert r.findings == [] and r.exit_code == 0
    assert r.stats["format"] == "torch" and r.stats["norm_layers"] == 20
    assert r.stats["optimizer_tensors"] == 3 * len(list(_resnet().parameters()))
    assert "layer4.1.bn2" in r.stats["layers"] and r.stats["optimizer"]["lr"] == 1e-3


def test_poisoned_running_var_is_named_and_really_breaks_eval(trained, tmp_path):
    model, opt, _ = trained
    path = tmp_path / "bad.pt"
    sd = _poison(model, opt, path)
    broken = _resnet()
    broken.load_state_dict(sd)
    broken.eval()
    with torch.no_grad():
        assert not torch.isfinite(broken(torch.randn(2, 3, 32, 32))).all()  # the real failure
    out = tmp_path / "r.json"
    assert main(["inspect", str(path), "--json", str(out)]) == 1
    doc = json.loads(out.read_text())
    assert doc["status"] == "problems" and doc["framework"] == "torch"
    (f,) = doc["findings"]
    assert (
        f["category"] == "corrupt_norm_statistics"
        and f["phase"] == "state"
        and f["op_kind"] == "batch_norm"
    )
    assert set(f["where"]["layers"]) == {"layer4.1.bn2", "layer3.0.bn1"}
    assert "layer4.1.bn2.running_var" in f["where"]["tensors"]
    assert any("1 NaN of 512" in e for e in f["evidence"]) and any(
        "1 negative" in e for e in f["evidence"]
    )
    assert "recalibrate-bn" in f["fixes"][0]


def test_nonfinite_weight_and_optimizer_state_and_half_overflow(trained, tmp_path):
    model, opt, _ = trained
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["fc.weight"][0, :3] = float("inf")
    sd["conv1.weight"][0, 0, 0, 0] = 1e5  # beyond float16: .half() makes it Inf
    osd = opt.state_dict()
    osd = {
        "state": {k: {n: t.clone() for n, t in v.items()} for k, v in osd["state"].items()},
        "param_groups": osd["param_groups"],
    }
    osd["state"][0]["exp_avg_sq"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "w.pt"
    torch.save({"model": sd, "optimizer": osd}, path)
    r = inspect(path)
    cats = {(f.category.value, f.severity): f for f in r.findings}
    nf = cats[("nonfinite_parameters", "error")]
    assert nf.where_found["tensors"] == ["fc.weight"] and "3 +Inf" in nf.evidence[0]
    assert cats[("overflow", "warning")].where_found["tensor"] == "conv1.weight"
    opt_f = cats[("optimizer_state", "error")]
    assert opt_f.where_found["tensor"] == "optimizer[conv1.weight].exp_avg_sq"


def test_plain_state_dict_and_bfloat16(tmp_path):
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).to(torch.bfloat16)
    with torch.no_grad():
        m[1].running_var.fill_(float("inf"))
    torch.save(m.state_dict(), tmp_path / "sd.pth")
    (f,) = inspect(tmp_path / "sd.pth").findings
    assert f.category == "corrupt_norm_statistics" and f.where_found["tensor"] == "1.running_var"


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # runs at unpickling time: creates the marker file


def test_malicious_pickle_does_not_run(trained, tmp_path, capsys):
    model, _, _ = trained
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": model.state_dict(), "payload": Evil(str(marker))}, path)
    assert not marker.exists()
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trust-pickle" in err and "Traceback" not in err
    assert not marker.exists()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanscope",
            "inspect",
            str(path),
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and not marker.exists() and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("kind", ["truncate", "bitflip"])
def test_fuzzed_torch_files_never_crash(tmp_path, capsys, kind):
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    torch.save(m.state_dict(), tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    rng = np.random.default_rng(0)
    for trial in range(10):
        if kind == "truncate":
            mutated = data[: int(rng.integers(1, len(data)))]
        else:
            b = bytearray(data)
            for _ in range(4):
                i = int(rng.integers(0, len(b)))
                b[i] ^= 1 << int(rng.integers(0, 8))
            mutated = bytes(b)
        (tmp_path / "f.pt").write_bytes(mutated)
        code = main(["inspect", str(tmp_path / "f.pt")])
        err = capsys.readouterr().err
        assert code in (0, 1, 2) and "internal error" not in err and "Traceback" not in err, (
            trial,
            err,
        )
    assert hashlib.sha256((tmp_path / "a.pt").read_bytes()).hexdigest() == digest


def test_lightning_style_checkpoint_optimizer_states(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.Adam(m.parameters())
    m(torch.randn(5, 3)).sum().backward()
    opt.step()
    osd = opt.state_dict()
    osd["state"][0]["exp_avg_sq"][0, 0] = float("nan")
    torch.save(
        {
            "state_dict": {"model." + k: v for k, v in m.state_dict().items()},
            "optimizer_states": [osd],
        },
        tmp_path / "last.ckpt",
    )
    (f,) = inspect(tmp_path / "last.ckpt").findings
    assert (
        f.category == "optimizer_state"
        and f.where_found["tensor"] == "optimizer[model.0.weight].exp_avg_sq"
    )


def test_nonfinite_learning_rate_and_strict_json(tmp_path):
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(m.parameters(), lr=float("nan"))
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "x.pt")
    assert main(["inspect", str(tmp_path / "x.pt"), "--json", str(tmp_path / "r.json")]) == 1

    def no_nan(token):
        raise ValueError(f"JSON holds {token}")

    doc = json.loads((tmp_path / "r.json").read_text(), parse_constant=no_nan)
    (f,) = doc["findings"]
    assert f["category"] == "optimizer_state" and any(
        "learning rate nan" in e for e in f["evidence"]
    )
