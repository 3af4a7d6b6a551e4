"""nanscope's own .pt reader (no torch import) gives what torch.load(weights_only=True) gives,
on real checkpoints written by torch.save: torchvision resnet18/resnet50 state dicts, Adam state,
a nested training checkpoint, the legacy non-zip format, every dtype, views and shared storages."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

from nanscope.audit import inspect
from nanscope.audit.torchfile import read_pt, read_torch_file
from nanscope.torch.audit import read_torch_checkpoint


def _same_checkpoint(path):
    mine, ref = read_torch_file(path), read_torch_checkpoint(path)
    assert list(mine.tensors) == list(ref.tensors) and list(mine.optimizer) == list(ref.optimizer)
    for name in (*ref.tensors, *ref.optimizer):
        a = mine.tensors.get(name, mine.optimizer.get(name))
        b = ref.tensors.get(name, ref.optimizer.get(name))
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert np.array_equal(a, b, equal_nan=True), name
    assert mine.dtypes == ref.dtypes and mine.hyper == ref.hyper
    assert inspect(path).to_dict() == _report_via_torch(path)
    return mine


def _report_via_torch(path):
    from nanscope.audit.checkpoint import find_norm_layers
    from nanscope.audit.inspect import analyze

    ck = read_torch_checkpoint(path)
    ck.norm_layers = find_norm_layers(ck.tensors)
    return analyze(ck).to_dict()


def _trained(arch):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_state_dicts_match_torch_load(tmp_path, arch):
    model, opt = _trained(arch)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    ck = _same_checkpoint(tmp_path / "sd.pt")
    assert len(ck.tensors) == len(model.state_dict())
    torch.save(opt.state_dict(), tmp_path / "adam.pt")  # an optimizer state dict alone
    assert read_pt(tmp_path / "adam.pt")["param_groups"][0]["betas"] == (0.9, 0.999)
    ref = torch.load(tmp_path / "adam.pt", weights_only=True)
    got = read_pt(tmp_path / "adam.pt")
    for pid, state in ref["state"].items():
        for k, t in state.items():
            assert np.array_equal(got["state"][pid][k].array, t.numpy()), (pid, k)
    assert {k: v for k, v in got["param_groups"][0].items()} == ref["param_groups"][0]


def test_nested_training_checkpoint_with_poison_matches_torch_load(tmp_path):
    model, opt = _trained("resnet18")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["layer4.1.bn2.running_var"][5] = float("nan")
    sd["fc.weight"][0, :3] = float("inf")
    osd = opt.state_dict()
    osd["state"][0]["exp_avg_sq"][0, 0, 0, 0] = float("nan")
    ema = {k: v.clone() for k, v in list(model.state_dict().items())[:5]}
    torch.save(
        {"model": sd, "optimizer": osd, "epoch": 3, "ema": ema, "note": "text", "best": 0.5},
        tmp_path / "ck.pt",
    )
    ck = _same_checkpoint(tmp_path / "ck.pt")
    assert ck.hyper["lr"] == 1e-3 and "optimizer[conv1.weight].exp_avg_sq" in ck.optimizer
    cats = {f.category.value for f in inspect(tmp_path / "ck.pt").findings}
    assert {"corrupt_norm_statistics", "nonfinite_parameters", "optimizer_state"} <= cats


def test_legacy_non_zip_file_matches_torch_load(tmp_path):
    model, opt = _trained("resnet18")
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict()},
        tmp_path / "old.pt",
        _use_new_zipfile_serialization=False,
    )
    with open(tmp_path / "old.pt", "rb") as fh:
        assert fh.read(2) != b"PK"
    _same_checkpoint(tmp_path / "old.pt")


@pytest.mark.parametrize("legacy", [False, True])
def test_every_dtype_views_and_shared_storages(tmp_path, legacy):
    base = torch.arange(24, dtype=torch.float32)
    obj = {
        "f32": torch.randn(3, 4),
        "f64": torch.randn(5, dtype=torch.float64),
        "f16": torch.randn(6).half(),
        "bf16": torch.tensor([1.5, float("inf"), -2.0, float("nan")], dtype=torch.bfloat16),
        "i64": torch.arange(4),
        "i32": torch.arange(4, dtype=torch.int32),
        "i16": torch.arange(3, dtype=torch.int16),
        "i8": torch.arange(-2, 2, dtype=torch.int8),
        "u8": torch.arange(5, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "slice": base[2:20:3],
        "t": base.view(4, 6).t(),
        "shared": base.view(2, 12),
        "scalar": torch.tensor(7.0),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.ones(2)),
        "expanded": torch.ones(3, 1).expand(3, 4),
    }
    path = tmp_path / "d.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    ref = torch.load(path, weights_only=True)
    got = read_pt(path)
    for k, t in ref.items():
        want = t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()
        a = got[k].array
        assert a.shape == want.shape and a.dtype == want.dtype, k
        assert np.array_equal(a, want, equal_nan=True), k
        assert got[k].dtype == str(t.dtype).removeprefix("torch."), k


def test_lightning_checkpoint_and_cli_imports_no_torch(tmp_path):
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
            "epoch": 2,
            "global_step": 10,
        },
        tmp_path / "last.ckpt",
    )
    _same_checkpoint(tmp_path / "last.ckpt")
    code = (
        "import sys; from nanscope.cli.main import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, "inspect", str(tmp_path / "last.ckpt")],
        capture_output=True,
        text=True,
    )
    assert (
        p.returncode == 1 and p.stderr == "" and "optimizer[model.0.weight].exp_avg_sq" in p.stdout
    )


@pytest.mark.filterwarnings(
    "ignore:torch.quantize_per_tensor:UserWarning"
)  # deprecated in torch, still loadable
def test_quantized_tensor_falls_back_to_torch_weights_only(tmp_path):
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    torch.save({"w": torch.ones(2), "q": q}, tmp_path / "q.pt")
    ref = torch.load(tmp_path / "q.pt", weights_only=True)
    assert ref["q"].is_quantized
    r = inspect(
        tmp_path / "q.pt"
    )  # nanscope's reader cannot build it: torch's weights_only loader does
    assert r.exit_code in (0, 1) and r.stats["format"] == "torch"
