"""Numerically safe losses and building blocks for PyTorch: finite value *and* finite gradient.

Design constraints:
    - On ordinary inputs every function returns what the stock formula returns (to rounding);
      it differs only where the stock formula would produce NaN/Inf (log of 0, 0/0, sqrt at 0,
      a softmax over a row that is entirely masked, a loss with no valid target).
    - Gradients stay finite too: a value that is merely clamped can still carry an infinite
      derivative (``sqrt`` at 0) or a NaN from the branch ``where`` discarded, so singular
      points go through :func:`double_where`.
    - Reductions that can overflow float16 (cross-entropy, sums over a mask) run in float32,
      the way ``torch.autocast`` runs them; elementwise helpers keep the input's dtype.
    - Degenerate cases are said once, by a warning, never silently.

The framework-free entry point is :mod:`nanscope.losses`, which dispatches here for torch
tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

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


def _tiny(x: torch.Tensor) -> float:
    lim = limits(x.dtype)
    return lim.tiny if lim else 1.1754943508222875e-38


def double_where(
    condition: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    safe_value: float = 1.0,
    otherwise: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """``where(condition, fn(x), otherwise)`` without the NaN gradient of the discarded branch.

    ``torch.where(c, fn(x), 0)`` still differentiates ``fn`` at the discarded elements, and
    ``0 * inf`` there is NaN (the where trap). Feeding ``fn`` a safe value where ``condition``
    is false avoids it.

    Example:
        >>> x = torch.tensor([0.0, 4.0], requires_grad=True)
        >>> y = double_where(x > 0, torch.sqrt, x)
        >>> y.sum().backward(); y.tolist(), x.grad.tolist()
        ([0.0, 2.0], [0.0, 0.25])
    """
    safe = torch.where(condition, x, torch.full_like(x, safe_value))
    other = otherwise if isinstance(otherwise, torch.Tensor) else torch.full_like(x, otherwise)
    return torch.where(condition, fn(safe), other)


def safe_log(x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """``log(x)`` with ``x`` clamped to at least ``eps`` (default: the dtype's smallest normal).

    Example:
        >>> safe_log(torch.tensor([0.0, 1.0])).tolist()[1], bool(safe_log(torch.tensor(0.0)).isfinite())
        (0.0, True)
    """
    return torch.log(x.clamp_min(_tiny(x) if eps is None else eps))


def safe_sqrt(x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """``sqrt(x)`` that is 0 with gradient 0 at ``x <= eps`` (sqrt's derivative is infinite at 0).

    Example:
        >>> x = torch.tensor([0.0, 9.0], requires_grad=True)
        >>> safe_sqrt(x).sum().backward(); x.grad.tolist()
        [0.0, 0.1666666716337204]
    """
    return double_where(x > (_tiny(x) if eps is None else eps), torch.sqrt, x)


def safe_norm(
    x: torch.Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = False
) -> torch.Tensor:
    """Euclidean norm with a finite (zero) gradient at the zero vector.

    The squares are summed in float32 so float16 inputs do not overflow on the way; the result
    has the input's dtype.

    Example:
        >>> v = torch.zeros(3, requires_grad=True)
        >>> safe_norm(v).backward(); v.grad.tolist()
        [0.0, 0.0, 0.0]
    """
    sq = x.float().pow(2)
    total = sq.sum() if dim is None else sq.sum(dim=dim, keepdim=keepdim)
    return safe_sqrt(total).to(x.dtype)


def safe_div(
    numerator: torch.Tensor, denominator: torch.Tensor | float, *, otherwise: float = 0.0
) -> torch.Tensor:
    """``numerator / denominator``, and ``otherwise`` (default 0) where the denominator is 0.

    Example:
        >>> safe_div(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0])).tolist()
        [0.5, 0.0]
    """
    den = torch.as_tensor(denominator, dtype=numerator.dtype, device=numerator.device)
    num, den = torch.broadcast_tensors(numerator, den)
    nonzero = den != 0
    safe_den = torch.where(nonzero, den, torch.ones_like(den))
    return torch.where(nonzero, num / safe_den, torch.full_like(num, otherwise))


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over the positions where ``mask`` is True; a fully masked row is all zeros.

    ``softmax(x.masked_fill(~mask, -inf))`` is NaN on such rows, in value and gradient.

    Example:
        >>> m = torch.tensor([[True, False], [False, False]])
        >>> masked_softmax(torch.zeros(2, 2), m).tolist()
        [[1.0, 0.0], [0.0, 0.0]]
    """
    mask = mask.to(torch.bool)
    filled = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return torch.softmax(filled, dim=dim) * mask.to(logits.dtype)


