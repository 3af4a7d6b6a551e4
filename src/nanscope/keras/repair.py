"""``nanscope.keras.repair_norm_statistics``: recompute BatchNormalization moving statistics
from data, so that inference is finite again.

Design constraints:
    * A cumulative average over the batches (every batch weighs the same), not Keras'
      exponential momentum, which needs hundreds of batches to forget a NaN (and never does:
      ``NaN * momentum`` stays NaN). Each BatchNormalization layer runs in training mode for
      the passes; every other layer (Dropout, ...) runs in inference mode, and no weight other
      than the moving statistics changes.
    * Layers are changed in place and restored (``momentum``, ``trainable``) in ``finally``.
    * Resetting the statistics to their initial values (mean 0, variance 1) is only a
      fallback (``reset=True``): it discards what the model learned about activation scale.
    * Stable signature: ``nanscope repair --recalibrate-bn`` (the CLI) calls it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from nanscope.core.errors import BadInputError
from nanscope.keras._util import (
    VariableSnapshot,
    batch_norm_layers,
    iter_batches,
    to_tensors,
    unpack,
)
from nanscope.keras.trace import to_numpy


@dataclass
class NormRepair:
    """What ``repair_norm_statistics`` did."""

    layers: list[str] = field(default_factory=list)  # layers whose statistics were rewritten
    batches: int = 0  # batches the statistics were averaged over (0 for a reset)
    method: str = "recomputed"  # "recomputed" or "reset"
    note: str = ""

    def __str__(self) -> str:
        what = (
            f"over {self.batches} batches"
            if self.method == "recomputed"
            else "to mean 0, variance 1"
        )
        return (
            f"{self.method} moving statistics of {len(self.layers)} BatchNormalization layers {what}"
            + (f"; {self.note}" if self.note else "")
        )


def repair_norm_statistics(
    model: keras.Model,
    dataset: Any = None,
    *,
    max_batches: int | None = 100,
    batch_size: int = 32,
    reset: bool = False,
    only_bad: bool = False,
) -> NormRepair:
    """Recompute the moving mean and variance of every BatchNormalization layer from data.

    Args:
        model: the Keras model, changed in place.
        dataset: inputs to average over: a ``tf.data.Dataset``, a list of batches, an array
            or an ``(x, y)`` tuple (targets are ignored). Use training-like data.
        max_batches: batches to average over (None: all).
        reset: instead of recomputing, reset the statistics to their initial values (mean 0,
            variance 1). A fallback when no data is at hand: it loses what the model learned
            about activation scale, and accuracy usually drops until it is recalibrated.
        only_bad: touch only layers whose statistics are NaN, Inf, negative or extreme.

    Returns:
        A ``NormRepair`` naming the layers rewritten.

    Example:
        >>> import keras, numpy as np
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.BatchNormalization(name="bn")])
        >>> _ = model.get_layer("bn").moving_variance.assign(np.array([np.nan, 1.0], "float32"))
        >>> r = repair_norm_statistics(model, np.random.rand(64, 2).astype("float32"))
        >>> r.layers, bool(np.isfinite(model.predict(np.ones((1, 2)), verbose=0)).all())
        (['bn'], True)
    """
    layers = batch_norm_layers(model)
    if only_bad:
        from nanscope.keras.evaluate import norm_statistics_audit

        bad = norm_statistics_audit(model)
        layers = [la for la in layers if la.name in bad]
    if not layers:
        return NormRepair(note="no BatchNormalization layer to repair")
    if reset:
        for bn in layers:
            bn.moving_mean.assign(np.zeros(bn.moving_mean.shape, "float32"))
            bn.moving_variance.assign(np.ones(bn.moving_variance.shape, "float32"))
        note = (
            "statistics reset to mean 0, variance 1: what the model learned about activation scale is lost; "
            "expect lower accuracy until recomputed from data (repair_norm_statistics(model, dataset))"
        )
        warnings.warn(f"nanscope: {note}", UserWarning, stacklevel=2)
        return NormRepair([bn.name for bn in layers], 0, "reset", note)
    if dataset is None:
        raise BadInputError(
            "repair_norm_statistics needs data to recompute the statistics (or reset=True)"
        )

    sums = {
        id(bn): [
            np.zeros(bn.moving_mean.shape, np.float64),
            np.zeros(bn.moving_variance.shape, np.float64),
        ]
        for bn in layers
    }
    saved = [(bn, bn.trainable, bn.momentum) for bn in layers]
    before = VariableSnapshot([v for bn in layers for v in (bn.moving_mean, bn.moving_variance)])
    originals = {}
    n = 0
    try:
        for bn in layers:
            # NaN * momentum stays NaN: start each layer from finite values.
            bn.moving_mean.assign(np.zeros(bn.moving_mean.shape, "float32"))
            bn.moving_variance.assign(np.ones(bn.moving_variance.shape, "float32"))
            # momentum 0: after a training-mode call the moving statistics are exactly this
            # batch's; we read them out and average ourselves (a cumulative mean).
            bn.trainable, bn.momentum = True, 0.0
            originals[id(bn)] = _force_training(bn)
        for batch in iter_batches(dataset, batch_size=batch_size, max_batches=max_batches):
            x, _, _ = unpack(batch)
            model(to_tensors(x), training=False)
            for bn in layers:
                s = sums[id(bn)]
                s[0] += to_numpy(bn.moving_mean.value).astype(np.float64)
                s[1] += to_numpy(bn.moving_variance.value).astype(np.float64)
            n += 1
        if n == 0:
            raise BadInputError("repair_norm_statistics got no batch from the dataset")
    except BaseException:
        before.restore()
        raise
    finally:
        for bn in layers:
            if id(bn) in originals:
                object.__delattr__(bn, "call")
        for bn, trainable, momentum in saved:
            bn.trainable, bn.momentum = trainable, momentum
    for bn in layers:
        mean, var = sums[id(bn)]
        bn.moving_mean.assign((mean / n).astype("float32"))
        bn.moving_variance.assign((var / n).astype("float32"))
    return NormRepair([bn.name for bn in layers], n, "recomputed")


def _force_training(bn: keras.layers.BatchNormalization) -> Any:
    original = bn.call

    def call(inputs, training=None, mask=None):
        return original(inputs, training=True, mask=mask)

    object.__setattr__(bn, "call", call)
    return original
