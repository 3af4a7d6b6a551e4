"""A user's small DDP training script, as torchrun starts it (env:// rendezvous): a classifier
on random data, one batch of 4 per rank and step.

``--bad-batch RANK:STEP`` (repeatable) puts a NaN into sample 3 of that rank's batch at that
step: a corrupt record in that rank's shard of the data. ``--die RANK:STEP`` kills that rank's
process at the start of that step, as the out-of-memory killer would."""

import argparse
import gc
import os
import signal
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

parser = argparse.ArgumentParser()
parser.add_argument("--bad-batch", action="append", default=[], metavar="RANK:STEP")
parser.add_argument("--die", default=None, metavar="RANK:STEP")
parser.add_argument("--steps", type=int, default=4)
args = parser.parse_args()

dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
torch.manual_seed(0)
model = DDP(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
g = torch.Generator().manual_seed(100 + rank)
for step in range(args.steps):
    if args.die == f"{rank}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    x, y = torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
    if f"{rank}:{step}" in args.bad_batch:
        x[3, 1] = float("nan")
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
# Drop what holds the process group, so it is destroyed here and not at exit (conftest.py).
model = opt = None
gc.collect()
dist.destroy_process_group()