def _say_once(message: str) -> None:
    # Python's default filter shows a warning once per call site: "said once", not per step.
    warnings.warn(f"nanscope: {message}", UserWarning, stacklevel=user_stacklevel())


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``F.cross_entropy`` that is 0 (gradient 0) when every target equals ``ignore_index``.

    The stock mean divides by the number of valid targets, 0/0 = NaN when there are none.
    Computed in float32 (like autocast); warns once when a batch had no valid target.

    Example:
        >>> logits = torch.zeros(2, 3, requires_grad=True)
        >>> cross_entropy(logits, torch.tensor([-100, -100])).item()  # doctest: +SKIP
        0.0
    """
    x = logits.float()
    total = F.cross_entropy(
        x,
        target,
        weight=None if weight is None else weight.float(),
        ignore_index=ignore_index,
        reduction="sum" if reduction == "mean" else reduction,
        label_smoothing=label_smoothing,
    )
    if reduction != "mean":
        return total
    valid = target != ignore_index
    if weight is not None:
        denom = weight.float()[target[valid]].sum()
    else:
        denom = valid.sum().to(x.dtype)
    if not bool(valid.any()):
        _say_once(
            "cross_entropy: every target equals ignore_index; returning 0 (and a zero gradient) "
            "instead of 0/0 = NaN. Check the labels with `nanscope data`."
        )
    return total / denom.clamp_min(1.0)


def binary_cross_entropy(
    probs: torch.Tensor, target: torch.Tensor, *, eps: float = 1e-7, reduction: str = "mean"
) -> torch.Tensor:
    """Binary cross-entropy on probabilities, clamped to ``[eps, 1 - eps]`` (in float32).

    Prefer ``F.binary_cross_entropy_with_logits`` when you have logits.

    Example:
        >>> round(binary_cross_entropy(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])).item(), 2)
        8.06
    """
    p = probs.float().clamp(eps, 1.0 - eps)
    return F.binary_cross_entropy(p, target.float(), reduction=reduction)


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: float | None = 0.25,
    reduction: str = "mean",
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al.) from logits, finite for logits of ±1e4 and any gamma >= 0.

    The modulating factor ``(1 - p_t) ** gamma`` is computed as ``exp(gamma * logsigmoid(-z))``
    so it never takes a fractional power of 0 (infinite gradient for gamma < 1).

    Example:
        >>> round(focal_loss(torch.tensor([0.0]), torch.tensor([1.0]), alpha=None).item(), 4)
        0.1733
    """
    x, y = logits.float(), target.float()
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    z = x * (2.0 * y - 1.0)  # logit of p_t, for targets in {0, 1}
    loss = ce * torch.exp(gamma * F.logsigmoid(-z)) if gamma else ce
    if alpha is not None:
        loss = (alpha * y + (1.0 - alpha) * (1.0 - y)) * loss
    return _reduce(loss, reduction)


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def _per_sample_sums(probs: torch.Tensor, target: torch.Tensor):
    p, t = probs.float(), target.float()
    dims = tuple(range(1, p.ndim)) or None
    s = (lambda v: v.sum(dim=dims)) if dims else (lambda v: v.sum())
    return s(p * t), s(p * (1 - t)), s((1 - p) * t)


def dice_loss(
    probs: torch.Tensor, target: torch.Tensor, *, smooth: float = 0.0, reduction: str = "mean"
) -> torch.Tensor:
    """``1 - 2|P∩T| / (|P| + |T|)`` per sample; an empty prediction of an empty mask scores 0.

    The stock formula is 0/0 = NaN for an empty mask predicted empty. Sums run over every
    dimension but the first (the batch), in float32.

    Example:
        >>> dice_loss(torch.zeros(2, 4), torch.zeros(2, 4)).item()
        0.0
    """
    tp, fp, fn = _per_sample_sums(probs, target)
    denom = 2 * tp + fp + fn + smooth
    dice = double_where(denom > 0, lambda d: (2 * tp + smooth) / d, denom, otherwise=1.0)
    return _reduce(1.0 - dice, reduction)


def tversky_loss(
    probs: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    smooth: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Tversky loss ``1 - TP / (TP + alpha FP + beta FN)``; 0 for an empty mask predicted empty.

    Example:
        >>> tversky_loss(torch.zeros(1, 3), torch.zeros(1, 3)).item()
        0.0
    """
    tp, fp, fn = _per_sample_sums(probs, target)
    denom = tp + alpha * fp + beta * fn + smooth
    index = double_where(denom > 0, lambda d: (tp + smooth) / d, denom, otherwise=1.0)
    return _reduce(1.0 - index, reduction)
