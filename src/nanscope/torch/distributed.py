"""What the Guard needs from ``torch.distributed``: one agreed decision per step, and the
rank(s) where a non-finite value appeared first.

Design constraints: on a healthy step the only collective is one ``all_reduce`` of a
``world_size``-element flag tensor (each rank writes its own slot: 1 = something it checked
is non-finite, 2 = its *local* loss was non-finite, i.e. before DDP's gradient all-reduce
spread the NaN to every rank), so every rank takes the same decision and none steps while
another skips. On a failure every rank replays under ``no_sync`` (no gradient all-reduce, so
each rank sees only its own data) and the local diagnoses are gathered once with
``all_gather_object``; the ranks whose own data or computation produced the value are named.
Without an initialized process group everything here is a no-op.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch
import torch.distributed as dist

from nanscope.core.diagnosis import Diagnosis
from nanscope.core.enums import Category

__all__ = ["active", "rank", "unwrap", "no_sync", "local", "flags", "agree"]


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside a DDP / DataParallel wrapper (and a ``torch.compile`` one)."""
    inner = getattr(model, "module", None)
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    if isinstance(model, wrappers) and isinstance(inner, torch.nn.Module):
        model = inner
    orig = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    return orig if isinstance(orig, torch.nn.Module) else model


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 parameters and gradients, tensor parallel): the
    fused check reduces local shards only, and one flag all_reduce makes the decision common.
    Plain tensors come back as they are. ``to_local()`` is a view: no copy, no collective.
    (DTensor is looked up only when the program imported it.)"""
    mod = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(mod, "DTensor", None)
    if dtensor is not None and isinstance(t, dtensor):
        return t.to_local()
    return t


def no_sync(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


LOCAL_LOSS = 2  # flag bit: this rank's own loss was non-finite (before the gradient all-reduce)
INTERNAL = 4  # flag bit: nanscope failed on this rank; every rank then steps aside together


def flags(*, bad: torch.Tensor, local_first: torch.Tensor, internal: bool = False) -> torch.Tensor:
    """All ranks' flags (``world_size`` floats), after one all_reduce; no host sync here.

    Every rank calls this on every guarded step, even after nanscope failed on it (``internal``),
    so that no rank waits in a collective another rank skipped."""
    world, me = dist.get_world_size(), dist.get_rank()
    mine = bad.float() + LOCAL_LOSS * local_first.float() + (INTERNAL if internal else 0)
    onehot = torch.zeros(world, device=mine.device)
    onehot[me] = 1.0
    v = onehot * mine
    if dist.get_backend() == "gloo" and v.device.type != "cpu":
        v = v.cpu()
    dist.all_reduce(v)
    return v.to(bad.device)


def agree(local: Diagnosis | None, ranks_bad: list[float] | None) -> Diagnosis | None:
    """Gather every rank's local diagnosis; all ranks return the same one, with ``ranks`` set
    to the ranks that saw the non-finite value first."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local.to_dict() if local is not None else None)
    found = {r: Diagnosis.from_dict(d) for r, d in enumerate(everyone) if d is not None}
    named = [r for r, d in found.items() if d.category is not Category.UNKNOWN]
    by_loss = [r for r, f in enumerate(ranks_bad or []) if int(f) & LOCAL_LOSS]
    first = named or by_loss or sorted(found) or [r for r, f in enumerate(ranks_bad or []) if f]
    if not found:
        return None
    chosen = found[first[0]] if first and first[0] in found else found[min(found)]
    chosen.ranks = list(first)
    why = ("its own data or computation produced it (replayed without the gradient all-reduce)" if named
           else "its local loss was non-finite before the gradient all-reduce")
    chosen.evidence.append(f"rank{'s' if len(first) > 1 else ''} {', '.join(map(str, first))} saw it first: {why}")
    return chosen
