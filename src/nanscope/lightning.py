"""``NanGuard``: nanscope's Guard as a PyTorch Lightning (2.x) callback.

    from nanscope.lightning import NanGuard
    trainer = Trainer(callbacks=[NanGuard(policy="skip")])
    trainer.fit(model, loader)
    guard = trainer.callbacks[0]      # guard.skipped, guard.counts, guard.last (a Diagnosis)

How it hooks in (Lightning has no veto for an optimizer step, Lightning#5152, so it takes one
where it exists):

* ``on_fit_start`` wraps ``step`` of each inner torch optimizer (an instance attribute, removed
  in ``teardown``). Lightning's fp32 and bf16 paths call ``optimizer.step(closure)``: the wrapper
  runs the closure (forward, loss, backward, ``on_before_optimizer_step``) and then applies the
  update only if nanscope allowed it. 16-mixed calls ``scaler.step(optimizer)``, which reaches
  the same wrapper; manual optimization reaches it through ``LightningOptimizer.step``.
* ``on_before_optimizer_step`` decides, with the fused check of ``nanscope.torch.Guard``
  (``Guard._check``: one reduction, one host read; under DDP its one flag ``all_reduce``, so every
  rank takes the same decision and none steps while another skips).
* ``on_train_batch_end`` explains a vetoed step: BatchNorm buffers restored, the batch replayed
  under per-op tracing (``strategy.training_step`` under ``no_sync``), the repro bundle written,
  then the policy (``Guard._fail``). Under ``"warn"`` this runs inside the wrapped step, before
  the update is applied, so that the replay starts from the same weights.
* A step-interval LR scheduler does not advance on a vetoed step.
* ``on_validation_batch_end`` explains the first non-finite validation loss of an epoch with
  ``nanscope.torch.diagnose_eval``.
* ``state_dict`` / ``load_state_dict`` carry the counters and the history through a resume.

Design constraints: a thin shell. Every decision and explanation is the Guard's (one
``Guard`` per optimizer, ``zero_grad=False``: Lightning zeroes the gradients); this module only
translates Lightning's hooks. It imports torch and Lightning (``lightning.pytorch`` when the
program imported it, else ``pytorch_lightning``), never tensorflow. Healthy steps add the
Guard's one fused check and nothing else; nothing here changes the numbers of a healthy run.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch

from nanscope import sinks as _sinks
from nanscope.core.diagnosis import Diagnosis
from nanscope.core.enums import Policy
from nanscope.core.errors import MissingDependencyError, NonFiniteError
from nanscope.torch import distributed as _dist
from nanscope.torch.loop import HostScaler, LoopGuard, diagnosis_from
from nanscope.torch.loop import warn as _warn

__all__ = ["NanGuard"]


def _lightning() -> Any:
    """``lightning.pytorch`` if the program uses it, else ``pytorch_lightning``."""
    for name in ("lightning.pytorch", "pytorch_lightning"):
        if name in sys.modules:
            return sys.modules[name]
    for name in ("pytorch_lightning", "lightning.pytorch"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingDependencyError("pytorch-lightning", "lightning")


pl = _lightning()


def _loss_of(out: Any) -> Any:
    if isinstance(out, Mapping):
        return out.get("loss")
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    return out


def _finite(t: Any) -> bool:
    return (
        not isinstance(t, torch.Tensor)
        or not t.is_floating_point()
        or bool(torch.isfinite(t).all())
    )


class _NoLog:
    """During a replay the module's ``self.log`` calls do nothing (the step already logged)."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.module.log = lambda *a, **k: None
        self.module.log_dict = lambda *a, **k: None

    def __exit__(self, *exc: Any) -> None:
        for name in ("log", "log_dict"):
            self.module.__dict__.pop(name, None)


