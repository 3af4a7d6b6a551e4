"""A user's DDP script as torchrun starts it (env:// rendezvous), guarded or not: rank 1's
batch of step 2 holds a NaN. With ``guard`` every rank writes what its Guard decided; without
it the script is left to ``nanscope run``."""

import gc
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

out, mode = Path(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
torch.manual_seed(0)
model = DDP(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
g = torch.Generator().manual_seed(100 + rank)
data = [(torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(4)]
if rank == 1:
    data[2][0][3, 1] = float("nan")


def train_step(batch):
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


if mode == "guard":
    import warnings

    from nanscope.torch import Guard

    warnings.simplefilter("ignore")
    guard = Guard(model, opt, policy="skip", reports=None)
    for batch in data:
        guard.step(train_step, batch)
    d = guard.last
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "skipped": guard.skipped,
                "diagnosis": d.fields_dict() if d else None,
                "local_rank": os.environ.get("LOCAL_RANK"),
            }
        )
    )
    guard = None  # it holds the model too
else:
    for batch in data:
        opt.zero_grad()
        train_step(batch)
        opt.step()
# Drop what holds the process group, so it is destroyed here and not at exit (conftest.py).
model = opt = None
gc.collect()
dist.destroy_process_group()
