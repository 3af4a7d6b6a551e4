"""A siamese encoder trained on pair distances sqrt(sum((a - b)^2)): a pair of identical
inputs gives distance exactly 0, whose gradient is infinite (forward finite, backward NaN)."""

import types

import torch
import torch.nn as nn

BAD_BATCH, BAD_SAMPLE = 1, 1


class PairDistance(nn.Module):
    def forward(self, a, b):
        return torch.sqrt(((a - b) ** 2).sum(dim=1))


class Siamese(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        self.distance = PairDistance()

    def forward(self, a, b):
        return self.distance(self.encoder(a), self.encoder(b))


def build():
    torch.manual_seed(0)
    model = Siamese()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        a, b = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
        batches.append(((a, b), torch.rand(4, generator=g) * 3))
    (a, b), _ = batches[BAD_BATCH]
    b[BAD_SAMPLE] = a[BAD_SAMPLE]  # a duplicated pair

    def train_step(batch):
        (a, b), target = batch
        loss = ((model(a, b) - target) ** 2).mean()
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
