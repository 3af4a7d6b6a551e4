"""torchrun used to run a seed sweep: each rank trains its own small model on its own data
with its own seed (no DDP: the ranks are not in lock-step) and the ranks only meet at the end,
to gather their final losses.

``--bad-batch RANK:STEP`` (repeatable) puts a NaN into sample 3 of that rank's batch at that
step; ``--slow RANK:SECONDS`` makes that rank's data loading take that long per batch."""

import argparse
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

parser = argparse.ArgumentParser()
parser.add_argument("--bad-batch", action="append", default=[], metavar="RANK:STEP")
parser.add_argument("--slow", action="append", default=[], metavar="RANK:SECONDS")
parser.add_argument("--steps", type=int, default=5)
args = parser.parse_args()

dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
delay = {int(r): float(s) for r, s in (x.split(":") for x in args.slow)}.get(rank, 0.0)
torch.manual_seed(rank)
model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for step in range(args.steps):
    time.sleep(delay)
    x = torch.randn(4, 6)
    y = x.sum(dim=1, keepdim=True)
    if f"{rank}:{step}" in args.bad_batch:
        x[3, 1] = float("nan")
    opt.zero_grad()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    opt.step()
finals = [None] * world
dist.all_gather_object(finals, loss.item())
if rank == 0:
    print("final losses:", finals)
dist.destroy_process_group()
