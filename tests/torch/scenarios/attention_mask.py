"""A tiny self-attention encoder over padded sequences; one sequence of the second batch has
length 0, so every key of its rows is masked with -inf and softmax returns NaN (0 / 0).
Partially padded sequences are fine: each of their rows keeps at least one key."""

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

BAD_BATCH, BAD_SAMPLE = 1, 2


class Attention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.scale = dim**-0.5

    def forward(self, x, pad):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = (q @ k.transpose(1, 2)) * self.scale
        scores = scores.masked_fill(pad[:, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


class Encoder(nn.Module):
    def __init__(self, dim=8, classes=3):
        super().__init__()
        self.attn = Attention(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x, pad):
        h = self.attn(x, pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1).clamp_min(1))


def build(empty_sequence=True):
    torch.manual_seed(0)
    model = Encoder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    batches = []
    for b in range(3):
        lengths = torch.randint(1, 6, (4,), generator=g)
        if empty_sequence and b == BAD_BATCH:
            lengths[BAD_SAMPLE] = 0
        pad = torch.arange(6)[None, :] >= lengths[:, None]
        batches.append(
            ((torch.randn(4, 6, 8, generator=g), pad), torch.randint(0, 3, (4,), generator=g))
        )

    def train_step(batch):
        (x, pad), y = batch
        loss = F.cross_entropy(model(x, pad), y)
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
