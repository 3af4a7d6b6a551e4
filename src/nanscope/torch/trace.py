"""Per-op tracing: find the first op that *produced* a non-finite value and explain it.

``trace_step(fn)`` runs one step (forward + loss + backward) under a ``TorchDispatchMode``
that sees every aten op, including the ones autograd runs in backward, and keeps, for every
non-finite tensor, the *origin* of its bad values:

* a **producer**: an op whose output is non-finite while its inputs were finite (or only
  held legitimate ``-inf``); its evidence (input / output summaries, samples, loss context)
  is taken at once, before later in-place ops can change the tensors;
* a **propagator** inherits the origin of its first bad input and is never named;
* **legitimate** infinities (``masked_fill(mask, -inf)``, ``full(-inf)``, anything built
  from an infinite constant) are not failures; the op that turns them into NaN (a softmax
  over an all ``-inf`` row) is the producer;
* an **external** non-finite tensor (a parameter, a buffer, the batch) was bad before the
  step: the state / data checks name it.

A non-finite value is a failure only when it reaches something that matters: the value
``fn`` returns (the loss), the model's output, or a gradient of a leaf (parameters). The
diagnosis names the earliest origin among those. A NaN that only lives in the branch
``torch.where`` threw away is harmless until it poisons a gradient: that is the where trap
(``singular_gradient``). Backward producers are tied to the forward op they differentiate
through ``torch._C._current_autograd_node()`` and the forward outputs' ``grad_fn``.

Design constraints: this is the slow, thorough path, run only to explain a failure; every
hook is removed in ``finally``; nothing here changes the numbers it observes (the traced
ops run exactly as they would; evidence works on detached copies). The same ``Analyzer``
serves ``nanscope run`` (``nanscope.torch.runner``), which records ops cheaply and replays
them through it only once something went non-finite.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.modules import module as _nn_module
from torch.utils._python_dispatch import TorchDispatchMode

from nanscope.core import rules
from nanscope.core.diagnosis import Diagnosis, Location, samples_text
from nanscope.core.enums import OpKind, Phase
from nanscope.core.origin import Failure, OpSeen, Origin, OriginKind, OriginTracker, Value
from nanscope.core.source import is_user_file, location_from_stack
from nanscope.core.summary import (
    Concat,
    concat_samples,
    concat_text,
    rows_to_samples,
    summarize,
)
from nanscope.torch._util import (
    all_finite,
    batch_rows,
    grad_fn_of,
    is_float,
    is_loss_module,
    local,
    module_names,
    named_tensors,
    samples_of,
    summary_of,
)

__all__ = ["trace_step"]

# Ops that bring values in from outside torch (storages, Python data): never producers.
_SOURCES = {"set_", "lift_fresh", "lift_fresh_copy", "from_file", "_copy_from"}
# Ops that pick or move values without computing new ones: a producer's input is "made by"
# the op before them (log(softmax(x)[idx]) is still a log of a softmax).
_SELECTS = {
    "clone",
    "contiguous",
    "to",
    "_to_copy",
    "index",
    "gather",
    "index_select",
    "take_along_dim",
    "masked_select",
    "squeeze",
    "unsqueeze",
    "flatten",
    "reshape",
    "cat",
    "stack",
}
# Loss functions whose second argument is the target.
_LOSS_OPS = {
    "mse_loss",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "nll_loss",
    "nll_loss_forward",
    "nll_loss2d_forward",
    "nll_loss_nd",
    "cross_entropy_loss",
    "kl_div",
    "soft_margin_loss",
    "multilabel_soft_margin_loss",
    "poisson_nll_loss",
    "multi_margin_loss",
    "multilabel_margin_loss",
    "hinge_embedding_loss",
}
# Ops that cut dim 0 into pieces, by (dim argument position, how the pieces are sized).
_CUTS = {"slice", "split", "split_with_sizes", "narrow", "unsafe_split", "unsafe_split_with_sizes"}
# Arithmetic ops whose Python-number operands are quoted as evidence (x / 0.0).
_ARITH = (OpKind.DIV, OpKind.MUL, OpKind.ADD, OpKind.SUB, OpKind.POW)


# Ops whose kind is not in their name: what they compute (x + v * a / b is a division).
_KIND_OF = {"addcdiv": OpKind.DIV, "addcmul": OpKind.MUL}


def op_kind(name: str) -> OpKind:
    """``OpKind`` of an aten op, multi-tensor ones included: ``_foreach_div_`` is a ``div``,
    ``addcdiv`` (what Adam divides with) a ``div``."""
    short = name.split("::")[-1].split(".")[0].removeprefix("_foreach_").rstrip("_")
    return _KIND_OF.get(short) or OpKind.of(short)


_WRITE_POSITIONS: dict[Any, list[tuple[int, str]]] = {}


def write_positions(func: Any) -> list[tuple[int, str]]:
    """``(index, name)`` of the arguments ``func`` writes in place (cached per op)."""
    got = _WRITE_POSITIONS.get(func)
    if got is None:
        got = _WRITE_POSITIONS[func] = [
            (i, a.name)
            for i, a in enumerate(func._schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write
        ]
    return got


def written(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The floating tensors an in-place op wrote: the outputs of one that returns nothing
    (``_foreach_add_``, ``_fused_adam_``)."""
    out = []
    for i, name in write_positions(func):
        a = args[i] if i < len(args) else kwargs.get(name)
        out += [t for _, t in named_tensors(a, "w") if is_float(t)]
    return out


def is_collective(func: Any) -> bool:
    """``func`` is a communication op (``c10d::allreduce_``, ``_c10d_functional::all_reduce``,
    ``wait_tensor``): its outputs hold what other ranks sent."""
    return op_name(func).startswith(("c10d::", "_c10d_functional::", "c10d_functional::"))


def op_name(func: Any) -> str:
    """``aten.log.default`` -> ``aten::log``."""
    name = getattr(func, "_schema", None)
    if name is not None:
        return str(name.name)
    return str(func)


