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

No hangs: every collective nanscope itself issues is waited on for at most ``timeout()``
seconds (``NANSCOPE_COLLECTIVE_TIMEOUT``, default 600, never past the process group's own
timeout). A rank that raised in its step, died or hangs there never reaches the guard's
all_reduce; the ranks waiting for it then raise ``RankLeftError`` naming it, found through
the process group's store (each waiting rank writes one key, on that path only), instead of
waiting forever. FSDP2 / DTensor: the fused check reduces each rank's local shards
(``local``), the stored state is checked shard by shard (``local_state``) under the
parameters' full names.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from nanscope.core import rules
from nanscope.core.diagnosis import Diagnosis
from nanscope.core.enums import Category
from nanscope.core.errors import RankLeftError

__all__ = [
    "active",
    "rank",
    "unwrap",
    "no_sync",
    "local",
    "local_state",
    "flags",
    "any_rank",
    "agree",
    "timeout",
    "RankLeftError",
]


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
    """The replay's context: DDP without its gradient all-reduce; FSDP2 with unsharded
    parameters kept alive (``_fsdp_kept_unsharded``)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if any(hasattr(m, "_get_fsdp_state") for m in model.modules()):
        return _fsdp_kept_unsharded(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_kept_unsharded(model: torch.nn.Module):
    """FSDP2 during the replay: no resharding after forward or backward, then one reshard.

    Resharding frees the unsharded parameters' storage (``resize_(0)``) while the tracer still
    holds the tensors it saw (reading them then crashes). The gradient reduce-scatter stays on:
    turning it off (``set_requires_gradient_sync(False)``) accumulates unsharded gradients that
    the next real step would reduce too; the tracer sees each rank's own autograd ops anyway."""
    saved: list[tuple[Any, Any, Any]] = []
    for m in model.modules():
        if not hasattr(m, "_get_fsdp_state"):
            continue
        state = m._get_fsdp_state()
        for group in getattr(state, "_fsdp_param_groups", []):
            saved.append((group, group.post_forward_mesh_info, group.reshard_after_backward))
            group.post_forward_mesh_info = None  # None: keep unsharded after forward
            group.reshard_after_backward = False
    try:
        yield
    finally:
        for group, info, after_backward in saved:
            group.post_forward_mesh_info = info
            group.reshard_after_backward = after_backward
        for m in model.modules():
            if hasattr(m, "_get_fsdp_state") and hasattr(m, "reshard"):
                m.reshard()


def holds_dtensors(module: torch.nn.Module) -> bool:
    mod = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(mod, "DTensor", None)
    return dtensor is not None and any(isinstance(p, dtensor) for p in module.parameters())


def traced_root(module: torch.nn.Module) -> torch.nn.Module | None:
    """The model to hand the tracer, or None (it then takes the outermost module called) when
    the parameters are DTensors: a DTensor's reductions (``isfinite(grad).all()``) are
    collectives, and only the rank that saw a NaN would issue them. Without the model the
    tracer looks at the plain local tensors the ops see (FSDP2's unsharded parameters, the
    local shards under tensor parallel)."""
    return None if holds_dtensors(module) else module


def local_state(module: torch.nn.Module, *, step: int | None = None) -> Diagnosis | None:
    """Non-finite parameters or floating buffers in *this rank's* shards, named by their full
    path in the model (``layers.1.weight``, not the flat shard); ``None`` when all are finite.
    No collective: a DTensor's ``all()`` would all-reduce, its local tensor does not."""
    from nanscope.torch._util import summary_of

    bad: dict[str, Any] = {}
    kind = "parameter"
    for n, p in module.named_parameters():
        t = local(p.detach())
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad[n] = summary_of(t)
    if not bad:
        kind = "buffer"
        for n, b in module.named_buffers():
            t = local(b.detach())
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                bad[n] = summary_of(t)
    if not bad:
        return None
    d = rules.nonfinite_parameters(bad, framework="torch", step=step, kind=kind)
    shards = [n for n, p in module.named_parameters() if n in bad and local(p) is not p]
    if shards:
        d.evidence.append(
            f"rank {rank()}'s shard of {', '.join(shards)} (the other ranks hold the rest)"
        )
    return d


_DEFAULT_TIMEOUT_S = 600.0
_calls = 0  # nanscope's collectives so far (the same count on every rank: they are matched)


