"""Fused, streaming statistics of arrays: min, max, mean, std and NaN/±Inf counts in one pass.

Design constraints:
    - One pass over memory. numpy's separate ``min``/``max``/``mean``/``std``/``isnan``/``isinf``
      passes read the data six times and allocate masks (about 1 GB/s on a 2-core VM); memory
      itself reads at 11-16 GB/s per core. So the array is cut into blocks that fit the L2 cache
      (128 Ki elements = 512 KiB of float32) and every reduction runs on the cached block.
    - Fast path first: if a block's sum is finite, the block holds no NaN and no Inf (a NaN makes
      the sum NaN; an Inf makes it Inf or NaN), so no mask is needed. Only blocks whose sum is
      not finite (or whose float32 sum overflowed) take the slow, masked float64 path.
    - Numerically sound: each block's variance comes from a two-pass sum of squares around the
      block's own mean (so a large mean never cancels a small spread), and blocks are combined
      with Chan et al.'s pairwise update of (count, mean, M2). Totals are kept in float64.
    - Two threads by default: numpy releases the GIL inside each reduction; threads take chunks
      of blocks from a shared counter, and chunk results merge in a fixed order (deterministic). The sum of squares
      uses ``einsum``, not ``np.dot``: OpenBLAS would start its own threads for every block and
      fight ours (measured: 7 GB/s with ``dot``, 11 GB/s with ``einsum`` on 2 cores).
    - Framework-free: numpy only. Adapters pass numpy arrays (bfloat16 upcast to float32).
    - Statistics (min, max, mean, std) are over the finite elements; NaN/±Inf are counted apart.

Example:
    >>> import numpy as np
    >>> s = array_stats(np.array([1.0, 2.0, np.nan, 3.0, np.inf], dtype=np.float32))
    >>> s.count, s.nan, s.posinf, s.min, s.max, s.mean, round(s.std, 4)
    (3, 1, 1, 1.0, 3.0, 2.0, 0.8165)
"""

from __future__ import annotations

import itertools
import math
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

BLOCK = 1 << 17  # elements per block: 512 KiB of float32, half of a 1 MiB L2
_MIN_PARALLEL = 1 << 21  # below 2 Mi elements one thread is faster than starting two
# row_stats reduces groups of rows with ~10 numpy calls of ~2 us fixed cost each; 256 Ki elements
# per group (1 MiB of float32 plus its 1 MiB of deviations, the L2) measured fastest: 4.0 GB/s on
# one core against 3.5 at 128 Ki and 3.2-3.9 at 512 Ki (rows of 1 Ki, 2-core EPYC VM).
ROW_BLOCK = 1 << 18


@dataclass(frozen=True)
class ArrayStats:
    """Statistics of the finite elements of an array, and counts of the non-finite ones.

    ``m2`` is the sum of squared deviations from the mean (``var = m2 / count``). Two results
    combine exactly with :meth:`merge`, so statistics can be streamed over batches.

    Example:
        >>> a, b = array_stats(np.arange(4.0)), array_stats(np.arange(4.0, 10.0))
        >>> a.merge(b).mean, round(a.merge(b).var, 12)
        (4.5, 8.25)
    """

    count: int = 0
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    m2: float = 0.0

    @property
    def size(self) -> int:
        """All elements, finite or not."""
        return self.count + self.nan + self.posinf + self.neginf

    @property
    def nonfinite(self) -> int:
        return self.nan + self.posinf + self.neginf

    @property
    def var(self) -> float | None:
        return self.m2 / self.count if self.count else None

    @property
    def std(self) -> float | None:
        v = self.var
        return math.sqrt(max(v, 0.0)) if v is not None else None

    def merge(self, other: ArrayStats) -> ArrayStats:
        """Combine two disjoint parts (Chan, Golub and LeVeque's pairwise update)."""
        if not other.count:
            return ArrayStats(
                self.count,
                self.nan + other.nan,
                self.posinf + other.posinf,
                self.neginf + other.neginf,
                self.min,
                self.max,
                self.mean,
                self.m2,
            )
        if not self.count:
            return ArrayStats(
                other.count,
                self.nan + other.nan,
                self.posinf + other.posinf,
                self.neginf + other.neginf,
                other.min,
                other.max,
                other.mean,
                other.m2,
            )
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        return ArrayStats(
            n,
            self.nan + other.nan,
            self.posinf + other.posinf,
            self.neginf + other.neginf,
            min(self.min, other.min),
            max(self.max, other.max),
            mean,
            m2,
        )

    def to_dict(self) -> dict:
        """Plain numbers for the JSON report."""
        return {
            "count": self.size,
            "nan": self.nan,
            "posinf": self.posinf,
            "neginf": self.neginf,
            "min": self.min,
            "max": self.max,
            "mean": self.mean,
            "std": self.std,
        }


