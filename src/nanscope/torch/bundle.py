"""Repro bundles: everything needed to reproduce one non-finite training step offline.

A bundle is one folder under ``nanscope-reports/`` (configurable)::

    step000017-op_domain/
        diagnosis.json   the contract's JSON, plus a "bundle" section: what the bundle holds,
                         the size and SHA-256 of state.pt
        state.pt         torch.save of plain containers of tensors: the model's state_dict and
                         the optimizer's from before the step, the batch, the RNG states
        samples.npz      the offending rows of each batch tensor as numpy (a preview for
                         `nanscope report`, readable without torch; best effort)

Design constraints:

* Safe to open: ``state.pt`` holds tensors, numbers, strings and containers only, so it loads
  with ``torch.load(weights_only=True)``; nanscope never unpickles arbitrary objects. Batch
  elements that are not tensors / numbers / strings are left out (the manifest says which).
* Atomic: the folder is written under a temporary name and renamed into place, so a crash or
  a full disk never leaves a half-written bundle that looks complete.
* Reading a bundle's diagnosis and manifest needs no framework (``nanscope.core.bundle``,
  used by ``nanscope show``); only ``load_state`` / ``replay`` load the tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nanscope.core.bundle import BUNDLE_FORMAT, DIAGNOSIS_FILE, read_bundle, sha256
from nanscope.core.diagnosis import Diagnosis
from nanscope.core.errors import BadInputError
from nanscope.core.limits import dtype_name
from nanscope.torch._util import named_tensors

__all__ = ["write_bundle", "read_bundle", "load_state", "replay", "rng_state", "set_rng_state"]

STATE_FILE = "state.pt"
SAMPLES_FILE = "samples.npz"  # the offending rows as numpy, for `nanscope report` (no torch needed)


# -- RNG --------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The CPU (and, if CUDA is already initialized, every CUDA device's) RNG state."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# -- writing ----------------------------------------------------------------------------------


def _safe(obj: Any, path: str, dropped: list[str]) -> Any:
    """A copy of ``obj`` that ``torch.load(weights_only=True)`` accepts."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return {
            k: _safe(v, f"{path}[{k!r}]", dropped)
            for k, v in obj.items()
            if isinstance(k, (str, int))
        }
    if isinstance(obj, (list, tuple)):
        items = [_safe(v, f"{path}[{i}]", dropped) for i, v in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    dropped.append(f"{path} ({type(obj).__name__})")
    return None


def _describe(batch: Any) -> list[str]:
    return [
        f"{name}: {dtype_name(t.dtype)}[{', '.join(map(str, t.shape))}]"
        for name, t in named_tensors(batch, "batch")
    ]


def write_bundle(
    diagnosis: Diagnosis,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    batch: Any,
    rng: dict[str, Any],
    reports: str | os.PathLike = "nanscope-reports",
    name: str | None = None,
) -> Path:
    """Write a repro bundle for ``diagnosis`` and return its folder; sets ``diagnosis.bundle``.

    ``model`` and ``optimizer`` must hold their state from *before* the failed step (the Guard
    restores BatchNorm buffers and never applies the failed update); ``rng`` is ``rng_state()``
    taken before the step.

    Example:
        >>> import tempfile
        >>> from nanscope.core.enums import Category
        >>> net = torch.nn.Linear(2, 1)
        >>> d = Diagnosis(Category.NONFINITE_INPUT, "NaN in the batch", step=3, framework="torch")
        >>> folder = write_bundle(d, model=net, optimizer=None, batch=(torch.ones(1, 2),),
        ...                       rng=rng_state(), reports=tempfile.mkdtemp())
        >>> sorted(p.name for p in folder.iterdir()), d.bundle == str(folder)
        (['diagnosis.json', 'samples.npz', 'state.pt'], True)
    """
    root = Path(reports)
    root.mkdir(parents=True, exist_ok=True)
    if not os.access(root, os.W_OK):
        raise BadInputError(f"cannot write a repro bundle in {str(root)!r}: permission denied")
    step = f"step{diagnosis.step:06d}-" if diagnosis.step is not None else ""
    base = name or f"{step}{diagnosis.category}"
    final = root / base
    n = 1
    while final.exists():
        n += 1
        final = root / f"{base}-{n}"
    tmp = root / f".{final.name}.part-{os.getpid()}"
    dropped: list[str] = []
    state = {
        "format": BUNDLE_FORMAT,
        "model": {k: v.detach() for k, v in model.state_dict().items()},
        "optimizer": _safe(optimizer.state_dict(), "optimizer", dropped)
        if optimizer is not None
        else None,
        "batch": _safe(batch, "batch", dropped),
        "rng": rng,
        "step": diagnosis.step,
    }
    try:
        tmp.mkdir()
        torch.save(state, tmp / STATE_FILE)
        diagnosis.bundle = str(final)
        doc = diagnosis.to_dict()
        doc["bundle"] = {
            "format": BUNDLE_FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch": torch.__version__,
            "state_file": STATE_FILE,
            "state_bytes": (tmp / STATE_FILE).stat().st_size,
            "state_sha256": sha256(tmp / STATE_FILE),
            "model_tensors": len(state["model"]),
            "model_parameters": int(sum(p.numel() for p in model.parameters())),
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            "optimizer_state_tensors": sum(
                isinstance(v, torch.Tensor)
                for s in (optimizer.state.values() if optimizer else [])
                for v in s.values()
            ),
            "batch": _describe(batch),
            "left_out": dropped,
            "rng": sorted(rng),
        }
        if _write_samples(tmp / SAMPLES_FILE, batch, diagnosis.samples):
            doc["bundle"]["samples_file"] = SAMPLES_FILE
        (tmp / DIAGNOSIS_FILE).write_text(
            json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8"
        )
        os.replace(tmp, final)
    except BaseException:
        diagnosis.bundle = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_samples(
    path: Path, batch: Any, samples: list[int], limit: int = 8, max_values: int = 1 << 20
) -> bool:
    """A small framework-free preview: the offending rows of each batch tensor (best effort)."""
    try:
        import numpy as np

        rows = list(samples[:limit]) or [0]
        arrays = {}
        for name, t in named_tensors(batch, "batch"):
            if t.dim() == 0 or t.shape[0] <= max(rows) or t.is_complex():
                continue
            part = t.detach()[rows].cpu()
            if part.numel() <= max_values:
                arrays[name] = (part.float() if part.is_floating_point() else part).numpy()
        if not arrays:
            return False
        np.savez_compressed(path, samples=np.array(rows), **arrays)
        return True
    except Exception:  # the preview only feeds the HTML report: never fail the bundle for it
        return False


# -- reading ----------------------------------------------------------------------------------


def load_state(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """The bundle's tensors (``model``, ``optimizer``, ``batch``, ``rng``, ``step``), loaded
    with ``torch.load(weights_only=True)`` after checking size and hash."""
    info = read_bundle(path)
    try:
        return torch.load(info.state_path, map_location=map_location, weights_only=True)
    except Exception as err:  # a foreign or damaged pickle: refuse, never execute it
        raise BadInputError(
            f"cannot load repro bundle {str(info.folder)!r}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from None


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_to(v, device) for v in obj]
        return tuple(items) if isinstance(obj, tuple) else items
    return obj


def replay(
    bundle: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step_fn: Callable[[Any], Any],
) -> Diagnosis | None:
    """Reproduce a bundled failure offline and diagnose it again.

    Loads the model and optimizer state from before the failed step, the batch and the RNG
    state, then runs ``step_fn(batch)`` (forward + loss + backward, as given to
    ``Guard.step``) once under full per-op instrumentation. The step runs with the same
    numbers, so it fails the same way, bit for bit. No optimizer step is taken; afterwards the
    model holds the bundled weights and the gradients of the replayed step.

    Example:
        >>> from nanscope.torch import Guard, replay
        >>> net = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> def train_step(batch):
        ...     x, y = batch
        ...     loss = torch.log(net(x) - y).mean()   # log of a negative number: NaN
        ...     loss.backward()
        ...     return loss
        >>> import tempfile, warnings
        >>> guard = Guard(net, opt, policy="skip", reports=tempfile.mkdtemp())
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     _ = guard.step(train_step, (torch.ones(4, 2), torch.full((4, 1), 1e3)))
        >>> replay(guard.last.bundle, net, opt, train_step).category
        <Category.OP_DOMAIN: 'op_domain'>
    """
    from nanscope.torch.trace import trace_step

    state = load_state(bundle)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    try:
        model.load_state_dict(state["model"])
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise BadInputError(
            f"the bundle does not fit this model/optimizer: {str(err).splitlines()[0]}"
        ) from None
    batch = _to(state["batch"], device)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)
    set_rng_state(state["rng"])
    return trace_step(lambda: step_fn(batch), model=model, step=state.get("step"))
