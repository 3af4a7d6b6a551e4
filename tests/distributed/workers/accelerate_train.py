"""A user's accelerate training loop, guarded, as ``accelerate launch --num_processes 2 --cpu``
starts it: accelerator.prepare(model, optimizer, dataloader), accelerator.backward(loss).

The dataset holds one corrupt record (a NaN feature at index 23). The prepared dataloader
hands each process every other batch of 4, so that record is sample 3 of rank 1's batch at
step 2, and no other rank sees it. Each rank writes what its Guard decided and a digest of its
weights and momentum after every step to ``OUT/rank<R>.json``."""

import hashlib
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from nanscope.torch import Guard

out = Path(sys.argv[1])
accelerator = Accelerator(cpu=True)
g = torch.Generator().manual_seed(0)
x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
x[23, 1] = float("nan")
loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)


def train_step(batch):
    inputs, targets = batch
    loss = F.cross_entropy(model(inputs), targets)
    accelerator.backward(loss)
    return loss


def digest() -> str:
    """The weights and the optimizer's momentum, to the bit."""
    h = hashlib.sha256()
    for p in accelerator.unwrap_model(model).parameters():
        h.update(p.detach().numpy().tobytes())
        momentum = optimizer.state.get(p, {}).get("momentum_buffer")
        h.update(b"-" if momentum is None else momentum.numpy().tobytes())
    return h.hexdigest()


warnings.simplefilter("ignore")  # the guard's NonFiniteWarning: what it decided is written below
guard = Guard(model, optimizer, policy="skip", reports=None)
digests = [digest()]
for batch in loader:
    guard.step(train_step, batch)
    digests.append(digest())
d = guard.last
(out / f"rank{accelerator.process_index}.json").write_text(
    json.dumps(
        {
            "world": accelerator.num_processes,
            "ddp": type(model).__name__,
            "optimizer": type(optimizer).__name__,
            "skipped": guard.skipped,
            "steps": guard.steps,
            "diagnosis": d.fields_dict() if d else None,
            "digests": digests,
        }
    )
)
# Drop what holds the process group, so it is destroyed here and not at exit (conftest.py):
# free_memory drops the accelerator's own references and runs the garbage collector.
guard = model = optimizer = loader = None
accelerator.free_memory()
accelerator.end_training()
