"""``nanscope run`` for PyTorch scripts: watch an unchanged script, stop it at the first
non-finite value that reaches something that matters, and diagnose it.

How it stays cheap:

* one global ``TorchDispatchMode`` (entered when the script imports torch, left when it
  ends) records every aten op in a list: the op, its arguments as references (a weak
  reference to a tensor an earlier recorded op made, the tensor itself otherwise), its
  module, phase and user line. It computes nothing on the op's values: no per-op reduction,
  no synchronization;
* the values that matter are checked at boundaries only, where the script (or autograd)
  hands them over: the model's output when its top-level forward returns, a number pulled
  out of a tensor (``loss.item()``, ``float(x)``), and the gradients before each optimizer
  step (one fused norm, which also feeds the gradient-norm history); the weights after it;
* only when a boundary sees a non-finite value are the recorded ops replayed through the
  tracer's ``Analyzer`` (``nanscope.torch.trace``) to name the producer, its module, line,
  phase and samples. A NaN that never reaches any of those (the branch ``where`` discards)
  stays silent.
* Records are dropped after each optimizer step, and after each forward that ran without
  autograd (evaluation, inference) and returned finite outputs.
* ``optimizer.step()`` runs unrecorded (the mode only passes its ops on). Before it, one
  ``torch._foreach_copy_`` puts the parameters that have a gradient and their optimizer state
  into buffers kept from step to step (the state's other entries, the parameter groups and the
  optimizer's attributes are copied shallowly; state the first step creates was absent). The
  cost is one memory pass over what the step writes, and that much memory while the script
  runs: 0.2 MiB and 0.1 ms (0.5% of a step) for bench/run_overhead.py's CNN with SGD momentum;
  128 MiB and 25-35 ms for torchvision's resnet18 with Adam on this 2-core VM (about 5 GB/s;
  recording the step's ops instead cost 60-80 ms there), a fraction of a millisecond on a GPU.
  Past ``_STEP_COPY_BYTES`` nothing is copied. Only when the weights come out non-finite is
  the step run again from the copy, through the optimizer's undecorated ``step`` with no step
  hook firing (the script's own hooks ran once), its ops recorded (phase ``optimizer``) and
  replayed to the op that made the update non-finite (Adam's ``addcdiv_`` dividing 0 / 0, a
  trust ratio over a zero norm); then the weights, state, optimizer attributes and RNG the
  script's own step left are put back, bit for bit. Past the size limit, or with no copy,
  only the state the step left is named.

* Under a launcher, a replay runs on the failing rank alone: what a collective brought in is
  copied once, before the first op reads it (at most ``_RECEIVED_BYTES`` per stretch of
  records), and the replay takes the copy instead of calling the collective again.

Design constraints: zero code change in the user's script; the numbers the script computes
are never changed (the mode only observes); the update is checked as a whole after
``optimizer.step()`` (a step with a closure, LBFGS, is not run again); nanscope's own errors
become one warning through ``session.internal_error`` and the script carries on unwatched;
``detach`` (run by ``session.close()``) removes the mode and every hook.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import warnings
import weakref
from typing import Any

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim import optimizer as torch_optimizer
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from nanscope.core import rules
from nanscope.core.diagnosis import Diagnosis
from nanscope.core.enums import Phase
from nanscope.core.errors import NonFiniteError
from nanscope.core.limits import dtype_name
from nanscope.torch._util import (
    all_finite,
    grad_fn_of,
    local,
    named_tensors,
    quiet_replay,
    settled_norms,
)
from nanscope.torch.checks import check_model_state, check_optimizer_state, param_names
from nanscope.torch.trace import (
    Analyzer,
    Event,
    ModuleTracker,
    first_failure,
    inputs_finite,
    is_collective,
    op_name,
    optimizer_frame,
    user_frame,
    write_positions,
    written,
)

__all__ = ["attach", "detach"]

_SCALAR = torch.ops.aten._local_scalar_dense.default
_ONES_LIKE = torch.ops.aten.ones_like.default
_GLOBAL_HOOKS_WARNING = r"Using `torch.compile\(module\)` when there are global hooks on modules"
_FLUSH_EVERY = 50_000  # records kept at most between two boundaries that drop them
# Largest optimizer (parameters + state) copied before each step, so that a step that went
# non-finite can be run again, recorded: the copy is kept from step to step.
_STEP_COPY_BYTES = 256 * 2**20
# Largest total of what collectives brought in (FSDP's all-gathered parameters, an all-reduce's
# result) copied per recorded stretch, so that a replay on one rank need not run them again.
_RECEIVED_BYTES = 256 * 2**20


_MUTABLE: dict[Any, bool] = {}  # op -> whether it writes to an argument
# op -> None (not a collective), "wait" (a functional collective's identity step: it returns
# the tensor it was given, filled), or "collective" (``trace.is_collective``)
_COMM: dict[Any, str | None] = {}
_WAITS = re.compile(r"::(wait_tensor|_wrap_tensor_autograd)$")


def _collective(func: Any) -> str | None:
    kind = _COMM.get(func, False)
    if kind is False:
        name = op_name(func)
        kind = _COMM[func] = (
            ("wait" if _WAITS.search(name) else "collective") if is_collective(func) else None
        )
    return kind


# Ops that make a tensor from Python values: an infinity they hold was written by the script.
_CONSTANTS = {
    getattr(torch.ops.aten, name)
    for name in (
        "lift_fresh",
        "lift_fresh_copy",
        "full",
        "scalar_tensor",
        "fill_",
        "full_like",
        "new_full",
    )
    if hasattr(torch.ops.aten, name)
}


def _per_device(scalars: list[torch.Tensor]) -> list[torch.Tensor]:
    """0-d tensors stacked per device (a model may span devices): one sync per device later."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in scalars:
        by_device.setdefault(t.device, []).append(t)
    return [torch.stack(ts) for ts in by_device.values()]


