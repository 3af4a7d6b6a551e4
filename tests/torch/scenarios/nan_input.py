"""A small CNN classifier; one image of the third batch holds a NaN pixel (a corrupt file)."""

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

BAD_BATCH, BAD_SAMPLE = 2, 5


def build():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g))
        for _ in range(4)
    ]
    batches[BAD_BATCH][0][BAD_SAMPLE, 1, 7, 9] = float("nan")

    def train_step(batch):
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return types.SimpleNamespace(
        model=model, optimizer=optimizer, batches=batches, train_step=train_step
    )


def main():
    s = build()
    for i, batch in enumerate(s.batches):
        s.optimizer.zero_grad()
        loss = s.train_step(batch)
        s.optimizer.step()
        print(f"step {i} loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