class RunningStats:
    """Statistics streamed over many arrays with bounded memory.

    Example:
        >>> r = RunningStats()
        >>> for batch in (np.ones(3), np.zeros(3)):
        ...     _ = r.update(batch)
        >>> r.result.mean, r.result.std
        (0.5, 0.5)
    """

    def __init__(self) -> None:
        self.result = ArrayStats()

    def update(self, array: np.ndarray, *, workers: int = 1) -> ArrayStats:
        part = array_stats(array, workers=workers)
        self.result = self.result.merge(part)
        return part


def array_stats(array: object, *, workers: int = 2, block: int = BLOCK) -> ArrayStats:
    """min, max, mean, std of the finite elements and NaN/±Inf counts, in one fused pass.

    Args:
        array: anything ``np.asarray`` accepts (float16/32/64, integers, bool; 0-d and empty).
        workers: threads to use for large arrays.
        block: elements per cache block.

    Example:
        >>> array_stats(np.float16(65504)).max, array_stats(np.array([], np.float32)).count
        (65504.0, 0)
    """
    a = np.asarray(array)
    if a.dtype.kind == "b":
        a = a.view(np.uint8)
    if a.dtype.kind == "c":
        a = np.abs(a)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"cannot compute statistics of dtype {a.dtype}")
    if a.size == 0:
        return ArrayStats()
    if not a.flags.c_contiguous:
        return _strided(a, workers, block)
    flat = a.reshape(-1)
    n_blocks = -(-flat.size // block)
    if workers <= 1 or flat.size < _MIN_PARALLEL or n_blocks < 2:
        return _run(flat, 0, n_blocks, block)
    # Threads pull chunks of blocks from a shared counter instead of owning a fixed half: on a
    # shared VM one core is often busy, and a static split would wait for the slower thread.
    # Chunk results are merged in chunk order, so the result does not depend on the timing.
    per_chunk = 8
    n_chunks = -(-n_blocks // per_chunk)
    results: list[ArrayStats | None] = [None] * n_chunks
    counter = itertools.count()

    def work() -> None:
        while (c := next(counter)) < n_chunks:
            results[c] = _run(flat, c * per_chunk, min(n_blocks, (c + 1) * per_chunk), block)

    threads = min(workers, n_chunks)
    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(work) for _ in range(threads)]:
            f.result()
    out = ArrayStats()
    for p in results:
        out = out.merge(p)  # type: ignore[arg-type]
    return out


@dataclass(frozen=True)
class RowStats:
    """:class:`ArrayStats` of many rows at once, as arrays of one shape (one entry per row).

    ``count``/``nan``/``posinf``/``neginf`` are int64, ``min``/``max``/``mean``/``m2`` float64; a
    row with no finite value has ``min`` +Inf, ``max`` -Inf, ``mean`` and ``m2`` 0.

    Example:
        >>> r = row_stats(np.array([[1.0, 3.0], [np.nan, 2.0]]))
        >>> r.count.tolist(), r.nan.tolist(), r.mean.tolist(), r.combine(0).item().mean
        ([2, 1], [0, 1], [2.0, 2.0], 2.0)
    """

    count: np.ndarray
    nan: np.ndarray
    posinf: np.ndarray
    neginf: np.ndarray
    min: np.ndarray
    max: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.count.shape

    def __reduce__(self):
        # One float64 array instead of eight (counts are exact below 2**53): a worker process
        # sends one image's statistics in a few hundred bytes and microseconds.
        return _rows_from, (np.stack([getattr(self, f).astype(np.float64) for f in _ROW_FIELDS]),)

    @property
    def nonfinite(self) -> np.ndarray:
        return self.nan + self.posinf + self.neginf

    def reshape(self, *shape: int) -> RowStats:
        return RowStats(*(getattr(self, f).reshape(*shape) for f in _ROW_FIELDS))

    def combine(self, axis: int) -> RowStats:
        """Merge the rows along ``axis`` (the exact pairwise-update formula, vectorized)."""
        n = self.count.sum(axis=axis)
        w = self.count.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, (w * self.mean).sum(axis=axis) / np.maximum(n, 1), 0.0)
            dev = self.mean - np.expand_dims(mean, axis)
            m2 = self.m2.sum(axis=axis) + (w * dev * dev).sum(axis=axis)
        return RowStats(
            n,
            self.nan.sum(axis=axis),
            self.posinf.sum(axis=axis),
            self.neginf.sum(axis=axis),
            self.min.min(axis=axis),
            self.max.max(axis=axis),
            mean,
            m2,
        )

    def items(self) -> list[ArrayStats]:
        """Every row as :class:`ArrayStats`, in C order (cheaper than numpy calls for a few rows)."""
        cols = [getattr(self, f).reshape(-1).tolist() for f in _ROW_FIELDS]
        return [
            ArrayStats(n, a, b, c, lo, hi, mean, m2) if n else ArrayStats(0, a, b, c)
            for n, a, b, c, lo, hi, mean, m2 in zip(*cols, strict=True)
        ]

    def item(self, *index: int) -> ArrayStats:
        """One row as :class:`ArrayStats`."""
        count = int(self.count[index])
        counts = (int(self.nan[index]), int(self.posinf[index]), int(self.neginf[index]))
        if not count:
            return ArrayStats(0, *counts)
        return ArrayStats(
            count,
            *counts,
            float(self.min[index]),
            float(self.max[index]),
            float(self.mean[index]),
            float(self.m2[index]),
        )


