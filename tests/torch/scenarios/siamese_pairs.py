"""Signature verification with a siamese network, notebook style: anchor and positive go
through the encoder in one forward call, ``model(torch.cat([anchor, positive]))``, and the
embeddings are L2-normalized by hand. One positive scan in the second batch is blank; the
encoder has no bias, so its embedding is exactly 0 and 0 / 0 = NaN. The bad row is row 6 of
the concatenated batch of 8: sample 2 of the positives."""

import torch
import torch.nn as nn

BATCH, BAD_BATCH, BAD_SAMPLE = 4, 1, 2


class L2Normalize(nn.Module):
    def forward(self, z):
        return z / z.norm(dim=1, keepdim=True)  # DIV_LINE


class SiameseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 8 * 8, 16, bias=False),
        )
        self.normalize = L2Normalize()

    def forward(self, x):
        return self.normalize(self.encoder(x))


torch.manual_seed(0)
model = SiameseNet()
opt = torch.optim.SGD(model.parameters(), lr=0.05)
g = torch.Generator().manual_seed(1)
pairs = []
for _ in range(3):
    anchor = torch.rand(BATCH, 1, 8, 8, generator=g)
    positive = anchor + 0.1 * torch.randn(BATCH, 1, 8, 8, generator=g)
    same = torch.randint(0, 2, (BATCH,), generator=g).float()
    pairs.append((anchor, positive, same))
pairs[BAD_BATCH][1][BAD_SAMPLE] = 0.0  # a blank scan

for step, (anchor, positive, same) in enumerate(pairs):
    emb = model(torch.cat([anchor, positive]))  # CAT_LINE
    za, zp = emb[:BATCH], emb[BATCH:]
    dist = (za - zp).pow(2).sum(1)
    loss = (same * dist + (1 - same) * torch.relu(1.0 - dist)).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step} loss {loss.item():.4f}")
