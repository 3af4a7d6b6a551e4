"""Trends over steps: is the gradient norm exploding, or was this NaN a one-off?

A one-off NaN (log of a zero in one batch) comes after ordinary gradient norms; an explosion
comes after norms that grew geometrically. The guard keeps a short history (a few floats per
step) and asks these pure functions.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable


def growth_rate(norms: Iterable[float], window: int = 8) -> float | None:
    """Geometric mean ratio between consecutive finite norms over the last ``window`` steps.

    >>> round(growth_rate([1, 2, 4, 8, 16]), 3)
    2.0
    >>> growth_rate([1.0]) is None
    True
    """
    xs = [float(n) for n in norms if n is not None and math.isfinite(n) and n > 0][-window:]
    if len(xs) < 3:
        return None
    return math.exp((math.log(xs[-1]) - math.log(xs[0])) / (len(xs) - 1))


def is_exploding(norms: Iterable[float], *, min_rate: float = 1.5, jump: float = 1e3) -> bool:
    """True when the recent finite norms grew fast: geometrically, or by ``jump`` over the median.

    >>> is_exploding([1.1, 0.9, 1.0, 5, 40, 900, 3e5]), is_exploding([1.0, 1.1, 0.9, 1.0, 1.05])
    (True, False)
    """
    xs = [float(n) for n in norms if n is not None and math.isfinite(n)]
    if len(xs) < 3:
        return False
    rate = growth_rate(xs, window=5)
    if rate is not None and rate >= min_rate and xs[-1] > xs[-2] > xs[-3]:
        return True
    med = sorted(xs[:-1])[len(xs[:-1]) // 2]
    return med > 0 and xs[-1] > jump * med


class History:
    """Bounded history of per-step scalars (loss, gradient norm); a few floats per step."""

    def __init__(self, size: int = 64) -> None:
        self.loss: deque[float] = deque(maxlen=size)
        self.grad_norm: deque[float] = deque(maxlen=size)

    def add(self, loss: float | None, grad_norm: float | None) -> None:
        if loss is not None:
            self.loss.append(float(loss))
        if grad_norm is not None:
            self.grad_norm.append(float(grad_norm))

    def exploding(self) -> bool:
        return is_exploding(self.grad_norm)