def _sum_per_device(scalars: list[torch.Tensor]) -> float:
    return sum(float(ts.sum()) for ts in _per_device(scalars))


def _all_finite_per_device(scalars: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(ts).all()) for ts in _per_device([t.float() for t in scalars]))


class ReceivedNotKept(RuntimeError):
    """The replay needs what a collective brought in, and it was past what nanscope keeps."""

    def __init__(self, op: str, kept: int) -> None:
        super().__init__(
            f"the step read what {op} brought in from the other ranks, and nanscope keeps at "
            f"most {_RECEIVED_BYTES // 2**20} MiB of that per step ({kept / 2**20:.0f} MiB "
            "kept): the ops after it could not be run again on this rank alone"
        )


def _extent(t: torch.Tensor) -> int:
    """Bytes of its storage that ``t`` reaches."""
    if t.numel() == 0:
        return 0
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return (last + 1) * t.element_size()


def _freed_stand_ins(records: list[Event]) -> dict[int, torch.Tensor]:
    """FSDP frees a gathered parameter's memory once a layer is done with it (its storage
    resized to 0) and allocates it again before the next use: a replay reading it then would
    read freed memory. Each tensor the records hold whose storage is now too small gets a
    zeroed stand-in of the same size, strides and offset, one storage per freed one, so its
    views still alias. The replay writes it before reading it, as the script did (FSDP copies
    the all-gathered values in)."""
    short: dict[int, tuple[int, list[torch.Tensor]]] = {}
    for ev in records:
        for ref in (*ev.args, *ev.kwargs.values()):
            for r in ref if isinstance(ref, (list, tuple)) else (ref,):
                t = r.tensor if isinstance(r, _Ref) and r.key is None else None
                if type(t) not in (torch.Tensor, torch.nn.Parameter):
                    continue
                if t.layout is not torch.strided or t.is_meta:
                    continue
                storage = t.untyped_storage()
                need = _extent(t)
                if storage.nbytes() >= need:
                    continue
                size, ts = short.get(storage._cdata, (0, []))
                short[storage._cdata] = (max(size, need), [*ts, t])
    stand_ins = {}
    for size, ts in short.values():
        storage = torch.zeros(size, dtype=torch.uint8, device=ts[0].device).untyped_storage()
        for t in ts:
            stand_ins[id(t)] = torch.empty(0, dtype=t.dtype, device=t.device).set_(
                storage, t.storage_offset(), t.shape, t.stride()
            )
    return stand_ins


class _Ref:
    """A recorded argument: ``key`` of an earlier op's output, or a ``tensor`` held as is."""

    __slots__ = ("key", "tensor")

    def __init__(self, key: Any, tensor: torch.Tensor | None) -> None:
        self.key, self.tensor = key, tensor


def _is_backward_seed() -> bool:
    """True when ``ones_like`` is called by autograd to seed ``loss.backward()``."""
    f = sys._getframe(3)
    for _ in range(6):
        if f is None:
            return False
        if f.f_code.co_name == "_make_grads":
            return True
        f = f.f_back
    return False


class _Mode(TorchDispatchMode):
    def __init__(self, runner: Runner) -> None:
        super().__init__()
        self.runner = runner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # Every op of the script passes here: the common path is kept to attribute reads.
        kwargs = kwargs or {}
        r = self.runner
        if r.in_optimizer or r.disabled or r.done or r.busy:
            return func(*args, **kwargs)
        if func is _SCALAR:
            r.guarded(r.at_scalar, args[0])
        mutable = _MUTABLE.get(func)
        if mutable is None:
            mutable = _MUTABLE[func] = bool(func._schema.is_mutable)
        snaps = r.guarded(r.snapshot_written, func, args, kwargs) if mutable else None
        if r.unread:  # what a collective brought in, about to be read: copied first
            r.guarded(r.keep_received, func, args, kwargs)
        out = func(*args, **kwargs)
        if func is _ONES_LIKE:
            r.guarded(r.note_backward_seed, args[0])
        r.busy = True  # what Runner.guarded does, inlined for the per-op record
        try:
            r.record(func, args, kwargs, out, snaps)
        except NonFiniteError:
            raise
        except Exception as err:
            r.fail_internally(err)
        finally:
            r.busy = False
        return out


