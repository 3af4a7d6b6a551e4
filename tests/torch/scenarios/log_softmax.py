"""An MLP classifier whose hand-written loss takes log(softmax(x)): on confident logits the
softmax underflows to exactly 0 and log(0) = -inf (0 * -inf = NaN in the loss)."""

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

BAD_BATCH, BAD_SAMPLE = 1, 3


def loss_fn(logits, target):
    probs = torch.softmax(logits, dim=1)
    return -(F.one_hot(target, logits.shape[1]) * torch.log(probs)).sum(1).mean()


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(6, 10, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in range(3)
    ]
    batches[BAD_BATCH][0][BAD_SAMPLE] *= 2000.0  # an unnormalized sample: very confident logits

    def train_step(batch):
        x, y = batch
        loss = loss_fn(model(x), y)
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
