"""The encoder layer runs in float16 (to save memory); an unnormalized sample pushes the
layer's output past float16's largest value, 65504, so it becomes Inf."""

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

BAD_BATCH, BAD_SAMPLE = 1, 2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(16, 64).half()
        nn.init.normal_(self.encoder.weight, std=1.0)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        h = torch.relu(self.encoder(x.half()))
        return self.head(h.float())


def build():
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(4, 16, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(3)
    ]
    batches[BAD_BATCH][0][BAD_SAMPLE] *= 1e4  # raw sensor counts instead of normalized values

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