class Runner:
    """The state of one watched script."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.tracker = ModuleTracker()
        self.tracker.on_root_done = lambda output: self.guarded(self.at_model_output)
        self.mode = _Mode(self)
        self.records: list[Event] = []
        self.losses: list[torch.Tensor] = []
        # id(tensor) -> (weak ref, key, dtype, shape): ``param.data = ...`` (module.half(),
        # .to(dtype)) swaps a tensor's values without an aten op, so a hit must match all four.
        self.produced: dict[int, tuple[weakref.ref, Any, torch.dtype, torch.Size]] = {}
        self.originals: dict[int, torch.Tensor] = {}
        # Inside optimizer.step(): id(tensor) -> the references to it as is (not copied), so
        # that when the step later writes it, the reads before see the copy of what they read.
        self._held: dict[int, list[_Ref]] = {}
        self._last_forward: tuple[Event, list[torch.Tensor]] | None = None
        # What collectives wrote (``_received``): record index -> the output keys; id(tensor) ->
        # (weak ref, keys) until an op reads it; key -> the copy taken then (``keep_received``).
        self.received: dict[int, list[tuple[int, int]]] = {}
        self.unread: dict[int, tuple[weakref.ref, list[tuple[int, int]]]] = {}
        self.kept: dict[tuple[int, int], torch.Tensor] = {}
        self.kept_bytes = 0
        self._carried: list[tuple[int, int]] = []  # what a wait's input stood for
        self.rng = torch.get_rng_state()
        self.grad_norms: list[float] = []
        self.step = 0
        self.in_optimizer = False
        self.stepping = False  # recording the ops of optimizer.step() (its run again)
        self._before_step: _StepCopy | None = None
        # optimizer -> the buffers its parameters and state are copied into before each step
        self._step_buffers: weakref.WeakKeyDictionary[Any, list[torch.Tensor]] = (
            weakref.WeakKeyDictionary()
        )
        self.disabled = False
        self.done = False
        self.busy = False  # nanscope's own ops (checks, analysis) are not the script's
        self._handles: list[Any] = []
        self._lr: float | None = None
        self._filter: Any = None
        self._said_compiled = False

    @property
    def off(self) -> bool:
        return self.in_optimizer or self.disabled or self.done or self.busy

    # -- install / remove --------------------------------------------------------------------
    def install(self) -> None:
        self.tracker.install()
        self._handles = [
            register_optimizer_step_pre_hook(self._pre_step),
            register_optimizer_step_post_hook(self._post_step),
            register_module_forward_pre_hook(self._at_forward),
        ]
        # torch warns that global module hooks fire once more under torch.compile: those hooks
        # are nanscope's, not the script's, so the script's output must not carry the warning.
        warnings.filterwarnings("ignore", message=_GLOBAL_HOOKS_WARNING, category=UserWarning)
        self._filter = warnings.filters[0]
        self.mode.__enter__()

    def _at_forward(self, module: torch.nn.Module, args: Any) -> None:
        if self.in_optimizer:  # an optimizer.step() that raised never reached its post hook
            self.in_optimizer = False
        if not self._said_compiled and hasattr(module, "_orig_mod"):
            self._note_compiled()

    def _note_compiled(self) -> None:
        """Say once that compiled modules run eagerly while watched (a dispatch mode makes
        Dynamo fall back to eager frames): the per-op trace needs the eager ops."""
        if self._said_compiled:
            return
        self._said_compiled = True
        print(
            "nanscope run: torch.compile'd modules run eagerly while nanscope watches them op by op, "
            "so this run has eager speed and eager numerics; nanscope.torch.Guard keeps them compiled",
            file=sys.stderr,
        )

    def remove(self) -> None:
        self.done = True
        self.tracker.remove()
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._filter is not None and self._filter in warnings.filters:
            warnings.filters.remove(self._filter)
            mutated = getattr(
                warnings, "_filters_mutated", None
            )  # what filterwarnings itself calls
            if mutated is not None:
                mutated()
        self._filter = None
        try:
            self.mode.__exit__(None, None, None)
        except Exception:  # the mode stack was already unwound (the script ended in an error)
            pass
        self._before_step = None
        self._step_buffers = weakref.WeakKeyDictionary()
        self._clear()

    def guarded(self, fn, *args) -> Any:
        """Run nanscope's own code; a failure diagnosis propagates, a bug of ours disables us."""
        if self.busy:
            return None
        self.busy = True
        try:
            return fn(*args)
        except NonFiniteError:
            raise
        except Exception as err:
            self.fail_internally(err)
            return None
        finally:
            self.busy = False

    def unwatched(self, fn, *args) -> Any:
        """``guarded``, off the mode stack: the boundary checks' own ops are plain calls, not a
        round trip into Python each (about a hundred per optimizer step: norms, stacks, casts)."""
        with _disable_current_modes():
            return self.guarded(fn, *args)

    def fail_internally(self, err: BaseException) -> None:
        """nanscope's own bug: step aside (the script runs on unwatched) with one warning."""
        self.disabled = True
        self._clear()
        self.session.internal_error("watching the PyTorch script", err)

    # -- recording (per op: no synchronization, no tensor kept alive) -----------------------
    # Each op is recorded with its arguments as references: a tensor an earlier recorded op
    # produced is referred to by (op index, output slot), through a weak reference, so the
    # activations are freed exactly as without nanscope; any other tensor (weights, the batch,
    # masks) is held. A state tensor the op writes to (BatchNorm running stats, load_state_dict)
    # is copied first. On a failure the ops are re-executed from those references (same RNG
    # state) under the tracer's Analyzer: the evidence is exact, the healthy path pays nothing.
    def _ref(self, t: torch.Tensor) -> _Ref:
        hit = self.produced.get(id(t))
        if hit is not None and hit[0]() is t and hit[2] is t.dtype and hit[3] == t.shape:
            return _Ref(hit[1], None)
        return _Ref(None, t)

    def _refs(self, seq: Any) -> Any:
        produced = self.produced
        out = []
        for a in seq:
            if type(a) is torch.Tensor or type(a) is torch.nn.Parameter:  # the common case, inlined
                hit = produced.get(id(a))
                out.append(
                    _Ref(hit[1], None)
                    if hit is not None and hit[0]() is a and hit[2] is a.dtype and hit[3] == a.shape
                    else _Ref(None, a)
                )
                continue
            if isinstance(a, torch.Tensor):
                out.append(self._ref(a))
            elif isinstance(a, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in a):
                out.append(type(a)(self._ref(x) if isinstance(x, torch.Tensor) else x for x in a))
            else:
                out.append(a)
        return out

    def note_backward_seed(self, t: Any) -> None:
        """``loss.backward()`` seeds its gradient with ``ones_like(loss)``: that is the loss."""
        if isinstance(t, torch.Tensor) and _is_backward_seed():
            self.losses.append(t)

    def snapshot_written(self, func: Any, args: tuple, kwargs: dict) -> dict | None:
        """Copies of the not-yet-recorded tensors this in-place op is about to write."""
        snaps = {}
        for i, name in write_positions(func):
            t = args[i] if i < len(args) else kwargs.get(name)
            where = i if i < len(args) else name
            if isinstance(t, torch.Tensor):
                if not self._is_produced(t):
                    snaps[where] = (t, t.detach().clone())
            elif isinstance(t, (list, tuple)):  # a multi-tensor op (_foreach_mul_, _fused_adam_)
                for j, x in enumerate(t):
                    if isinstance(x, torch.Tensor) and not self._is_produced(x):
                        snaps[(where, j)] = (x, x.detach().clone())
        return snaps or None

    def _is_produced(self, t: torch.Tensor) -> bool:
        hit = self.produced.get(id(t))
        return hit is not None and hit[0]() is t and hit[2] is t.dtype and hit[3] == t.shape

    # What a collective wrote holds what other ranks sent: a replay on this rank alone cannot
    # run the collective again (the other ranks are elsewhere: gloo aborts on the mismatch, NCCL
    # hangs). So its outputs are copied, once, just before the first op reads them: by then the
    # script has waited for the collective (an async one's buffer is filled at its ``wait``),
    # and the copy is what the script read. The replay takes the copies instead of the call.
    def _received(self, i: int, outs: list[torch.Tensor]) -> None:
        keys = self.received[i] = [(i, k) for k in range(len(outs))]
        carried, self._carried = self._carried, []
        for key, o in zip(keys, outs, strict=True):
            hit = self.unread.get(id(o))
            # ``allreduce_`` returns the tensor it wrote: one copy serves both
            earlier = hit[1] if hit is not None and hit[0]() is o else []
            self.unread[id(o)] = (weakref.ref(o), [*carried, *earlier, key])
            carried = []

    def keep_received(self, func: Any, args: tuple, kwargs: dict) -> None:
        kind = _collective(func)
        if kind == "collective":
            return  # a collective of a collective's result: its own output is what is kept
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                self._keep(a, kind == "wait")
            elif isinstance(a, (list, tuple)):
                for x in a:
                    if isinstance(x, torch.Tensor):
                        self._keep(x, kind == "wait")

    def _keep(self, t: torch.Tensor, wait: bool) -> None:
        hit = self.unread.pop(id(t), None)
        if hit is None or hit[0]() is not t:
            return
        if wait:  # ``wait_tensor``: the buffer is filled after it; its output holds the same
            self._carried += hit[1]
            return
        values = local(t).detach()
        size = values.numel() * values.element_size()
        if self.kept_bytes + size > _RECEIVED_BYTES:  # a replay that needs it says so
            return
        self.kept_bytes += size
        copy = values.clone()
        for key in hit[1]:
            self.kept[key] = copy

    def record(self, func: Any, args: tuple, kwargs: dict, out: Any, snaps: dict | None) -> None:
        if self._last_forward is not None:  # autograd has set its outputs' grad_fn by now
            rec, outs = self._last_forward
            rec.grad_fns = [grad_fn_of(o) for o in outs]
            self._last_forward = None
        comm = _collective(func)
        if isinstance(out, torch.Tensor):
            all_outs = [out]
        elif comm:  # ``allreduce_`` returns (the list it wrote, its Work); ``allgather_`` lists
            all_outs = [t for _, t in named_tensors(out, "")]
        elif isinstance(out, (tuple, list)):
            all_outs = [o for o in out if isinstance(o, torch.Tensor)]
        else:
            all_outs = []
        if not all_outs and not snaps and not _MUTABLE.get(func):
            return
        node = torch._C._current_autograd_node()
        tr = self.tracker
        i = len(self.records)
        rargs = self._refs(args)
        rkwargs = dict(zip(kwargs, self._refs(kwargs.values()), strict=True)) if kwargs else {}
        if snaps:
            for where, (t, copy) in snaps.items():
                place, j = where if isinstance(where, tuple) else (where, None)
                holder = rargs if isinstance(place, int) else rkwargs
                if j is None:
                    holder[place] = _Ref(None, copy)
                else:
                    holder[place] = list(holder[place])
                    holder[place][j] = _Ref(None, copy)
                self.produced[id(t)] = (weakref.ref(t), ("w", i, where), t.dtype, t.shape)
                self.originals[id(copy)] = t
                for ref in self._held.pop(id(t), ()):  # read earlier in the step, then written
                    ref.tensor = copy
        if self.stepping:
            self._hold(rargs)
            self._hold(rkwargs.values())
            phase, source = Phase.OPTIMIZER, optimizer_frame()
        else:
            phase, source = tr.phase(node is not None), None
        ev = Event(
            i, func, tuple(rargs), rkwargs, [], phase, tr.current(), tr.root, user_frame(), node
        )
        ev.source = source
        self.records.append(ev)
        floats = []
        produced = self.produced
        for k, o in enumerate(all_outs):
            produced[id(o)] = (weakref.ref(o), (i, k), o.dtype, o.shape)
            if o.is_floating_point():
                floats.append(o)
        if comm:
            self._received(i, all_outs)
        if node is None and floats:
            self._last_forward = (ev, floats)
        if (
            len(self.records) >= _FLUSH_EVERY
        ):  # a very long stretch with no boundary: bound the memory
            self._clear()

    def _hold(self, refs: Any) -> None:
        for r in refs:
            if isinstance(r, _Ref):
                if r.key is None:
                    self._held.setdefault(id(r.tensor), []).append(r)
            elif isinstance(r, (list, tuple)):
                self._hold(r)

    def replay(self, names: dict[int, str] | None = None) -> tuple[Analyzer, Any]:
        """Re-execute the recorded ops from their inputs under the Analyzer."""
        analyzer = Analyzer(self.tracker, step=self.step)
        # Evidence is taken while the ops replay: what the copies stand for is known before.
        analyzer.originals = dict(self.originals)
        analyzer.tensor_names = names or {}
        values: dict[Any, torch.Tensor] = {}

        stand_ins = _freed_stand_ins(self.records)

        def real(ref: Any, needed: bool = True) -> Any:
            if isinstance(ref, _Ref):
                if ref.key is None:
                    return stand_ins.get(id(ref.tensor), ref.tensor)
                got = values.get(ref.key)
                if got is None and needed:
                    if ref.key[0] in self.received:
                        raise ReceivedNotKept(self.records[ref.key[0]].name, self.kept_bytes)
                    raise KeyError(ref.key)
                return got
            if isinstance(ref, (list, tuple)):
                return type(ref)(real(x, needed) for x in ref)
            return ref

        rng = torch.get_rng_state()
        torch.set_rng_state(self.rng)
        try:
            # The script saw this step's warnings already: the replay says nothing of its own.
            with torch.no_grad(), quiet_replay():
                for ev in self.records:
                    # a collective is not run again: its inputs are only looked at
                    needed = ev.index not in self.received
                    args = tuple(real(a, needed) for a in ev.args)
                    kwargs = {k: real(v, needed) for k, v in ev.kwargs.items()}
                    ins_fin = inputs_finite(ev.func, args, kwargs)
                    if ev.index in self.received:  # not run again: what it brought in, as it was
                        # (a copy is missing only where no op read it, or past _RECEIVED_BYTES:
                        # an op that reads it then raises ReceivedNotKept)
                        got = {key: self.kept.get(key) for key in self.received[ev.index]}
                        values.update((key, o) for key, o in got.items() if o is not None)
                        outs = [o for o in got.values() if o is not None]
                    else:
                        out = ev.func(*args, **kwargs)
                        outs = (
                            [out]
                            if isinstance(out, torch.Tensor)
                            else [
                                o
                                for o in (out if isinstance(out, (tuple, list)) else [])
                                if isinstance(o, torch.Tensor)
                            ]
                        )
                        for k, o in enumerate(outs):
                            values[(ev.index, k)] = o
                    for where, ref in list(enumerate(ev.args)) + list(ev.kwargs.items()):
                        pieces = (
                            [((where, j), x) for j, x in enumerate(ref)]
                            if isinstance(ref, (list, tuple))
                            else [(where, ref)]
                        )
                        for key, x in pieces:
                            if (
                                isinstance(x, _Ref)
                                and x.key is None
                                and id(x.tensor) in self.originals
                            ):
                                values[("w", ev.index, key)] = x.tensor
                    floats = [o for o in outs if o.is_floating_point()]
                    if not floats and ins_fin is not None:  # _foreach_div_: what it wrote
                        floats = written(ev.func, args, kwargs)
                    if floats:
                        analyzer.observe(
                            Event(
                                ev.index,
                                ev.func,
                                args,
                                kwargs,
                                floats,
                                ev.phase,
                                ev.module,
                                ev.root,
                                ev.frame,
                                ev.node,
                                ins_fin,
                                ev.grad_fns,
                                ev.source,
                            )
                        )
        finally:
            torch.set_rng_state(rng)

        def replayed(t: torch.Tensor) -> torch.Tensor:
            hit = self.produced.get(id(t))
            if hit is not None and hit[0]() is t and hit[1] in values:
                return values[hit[1]]
            return t

        return analyzer, replayed

    def _clear(self) -> None:
        self.records, self.losses = [], []
        self.produced, self.originals, self._held = {}, {}, {}
        self.received, self.unread, self.kept, self.kept_bytes = {}, {}, {}, 0
        self._carried = []
        self._last_forward = None
        self.rng = torch.get_rng_state()  # a replay of the ops recorded from here starts here

    # -- boundaries -------------------------------------------------------------------------
    def at_scalar(self, t: torch.Tensor) -> None:
        # The script syncs here anyway (it wants the number): one more look at one element.
        # Inside optimizer.step() the update is checked after it, with its state.
        if (
            not self.stepping
            and self.records
            and t.is_floating_point()
            and not t.is_meta
            and not bool(torch.isfinite(t).all())
            and not self._is_constant(t)
        ):
            self._fail([("loss", t)])

    def _is_constant(self, t: torch.Tensor) -> bool:
        """``best = torch.tensor(float("inf")); best.item()``: the script's own constant."""
        hit = self.produced.get(id(t))
        if hit is None or hit[0]() is not t or not isinstance(hit[1], tuple) or hit[1][0] == "w":
            return hit is None  # never made by a recorded op: created before we watched
        return self.records[hit[1][0]].func.overloadpacket in _CONSTANTS

    def at_model_output(self) -> None:
        if not self.records:
            return
        outs = self.tracker.root_outputs
        if not all(all_finite(o) for o in outs):
            self._fail([("output", o) for o in outs])
        elif not any(o.requires_grad for o in outs):
            self._clear()  # a forward without autograd (evaluation, inference) is over and finite

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        # A step that raised never reached its post hook: this one starts afresh.
        self.in_optimizer = self.stepping = False
        self._before_step = None
        # The hook's args include the optimizer itself: (optimizer, closure, ...).
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if callable(closure) and not self.off:
            # optimizer.step(closure) (Lightning's default loop, LBFGS): forward, loss and
            # backward run inside step(). Watch them as the step's own, and check the
            # gradients when the closure returns, before the update uses them.
            self.in_optimizer = True
            watched = self._watched_closure(optimizer, closure)
            if "closure" in kwargs:
                return args, {**kwargs, "closure": watched}
            return (args[0], watched, *args[2:]), kwargs
        with _disable_current_modes():  # what ``unwatched`` does, once for both
            self.guarded(self._check_gradients, optimizer)
            if not self.off:
                self._before_step = self.guarded(self._copy_before_step, optimizer)
        self.in_optimizer = True  # the step's ops pass unrecorded: it is run again if it fails
        return None

    def _copy_before_step(self, optimizer: torch.optim.Optimizer) -> _StepCopy | None:
        """What the step may write, as it is now (None when the step cannot be run again)."""
        if _undecorated_step(optimizer) is None:
            return None
        state = {p: (s, dict(s)) for p, s in optimizer.state.items()}
        # A parameter with no gradient (frozen, or unused on this batch) is skipped by the step:
        # neither it nor its state is copied. Its values are put back after a run again anyway.
        tensors = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        tensors += [v for p in tensors if p in state for v in state[p][1].values() if _is_tensor(v)]
        if sum(t.numel() * t.element_size() for t in tensors) > _STEP_COPY_BYTES or any(
            t.layout is not torch.strided for t in tensors
        ):
            return None
        # Kept from step to step: the state (and so the copy's size) is the same after step 1.
        buffers = self._step_buffers.get(optimizer)
        if (
            buffers is None
            or len(buffers) != len(tensors)
            or any(
                b.shape != t.shape or b.dtype is not t.dtype or b.device != t.device
                for b, t in zip(buffers, tensors, strict=True)
            )
        ):
            buffers = [torch.empty_like(t, requires_grad=False) for t in tensors]
            self._step_buffers[optimizer] = buffers
        with torch.no_grad():
            torch._foreach_copy_([local(b) for b in buffers], [local(t) for t in tensors])
        return _StepCopy(optimizer, tensors, buffers, state)

    def _watched_closure(self, optimizer: torch.optim.Optimizer, closure: Any) -> Any:
        def watched(*a: Any, **k: Any) -> Any:
            self.in_optimizer = False
            try:
                loss = closure(*a, **k)
            finally:
                self.in_optimizer = True
            if isinstance(loss, torch.Tensor):
                self.losses.append(loss)
            self.in_optimizer = False  # the check may replay ops: not the optimizer's
            try:
                self.unwatched(self._check_gradients, optimizer)
            finally:
                self.in_optimizer = True
            return loss

        return watched

    def _check_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        # DTensor gradients (FSDP2, tensor parallel): this rank's shard; a DTensor's own reduction
        # would be a collective that a rank which stopped never joins
        grads = [
            local(p.grad) for g in optimizer.param_groups for p in g["params"] if p.grad is not None
        ]
        self._lr = next((float(g["lr"]) for g in optimizer.param_groups if "lr" in g), None)
        losses = [local(t) for t in self.losses if t.is_floating_point()]
        if not grads and not losses:
            return
        with torch.no_grad():
            dense = [g for g in grads if not g.is_sparse]
            norms = torch._foreach_norm(dense) if dense else []
            # The losses backward started from ride in the same sum (one sync): a loss can be
            # Inf while every gradient is finite (a masked-out term, a ReLU at 0).
            # Squared and summed per device as one vector: a few ops, not two per parameter.
            squares = [ts.double().square().sum() for ts in _per_device(norms)]
            total = _sum_per_device(squares + [t.detach().double().sum() * 0 for t in losses])
            total = math.sqrt(total) if total >= 0 else total
            loss_ok = all(all_finite(t) for t in losses) if not math.isfinite(total) else True
            if (
                not math.isfinite(total) and loss_ok
            ):  # a float32 sum of squares overflows past ~1.8e19
                total = math.sqrt(
                    sum(v * v for v in settled_norms([float(n) for n in norms], dense))
                )
        if math.isfinite(total):
            self.grad_norms.append(total)
            del self.grad_norms[:-64]
            self._clear()  # a NaN that reached nothing that matters is forgotten with the records
            return
        things = [("loss", t) for t in self.losses]
        things += [("gradient", g) for g in grads]
        self._fail(things)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.in_optimizer = False
        before, self._before_step = self._before_step, None
        if before is not None and before.optimizer is not optimizer:
            before = None
        if self.unwatched(self._update_finite, optimizer) is False:
            self.guarded(self._check_update, optimizer, before, args, kwargs)
        self.step += 1
        self.session.steps = self.step  # how far this rank got (its answer to the other ranks)
        self.tracker.new_step()
        self._clear()

    def _update_finite(self, optimizer: torch.optim.Optimizer) -> bool:
        params = [p for g in optimizer.param_groups for p in g["params"] if not p.is_sparse]
        if not params:
            return True
        with torch.no_grad():
            return _all_finite_per_device(torch._foreach_norm([p.detach() for p in params]))

    def _check_update(
        self, optimizer: torch.optim.Optimizer, before: _StepCopy | None, args: Any, kwargs: Any
    ) -> None:
        """The weights came out non-finite: diagnose the step (run again, when it was copied)."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        root = self.tracker.root
        d = check_optimizer_state(optimizer, step=self.step, model=root)
        producer = (
            self._step_again(optimizer, params, before, args, kwargs or {})
            if before is not None
            else None
        )
        if producer is not None:
            d = rules.in_optimizer_step(producer, d)
        elif d is None:
            names = param_names(optimizer, root)
            bad = [names.get(id(p), "parameter") for p in params if not all_finite(p)]
            d = rules.update_overflowed(
                bad,
                framework="torch",
                step=self.step,
                lr=self._lr,
                dtype=dtype_name(params[0].dtype),
            )
        self._raise(d)

    def _step_again(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[torch.Tensor],
        before: _StepCopy,
        args: Any,
        kwargs: Any,
    ) -> Diagnosis | None:
        """Run the step that made the weights non-finite again from its copy, recorded, and
        replay it to its producer; then put back what the script's own step left, bit for bit."""
        after = _StepCopy.taken_after(optimizer)
        cuda = sorted({t.device.index or 0 for t in after.tensors if t.device.type == "cuda"})
        try:
            with torch.random.fork_rng(devices=cuda):  # the RNG the script's step left
                before.put_back()
                self._clear()  # the replay starts from the RNG state the step started from
                self.rng = before.rng
                torch.set_rng_state(before.rng)
                self.stepping, self.busy = True, False
                try:
                    with _step_hooks_muted(optimizer):  # the script's own hooks ran once
                        _undecorated_step(optimizer)(*args, **kwargs)
                except Exception as err:  # the state check still names what went bad
                    self.session.internal_error("running the optimizer step again", err)
                    return None
                finally:
                    self.stepping, self.busy = False, True
                return self._step_producer(optimizer, params)
        finally:
            after.put_back()

    def _step_producer(
        self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]
    ) -> Diagnosis | None:
        """Replay the recorded ops of the step that made the weights non-finite: the op inside
        optimizer.step() that produced the first NaN/Inf (None if the replay finds none)."""
        names = param_names(optimizer, self.tracker.root)
        things = [("parameter", p) for p in params if not all_finite(p)]
        for p, state in optimizer.state.items():
            for key, v in state.items():
                if isinstance(v, torch.Tensor):
                    names[id(v)] = f"{names.get(id(p), 'parameter')}.{key}"
                    if v.is_floating_point() and not all_finite(v):
                        things.append(("optimizer state", v))
        try:
            with _disable_current_modes():
                analyzer, replayed = self.replay(names)
                d = first_failure(analyzer, [(what, replayed(t)) for what, t in things])
        except Exception as err:  # the state check below still names what went bad
            self.session.internal_error("replaying the optimizer step", err)
            return None
        return d if d is not None and d.phase is Phase.OPTIMIZER else None

    # -- failure ----------------------------------------------------------------------------
    def _fail(self, things: list[tuple[str, torch.Tensor]]) -> None:
        # nanscope's own analysis needs no watching: off the mode stack, every check op is a
        # plain call (the replay is several thousand of them).
        with _disable_current_modes():
            self._explain(things)

    def _explain(self, things: list[tuple[str, torch.Tensor]]) -> None:
        root = self.tracker.root
        if root is not None and not all(all_finite(p) for p in root.parameters()):
            # Weights only change in optimizer.step, which is checked after every update:
            # weights that are bad now were bad when the script got them (a checkpoint).
            d = check_model_state(root, step=self.step)
            if d is not None:
                self._raise(d)
        try:
            analyzer, replayed = self.replay()
            d = first_failure(analyzer, [(what, replayed(t)) for what, t in things])
        except ReceivedNotKept as err:  # a limit of ours, not a bug: said in the diagnosis
            d = rules.not_localized(
                things[0][0] if things else "value", str(err), framework="torch", step=self.step
            )
        except Exception as err:  # the failure is real even if our replay of it is not
            self.session.internal_error("replaying the failing step", err)
            d = rules.not_localized(
                things[0][0] if things else "value", err, framework="torch", step=self.step
            )
        if d is None:
            if all(what != "gradient" for what, _ in things):
                # Only intentional infinities (a -inf mask) reached the output: not a failure.
                self._clear()
                return
            d = rules.unexplained("gradient", framework="torch", step=self.step)
        self._raise(d)

    def _raise(self, d: Diagnosis) -> None:
        self.done = True
        self._clear()
        if d.step is None:
            d.step = self.step
        d = rules.with_history(d, list(self.grad_norms), lr=self._lr)
        tr = self.tracker
        if tr.calls and not (
            tr.root_training and tr.root_grad
        ):  # not a training step: say which pass
            mode = ", ".join(
                m
                for m in (
                    "eval mode" if not tr.root_training else "",
                    "no_grad" if not tr.root_grad else "",
                )
                if m
            )
            d = rules.in_program(
                d,
                "evaluation" if self.step else "inference",
                batch=tr.calls - 1,
                mode=mode,
                after_steps=self.step or None,
            )
        raise self.session.fail(d)


