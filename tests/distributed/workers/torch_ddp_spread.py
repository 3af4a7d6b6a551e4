"""A guarded DDP run written the way people write one (a trainer class), against an untouched
copy of the same model trained on the same batches. Rank 1 alone meets three kinds of step
that only it can see:

* a loss that is NaN while every gradient stays finite (a term computed without gradient),
* a BatchNorm whose running variance overflows in its own forward (the normalized output
  stays finite, so the gradients do too),
* nothing: the healthy steps, which must leave the guarded model bit-identical to the
  untouched one.

The guard's flag rides DDP's own gradient all-reduce, so these must still be seen by both
ranks. A comm hook registered by the user keeps working and the guard stays correct."""

import gc
import json
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from nanscope.torch import Guard

out, case = Path(sys.argv[1]), sys.argv[2]
warnings.simplefilter("ignore")
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x))


class Trainer:
    def __init__(self, guarded: bool):
        torch.manual_seed(0)
        self.model = DDP(Net())
        if case == "user_hook":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            self.model.register_comm_hook(None, default_hooks.allreduce_hook)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.guard = Guard(self.model, self.opt, policy="skip", reports=None) if guarded else None
        self.penalty = torch.zeros(())  # a logged term, computed without gradient

    def step_fn(self, batch):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y) + self.penalty
        loss.backward()
        return loss

    def fit(self, batches):
        applied = []
        for i, batch in enumerate(batches):
            self.penalty = torch.zeros(())
            if rank == 1 and case == "loss_only" and i == 2:
                self.penalty = torch.tensor(float("nan"))
            before = [p.detach().clone() for p in self.model.parameters()]
            if self.guard is None:
                self.opt.zero_grad(set_to_none=True)
                self.step_fn(batch)
                self.opt.step()
            else:
                self.guard.step(self.step_fn, batch)
            applied.append(
                any(
                    not torch.equal(a, p)
                    for a, p in zip(before, self.model.parameters(), strict=True)
                )
            )
        return applied


g = torch.Generator().manual_seed(10 + rank)
batches = [
    (torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(5)
]
if rank == 1 and case == "buffer_only":
    batches[2][0][:, :] = batches[2][0][:, :1] * 3e19  # same value in every row: var is 0...
    batches[2][0][0, :] = -3e19  # ...but one row far off: the unbiased running var overflows
plain, guarded = Trainer(False), Trainer(True)
result = {"applied": guarded.fit(batches)}
if case in ("healthy", "user_hook"):
    plain.fit(batches)
    result["same_as_unguarded"] = all(
        torch.equal(a, b)
        for a, b in zip(
            plain.model.state_dict().values(), guarded.model.state_dict().values(), strict=True
        )
    )
d = guarded.guard.last
result.update(
    skipped=guarded.guard.skipped,
    disabled=guarded.guard.disabled,
    diagnosis=d.fields_dict() if d else None,
    weights=[repr(p.detach().double().sum().item()) for p in guarded.model.parameters()],
)
(out / f"rank{rank}.json").write_text(json.dumps(result))
dist.barrier()
# Drop what holds the process group, so it is destroyed here and not at exit (conftest.py).
plain = guarded = None
gc.collect()
dist.destroy_process_group()
