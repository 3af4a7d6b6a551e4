"""``LoopGuard``: ``nanscope.torch.Guard`` driven by a host training loop that steps itself.

Lightning (``nanscope.lightning``) and the Hugging Face Trainer (``nanscope.hf``) own the loop:
they run forward and backward, call ``optimizer.step()`` and the LR scheduler. The guard then
cannot be the one that calls ``step_fn`` and applies the update (``Guard.step``); the host's
hooks call its pieces instead, in the same order:

    rng = guard.begin()                   # before the step: BatchNorm snapshot, RNG state
    verdict = guard.decide(loss)          # after backward: the one fused check (DDP: one all_reduce)
    if verdict is not None:               # veto the host's update, then explain it:
        guard.explain(step_fn, batch, *verdict[:1], rng, verdict[1])

Design constraints: no logic of its own. Every decision, explanation, bundle and policy is
``Guard``'s (``_check``, ``_scaler_skip``, ``_fail``, the ledger); ``_apply`` is the host's
(``apply_update``, used under ``"warn"`` only). Imports torch only.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from nanscope.core.diagnosis import Diagnosis
from nanscope.torch.guard import Guard

__all__ = ["HostScaler", "LoopGuard", "diagnosis_from", "warn"]

_NANSCOPE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def warn(text: str) -> None:
    """A RuntimeWarning attributed to the first frame outside nanscope (the host's hook caller)."""
    level, f = 1, sys._getframe(0)
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(_NANSCOPE_DIR):
        f, level = f.f_back, level + 1
    warnings.warn(text, RuntimeWarning, stacklevel=level)


class HostScaler:
    """The host's GradScaler, read-only for the guard: the host loop steps and updates it."""

    def __init__(self, scaler: Any) -> None:
        self._scaler = scaler

    def is_enabled(self) -> bool:
        return bool(self._scaler.is_enabled())

    def get_scale(self) -> float:
        return self._scaler.get_scale()

    def unscale_(
        self, optimizer: Any
    ) -> None:  # Lightning unscales before on_before_optimizer_step
        pass

    def step(self, optimizer: Any) -> None:
        pass

    def update(self) -> None:
        pass


class LoopGuard(Guard):
    """A Guard inside a host loop (Lightning, the HF Trainer) that applies the update itself.

    ``apply_update`` is what ``_apply`` calls (the host's real step under ``"warn"``); by
    default nothing, since the host steps on its own once the guard allowed it."""

    apply_update: Callable[[], Any] | None = None

    def _apply(self) -> None:
        if self.apply_update is not None:
            self.apply_update()

    def begin(self) -> dict[str, Any] | None:
        """Before the host's step: snapshot BatchNorm buffers; the RNG state for a replay."""
        if self.disabled:
            return None
        try:
            return self._before()
        except Exception as err:
            self._internal("preparing the step", err)
            return None

    def decide(self, loss: Any) -> tuple[int, dict[str, Any]] | None:
        """The fused check of one update. None: apply it. Else ``(index, seen)``: veto it, and
        explain it later with ``explain``. Scaler overflows (finite loss, Inf gradients under a
        GradScaler) are the scaler's business, unless the scale collapses."""
        if self.disabled:
            return None
        index = self.steps
        self.steps += 1
        try:
            verdict = self._check(loss, index)
        except Exception as err:
            self._internal("checking the step", err)
            return None
        if verdict is None:
            self._applied_last = True
            self.ledger.healthy()
            return None
        if verdict.get("scaler_overflow"):
            try:
                collapse = self._scaler_skip(index)  # _apply is the host's: nothing is stepped here
            except Exception as err:
                self._internal("following the loss scale", err)
                return None
            if collapse is not None:
                self.ledger.record(collapse)
                self._act(collapse, [], unrecoverable=False, scaler_done=True)
            return None
        return index, verdict

    def explain(
        self,
        step_fn: Callable[[Any], Any],
        batch: Any,
        index: int,
        rng_before: dict[str, Any] | None,
        seen: dict[str, Any],
    ) -> None:
        """Restore the buffers, replay and localize, write the bundle, act (raises under "raise")."""
        from nanscope.torch.bundle import rng_state

        self._fail(
            step_fn, batch, index, rng_before if rng_before is not None else rng_state(), seen
        )

    # -- what survives a checkpoint --------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "skipped": self.skipped,
            "counts": dict(self.counts),
            "should_stop": self.should_stop,
            "in_a_row": self.ledger.in_a_row,
            "loss": list(self.history.loss),
            "grad_norm": list(self.history.grad_norm),
            "diagnoses": [d.to_dict() for d in self.diagnoses],
            "bundles": self._bundles,
        }

    def load(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self.skipped = int(state.get("skipped", 0))
        self.counts = Counter({str(k): int(v) for k, v in state.get("counts", {}).items()})
        self.should_stop = bool(state.get("should_stop", False))
        self.ledger.in_a_row = int(state.get("in_a_row", 0))
        self._bundles = int(state.get("bundles", 0))
        self.history.loss.clear()
        self.history.grad_norm.clear()
        self.history.loss.extend(float(v) for v in state.get("loss", []))
        self.history.grad_norm.extend(float(v) for v in state.get("grad_norm", []))
        self.diagnoses = [diagnosis_from(d) for d in state.get("diagnoses", [])]


def diagnosis_from(doc: Mapping[str, Any]) -> Diagnosis:
    return Diagnosis.from_dict(dict(doc.get("diagnosis") or doc))