class NanGuard(pl.Callback):
    """Check every optimizer update of ``Trainer.fit`` for NaN/Inf before it is applied, and
    explain failures (op, module, line, samples, root cause) with a repro bundle.

    Args:
        policy: ``"skip"`` (default: the update is not applied, weights, BatchNorm statistics and
            optimizer state stay bit-identical, a step-interval LR scheduler does not advance,
            training goes on), ``"stop"`` (not applied; ``trainer.should_stop``), ``"raise"``
            (``nanscope.NonFiniteError`` out of ``trainer.fit``), ``"warn"`` (applied anyway).
        reports: folder for repro bundles (``None``: none); on DDP only the rank that saw the
            value first writes one.
        validation: explain the first non-finite validation loss of each validation epoch.
        on_failure: called with each ``Diagnosis``.
        sinks: ``"auto"`` (default): the trackers already running (the Trainer's TensorBoard
            logger, an active W&B or MLflow run; rank 0 only); a list (see ``nanscope.sinks``); None.
        **guard_kwargs: passed to each ``nanscope.torch.Guard`` (``max_bundles``,
            ``check_weights_every``, ``max_skips_in_a_row``, ``warn_early``).

    Attributes:
        guards: one ``Guard`` per optimizer (``guards[0]`` for the usual single one).
        skipped, counts, diagnoses, last, should_stop: over all of them, as on ``Guard``.
        eval_diagnoses: diagnoses of non-finite validation losses.
    """

    def __init__(
        self,
        policy: Policy | str = Policy.SKIP,
        *,
        reports: str | None = "nanscope-reports",
        validation: bool = True,
        on_failure: Callable[[Diagnosis], Any] | None = None,
        sinks: Any = "auto",
        **guard_kwargs: Any,
    ) -> None:
        self.policy = Policy(policy)
        self.reports = reports
        self.validation = validation
        self.on_failure = on_failure
        self.sinks = sinks
        self.guard_kwargs = guard_kwargs
        self.guards: list[LoopGuard] = []
        self.eval_diagnoses: list[Diagnosis] = []
        self._by_id: dict[int, LoopGuard] = {}
        self._wrapped: list[tuple[Any, Any]] = []  # (object, its own "step" attribute or None)
        self._pending: dict[int, tuple[int, dict[str, Any]]] = {}
        self._rng: dict[int, dict[str, Any] | None] = {}
        self._loss: Any = None
        self._replaying = False
        self._batch: tuple[Any, int] | None = None
        self._loaded: dict[str, Any] | None = None
        self._eval_bad_epoch = False
        self._trainer: Any = None

    # -- the combined view ----------------------------------------------------------------
    @property
    def skipped(self) -> int:
        return sum(g.skipped for g in self.guards)

    @property
    def counts(self) -> Counter[str]:
        return sum((g.counts for g in self.guards), Counter())

    @property
    def diagnoses(self) -> list[Diagnosis]:
        return sorted((d for g in self.guards for d in g.diagnoses), key=lambda d: d.step or 0)

    @property
    def last(self) -> Diagnosis | None:
        found = [g.last for g in self.guards if g.last is not None]
        return max(found, key=lambda d: d.step or 0) if found else None

    @property
    def should_stop(self) -> bool:
        return any(g.should_stop for g in self.guards)

    def __repr__(self) -> str:
        why = ", ".join(f"{n} {c}" for c, n in self.counts.most_common())
        steps = sum(g.steps for g in self.guards)
        return (
            f"<nanscope NanGuard policy={self.policy}: {steps} steps, {self.skipped} skipped"
            + (f"; failures: {why}" if why else "")
            + ">"
        )

    # -- setup / teardown -------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._trainer = trainer
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        model = trainer.strategy.model if trainer.strategy.model is not None else pl_module
        self.guards, self._by_id = [], {}
        for optimizer in trainer.optimizers:
            if isinstance(optimizer, torch.optim.LBFGS):
                _warn(
                    "nanscope NanGuard: LBFGS evaluates its closure several times per step; "
                    "this optimizer is not guarded"
                )
                continue
            g = LoopGuard(
                model,
                optimizer,
                policy=self.policy,
                scaler=HostScaler(scaler) if scaler is not None else None,
                reports=self.reports,
                zero_grad=False,
                on_failure=self.on_failure,
                sinks=self._sink_value(trainer),
                **self.guard_kwargs,
            )
            g.module = pl_module  # names as the user wrote them, not DDP's / Lightning's wrappers
            self.guards.append(g)
            self._by_id[id(optimizer)] = g
            self._wrap_optimizer(optimizer, g)
        step_schedulers = [
            c.scheduler
            for c in getattr(trainer, "lr_scheduler_configs", []) or []
            if getattr(c, "interval", "epoch") == "step"
        ]
        if step_schedulers:
            self._wrap_scheduler_hook(pl_module, step_schedulers)
        if self._loaded is not None:
            for g, state in zip(self.guards, self._loaded.get("guards", []), strict=False):
                g.load(state)
            self.eval_diagnoses = [
                diagnosis_from(d) for d in self._loaded.get("eval_diagnoses", [])
            ]
            self._loaded = None

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._unwrap()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._unwrap()

    def _sink_value(self, trainer: Any) -> Any:
        if not (isinstance(self.sinks, str) and self.sinks == "auto"):
            return self.sinks

        def writers() -> list[Any]:
            found = []
            for logger in getattr(trainer, "loggers", []) or []:
                if type(logger).__name__ == "TensorBoardLogger":
                    found.append(logger.experiment)
            return found

        return _sinks.Auto(writers)

    def _wrap_optimizer(self, optimizer: Any, guard: LoopGuard) -> None:
        own = optimizer.__dict__.get("step")  # an LR scheduler may have wrapped it already
        original = optimizer.step

        def step(closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()  # forward, loss, backward; on_before_optimizer_step decides
            if self._replaying:
                return loss
            pending = self._pending.get(id(optimizer))
            if pending is None:
                original(**kwargs)
                return loss
            if guard.policy is Policy.WARN:  # explain first, from the same weights; then apply
                del self._pending[id(optimizer)]
                guard.apply_update = lambda: original(**kwargs)
                try:
                    self._explain(guard, id(optimizer), *pending)
                finally:
                    guard.apply_update = None
            return loss  # vetoed: not applied

        if hasattr(
            original, "_wrapped_by_lr_sched"
        ):  # torch's scheduler checks its own wrapper is there
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        optimizer.step = step
        self._wrapped.append((optimizer, own))

    def _wrap_scheduler_hook(self, pl_module: Any, schedulers: list[Any]) -> None:
        """A step-interval scheduler does not advance after a vetoed update. The module's
        ``lr_scheduler_step`` hook is wrapped, not ``scheduler.step``: a scheduler's
        ``state_dict`` is its ``__dict__``, and a checkpoint would try to pickle the wrapper."""
        own = pl_module.__dict__.get("lr_scheduler_step")
        original = pl_module.lr_scheduler_step
        ids = {id(s) for s in schedulers}

        def lr_scheduler_step(scheduler: Any, metric: Any = None) -> Any:
            guard = self._by_id.get(id(getattr(scheduler, "optimizer", None)))
            if (
                id(scheduler) in ids
                and guard is not None
                and guard.steps
                and not guard._applied_last
            ):
                return None  # the update it follows was vetoed
            return original(scheduler, metric)

        pl_module.lr_scheduler_step = lr_scheduler_step
        self._wrapped.append((pl_module, ("lr_scheduler_step", own)))

    def _unwrap(self) -> None:
        for obj, own in reversed(self._wrapped):
            name, own = own if isinstance(own, tuple) else ("step", own)
            if own is None:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, own)
        self._wrapped = []

    # -- training ---------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch = (batch, batch_idx)
        self._loss = None
        for g in self.guards:
            self._rng[id(g)] = g.begin()

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if not self._replaying:
            self._loss = loss

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._replaying:
            return
        g = self._by_id.get(id(optimizer))
        if g is None:
            return
        verdict = g.decide(self._loss)
        if not _dist.active() and trainer.world_size > 1:
            # A distributed strategy without a torch.distributed group (the Guard's flag
            # all_reduce needs one): every rank agrees through the strategy's own reduce.
            if (
                trainer.strategy.reduce_boolean_decision(verdict is not None, all=False)
                and verdict is None
            ):
                verdict = (g.steps - 1, {"loss": None, "grad_norm": None, "ranks_bad": None})
        if verdict is not None:
            g._applied_last = False  # vetoed: the step's LR scheduler does not advance either
            self._pending[id(optimizer)] = verdict

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pending, self._pending = self._pending, {}
        for key, (index, seen) in pending.items():
            g = self._by_id[key]
            self._explain(g, key, index, seen)
        if self.should_stop:
            trainer.should_stop = True

    def _explain(self, g: LoopGuard, key: int, index: int, seen: dict[str, Any]) -> None:
        trainer = self._trainer
        batch, batch_idx = self._batch if self._batch is not None else (None, 0)
        try:
            g.explain(self._replay_fn(trainer, batch_idx), batch, index, self._rng.get(id(g)), seen)
        finally:
            if g.should_stop:
                trainer.should_stop = True

    def _replay_fn(self, trainer: Any, batch_idx: int) -> Callable[[Any], Any]:
        utils = importlib.import_module(pl.__name__ + ".utilities.signature_utils")
        return _Replay(self, trainer, batch_idx, utils.is_param_in_hook_signature)

    # -- validation -------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_bad_epoch = False

    def on_validation_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.validation or self._eval_bad_epoch or self._replaying:
            return
        loss = _loss_of(outputs)
        if _finite(loss):
            return
        self._eval_bad_epoch = (
            True  # the first bad batch of the epoch is explained; the rest only counted
        )
        try:
            d = self._diagnose_eval(trainer, pl_module, batch, batch_idx, dataloader_idx)
        except Exception as err:
            _warn(
                f"nanscope NanGuard: could not explain the non-finite validation loss "
                f"({type(err).__name__}: {err})"
            )
            return
        if d is None:
            return
        d.step = trainer.global_step
        d.details["batch"] = batch_idx
        d.evidence.append(
            f"validation batch {batch_idx} (dataloader {dataloader_idx}) at global step "
            f"{trainer.global_step}: the validation loss is {float(loss.float().sum()):g}"
        )
        self.eval_diagnoses = (self.eval_diagnoses + [d])[-32:]
        if self.on_failure is not None:
            self.on_failure(d)
        try:
            _sinks.send(
                self._sink_value(trainer),
                d,
                action="warn",
                nonfinite_steps=sum(self.counts.values()),
                skipped_steps=self.skipped,
                step=trainer.global_step,
                rank=_dist.rank(),
            )
        except Exception as err:
            _warn(
                f"nanscope: could not send the diagnosis to the trackers: {type(err).__name__}: {err}"
            )
        if self.policy is Policy.RAISE:
            raise NonFiniteError(d)
        if self.policy is Policy.STOP:
            trainer.should_stop = True
        _warn(f"{d}\n  in validation (nanscope.torch.diagnose_eval); training is not affected")

    def _diagnose_eval(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int
    ) -> Diagnosis | None:
        from nanscope.torch.evaluate import diagnose_eval
        from nanscope.torch.trace import trace_step

        step = pl_module.validation_step
        takes = len(
            [
                p
                for p in inspect.signature(step).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        )
        args = (batch, batch_idx, dataloader_idx)[: max(1, min(takes, 3))]

        def loss_fn(_out: Any, _targets: Any) -> Any:
            return _loss_of(step(*args))

        with _NoLog(pl_module):
            try:
                return diagnose_eval(pl_module, [batch], loss_fn)
            except NotImplementedError:  # no forward(): trace validation_step itself
                was = pl_module.training
                pl_module.eval()
                try:
                    with torch.no_grad():
                        return trace_step(lambda: _loss_of(step(*args)), model=pl_module)
                finally:
                    pl_module.train(was)

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "guards": [g.state() for g in self.guards],
            "eval_diagnoses": [d.to_dict() for d in self.eval_diagnoses],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.guards:  # loaded after on_fit_start: apply now
            for g, state in zip(self.guards, state_dict.get("guards", []), strict=False):
                g.load(state)
            self.eval_diagnoses = [diagnosis_from(d) for d in state_dict.get("eval_diagnoses", [])]
        else:
            self._loaded = dict(state_dict)


class _Replay:
    """The step ``Guard._fail`` replays: the strategy's ``training_step`` (under the precision
    plugin's autocast, through DDP's forward) and a plain backward; optimizer steps and
    ``self.log`` inside ``training_step`` (manual optimization) do nothing meanwhile."""

    def __init__(
        self, callback: NanGuard, trainer: Any, batch_idx: int, in_signature: Callable[..., bool]
    ) -> None:
        self.callback, self.trainer, self.batch_idx = callback, trainer, batch_idx
        self.in_signature = in_signature

    def __call__(self, batch: Any) -> Any:
        module = self.trainer.lightning_module
        args = (
            (batch, self.batch_idx)
            if self.in_signature(module.training_step, "batch_idx", min_args=2)
            else (batch,)
        )
        self.callback._replaying = True
        try:
            with _NoLog(module), torch.enable_grad():
                out = self.trainer.strategy.training_step(*args)
                loss = _loss_of(out)
                if (
                    module.automatic_optimization
                    and isinstance(loss, torch.Tensor)
                    and loss.requires_grad
                ):
                    loss.backward()
            return loss
        finally:
            self.callback._replaying = False
