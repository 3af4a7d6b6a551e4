"""One rank leaves in the middle of a guarded DDP step (after its backward, before the guard's
check): ``kill`` (SIGKILL, the process is gone) or ``raise`` (the user's step raises on that
rank, and the process lingers without calling guard.step again). The other rank must not wait
forever in nanscope's collective: it raises RankLeftError naming the rank that left."""

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

out, mode = Path(sys.argv[1]), sys.argv[2]
LEAVER, LEAVE_STEP = 1, 2
warnings.simplefilter("ignore")
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
torch.manual_seed(0)
model = DDP(nn.Linear(4, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)


def train_step(batch):
    x, y = batch
    loss = F.cross_entropy(model(x), y)
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
(out / f"rank{rank}.json").write_text(json.dumps(result))
if result["error"] and result["error"]["type"] == "ValueError":
    time.sleep(12)  # lingers without taking part in any collective again
os._exit(
    0
)  # the process group is broken: no barrier, no destroy (each would wait for the lost rank)
