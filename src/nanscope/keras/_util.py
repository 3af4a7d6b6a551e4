"""Small Keras helpers shared by the guard, the diagnoses and the repair.

Design constraints: diagnosis-time only (nothing here runs on a healthy training step), and
leave no trace: ``VariableSnapshot`` restores every variable it saved, byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from nanscope.core.errors import BadInputError


def unpack(batch: Any) -> tuple[Any, Any, Any]:
    """``(x, y, sample_weight)`` from a batch the way ``model.fit`` reads it.

    >>> unpack((1, 2))
    (1, 2, None)
    """
    if isinstance(batch, list):
        batch = tuple(batch)
    if not isinstance(batch, tuple):
        return batch, None, None
    if len(batch) == 1:
        return batch[0], None, None
    if len(batch) == 2:
        return batch[0], batch[1], None
    if len(batch) == 3:
        return batch
    raise BadInputError(
        f"a batch is x, (x,), (x, y) or (x, y, sample_weight); got a tuple of {len(batch)}"
    )


def to_tensors(obj: Any) -> Any:
    return tf.nest.map_structure(
        lambda a: a if a is None or tf.is_tensor(a) else tf.convert_to_tensor(a), obj
    )


def batch_size_of(x: Any) -> int | None:
    for t in tf.nest.flatten(x):
        shape = getattr(t, "shape", None)
        if shape is not None and len(shape) and shape[0] is not None:
            return int(shape[0])
    return None


def iter_batches(
    data: Any, *, batch_size: int = 32, max_batches: int | None = None
) -> Iterator[Any]:
    """Batches of a ``tf.data.Dataset``, a ``keras.utils.PyDataset``, a list of batches, an
    array, or an ``(x, y)`` tuple of arrays (cut into ``batch_size`` rows)."""
    if isinstance(data, tf.data.Dataset | keras.utils.PyDataset) or (
        isinstance(data, list) and data and isinstance(data[0], tuple | list | dict)
    ):
        it: Iterable = (
            data
            if not isinstance(data, keras.utils.PyDataset)
            else (data[i] for i in range(len(data)))
        )
    elif (
        isinstance(data, np.ndarray)
        or tf.is_tensor(data)
        or (isinstance(data, tuple) and data and hasattr(data[0], "shape"))
    ):
        arrays = data if isinstance(data, tuple) else (data,)
        n = int(arrays[0].shape[0])
        it = (
            tuple(a[i : i + batch_size] for a in arrays)
            if len(arrays) > 1
            else arrays[0][i : i + batch_size]
            for i in range(0, n, batch_size)
        )
    elif isinstance(data, Iterable):
        it = data
    else:
        raise BadInputError(
            f"cannot read batches from a {type(data).__name__}: pass a tf.data.Dataset, an array or an (x, y) tuple"
        )
    for i, batch in enumerate(it):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def owned_variables(model: keras.Model) -> list[tuple[str, Any, Any]]:
    """``(name, variable, layer)`` for every variable, named ``layer.variable`` after the
    innermost layer that owns it (``conv5_block3_2_bn.moving_variance``)."""
    out, seen = [], set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for v in list(getattr(layer, "_trainable_variables", [])) + list(
            getattr(layer, "_non_trainable_variables", [])
        ):
            if id(v) in seen:
                continue
            seen.add(id(v))
            out.append((f"{layer.name}.{v.name}", v, layer))
    return out


def batch_norm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [
        la
        for la in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(la, keras.layers.BatchNormalization)
    ]


class VariableSnapshot:
    """Values of variables, restored exactly by ``restore()`` (use in ``finally``)."""

    def __init__(self, variables: Iterable[Any]) -> None:
        self.saved = [(v, np.array(v.numpy(), copy=True)) for v in variables]

    def restore(self) -> None:
        for v, value in self.saved:
            v.assign(value)


def state_variables(model: keras.Model) -> list[Any]:
    """What a training-mode forward pass can change: non-trainable variables (BatchNorm moving
    statistics, random seeds) and metric accumulators."""
    out, seen = [], set()
    for v in list(model.non_trainable_variables) + list(getattr(model, "metrics_variables", [])):
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


class _KerasAdapter:
    """``nanscope.core.adapter.Adapter`` for Keras / TensorFlow."""

    name = "keras"
    convention = "keras"  # (x, y, sample_weight), as model.fit reads a batch

    @staticmethod
    def is_tensor(obj: Any) -> bool:
        return tf.is_tensor(obj) or isinstance(obj, np.ndarray)

    @staticmethod
    def is_float(t: Any) -> bool:
        from nanscope.keras.trace import is_float

        return is_float(t)

    @staticmethod
    def to_numpy(t: Any) -> np.ndarray:
        from nanscope.keras.trace import to_numpy

        return to_numpy(t)

    @staticmethod
    def dtype_name(t: Any) -> str:
        return t.dtype.name

    @staticmethod
    def all_finite(t: Any) -> bool:
        from nanscope.keras.trace import all_finite

        return all_finite(t)

    @staticmethod
    def user_location():
        from nanscope.core.source import user_location

        return user_location()


KERAS = _KerasAdapter()