_ROW_FIELDS = ("count", "nan", "posinf", "neginf", "min", "max", "mean", "m2")


def _rows_from(stacked: np.ndarray) -> RowStats:
    ints = [stacked[i].astype(np.int64) for i in range(4)]
    return RowStats(*ints, *(stacked[i] for i in range(4, 8)))


def _numeric(array: object) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype.kind == "b":
        a = a.view(np.uint8)
    if a.dtype.kind == "c":
        a = np.abs(a)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"cannot compute statistics of dtype {a.dtype}")
    return a


def row_stats(
    array: object, *, workers: int = 2, block: int = ROW_BLOCK, pool: Executor | None = None
) -> RowStats:
    """:func:`array_stats` of every row (the last axis) of an array, in one fused pass.

    One read of memory gives the statistics of each row: per sample and per channel at once,
    so an audit gets per-channel means, per-sample NaN counts and constant samples without a
    second pass or a copy. Rows are reduced in cache-sized groups; an array that is not
    C-contiguous (a channels-last batch seen as ``(n, C, H*W)``) or not in the working dtype
    is copied one cached group at a time, never as a whole. Threads take groups from a shared
    counter; each row's result does not depend on which thread computed it (deterministic).

    Args:
        array: at least 2-D; rows are all indices but the last.
        workers: threads for large arrays.
        block: elements per cache block.
        pool: an executor with at least ``workers`` threads to run them on, for callers that
            reduce many chunks (starting two threads costs 1-3 ms on a busy 2-core VM).

    Example:
        >>> x = np.arange(12, dtype=np.float32).reshape(2, 2, 3)   # (sample, channel, pixel)
        >>> r = row_stats(x)
        >>> r.shape, r.mean.tolist(), r.combine(1).max.tolist()
        ((2, 2), [[1.0, 4.0], [7.0, 10.0]], [5.0, 11.0])
    """
    a = _numeric(array)
    if a.ndim < 2:
        raise ValueError(f"row_stats needs at least 2 dimensions, got shape {a.shape}")
    rows_shape = a.shape[:-1]
    n_rows = math.prod(rows_shape)
    length = a.shape[-1]
    out = _empty_rows(n_rows)
    if n_rows and length:
        if length > block:  # rows longer than a block: the whole-array kernel, row by row
            _long_rows(
                a.reshape(n_rows, length) if a.flags.c_contiguous else a, out, workers, block
            )
        else:
            _short_rows(a, out, workers, block, pool)
    return RowStats(*(v.reshape(rows_shape) for v in out))


