"""Fine-tuning resumes from a checkpoint that was saved after a bad update: one weight of
fc1 is NaN, so the very first step is NaN."""

import io
import types

import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def saved_checkpoint():
    torch.manual_seed(0)
    state = Net().state_dict()
    state["fc1.weight"][4, 7] = float("nan")  # what the bad update left behind
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def build():
    model = Net()
    model.load_state_dict(torch.load(saved_checkpoint(), weights_only=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(4, 10, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)
    ]

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
