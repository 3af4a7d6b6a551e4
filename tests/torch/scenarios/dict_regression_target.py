"""House-price regression over a DataLoader of dicts, as a dataset class returns them:
{"features": ..., "price": ...}. One price is NaN (a missing value in the CSV). The target
key is nobody's convention, so only what the loss consumes says it is the target."""

import torch
from torch.utils.data import DataLoader, Dataset


class Houses(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.features = torch.randn(20, 4, generator=g)
        self.price = self.features.sum(1, keepdim=True) * 3 + 10
        self.price[13] = float("nan")  # a missing value read from the CSV

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        return {"features": self.features[i], "price": self.price[i]}


torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for batch in DataLoader(Houses(), batch_size=5):
    pred = model(batch["features"])
    loss = torch.nn.functional.mse_loss(pred, batch["price"])
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"loss {loss.item():.3f}")