def timeout() -> float:
    """Seconds any nanscope collective waits for the other ranks: ``NANSCOPE_COLLECTIVE_TIMEOUT``
    (default 600), and never longer than the process group's own timeout."""
    try:
        limit = float(os.environ.get("NANSCOPE_COLLECTIVE_TIMEOUT", _DEFAULT_TIMEOUT_S))
    except ValueError:
        limit = _DEFAULT_TIMEOUT_S
    try:
        pg_timeout = dist.distributed_c10d._get_default_group().options._timeout.total_seconds()
    except Exception:  # private: absent in some versions, then the env / default bound holds
        pg_timeout = None
    return max(0.1, min(limit, pg_timeout) if pg_timeout else limit)


def _left(step: int | None, waited: float, err: BaseException) -> RankLeftError:
    """Which ranks never arrived: each waiting rank writes one store key, waits a moment for
    the others' keys, and names the ranks without one."""
    world, me = dist.get_world_size(), dist.get_rank()
    key = f"nanscope/waiting/{_calls}"
    missing: list[int] | None = None
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"{key}/{me}", "1")
        deadline = time.monotonic() + min(5.0, max(1.0, waited / 4))
        while True:
            here = [r for r in range(world) if store.check([f"{key}/{r}"])]
            if len(here) == world or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        missing = [r for r in range(world) if r not in here]
    except Exception:  # the store lived on a rank that died (rank 0, usually): say so
        missing = None
    at = f" at step {step}" if step is not None else ""
    why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if missing:
        who = f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}"
        msg = (
            f"nanscope: {who} did not reach the guard's check{at} within {waited:.0f} s (rank {me} waited): "
            f"it left (its step raised, or its process died) or hangs in its own step; every rank must call "
            f"guard.step on every step. Stopped waiting instead of hanging ({why})"
        )
    else:
        msg = (
            f"nanscope: the guard's collective{at} failed on rank {me} after {waited:.0f} s, and the process "
            f"group's store is gone (rank 0 left?): another rank left. Stopped waiting instead of hanging ({why})"
        )
    return RankLeftError(msg, ranks=missing or [], step=step, waited_s=waited)


def _bounded(v: torch.Tensor, step: int | None) -> None:
    """``all_reduce(v)``, waited on for at most ``timeout()`` seconds."""
    global _calls
    _calls += 1
    limit = timeout()
    start = time.monotonic()
    try:
        dist.all_reduce(v, async_op=True).wait(timeout=timedelta(seconds=limit))
    except RuntimeError as err:  # gloo: "Operation timed out!", or a peer that closed its socket
        raise _left(step, time.monotonic() - start, err) from None


def spreads_flags(model: torch.nn.Module, params: list[torch.Tensor]) -> bool:
    """True where DDP's own gradient all-reduce can carry the guard's flag, so that a healthy
    guarded step issues no collective of its own (a separate flag ``all_reduce`` is a second
    meeting point of all ranks: about 0.6 ms on gloo, see bench/results/distributed_overhead.md).

    That holds when every optimized parameter is one DDP all-reduces (on the default process
    group): their gradients are then the same on every rank after backward, so every rank's
    fused check decides the same on them, and what only one rank can see (its loss, its
    normalization buffers) reaches the others through ``poisoned_backward``. Not under FSDP2 /
    DTensor (shards differ: the guard all-reduces its flag), nor with parameters DDP ignores."""
    ddp = model
    if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel) or not active():
        return False
    if ddp.process_group.size() != dist.get_world_size() or holds_dtensors(ddp.module):
        return False
    synced = {id(p) for p in ddp.module.parameters() if p.requires_grad}
    ignored = set(getattr(ddp, "parameters_to_ignore", ()) or ())
    return not ignored and all(id(p) in synced for p in params)


