"""`nanscope.data.audit` on a torch Dataset and DataLoader: the sample indices are the dataset's."""

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from nanscope.data import audit


class Pairs(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(20, 3, 8, 8, generator=g)
        self.x[13, 1, 2, 2] = float("nan")
        self.y = torch.randint(0, 4, (20, 8, 8), generator=g)
        self.y[6] = 255  # every pixel ignored
        self.y[9, 0, 0] = 7  # outside [0, 4)

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return {"image": self.x[i], "mask": self.y[i]}


def _check(r):
    by = {(f.category.value, f.severity, f.summary.split(":")[0]): f for f in r.findings}
    (nan,) = [f for k, f in by.items() if k[0] == "nonfinite_input"]
    assert nan.samples == [13] and nan.framework == "torch"
    (oor,) = [f for f in r.findings if "outside [0, 4)" in f.summary]
    assert oor.samples == [9]
    (ign,) = [f for f in r.findings if "0/0" in f.summary]
    assert ign.samples == [6]
    assert r.stats["samples"] == 20 and r.stats["source"] == "torch"


def test_dataset_and_dataloader_give_the_same_findings():
    ds = Pairs()
    _check(audit(ds, num_classes=4, ignore_index=255))
    _check(audit(DataLoader(ds, batch_size=6), num_classes=4, ignore_index=255))


def test_healthy_tensor_dataset_is_clean_and_bfloat16_is_read():
    x = torch.randn(16, 5).to(torch.bfloat16)
    y = torch.arange(16) % 4
    r = audit(DataLoader(TensorDataset(x, y), batch_size=5), num_classes=4)
    assert r.findings == [] and r.stats["inputs"]["x"]["dtype"] == "float32"
    assert r.stats["targets"]["y"]["histogram"] == {"0": 4, "1": 4, "2": 4, "3": 4}
    assert np.isfinite(r.stats["inputs"]["x"]["std"])
