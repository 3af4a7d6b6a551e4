"""The seed scenario on the real torchvision DeepLabv3-ResNet50 (random weights, tiny images):
training is fine, validation loss is NaN. nanscope must name the real layer of that model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanscope.core.enums import Category
from nanscope.torch import diagnose_eval

torchvision = pytest.importorskip("torchvision")  # part of nanscope[torch]: present in CI

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deeplab():
    torch.manual_seed(0)
    model = torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=3
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=g)
    y = torch.randint(0, 3, (2, 64, 64), generator=g)
    y[:, :4] = 255
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    loss = F.cross_entropy(model(x)["out"], y, ignore_index=255)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)  # training is fine
    return model, x, y


def loss_fn(output, y):
    return F.cross_entropy(output["out"], y, ignore_index=255)


def test_corrupt_running_var_in_layer4_is_named(deeplab):
    model, x, y = deeplab
    bn = model.backbone.layer4[2].bn3
    saved = bn.running_var.clone()
    try:
        with torch.no_grad():
            bn.running_var[7] = float("nan")
        model.eval()
        with torch.no_grad():
            assert torch.isnan(loss_fn(model(x), y))  # the validation loss is NaN
        d = diagnose_eval(model, [(x, y)], loss_fn)
        assert d.category is Category.CORRUPT_NORM_STATISTICS
        assert d.module == "backbone.layer4.2.bn3"
        assert "train-mode output finite: True; eval-mode output finite: False" in d.evidence[0]
        assert d.samples == [0, 1] and d.details["bad_batches"] == [0]
        assert not model.training and torch.isnan(bn.running_var[7])  # state left as it was
    finally:
        with torch.no_grad():
            bn.running_var.copy_(saved)


def test_all_ignore_validation_mask_on_deeplab(deeplab):
    model, x, y = deeplab
    model.eval()
    val = [(x[:1], y[:1]), (x[1:], torch.full_like(y[1:], 255))]
    d = diagnose_eval(model, val, loss_fn)
    assert (d.category, d.op_kind, d.samples) == (Category.INVALID_TARGET, "cross_entropy", [0])
    assert d.details["bad_batches"] == [1]


SEED_SCRIPT = """
import io, torch, torch.nn.functional as F, torchvision

torch.manual_seed(0)
model = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=3)
state = model.state_dict()
state["backbone.layer4.2.bn3.running_var"][7] = float("nan")   # the checkpoint we resume from
buf = io.BytesIO(); torch.save(state, buf); buf.seek(0)
model.load_state_dict(torch.load(buf, weights_only=True))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x = torch.randn(2, 3, 64, 64); y = torch.randint(0, 3, (2, 64, 64)); y[:, :4] = 255
model.train()
opt.zero_grad()
loss = F.cross_entropy(model(x)["out"], y, ignore_index=255)
loss.backward(); opt.step()
print("train loss", loss.item())
model.eval()
with torch.no_grad():
    val = F.cross_entropy(model(x[:1])["out"], y[:1], ignore_index=255)
print("validation loss", val.item())
"""


def test_nanscope_run_on_the_seed_script(tmp_path, capsys):
    from nanscope.cli.main import main as cli_main

    script = tmp_path / "train_deeplab.py"
    script.write_text(SEED_SCRIPT)
    report = tmp_path / "report.json"
    assert cli_main(["run", str(script), "--json", str(report)]) == 1
    assert "train loss" in capsys.readouterr().out  # training went through, validation did not
    import json

    d = json.loads(report.read_text())["diagnosis"]
    assert (d["category"], d["module"], d["step"]) == (
        "corrupt_norm_statistics",
        "backbone.layer4.2.bn3",
        1,
    )