def _short(func: Any) -> str:
    return op_name(func).split("::")[-1]


# -- where the user is ------------------------------------------------------------------------

_USER_FILE: dict[str, bool] = {}
# Console-script launchers (``.venv/bin/nanscope``) are nobody's source line.
_SCRIPTS_DIR = os.path.normcase(os.path.abspath(sysconfig.get_paths()["scripts"])) + os.sep


def user_frame() -> tuple[str, int, str] | None:
    """``(file, line, function)`` of the innermost user frame, cheap enough to call per op:
    the "is this a framework file?" answer is cached per file name."""
    f = sys._getframe(1)
    while f is not None:
        code = f.f_code
        if _is_user(code.co_filename):
            return (code.co_filename, f.f_lineno, code.co_name)
        f = f.f_back
    return None


def _is_user(name: str) -> bool:
    ok = _USER_FILE.get(name)
    if ok is None:
        ok = _USER_FILE[name] = is_user_file(name) and not os.path.normcase(
            os.path.abspath(name)
        ).startswith(_SCRIPTS_DIR)
    return ok


def _location(frame: tuple[str, int, str] | None) -> Location | None:
    return location_from_stack([frame]) if frame else None


_OPTIM_DIR = os.sep + os.path.join("torch", "optim") + os.sep


def optimizer_frame() -> tuple[str, int, str] | None:
    """``(file, line, function)`` of the innermost frame in an optimizer's own code (torch's
    ``torch/optim/adam.py``, or the user's ``Optimizer`` subclass), cheap enough to call per op
    inside ``optimizer.step()``."""
    f = sys._getframe(1)
    while f is not None:
        name = f.f_code.co_filename
        if _OPTIM_DIR in name and not name.endswith("optimizer.py"):
            return (name, f.f_lineno, f.f_code.co_name)
        if _is_user(name):
            return (name, f.f_lineno, f.f_code.co_name)
        f = f.f_back
    return None


def _source_text(frame: tuple[str, int, str]) -> str:
    """``torch/optim/adam.py:412 (_single_tensor_adam)``: a library file from its package."""
    name, line, function = frame
    cut = name.rfind(os.sep + "torch" + os.sep)
    loc = _location(frame)
    shown = str(loc.file) if loc is not None else name[cut + 1 :] if cut >= 0 else name
    return f"{shown}:{line} ({function})"


# -- modules and phases -----------------------------------------------------------------------


