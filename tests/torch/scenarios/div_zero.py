"""A custom layer normalizes each row by its L1 sum; an all-zero sample gives 0 / 0."""

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

BAD_BATCH, BAD_SAMPLE = 1, 2


class RowNormalize(nn.Module):
    def forward(self, x):
        return x / x.abs().sum(dim=1, keepdim=True)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = RowNormalize()
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(self.norm(x))


def build():
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.rand(4, 12, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)
    ]
    batches[BAD_BATCH][0][BAD_SAMPLE] = 0.0  # an empty feature vector

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
