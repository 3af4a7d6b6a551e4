"""A user's tensor-parallel training script, as torchrun starts it: an MLP whose first layer is
column-parallel and whose second is row-parallel (``parallelize_module`` on a 1-d device
mesh), the same batch on every rank as tensor parallelism wants it, SGD.

``--bad-batch RANK:STEP`` puts a NaN into sample 3 of that rank's batch at that step (a corrupt
record read by that rank only). ``--bad-column RANK:STEP`` makes one hidden unit of that rank's
shard negative at that step: the ``log`` of the column-parallel layer's output is then NaN on
that rank only (the row-parallel all-reduce carries it to every rank). Prints the last loss
and a hash of this rank's weight shards."""

import argparse
import gc
import hashlib
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

parser = argparse.ArgumentParser()
parser.add_argument("--bad-batch", default=None, metavar="RANK:STEP")
parser.add_argument("--bad-column", default=None, metavar="RANK:STEP")
parser.add_argument("--steps", type=int, default=4)
args = parser.parse_args()


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 8)
        self.down = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)  # this rank's 4 of the 8 hidden units
        return self.down(torch.log(h))  # the features are meant to be positive


dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
torch.manual_seed(0)
model = MLP()
with torch.no_grad():
    model.up.weight.uniform_(0.0, 0.1)
    model.up.bias.fill_(1.0)
model = parallelize_module(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
opt = torch.optim.SGD(model.parameters(), lr=0.01)
g = torch.Generator().manual_seed(100)  # the same batches on every rank
loss = None
for step in range(args.steps):
    x, y = torch.rand(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
    if args.bad_batch == f"{rank}:{step}":
        x[3, 1] = float("nan")
    if args.bad_column == f"{rank}:{step}":
        with torch.no_grad():
            model.up.bias.to_local()[1] = -5.0  # a hidden unit of this rank's shard goes negative
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
print(f"rank {rank}: last loss {loss.item():.6f}")
shards = b"".join(p.to_local().detach().numpy().tobytes() for p in model.parameters())
print(f"rank {rank}: weights {hashlib.sha256(shards).hexdigest()[:16]}")  # this rank's shards
# Drop what holds the process group, so it is destroyed here and not at exit (conftest.py).
model = opt = mesh = None
gc.collect()
dist.destroy_process_group()
