"""Notebook-style training on crowd-sourced soft labels: each image's label is the share of
annotators' votes per class, and the cross-entropy against them is written by hand. Sample 1
of the second batch got no votes at all, so its soft label is 0 / 0 = NaN in every class."""

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

rng = np.random.default_rng(0)
images = torch.from_numpy(rng.normal(size=(12, 1, 6, 6)).astype(np.float32))
votes = rng.integers(0, 5, size=(12, 3)).astype(np.float32)
votes[5] = 0  # every annotator skipped this image
with np.errstate(invalid="ignore"):
    soft = torch.from_numpy(votes / votes.sum(1, keepdims=True))

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
loader = DataLoader(TensorDataset(images, soft), batch_size=4)

for step, (x, y) in enumerate(loader):
    logits = model(x)
    loss = -(y * torch.log_softmax(logits, dim=-1)).sum(-1).mean()  # LOSS_LINE
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step} loss {loss.item():.4f}")
