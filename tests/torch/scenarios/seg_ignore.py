"""Semantic segmentation (dilated convs + BatchNorm) with ignore_index=255. Training is
fine; in validation (batch size 1) one image's mask is entirely 255 (an unlabeled frame),
so the mean cross-entropy averages over 0 pixels: 0 / 0 = NaN."""

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSES, IGNORE = 4, 255
BAD_VAL_BATCH = 2


class SegNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.context = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.classifier = nn.Conv2d(8, CLASSES, 1)

    def forward(self, x):
        return self.classifier(self.context(self.stem(x)))


def _mask(g, n, size=16):
    y = torch.randint(0, CLASSES, (n, size, size), generator=g)
    y[:, :3, :] = IGNORE  # a border nobody labeled: some ignored pixels are normal
    return y


def build(empty_mask=True):
    torch.manual_seed(0)
    model = SegNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 3, 16, 16, generator=g), _mask(g, 2)) for _ in range(3)]
    val_batches = [(torch.randn(1, 3, 16, 16, generator=g), _mask(g, 1)) for _ in range(4)]
    if empty_mask:
        val_batches[BAD_VAL_BATCH][1].fill_(IGNORE)

    def train_step(batch):
        x, y = batch
        loss = F.cross_entropy(model(x), y, ignore_index=IGNORE)
        loss.backward()
        return loss

    def eval_step(batch):
        x, y = batch
        with torch.no_grad():
            return F.cross_entropy(model(x), y, ignore_index=IGNORE)

    return types.SimpleNamespace(
        model=model,
        optimizer=optimizer,
        batches=batches,
        train_step=train_step,
        eval_step=eval_step,
        val_batches=val_batches,
    )


def run(s):
    model = s.model
    for i, batch in enumerate(s.batches):
        model.train()
        s.optimizer.zero_grad()
        loss = s.train_step(batch)
        s.optimizer.step()
        print(f"step {i} train loss {loss.item():.4f}")
    model.eval()
    total = 0.0
    for batch in s.val_batches:
        total += s.eval_step(batch).item()
    print(f"validation loss {total / len(s.val_batches):.4f}")


def main():
    run(build())


if __name__ == "__main__":
    main()
