"""FSDP2 (fully_shard) and DTensor tensor parallel under the Guard, one rank per process,
gloo on localhost. Scenarios, each on a fresh model in the same process group:

* input: a NaN sample on rank 1 at step 2 -> every rank skips step 2, shards bit-identical;
* forward: log of a negative feature on the last rank -> op_domain, that rank named;
* shard: a NaN written into rank 1's shard of ``2.weight`` -> nonfinite_parameters under the
  full name, rank 1 named, every rank stops;
* flip: a forward hook (the test's own) flips an exponent bit of one activation on rank 1,
  once -> the replay is finite: transient, rank 1 named, the update kept out everywhere;
* tp: ColwiseParallel / RowwiseParallel DTensor weights, a NaN in rank 1's shard of ``0.weight``
  (the row-parallel all-reduce then spreads it to every rank's loss).
"""

import faulthandler
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
from torch.distributed.fsdp import fully_shard

from nanscope.torch import Guard

out = Path(sys.argv[1])
faulthandler.enable()
warnings.simplefilter("ignore")
warnings.filterwarnings("always", message="nanscope: (the replay|checking the batch|internal)")
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
LAST = world - 1


class Net(nn.Module):
    def __init__(self, log_feature: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.log_feature = log_feature

    def forward(self, x):
        if self.log_feature:  # log of the first feature, meant to be positive
            x = torch.cat([torch.log(x[:, :1]), x[:, 1:]], dim=1)
        return self.body(x)


def sharded(net):
    for m in net.body:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(net)
    return net


def shards(net):
    return [p.detach().to_local().clone() for p in net.parameters()]


def bits_equal(a, b):  # NaN == NaN bit for bit
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def batches(n=4):
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(n):
        x = torch.randn(4, 6, generator=g)
        x[:, 0] = x[:, 0].abs() + 0.5
        out.append((x, torch.randint(0, 3, (4,), generator=g)))
    return out


def guarded(net, data, *, policy="skip", hook=None):
    torch.manual_seed(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

    def train_step(batch):
        x, y = batch
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    guard = Guard(net, opt, policy=policy, reports=None)
    applied, same = [], []
    for i, batch in enumerate(data):
        if hook is not None:
            hook(i)
        before = shards(net)
        guard.step(train_step, batch)
        after = shards(net)
        same.append(all(bits_equal(a, b) for a, b in zip(before, after, strict=True)))
        applied.append(not same[-1])
        if guard.should_stop:
            break
    d = guard.last
    return {
        "applied": applied,
        "bit_identical": same,
        "skipped": guard.skipped,
        "should_stop": guard.should_stop,
        "disabled": guard.disabled,
        "diagnosis": d.fields_dict() if d else None,
        "finite": all(
            bool(torch.isfinite(p.detach().full_tensor()).all()) for p in net.parameters()
        ),
    }


result = {}

torch.manual_seed(0)
data = batches()
if rank == 1:
    data[2][0][3, 1] = float("nan")
print("scenario input", flush=True)
result["input"] = guarded(sharded(Net()), data)

torch.manual_seed(0)
data = batches()
if rank == LAST:
    data[1][0][2, 0] = -1.0
print("scenario forward", flush=True)
result["forward"] = guarded(sharded(Net(log_feature=True)), data)

torch.manual_seed(0)
net = sharded(Net())
data = batches()


def poison(i):
    if i == 2 and rank == 1:
        with torch.no_grad():
            net.body[2].weight.to_local()[0, 3] = float("nan")


print("scenario shard", flush=True)
result["shard"] = guarded(net, data, hook=poison)
result["shard"]["local_rows"] = net.body[2].weight.to_local().shape[0]

torch.manual_seed(0)
net = sharded(Net())
flipped = []


def flip_once(module, args, output):
    # The test's fault injector: one exponent bit of one activation, once (a cosmic ray).
    if rank == 1 and len(flipped) == 0 and calls[0] == 2:
        with torch.no_grad():
            i = (
                int((output.abs() >= 1).flatten().nonzero()[0])
                if bool((output.abs() >= 1).any())
                else 0
            )
            bits = output.view(-1)[i : i + 1].view(torch.int32)
            bits ^= 1 << 30
            flipped.append(float(output.view(-1)[i]))
    return output


calls = [0]


def count(i):
    calls[0] = i


net.body[0].register_forward_hook(flip_once)
data = batches()
for x, _ in data:
    x.mul_(3.0)  # first-layer outputs reach [1, 2): an exponent-bit flip there makes them NaN/Inf
print("scenario flip", flush=True)
result["flip"] = guarded(net, data, hook=count)
result["flip"]["flipped"] = flipped

# DTensor tensor parallel: the same batch on every rank, weights sharded by column / row.
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module  # noqa: E402

torch.manual_seed(0)
tp = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
mesh = init_device_mesh("cpu", (world,))
parallelize_module(tp, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
g = torch.Generator().manual_seed(7)
same_data = [
    (torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(4)
]


def poison_tp(i):
    if i == 2 and rank == 1:
        with torch.no_grad():
            tp[0].weight.to_local()[0, 0] = float("nan")


print("scenario tp", flush=True)
result["tp"] = guarded(tp, same_data, hook=poison_tp)

(out / f"rank{rank}.json").write_text(json.dumps(result))
dist.barrier(timeout=timedelta(seconds=60))
# Drop what holds the process group, so it is destroyed here and not at exit (conftest.py).
net = tp = mesh = None
gc.collect()
dist.destroy_process_group()
