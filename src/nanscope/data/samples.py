"""Per-sample, per-channel statistics of a batch: what the input audit keeps of the data.

Design constraints:
    - One pass: :func:`nanscope.core.stats.row_stats` reduces every (sample, channel) pair of
      a batch at once, straight from the (memory-mapped) array; per-channel statistics,
      per-sample NaN/Inf counts and constant samples all come from these rows, so the audit
      never copies a batch to channel-major order and never reads it twice.
    - 8-bit PIL images skip numpy entirely: Pillow's per-band histogram (C, 256 bins) gives the
      exact count, min, max, mean and spread of each channel, and an 8-bit image holds no NaN.
      It runs in the decoding worker right after ``Image.load()`` ("check as you decode"): the
      decoded pixels never leave the worker.
    - Framework-free: numpy, and Pillow only for images.
"""

from __future__ import annotations

import math
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from nanscope.core.stats import RowStats, row_stats

_HIST_MODES = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}  # 8 bits per band: Pillow's histogram is exact
_LEVELS = np.arange(256, dtype=np.int64)
_SQUARES = _LEVELS * _LEVELS


@dataclass(frozen=True)
class SampleStats:
    """The statistics of ``n`` samples of one input: ``rows`` is ``(n, channels)``.

    ``channel_axis`` is the axis of ``sample_shape`` that ``rows`` splits into channels, or None
    when each sample is one row. ``shape``/``ndim`` mimic the batch array they summarize.
    """

    rows: RowStats
    dtype: np.dtype
    sample_shape: tuple[int, ...]
    channel_axis: int | None

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows.shape[0], *self.sample_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.sample_shape)


def channel_axis(sample_shape: tuple[int, ...]) -> int | None:
    """Channels last (H, W, C) or first (C, H, W) for image-like samples; None otherwise.

    >>> channel_axis((32, 32, 3)), channel_axis((3, 32, 32)), channel_axis((10,))
    (2, 0, None)
    """
    if len(sample_shape) != 3:
        return None
    if sample_shape[-1] in (1, 2, 3, 4) and sample_shape[0] > 4:
        return 2
    if sample_shape[0] in (1, 2, 3, 4):
        return 0
    return None


def batch_stats(
    x: np.ndarray, axis: int | None, *, workers: int = 1, pool: Executor | None = None
) -> SampleStats:
    """Rows of ``x`` (samples first), split by channel along sample axis ``axis`` when given.

    Example:
        >>> s = batch_stats(np.zeros((2, 8, 8, 3), np.uint8), 2)
        >>> s.rows.shape, s.shape
        ((2, 3), (2, 8, 8, 3))
    """
    n = x.shape[0]
    sample_shape = tuple(x.shape[1:])
    if axis is None:
        view = x.reshape(n, 1, -1)
    elif axis == 0:
        view = x.reshape(n, sample_shape[0], -1)
    else:  # channels last: (n, H*W, C) seen as (n, C, H*W); row_stats copies cached groups only
        c = sample_shape[axis]
        view = (
            np.moveaxis(x.reshape(n, -1, c), 2, 1)
            if axis == len(sample_shape) - 1
            else np.moveaxis(x, 1 + axis, 1).reshape(n, c, -1)
        )
    return SampleStats(row_stats(view, workers=workers, pool=pool), x.dtype, sample_shape, axis)


def image_stats(im: object) -> SampleStats | None:
    """The statistics of one decoded 8-bit PIL image from its histogram, or None for other modes.

    Example:
        >>> from PIL import Image
        >>> s = image_stats(Image.new("RGB", (4, 8), (10, 20, 30)))
        >>> s.shape, s.rows.mean.tolist(), s.rows.m2.tolist()
        ((1, 8, 4, 3), [[10.0, 20.0, 30.0]], [[0.0, 0.0, 0.0]])
    """
    bands = _HIST_MODES.get(getattr(im, "mode", None))
    if bands is None:
        return None
    w, h = im.size
    shape = (h, w) if bands == 1 else (h, w, bands)
    axis = None if bands == 1 else channel_axis(shape)
    if bands > 1 and axis != 2:  # a tiny image (<= 4 rows) reads as channels first: the array path
        return None
    hist = np.array(im.histogram(), dtype=np.int64).reshape(bands, 256)
    # Integer sums are exact; M2 = (n*s2 - s1**2) / n in Python integers is exact too, so a
    # constant channel has a spread of exactly 0 (a float formula would leave rounding there).
    count, s1, s2 = hist.sum(axis=1).tolist(), (hist @ _LEVELS).tolist(), (hist @ _SQUARES).tolist()
    nz = hist > 0
    lo, hi = nz.argmax(axis=1).tolist(), (255 - nz[:, ::-1].argmax(axis=1)).tolist()
    mean, m2 = [], []
    for i, n in enumerate(count):
        if not n:
            lo[i], hi[i] = math.inf, -math.inf
        mean.append(s1[i] / n if n else 0.0)
        m2.append((n * s2[i] - s1[i] * s1[i]) / n if n else 0.0)
    zeros = np.zeros((1, bands), np.int64)
    rows = RowStats(
        np.array([count], np.int64),
        zeros,
        zeros,
        zeros,
        np.array([lo], np.float64),
        np.array([hi], np.float64),
        np.array([mean], np.float64),
        np.array([m2], np.float64),
    )
    return SampleStats(rows, np.dtype(np.uint8), shape, axis)


@dataclass(frozen=True)
class LabelCounts:
    """One 8-bit mask as the count of each of its 256 values: what the label checks need.

    Out-of-range labels, ignored and valid pixels, masks with no valid pixel and the class
    histogram all follow from these counts, so a mask's check costs one Pillow histogram in
    the decoding worker instead of a dozen passes over an int64 copy of its pixels.
    """

    counts: np.ndarray  # int64, 256
    sample_shape: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, *self.sample_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.sample_shape)

    def stats(self):
        """:class:`ArrayStats` of the mask's values, exact (integer sums)."""
        from nanscope.core.stats import ArrayStats

        values = np.flatnonzero(self.counts)
        if not values.size:
            return ArrayStats()
        c = self.counts[values]
        n, s1, s2 = int(c.sum()), int(c @ values), int(c @ (values * values))
        return ArrayStats(
            n, 0, 0, 0, float(values[0]), float(values[-1]), s1 / n, (n * s2 - s1 * s1) / n
        )


def label_counts(im: object) -> LabelCounts | None:
    """The value counts of a decoded 8-bit single-band mask (``L`` or palette ``P``), else None.

    Example:
        >>> from PIL import Image
        >>> lc = label_counts(Image.new("L", (4, 2), 3))
        >>> lc.shape, int(lc.counts[3]), lc.stats().mean
        ((1, 2, 4), 8, 3.0)
    """
    if getattr(im, "mode", None) not in ("L", "P"):
        return None
    w, h = im.size
    return LabelCounts(np.array(im.histogram()[:256], dtype=np.int64), (h, w))
