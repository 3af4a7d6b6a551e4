"""A hand-written softmax, exp(x) / sum(exp(x)), without subtracting the max: logits above
~88 overflow float32's exp to Inf, and Inf / Inf = NaN."""

import types

import torch
import torch.nn as nn

BAD_BATCH, BAD_SAMPLE = 1, 1


class NaiveSoftmax(nn.Module):
    def forward(self, x):
        e = torch.exp(x)
        return e / e.sum(dim=1, keepdim=True)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 5)
        self.softmax = NaiveSoftmax()

    def forward(self, x):
        return self.softmax(self.fc(x))


def build():
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(4, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(3)
    ]
    batches[BAD_BATCH][0][BAD_SAMPLE] *= 500.0

    def train_step(batch):
        x, y = batch
        probs = model(x)
        loss = -torch.log(probs[torch.arange(len(y)), y] + 1e-6).mean()
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