class ModuleTracker:
    """Which module is running (a stack) and whether the model's forward has returned.

    Global module forward hooks (no per-module hooks), installed by ``install`` and removed
    by ``remove``. ``model`` fixes the root; without it the outermost module called is.
    """

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        self.model = model
        self.stack: list[torch.nn.Module] = []
        self.root: torch.nn.Module | None = model
        self.root_done = False
        self.root_outputs: list[torch.Tensor] = []
        self._names: dict[int, dict[int, str]] = {}
        self._in_model: dict[int, bool] = {}
        self._handles: list[Any] = []
        self.on_root_done: Callable[[Any], None] | None = None
        self._phase: Phase | None = None
        self.batch_size: int | None = None  # dim 0 of the model's first input, this step
        self.calls = 0  # top-level forwards since the last optimizer step
        self.root_training, self.root_grad = True, True  # the mode of the last top-level forward

    def install(self) -> None:
        self._handles = [
            _nn_module.register_module_forward_pre_hook(self._pre),
            _nn_module.register_module_forward_hook(self._post, always_call=True),
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        self._phase = None
        if not self.stack and (self.model is None or module is self.model):
            if self.model is None:
                self.root = module
            self.root_done = False
            first = next((t for _, t in named_tensors(args, "a")), None)
            self.batch_size = int(first.shape[0]) if first is not None and first.dim() else None
            if not is_loss_module(
                module
            ):  # a loss module called on its own is not a pass of the model
                self.calls += 1
                self.root_training, self.root_grad = module.training, torch.is_grad_enabled()
        self.stack.append(module)

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._phase = None
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
        elif module in self.stack:  # an exception skipped some pops
            del self.stack[self.stack.index(module) :]
        if module is self.root and module not in self.stack:
            self.root_done = True
            self.root_outputs = [t for _, t in named_tensors(output, "output") if is_float(t)]
            if self.on_root_done is not None:
                self.on_root_done(output)

    def new_step(self) -> None:
        self.calls = 0
        self._phase = None
        self.root_done = False
        self.root_outputs = []

    def names(self, root: torch.nn.Module | None) -> dict[int, str]:
        if root is None:
            return {}
        got = self._names.get(id(root))
        if got is None:
            got = self._names[id(root)] = module_names(root)
        return got

    def current(self) -> torch.nn.Module | None:
        return self.stack[-1] if self.stack else None

    def phase(self, backward: bool) -> Phase:
        if backward:
            return Phase.BACKWARD
        # Only changes when a module enters or returns: cached between those hooks.
        if self._phase is None:
            self._phase = self._forward_phase()
        return self._phase

    def _forward_phase(self) -> Phase:
        if not self.stack:
            return Phase.LOSS if self.root_done else Phase.FORWARD
        names = self.names(self.root)
        for m in self.stack:
            if is_loss_module(m) or (names and id(m) not in names):
                return Phase.LOSS
        return Phase.FORWARD

    def path(self, module: torch.nn.Module | None, root: torch.nn.Module | None) -> str | None:
        if module is None:
            return None
        name = self.names(root).get(id(module))
        if name is None:
            return type(module).__name__
        return name or None  # the root itself has no path


# -- events and origins -----------------------------------------------------------------------


@dataclass(slots=True)
class Event:
    """One aten op as the tracer saw it."""

    index: int
    func: Any
    args: tuple
    kwargs: dict
    outputs: list[torch.Tensor]
    phase: Phase
    module: torch.nn.Module | None = None
    root: torch.nn.Module | None = None
    frame: tuple[str, int, str] | None = None
    node: Any = None  # autograd node running this op (backward only)
    inputs_finite: list[bool] | None = None  # taken before an in-place op changed them
    grad_fns: list[Any] | None = None  # the outputs' grad_fn, when a replay's outputs have none
    source: tuple[str, int, str] | None = None  # inside optimizer.step: the optimizer's own line

    @property
    def name(self) -> str:
        return op_name(self.func)

    def tensor_inputs(self) -> list[torch.Tensor]:
        ins = [t for _, t in named_tensors(list(self.args), "a")]
        ins += [t for _, t in named_tensors(self.kwargs, "k")]
        return ins


def _has_nan(t: torch.Tensor) -> bool:
    t = local(t)  # a DTensor's own any() all-reduces: this rank's values only
    return is_float(t) and bool(torch.isnan(t).any())


def _has_posinf(t: torch.Tensor) -> bool:
    t = local(t)
    return is_float(t) and bool((t == math.inf).any())


def _localized(ev: Event) -> Event:
    """``ev`` with every DTensor among its arguments and outputs replaced by this rank's local
    tensor (``_util.local``): what the rank itself computed, and every check of it local (a
    DTensor reduction is a collective the other ranks never join). Under no_grad a DTensor's
    local tensor is one object, so an op's output and the next op's input keep one ``id``."""
    if _DTENSOR_MODULE not in sys.modules:
        return ev

    def loc(a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return local(a)
        if isinstance(a, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in a):
            return type(a)(local(x) if isinstance(x, torch.Tensor) else x for x in a)
        return a

    outs = [local(o) for o in ev.outputs]
    if all(a is b for a, b in zip(outs, ev.outputs, strict=True)) and not any(
        _holds_dtensor(a) for a in (*ev.args, *ev.kwargs.values())
    ):
        return ev
    return dataclasses.replace(
        ev,
        args=tuple(loc(a) for a in ev.args),
        kwargs={k: loc(v) for k, v in ev.kwargs.items()},
        outputs=outs,
    )


_DTENSOR_MODULE = "torch.distributed.tensor"


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` hold the same values, NaN where the other has NaN (failure path only)."""
    a, b = a.detach(), b.detach()
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _holds_dtensor(a: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return local(a) is not a
    if isinstance(a, (list, tuple)):
        return any(isinstance(x, torch.Tensor) and local(x) is not x for x in a)
    return False


def _scalar_inf(args: tuple, kwargs: dict) -> bool:
    vals = list(args) + list(kwargs.values())
    return any(isinstance(v, float) and math.isinf(v) for v in vals)


class Analyzer:
    """Feeds every ``Event`` to the core ``OriginTracker`` and takes the producer's evidence
    at once (a later in-place op may change its tensors). Tensors are keyed by ``id``; every
    non-finite one is held alive while the analyzer lives, so no id is reused."""

    def __init__(self, tracker: ModuleTracker, *, step: int | None = None) -> None:
        self.tracker = tracker
        self.step = step
        self.origins = OriginTracker()
        self._alive: dict[int, torch.Tensor] = {}
        self.forward_events: list[Event] = []
        self._node_map: dict[int, Event] | None = None
        self.leaves: dict[int, torch.Tensor] = {}
        # A replay works on copies of the state tensors an op wrote to: copy id -> original.
        self.originals: dict[int, torch.Tensor] = {}
        # id(tensor) -> how its dim 0 was concatenated from several batches (torch.cat).
        self.concats: dict[int, Concat] = {}
        # id(tensor) -> its name, for the parameters and optimizer state a step works on.
        self.tensor_names: dict[int, str] = {}
        # (shape, dtype) -> non-finite outputs seen so far, of any op / of DTensor ops (``_linked``).
        self._bad_outs: dict[tuple, list[torch.Tensor]] = {}
        self._dtensor_outs: dict[tuple, list[torch.Tensor]] = {}

    def value(self, t: torch.Tensor, finite: bool | None = None) -> Value:
        """The tracker's view of ``t`` (its flags read now); a DTensor's is its local tensor's."""
        t = local(t)
        if finite is None:
            finite = all_finite(t)
        if finite:
            return Value(id(t), True)
        self._alive[id(t)] = t
        return Value(id(t), False, probe=lambda: (_has_nan(t), _has_posinf(t)))

    def origin_of(self, t: torch.Tensor) -> Origin | None:
        return self.origins.origin_of(id(local(t)))

    def _as_target(self, ev: Event | None, origin: Origin) -> bool:
        """``ev`` is a loss function that took ``origin``'s values as its target argument."""
        if ev is None or _short(ev.func) not in _LOSS_OPS or len(ev.args) < 2:
            return False
        target = ev.args[1]
        return isinstance(target, torch.Tensor) and self.origin_of(target) is origin

    def _combined_with_output(self, origin: Origin) -> OpSeen | None:
        """The op outside the model that combined ``origin``'s values with the model's output
        (``pred - y``, ``y * log_softmax(logits)``): what a hand-written loss does to its target.
        None when the model itself read them: an input is an input, even if the loss uses it
        too (an autoencoder's ``mse(model(x), x)``)."""
        readers = [r for r in origin.readers if r.record is not None]
        if any(_in_model(r.record) for r in readers):
            return None
        made_by_model: set[int] = set()  # the model's outputs and everything computed from them
        for ev in self.forward_events:
            if _in_model(ev) or any(id(t) in made_by_model for t in ev.tensor_inputs()):
                made_by_model.update(id(o) for o in ev.outputs)
        # Row by row, as a loss compares predictions with targets: a NaN term added to a scalar
        # loss (``task_loss + aux(y)``) says nothing about what ``y`` is.
        for r in readers:
            ins = r.record.tensor_inputs()
            rows = {int(t.shape[0]) for t in ins if t.dim() and self.origin_of(t) is origin}
            if any(
                id(t) in made_by_model
                and self.origin_of(t) is not origin
                and t.dim()
                and int(t.shape[0]) in rows
                for t in ins
            ):
                return r
        return None

    def _readers(self, ev: Event) -> list[str]:
        """The kinds of the later forward ops that read ``ev``'s outputs (how a value is used)."""
        outs = ev.outputs
        kinds = {
            str(OpKind.of(r.name))
            for r in self.forward_events
            if r.index > ev.index and any(t is o for t in r.tensor_inputs() for o in outs)
        }
        return sorted(kinds)

    def _collated(
        self, origin: Origin, t: torch.Tensor, batch: int
    ) -> tuple[list[int], list[int] | None] | None:
        """``t`` read one sample at a time (a map-style dataset's ``__getitem__``, an
        ``IterableDataset``'s rows) and gathered by a batch-sized ``stack`` / ``cat`` among the
        ops that carried its values (a DataLoader's collate): (the bad samples' places in that
        batch, the rows of ``t`` they were, or None when ``t`` is itself one sample). None when
        no such op carried them."""
        carried = [r.record for r in origin.readers if r.record is not None]
        for ev in carried:
            parts = next((a for a in ev.args if isinstance(a, (list, tuple))), ())
            made = ev.outputs[0] if ev.outputs else None
            if not parts or made is None or not made.dim() or made.shape[0] != batch:
                continue
            bad = [i for i, x in enumerate(parts) if is_float(x) and not all_finite(x)]
            if not bad:
                continue
            if all(parts[i].shape == t.shape for i in bad):
                return bad, None  # each sample its own tensor: no bigger one to point into
            rows = sorted(  # select(t, 0, i): row i of the dataset's tensor
                int(r.args[2]) % t.shape[0]
                for r in carried
                if _short(r.func) == "select" and r.args[0] is t and r.args[1] == 0
            )
            return bad, rows if len(rows) == len(bad) else samples_of(t)
        return None

    def _maker(self, t: torch.Tensor) -> Event | None:
        """The forward op that made ``t`` (looked up at a producer only: the events hold their
        outputs alive, so identity is unique). Views are looked through to their base op."""
        for ev in reversed(self.forward_events):
            if any(o is t for o in ev.outputs):
                if ev.func.is_view or _short(ev.func) in _SELECTS:
                    src = next(iter(ev.tensor_inputs()), None)
                    return self._maker(src) if src is not None and src is not t else ev
                return ev
        return None

    def forward_of(self, node: Any) -> Event | None:
        if node is None:
            return None
        if self._node_map is None:
            self._node_map = {}
            for ev in self.forward_events:
                for fn in (
                    ev.grad_fns if ev.grad_fns is not None else [grad_fn_of(o) for o in ev.outputs]
                ):
                    if fn is not None and id(fn) not in self._node_map:
                        self._node_map[id(fn)] = ev
        return self._node_map.get(id(node))

    def _linked(self, ev: Event, original: Event) -> Event:
        """``ev`` (``original`` localized) with each non-finite input of unknown origin that holds
        exactly the values of an earlier op's output replaced by that output.

        The recording knows a DTensor and its local tensor as two tensors, made by different
        code: ``to_local()`` and DTensor's own collectives read the *original* run's local
        tensor of a DTensor an op made, ``DTensor.from_local`` wraps the original run's tensor.
        A replay re-makes the one and reads the other as recorded: a tensor no replayed op made,
        whose NaN would look like bad data. The replay is deterministic, so the replayed tensor
        holds the same values: that is what was read. Only those two crossings are linked: a
        DTensor's local tensor to any earlier output, a plain tensor to a DTensor op's output."""
        for o, before in zip(ev.outputs, original.outputs, strict=True):
            if is_float(o) and not all_finite(o):
                self._bad_outs.setdefault((o.shape, o.dtype), []).append(o)
                if o is not before:
                    self._dtensor_outs.setdefault((o.shape, o.dtype), []).append(o)
        if not self._bad_outs:
            return ev
        ins = ev.tensor_inputs()
        from_dtensor = {
            id(a) for a, b in zip(ins, original.tensor_inputs(), strict=True) if a is not b
        }
        swap: dict[int, torch.Tensor] = {}
        for t in ins:
            if id(t) in swap or not is_float(t) or self.origin_of(t) is not None:
                continue
            pool = self._bad_outs if id(t) in from_dtensor else self._dtensor_outs
            for cand in reversed(pool.get((t.shape, t.dtype), [])):
                if cand is not t and not all_finite(t) and _same_values(t, cand):
                    swap[id(t)] = cand
                    break
        if not swap:
            return ev

        def sub(a: Any) -> Any:
            if isinstance(a, torch.Tensor):
                return swap.get(id(a), a)
            if isinstance(a, (list, tuple)):
                return type(a)(swap.get(id(x), x) if isinstance(x, torch.Tensor) else x for x in a)
            return a

        return dataclasses.replace(
            ev,
            args=tuple(sub(a) for a in ev.args),
            kwargs={k: sub(v) for k, v in ev.kwargs.items()},
        )

    def observe(self, ev: Event) -> None:
        if _DTENSOR_MODULE in sys.modules:
            ev = self._linked(_localized(ev), ev)
        parts = _per_tensor(ev)
        if parts is not None:  # a multi-tensor op is one op per tensor, each with its own origin
            for part in parts:
                self.observe(part)
            return
        if ev.phase is not Phase.BACKWARD:
            self.forward_events.append(ev)
            self._node_map = None
            for t in ev.tensor_inputs():
                if t.requires_grad and t.is_leaf and is_float(t):
                    self.leaves.setdefault(id(t), t)
            self._follow_concat(ev)
        fin = [all_finite(o) for o in ev.outputs]
        if all(fin):
            self.origins.see(
                OpSeen(ev.index, ev.name, ev.phase, [], [Value(id(o), True) for o in ev.outputs])
            )
            return
        ins = ev.tensor_inputs()
        in_fin = ev.inputs_finite if ev.inputs_finite is not None else [all_finite(t) for t in ins]
        op = OpSeen(
            ev.index,
            ev.name,
            ev.phase,
            inputs=[self.value(t, ok) for t, ok in zip(ins, in_fin, strict=False)],
            outputs=[self.value(o, ok) for o, ok in zip(ev.outputs, fin, strict=False)],
            scalar_inf=_scalar_inf(ev.args, ev.kwargs),
            source=_short(ev.func) in _SOURCES,
            record=ev,
        )
        origin = self.origins.see(op)
        if origin is not None:
            bad = next(o for o, ok in zip(ev.outputs, fin, strict=False) if not ok)
            origin.evidence = self._evidence(ev, bad, ins, in_fin)

    # which batch rows a tensor's dim 0 holds, through torch.cat / torch.stack of batches
    def _follow_concat(self, ev: Event) -> None:
        """Keep how dim 0 is laid out for the tensors made by concatenating several batches
        (``torch.cat([anchor, positive])``, ``torch.cat([z1, z2])``, ``torch.stack``): row 6
        of the cat of two 4-row batches is sample 2 of the second. Followed through slices of
        it (``emb[4:]``) and through every op whose output keeps its dim 0 (a layer, a norm,
        ``z @ z.T``) or folds heads into it."""
        short = _short(ev.func)
        if short in ("cat", "concat", "concatenate", "stack") and ev.outputs:
            self._concatenated(ev, short)
            return
        if not self.concats:
            return
        src_t = next((t for t in ev.tensor_inputs() if id(t) in self.concats), None)
        if src_t is None:
            return
        src = self.concats[id(src_t)]
        dim = ev.args[1] if len(ev.args) > 1 else ev.kwargs.get("dim", 0)
        if short in _CUTS and not src.stacked and isinstance(dim, int) and src_t.dim():
            if dim % src_t.dim() == 0:
                start = 0
                if short in ("slice", "narrow"):
                    start = ev.args[2] if len(ev.args) > 2 else ev.kwargs.get("start", 0)
                    step = ev.args[4] if short == "slice" and len(ev.args) > 4 else 1
                    start = 0 if start is None else int(start)
                    start = max(start + src.rows, 0) if start < 0 else min(start, src.rows)
                    if step != 1:
                        return
                for o in ev.outputs:
                    n = int(o.shape[0]) if o.dim() else 0
                    if n:
                        self.concats[id(o)] = _replace_rows(src, n, src.offset + start)
                    start += n
                return
        for o in ev.outputs:
            if not o.dim() or o is src_t:
                continue
            n0 = int(o.shape[0])
            if src.stacked:
                if tuple(o.shape[:2]) == (src.parts, src.size):
                    self.concats[id(o)] = src
                elif n0 == src.parts * src.size:  # flatten(0, 1): the stack read as a cat
                    self.concats[id(o)] = _replace_rows(src, n0, 0, stacked=False)
            elif n0 == src.rows or (n0 > src.rows and n0 % src.rows == 0):
                self.concats[id(o)] = src
            elif (
                src.offset == 0
                and src.rows == src.parts * src.size
                and tuple(o.shape[:2]) == (src.parts, src.size)
            ):  # view(parts, size, ...): the cat read as a stack
                self.concats[id(o)] = _replace_rows(src, src.parts, 0, stacked=True)

    def _concatenated(self, ev: Event, short: str) -> None:
        tensors = ev.args[0] if ev.args else ev.kwargs.get("tensors", ())
        dim = ev.args[1] if len(ev.args) > 1 else ev.kwargs.get("dim", 0)
        out = ev.outputs[0]
        stacked = short == "stack"
        # torch.cat skips empty 1-d tensors; what is left must be batches of one size.
        parts = [
            t
            for t in tensors
            if isinstance(t, torch.Tensor) and (stacked or t.dim() > 1 or t.numel())
        ]
        sizes = {int(t.shape[0]) for t in parts if t.dim()}
        if len(parts) < 2 or len(sizes) != 1 or not out.dim() or not isinstance(dim, int):
            return
        if dim % out.dim() != 0 or (stacked and out.dim() < 2):
            return
        size = sizes.pop()
        if not size:
            return
        loc = _location(ev.frame)
        self.concats[id(out)] = Concat(
            size=size,
            parts=len(parts),
            rows=int(out.shape[0]),
            by=f"torch.{short}",
            where=str(loc) if loc else None,
            stacked=stacked,
        )

    def _rows_of(
        self, t: torch.Tensor, rows: list[int] | None = None
    ) -> tuple[list[int], list[int], str | None]:
        """(samples, positions, what the concatenation says) of the NaN/Inf rows of ``t``, or of
        ``rows`` of its dim 0: rows of the user's batch, through a ``torch.cat`` of batches."""
        concat = self.concats.get(id(t)) if t.dim() else None
        batch = self.tracker.batch_size
        if concat is not None and batch and concat.parts == batch and concat.size != batch:
            concat = None  # a DataLoader's collate stacks the batch's samples: they are its rows
        if concat is None:
            if rows is None:
                samples, positions = batch_rows(t, self.tracker.batch_size)
                return samples, positions, None
            return (*rows_to_samples(rows, int(t.shape[0]), self.tracker.batch_size), None)
        n0 = int(t.shape[0])
        if concat.stacked:  # dim 0 the part, dim 1 the row: rows of the concatenation
            if rows is not None:  # rows of dim 0 are parts, not samples
                return [], [], None
            bad = (~torch.isfinite(t.detach())).reshape(concat.parts, concat.size, -1).any(-1)
            rows = [int(i) for i in torch.nonzero(bad.flatten()).flatten()]
            n0 = concat.parts * concat.size
        elif rows is None:
            rows = samples_of(t)
        samples, positions, by_part = concat_samples(rows, n0, concat)
        return samples, positions, concat_text(by_part, concat) if by_part else None

    # evidence at the producer, taken while its tensors are as the op saw them
    def _evidence(
        self, ev: Event, out: torch.Tensor, ins: list[torch.Tensor], in_fin: list[bool]
    ) -> rules.ProducerEvidence:
        name = ev.name
        kind = op_kind(name)
        summaries = [summary_of(t) for t in ins if is_float(t)]
        short = _short(ev.func).removeprefix("_foreach_").rstrip("_")
        if short in _KIND_OF and len(ev.args) > 2:  # x + v * a / b: the operands are a and b
            summaries = [summary_of(a) for a in ev.args[1:3] if is_float(a)]
        elif kind in _ARITH:
            summaries = []
            for a in ev.args:
                if isinstance(a, torch.Tensor) and is_float(a):
                    summaries.append(summary_of(a))
                elif isinstance(a, (int, float)) and not isinstance(a, bool):
                    summaries.append(summarize(np.array(float(a), dtype=np.float64), out.dtype))
        module = self.tracker.path(ev.module, ev.root)
        updating = None
        if ev.phase is Phase.OPTIMIZER:  # no batch here; the parameter being updated instead
            samples, positions, concatenated = [], [], None
            updating = self._updating(ev)
            module = updating.rsplit(".", 1)[0] if updating and "." in updating else None
        else:
            samples, positions, concatenated = self._rows_of(out)
        evidence = rules.ProducerEvidence(
            op=name,
            phase=ev.phase,
            inputs=summaries,
            output=summary_of(out),
            framework="torch",
            op_kind=kind,
            module=module,
            location=_location(ev.frame),
            samples=samples,
            step=self.step,
        )
        if positions:
            evidence.extra_evidence.append(
                f"positions within each sample (tokens, heads): {samples_text(positions)}"
            )
            evidence.details["positions"] = positions
        if concatenated:
            evidence.extra_evidence.append(concatenated)
        if ev.phase is Phase.OPTIMIZER:
            evidence.extra_evidence.append(
                "inside optimizer.step()"
                + (f", updating {updating}" if updating else "")
                + (f", at {_source_text(ev.source)}" if ev.source and ev.source != ev.frame else "")
            )
            if updating:
                evidence.details["parameter"] = updating
        if kind in (OpKind.STD, OpKind.VAR) and ins:
            evidence.details["reduced_size"] = ins[0].numel() // max(out.numel(), 1)
        if kind is OpKind.LOG and ins and (maker := self._maker(ins[0])) is not None:
            evidence.details["input_op"] = str(OpKind.of(maker.name))
        short = _short(ev.func)
        if short.startswith("nll_loss") and len(ev.args) >= 2:
            self._loss_context(evidence, ev)
        elif short in ("_softmax", "_log_softmax", "logsumexp", "_safe_softmax") and ins:
            x, dim = ev.args[0], ev.args[1] if len(ev.args) > 1 else -1
            if isinstance(dim, (list, tuple)):
                dim = dim[0] if dim else -1
            masked = (x.detach() == -math.inf).all(dim=dim)
            if masked.any():
                rows = (
                    masked.reshape(masked.shape[0], -1).any(1)
                    if masked.dim() > 0
                    else masked.reshape(1)
                )
                evidence.all_masked_rows = [int(i) for i in torch.nonzero(rows).flatten()]
                evidence.samples = self._rows_of(x, evidence.all_masked_rows)[0]
                evidence.extra_evidence.append(
                    f"{int(masked.sum())} of {masked.numel()} softmax rows are entirely -Inf"
                )
        if ev.phase is Phase.BACKWARD:
            self._backward_context(evidence, ev)
        return evidence

    def _updating(self, ev: Event) -> str | None:
        """The name of the parameter (or its optimizer state) an op inside ``optimizer.step()``
        works on: the tensor it writes or reads, else the one its inputs were computed from
        (the LARS trust ratio ``p.norm() / p.grad.norm()`` is about ``p``)."""
        makers = {id(o): e for e in self.forward_events for o in e.outputs if e.index < ev.index}
        todo, seen = [*ev.outputs, *ev.tensor_inputs()], set()
        while todo and len(seen) < 64:
            t = todo.pop(0)
            if id(t) in seen:
                continue
            seen.add(id(t))
            name = self.tensor_names.get(id(self.originals.get(id(t), t)))
            if name is not None:
                return name
            maker = makers.get(id(t))
            if maker is not None:
                todo += maker.tensor_inputs()
        return None

    def _loss_context(self, evidence: rules.ProducerEvidence, ev: Event) -> None:
        logits, target = ev.args[0], ev.args[1]
        ignore = ev.args[4] if len(ev.args) > 4 else -100
        if not isinstance(target, torch.Tensor):
            return
        valid = target != ignore
        evidence.valid_targets = int(valid.sum())
        evidence.ignore_index = int(ignore)
        evidence.target = summary_of(target)
        evidence.num_classes = int(logits.shape[1] if logits.dim() > 1 else logits.shape[0])
        if target.dim() >= 1 and logits.dim() > 1:
            per_sample = valid.reshape(target.shape[0], -1).sum(1)
            evidence.samples = [int(i) for i in torch.nonzero(per_sample == 0).flatten()]
            evidence.details["valid_targets_per_sample"] = [int(v) for v in per_sample[:64]]

    def _backward_context(self, evidence: rules.ProducerEvidence, ev: Event) -> None:
        node = ev.node
        evidence.op = node.name() if node is not None else evidence.op
        fwd = self.forward_of(node)
        if fwd is None:
            return
        evidence.forward_op = fwd.name
        evidence.op_kind = OpKind.of(fwd.name)
        evidence.forward_inputs = [summary_of(t) for t in fwd.tensor_inputs() if is_float(t)]
        # Quote the forward op's inputs as "the inputs" (that is what the user wrote); the
        # backward op's own operands go to the evidence under their real name.
        evidence.extra_evidence.append(
            f"{evidence.op} ({ev.name}) operands: "
            + "; ".join(s.describe() for s in evidence.inputs)
        )
        evidence.inputs = list(evidence.forward_inputs)
        evidence.module = self.tracker.path(fwd.module, fwd.root)
        evidence.location = _location(fwd.frame) or evidence.location
        fwd_samples = [
            s
            for t in fwd.tensor_inputs()
            if (z := _zero_rows(t))
            for s in (self._rows_of(t, z)[0] if id(t) in self.concats else z)
        ]
        if fwd_samples:
            evidence.samples = sorted(set(fwd_samples))

    # from a failure to a diagnosis
    def diagnose(self, failure: Failure, tensor: torch.Tensor | None = None) -> Diagnosis:
        """The diagnosis of what ``OriginTracker.first_failure`` found (``tensor``: the value
        that mattered, for a legitimate infinity that reached the loss)."""
        origin = failure.origin
        if origin is None:
            return rules.unexplained(failure.reached, framework="torch", step=self.step)
        ev = origin.op.record if origin.op is not None else None
        if ev is not None and is_collective(ev.func):
            return self._from_another_rank(failure.reached, ev)
        if origin.kind is OriginKind.EXTERNAL:
            return self._external(origin)
        evidence = origin.evidence
        if evidence is None:  # a legitimate infinity that reached the loss: blame its maker
            ev = origin.op.record
            out = tensor if tensor is not None else ev.outputs[0]
            evidence = self._evidence(ev, out, [], [])
        if evidence.op_kind is OpKind.EXP and origin.op.record is not None:
            evidence.details["used_by"] = self._readers(origin.op.record)
        bwd = origin.first_backward.record if origin.first_backward is not None else None
        return rules.diagnose_failure(
            evidence,
            reached=failure.reached,
            backward_op=bwd.node.name() if bwd is not None and bwd.node is not None else None,
        )

    def _from_another_rank(self, reached: str, ev: Event) -> Diagnosis:
        """A non-finite value that first appeared at a collective (its local inputs finite, or
        read first by it): it came from another rank, no op of this rank made it."""
        loc = _location(ev.frame)
        d = rules.unexplained(
            reached,
            framework="torch",
            step=self.step,
            why=f"it arrived from another rank through {ev.name}"
            + (f" (at {loc})" if loc else "")
            + ": this rank's own inputs to it were finite, so no op of this rank made it",
        )
        d.details["arrived_through"] = ev.name
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            d.details["process_group"] = {"rank": dist.get_rank(), "size": dist.get_world_size()}
        return d

    def _external(self, origin: Origin) -> Diagnosis:
        from nanscope.torch.checks import check_model_state

        assert origin.value is not None
        t = self._alive[origin.value.key]
        ev = origin.op.record
        root = self.tracker.model or ev.root or self.tracker.root
        if root is not None:
            state = {id(p) for p in root.parameters()} | {id(b) for b in root.buffers()}
            state |= {id(local(p)) for p in root.parameters()}  # the tracer sees DTensors' locals

            # Read from the model's state, or written into it (load_state_dict's copy_).
            def real(x: torch.Tensor) -> int:
                return id(self.originals.get(id(x), x))

            if real(t) in state or any(real(o) in state for o in ev.outputs):
                d = check_model_state(root, step=self.step)
                if d is not None:
                    return d
        if isinstance(t, torch.nn.Parameter):
            return rules.nonfinite_parameters(
                {"parameter": summary_of(t)}, framework="torch", step=self.step
            )
        samples, dataset_rows = samples_of(t), None
        batch = self.tracker.batch_size
        out = next((o for o in ev.outputs if o.dim() and o.shape[0] == batch), None)
        if batch and t.dim() and t.shape[0] != batch and out is not None:
            # The whole dataset tensor, sliced or indexed into this batch: the samples are the
            # batch's rows; where they sit in the dataset is evidence.
            dataset_rows, samples = samples, samples_of(out)
        elif (
            batch
            and t.dim()
            and t.shape[0] != batch
            and (collated := self._collated(origin, t, batch))
        ):
            # Read one sample at a time and stacked into the batch by the loader's collate: the
            # samples are their places in that stack; the dataset's rows are evidence.
            samples, dataset_rows = collated
        # What consumed it says what it is: a loss function that took it as its target
        # (argument 2 of mse_loss, nll_loss, binary_cross_entropy, ...) says it is a target,
        # wherever it sat in the batch. So does a hand-written loss that combined it with the
        # model's output (``(pred - y) ** 2``) when the model itself never read it.
        by_loss = next((r for r in origin.readers if self._as_target(r.record, origin)), None)
        if by_loss is not None:
            bad = by_loss.record.args[1]
        elif (by_loss := self._combined_with_output(origin)) is not None:
            bad = next(t for t in by_loss.record.tensor_inputs() if self.origin_of(t) is origin)
        if by_loss is not None:
            if bad is not t and bad.dim():
                dataset_rows = (
                    samples if dataset_rows is None and bad.shape[0] != t.shape[0] else dataset_rows
                )
                samples = samples_of(bad)
            ev = by_loss.record
        d = rules.nonfinite_input(
            None,
            summary_of(t),
            samples,
            framework="torch",
            step=self.step,
            location=_location(ev.frame),
            read_by=ev.name,
            read_in=self.tracker.path(ev.module, ev.root),
            read_by_loss=by_loss is not None,
        )
        if dataset_rows is not None:
            d.evidence.append(
                f"rows of the whole {list(t.shape)} tensor it came from: {samples_text(dataset_rows)}"
            )
            d.details["dataset_rows"] = dataset_rows[:64]
        return d


def _per_tensor(ev: Event) -> list[Event] | None:
    """A multi-tensor op (``_foreach_addcdiv_``, ``_fused_adam_``) as one event per tensor of its
    lists: its k-th outputs made from the k-th tensors of each list (and the other arguments).
    None for any other op."""
    if not _short(ev.func).startswith(("_foreach_", "_fused_")):
        return None
    values = [*ev.args, *ev.kwargs.values()]
    lists = [
        a
        for a in values
        if isinstance(a, (list, tuple)) and a and all(isinstance(x, torch.Tensor) for x in a)
    ]
    if not lists or any(len(a) != len(lists[0]) for a in lists):
        return None
    n = len(lists[0])
    fin = ev.inputs_finite
    wrote = [
        ev.args[i] if i < len(ev.args) else ev.kwargs.get(name)
        for i, name in write_positions(ev.func)
    ]
    wrote = [w for w in wrote if isinstance(w, (list, tuple)) and len(w) == n]
    outs = ev.outputs if len(ev.outputs) == n else None
    parts = []
    for k in range(n):

        def pick(a: Any, k: int = k) -> Any:
            return a[k] if isinstance(a, (list, tuple)) and len(a) == n else a

        args = tuple(pick(a) for a in ev.args)
        kwargs = {key: pick(v) for key, v in ev.kwargs.items()}
        part_fin = None
        if fin is not None:  # ev.tensor_inputs() order: each list expanded in place
            part_fin, i = [], 0
            for a in values:
                if isinstance(a, (list, tuple)):
                    if any(a is x for x in lists):
                        part_fin.append(fin[i + k])
                    i += sum(isinstance(x, torch.Tensor) for x in a)
                elif isinstance(a, torch.Tensor):
                    part_fin.append(fin[i])
                    i += 1
        outputs = [outs[k]] if outs is not None else [w[k] for w in wrote if is_float(w[k])]
        if not outputs:
            continue
        parts.append(
            Event(
                ev.index,
                ev.func,
                args,
                kwargs,
                outputs,
                ev.phase,
                ev.module,
                ev.root,
                ev.frame,
                ev.node,
                part_fin,
                None,
                ev.source,
            )
        )
    return parts


def _in_model(ev: Event) -> bool:
    """``ev`` ran inside a module's forward (a loss module is not the model)."""
    return ev.module is not None and not is_loss_module(ev.module)


def _replace_rows(src: Concat, rows: int, offset: int, stacked: bool | None = None) -> Concat:
    return Concat(
        src.size,
        src.parts,
        rows,
        offset,
        src.by,
        src.where,
        src.stacked if stacked is None else stacked,
    )


def _zero_rows(t: torch.Tensor) -> list[int]:
    if not is_float(t) or t.dim() == 0 or t.numel() == 0:
        return []
    z = (t.detach() == 0).reshape(t.shape[0], -1).any(1)
    return [int(i) for i in torch.nonzero(z).flatten()] if bool(z.any()) and t.shape[0] > 1 else []


# -- the tracing mode ------------------------------------------------------------------------


def inputs_finite(func: Any, args: tuple, kwargs: dict) -> list[bool] | None:
    """For an in-place op, whether each tensor input is finite, taken before the op writes to
    it (``Event.inputs_finite``); None for other ops (their inputs are still as they were)."""
    if not func._schema.is_mutable:
        return None
    return [all_finite(t) for _, t in named_tensors([list(args), kwargs], "a")]


class TraceMode(TorchDispatchMode):
    """Sees every aten op of a step, forward and backward, and feeds an ``Analyzer``."""

    def __init__(self, analyzer: Analyzer) -> None:
        super().__init__()
        self.analyzer = analyzer
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ins_fin = inputs_finite(func, args, kwargs)
        out = func(*args, **kwargs)
        outs = [t for _, t in named_tensors(out, "o") if is_float(t)]
        if not outs and ins_fin is not None:
            outs = written(func, args, kwargs)
        if not outs:
            return out
        tr = self.analyzer.tracker
        node = torch._C._current_autograd_node()
        ev = Event(
            self.count,
            func,
            args,
            kwargs,
            outs,
            tr.phase(node is not None),
            tr.current(),
            tr.root,
            user_frame(),
            node,
            ins_fin,
        )
        self.count += 1
        self.analyzer.observe(ev)
        return out


def _matters(
    analyzer: Analyzer, result: Any, model: torch.nn.Module | None
) -> list[tuple[str, torch.Tensor]]:
    things: list[tuple[str, torch.Tensor]] = []
    things += [("loss", t) for _, t in named_tensors(result, "result") if is_float(t)]
    things += [("output", t) for t in analyzer.tracker.root_outputs]
    params = list(model.parameters()) if model is not None else list(analyzer.leaves.values())
    things += [("gradient", p.grad) for p in params if p.grad is not None]
    return things


def first_failure(analyzer: Analyzer, things: list[tuple[str, torch.Tensor]]) -> Diagnosis | None:
    """The diagnosis of the earliest origin among the non-finite things that matter."""
    values = [(what, analyzer.value(t)) for what, t in things]
    failure = analyzer.origins.first_failure(values)
    if failure is None:
        return None
    tensor = next(
        (local(t) for (_, v), (_, t) in zip(values, things, strict=True) if v.key == failure.key),
        None,
    )
    return analyzer.diagnose(failure, tensor)


def trace_step(
    fn: Callable[[], Any], *, model: torch.nn.Module | None = None, step: int | None = None
) -> Diagnosis | None:
    """Run ``fn()`` (forward + loss + backward of one step, no optimizer step) under full
    instrumentation and diagnose the first producer of a non-finite value that reached the
    loss (what ``fn`` returns), the model's output or a gradient. ``None`` if all stayed finite.

    Pass ``model`` to get module paths relative to it and the forward/loss phase split at its
    top-level forward. ``fn`` runs exactly once; nanscope restores nothing here (see
    ``nanscope.torch.diagnose`` for a call that leaves the model as it was).

    Example:
        >>> net = torch.nn.Linear(3, 1)
        >>> x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
        >>> def step():
        ...     y = net(x)
        ...     return torch.log(y.abs() * 0).mean()   # log(0) = -inf
        >>> d = trace_step(step, model=net)
        >>> d.category, d.op, d.phase
        (<Category.OP_DOMAIN: 'op_domain'>, 'aten::log', <Phase.LOSS: 'loss'>)
    """
    tracker = ModuleTracker(model)
    analyzer = Analyzer(tracker, step=step)
    tracker.install()
    try:
        with TraceMode(analyzer):
            result = fn()
    finally:
        tracker.remove()
    return first_failure(analyzer, _matters(analyzer, result, model))
