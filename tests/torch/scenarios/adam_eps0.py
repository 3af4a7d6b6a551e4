"""A bag-of-words text classifier trained with Adam(eps=0) (the paper's "exact" Adam), notebook
style. The embedding gets dense gradients: every word that is not in the first batch has a
gradient of exactly 0, so its exp_avg and exp_avg_sq are 0 and the update divides 0 / 0.
``--foreach`` (or ``--fused``) runs the same with torch's multi-tensor (fused) Adam."""

import sys

import torch
import torch.nn as nn

torch.manual_seed(0)
vocab, classes = 50, 3
model = nn.Sequential(nn.EmbeddingBag(vocab, 8, mode="mean"), nn.Linear(8, classes))
impl = {"--foreach": dict(foreach=True), "--fused": dict(fused=True)}.get(sys.argv[-1], {})
opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=0.0, **impl)

g = torch.Generator().manual_seed(1)
for step in range(3):
    words = torch.randint(0, 20, (6, 5), generator=g)  # short texts use the first 20 words
    labels = torch.randint(0, classes, (6,), generator=g)
    loss = nn.functional.cross_entropy(model(words), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step} loss {loss.item():.4f}")
