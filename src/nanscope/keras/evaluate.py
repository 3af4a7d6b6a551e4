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
"""

from __future__ import annotations

import sys
from typing import Any

import keras

from nanscope.core import rules
from nanscope.core.diagnosis import Diagnosis
from nanscope.core.enums import Category, Phase
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
from nanscope.keras.diagnose_step import check_batch, check_weights
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
        problems = rules.norm_statistics_problems(mean, var, extreme=extreme, names=KERAS_NORM_NAMES)
        if problems:
            out[bn.name] = problems
    return out


def diagnose_eval(model: keras.Model, dataset: Any, *, max_batches: int | None = None,
                  batch_size: int = 32) -> Diagnosis | None:
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
    if bad_stats and train_finite:
        # Order the layers as they run; the first one to produce the NaN leads.
        order = {name: i for i, name in enumerate(dict.fromkeys(r.layer for r in tr.ops if r.layer))}
        if first is not None and first.layer in bad_stats:
            order[first.layer] = -1
        layers = dict(sorted(bad_stats.items(), key=lambda kv: order.get(kv[0], len(order))))
        d = rules.corrupt_norm_statistics(layers, framework="keras", phase=Phase.STATE, train_finite=True,
                                          eval_finite=False, samples=eval_samples)
        if first is not None:
            d.evidence.insert(1, f"first non-finite output in inference mode: {first.op} in layer {first.layer}")
        return d
    d = diagnosis_from_trace(tr, out, batch_size=n)
    if d is None:
        return rules.corrupt_norm_statistics(bad_stats, framework="keras", train_finite=train_finite, eval_finite=False) \
            if bad_stats else _unknown(eval_samples)
    d.evidence.append(f"training-mode output finite: {train_finite}; inference-mode output finite: False")
    return d


def _samples(out: Any, n: int | None) -> list[int]:
    rows: set[int] = set()
    for t in keras.tree.flatten(out):
        a = to_numpy(t)
        if a is not None and n and a.ndim and a.shape[0] == n:
            rows.update(bad_rows(a))
    return sorted(rows)


def _unknown(samples: list[int]) -> Diagnosis:
    return Diagnosis(Category.UNKNOWN, "inference output is non-finite but no op produced it in an eager re-run",
                     phase=Phase.FORWARD, framework="keras", samples=samples,
                     evidence=["the eager re-run stayed finite op by op"], fixes=[])

