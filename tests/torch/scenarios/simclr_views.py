"""SimCLR-style contrastive training in a class-based trainer: two augmented views of each
image go through the model separately, and the NT-Xent loss concatenates their projections,
``torch.cat([z1, z2])``, before normalizing them by hand. Random erasing blanks the whole of
sample 1's second view in the second batch; the projection head has no bias, so that row of
the concatenation (row 5 of 8) is 0 and its normalization is 0 / 0."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(12, 16, bias=False), nn.ReLU())
        self.projector = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return self.projector(self.backbone(x))


class SimCLRTrainer:
    def __init__(self, model, temperature=0.5):
        self.model = model
        self.temperature = temperature
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def augment(self, x, g, erase=()):
        view = x + 0.05 * torch.randn(x.shape, generator=g)
        for i in erase:  # random erasing, here of the whole image
            view[i] = 0.0
        return view

    def nt_xent(self, z1, z2):
        n = z1.shape[0]
        z = torch.cat([z1, z2])  # CAT_LINE
        z = z / z.norm(dim=1, keepdim=True)  # DIV_LINE
        sim = z @ z.T / self.temperature
        sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
        positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
        return F.cross_entropy(sim, positives)

    def fit(self, images, g):
        for step, x in enumerate(images):
            x1 = self.augment(x, g)
            x2 = self.augment(x, g, erase=[1] if step == 1 else [])
            loss = self.nt_xent(self.model(x1), self.model(x2))
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            print(f"step {step} loss {loss.item():.4f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(4, 12, generator=g) for _ in range(3)]
    SimCLRTrainer(Encoder()).fit(images, g)