@contextlib.contextmanager
def poisoned_backward(buffers: list[torch.Tensor]):
    """During the step, every ``backward`` (``loss.backward()``, ``torch.autograd.backward``,
    ``scaler.scale(loss).backward()``) starts from NaN instead of 1 when this rank's loss (the
    tensor backward is called on) or its normalization buffers are non-finite. DDP's gradient
    all-reduce then spreads that NaN to every rank, and every rank's check of the all-reduced
    gradients sees it: no flag needs a collective of its own.

    On a finite loss the seed is exactly what autograd uses (ones, or the user's ``gradient``),
    chosen on the device with no sync: the healthy backward is bit-identical. Roots without a
    seed autograd can make (not scalar) or without a tensor keep what the user passed. Undone
    on exit (unless something else replaced ``torch.autograd.backward`` meanwhile)."""
    real = torch.autograd.backward

    def ok_now() -> torch.Tensor | None:
        if not buffers:
            return None  # max |x|: NaN or Inf exactly when some value is, and no overflow
        peaks = torch.stack(list(torch._foreach_norm(buffers, float("inf"))))
        return torch.isfinite(peaks).all()

    @functools.wraps(real)
    def backward(tensors: Any, grad_tensors: Any = None, *args: Any, **kwargs: Any) -> Any:
        single = isinstance(tensors, torch.Tensor)
        roots = (
            [tensors] if single else list(tensors) if isinstance(tensors, (tuple, list)) else None
        )
        if roots is None:
            return real(tensors, grad_tensors, *args, **kwargs)
        given = (
            [grad_tensors]
            if grad_tensors is None or isinstance(grad_tensors, torch.Tensor)
            else list(grad_tensors)
        )
        if len(given) == 1 and len(roots) > 1 and given[0] is None:
            given = [None] * len(roots)
        if len(given) != len(roots):
            return real(tensors, grad_tensors, *args, **kwargs)  # autograd says what is wrong
        buffers_ok = ok_now()
        seeds = []
        for root, g in zip(roots, given, strict=True):
            if not isinstance(root, torch.Tensor) or not root.is_floating_point():
                seeds.append(g)
                continue
            if g is None:
                if root.numel() != 1:
                    seeds.append(g)  # autograd's own error ("only for scalar outputs") stays
                    continue
                g = torch.ones_like(root, memory_format=torch.preserve_format)
            ok = torch.isfinite(root.detach()).all()
            if buffers_ok is not None:
                ok = ok & buffers_ok.to(ok.device)
            seeds.append(g.masked_fill(~ok, float("nan")) if g.is_floating_point() else g)
        return real(tensors, seeds[0] if single else seeds, *args, **kwargs)

    torch.autograd.backward = backward
    try:
        yield
    finally:
        if torch.autograd.backward is backward:
            torch.autograd.backward = real


LOCAL_LOSS = 2  # flag bit: this rank's own loss (or, spread by DDP, its buffers) was non-finite
INTERNAL = 4  # flag bit: nanscope failed on this rank; every rank then steps aside together


def flags(
    *, bad: torch.Tensor, local_first: torch.Tensor, internal: bool = False, step: int | None = None
) -> torch.Tensor:
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
    _bounded(v, step)
    return v.to(bad.device)


def any_rank(value: bool, *, step: int | None = None) -> bool:
    """True on every rank when ``value`` is True on any (failure path only: one bounded all_reduce)."""
    v = torch.tensor([1.0 if value else 0.0])
    _bounded(v, step)
    return bool(v.item())


def ranks_seen(ranks_bad: list[float] | None) -> list[int]:
    """The ranks whose own loss was non-finite, else those whose check was."""
    by_loss = [r for r, f in enumerate(ranks_bad or []) if int(f) & LOCAL_LOSS]
    return by_loss or [r for r, f in enumerate(ranks_bad or []) if int(f) & 1]


def seen_text(ranks: list[int]) -> str:
    return (
        f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} saw it first: "
        "its local loss or gradients were non-finite in the step"
    )


def common(local: Diagnosis, ranks: list[int], *, step: int | None = None) -> Diagnosis:
    """Every rank returns the diagnosis of ``ranks[0]`` (the rank that saw it first)."""
    any_rank(True, step=step)  # bounded: all_gather_object below has no timeout
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local.to_dict())
    chosen = everyone[ranks[0]] if ranks and everyone[ranks[0]] is not None else everyone[0]
    return Diagnosis.from_dict(chosen) if chosen is not None else local


def agree(
    local: Diagnosis | None,
    ranks_bad: list[float] | None,
    *,
    step: int | None = None,
    why: str | None = None,
) -> Diagnosis | None:
    """Gather every rank's local diagnosis; all ranks return the same one, with ``ranks`` set
    to the ranks that saw the non-finite value first."""
    # all_gather_object has no timeout: a bounded all_reduce first, so that a rank that left
    # during the failure path is named instead of waited for.
    any_rank(local is not None, step=step)
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
    why = (
        why
        if why is not None and named
        else (
            "its own data or computation produced it (replayed without the gradient all-reduce)"
            if named
            else "its local loss was non-finite before the gradient all-reduce"
        )
    )
    chosen.evidence.append(
        f"rank{'s' if len(first) > 1 else ''} {', '.join(map(str, first))} saw it first: {why}"
    )
    return chosen
