"""``nanscope.keras.diagnose_eval``: "the model trains fine but ``predict`` outputs NaN".

Design constraints:
    * Inference runs eagerly with ``training=False`` batch by batch until one output is
      non-finite; only that batch is traced op by op.
    * The same batch is run with ``training=True`` to compare: finite in training mode and
      non-finite in inference mode points at the BatchNormalization moving statistics, which
      are audited layer by layer (``moving_mean`` / ``moving_variance``: NaN, Inf, negative,
      extreme). The training-mode run changes those statistics, so every variable it touches
      is restored byte for byte.
    * Decisions go through ``nanscope.core.rules`` (``norm_statistics_problems``,
      ``corrupt_norm_statistics``, ``classify_producer``).
    * ``explain_call`` serves ``nanscope run``: after ``model.predict`` / ``evaluate`` /
      ``predict_on_batch`` / ``test_on_batch`` / ``model(x, training=False)`` returned a
      non-finite result, it re-reads the call's batches (arrays, tensors, ``tf.data``,
      ``PyDataset``; a generator cannot be re-read), skips those the result shows were finite,
      and explains the first bad one: its outputs as above, or (evaluate) its loss, traced in
      inference mode. The diagnosis says which call and batch (``in model.predict, batch 1
      (inference)``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from nanscope.core import rules
from nanscope.core.diagnosis import Diagnosis
from nanscope.core.enums import Phase
from nanscope.core.summary import bad_rows, summarize
from nanscope.keras._util import (
    VariableSnapshot,
    batch_norm_layers,
    batch_size_of,
    iter_batches,
    state_variables,
    to_tensors,
    unpack,
)
from nanscope.keras.diagnose_step import _ignore_index, check_batch, check_weights
from nanscope.keras.trace import Tracer, all_finite, diagnosis_from_trace, first_bad_layer, to_numpy

KERAS_NORM_NAMES = ("moving_mean", "moving_variance")


def norm_statistics_audit(model: keras.Model, *, extreme: float = 1e6) -> dict[str, list[str]]:
    """BatchNormalization layers whose moving statistics are bad: ``{layer: [problems]}``.

    Example:
        >>> import keras, numpy as np
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.BatchNormalization(name="bn")])
        >>> _ = model.get_layer("bn").moving_variance.assign(np.array([1.0, np.nan], "float32"))
        >>> norm_statistics_audit(model)
        {'bn': ['moving_variance: 1 NaN of 2']}
    """
    out = {}
    for bn in batch_norm_layers(model):
        mean = summarize(to_numpy(bn.moving_mean.value), bn.moving_mean.dtype)
        var = summarize(to_numpy(bn.moving_variance.value), bn.moving_variance.dtype)
        problems = rules.norm_statistics_problems(
            mean, var, extreme=extreme, names=KERAS_NORM_NAMES
        )
        if problems:
            out[bn.name] = problems
    return out


def diagnose_eval(
    model: keras.Model, dataset: Any, *, max_batches: int | None = None, batch_size: int = 32
) -> Diagnosis | None:
    """Find why inference output is non-finite: the first bad batch, layer and op, and
    whether corrupt BatchNormalization moving statistics explain it.

    Args:
        model: a built Keras model.
        dataset: a ``tf.data.Dataset``, a ``keras.utils.PyDataset``, a list of batches, an
            array or an ``(x, y)`` tuple of arrays (read ``batch_size`` rows at a time).
        max_batches: stop after this many batches.

    Returns:
        The ``Diagnosis`` of the first batch whose output is non-finite, or None.

    Example:
        >>> import keras, numpy as np
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.BatchNormalization(name="bn")])
        >>> _ = model.get_layer("bn").moving_mean.assign(np.array([np.nan, 0.0], "float32"))
        >>> d = diagnose_eval(model, np.ones((4, 2), "float32"))
        >>> d.category, d.module
        (<Category.CORRUPT_NORM_STATISTICS: 'corrupt_norm_statistics'>, 'bn')
    """
    entry = sys._getframe(1)
    for batch in iter_batches(dataset, batch_size=batch_size, max_batches=max_batches):
        x, y, _ = (to_tensors(p) for p in unpack(batch))
        if all_finite(model(x, training=False)):
            continue
        if (d := check_batch(x)) is not None:
            return d
        if (d := check_weights(model)) is not None:
            return d
        return _explain(model, x, entry)
    return None


def _explain(model: keras.Model, x: Any, entry) -> Diagnosis:
    n = batch_size_of(x)
    with Tracer(entry=entry) as tracer:
        out = model(x, training=False)
    eval_samples = _samples(out, n)
    snapshot = VariableSnapshot(state_variables(model))
    try:
        train_finite = all_finite(model(x, training=True))
    finally:
        snapshot.restore()
    tr = tracer.trace
    first = None
    if tr.producers:
        idx = tr.origin_of(out)
        first = tr.producers[idx if idx is not None and idx >= 0 else 0]
    else:  # the NaN came from stored state (a variable read): the first layer whose output is bad
        first = first_bad_layer(tr)
    bad_stats = norm_statistics_audit(model)
    # Order the layers as they run; the first one to produce the NaN leads.
    order = {name: i for i, name in enumerate(dict.fromkeys(r.layer for r in tr.ops if r.layer))}
    if first is not None and first.layer in bad_stats:
        order[first.layer] = -1
    layers = dict(sorted(bad_stats.items(), key=lambda kv: order.get(kv[0], len(order))))
    producer = None if layers and train_finite else diagnosis_from_trace(tr, out, batch_size=n)
    return rules.eval_only(
        layers,
        train_finite=train_finite,
        producer=producer,
        framework="keras",
        samples=eval_samples,
        first_bad=f"{first.op} in layer {first.layer}" if first else None,
        compiled=_compiled(model),
    )


def _compiled(model: keras.Model) -> str | None:
    """Names the compiled predict function when XLA compiled it (eager numerics may differ)."""
    return (
        "the XLA-compiled predict function"
        if getattr(model, "jit_compile", False) is True
        else None
    )


def _samples(out: Any, n: int | None) -> list[int]:
    rows: set[int] = set()
    for t in keras.tree.flatten(out):
        a = to_numpy(t)
        if a is not None and n and a.ndim and a.shape[0] == n:
            rows.update(bad_rows(a))
    return sorted(rows)


# -- nanscope run: explain a predict / evaluate call ---------------------------------------------


def finite_values(obj: Any) -> bool:
    """True when every float in ``obj`` (arrays, tensors, Python floats, nested) is finite."""
    for leaf in tf.nest.flatten(obj):
        if leaf is None or isinstance(leaf, bool | int | str | bytes):
            continue
        if isinstance(leaf, float):
            if not math.isfinite(leaf):
                return False
            continue
        a = to_numpy(leaf) if tf.is_tensor(leaf) else np.asarray(leaf)
        if a is not None and a.dtype.kind in "fc" and not np.isfinite(a).all():
            return False
    return True


def loss_of(result: Any) -> Any:
    """The loss in what ``evaluate`` / ``test_on_batch`` returned (a scalar, a list, a dict)."""
    if isinstance(result, dict):
        return result.get("loss")
    if isinstance(result, list | tuple):
        return result[0] if result else None
    return result


@dataclass
class CallData:
    """The data one inference call read, as it was passed (to re-read its batches)."""

    call: str  # "model.predict", "model(x, training=False)"
    x: Any = None
    y: Any = None
    sample_weight: Any = None
    batch_size: int | None = None
    steps: int | None = None
    single: bool = False  # one batch: predict_on_batch, test_on_batch, model(x)
    loss: bool = False  # evaluate / test_on_batch: the loss is watched too

    @classmethod
    def of(
        cls, name: str, arguments: dict, *, validation: tuple[Any, Any] | None = None
    ) -> CallData:
        """From the bound arguments of ``keras.Model.<name>``."""
        x, y, sw = arguments.get("x"), arguments.get("y"), arguments.get("sample_weight")
        batch_size = arguments.get("batch_size")
        if name == "evaluate" and x is None and validation is not None:  # fit's validation pass
            data, batch_size = validation
            x, y, sw = unpack(data) if isinstance(data, tuple | list) else (data, None, None)
        return cls(
            call=f"model.{name}",
            x=x,
            y=y,
            sample_weight=sw,
            batch_size=batch_size,
            steps=arguments.get("steps"),
            single=name.endswith("_on_batch"),
            loss=name in ("evaluate", "test_on_batch"),
        )

    def batches(self) -> Iterator[tuple[Any, Any, Any]] | None:
        """``(x, y, sample_weight)`` batch by batch, or None when the data cannot be re-read."""
        x = self.x
        if self.single:
            return iter([(x, self.y, self.sample_weight)])
        if isinstance(x, tf.data.Dataset):
            return (unpack(b) for b in x)
        if isinstance(x, keras.utils.PyDataset):
            return (unpack(x[i]) for i in range(len(x)))
        if (
            x is None
            or hasattr(x, "__next__")
            or not all(hasattr(a, "shape") for a in tf.nest.flatten(x))
        ):
            return None
        n = batch_size_of(x)
        if n is None:
            return None
        bs = int(self.batch_size or 32)

        def rows(part: Any, i: int) -> Any:
            return None if part is None else tf.nest.map_structure(lambda a: a[i : i + bs], part)

        return ((rows(x, i), rows(self.y, i), rows(self.sample_weight, i)) for i in range(0, n, bs))


def _first_bad_row(outputs: Any) -> int | None:
    rows = []
    for leaf in tf.nest.flatten(outputs):
        a = to_numpy(leaf) if tf.is_tensor(leaf) else np.asarray(leaf)
        if a is not None and a.dtype.kind in "fc" and a.ndim:
            bad = bad_rows(a)
            if bad:
                rows.append(bad[0])
    return min(rows) if rows else None


def explain_call(model: keras.Model, data: CallData, *, outputs: Any = None) -> Diagnosis:
    """Why an inference call returned non-finite values: the first bad batch, explained.

    ``outputs``: what the call returned (predict), to skip the batches that were finite.
    """
    first_row = _first_bad_row(outputs) if outputs is not None and not data.single else None
    batches = data.batches()
    row, seen = 0, 0
    for index, batch in enumerate(batches or ()):
        if data.steps is not None and index >= data.steps:
            break
        x, y, sw = (to_tensors(p) for p in batch)
        n = batch_size_of(x) or 0
        row += n
        if first_row is not None and row <= first_row:
            continue  # the call's own result shows this batch was finite
        seen += 1
        d = _explain_batch(model, x, y, sw, loss=data.loss)
        if d is not None:
            return _in_call(d, data, index)
    return _in_call(_unexplained(model, data, reread=batches is not None, seen=seen), data, None)


def _explain_batch(model: keras.Model, x: Any, y: Any, sw: Any, *, loss: bool) -> Diagnosis | None:
    out = model(x, training=False)
    if not all_finite(out):
        if (d := check_batch(x)) is not None:
            return d
        if (d := check_weights(model)) is not None:
            return d
        return _explain(model, x, None)
    if not loss or y is None:
        return None
    snapshot = VariableSnapshot(state_variables(model))
    try:
        value = model.compute_loss(x=x, y=y, y_pred=out, sample_weight=sw, training=False)
    finally:
        snapshot.restore()
    if all_finite(value):
        return None
    return _explain_loss(model, x, y, sw)


def _explain_loss(model: keras.Model, x: Any, y: Any, sw: Any) -> Diagnosis:
    """Inference-mode outputs finite, the loss not: the targets, or an op of the loss."""
    if (d := check_batch(x, y)) is not None:
        return d
    if (d := check_weights(model)) is not None:
        return d
    n = batch_size_of(x)
    ignore_index = _ignore_index(model, None)
    valid = (
        int(np.count_nonzero(to_numpy(y) != ignore_index))
        if ignore_index is not None and tf.is_tensor(y)
        else None
    )
    snapshot = VariableSnapshot(state_variables(model))
    try:
        with Tracer() as tracer:
            tracer.mark_external((x, y))
            out = model(x, training=False)
            tracer.phase = Phase.LOSS
            value = model.compute_loss(x=x, y=y, y_pred=out, sample_weight=sw, training=False)
    finally:
        snapshot.restore()
    d = diagnosis_from_trace(
        tracer.trace, value, batch_size=n, valid_targets=valid, ignore_index=ignore_index
    )
    if d is not None:
        return d
    return rules.not_reproduced(
        "loss",
        framework="keras",
        phase=Phase.LOSS,
        compiled=_compiled(model),
        evidence=["the eager re-run of the batch in inference mode stayed finite op by op"],
    )


def _unexplained(model: keras.Model, data: CallData, *, reread: bool, seen: int) -> Diagnosis:
    """No re-read batch was non-finite (or the data cannot be re-read): the stored state, if bad."""
    if (d := check_weights(model)) is not None:
        return d
    if bad_stats := norm_statistics_audit(model):
        return rules.corrupt_norm_statistics(bad_stats, framework="keras", phase=Phase.STATE)
    if reread:
        return rules.not_reproduced(
            "output",
            framework="keras",
            phase=Phase.FORWARD,
            compiled=_compiled(model),
            evidence=[
                f"{data.call} returned non-finite values; the eager re-run of {seen} "
                f"batch{'es' if seen != 1 else ''} in inference mode stayed finite"
            ],
        )
    return rules.not_localized(
        "output",
        "its batches came from an iterator or generator, which cannot be read a second time",
        framework="keras",
        evidence=[f"{data.call} returned non-finite values"],
    )


def _in_call(d: Diagnosis, data: CallData, index: int | None) -> Diagnosis:
    """Say where in the program it happened: which call, which batch, inference mode."""
    return rules.in_program(d, data.call, batch=None if data.single else index, mode="inference")
