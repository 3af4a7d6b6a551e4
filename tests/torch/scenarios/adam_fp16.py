"""A model trained entirely in float16 with Adam(eps=1e-8): eps rounds to 0 in float16 and
exp_avg_sq underflows to 0 for small gradients, so the update divides by zero."""

import types

import torch
import torch.nn as nn


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).half()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-8)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(5):
        x = torch.randn(4, 8, generator=g).half()
        batches.append((x, torch.zeros(4, 1, dtype=torch.float16)))

    def train_step(batch):
        x, y = batch
        loss = ((model(x) - y) ** 2).mean() * 1e-3  # a small loss: small gradients
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
        print(f"step {i} loss {loss.item():.4g}")


if __name__ == "__main__":
    main()
