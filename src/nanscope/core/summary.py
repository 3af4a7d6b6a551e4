"""Numeric summaries of arrays: the numbers that evidence lines quote.

Framework adapters convert a tensor to a numpy array (bfloat16 through float32) and pass the
original dtype name, so every front end describes tensors the same way. Only used to explain
a failure or in audits, never on the healthy training path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from nanscope.core.diagnosis import samples_text
from nanscope.core.limits import dtype_name


@dataclass(frozen=True)
class TensorSummary:
    """What a person wants to know about a tensor that may hold NaN/Inf."""

    shape: tuple[int, ...]
    dtype: str
    numel: int
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    zeros: int = 0
    negatives: int = 0
    min: float | None = None  # over finite values
    max: float | None = None
    absmax: float | None = None
    absmin_nonzero: float | None = None
    mean: float | None = None
    std: float | None = None

    @property
    def nonfinite(self) -> int:
        return self.nan + self.posinf + self.neginf

    @property
    def finite(self) -> bool:
        return self.nonfinite == 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    def describe(self) -> str:
        """One line: ``float32[4, 10]: 3 NaN, min -1.2, max 4.0, 2 zeros``.

        >>> summarize(np.array([0.0, 1.0, np.nan])).describe()
        'float64[3]: 1 NaN of 3, min 0, max 1, 1 zero'
        """
        parts = []
        bad = [(self.nan, "NaN"), (self.posinf, "+Inf"), (self.neginf, "-Inf")]
        bad_text = ", ".join(f"{n} {w}" for n, w in bad if n)
        if bad_text:
            parts.append(f"{bad_text} of {self.numel}")
        if self.min is not None:
            parts.append(f"min {fmt(self.min)}, max {fmt(self.max)}")
        if self.zeros:
            parts.append(f"{self.zeros} zero{'s' if self.zeros != 1 else ''}")
        if (
            self.negatives
            and self.min is not None
            and self.min < 0
            and not parts[-1].startswith("min")
        ):
            parts.append(f"{self.negatives} negative")
        shape = ", ".join(str(s) for s in self.shape)
        return f"{self.dtype}[{shape}]: " + (", ".join(parts) if parts else "empty")


def fmt(x: float | None) -> str:
    """Short, exact-enough number formatting for evidence lines.

    >>> fmt(0.0), fmt(65504.0), fmt(1e-08), fmt(3.14159265)
    ('0', '65504', '1e-08', '3.142')
    """
    if x is None:
        return "n/a"
    if x != x:
        return "NaN"
    if x in (float("inf"), float("-inf")):
        return "+Inf" if x > 0 else "-Inf"
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.4g}"


def summarize(array: np.ndarray, dtype: object | None = None) -> TensorSummary:
    """Summarize an array; ``dtype`` names the framework dtype when the array was upcast.

    >>> s = summarize(np.array([[1.0, np.inf], [0.0, -2.0]], dtype=np.float32))
    >>> s.posinf, s.zeros, s.negatives, s.min, s.max
    (1, 1, 1, -2.0, 1.0)
    """
    a = np.asarray(array)
    name = dtype_name(dtype if dtype is not None else a.dtype)
    numel = int(a.size)
    if numel == 0:
        return TensorSummary(tuple(a.shape), name, 0)
    if a.dtype.kind not in "fc":
        if a.dtype.kind == "b":
            a = a.astype(np.int8)
        flat = a.reshape(-1)
        return TensorSummary(
            tuple(a.shape),
            name,
            numel,
            zeros=int(np.count_nonzero(flat == 0)),
            negatives=int(np.count_nonzero(flat < 0)),
            min=float(flat.min()),
            max=float(flat.max()),
            absmax=float(np.abs(flat).max()),
            mean=float(flat.mean()),
            std=float(flat.std()),
        )
    flat = a.reshape(-1)
    if flat.dtype.kind == "c":
        flat = np.abs(flat)
    nan_mask = np.isnan(flat)
    posinf = int(np.count_nonzero(np.isposinf(flat)))
    neginf = int(np.count_nonzero(np.isneginf(flat)))
    finite = flat[np.isfinite(flat)]
    kw: dict = {}
    if finite.size:
        f64 = finite.astype(np.float64)
        absf = np.abs(f64)
        nz = absf[absf > 0]
        kw = dict(
            min=float(f64.min()),
            max=float(f64.max()),
            absmax=float(absf.max()),
            absmin_nonzero=float(nz.min()) if nz.size else None,
            mean=float(f64.mean()),
            std=float(f64.std()),
        )
    return TensorSummary(
        tuple(a.shape),
        name,
        numel,
        nan=int(np.count_nonzero(nan_mask)),
        posinf=posinf,
        neginf=neginf,
        zeros=int(np.count_nonzero(finite == 0)),
        negatives=int(np.count_nonzero(finite < 0)),
        **kw,
    )


def bad_rows(array: np.ndarray, axis: int = 0) -> list[int]:
    """Indices along ``axis`` (the batch) of the slices that hold any NaN/Inf.

    >>> bad_rows(np.array([[1.0, 2.0], [np.nan, 0.0], [3.0, np.inf]]))
    [1, 2]
    """
    a = np.asarray(array)
    if a.ndim == 0 or a.dtype.kind not in "fc":
        return []
    bad = ~np.isfinite(a)
    other = tuple(i for i in range(a.ndim) if i != axis % a.ndim)
    return [int(i) for i in np.flatnonzero(bad.any(axis=other) if other else bad)]


def batch_rows(array: np.ndarray, batch_size: int | None) -> tuple[list[int], list[int]]:
    """(batch rows, positions) of the NaN/Inf in ``array``, following the batch dimension.

    With ``batch_size`` unknown, dim 0 is taken as the batch. Otherwise: dim 0 the batch
    itself; dim 0 a multiple of it (tokens flattened batch-major ``(B*T, C)``, attention heads
    folded in ``(B*H, T, T)``): row ``i`` belongs to sample ``i // k`` and ``i % k`` is its
    position; dim 1 the batch (sequence-first ``(T, B, C)``). A first dim shorter than the
    batch means the guess was off (the model's first input is sequence-first): dim 0 then.
    Anything else (a statistic over the batch) belongs to no sample, except in a batch of one.

    >>> a = np.zeros((8, 3)); a[5, 1] = np.nan      # 2 samples x 4 tokens, flattened
    >>> batch_rows(a, 2)
    ([1], [1])
    >>> batch_rows(np.array([np.nan, 1.0]), 1), batch_rows(np.array([np.nan, 1.0]), 4)
    (([0], []), ([0], []))
    """
    a = np.asarray(array)
    if a.ndim == 0 or a.dtype.kind not in "fc":
        return [], []
    if (
        batch_size
        and a.shape[0] != batch_size
        and batch_size > 1
        and a.ndim > 1
        and a.shape[1] == batch_size
        and not (a.shape[0] > batch_size and a.shape[0] % batch_size == 0)
    ):
        return bad_rows(a, axis=1), []
    return rows_to_samples(bad_rows(a), a.shape[0], batch_size)


def rows_to_samples(
    rows: list[int], n0: int, batch_size: int | None
) -> tuple[list[int], list[int]]:
    """Rows of a tensor's dim 0 (of size ``n0``) as (samples of the batch, positions): see
    ``batch_rows``.

    >>> rows_to_samples([4, 5, 6, 7], 16, 4)   # batch 4 x 4 heads folded in: sample 1
    ([1], [0, 1, 2, 3])
    """
    if not batch_size or n0 == batch_size:
        return list(rows), []
    if batch_size == 1:
        return ([0] if rows else []), []
    if n0 > batch_size and n0 % batch_size == 0:
        k = n0 // batch_size
        return sorted({r // k for r in rows}), sorted({r % k for r in rows})[:64]
    if n0 < batch_size:  # the guess was off (a sequence-first input): per-row values, dim 0
        return list(rows), []
    return [], []


@dataclass(frozen=True)
class Concat:
    """How a tensor's dim 0 is laid out when it is several batches concatenated: the halves of
    a siamese pair (``torch.cat([anchor, positive])``), two views of a contrastive batch
    (``torch.cat([z1, z2])``), or ``torch.stack`` of them.

    ``parts`` tensors of ``size`` rows each were concatenated ``by`` (``torch.cat``) at
    ``where``; row ``r`` of this tensor is row ``offset + r`` of the concatenation (a slice of
    it starts further on). ``stacked``: dim 0 is the part and dim 1 the row (``torch.stack``).
    """

    size: int
    parts: int
    rows: int  # this tensor's dim 0
    offset: int = 0
    by: str = "torch.cat"
    where: str | None = None
    stacked: bool = False


def concat_samples(
    rows: list[int], n0: int, concat: Concat
) -> tuple[list[int], list[int], dict[int, list[int]]]:
    """Rows of dim 0 (of size ``n0``) of a concatenated tensor as (samples, positions, the
    samples of each part): a row belongs to sample ``row % size`` of part ``row // size``.
    Heads or tokens folded into dim 0 after the concatenation (``n0`` a multiple of its rows)
    are followed as ``rows_to_samples`` does. For a ``stacked`` layout, pass the rows of the
    concatenation (``part * size + row``) and ``n0 = parts * size``.

    >>> pair = Concat(size=4, parts=2, rows=8)            # torch.cat([anchor, positive]), 4 each
    >>> concat_samples([6], 8, pair)
    ([2], [], {1: [2]})
    >>> concat_samples([13], 16, pair)                    # 2 heads folded in: row 13 is row 6
    ([2], [1], {1: [2]})
    >>> concat_samples([1], 4, Concat(size=4, parts=2, rows=4, offset=4))   # emb[4:]
    ([1], [], {1: [1]})
    """
    if concat.stacked or n0 == concat.rows:
        cat_rows, positions = list(rows), []
    else:
        cat_rows, positions = rows_to_samples(rows, n0, concat.rows)
    by_part: dict[int, set[int]] = {}
    for r in cat_rows:
        c = r + (0 if concat.stacked else concat.offset)
        by_part.setdefault(c // concat.size, set()).add(c % concat.size)
    samples = sorted(set().union(*by_part.values())) if by_part else []
    return samples, positions, {p: sorted(s) for p, s in sorted(by_part.items())}


_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")


def concat_text(by_part: dict[int, list[int]], concat: Concat) -> str:
    """The evidence line that says which concatenated batch the bad rows came from.

    >>> text = concat_text({1: [2]}, Concat(size=4, parts=2, rows=8, where="train.py:40"))
    >>> text.startswith("rows concatenated by torch.cat at train.py:40 (2 tensors of 4 rows)")
    True
    >>> text.split("): ")[1]
    'sample 2 of the second tensor of the pair'
    """
    whose = "of the pair" if concat.parts == 2 else f"of the {concat.parts}"
    said = [
        f"sample{'s' if len(s) > 1 else ''} {samples_text(s)} of the "
        f"{_ORDINALS[p] if p < len(_ORDINALS) else f'#{p + 1}'} tensor {whose}"
        for p, s in by_part.items()
    ]
    where = f" at {concat.where}" if concat.where else ""
    return (
        f"rows concatenated by {concat.by}{where} ({concat.parts} tensors of "
        f"{concat.size} rows): " + "; ".join(said)
    )
