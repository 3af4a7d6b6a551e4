"""Mixed precision on real CPU runs: headroom, float16 overflow localization, GradScaler forensics."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanscope.core.enums import Category, Phase
from nanscope.torch.amp import headroom, locate_overflow, watch_scaler


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(var + 1e-6)).to(x.dtype) * self.weight


class FeedForward(nn.Module):  # T5's DenseReluDense: wi -> relu -> wo
    def __init__(self, d, ff):
        super().__init__()
        self.wi = nn.Linear(d, ff, bias=False)
        self.act = nn.ReLU()
        self.wo = nn.Linear(ff, d, bias=False)

    def forward(self, x):
        return self.wo(self.act(self.wi(x)))


class T5Block(nn.Module):
    def __init__(self, d=16, ff=64, classes=4):
        super().__init__()
        self.norm = RMSNorm(d)
        self.ffn = FeedForward(d, ff)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = x + self.ffn(self.norm(x))
        return self.head(h / h.norm(dim=-1, keepdim=True).clamp_min(1e-3))


def t5_block(wo_scale):
    """A T5-like block whose feed-forward output grows with ``wo``'s weights, as T5's does."""
    torch.manual_seed(0)
    model = T5Block()
    with torch.no_grad():
        model.ffn.wo.weight.mul_(wo_scale)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)


def test_headroom_flags_t5_wo_before_it_overflows(tmp_path):
    model = t5_block(30000.0)
    x, y = batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = headroom(model, (x, y), F.cross_entropy)
    top = report.layers[0]
    assert top.name == "ffn.wo" and top.status == "danger" and 1e4 < top.act_absmax < 65504
    assert 0 < top.headroom_bits < 4 and top.grad_absmax is not None
    assert report["head"].status == "ok" and report["ffn.wi"].status == "ok"
    assert all(p.grad is None for p in model.parameters())  # nothing written into .grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "ffn.wo" in str(report).splitlines()[2] and "danger" in str(report)
    d = report.to_dict()
    assert d["max"] == 65504 and d["layers"][0]["status"] == "danger"
    report.plot(tmp_path / "headroom.png")
    report.plot(tmp_path / "headroom.svg")
    assert (tmp_path / "headroom.png").read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in (tmp_path / "headroom.svg").read_bytes()[:2000]

    # The warning was right: a little more growth and float16 overflows exactly there.
    model.ffn.wo.weight.data.mul_(3.0)
    half = t5_block(1.0)
    half.load_state_dict(model.state_dict())
    half.half()
    assert not torch.isfinite(half(x.half())).all()
    diag = locate_overflow(half, x.half())
    assert diag.category is Category.OVERFLOW and diag.phase is Phase.FORWARD
    assert diag.module == "ffn.wo" and diag.op_kind == "matmul" and diag.dtype == "float16"
    assert diag.details["float32_recompute_finite"] and diag.details["float32_absmax"] > 65504
    assert diag.location.function == "forward" and diag.location.file.endswith("test_amp.py")
    assert "model.ffn.wo(x.float())" in diag.fixes[0] and "bfloat16" in diag.fixes[1]
    assert "residual" in diag.fixes[2]
    with torch.no_grad():  # samples: the rows of wo's own output that overflowed
        wo_out = half.ffn.wo(half.ffn.act(half.ffn.wi(half.norm(x.half()))))
    rows = torch.nonzero((~torch.isfinite(wo_out)).any(1)).flatten().tolist()
    assert rows and diag.samples == rows


def test_locate_overflow_under_real_cpu_autocast():
    x, _ = batch()
    model = t5_block(90000.0)
    diag = locate_overflow(model, x, dtype=torch.float16)  # torch.autocast("cpu", float16)
    assert (
        diag.module == "ffn.wo" and diag.category is Category.OVERFLOW and diag.dtype == "float16"
    )
    assert locate_overflow(model, x, dtype=torch.bfloat16) is None  # bfloat16 has float32's range
    assert locate_overflow(model, x) is None  # float32 itself is fine
    assert locate_overflow(t5_block(1.0), x, dtype=torch.float16) is None  # healthy: silent


def test_float16_gradient_underflow_is_reported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    tiny_loss = lambda out, t: 1e-7 * F.mse_loss(out, t)  # noqa: E731  (gradients ~1e-9)
    report = headroom(model, (x, y), tiny_loss)
    assert report.parameters["0.weight"] > 0.5
    # ...and it is real: the same gradients taken in float16 are zero there.
    half = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    half.load_state_dict(model.state_dict())
    half.half()
    tiny_loss(half(x.half()), y.half()).backward()
    g32 = torch.autograd.grad(tiny_loss(model(x), y), model[0].weight)[0]
    zero_only_in_half = ((half[0].weight.grad == 0) & (g32 != 0)).float().mean().item()
    assert zero_only_in_half > 0.5
    assert abs(zero_only_in_half - report.parameters["0.weight"]) < 0.25  # predicted from float32
    assert "flush to zero" in str(report)
    healthy = headroom(model, (x, y), F.mse_loss)
    assert healthy.parameters["0.weight"] < 0.05 and not healthy.at_risk


def _train(model, scaler, opt, steps, x, y):
    taken = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        taken.append(scaler.step(opt))
        scaler.update()
    return taken


def test_watch_scaler_explains_skips_and_stays_quiet_when_it_recovers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = watch_scaler(torch.amp.GradScaler("cpu", init_scale=2.0**24), opt, model)
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        taken = _train(model, scaler, opt, 12, x, y)
    assert not taken[0] and taken[-1]  # the first steps overflow float16, then it settles
    assert len(scaler.skipped) == taken.count(False) >= 2
    assert scaler.skipped[0].step == 0 and scaler.skipped[0].scale == 2.0**24
    assert any(n.endswith("weight") for n in scaler.skipped[0].parameters)
    assert scaler.scales[0] == 2.0**23 and scaler.diagnosis is None
    assert "steps skipped" in scaler.summary()


def test_watch_scaler_diagnoses_a_collapsing_scale():
    model = t5_block(90000.0)  # the float16 forward overflows whatever the scale
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = watch_scaler(torch.amp.GradScaler("cpu", init_scale=16.0), opt, model)
    x, y = batch()
    with pytest.warns(RuntimeWarning, match="loss scale collapsed"):
        taken = _train(model, scaler, opt, 6, x, y)
    assert taken == [False] * 6 and scaler.scales[-1] < 1
    d = scaler.diagnosis
    assert d.category is Category.OVERFLOW and d.phase is Phase.FORWARD and d.dtype == "float16"
    assert "locate_overflow" in d.fixes[0] and d.details["scales"][:2] == [8.0, 4.0]
    assert any(p.startswith("ffn.") for p in d.details["bad_parameters"])
    assert scaler.get_scale() == scaler.scales[-1]  # everything else passes through


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_autocast_float16_overflow_and_scaler():
    x, y = batch()
    model = t5_block(90000.0).cuda()
    diag = locate_overflow(model, x.cuda(), dtype=torch.float16)
    assert diag.module == "ffn.wo" and diag.details["float32_recompute_finite"]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = watch_scaler(torch.amp.GradScaler("cuda", init_scale=16.0), opt, model)
    with pytest.warns(RuntimeWarning, match="loss scale collapsed"):
        for _ in range(6):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = F.cross_entropy(model(x.cuda()), y.cuda())
            scaler.scale(loss).backward()
            assert scaler.step(opt) is False
            scaler.update()


def test_headroom_leaves_rng_buffers_and_mode_as_they_were():
    model = nn.Sequential(
        nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2)
    ).train()
    x, y = torch.randn(3, 4), torch.randint(0, 2, (3,))
    state = torch.get_rng_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    headroom(model, (x, y), F.cross_entropy)
    locate_overflow(model, x, dtype=torch.float16)
    assert torch.equal(state, torch.get_rng_state()) and model.training
    assert all(
        torch.equal(before[k], v) for k, v in model.state_dict().items()
    )  # running stats too


HEADROOM_TABLE = """\
nanscope headroom against float16 (max 65504, smallest normal 6.1e-05)
  layer   kind    max|act|   max|grad|  grad→0  bits left  status
  ffn.wo  Linear  2.326e+04  9.3e-07    5%      1.5        danger
  ffn.wi  Linear  1.78       0.0118     0%      15.2       ok
  head    Linear  0.425      0.0986     -       17.2       ok
