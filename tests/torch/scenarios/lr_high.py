"""Linear regression with a learning rate far too high: every step overshoots further,
the weights and gradients grow geometrically until they overflow."""

import types

import torch
import torch.nn as nn

STEPS = 40


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 1, generator=g)
    batches = []
    for _ in range(STEPS):
        x = torch.randn(16, 8, generator=g) * 3
        batches.append((x, x @ w))

    def train_step(batch):
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
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
        if i % 10 == 0:
            print(f"step {i} loss {loss.item():.4g}")


if __name__ == "__main__":
    main()