def _empty_rows(n: int) -> list[np.ndarray]:
    z = np.zeros(n, np.int64)
    return [
        z,
        z.copy(),
        z.copy(),
        z.copy(),
        np.full(n, np.inf),
        np.full(n, -np.inf),
        np.zeros(n),
        np.zeros(n),
    ]


def _put(out: list[np.ndarray], i: int, s: ArrayStats) -> None:
    out[0][i], out[1][i], out[2][i], out[3][i] = s.count, s.nan, s.posinf, s.neginf
    if s.count:
        out[4][i], out[5][i], out[6][i], out[7][i] = s.min, s.max, s.mean, s.m2


def _long_rows(a: np.ndarray, out: list[np.ndarray], workers: int, block: int) -> None:
    flat = a.reshape(-1, a.shape[-1]) if a.flags.c_contiguous else None
    for i in range(out[0].size):
        row = flat[i] if flat is not None else a[np.unravel_index(i, a.shape[:-1])]
        _put(out, i, array_stats(row, workers=workers, block=block))


def _short_rows(
    a: np.ndarray, out: list[np.ndarray], workers: int, block: int, pool: Executor | None
) -> None:
    length = a.shape[-1]
    per_lead = math.prod(a.shape[1:-1])  # rows per index of the first axis
    work = _work_dtype(a.dtype)
    direct = a.flags.c_contiguous and a.dtype == work
    flat = a.reshape(-1, length) if direct else None
    # Groups are whole indices of the first axis, so a group of a strided view copies as one slice.
    lead_per_group = max(1, block // max(1, per_lead * length))
    n_lead = a.shape[0]
    n_groups = -(-n_lead // lead_per_group)
    rows_per_group = lead_per_group * per_lead
    counter = itertools.count()

    def work_loop() -> None:
        size = min(rows_per_group, per_lead * n_lead) * length
        d = np.empty(size, dtype=work)
        tmp = None if direct else np.empty(size, dtype=work)
        with np.errstate(over="ignore", invalid="ignore"):
            while (g := next(counter)) < n_groups:
                lo, hi = g * lead_per_group, min(n_lead, (g + 1) * lead_per_group)
                r0, r1 = lo * per_lead, hi * per_lead
                if direct:
                    b = flat[r0:r1]
                else:
                    part = a[lo:hi]
                    b = tmp[: part.size].reshape(part.shape)
                    np.copyto(b, part, casting="unsafe")
                    b = b.reshape(-1, length)
                _rows_block(b, d[: b.size].reshape(b.shape), out, r0)

    threads = min(workers, n_groups) if n_lead * per_lead * length >= _MIN_PARALLEL else 1
    if threads <= 1:
        work_loop()
        return
    if pool is not None:
        for f in [pool.submit(work_loop) for _ in range(threads)]:
            f.result()
        return
    with ThreadPoolExecutor(threads) as own:
        for f in [own.submit(work_loop) for _ in range(threads)]:
            f.result()


def _rows_block(b: np.ndarray, d: np.ndarray, out: list[np.ndarray], r0: int) -> None:
    """Rows ``r0 ..`` of the result from one cached group ``b`` (rows x length): the fast path
    of :func:`_fast`, vectorized over rows; rows with NaN/Inf or overflowing sums go one by one.

    Few small numpy calls per group: at 128 rows of 1 Ki, each call's ~1 us overhead is 1% of
    the group's work, and the GIL is held only during those overheads."""
    r, length = b.shape
    s = b.sum(axis=1)
    m = s / length
    np.subtract(b, m[:, None], out=d)
    q = np.einsum("ij,ij->i", d, d)
    sl = slice(r0, r0 + r)
    out[0][sl] = length
    out[4][sl] = b.min(axis=1)
    out[5][sl] = b.max(axis=1)
    out[6][sl] = m
    out[7][sl] = q
    # The same shortcut as _fast: the pivot's error matters only when the spread is tiny.
    near = np.flatnonzero(q < (1e-4 * length) * (m * m))
    if near.size:
        c = d[near].sum(axis=1, dtype=np.float64)
        i = near + r0
        out[6][i] += c / length
        out[7][i] = np.maximum(out[7][i] - c * c / length, 0.0)
    if math.isfinite(float(s.sum(dtype=np.float64)) + float(q.sum(dtype=np.float64))):
        return  # no NaN/Inf and no overflow in any row
    bad = np.flatnonzero(~(np.isfinite(s) & np.isfinite(q)))
    for k in bad.tolist():
        part, nan, pos, neg = _slow(b[k], d[k])
        count, lo, hi, mean, m2 = part
        i = r0 + k
        out[0][i], out[1][i], out[2][i], out[3][i] = count, nan, pos, neg
        if count:
            out[4][i], out[5][i], out[6][i], out[7][i] = lo, hi, mean, m2
        else:
            out[4][i], out[5][i], out[6][i], out[7][i] = np.inf, -np.inf, 0.0, 0.0


def _strided(a: np.ndarray, workers: int, block: int) -> ArrayStats:
    # Copy bounded slices to contiguous memory instead of copying the whole array.
    if a.ndim == 1:
        chunks = (a[i : i + block * 8] for i in range(0, a.shape[0], block * 8))
    else:
        row = max(1, a[0].size)
        step = max(1, (block * 8) // row)
        chunks = (a[i : i + step] for i in range(0, a.shape[0], step))
    out = ArrayStats()
    for c in chunks:
        out = out.merge(array_stats(np.ascontiguousarray(c), workers=workers, block=block))
    return out


def _work_dtype(dtype: np.dtype) -> np.dtype:
    # 8-bit integers (images, masks, bool) are exact in float32 and their block sums stay far
    # from float32's range; float32 work is 5x faster than float64 for them (measured: 230 vs
    # 1245 us for a 256x256x3 image), with a sum of squares within ~2e-5 of the exact one.
    # Wider integers go through float64, where every value up to 2**53 is exact.
    if dtype == np.float64 or (dtype.kind in "iu" and dtype.itemsize > 1) or dtype.itemsize > 8:
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def _run(flat: np.ndarray, first: int, last: int, block: int) -> ArrayStats:
    """Blocks ``first..last-1`` of ``flat``, each reduced while it sits in the cache."""
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is detected, not warned
        return _run_blocks(flat, first, last, block)


def _run_blocks(flat: np.ndarray, first: int, last: int, block: int) -> ArrayStats:
    work = _work_dtype(flat.dtype)
    convert = flat.dtype != work
    size = min(block, flat.size)  # a small array gets small buffers (no page faults for 1 MiB)
    buf = np.empty(size, dtype=work)
    tmp = np.empty(size, dtype=work) if convert else None
    n_total = 0
    mean_total = 0.0
    m2_total = 0.0
    lo = math.inf
    hi = -math.inf
    nan = posinf = neginf = 0
    for i in range(first, last):
        raw = flat[i * block : (i + 1) * block]
        n = raw.size
        if convert:
            b = tmp[:n]
            np.copyto(b, raw, casting="unsafe")
        else:
            b = raw
        part = _fast(b, buf)
        if part is None:  # NaN/Inf in the block, or finite values whose sums overflow
            part, k_nan, k_pos, k_neg = _slow(b, buf)
            nan += k_nan
            posinf += k_pos
            neginf += k_neg
        count, bmin, bmax, bmean, bm2 = part
        if not count:
            continue
        lo, hi = min(lo, bmin), max(hi, bmax)
        if not n_total:
            n_total, mean_total, m2_total = count, bmean, bm2
            continue
        total = n_total + count
        delta = bmean - mean_total
        mean_total += delta * (count / total)
        m2_total += bm2 + delta * delta * (n_total * count / total)
        n_total = total
    if not n_total:
        return ArrayStats(0, nan, posinf, neginf)
    return ArrayStats(n_total, nan, posinf, neginf, lo, hi, mean_total, m2_total)


_Part = tuple[int, float, float, float, float]  # count, min, max, mean, M2


def _fast(b: np.ndarray, buf: np.ndarray) -> _Part | None:
    """One cached block with no NaN/Inf: sum, pivot, sum of squares, min, max. None otherwise."""
    n = b.size
    s = b.sum()
    if not math.isfinite(s):  # a NaN makes the sum NaN, an Inf makes it Inf or NaN
        return None
    m = s / n  # block mean in the working dtype, the pivot of the second pass
    d = buf[:n]
    np.subtract(b, m, out=d)
    q = float(np.einsum("i,i->", d, d))
    mf = float(m)
    # c = sum(d) corrects for the pivot m not being the exact mean. m comes from a pairwise
    # float sum, so |mean - m| <= ~1e-6 rms(x) = 1e-6 sqrt(var + m^2); when the spread is not
    # tiny next to the mean (var >= 1e-4 m^2) that is <= 1e-4 std, and dropping c changes M2
    # by < 1e-8 relative: skip the pass.
    c = 0.0 if q >= 1e-4 * n * mf * mf else float(d.sum())
    if not (math.isfinite(q) and math.isfinite(c)):  # finite values whose squares overflow
        return None
    return n, float(b.min()), float(b.max()), mf + c / n, max(q - c * c / n, 0.0)


def _slow(b: np.ndarray, buf: np.ndarray) -> tuple[_Part, int, int, int]:
    """A block with NaN/Inf (or overflowing sums): count them, then reduce the finite values."""
    finite = np.isfinite(b)
    f = b[finite]
    k_nan = int(np.count_nonzero(np.isnan(b))) if f.size < b.size else 0
    k_pos = int(np.count_nonzero(b == np.inf)) if f.size < b.size else 0
    k_neg = int(b.size - f.size - k_nan - k_pos)
    if not f.size:
        return (0, 0.0, 0.0, 0.0, 0.0), k_nan, k_pos, k_neg
    part = _fast(f, buf) if f.size < b.size else None  # only the masked values: usually fast again
    return (part or _exact64(f)), k_nan, k_pos, k_neg


def _exact64(f: np.ndarray) -> _Part:
    """Finite values whose sums overflow the working dtype: float64, scaled if even that overflows."""
    f = f.astype(np.float64)
    mean = float(f.mean())
    if not math.isfinite(mean):  # float64 sum overflow: scale down, exact in binary
        scale = float(np.abs(f).max())
        g = f / scale
        gm = float(g.mean())
        mean = gm * scale
        m2 = float(np.square(g - gm).sum()) * scale * scale
    else:
        m2 = float(np.square(f - mean).sum())
        if not math.isfinite(m2):
            scale = float(np.abs(f).max())
            m2 = float(np.square((f - mean) / scale).sum()) * scale * scale
    return int(f.size), float(f.min()), float(f.max()), mean, m2


def reference_stats(array: object) -> ArrayStats:
    """The slow, obvious numpy computation that :func:`array_stats` must agree with.

    Example:
        >>> reference_stats(np.array([np.nan, -np.inf, 2.0])).neginf
        1
    """
    a = np.asarray(array)
    if a.dtype.kind == "b":
        a = a.astype(np.uint8)
    a = a.astype(np.float64).reshape(-1)
    f = a[np.isfinite(a)]
    nan, pos, neg = int(np.isnan(a).sum()), int(np.isposinf(a).sum()), int(np.isneginf(a).sum())
    if not f.size:
        return ArrayStats(0, nan, pos, neg)
    return ArrayStats(
        int(f.size),
        nan,
        pos,
        neg,
        float(f.min()),
        float(f.max()),
        float(f.mean()),
        float(f.var() * f.size),
    )
