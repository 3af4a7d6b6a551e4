"""One rank leaves in the middle of a guarded DDP step (after its backward, before the guard's
check): ``kill`` (SIGKILL, the process is gone) or ``raise`` (the user's step raises on that
rank, and the process lingers without calling guard.step again).

``own``: the optimizer also trains a temperature outside DDP, so the guard all-reduces its own
flag every step; the other rank must not wait forever in that collective: it raises
RankLeftError naming the rank that left. ``spread``: plain DDP, whose gradient all-reduce
carries the flag; nanscope then has no collective of its own to wait in, and the other rank
meets the loss in DDP's next all-reduce, as it would without nanscope."""

import json
import os
import signal
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from nanscope.core.errors import RankLeftError
from nanscope.torch import Guard

out, mode, flags = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
LEAVER, LEAVE_STEP = 1, 2
warnings.simplefilter("ignore")
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
torch.manual_seed(0)
model = DDP(nn.Linear(4, 2))
temperature = nn.Parameter(torch.ones(()))
params = list(model.parameters()) + ([temperature] if flags == "own" else [])
opt = torch.optim.SGD(params, lr=0.1)


def train_step(batch):
    x, y = batch
    loss = F.cross_entropy(model(x) / temperature, y)
    loss.backward()
    if rank == LEAVER and guard.steps == LEAVE_STEP + 1:  # guard.steps counts this step already
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ValueError("the user's step failed on this rank")
    return loss


guard = Guard(model, opt, policy="skip", reports=None)
result = {"steps_done": 0, "error": None}
start = None
try:
    for _ in range(5):
        start = time.monotonic()
        guard.step(train_step, (torch.randn(3, 4), torch.tensor([0, 1, 0])))
        result["steps_done"] += 1
except RankLeftError as err:
    result["error"] = {
        "type": "RankLeftError",
        "message": str(err),
        "ranks": err.ranks,
        "step": err.step,
    }
except ValueError as err:
    result["error"] = {"type": "ValueError", "message": str(err)}
except RuntimeError as err:  # DDP's own all-reduce found the other rank gone
    result["error"] = {"type": "RuntimeError", "message": str(err)[:300]}
result["waited_s"] = time.monotonic() - start if start is not None else None
(out / f"rank{rank}.json").write_text(json.dumps(result))
if result["error"] and result["error"]["type"] == "ValueError":
    time.sleep(12)  # lingers without taking part in any collective again
os._exit(
    0
)  # the process group is broken: no barrier, no destroy (each would wait for the lost rank)