def _is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor)


class _StepCopy:
    """What ``optimizer.step()`` may write, at one moment: the values of the parameters and
    state tensors (in ``buffers``), and shallow copies of the state's entries (a parameter
    with no state yet gets its state from the step), the parameter groups' entries, the
    optimizer's attributes (a step counter of a hand-written optimizer) and the CPU RNG."""

    __slots__ = ("optimizer", "tensors", "buffers", "state", "groups", "attrs", "rng")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        tensors: list[torch.Tensor],
        buffers: list[torch.Tensor],
        state: dict[Any, tuple[dict, dict]],
    ) -> None:
        self.optimizer, self.tensors, self.buffers, self.state = optimizer, tensors, buffers, state
        self.groups = [dict(g) for g in optimizer.param_groups]
        self.attrs = dict(vars(optimizer))
        self.rng = torch.get_rng_state()

    @classmethod
    def taken_after(cls, optimizer: torch.optim.Optimizer) -> _StepCopy:
        """A copy of everything now (the failure path: fresh buffers, tensors counted once)."""
        state = {p: (s, dict(s)) for p, s in optimizer.state.items()}
        seen: dict[int, torch.Tensor] = {}
        for t in [p for g in optimizer.param_groups for p in g["params"]] + [
            v for _, entries in state.values() for v in entries.values() if _is_tensor(v)
        ]:
            seen.setdefault(id(t), t)
        tensors = list(seen.values())
        with torch.no_grad():
            buffers = [t.detach().clone() for t in tensors]
        return cls(optimizer, tensors, buffers, state)

    def put_back(self) -> None:
        opt = self.optimizer
        attrs = vars(opt)
        attrs.clear()
        attrs.update(self.attrs)
        for g, entries in zip(opt.param_groups, self.groups, strict=True):
            g.clear()
            g.update(entries)
        opt.state.clear()
        for p, (s, entries) in self.state.items():
            s.clear()
            s.update(entries)
            opt.state[p] = s
        with torch.no_grad():
            torch._foreach_copy_([local(t) for t in self.tensors], [local(b) for b in self.buffers])


