"""``nanscope run`` on the most common loaders: a map-style dataset read one row at a time
(``TensorDataset``, a ``Dataset`` class returning dicts), shuffled, and an ``IterableDataset``
parsing CSV lines (an empty cell read as NaN); the rows stacked into the batch by the default
collate. The NaN's ``samples`` are its rows in the batch (the contract), and its row in the
dataset, where there is one, is evidence. The scripts print where the bad row really landed,
found without nanscope; the tests compare."""

import json
import re
import subprocess
import sys
import textwrap

import pytest

TENSOR_DATASET = """
    import torch, torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 10, generator=g), torch.randint(0, 4, (48,), generator=g)
    x[27, 2] = float("nan")
    model = torch.nn.Linear(10, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(1))
    for step, (xb, yb) in enumerate(loader):
        if not torch.isfinite(xb).all():
            print("truth", step, torch.nonzero(~torch.isfinite(xb).all(1)).flatten().tolist())
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
"""

DICT_DATASET = """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset


    class Readings(Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.features = torch.rand(40, 6, generator=g)
            self.features[[9, 30], 1] = float("inf")  # two broken sensors
            self.target = self.features[:, :1].clone().nan_to_num(posinf=1.0)

        def __len__(self):
            return len(self.features)

        def __getitem__(self, i):
            return {"features": self.features[i], "target": self.target[i]}


    class Regressor(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))

        def forward(self, features):
            return self.layers(features)


    model = Regressor()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = DataLoader(Readings(), batch_size=10, shuffle=True,
                        generator=torch.Generator().manual_seed(3))
    for epoch in range(2):
        for step, batch in enumerate(loader):
            bad = ~torch.isfinite(batch["features"]).all(1)
            if bad.any():
                print("truth", epoch * len(loader) + step, torch.nonzero(bad).flatten().tolist())
            loss = nn.functional.mse_loss(model(batch["features"]), batch["target"])
            opt.zero_grad()
            loss.backward()
            opt.step()
"""


CSV_STREAM = """
    import io, random
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    random.seed(0)
    lines = [
        ",".join("" if (i, j) == (13, 2) else f"{random.gauss(0, 1):.4f}" for j in range(6))
        + f",{i % 3}"
        for i in range(40)
    ]


    class CsvRows(IterableDataset):
        def __iter__(self):
            for line in io.StringIO("\\n".join(lines)):
                *feats, label = line.strip().split(",")
                yield torch.tensor([float(v) if v else float("nan") for v in feats]), int(label)


    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, (x, y) in enumerate(DataLoader(CsvRows(), batch_size=8)):
        if not torch.isfinite(x).all():
            print("truth", step, torch.nonzero(~torch.isfinite(x).all(1)).flatten().tolist())
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
"""


@pytest.mark.parametrize(
    "source, rows",
    [(TENSOR_DATASET, [27]), (DICT_DATASET, [9, 30]), (CSV_STREAM, None)],
    ids=["tensor", "dict", "csv_stream"],
)
def test_samples_are_the_rows_in_the_batch(tmp_path, source, rows):
    script, out = tmp_path / "train.py", tmp_path / "out.json"
    script.write_text(textwrap.dedent(source))
    proc = subprocess.run(
        [sys.executable, "-m", "nanscope", "run", "--json", str(out), str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    step, truth = re.search(r"truth (\d+) (\[[\d, ]*\])", proc.stdout).groups()
    d = json.loads(out.read_text())["diagnosis"]
    assert (d["category"], d["step"]) == ("nonfinite_input", int(step))
    assert d["samples"] == json.loads(truth)  # its rows in the batch, not in the dataset
    if rows is None:  # each row is a tensor of its own: no bigger tensor to point into
        assert "dataset_rows" not in d.get("details", {}), d
        return
    in_dataset = d["details"]["dataset_rows"]  # ...which are evidence
    assert set(in_dataset) <= set(rows) and len(in_dataset) == len(d["samples"])
    assert any(e.startswith("rows of the whole [") for e in d["evidence"])
