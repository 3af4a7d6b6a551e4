"""``nanscope run`` for PyTorch scripts: watch an unchanged script, stop it at the first
non-finite value that reaches something that matters, and diagnose it.

How it stays cheap:

* one global ``TorchDispatchMode`` (entered when the script imports torch, left when it
  ends) records every aten op in a list and queues one on-device reduction per op output,
  ``isfinite(out).all()``; nothing is synchronized per op;
* the queued flags are checked together at boundaries only: before each optimizer step
  (together with one fused norm of all gradients, which also feeds the gradient-norm
  history), when the script pulls a number out of a tensor (``loss.item()``, ``float(x)``),
  and when the top-level module returns;
* only when a boundary sees a non-finite value that matters (the loss, a gradient, the
  model's output, weights after an update) are the recorded ops replayed through the
  tracer's ``Analyzer`` (``nanscope.torch.trace``) to name the producer, its module, line,
  phase and samples. A NaN that never reaches any of those (the branch ``where`` discards)
  stays silent.

Design constraints: zero code change in the user's script; the numbers the script computes
are never changed (the mode only observes); ops inside ``optimizer.step()`` are not recorded
(the update is checked as a whole after it); nanscope's own errors become one warning
through ``session.internal_error`` and the script carries on unwatched; ``detach`` (run by
``session.close()``) removes the mode and every hook.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils._python_dispatch import TorchDispatchMode

from nanscope.core import rules
from nanscope.core.diagnosis import Diagnosis
from nanscope.core.enums import Category, Phase
from nanscope.core.errors import NonFiniteError
from nanscope.torch.checks import check_optimizer_state
from nanscope.torch.trace import Analyzer, Event, ModuleTracker, first_failure, user_frame

__all__ = ["attach", "detach"]

_SCALAR = torch.ops.aten._local_scalar_dense.default
_ONES_LIKE = torch.ops.aten.ones_like.default
_FLUSH_EVERY = 50_000  # records kept at most while all of them are finite


def _float_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (tuple, list)):
        return [o for o in out if isinstance(o, torch.Tensor) and o.is_floating_point()]
    return []


def _is_backward_seed() -> bool:
    """True when ``ones_like`` is called by autograd to seed ``loss.backward()``."""
    f = sys._getframe(2)
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
        kwargs = kwargs or {}
        r = self.runner
        if r.off:
            return func(*args, **kwargs)
        if func is _SCALAR:
            r.guarded(r.at_scalar, args[0])
        out = func(*args, **kwargs)
        if func is _ONES_LIKE and isinstance(args[0], torch.Tensor) and _is_backward_seed():
            r.losses.append(args[0])
        outs = _float_outputs(out)
        if outs:
            r.guarded(r.record, func, args, kwargs, outs)
        return out


class Runner:
    """The state of one watched script."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.tracker = ModuleTracker()
        self.tracker.on_root_done = lambda output: self.guarded(self.at_model_output)
        self.mode = _Mode(self)
        self.records: list[Event] = []
        self.flags: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []
        self.grad_norms: list[float] = []
        self.step = 0
        self.in_optimizer = False
        self.disabled = False
        self.done = False
        self.busy = False  # nanscope's own ops (checks, analysis) are not the script's
        self._handles: list[Any] = []
        self._lr: float | None = None

    @property
    def off(self) -> bool:
        return self.in_optimizer or self.disabled or self.done or self.busy

    # -- install / remove --------------------------------------------------------------------
    def install(self) -> None:
        self.tracker.install()
        self._handles = [register_optimizer_step_pre_hook(self._pre_step),
                         register_optimizer_step_post_hook(self._post_step)]
        self.mode.__enter__()

    def remove(self) -> None:
        self.done = True
        self.tracker.remove()
        for h in self._handles:
            h.remove()
        self._handles = []
        try:
            self.mode.__exit__(None, None, None)
        except Exception:  # the mode stack was already unwound (the script ended in an error)
            pass
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
            self.disabled = True
            self._clear()
            self.session.internal_error("watching the PyTorch script", err)
            return None
        finally:
            self.busy = False

    # -- recording (per op: no synchronization) ----------------------------------------------
    def record(self, func: Any, args: tuple, kwargs: dict, outs: list[torch.Tensor]) -> None:
        node = torch._C._current_autograd_node()
        tr = self.tracker
        ev = Event(len(self.records), func, args, kwargs, outs, tr.phase(node is not None), tr.current(),
                   tr.root, user_frame(), node)
        self.records.append(ev)
        if not func.is_view:  # views cannot create a non-finite value
            for o in outs:
                if o.numel():
                    self.flags.append(torch.isfinite(o).all())
        if len(self.records) >= _FLUSH_EVERY and self._all_finite():
            self._clear()

    def _all_finite(self) -> bool:
        if not self.flags:
            return True
        ok = bool(torch.stack(self.flags).all())
        if ok:
            self.flags = []
        return ok

    def _clear(self) -> None:
        self.records, self.flags, self.losses = [], [], []

    # -- boundaries -------------------------------------------------------------------------
    def at_scalar(self, t: torch.Tensor) -> None:
        if not self.records or self._all_finite():
            self._clear()
            return
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            self._fail([("loss", t)])

    def at_model_output(self) -> None:
        if not self.records or not self.flags:
            return
        outs = self.tracker.root_outputs
        if outs and not self._all_finite() and not all(bool(torch.isfinite(o).all()) for o in outs):
            self._fail([("output", o) for o in outs])

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.guarded(self._check_gradients, optimizer)
        self.in_optimizer = True

    def _check_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self._lr = next((float(g["lr"]) for g in optimizer.param_groups if "lr" in g), None)
        if not grads:
            return
        with torch.no_grad():
            dense = [g for g in grads if not g.is_sparse]
            norms = torch._foreach_norm(dense) if dense else []
            total = float(torch.stack([n.float() for n in norms]).norm()) if norms else 0.0
        if math.isfinite(total):
            self.grad_norms.append(total)
            del self.grad_norms[:-64]
            self._all_finite()  # a NaN that reached nothing that matters: forget it
            self._clear()
            return
        things = [("loss", t) for t in self.losses]
        things += [("gradient", g) for g in grads]
        self._fail(things)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.in_optimizer = False
        self.guarded(self._check_update, optimizer)
        self.step += 1
        self.tracker.new_step()
        self._clear()

    def _check_update(self, optimizer: torch.optim.Optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if not params:
            return
        with torch.no_grad():
            norms = torch._foreach_norm([p.detach() for p in params if not p.is_sparse])
            if bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
                return
        root = self.tracker.root
        d = check_optimizer_state(optimizer, step=self.step, model=root)
        if d is None:
            d = Diagnosis(Category.UNKNOWN, "the optimizer's update made the weights non-finite from finite "
                          "gradients and state", phase=Phase.OPTIMIZER, framework="torch", step=self.step,
                          evidence=[f"learning rate {self._lr!r}"])
        self._raise(d)

    # -- failure ----------------------------------------------------------------------------
    def _fail(self, things: list[tuple[str, torch.Tensor]]) -> None:
        self.done = True  # stop recording: the analysis below runs ops too
        records = self.records
        analyzer = Analyzer(self.tracker, step=self.step)
        for ev in records:
            analyzer.observe(ev)
        d = first_failure(analyzer, things)
        if d is None:
            d = Diagnosis(Category.UNKNOWN, "a non-finite value reached the " + things[0][0] if things else "?",
                          framework="torch", step=self.step)
        self._raise(d)

    def _raise(self, d: Diagnosis) -> None:
        self.done = True
        self._clear()
        if d.step is None:
            d.step = self.step
        d = rules.with_history(d, list(self.grad_norms), lr=self._lr)
        raise self.session.fail(d)


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
    runner.install()
    _RUNNERS[id(session)] = runner
    session.cleanups.append(lambda: detach(session))


def detach(session: Any) -> None:
    """Remove the instrumentation ``attach`` installed for ``session``."""
    runner = _RUNNERS.pop(id(session), None)
    if runner is not None:
        runner.remove()
