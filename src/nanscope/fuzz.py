"""``fuzz_loss``: try a loss function on the edge cases that make losses NaN, before training.

Given one real example batch, nanscope builds inputs shaped and typed like it, each pushing
one thing to its edge: probabilities of exactly 0 and 1, logits of ±1e4, empty masks, targets
that are all ``ignore_index``, identical pairs, float16 inputs. Each case runs the loss and
its gradient; every case that gives NaN/Inf becomes a finding with the op, the line and the
fix (from the framework's tracer and ``nanscope.core.rules``).

Design constraints:
    - Importing this module imports no framework. The cases are built with numpy from the
      example (functional core); the backend that runs them (``nanscope.torch.fuzz`` /
      ``nanscope.keras.fuzz``) is picked from the example's tensor types or, for numpy
      examples, from the frameworks the loss's own module imported.
    - The user's function runs on copies; its example is never modified.
    - A case the function rejects (an exception, e.g. a label out of range) is recorded in
      the statistics, not reported as a NaN.

Example:
    >>> import numpy as np
    >>> cases = edge_cases([np.array([[0.2, 0.8]], np.float32), np.array([[0.0, 1.0]], np.float32)], {})
    >>> [c.name for c in cases][:3]
    ['example', 'probabilities_exactly_0_and_1', 'probabilities_all_zero']
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanscope.core.diagnosis import AuditReport, Diagnosis, Finding
from nanscope.core.errors import BadInputError

__all__ = ["Case", "edge_cases", "fuzz_loss"]

IGNORE_CANDIDATES = (-100, 255)


@dataclass
class CaseResult:
    """What a framework runner saw for one edge case."""

    outcome: str  # "finite", "non-finite value", "non-finite gradient", "error: ..."
    diagnosis: Diagnosis | None = None


@dataclass
class Case:
    """One edge-case input: positional and keyword arrays, which of them get a gradient."""

    name: str
    description: str
    args: list[Any]
    kwargs: dict[str, Any]
    grad: set[str] = field(default_factory=set)  # "0", "1", ... or keyword names
    float16: bool = False


def _role(a: Any) -> str:
    if not isinstance(a, np.ndarray) or a.size == 0:
        return "other"
    if a.dtype.kind in "iu":
        return "labels"
    if a.dtype.kind == "b":
        return "mask"
    if a.dtype.kind != "f":
        return "other"
    finite = a[np.isfinite(a)]
    if finite.size and np.isin(finite, (0.0, 1.0)).all():
        return "mask"
    if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
        return "probabilities"
    return "logits"


def _slots(args: list[Any], kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(str(i), a) for i, a in enumerate(args)] + list(kwargs.items())


def _build(args, kwargs, replace: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    new_args = [replace.get(str(i), a) for i, a in enumerate(args)]
    new_kwargs = {k: replace.get(k, v) for k, v in kwargs.items()}
    return new_args, new_kwargs


def _alternating(shape: tuple[int, ...], lo: float, hi: float, dtype) -> np.ndarray:
    n = int(np.prod(shape)) if shape else 1
    return np.where(np.arange(n) % 2 == 0, hi, lo).astype(dtype).reshape(shape)


def edge_cases(
    args: list[Any], kwargs: dict[str, Any], *, ignore_index: int | None = None
) -> list[Case]:
    """The edge cases for a loss called as ``fn(*args, **kwargs)`` (numpy arrays)."""
    slots = _slots(args, kwargs)
    roles = {k: _role(a) for k, a in slots}
    values = dict(slots)
    preds = [k for k, r in roles.items() if r in ("probabilities", "logits")]
    masks = [k for k, r in roles.items() if r == "mask"]
    labels = [k for k, r in roles.items() if r == "labels"]
    # An integer array of only 0s and 1s shaped like a prediction is a binary mask as much as
    # two-class labels (segmentation masks are stored as integers): it gets the mask cases too.
    masks += [
        k
        for k in labels
        if values[k].ndim >= 2
        and np.isin(values[k], (0, 1)).all()
        and any(values[p].shape == values[k].shape for p in preds)
    ]
    grad = set(preds)

    def partner_mask(k: str) -> np.ndarray | None:
        for m in [m for m in masks if roles[m] == "mask"]:
            if values[m].shape == values[k].shape:
                return values[m].astype(np.float64)
        return None

    cases = [Case("example", "the example batch itself", list(args), dict(kwargs), grad)]

    def add(
        name: str, description: str, replace: dict[str, Any], g: set[str] | None = None
    ) -> None:
        a, kw = _build(args, kwargs, replace)
        cases.append(Case(name, description, a, kw, grad if g is None else g))

    probs = [k for k in preds if roles[k] == "probabilities"]
    logits = [k for k in preds if roles[k] == "logits"]
    if probs:
        rep = {}
        for k in probs:
            t = partner_mask(k)
            v = values[k]
            rep[k] = (
                (1.0 - t).astype(v.dtype)
                if t is not None
                else _alternating(v.shape, 0.0, 1.0, v.dtype)
            )
        add(
            "probabilities_exactly_0_and_1",
            "predicted probabilities of exactly 0 and 1 (confidently wrong)",
            rep,
        )
        add(
            "probabilities_all_zero",
            "every predicted probability exactly 0",
            {k: np.zeros_like(values[k]) for k in probs},
        )
    if logits:
        rep = {}
        for k in logits:
            t = partner_mask(k)
            v = values[k]
            rep[k] = (
                np.where(t > 0.5, -1e4, 1e4).astype(v.dtype)
                if t is not None
                else _alternating(v.shape, -1e4, 1e4, v.dtype)
            )
        add("logits_extreme", "logits of ±1e4 (confidently wrong)", rep)
        add(
            "logits_large_positive",
            "every logit +1e4",
            {k: np.full_like(values[k], 1e4) for k in logits},
        )
    if masks:
        add(
            "empty_mask",
            "every mask / binary target empty (all 0)",
            {k: np.zeros_like(values[k]) for k in masks},
        )
        empty_pred = {k: np.zeros_like(values[k]) for k in masks}
        empty_pred.update({k: np.zeros_like(values[k]) for k in probs})
        empty_pred.update({k: np.full_like(values[k], -1e4) for k in logits})
        add(
            "empty_mask_and_prediction",
            "an empty mask predicted empty (all 0 in target and prediction)",
            empty_pred,
        )
        # From the example itself: its first sample's mask emptied and predicted empty with
        # saturated logits, every other sample as it was (a per-sample Dice divides 0 by 0 there).
        rows = [k for k in masks + probs + logits if values[k].ndim >= 1 and values[k].shape[0] > 1]
        if rows and all(values[k].shape[0] == values[rows[0]].shape[0] for k in rows):
            one = {}
            for k in rows:
                v = values[k].copy()
                v[0] = -1e4 if k in logits else 0
                one[k] = v
            add(
                "one_sample_empty_mask_saturated",
                "the example with its first sample's mask empty and predicted empty (logits -1e4)",
                one,
            )
    if labels:
        example_ignores = [
            int(v) for k in labels for v in np.unique(values[k]) if v < 0 or v == 255
        ]
        candidates = (
            [ignore_index]
            if ignore_index is not None
            else (example_ignores[:1] or list(IGNORE_CANDIDATES))
        )
        for ig in candidates:
            add(
                f"all_targets_ignored_{ig}".replace("-", "minus"),
                f"every target equals ignore_index {ig}",
                {k: np.full_like(values[k], ig) for k in labels},
            )
    floats = [
        k
        for k, a in slots
        if isinstance(a, np.ndarray) and a.dtype.kind == "f" and roles[k] != "mask"
    ]
    for i, a in enumerate(floats):
        for b in floats[i + 1 :]:
            if values[a].shape == values[b].shape:
                add(
                    "identical_pair",
                    f"identical inputs {_label(a)} and {_label(b)} (distance 0)",
                    {b: values[a].copy()},
                    grad | {a, b},
                )
                break
    if any(isinstance(a, np.ndarray) and a.dtype.kind == "f" for _, a in slots):
        a, kw = _build(args, kwargs, {})
        cases.append(Case("float16", "the example batch in float16", a, kw, grad, float16=True))
        if probs or logits:
            base = cases[1]
            cases.append(
                Case(
                    "float16_extreme",
                    f"float16 and {base.description}",
                    list(base.args),
                    dict(base.kwargs),
                    grad,
                    float16=True,
                )
            )
    return cases


def _label(slot: str) -> str:
    return f"argument {int(slot) + 1}" if slot.isdigit() else f"{slot}="


def _backend_for(fn: Callable, args: list[Any], kwargs: dict[str, Any]) -> str:
    torch, tf = sys.modules.get("torch"), sys.modules.get("tensorflow")
    for a in list(args) + list(kwargs.values()):
        if torch is not None and isinstance(a, torch.Tensor):
            return "torch"
        if tf is not None and tf.is_tensor(a):
            return "keras"
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    names = (
        {getattr(v, "__name__", "").split(".")[0] for v in vars(module).values()}
        if module
        else set()
    )
    names |= {
        getattr(v, "__module__", "").split(".")[0]
        for v in getattr(fn, "__globals__", {}).values()
        if inspect.ismodule(v) or callable(v)
    }
    if "torch" in names and torch is not None:
        return "torch"
    if names & {"tensorflow", "keras"} and tf is not None:
        return "keras"
    if torch is not None:
        return "torch"
    if tf is not None:
        return "keras"
    raise BadInputError(
        "fuzz_loss: the loss uses neither torch nor tensorflow (import one, or pass tensors as the example)"
    )


def _to_numpy(a: Any) -> Any:
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "detach"):  # torch
        t = a.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    if hasattr(a, "numpy") and callable(a.numpy):  # tensorflow
        return np.asarray(a.numpy())
    return a


def fuzz_loss(
    fn: Callable[..., Any],
    example: Any = None,
    *,
    ignore_index: int | None = None,
    cases: list[str] | None = None,
) -> AuditReport:
    """Run ``fn`` on edge cases shaped like ``example``; report each case that gives NaN/Inf.

    Args:
        fn: the loss, called as ``fn(*example)`` (tuple / list) or ``fn(**example)`` (dict),
            returning a tensor (reduced or not).
        example: one real batch of the loss's inputs (torch / TensorFlow tensors or numpy
            arrays). Float arrays in [0, 1] are treated as probabilities, arrays of 0/1 as
            masks or binary targets, integer arrays as class labels, other floats as logits.
        ignore_index: the label your loss ignores (default: try -100 and 255).
        cases: only run these case names (default: all).

    Returns:
        An ``AuditReport``: one finding per failing case (``where_found['case']``), with the
        op, line, category and fixes; ``stats['cases']`` has every case's outcome.

    Example:
        >>> import torch
        >>> def my_bce(p, y):
        ...     return -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
        >>> report = fuzz_loss(my_bce, (torch.tensor([0.3, 0.9]), torch.tensor([0.0, 1.0])))
        >>> report.findings[0].category, report.findings[0].op_kind
        (<Category.OP_DOMAIN: 'op_domain'>, <OpKind.LOG: 'log'>)
    """
    if example is None:
        example = default_example(fn)
    if isinstance(example, dict):
        args, kwargs = [], dict(example)
    elif isinstance(example, list | tuple):
        args, kwargs = list(example), {}
    else:
        args, kwargs = [example], {}
    framework = _backend_for(fn, args, kwargs)
    np_args = [_to_numpy(a) for a in args]
    np_kwargs = {k: _to_numpy(v) for k, v in kwargs.items()}
    all_cases = edge_cases(np_args, np_kwargs, ignore_index=ignore_index)
    if cases is not None:
        all_cases = [c for c in all_cases if c.name in cases]
    backend = importlib.import_module(f"nanscope.{framework}.fuzz")
    findings: list[Finding] = []
    outcome: dict[str, str] = {}
    for case in all_cases:
        result = backend.run_case(fn, case)
        outcome[case.name] = result.outcome
        if result.diagnosis is not None:
            d = result.diagnosis
            f = Finding.of(
                d,
                {"case": case.name, "function": _qualname(fn)},
                summary=f"{case.description}: {d.summary}",
            )
            f.evidence = [
                f"input: {case.description}",
                f"non-finite {result.outcome.removeprefix('non-finite ')}",
            ] + list(f.evidence)
            findings.append(f)
    if all_cases and all(o.startswith("error") for o in outcome.values()):
        first = next(iter(outcome.values())).removeprefix("error: ")
        raise BadInputError(
            f"fuzz-loss: {_qualname(fn)} failed on all {len(outcome)} cases, the example included "
            f"({first}): check --example matches its arguments"
        )
    roles = {
        (_label(k).rstrip("=") if k.isdigit() else k): _role(a)
        for k, a in _slots(np_args, np_kwargs)
    }
    return AuditReport(
        findings,
        {"function": _qualname(fn), "inputs": roles, "cases": outcome},
        framework=framework,
        title=f"fuzz-loss {_qualname(fn)}",
    )


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', getattr(fn, '__name__', '?'))}"


_LABEL_WORDS = ("label", "class", "target_idx", "targets_idx")
_MASK_WORDS = ("mask", "target", "y_true", "gt", "truth", "label", "y")
_LOGIT_WORDS = ("logit", "score")


def default_example(fn: Callable) -> list[np.ndarray]:
    """A small example batch guessed from the parameter names, when none is given.

    ``logits`` -> float (4, 5); ``labels``/``targets`` next to logits -> int classes (4,);
    ``mask``/``target``/``y_true`` -> a 0/1 float (4, 16); anything else -> probabilities (4, 16).
    """
    try:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError) as err:
        raise BadInputError(
            f"cannot read the parameters of {_qualname(fn)}: give an example batch (--example FILE.npz)"
        ) from err
    if not params:
        raise BadInputError(
            f"{_qualname(fn)} takes no positional inputs: give an example batch (--example FILE.npz)"
        )
    rng = np.random.default_rng(0)
    has_logits = any(w in p.name.lower() for p in params for w in _LOGIT_WORDS)
    out = []
    for p in params:
        n = p.name.lower()
        if any(w in n for w in _LOGIT_WORDS):
            out.append(rng.normal(0, 2, (4, 5)).astype(np.float32))
        elif has_logits and any(w in n for w in _LABEL_WORDS + ("target", "y_true", "y")):
            out.append(rng.integers(0, 5, (4,)).astype(np.int64))
        elif any(w == n or n.startswith(w) or n.endswith(w) for w in _MASK_WORDS):
            out.append((rng.random((4, 16)) > 0.5).astype(np.float32))
        else:
            out.append(rng.uniform(0.05, 0.95, (4, 16)).astype(np.float32))
    return out
