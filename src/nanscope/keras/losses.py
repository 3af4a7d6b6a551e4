"""Numerically safe losses and building blocks for Keras 3: finite value *and* finite gradient.

Same names, arguments and guarantees as ``nanscope.torch.losses`` (see its docstring), written
with ``keras.ops`` so they work eagerly, inside ``tf.function`` and on symbolic Keras tensors.
One difference follows Keras' convention: the class axis is the last one
(``logits[..., C]``), where PyTorch puts it at dim 1.

Design constraints: reductions that can overflow float16 run in float32; singular points go
through :func:`double_where`; degenerate batches are said once by a warning (eagerly only:
inside a compiled function a tensor's value is not known).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from nanscope.core.limits import limits
from nanscope.losses import user_stacklevel

__all__ = [
    "binary_cross_entropy",
    "cross_entropy",
    "dice_loss",
    "double_where",
    "focal_loss",
    "masked_softmax",
    "safe_div",
    "safe_log",
    "safe_norm",
    "safe_sqrt",
    "tversky_loss",
]


def _dtype(x: Any) -> str:
    return keras.backend.standardize_dtype(x.dtype)


def _tiny(x: Any) -> float:
    lim = limits(_dtype(x))
    return lim.tiny if lim else 1.1754943508222875e-38


def double_where(
    condition: Any,
    fn: Callable[[Any], Any],
    x: Any,
    *,
    safe_value: float = 1.0,
    otherwise: Any = 0.0,
) -> Any:
    """``where(condition, fn(x), otherwise)`` without the NaN gradient of the discarded branch.

    Example:
        >>> import numpy as np
        >>> y = double_where(ops.convert_to_tensor([0.0, 4.0]) > 0, ops.sqrt, ops.convert_to_tensor([0.0, 4.0]))
        >>> np.asarray(y).tolist()
        [0.0, 2.0]
    """
    x = ops.convert_to_tensor(x)
    safe = ops.where(condition, x, ops.cast(safe_value, x.dtype))
    out = fn(safe)
    return ops.where(condition, out, ops.cast(otherwise, out.dtype))


def safe_log(x: Any, eps: float | None = None) -> Any:
    """``log(x)`` with ``x`` clamped to at least ``eps`` (default: the dtype's smallest normal)."""
    x = ops.convert_to_tensor(x)
    return ops.log(ops.maximum(x, ops.cast(_tiny(x) if eps is None else eps, x.dtype)))


def safe_sqrt(x: Any, eps: float | None = None) -> Any:
    """``sqrt(x)``: 0 with gradient 0 at ``x <= eps`` (sqrt's derivative is infinite at 0)."""
    x = ops.convert_to_tensor(x)
    return double_where(x > ops.cast(_tiny(x) if eps is None else eps, x.dtype), ops.sqrt, x)


def safe_norm(x: Any, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Any:
    """Euclidean norm with a zero gradient at the zero vector (squares summed in float32)."""
    x = ops.convert_to_tensor(x)
    total = ops.sum(ops.square(ops.cast(x, "float32")), axis=axis, keepdims=keepdims)
    return ops.cast(safe_sqrt(total), x.dtype)


def safe_div(numerator: Any, denominator: Any, *, otherwise: float = 0.0) -> Any:
    """``numerator / denominator``, and ``otherwise`` (default 0) where the denominator is 0."""
    num = ops.convert_to_tensor(numerator)
    den = ops.cast(ops.convert_to_tensor(denominator), num.dtype)
    num, den = num + ops.zeros_like(den), den + ops.zeros_like(num)
    nonzero = ops.not_equal(den, 0)
    return ops.where(
        nonzero, num / ops.where(nonzero, den, ops.ones_like(den)), ops.cast(otherwise, num.dtype)
    )


def masked_softmax(logits: Any, mask: Any, axis: int = -1) -> Any:
    """Softmax over the positions where ``mask`` is True; a fully masked row is all zeros."""
    x = ops.convert_to_tensor(logits)
    mask = ops.cast(mask, "bool")
    lim = limits(_dtype(x))
    filled = ops.where(mask, x, ops.cast(-(lim.max if lim else 3.0e38), x.dtype))
    return ops.softmax(filled, axis=axis) * ops.cast(mask, x.dtype)


def _say_once_if(condition: Any, message: str) -> None:
    try:
        flag = bool(condition)
    except Exception:  # symbolic / graph tensor: the value is not known here
        return
    if flag:
        warnings.warn(f"nanscope: {message}", UserWarning, stacklevel=user_stacklevel())


def cross_entropy(
    logits: Any,
    target: Any,
    *,
    ignore_index: int = -100,
    weight: Any = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Any:
    """Sparse cross-entropy from logits (classes last) that is 0 when every target is ignored.

    Example:
        >>> import numpy as np
        >>> float(cross_entropy(np.zeros((2, 3), "float32"), np.array([1, 2])))  # doctest: +ELLIPSIS
        1.098...
    """
    x = ops.cast(ops.convert_to_tensor(logits), "float32")
    t = ops.convert_to_tensor(target)
    valid = ops.not_equal(t, ignore_index)
    safe_t = ops.where(valid, t, ops.zeros_like(t))
    logp = ops.log_softmax(x, axis=-1)
    nll = -ops.squeeze(
        ops.take_along_axis(logp, ops.expand_dims(ops.cast(safe_t, "int32"), -1), axis=-1), -1
    )
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * ops.mean(logp, axis=-1)
    w = ops.cast(valid, "float32")
    if weight is not None:
        w = w * ops.take(
            ops.cast(ops.convert_to_tensor(weight), "float32"), ops.cast(safe_t, "int32")
        )
    per = nll * w
    if reduction == "none":
        return per
    if reduction == "sum":
        return ops.sum(per)
    _say_once_if(
        ops.logical_not(ops.any(valid)),
        "cross_entropy: every target equals ignore_index; returning 0 (and a zero gradient) "
        "instead of 0/0 = NaN. Check the labels with `nanscope data`.",
    )
    return ops.sum(per) / ops.maximum(ops.sum(w), 1.0)


def _reduce(loss: Any, reduction: str) -> Any:
    return ops.mean(loss) if reduction == "mean" else ops.sum(loss) if reduction == "sum" else loss


def binary_cross_entropy(
    probs: Any, target: Any, *, eps: float = 1e-7, reduction: str = "mean"
) -> Any:
    """Binary cross-entropy on probabilities, clamped to ``[eps, 1 - eps]`` (in float32)."""
    p = ops.clip(ops.cast(ops.convert_to_tensor(probs), "float32"), eps, 1.0 - eps)
    y = ops.cast(ops.convert_to_tensor(target), "float32")
    return _reduce(-(y * ops.log(p) + (1.0 - y) * ops.log(1.0 - p)), reduction)


def focal_loss(
    logits: Any,
    target: Any,
    *,
    gamma: float = 2.0,
    alpha: float | None = 0.25,
    reduction: str = "mean",
) -> Any:
    """Sigmoid focal loss from logits, finite for logits of ±1e4 and any gamma >= 0."""
    x = ops.cast(ops.convert_to_tensor(logits), "float32")
    y = ops.cast(ops.convert_to_tensor(target), "float32")
    ce = ops.maximum(x, 0.0) - x * y - ops.log_sigmoid(ops.abs(x))  # stable BCE with logits
    z = x * (2.0 * y - 1.0)
    loss = ce * ops.exp(gamma * ops.log_sigmoid(-z)) if gamma else ce
    if alpha is not None:
        loss = (alpha * y + (1.0 - alpha) * (1.0 - y)) * loss
    return _reduce(loss, reduction)


def _per_sample_sums(probs: Any, target: Any):
    p = ops.cast(ops.convert_to_tensor(probs), "float32")
    t = ops.cast(ops.convert_to_tensor(target), "float32")
    axes = tuple(range(1, len(p.shape))) or None
    return (
        ops.sum(p * t, axis=axes),
        ops.sum(p * (1 - t), axis=axes),
        ops.sum((1 - p) * t, axis=axes),
    )


def dice_loss(probs: Any, target: Any, *, smooth: float = 0.0, reduction: str = "mean") -> Any:
    """``1 - 2|P∩T| / (|P| + |T|)`` per sample; an empty prediction of an empty mask scores 0."""
    tp, fp, fn = _per_sample_sums(probs, target)
    denom = 2 * tp + fp + fn + smooth
    dice = double_where(denom > 0, lambda d: (2 * tp + smooth) / d, denom, otherwise=1.0)
    return _reduce(1.0 - dice, reduction)


def tversky_loss(
    probs: Any,
    target: Any,
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    smooth: float = 0.0,
    reduction: str = "mean",
) -> Any:
    """Tversky loss ``1 - TP / (TP + alpha FP + beta FN)``; 0 for an empty mask predicted empty."""
    tp, fp, fn = _per_sample_sums(probs, target)
    denom = tp + alpha * fp + beta * fn + smooth
    index = double_where(denom > 0, lambda d: (tp + smooth) / d, denom, otherwise=1.0)
    return _reduce(1.0 - index, reduction)
