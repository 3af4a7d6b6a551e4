"""``Guard``: a check before every optimizer update, cheap enough to leave on.

    guard = Guard(model, optimizer, policy="skip")
    for batch in loader:
        loss = guard.step(train_step, batch)   # train_step: forward + loss + backward
        if guard.should_stop:
            break

Design constraints:

* Healthy steps cost one fused reduction and nothing per op or per module: one
  ``torch._foreach_norm`` over the loss, the gradients and the normalization buffers (and the
  weights on the first step and every ``check_weights_every`` steps), stacked into three
  numbers read with a single ``.tolist()``: one host-device synchronization per step on CUDA,
  and none before it (no ``.item()``, no ``bool(tensor)``). Under DDP the flag rides one
  ``all_reduce`` of a ``world_size``-element tensor before that read. The decision must be
  known before ``optimizer.step()`` (policy ``skip`` keeps the weights bit-identical), so the
  one synchronization cannot be deferred. To verify on a GPU:
  ``torch.cuda.set_sync_debug_mode("warn")`` around ``guard.step`` warns once per step (the
  ``.tolist()``) and at no other place.
* The pre-step values needed to explain a failure are kept cheaply: the normalization layers'
  buffers (a ``_foreach_copy_`` into preallocated tensors) and the RNG state. Weights and
  optimizer state need no copy: the failed update is never applied.
* Only on a failure does the expensive work run: BatchNorm buffers and RNG are restored, the
  batch and the stored state are checked (``nanscope.torch.checks``), the same step is
  replayed under full per-op instrumentation (``nanscope.torch.trace.trace_step``), the
  gradient-norm history decides between ``exploding_gradients`` and a one-off cause
  (``nanscope.core.rules.with_history``), and a repro bundle is written.
* Weights that became non-finite in an update (Adam's ``eps`` rounding to 0 in float16, a NaN
  learning rate) show up at the next step's check and are attributed to the optimizer phase
  of the step before. A weight that takes part in the forward pass makes the loss
  non-finite at once, so checking all weights every step is not needed to catch it.
* nanscope's own errors never stop training: they become one warning and the guard steps
  aside (the loop goes on unguarded). Errors raised by the user's ``train_step`` or by the
  optimizer are the user's and propagate unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch

from nanscope.core import rules
from nanscope.core.diagnosis import Diagnosis
from nanscope.core.enums import Category, Phase, Policy
from nanscope.core.errors import NonFiniteError
from nanscope.core.guarding import STATE_PHASES, GuardState, Ledger, internal_error_text
from nanscope.core.limits import dtype_name
from nanscope.core.summary import fmt
from nanscope.torch import bundle as _bundle
from nanscope.torch import distributed as _dist
from nanscope.torch._util import is_norm_layer, quiet_replay, settled_norms
from nanscope.torch.checks import check_batch, check_model_state, check_optimizer_state
from nanscope.torch.diagnose import split_batch

__all__ = ["Guard"]

_BATCH_CATEGORIES = (Category.NONFINITE_INPUT, Category.INVALID_TARGET)


def _replay(step_fn: Callable[[], Any], model: torch.nn.Module, step: int) -> Diagnosis | None:
    """The per-op replay (a module-level function so tests can inject a failure into it)."""
    from nanscope.torch.trace import trace_step

    # The step warned once already, when it ran for real; a compiled model or step is replayed
    # eagerly (op by op is the point), so a finite replay of a compiled failure is its numerics.
    with quiet_replay(), _force_eager():
        return trace_step(step_fn, model=model, step=step)


def _force_eager() -> Any:
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _compiled(model: Any, step_fn: Any) -> str | None:
    """What ``torch.compile`` compiled in this step (the model or the step function), if anything."""
    if getattr(step_fn, "_torchdynamo_orig_callable", None) is not None:
        return f"torch.compile({getattr(step_fn, '__name__', 'train_step')})"
    if getattr(model, "_orig_mod", None) is not None:
        return f"torch.compile({type(model._orig_mod).__name__})"
    return None


class Guard(GuardState):
    """Checks every optimizer update for NaN/Inf before it is applied, and explains failures.

    Args:
        model: the model being trained (a ``DistributedDataParallel`` wrapper is fine).
        optimizer: its optimizer; ``Guard.step`` calls ``optimizer.step()`` when the step is
            finite (or when ``policy="warn"``).
        policy: what to do with a non-finite step: ``"raise"`` (``NonFiniteError`` carrying the
            diagnosis), ``"skip"`` (do not apply the update; weights and optimizer state stay
            bit-identical; training goes on), ``"stop"`` (do not apply it and set
            ``should_stop``), ``"warn"`` (apply it anyway). Under ``"skip"``, a failure that is
            already in the stored state (non-finite weights, corrupt BatchNorm statistics)
            cannot be skipped away, and the guard stops instead.
        scaler: a ``torch.amp.GradScaler`` when ``train_step`` calls ``scaler.scale(loss).backward()``.
            The guard then unscales, checks and calls ``scaler.step`` / ``scaler.update``. Inf
            gradients under a finite loss are the scaler's business (it skips the step and
            lowers the scale), not a failure, unless the scale collapses (every step skipped).
        reports: folder for repro bundles (``None``: write none).
        max_bundles: at most this many bundles per guard (a run that skips often stays small).
        zero_grad: call ``optimizer.zero_grad(set_to_none=True)`` before each step (turn off
            for gradient accumulation; a replay then starts from zero gradients).
        check_weights_every: also check every weight on the first step and every this many
            steps (a weight pass costs as much as the gradient pass); 1 checks every step.
        warn_early: warn once when the gradient norm grows geometrically, before it overflows.
        on_failure: called with each ``Diagnosis`` (after it is recorded, before the policy acts).
        sinks: where else to send failures: ``"auto"`` (the trackers already running: TensorBoard,
            Weights & Biases, MLflow; see ``nanscope.sinks``), a list of sinks / writers, or None.

    An ``accelerator.prepare``'d or ``fabric.setup``'d optimizer is fine: the guard checks the
    torch optimizer inside it, takes its loss scaler, and lets the wrapper step.

    Attributes:
        should_stop: True after a failure under ``"stop"`` (or an unrecoverable one under ``"skip"``).
        skipped: number of updates not applied.
        counts: failures by category (``Counter``).
        diagnoses: the diagnoses so far (the last 32); ``last`` is the latest.
        history: loss and gradient-norm history (``nanscope.core.trend.History``).

    Example:
        >>> import torch, warnings
        >>> from nanscope.torch import Guard
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = torch.nn.Linear(3, 2)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> def train_step(batch):
        ...     x, y = batch
        ...     loss = torch.nn.functional.cross_entropy(net(x), y)
        ...     loss.backward()
        ...     return loss
        >>> guard = Guard(net, opt, policy="skip", reports=None)
        >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
        >>> loss = guard.step(train_step, (x, y))          # finite: the update is applied
        >>> x[2, 1] = float("nan")
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")            # the guard warns with the diagnosis
        ...     loss = guard.step(train_step, (x, y))      # NaN in sample 2: skipped
        >>> guard.skipped, guard.last.category, guard.last.samples
        (1, <Category.NONFINITE_INPUT: 'nonfinite_input'>, [2])
        >>> guard
        <nanscope Guard policy=skip: 2 steps, 1 skipped; failures: 1 nonfinite_input>
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        policy: Policy | str = Policy.SKIP,
        scaler: Any = None,
        reports: str | None = "nanscope-reports",
        max_bundles: int = 5,
        zero_grad: bool = True,
        check_weights_every: int = 10,
        max_skips_in_a_row: int = 10,
        warn_early: bool = True,
        on_failure: Callable[[Diagnosis], Any] | None = None,
        sinks: Any = None,
    ) -> None:
        self.model = model
        self.module: torch.nn.Module = _dist.unwrap(model)
        self.optimizer = optimizer
        self.ledger = Ledger(policy, max_skips_in_a_row=max_skips_in_a_row)
        self.scaler = scaler
        self.reports = reports
        self.max_bundles = max_bundles
        self.zero_grad = zero_grad
        self.check_weights_every = max(1, int(check_weights_every))
        self.warn_early = warn_early
        self._applied_last = False  # the previous step's update was applied
        self._step_fn: Any = None  # the step function of the step being checked
        self._bundles = 0
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._norm_buffers = [
            (m, n)
            for m in self.module.modules()
            if is_norm_layer(m)
            for n, b in m.named_buffers(recurse=False)
            if b is not None
        ]
        self._snapshot: list[torch.Tensor] | None = None
        self._reduced = False  # this step's flag all_reduce has run (DDP)
        self._spread: bool | None = None  # DDP: its gradient all-reduce carries the flag
        # -- library integrations (nanscope.lightning, nanscope.hf, nanscope.sinks) --
        self.on_failure = on_failure
        self.sinks = sinks
        self._host_optimizer: Any = None
        self._accept_wrapped(model, optimizer)

    # -- the step ---------------------------------------------------------------------------
    def step(self, step_fn: Callable[[Any], Any], batch: Any) -> Any:
        """Run ``step_fn(batch)`` (forward + loss + backward, returns the loss), check it, and
        apply ``optimizer.step()`` unless the policy says otherwise. Returns what ``step_fn``
        returned: the loss, or ``(loss, ...)`` / ``{"loss": loss, ...}`` (the loss is checked)."""
        if self.ledger.disabled:
            return self._plain(step_fn, batch)
        index, rng_before, early = self.steps, None, None
        self._step_fn = step_fn
        try:
            rng_before = self._before()
        except Exception as err:
            if not _dist.active():
                self._internal("preparing the step", err)
                return self._plain(step_fn, batch)
            early = err  # under DDP, still take part in this step's flag all_reduce (below)
        self.steps += 1
        if self._spreads():  # DDP: a non-finite loss or buffer here spreads as NaN gradients
            with _dist.poisoned_backward(self._floating_buffers()):
                loss = step_fn(batch)
        else:
            loss = step_fn(batch)
        try:
            if early is None:
                self._unscale()
            verdict = self._check(loss, index, local_error=early)
        except _dist.RankLeftError:
            raise  # another rank left: its collectives can never be matched (not nanscope's failure)
        except Exception as err:
            self._internal("checking the step", err)
            self._apply()
            return loss
        if verdict is None:
            self._apply()
            self._applied_last = True
            self.ledger.healthy()
            return loss
        if verdict.get("scaler_overflow"):
            try:
                collapse = self._scaler_skip(index)
            except Exception as err:
                self._internal("following the loss scale", err)
                return loss
            if collapse is None:
                return loss
            self.ledger.record(collapse)
            self._act(collapse, [], unrecoverable=False, scaler_done=True)
            return loss
        self._fail(step_fn, batch, index, rng_before, verdict)  # raises under "raise"
        return loss

    def _scaling(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    def _unscale(self) -> None:
        if self._scaling():
            try:
                self.scaler.unscale_(self.optimizer)
            except RuntimeError as err:
                if "already been called" not in str(err):  # train_step unscaled for clipping: fine
                    raise

    def _apply(self) -> None:
        if (
            self._host_optimizer is not None
        ):  # accelerate / Fabric: their step runs scaler.step + update
            self._host_optimizer.step()
            return
        if self._scaling():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _scaler_skip(self, index: int) -> Diagnosis | None:
        """Inf/NaN gradients under a finite loss with a GradScaler: the scaler skips the step
        and lowers its scale. A failure only when the scale collapses (nanscope.core.rules)."""
        self._apply()  # GradScaler.step skips the update itself when it found Inf/NaN
        scales = self.ledger.loss_scale
        scales.add(self.scaler.get_scale(), skipped_step=index)  # a sync, on overflow steps only
        bad = [
            n
            for n, p in self.module.named_parameters()
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        dtype = next(
            (
                dtype_name(p.dtype)
                for p in self._params
                if p.dtype in (torch.float16, torch.bfloat16)
            ),
            "float16",
        )
        return rules.loss_scale_collapse(
            scales.scales,
            scales.skipped,
            bad_parameters=bad,
            framework="torch",
            step=index,
            dtype=dtype,
        )

    def _spreads(self) -> bool:
        """DDP whose gradient all-reduce carries the guard's flag (``_dist.spreads_flags``):
        decided once, at the first step, the same way on every rank."""
        if self._spread is None:
            try:
                self._spread = not self._scaling() and _dist.spreads_flags(self.model, self._params)
            except Exception as err:  # then the guard all-reduces its flag itself
                self._spread = False
                self.ledger.warn_once("spread", internal_error_text("looking at DDP", err))
        return self._spread

    def _floating_buffers(self) -> list[torch.Tensor]:
        buffers = (getattr(m, n) for m, n in self._norm_buffers)
        return [_dist.local(b) for b in buffers if b.is_floating_point()]

    def _plain(self, step_fn: Callable[[Any], Any], batch: Any) -> Any:
        if self.zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        index = self.steps
        self.steps += 1
        loss = step_fn(batch)
        if self._spread and _dist.active():  # the guarded ranks must not wait for this one
            try:
                self._follow(index)
            except _dist.RankLeftError:
                raise
            except Exception:  # nanscope's, already reported once: the run goes on
                pass
        self.optimizer.step()
        return loss

    def _before(self) -> dict[str, Any]:
        if self.zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        buffers = [getattr(m, n) for m, n in self._norm_buffers]
        snap = self._snapshot
        if (
            snap is None
            or len(snap) != len(buffers)
            or any(
                s.shape != b.shape
                or s.dtype != b.dtype
                or s.device != b.device  # model.to(...) since
                for s, b in zip(snap, buffers, strict=True)
            )
        ):
            self._snapshot = [b.detach().clone() for b in buffers]
        elif buffers:
            with torch.no_grad():
                torch._foreach_copy_(snap, buffers)
        return _bundle.rng_state()

    def _restore_buffers(self) -> list[torch.Tensor]:
        """Put the pre-step normalization buffers back; returns the post-step values."""
        buffers = [getattr(m, n) for m, n in self._norm_buffers]
        after = [b.detach().clone() for b in buffers]
        if buffers and self._snapshot is not None:
            with torch.no_grad():
                torch._foreach_copy_(buffers, self._snapshot)
        return after

    def _check(
        self, loss: Any, index: int, local_error: BaseException | None = None
    ) -> dict[str, Any] | None:
        """The fused check. None when finite; else what it saw (for the evidence).

        Under DDP every rank reaches the flag all_reduce, even when nanscope failed locally: the
        failure travels as a flag, and then every rank raises (and steps aside) together."""
        ddp = _dist.active()
        self._reduced = False
        try:
            if local_error is not None:
                raise local_error
            return self._check_local(loss, index, ddp)
        except Exception as err:
            if (
                not ddp or self._reduced or isinstance(err, _dist.RankLeftError)
            ):  # after the all_reduce every rank knows already
                raise
            if self._spread:  # flags are exchanged on bad steps only: join where they will be
                self._follow(index)
            else:
                device = next((p.device for p in self._params), torch.device("cpu"))
                no = torch.zeros((), dtype=torch.bool, device=device)
                _dist.flags(bad=no, local_first=no, internal=True, step=index)
            raise err from None

    def _follow(self, index: int) -> None:
        """On a rank whose guard failed (DDP, flags spread by the gradients): decide as the
        guarded ranks do, on what is the same on every rank, and where they will exchange
        flags (a non-finite step), exchange INTERNAL so that every rank steps aside too."""
        tensors = self._same_everywhere(index)
        if not tensors:
            return
        values = torch.stack(list(torch._foreach_norm(tensors, 2, dtype=torch.float32))).tolist()
        if all(map(math.isfinite, values)) or all(
            map(math.isfinite, settled_norms(values, tensors))
        ):
            return
        no = torch.zeros((), dtype=torch.bool, device=tensors[0].device)
        self._reduced = True
        _dist.flags(bad=~no, local_first=no, internal=True, step=index)

    def _same_everywhere(self, index: int) -> list[torch.Tensor]:
        """What the DDP check decides on: the all-reduced gradients, and on weight-check steps
        the weights (DDP keeps them equal)."""
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        tensors = [
            p.grad for p in self._params if p.grad is not None and p.grad.is_floating_point()
        ]
        if index % self.check_weights_every == 0:
            tensors += [p for p in self._params if p.is_floating_point()]
        return tensors

    def _check_local(self, loss: Any, index: int, ddp: bool) -> dict[str, Any] | None:
        buffers = [
            b for b in (getattr(m, n) for m, n in self._norm_buffers) if b.is_floating_point()
        ]
        weights = index % self.check_weights_every == 0
        if isinstance(loss, dict):  # train_step may return {"loss": ..., ...} or (loss, outputs)
            loss = loss.get("loss")
        elif isinstance(loss, (tuple, list)) and loss:
            loss = loss[0]
        loss_t = (
            loss.detach() if isinstance(loss, torch.Tensor) and loss.is_floating_point() else None
        )
        # DDP whose gradient all-reduce carries the flag (``_dist.poisoned_backward``): decide on
        # what is the same on every rank (the all-reduced gradients, the weights), so that no
        # collective is needed unless the step is bad; this rank's loss and buffers reached
        # those gradients as NaN already. Otherwise this rank's loss and buffers are checked too.
        spread = ddp and bool(self._spread)
        tensors = self._same_everywhere(index)  # the gradients, then the weights on weight steps
        n_grads = sum(1 for p in self._params if p.grad is not None and p.grad.is_floating_point())
        if not spread:
            tensors = ([loss_t] if loss_t is not None else []) + tensors[:n_grads] + buffers
            tensors += [p for p in self._params if p.is_floating_point()] if weights else []
        if not tensors:
            return None
        if ddp:  # FSDP2 / DTensor: each rank reduces its own shards; the flag all_reduce agrees
            tensors = [_dist.local(t) for t in tensors]
        device = tensors[0].device
        # One reduction per device group inside _foreach_norm; norms in float32 so that a
        # finite float16 gradient cannot overflow its own norm. NaN/Inf anywhere -> NaN/Inf norm.
        # The per-tensor norms come back in one .tolist(); the arithmetic on them (total, the
        # gradient norm) is done in Python, because on small models each extra tensor op costs
        # more dispatcher time than the whole reduction.
        norms = list(torch._foreach_norm(tensors, 2, dtype=torch.float32))
        if loss_t is not None:
            norms.append(_dist.local(loss_t).float().sum())  # the signed loss, for the history
        try:
            stacked = torch.stack(norms)
        except RuntimeError:  # tensors on several devices (model parallel): gather the norms first
            stacked = torch.stack([n.to(device) for n in norms])
        n = len(tensors)  # values[:n] decide; the loss value after them is for the history
        ranks_bad: list[float] | None = None
        if ddp and not spread:
            flags = _dist.flags(
                bad=~torch.isfinite(stacked[:n].sum()),
                local_first=~torch.isfinite(stacked[-1])
                if loss_t is not None
                else torch.zeros((), dtype=torch.bool, device=device),
                step=index,
            )
            self._reduced = True
            values = torch.cat([stacked, flags]).tolist()  # the one synchronization of the step
            ranks_bad = values[len(norms) :]
            values = values[: len(norms)]
            self._step_aside_if_failed(ranks_bad)
        else:
            values = stacked.tolist()  # the one synchronization of the step
        if not all(map(math.isfinite, values[:n])) or (ranks_bad is not None and any(ranks_bad)):
            # An Inf norm need not be an Inf value: a float32 sum of squares overflows once a
            # norm passes ~1.8e19. Settle each Inf norm exactly (failure path only).
            values[:n] = settled_norms(values[:n], tensors)
            local = not all(map(math.isfinite, values[:n]))
            loss_bad = loss_t is not None and not math.isfinite(values[-1])
            if spread and local:  # bad on every rank alike: now exchange who saw it first
                own_bad = loss_bad or not all(bool(torch.isfinite(b).all()) for b in buffers)
                ranks_bad = _dist.flags(
                    bad=torch.tensor(True, device=device),
                    local_first=torch.tensor(own_bad, device=device),
                    step=index,
                ).tolist()
                self._reduced = True
                self._step_aside_if_failed(ranks_bad)
            elif (
                ranks_bad is not None
            ):  # every rank is here (they all saw the same flags): agree again
                ranks_bad = _dist.flags(
                    bad=torch.tensor(local or loss_bad, device=device),
                    local_first=torch.tensor(loss_bad, device=device),
                    step=index,
                ).tolist()
        g0 = 1 if not spread and loss_t is not None else 0
        grad_norms = values[g0 : g0 + n_grads]
        gnorm_f = math.sqrt(sum(v * v for v in grad_norms)) if n_grads else 0.0
        loss_f = values[-1] if loss_t is not None else 0.0
        decided = values[:n] if spread else values  # (spread: this rank's loss is history only)
        bad = not all(map(math.isfinite, decided)) or (ranks_bad is not None and any(ranks_bad))
        if not bad:
            self.history.add(loss_f if loss_t is not None else None, gnorm_f if n_grads else None)
            self._warn_growth(index)
            return None
        seen = {
            "loss": loss_f if loss_t is not None else None,
            "grad_norm": gnorm_f if n_grads else None,
            "ranks_bad": ranks_bad,
            "weights_checked": weights,
        }
        if (
            self._scaling()
            and loss_t is not None
            and math.isfinite(loss_f)
            and not (ranks_bad and any(int(f) & _dist.LOCAL_LOSS for f in ranks_bad))
        ):
            # Finite loss, non-finite gradients: scaled gradients overflowed, which GradScaler
            # handles (unless the weights or buffers themselves are bad: checked below).
            other = buffers + (
                [p for p in self._params if p.is_floating_point()] if weights else []
            )
            if all(bool(torch.isfinite(t).all()) for t in other):
                seen["scaler_overflow"] = True
        return seen

    @staticmethod
    def _step_aside_if_failed(ranks_bad: list[float]) -> None:
        failed = [r for r, f in enumerate(ranks_bad) if int(f) & _dist.INTERNAL]
        if failed:
            raise RuntimeError(
                f"the guard failed on rank{'s' if len(failed) > 1 else ''} "
                f"{', '.join(map(str, failed))}, so every rank steps aside"
            )

    def _warn_growth(self, index: int) -> None:
        norms = self.history.grad_norm
        # Only a step whose norm grew can start an explosion: the full test runs on those alone.
        if not self.warn_early or len(norms) < 3 or not norms[-1] > norms[-2]:
            return
        # What rules.growth_warning needs, cheaply first (it sorts the history): a third rise
        # in a row, or a jump of 1e3 over the median, and so over the smallest norm.
        if not norms[-2] > norms[-3] and not norms[-1] > 1e3 * min(norms):
            return
        warning = rules.growth_warning(list(norms), step=index, framework="torch")
        if warning is not None:
            self.ledger.warn_once("growth", warning)

    # -- the failure path -------------------------------------------------------------------
    def _fail(
        self,
        step_fn: Callable[[Any], Any],
        batch: Any,
        index: int,
        rng_before: dict[str, Any],
        seen: dict[str, Any],
    ) -> None:
        rng_after = _bundle.rng_state()
        after = self._restore_buffers()  # pre-step BatchNorm statistics from here on
        unrecoverable = False
        try:
            d, unrecoverable = self._diagnose(step_fn, batch, index, rng_before, seen)
        except _dist.RankLeftError:
            raise  # another rank left: no collective can be matched any more (not nanscope's failure)
        except Exception as err:
            self._internal("diagnosing the step", err)
            d = self._not_found(index, seen, err)
        finally:
            self._restore_buffers()
            _bundle.set_rng_state(rng_after)
        if (
            self.reports is not None
            and self._bundles < self.max_bundles
            and (d.ranks is None or _dist.rank() == d.ranks[0])
        ):
            try:
                _bundle.write_bundle(
                    d,
                    model=self.module,
                    optimizer=self.optimizer,
                    batch=batch,
                    rng=rng_before,
                    reports=self.reports,
                )
                self._bundles += 1
            except Exception as err:  # a full disk must not stop training
                self.ledger.warn_once(
                    "bundle",
                    f"nanscope: could not write the repro bundle: {type(err).__name__}: {err}",
                )
        self.ledger.record(d)
        self._act(d, after, unrecoverable)

    def _diagnose(
        self,
        step_fn: Callable[[Any], Any],
        batch: Any,
        index: int,
        rng_before: dict[str, Any],
        seen: dict[str, Any],
    ) -> tuple[Diagnosis, bool]:
        lr = next((float(g["lr"]) for g in self.optimizer.param_groups if "lr" in g), None)
        norms = list(self.history.grad_norm)
        # 1. Was the stored state already bad before this step? (Buffers are pre-step now.)
        if _dist.active():  # each rank checks its own shards; all ranks agree on replaying or not
            state = _dist.local_state(self.module, step=index)
            if _dist.any_rank(state is not None, step=index):
                agreed = _dist.agree(
                    state,
                    seen.get("ranks_bad"),
                    step=index,
                    why="its own shard of the state is non-finite",
                )
                if agreed is not None:
                    agreed.step = index
                    return agreed, True
            state = None
        else:
            state = check_model_state(self.module, step=index)
        if state is not None:
            with_grad = {n for n, p in self.module.named_parameters() if p.grad is not None}
            written = [n for n in state.details.get("tensors", []) if n in with_grad]
            if self._applied_last and state.category is Category.NONFINITE_PARAMETERS and written:
                # These weights take part in the loss, and the previous step's loss and gradients
                # were finite, so they were finite then: the previous update wrote them.
                state = rules.written_by_update(
                    state,
                    step=index,
                    grad_norms=norms,
                    lr=lr,
                    optimizer=check_optimizer_state(
                        self.optimizer, step=index - 1, model=self.module
                    ),
                )
            return state, True
        # 2. The batch itself, then 3. the replay (every rank replays under DDP, so that
        # collectives inside the model's forward stay matched).
        ddp = _dist.active()
        try:
            data = check_batch(*split_batch(batch), step=index)
        except Exception as err:
            if not ddp:
                raise
            data = None  # under DDP: say so, but reach the collectives below
            self.ledger.warn_once(
                "check_batch",
                f"nanscope: checking the batch failed on rank {_dist.rank()} "
                f"({type(err).__name__}: {err})",
            )
        traced: Diagnosis | None = None
        # The batch check splits a batch by position and key names; which tensor is a target is
        # decided by what consumed it (a loss taking it as its target), which only the traced
        # replay sees: replay whenever the batch check found a non-finite input or target.
        if data is None or ddp or data.category in _BATCH_CATEGORIES:
            # Under "warn" the step's own gradients are applied afterwards: keep them (the replay
            # makes its own, and under DDP those are local, not all-reduced).
            kept = (
                {p: p.grad.detach().clone() for p in self._params if p.grad is not None}
                if self.policy is Policy.WARN
                else None
            )
            self.optimizer.zero_grad(set_to_none=True)
            _bundle.set_rng_state(rng_before)
            replayed: list[Any] = []
            try:
                with _dist.no_sync(self.model):
                    traced = _replay(
                        lambda: replayed.append(step_fn(batch)) or replayed[-1],
                        _dist.traced_root(self.module),
                        index,
                    )
            except Exception as err:
                if not ddp:
                    raise
                self.ledger.warn_once(
                    "replay",
                    f"nanscope: the replay failed on rank {_dist.rank()} "
                    f"({type(err).__name__}: {err}); the other ranks' findings are used",
                )
            finally:
                if kept is not None:
                    for p in self._params:
                        p.grad = kept.get(p)
        local = data or traced
        if (
            data is not None
            and traced is not None
            and data.category in _BATCH_CATEGORIES
            and traced.category in _BATCH_CATEGORIES
            and traced.category is not data.category
        ):  # the replay saw what consumed the tensor: that decides input or target
            role = "a target" if traced.category is Category.INVALID_TARGET else "an input"
            traced.evidence.append(
                f"the batch check, by position, took it for {data.category.value}; the step "
                f"itself shows it was consumed as {role}"
            )
            local = traced
        if local is None and (data is None or ddp):
            local = self._statistics_written(index)
        if local is not None:
            local = rules.with_history(local, norms, lr=lr)
        if _dist.active():
            local = _dist.agree(local, seen.get("ranks_bad"), step=index)
        if local is None:
            local = self._not_found(index, seen)
            if _dist.active():  # every rank stayed finite in the replay: name where the step failed
                local.ranks = _dist.ranks_seen(seen.get("ranks_bad"))
                loss_r = replayed[-1] if replayed else None
                loss_r = (
                    loss_r.get("loss")
                    if isinstance(loss_r, dict)
                    else loss_r[0]
                    if isinstance(loss_r, (tuple, list)) and loss_r
                    else loss_r
                )
                if isinstance(loss_r, torch.Tensor) and loss_r.numel() == 1:
                    local.evidence.append(
                        f"replay on rank {_dist.rank()}: loss {fmt(float(_dist.local(loss_r.detach())))}, finite"
                    )
                local.evidence.append(_dist.seen_text(local.ranks))
                local = _dist.common(local, local.ranks, step=index)
        local.step = index
        return local, local.phase in STATE_PHASES

    def _statistics_written(self, index: int) -> Diagnosis | None:
        """After a replay that stayed finite: did this step's forward write non-finite (or
        extreme) normalization statistics? The loss and gradients can stay finite then (a
        batch variance that overflows normalizes to 0), and eval mode is what breaks. The
        stored state was checked finite before the replay, so the replay's forward wrote them."""
        state = check_model_state(self.module, step=index)
        if state is None or state.category is not Category.CORRUPT_NORM_STATISTICS:
            return None
        state.phase = Phase.FORWARD
        state.evidence.insert(
            0,
            "written by this step's own forward (they were fine before it); its loss and "
            "gradients stayed finite, so training goes on while eval mode and inference break",
        )
        return state

    def _not_found(
        self, index: int, seen: dict[str, Any], error: BaseException | None = None
    ) -> Diagnosis:
        """The step was non-finite, and the replay either failed (``error``) or stayed finite."""
        loss, gnorm = seen.get("loss"), seen.get("grad_norm")
        what = "loss" if loss is not None and not math.isfinite(loss) else "gradient"
        evidence = [f"loss {fmt(loss)}, gradient norm {fmt(gnorm)}"]
        if error is not None:
            d = rules.not_localized(what, error, framework="torch", step=index, evidence=evidence)
        else:
            d = rules.not_reproduced(
                what,
                framework="torch",
                step=index,
                evidence=evidence,
                phase=Phase.LOSS if what == "loss" else Phase.BACKWARD,
                compiled=_compiled(self.model, self._step_fn),
            )
        return rules.with_history(d, list(self.history.grad_norm))

    def _act(
        self,
        d: Diagnosis,
        after: list[torch.Tensor],
        unrecoverable: bool,
        *,
        scaler_done: bool = False,
    ) -> None:
        self._applied_last = False
        if self._scaling() and not scaler_done and self.policy is not Policy.WARN:
            self.scaler.update()  # close the scaler's step (unscale_ ran); it lowers the scale, as on any Inf
        policy = self.ledger.act(d, unrecoverable=unrecoverable)
        self._notify(d, policy)
        if policy is Policy.RAISE:
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(d)
        if policy is Policy.WARN:
            buffers = [getattr(m, n) for m, n in self._norm_buffers]
            if buffers and len(after) == len(
                buffers
            ):  # the step's own BatchNorm update goes through too
                with torch.no_grad():
                    torch._foreach_copy_(buffers, after)
            self.ledger.say(d, self.ledger.outcome_text(policy))
            if not scaler_done:
                self._apply()  # the gradients of the step (or of its identical replay)
            self._applied_last = True
            return
        self.optimizer.zero_grad(set_to_none=True)  # no NaN gradient leaks into the next step
        suffix = " (guard.should_stop is True)" if policy is Policy.STOP else ""  # the loop's cue
        self.ledger.say(d, self.ledger.outcome_text(policy) + suffix)

    # -- library integrations: wrapped optimizers, on_failure, sinks ---------------------------
    def _accept_wrapped(self, model: Any, optimizer: Any) -> None:
        """Accept ``accelerator.prepare``'d and ``fabric.setup``'d optimizers (and Fabric's module).

        Both wrap a torch optimizer as ``.optimizer``, and their ``step()`` runs their own loss
        scaler (``scaler.step`` + ``scaler.update``). The guard then checks and unscales the inner
        optimizer, takes the wrapper's scaler, and lets the wrapper step (``_apply``)."""
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
            self._host_optimizer, self.optimizer = optimizer, inner
            if self.scaler is None:
                strategy = getattr(
                    optimizer, "_strategy", None
                )  # Fabric: the precision plugin's scaler
                self.scaler = getattr(optimizer, "scaler", None) or getattr(
                    getattr(strategy, "precision", None), "scaler", None
                )
        forward = getattr(model, "_forward_module", None)  # Fabric's _FabricModule
        if isinstance(forward, torch.nn.Module) and isinstance(
            getattr(model, "_original_module", None), torch.nn.Module
        ):
            self.model = forward
            self.module = _dist.unwrap(forward)
            self._norm_buffers = [
                (m, n)
                for m in self.module.modules()
                if is_norm_layer(m)
                for n, b in m.named_buffers(recurse=False)
                if b is not None
            ]

    @property
    def step_was_skipped(self) -> bool:
        """The last update was not applied: vetoed by the guard, or skipped by the wrapped
        optimizer's own loss scaler (accelerate's ``optimizer.step_was_skipped``)."""
        host = getattr(self._host_optimizer, "step_was_skipped", False)
        return not self._applied_last or bool(host)

    def _notify(self, d: Diagnosis, action: Policy) -> None:
        """Tell ``on_failure`` and the trackers (``sinks``) about a failure, with what is done."""
        if self.on_failure is not None:
            self.on_failure(d)  # the user's callable: its errors are the user's
        if self.sinks is None:
            return
        try:
            from nanscope import sinks as _sinks

            _sinks.send(
                self.sinks,
                d,
                action=str(action),
                nonfinite_steps=sum(self.counts.values()),
                skipped_steps=self.skipped,
                step=d.step,
                rank=_dist.rank(),
            )
        except Exception as err:  # a tracker that fails must not stop training
            self.ledger.warn_once(
                "sinks",
                f"nanscope: could not send the diagnosis to the trackers: "
                f"{type(err).__name__}: {err}",
            )

    def _internal(self, where: str, err: BaseException) -> None:
        self.ledger.internal(where, err)
