"""Guard.step decides input or target by what consumed the tensor, not by its place in the
batch: a regression target under a key no convention names is invalid_target, and the last
tensor of a tuple batch that the model reads (an input, not a target) is nonfinite_input."""

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from nanscope.torch import Guard


class Houses(Dataset):
    """Rows of a CSV as a dataset class returns them; one price is missing (NaN)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.features = torch.randn(20, 4, generator=g)
        self.price = self.features.sum(1, keepdim=True) * 3 + 10
        self.price[13] = float("nan")

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        return {"features": self.features[i], "price": self.price[i]}


def run(guard, step, batches):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in batches:
            guard.step(step, batch)
    return guard.last


def test_a_target_under_any_key_is_invalid_target():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def step(batch):
        loss = F.mse_loss(model(batch["features"]), batch["price"])
        loss.backward()
        return loss

    d = run(Guard(model, opt, reports=None), step, DataLoader(Houses(), batch_size=5))
    assert (d.category.value, d.phase.value, d.samples, d.step) == (
        "invalid_target",
        "data",
        [3],
        2,
    )
    # what to do about a missing value, not about a batch with no valid target (0/0)
    assert "dropna" in d.fixes[0] and "torch.isfinite(y)" in d.fixes[1]
    assert not any("no valid target" in f for f in d.fixes)


class TwoInputs(nn.Module):
    """An image-and-metadata model: the batch is (labels, image, metadata); the last tensor,
    where a position rule expects the targets, is the metadata the model reads."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(6, 8)
        self.meta = nn.Linear(2, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, image, meta):
        return self.head(torch.relu(self.image(image) + self.meta(meta)))


def test_the_last_tensor_the_model_reads_is_an_input():
    torch.manual_seed(0)
    model = TwoInputs()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randint(0, 3, (4,), generator=g),
            torch.randn(4, 6, generator=g),
            torch.randn(4, 2, generator=g),
        )
        for _ in range(3)
    ]
    batches[1][2][2, 0] = float("nan")  # a missing metadata value in sample 2

    def step(batch):
        labels, image, meta = batch
        loss = F.cross_entropy(model(image, meta), labels)
        loss.backward()
        return loss

    d = run(Guard(model, opt, reports=None), step, batches)
    assert (d.category.value, d.samples, d.step) == ("nonfinite_input", [2], 1)
