"""What really differs per framework, as one small interface the core calls (einops style).

``nanscope.torch`` and ``nanscope.keras`` each implement ``Adapter`` once
(``nanscope.torch._util.TORCH``, ``nanscope.keras._util.KERAS``); the core's batch logic
(``split_batch``, ``named_arrays``, ``check_batch``) is written against it, so both
frameworks split a batch, name its tensors and judge it the same way.

Design constraints: this module imports no framework. ``adapter_for(obj)`` picks an adapter
only among the frameworks already in ``sys.modules``, so asking never imports one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np  # noqa: F401 (the protocol's type)

from nanscope.core import rules
from nanscope.core.diagnosis import Diagnosis, Location
from nanscope.core.enums import Category
from nanscope.core.summary import bad_rows, summarize


class Adapter(Protocol):
    """The handful of things the core needs from a framework."""

    name: str  # "torch" or "keras": Diagnosis.framework
    convention: str  # how a 3-tuple batch reads: "torch" (inputs..., targets) or "keras" (x, y, sample_weight)

    def is_tensor(self, obj: Any) -> bool: ...

    def is_float(self, t: Any) -> bool: ...

    def to_numpy(self, t: Any) -> np.ndarray: ...

    def dtype_name(self, t: Any) -> str: ...

    def all_finite(self, t: Any) -> bool: ...

    def user_location(self) -> Location | None: ...


# Batch keys that hold what the loss compares against (exact names: "attention_mask" is an input).
TARGET_KEYS = frozenset(
    {
        "y",
        "target",
        "targets",
        "label",
        "labels",
        "label_ids",
        "mask",
        "masks",
        "segmentation",
        "start_positions",
        "end_positions",
    }
)


def split_batch(batch: Any, adapter: Adapter) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch, the same way for every framework.

    A dict: the keys in ``TARGET_KEYS`` are the targets (their value when there is one, a
    dict of them when several). A pair: ``(inputs, targets)``. Longer sequences follow the
    framework's convention: torch loaders end with the targets; Keras reads
    ``(x, y, sample_weight)``. Anything else is inputs alone.
    """
    if isinstance(batch, dict):
        targets = {k: v for k, v in batch.items() if k in TARGET_KEYS}
        inputs = {k: v for k, v in batch.items() if k not in TARGET_KEYS}
        if not targets:
            return batch, None
        return inputs, (next(iter(targets.values())) if len(targets) == 1 else targets)
    if isinstance(batch, (tuple, list)) and not adapter.is_tensor(batch):
        if len(batch) == 1:
            return batch[0], None
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) > 2:
            if adapter.convention == "keras":
                return batch[0], batch[1]
            return list(batch[:-1]), batch[-1]
    return batch, None


def named_tensors(obj: Any, prefix: str, adapter: Adapter) -> Iterator[tuple[str, Any]]:
    """``(name, tensor)`` for every tensor in a nested batch: ``inputs``, ``inputs[1]``,
    ``inputs["input_ids"]``."""
    if obj is None:
        return
    if adapter.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from named_tensors(v, f"{prefix}[{k!r}]".replace("'", '"'), adapter)
    elif isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            yield from named_tensors(v, f"{prefix}[{i}]", adapter)


def check_batch(
    inputs: Any,
    targets: Any,
    adapter: Adapter,
    *,
    step: int | None = None,
    names: tuple[str, str] = ("inputs", "targets"),
) -> Diagnosis | None:
    """Non-finite values in a batch: in the inputs ``nonfinite_input``, in the targets
    ``invalid_target``; None when every floating tensor is finite. ``samples`` are the rows."""
    for part, what, category in (
        (inputs, names[0], Category.NONFINITE_INPUT),
        (targets, names[1], Category.INVALID_TARGET),
    ):
        tensors = list(named_tensors(part, what, adapter))
        for name, t in tensors:
            if not adapter.is_float(t) or adapter.all_finite(t):
                continue
            a = adapter.to_numpy(t)
            return rules.nonfinite_input(
                name,
                summarize(a, adapter.dtype_name(t)),
                bad_rows(a),
                framework=adapter.name,
                step=step,
                category=category,
            )
    return None


def adapter_for(obj: Any) -> Adapter | None:
    """The adapter of the framework ``obj`` belongs to, among those already imported."""
    if "torch" in sys.modules:
        from nanscope.torch._util import TORCH

        if TORCH.is_tensor(obj):
            return TORCH
    if "tensorflow" in sys.modules:
        from nanscope.keras._util import KERAS

        if KERAS.is_tensor(obj):
            return KERAS
    return None