def _undecorated_step(optimizer: torch.optim.Optimizer) -> Any:
    """The optimizer's own ``step``, under torch's wrapper that fires the step hooks
    (``Optimizer.profile_hook_step``, made with ``functools.wraps``); None if there is none.
    Taken from the class: an LR scheduler wraps the instance's ``step`` to count calls."""
    step = type(optimizer).step
    return getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None


@contextlib.contextmanager
def _step_hooks_muted(optimizer: torch.optim.Optimizer) -> Any:
    """No step hook fires (a parent class's decorated ``step`` called through ``super()``)."""
    hooks = [
        getattr(torch_optimizer, "_global_optimizer_pre_hooks", {}),
        getattr(torch_optimizer, "_global_optimizer_post_hooks", {}),
        optimizer._optimizer_step_pre_hooks,
        optimizer._optimizer_step_post_hooks,
    ]
    saved = [dict(h) for h in hooks]
    for h in hooks:
        h.clear()
    try:
        yield
    finally:
        for h, entries in zip(hooks, saved, strict=True):
            h.clear()
            h.update(entries)


_RUNNERS: dict[int, Runner] = {}


def attach(session: Any, module_name: str) -> None:
    """Watch the script of ``session`` (called by ``nanscope run`` when the script imports torch).

    Example:
        >>> from nanscope.core.session import RunSession
        >>> s = RunSession(script="train.py")
        >>> attach(s, "torch")
        >>> torch.ones(2).sum().item()   # healthy: silent
        2.0
        >>> s.close()   # what `nanscope run` does when the script ends
    """
    if id(session) in _RUNNERS:
        return
    runner = Runner(session)
    session.steps = 0
    runner.install()
    _RUNNERS[id(session)] = runner
    session.cleanups.append(lambda: detach(session))


def detach(session: Any) -> None:
    """Remove the instrumentation ``attach`` installed for ``session``."""
    runner = _RUNNERS.pop(id(session), None)
    if runner is not None:
        runner.remove()