parameter gradients that flush to zero in float16:
  ffn.wo.weight: 9% of non-zero entries"""


def test_headroom_table_golden():
    from nanscope.core.headroom import HeadroomReport, LayerHeadroom

    rows = [
        LayerHeadroom("ffn.wo", "Linear", 23260.0, 9.3e-07, 0.05),
        LayerHeadroom("ffn.wi", "Linear", 1.78, 0.0118, 0.0),
        LayerHeadroom("head", "Linear", 0.425, 0.0986, None),
    ]
    report = HeadroomReport(rows, "float16", {"ffn.wo.weight": 0.09, "head.bias": 0.0})
    assert str(report) == HEADROOM_TABLE
    assert [r.status for r in report.layers] == ["danger", "ok", "ok"]
    assert LayerHeadroom("x", "Linear", 70000.0).status == "overflow"
    assert LayerHeadroom("x", "Linear", 1.0, 1e-9, 0.5).status == "underflow"


def test_watch_scaler_with_unscale_and_clipping():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = watch_scaler(torch.amp.GradScaler("cpu", init_scale=2.0**24), opt, model)
    x, y = batch()
    taken = []
    for _ in range(10):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        taken.append(scaler.step(opt))
        scaler.update()
    assert taken[0] is False and taken[-1] is True and taken.count(False) == len(scaler.skipped)
    assert scaler.skipped[0].parameters and scaler.diagnosis is None
