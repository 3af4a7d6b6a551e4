"""A hand-written two-process DDP script, the tutorial way: it trains rank 0 itself and starts
rank 1 with ``multiprocessing`` (spawn). Rank 1's batch at step 2 holds a NaN.

When rank 0 stops (nanscope run stops it at the NaN that reached it), Python waits at exit for
rank 1, which waits for rank 0 in DDP's all-reduce until the group's timeout (15 s here)."""

import multiprocessing as mp
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


def train(rank: int, world: int, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=15))
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    for step in range(4):
        x, y = torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
        if (rank, step) == (1, 2):
            x[3, 1] = float("nan")
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    dist.destroy_process_group()


if __name__ == "__main__":
    port = sys.argv[1]
    other = mp.get_context("spawn").Process(target=train, args=(1, 2, port))
    other.start()
    train(0, 2, port)
    other.join(timeout=60)
