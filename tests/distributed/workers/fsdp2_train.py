"""A user's FSDP2 training script, as torchrun starts it: each Linear and the whole model
``fully_shard``-ed on a 1-d device mesh, a different batch per rank (data parallel), AdamW.

``--bad-batch RANK:STEP`` puts a NaN into sample 3 of that rank's batch at that step.
``--bad-sqrt RANK:STEP`` makes the first feature of sample 2 negative on that rank at that
step: the model's ``sqrt`` of it (meant to be a non-negative magnitude) is NaN on that rank
only. Prints the last loss and a hash of this rank's weight shards."""

import argparse
import gc
import hashlib
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

parser = argparse.ArgumentParser()
parser.add_argument("--bad-batch", default=None, metavar="RANK:STEP")
parser.add_argument("--bad-sqrt", default=None, metavar="RANK:STEP")
parser.add_argument("--steps", type=int, default=4)
args = parser.parse_args()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([torch.sqrt(x[:, :1]), x[:, 1:]], dim=1)  # feature 0: a magnitude
        return self.body(x)


dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
torch.manual_seed(0)
model = Net()
for layer in model.body:
    if isinstance(layer, nn.Linear):
        fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
opt = torch.optim.AdamW(model.parameters(), lr=0.01)
g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard of the data
loss = None
for step in range(args.steps):
    x, y = torch.rand(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
    if args.bad_batch == f"{rank}:{step}":
        x[3, 1] = float("nan")
    if args.bad_sqrt == f"{rank}:{step}":
        x[2, 0] = -0.5
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
