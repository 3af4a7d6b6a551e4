"""The built-in example behind ``nanscope demo``: a small DeepLabv3-style segmentation run whose
validation loss goes NaN for a real reason, diagnosed with ``diagnose_eval``.

The model has what makes DeepLabv3 what it is, at toy size: a strided backbone with
BatchNorm, a dilated (atrous) last stage, an ASPP head (1x1 + three dilated 3x3 branches +
image pooling) and a bilinear upsampling to the input size. The data are generated shapes on
noise (nothing to download), labelled per pixel, with an unlabelled border marked
``ignore_index=255`` the way Cityscapes / VOC masks are. Training is healthy. One validation
frame has no labelled pixel at all: the mean cross-entropy then averages over 0 pixels, 0/0,
and the validation loss is NaN.

Design constraints: deterministic (fixed seeds), CPU only, a few seconds on two cores; no
file is written unless asked (``json_path``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanscope.core.diagnosis import Diagnosis
from nanscope.core.enums import Category
from nanscope.torch.evaluate import diagnose_eval

CLASSES, IGNORE, SIZE = 3, 255, 32
EMPTY_FRAME = 5  # the validation frame whose mask is entirely IGNORE


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling, as in DeepLabv3 (rates scaled down for 8x8 features)."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...] = (1, 2, 3)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn(cin, cout, 1)] + [_conv_bn(cin, cout, 3, dilation=r) for r in rates]
        )
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.ReLU()
        )
        self.project = _conv_bn(cout * (len(rates) + 2), cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(
            self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False
        )
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class TinyDeepLab(nn.Module):
    """Backbone (output stride 4, dilated last stage) + ASPP head + classifier."""

    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            _conv_bn(3, 16, stride=2), _conv_bn(16, 32, stride=2), _conv_bn(32, 32, dilation=2)
        )
        self.aspp = ASPP(32, 16)
        self.classifier = nn.Conv2d(16, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.classifier(self.aspp(self.backbone(x)))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def make_frame(g: torch.Generator, *, labelled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One generated image (3 x SIZE x SIZE) and its mask: a square (class 1) and a disc (class 2)."""
    img = torch.randn(3, SIZE, SIZE, generator=g) * 0.3
    mask = torch.zeros(SIZE, SIZE, dtype=torch.long)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    x0, y0 = (int(v) for v in torch.randint(2, SIZE - 12, (2,), generator=g))
    square = (xx >= x0) & (xx < x0 + 10) & (yy >= y0) & (yy < y0 + 10)
    cx, cy = (int(v) for v in torch.randint(8, SIZE - 8, (2,), generator=g))
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 < 36
    mask[square], mask[disc] = 1, 2
    img[0] += square.float()
    img[2] += disc.float()
    mask[:2, :] = IGNORE  # the unlabelled border every annotation tool leaves
    mask[-2:, :] = IGNORE
    if not labelled:
        mask.fill_(IGNORE)
    return img, mask


def loss_fn(output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, mask, ignore_index=IGNORE)


@dataclass
class DemoResult:
    diagnosis: Diagnosis | None
    train_losses: list[float]
    val_losses: list[float]
    seconds: float
    val_batches: list = field(
        default_factory=list
    )  # (image, mask) batches, for the HTML report's thumbnails

    @property
    def as_expected(self) -> bool:
        d = self.diagnosis
        return (
            d is not None
            and d.category is Category.INVALID_TARGET
            and d.details.get("bad_batches") == [EMPTY_FRAME]
            and d.samples == [0]
        )


def run_demo(*, steps: int = 6, say: Callable[[str], None] = print) -> DemoResult:
    """Train the toy DeepLab a few steps, validate (NaN), and diagnose the validation run.

    Example:
        >>> r = run_demo(steps=2, say=lambda line: None)
        >>> r.as_expected, r.diagnosis.category
        (True, <Category.INVALID_TARGET: 'invalid_target'>)
    """
    start = time.perf_counter()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = TinyDeepLab()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train = [
        torch.utils.data.default_collate([make_frame(g) for _ in range(4)]) for _ in range(steps)
    ]
    val = [
        torch.utils.data.default_collate([make_frame(g, labelled=i != EMPTY_FRAME)])
        for i in range(8)
    ]

    say(
        f"nanscope demo: training a DeepLabv3-style model (dilated backbone, ASPP, BatchNorm) on "
        f"{steps} batches of generated {SIZE}x{SIZE} images"
    )
    train_losses = []
    model.train()
    for i, (x, y) in enumerate(train):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        train_losses.append(loss.item())
        say(f"  step {i}: train loss {train_losses[-1]:.4f}")
    model.eval()
    with torch.no_grad():
        val_losses = [loss_fn(model(x), y).item() for x, y in val]
    mean = sum(val_losses) / len(val_losses)
    say(f"  validation loss: {mean:.4f}   <- the training loss was fine; why is validation NaN?")
    say("  running nanscope.torch.diagnose_eval(model, val_loader, loss_fn) ...")
    diagnosis = diagnose_eval(model, val, loss_fn)
    return DemoResult(diagnosis, train_losses, val_losses, time.perf_counter() - start, val)
