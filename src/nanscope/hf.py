"""``NanGuardCallback``: nanscope's Guard inside the Hugging Face ``transformers.Trainer``.

    import nanscope.hf
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    guard = nanscope.hf.guard(trainer, policy="skip")   # inserts the callback
    trainer.train()
    guard.skipped, guard.counts, guard.last             # a Diagnosis: op, module, line, samples, cause

Why a callback is not enough alone: the Trainer hides a NaN loss (``logging_nan_inf_filter``
puts the running mean in the log) and still applies the update, and its callbacks see neither
the loss nor the batch. So the callback, once it knows its Trainer (``guard(trainer)``, or the
Trainer that calls ``on_train_begin`` when it was passed in ``callbacks=[...]``):

* wraps ``trainer.training_step`` to keep each micro-batch's loss and inputs (no copy);
* in ``on_pre_optimizer_step`` (after clipping, before ``optimizer.step()``) runs the fused
  check of ``nanscope.torch.Guard`` over ``optimizer.param_groups`` (not the model: under FSDP
  and DeepSpeed the model's ``.grad`` are None) and the loss;
* on a failure explains it at once, from the weights before the update (``Guard._fail``:
  replay of ``compute_loss`` + backward under per-op tracing, repro bundle), then vetoes the
  update: the accelerate-wrapped optimizer's ``step`` does nothing and reports
  ``step_was_skipped``, so the Trainer does not advance the LR scheduler, exactly as after
  accelerate's own GradScaler skip;
* adds ``nanscope/nonfinite_steps`` and ``nanscope/skipped_steps`` to every training log, so the
  integrations the Trainer reports to (TensorBoard, W&B, MLflow, ...) get them too.

Where DeepSpeed steps inside ``backward`` there is nothing left to veto: the policy becomes
``"stop"``, with one line that says so.

Design constraints: a thin shell over ``nanscope.torch.Guard`` (``nanscope.lightning.LoopGuard``);
it imports torch and transformers, never tensorflow; every wrapper is an instance attribute,
removed in ``on_train_end``. Healthy steps cost the Guard's one fused check.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from nanscope import sinks as _sinks
from nanscope.core.diagnosis import Diagnosis
from nanscope.core.enums import Policy
from nanscope.core.errors import MissingDependencyError
from nanscope.torch.loop import LoopGuard
from nanscope.torch.loop import warn as _warn

try:
    import transformers
except ImportError as _err:  # pragma: no cover - exercised without transformers installed
    raise MissingDependencyError("transformers", "hf") from _err

__all__ = ["NanGuardCallback", "guard"]


class NanGuardCallback(transformers.TrainerCallback):
    """Check every optimizer step of ``Trainer.train`` for NaN/Inf before it is applied.

    Args:
        policy: ``"skip"`` (default: the update is not applied and the LR scheduler does not
            advance), ``"stop"`` (not applied; training stops), ``"raise"``
            (``nanscope.NonFiniteError`` out of ``trainer.train()``), ``"warn"`` (applied anyway).
        reports: folder for repro bundles (``None``: none).
        on_failure: called with each ``Diagnosis``.
        sinks: ``"auto"`` (default: the Trainer's TensorBoard writer, an active W&B or MLflow
            run; rank 0 only), a list (see ``nanscope.sinks``), or None.
        **guard_kwargs: passed to ``nanscope.torch.Guard``.

    Attributes:
        guard: the ``nanscope.torch.Guard`` doing the work (after ``on_train_begin``).
        skipped, counts, diagnoses, last, should_stop: as on ``Guard``.
        nonfinite_steps: the Trainer's global steps whose check failed.
    """

    def __init__(
        self,
        policy: Policy | str = Policy.SKIP,
        *,
        reports: str | None = "nanscope-reports",
        on_failure: Callable[[Diagnosis], Any] | None = None,
        sinks: Any = "auto",
        **guard_kwargs: Any,
    ) -> None:
        self.policy = Policy(policy)
        self.reports = reports
        self.on_failure = on_failure
        self.sinks = sinks
        self.guard_kwargs = guard_kwargs
        self.guard: Any = None
        self.trainer: Any = None
        self.nonfinite_steps: list[int] = []
        self._micro: list[tuple[Any, Any, Any, Any]] = []  # (model, inputs, num_items, loss)
        self._rng: dict[str, Any] | None = None
        self._veto = False
        self._replaying = False
        self._wrapped: list[tuple[Any, str, Any]] = []

    # -- the Guard's view ------------------------------------------------------------------
    @property
    def skipped(self) -> int:
        return self.guard.skipped if self.guard is not None else 0

    @property
    def counts(self) -> Counter[str]:
        return self.guard.counts if self.guard is not None else Counter()

    @property
    def diagnoses(self) -> list[Diagnosis]:
        return self.guard.diagnoses if self.guard is not None else []

    @property
    def last(self) -> Diagnosis | None:
        return self.guard.last if self.guard is not None else None

    @property
    def should_stop(self) -> bool:
        return bool(self.guard is not None and self.guard.should_stop)

    def __repr__(self) -> str:
        return f"<nanscope NanGuardCallback {self.guard!r}>"

    # -- attaching -------------------------------------------------------------------------
    def attach(self, trainer: Any) -> NanGuardCallback:
        """Know ``trainer``: keep its micro-batch losses and inputs, add the counters to its logs."""
        if self.trainer is trainer:
            return self
        self.trainer = trainer
        self._set(trainer, "training_step", self._training_step(trainer.training_step))
        self._set(trainer, "log", self._log(trainer.log))
        return self

    def _set(self, obj: Any, name: str, value: Any) -> None:
        self._wrapped.append((obj, name, obj.__dict__.get(name)))
        setattr(obj, name, value)

    def _unwrap(self) -> None:
        for obj, name, own in reversed(self._wrapped):
            if own is None:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, own)
        self._wrapped = []
        self.trainer = None

    def _training_step(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def training_step(model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            loss = original(model, inputs, num_items_in_batch)
            if not self._replaying:
                self._micro.append((model, inputs, num_items_in_batch, loss))
            return loss

        return training_step

    def _log(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> Any:
            if self.guard is not None and ("loss" in logs or "train_loss" in logs):
                logs["nanscope/nonfinite_steps"] = float(len(self.nonfinite_steps))
                logs["nanscope/skipped_steps"] = float(self.guard.skipped)
            return original(logs, *args, **kwargs)

        return log

    def _find_trainer(self) -> Any:
        """The Trainer whose loop called this hook (when the callback came in ``callbacks=[...]``)."""
        f = sys._getframe(1)
        while f is not None:
            me = f.f_locals.get("self")
            if isinstance(me, transformers.Trainer):
                return me
            f = f.f_back
        return None

    # -- the hooks -------------------------------------------------------------------------
    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        trainer = self.trainer or self._find_trainer()
        if trainer is None:
            _warn(
                "nanscope NanGuardCallback: could not find its Trainer; use `nanscope.hf.guard(trainer)`. "
                "Training continues unguarded"
            )
            return
        self.attach(trainer)
        policy = self.policy
        if getattr(trainer, "is_deepspeed_enabled", False) and policy in (Policy.SKIP, Policy.WARN):
            _warn(
                "nanscope: DeepSpeed steps the optimizer inside backward, so a step cannot be vetoed; "
                "nanscope stops training at the first non-finite step instead (policy 'stop')"
            )
            policy = Policy.STOP
        optimizer = optimizer if optimizer is not None else trainer.optimizer
        writers = [
            cb.tb_writer
            for cb in trainer.callback_handler.callbacks
            if type(cb).__name__ == "TensorBoardCallback"
            and getattr(cb, "tb_writer", None) is not None
        ]
        sinks = (
            _sinks.Auto(lambda: writers)
            if isinstance(self.sinks, str) and self.sinks == "auto"
            else self.sinks
        )
        self.guard = LoopGuard(
            trainer.model_wrapped,
            optimizer,
            policy=policy,
            reports=self.reports,
            zero_grad=False,
            on_failure=self.on_failure,
            sinks=sinks,
            **self.guard_kwargs,
        )
        self.guard.module = model if model is not None else trainer.model
        self._wrap_step(optimizer)

    def _wrap_step(self, optimizer: Any) -> None:
        original = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            if not self._veto:
                out = original(*args, **kwargs)
                if getattr(optimizer, "scaler", None) is None and hasattr(
                    optimizer, "_is_overflow"
                ):
                    optimizer._is_overflow = False
                return out
            self._veto = False
            if hasattr(
                optimizer, "_is_overflow"
            ):  # accelerate: step_was_skipped -> no scheduler step
                optimizer._is_overflow = True
            return None

        if hasattr(
            original, "_wrapped_by_lr_sched"
        ):  # torch's scheduler checks its own wrapper is there
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        self._set(optimizer, "step", step)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._micro = []
        self._veto = False
        if self.guard is not None:
            self._rng = self.guard.begin()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        g = self.guard
        if g is None or g.disabled:
            return
        losses = [m[3] for m in self._micro if isinstance(m[3], torch.Tensor)]
        loss = (
            losses[0]
            if len(losses) == 1
            else (torch.stack([t.float() for t in losses]).sum() if losses else None)
        )
        try:
            g._unscale()  # under accelerate's GradScaler; a no-op when clipping unscaled already
        except Exception as err:
            g._internal("unscaling the gradients", err)
            return
        verdict = g.decide(loss)
        if verdict is None:
            return
        index, seen = verdict
        self.nonfinite_steps.append(state.global_step)
        bad = next(
            (
                m
                for m in self._micro
                if isinstance(m[3], torch.Tensor) and not bool(torch.isfinite(m[3]).all())
            ),
            self._micro[-1] if self._micro else None,
        )
        model, inputs, num_items = (
            (bad[0], bad[1], bad[2]) if bad is not None else (self.trainer.model, None, None)
        )
        self._veto = g.policy is not Policy.WARN
        try:
            g.explain(
                self._replay_fn(model, num_items), inputs, index, self._rng, seen
            )  # raises under "raise"
        finally:
            if g.should_stop:
                control.should_training_stop = True
            self._veto = self._veto and g.policy is not Policy.WARN

    def _replay_fn(self, model: Any, num_items: Any) -> Callable[[Any], Any]:
        trainer = self.trainer

        def replay(inputs: Any) -> Any:
            self._replaying = True
            try:
                with torch.enable_grad(), trainer.compute_loss_context_manager():
                    loss = trainer.compute_loss(
                        model, trainer._prepare_inputs(inputs), num_items_in_batch=num_items
                    )
                if isinstance(loss, torch.Tensor) and loss.requires_grad:
                    trainer.accelerator.backward(loss)
                return loss
            finally:
                self._replaying = False

        return replay

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._unwrap()


def guard(trainer: Any, policy: Policy | str = Policy.SKIP, **kwargs: Any) -> NanGuardCallback:
    """Insert a ``NanGuardCallback`` into ``trainer`` and return it.

    Example:
        >>> guard_cb = guard(trainer, policy="skip")   # doctest: +SKIP
        >>> trainer.train()                           # doctest: +SKIP
        >>> guard_cb.skipped, guard_cb.last            # doctest: +SKIP
    """
    existing = next(
        (cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NanGuardCallback)), None
    )
    if existing is not None:
        return existing.attach(trainer)
    cb = NanGuardCallback(policy, **kwargs)
    cb.attach(trainer)
    trainer.add_callback(cb)
    return cb
