"""Send what nanscope found to the trackers the user already watches.

    guard = nanscope.torch.Guard(model, optimizer, sinks="auto")
    trainer = Trainer(callbacks=[nanscope.lightning.NanGuard()])      # sinks="auto" by default

On each diagnosed failure, on rank 0 only, each sink gets the diagnosis, what was done about it
(``skip`` / ``stop`` / ``raise`` / ``warn``) and two counters, ``nanscope/nonfinite_steps`` and
``nanscope/skipped_steps``:

* **TensorBoard** (a ``torch.utils.tensorboard.SummaryWriter``, a tensorboardX one, or a
  ``tf.summary`` writer): the two counters as scalars, the diagnosis as text.
* **Weights & Biases** (the active ``wandb.run``): the counters, ``run.alert`` on skip / stop /
  raise, the repro bundle as an artifact (type ``nanscope-bundle``).
* **MLflow** (the active run): the counters as metrics, ``nanscope.*`` tags, the diagnosis JSON
  as an artifact under ``nanscope/``.

``sinks="auto"`` is resolved at each failure (a run started after the guard counts): W&B when
``wandb.run`` is set, MLflow when ``mlflow.active_run()`` is, plus the TensorBoard writers the host
hands over (Lightning's ``TensorBoardLogger``, the HF Trainer's ``TensorBoardCallback``). A list
may mix sink objects, writers, ``"wandb"``, ``"mlflow"``, and any callable(event).

Design constraints: this module imports no framework and no tracker at import time. Each
tracker is imported only inside the function that uses it, and only when the user's program
has imported it already (``sys.modules``): a run can be active only then, so ``"auto"`` never
pulls in a package the program did not use, and none of them is a dependency of nanscope. A
tracker that fails is the caller's to report once (the guard warns and training goes on).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanscope.core.diagnosis import Diagnosis

__all__ = ["Auto", "FailureEvent", "MlflowSink", "TensorBoardSink", "WandbSink", "resolve", "send"]

_ALERT_ACTIONS = ("skip", "stop", "raise")


@dataclass
class FailureEvent:
    """One diagnosed failure, as the sinks see it."""

    diagnosis: Diagnosis
    action: str  # "skip" | "stop" | "raise" | "warn"
    nonfinite_steps: int
    skipped_steps: int
    step: int | None = (
        None  # the host's step (Lightning's global_step, the Trainer's) or the guard's
    )

    @property
    def scalars(self) -> dict[str, float]:
        return {
            "nanscope/nonfinite_steps": float(self.nonfinite_steps),
            "nanscope/skipped_steps": float(self.skipped_steps),
        }

    @property
    def title(self) -> str:
        d = self.diagnosis
        return f"nanscope: {d.category} at step {d.step} ({self.action})"

    def text(self) -> str:
        return f"{self.diagnosis}\n\naction: {self.action}"


class TensorBoardSink:
    """Scalars + the diagnosis as text, into a TensorBoard writer (torch's, tensorboardX, tf.summary)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def __call__(self, event: FailureEvent) -> None:
        step = event.step if event.step is not None else (event.diagnosis.step or 0)
        w = self.writer
        if hasattr(w, "add_scalar") and hasattr(
            w, "add_text"
        ):  # torch.utils.tensorboard, tensorboardX
            for name, value in event.scalars.items():
                w.add_scalar(name, value, step)
            w.add_text("nanscope/diagnosis", _markdown(event), step)
            w.flush()
            return
        if type(w).__module__.startswith("tensorflow") and "tensorflow" in sys.modules:
            import tensorflow as tf  # the writer exists, so tensorflow is imported already

            with w.as_default():
                for name, value in event.scalars.items():
                    tf.summary.scalar(name, value, step=step)
                tf.summary.text("nanscope/diagnosis", _markdown(event), step=step)
            w.flush()
            return
        raise TypeError(
            f"not a TensorBoard writer: {type(w).__name__} (pass a SummaryWriter or a tf.summary writer)"
        )


class WandbSink:
    """The counters, an alert on skip / stop / raise, and the repro bundle as an artifact."""

    def __init__(self, run: Any = None) -> None:
        self.run = run

    def __call__(self, event: FailureEvent) -> None:
        run = self.run if self.run is not None else _wandb_run()
        if run is None:
            return
        import wandb  # in sys.modules: a run exists

        run.log(dict(event.scalars))
        run.summary.update(
            {**event.scalars, "nanscope/last_category": str(event.diagnosis.category)}
        )
        if event.action in _ALERT_ACTIONS:
            level = (
                wandb.AlertLevel.ERROR
                if event.action in ("stop", "raise")
                else wandb.AlertLevel.WARN
            )
            run.alert(title=event.title, text=event.text()[:4000], level=level)
        bundle = event.diagnosis.bundle
        if bundle and Path(bundle).is_dir():
            art = wandb.Artifact(
                _safe_name(Path(bundle).name),
                type="nanscope-bundle",
                metadata=event.diagnosis.fields_dict(),
            )
            art.add_dir(str(bundle))
            run.log_artifact(art)


class MlflowSink:
    """The counters as metrics, ``nanscope.*`` tags, the diagnosis JSON as an artifact."""

    def __call__(self, event: FailureEvent) -> None:
        if "mlflow" not in sys.modules:
            return
        import mlflow

        if mlflow.active_run() is None:
            return
        d = event.diagnosis
        step = event.step if event.step is not None else (d.step or 0)
        mlflow.log_metrics(event.scalars, step=step)
        mlflow.set_tags(
            {
                "nanscope.status": "nonfinite",
                "nanscope.category": str(d.category),
                "nanscope.action": event.action,
                "nanscope.step": str(d.step),
            }
        )
        name = f"step{d.step:06d}-{d.category}.json" if d.step is not None else f"{d.category}.json"
        mlflow.log_dict(d.to_dict(), f"nanscope/{name}")


class Auto:
    """``"auto"`` with TensorBoard writers a host loop knows about (its loggers / callbacks),
    looked up at each failure: ``Auto(lambda: [trainer.logger.experiment])``."""

    def __init__(self, writers: Callable[[], Iterable[Any]] = lambda: ()) -> None:
        self.writers = writers

    def __call__(self, event: FailureEvent) -> None:
        for sink in resolve("auto", writers=list(self.writers())):
            sink(event)


def _wandb_run() -> Any:
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def _mlflow_active() -> bool:
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return False
    try:
        return mlflow.active_run() is not None
    except Exception:
        return False


def _markdown(event: FailureEvent) -> str:
    # TensorBoard renders text as markdown: keep the plain rendering readable as a code block.
    return "    " + event.text().replace("\n", "\n    ")


def _safe_name(name: str) -> str:
    return "nanscope-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def _one(sink: Any) -> Callable[[FailureEvent], Any]:
    if sink == "wandb":
        return WandbSink()
    if sink == "mlflow":
        return MlflowSink()
    if isinstance(sink, (TensorBoardSink, WandbSink, MlflowSink, Auto)):
        return sink
    if hasattr(sink, "add_scalar") or type(sink).__module__.startswith("tensorflow"):
        return TensorBoardSink(sink)
    if callable(sink):
        return sink
    raise TypeError(
        f"not a sink: {sink!r} (use 'auto', 'wandb', 'mlflow', a TensorBoard writer or a callable)"
    )


def resolve(sinks: Any, *, writers: Iterable[Any] = ()) -> list[Callable[[FailureEvent], Any]]:
    """The sinks to use now: ``"auto"`` -> the trackers with an active run, plus ``writers``
    (TensorBoard writers the host hands over); a list -> those; None -> none.

    Example:
        >>> resolve(None), resolve("auto") == []  # no tracker imported in this process
        ([], True)
    """
    if sinks is None:
        return []
    if isinstance(sinks, str) and sinks == "auto":
        found: list[Callable[[FailureEvent], Any]] = [TensorBoardSink(w) for w in writers]
        if _wandb_run() is not None:
            found.append(WandbSink())
        if _mlflow_active():
            found.append(MlflowSink())
        return found
    if isinstance(sinks, (list, tuple)):
        return [_one(s) for s in sinks] + [TensorBoardSink(w) for w in writers]
    return [_one(sinks)] + [TensorBoardSink(w) for w in writers]


def send(
    sinks: Any,
    diagnosis: Diagnosis,
    *,
    action: str,
    nonfinite_steps: int,
    skipped_steps: int,
    step: int | None = None,
    rank: int = 0,
    writers: Iterable[Any] = (),
) -> list[str]:
    """Send one failure to ``sinks`` (see ``resolve``); only rank 0 sends. Returns the names of
    the sinks that took it. A sink's error propagates (the caller warns once and goes on)."""
    if rank != 0:
        return []
    event = FailureEvent(diagnosis, str(action), int(nonfinite_steps), int(skipped_steps), step)
    used: list[str] = []
    for sink in resolve(sinks, writers=writers):
        sink(event)
        used.append(type(sink).__name__)
    return used


def to_json(event: FailureEvent) -> str:
    """The event as JSON (the diagnosis in the contract's shape, plus the action and counters)."""
    return json.dumps(
        {
            "action": event.action,
            **event.scalars,
            "step": event.step,
            "diagnosis": event.diagnosis.to_dict(),
        },
        indent=2,
    )
