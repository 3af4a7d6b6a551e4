"""``nanscope.data.audit``: find the samples that will make training non-finite, before training.

Design constraints:
    - Streams: every batch is reduced into small accumulators (fused statistics from
      ``nanscope.core.stats``, class histograms, capped lists of bad samples) and dropped, so
      memory stays bounded whatever the dataset size.
    - The fast path is one fused statistics pass per batch; per-sample work (which rows hold
      NaN, which are constant) reads the batch again only where it is needed.
    - Decisions are made by ``nanscope.data.rules`` from the accumulated numbers.
    - Imports no framework: a torch or TensorFlow dataset is recognized through ``sys.modules``.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from nanscope.core.diagnosis import AuditReport
from nanscope.core.errors import BadInputError
from nanscope.core.limits import dtype_name
from nanscope.core.stats import ArrayStats, array_stats
from nanscope.core.summary import fmt
from nanscope.data import readers
from nanscope.data.rules import Hits, input_findings, target_findings
from nanscope.data.samples import LabelCounts, SampleStats, batch_stats, channel_axis

_HIST_CAP = 1 << 16  # without num_classes, labels above this are counted apart, not binned


def audit(
    source: object,
    *,
    num_classes: int | None = None,
    ignore_index: int | None = None,
    masks: str | os.PathLike | None = None,
    workers: int = 1,
    progress: bool | None = None,
) -> AuditReport:
    """Audit a dataset: NaN/Inf inputs, bad labels and masks, constant samples, statistics.

    Args:
        source: a folder of images (optionally with a matching mask folder, or ``images/`` and
            ``masks/`` subfolders, or one subfolder per class), a ``.npy``/``.npz``/``.h5``
            file, numpy arrays (``x``, ``(x, y)``, a dict), a torch ``Dataset``/``DataLoader`` or
            a ``tf.data.Dataset``.
        num_classes: labels must lie in ``[0, num_classes)``; enables the unused-class check.
        ignore_index: the label that marks pixels/samples the loss skips (255, -100).
        masks: the mask folder matching an image folder, when it is not a subfolder.
        workers: threads for decoding images and for the statistics.
        progress: show a progress bar on stderr; default: only when stderr is a terminal.

    Returns:
        An ``AuditReport``: ``findings`` (errors first in ``str()``), ``stats`` per input and
        target, ``exit_code`` 1 when an error was found.

    Example:
        >>> import numpy as np
        >>> x = np.ones((4, 3), np.float32); x[2, 1] = np.nan
        >>> r = audit((x, np.array([0, 1, 5, 1])), num_classes=3)
        >>> [(f.category.value, f.samples) for f in r.findings]
        [('nonfinite_input', [2]), ('invalid_target', [2]), ('invalid_target', [])]
    """
    if isinstance(source, str | os.PathLike):
        src = readers.open_source(source, masks=masks, workers=workers, summarize=True)
        title = f"data {Path(source).name or source}"
    else:
        src = readers.from_object(source)
        title = f"data ({type(source).__name__})"
    if progress is None:
        progress = sys.stderr.isatty()
    state = _Audits(num_classes, ignore_index)
    bar = _Progress(src.total, src.unit, enabled=bool(progress))
    try:
        fs = src.files
        if (
            fs is not None
            and workers > 1
            and len(fs.files) > 2 * readers.PROCESS_TASK
            and readers.can_fork()
        ):
            _audit_in_processes(fs, state, workers, bar)
        elif workers > 1 and fs is None:
            # one pool for the whole stream: threads started once, not twice per chunk
            with ThreadPoolExecutor(workers) as pool:
                state.pool = pool
                for batch in src.batches:
                    state.add(batch, workers)
                    bar.update(state.seen)
            state.pool = None
        else:
            for batch in src.batches:
                state.add(batch, workers)
                bar.update(state.seen)
    finally:
        bar.close()
        src.close()
    inputs, targets, seen = state.inputs, state.targets, state.seen
    fw = src.framework
    findings = []
    for a in inputs.values():
        findings += input_findings(
            a.name,
            a.stats,
            a.dtype or "float32",
            nonfinite=a.nonfinite,
            constant=a.constant,
            framework=fw,
        )
    for t in targets.values():
        findings += target_findings(
            t.name,
            nonfinite=t.nonfinite,
            out_of_range=t.out_of_range,
            all_ignored=t.all_ignored,
            bad_soft=t.bad_soft,
            histogram=t.histogram(),
            num_classes=num_classes,
            ignore_index=ignore_index,
            bad_values=t.bad_values,
            framework=fw,
        )
    stats = {
        "source": src.kind,
        "samples": seen,
        "inputs": {a.name: a.to_dict() for a in inputs.values()},
        "targets": {t.name: t.to_dict() for t in targets.values()},
    }
    return AuditReport(findings, stats, framework=fw, title=title)


audit_data = audit  # the top-level name: ``nanscope.audit_data(...)``


class _Audits:
    """Everything an audit accumulates, per input and target name; mergeable in sample order."""

    def __init__(self, num_classes: int | None, ignore_index: int | None) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.inputs: dict[str, _InputAudit] = {}
        self.targets: dict[str, _TargetAudit] = {}
        self.seen = 0
        self.pool: ThreadPoolExecutor | None = None  # threads for the statistics, while streaming

    def __getstate__(self) -> dict:  # sent to worker processes: never with a thread pool
        return {**self.__dict__, "pool": None}

    def add(self, batch: readers.Batch, workers: int) -> None:
        for k, x in batch.inputs.items():
            self.inputs.setdefault(k, _InputAudit(k)).update(
                x, batch.start, batch.names, workers, self.pool
            )
        for k, y in batch.targets.items():
            self.targets.setdefault(k, _TargetAudit(k, self.num_classes, self.ignore_index)).update(
                y, batch.start, batch.target_names or batch.names
            )
        self.seen = max(self.seen, batch.start + len(batch))

    def blank(self) -> _Audits:
        """The same decisions (dtype, sample shape, channel axis, target kind), nothing counted."""
        out = _Audits(self.num_classes, self.ignore_index)
        out.inputs = {k: a.blank() for k, a in self.inputs.items()}
        out.targets = {k: t.blank() for k, t in self.targets.items()}
        return out

    def merge(self, later: _Audits) -> bool:
        """Add the audit of later samples; False (and nothing changed) if the two decided
        differently about a name the template did not know (the caller re-audits that part)."""
        pairs = [(self.inputs, k, a) for k, a in later.inputs.items()] + [
            (self.targets, k, t) for k, t in later.targets.items()
        ]
        if any(k in mine and not mine[k].same_decisions(theirs) for mine, k, theirs in pairs):
            return False
        for mine, k, theirs in pairs:
            if k in mine:
                mine[k].merge(theirs)
            else:
                mine[k] = theirs
        self.seen = max(self.seen, later.seen)
        return True


def _audit_part(
    files: readers.FolderFiles, start: int, template: _Audits
) -> _Audits | tuple[str, str | None]:
    """In a worker process: decode and audit a range of files (one at a time: memory is one image)."""
    for i in range(len(files.files)):
        try:
            b = files.load(i)
        except BadInputError as err:  # sent back as text: the first bad file stops the audit
            return str(err), getattr(err, "path", None)
        b.start += start
        template.add(b, workers=1)
    return template


def _audit_in_processes(
    fs: readers.FolderFiles, state: _Audits, workers: int, bar: _Progress
) -> None:
    """Ranges of files audited in forked worker processes, merged here in file order.

    What comes back from a range is its audit (statistics, capped sample lists, histograms),
    never its pixels; at most two ranges per worker are in flight, so memory stays bounded.
    The first file is audited here first, so that it makes every decision (dtype, sample shape,
    channel axis, target kind) as it does with one worker; the first bad file is the first
    reported, as with one worker.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    state.add(fs.load(0), workers=1)
    template = state.blank()
    n, task = len(fs.files), readers.PROCESS_TASK
    gc.freeze()  # the children's collector leaves the inherited objects alone: fewer copied pages
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    pending: deque = deque()
    nxt = done = 1
    try:
        while pending or nxt < n:
            try:
                while nxt < n and len(pending) < 2 * workers:
                    hi = min(n, nxt + task)
                    pending.append(
                        (nxt, hi, pool.submit(_audit_part, fs.part(nxt, hi), nxt, template))
                    )
                    nxt = hi
                lo, hi, future = pending.popleft()
                got = future.result()
            except (
                BrokenProcessPool
            ):  # a decoder crashed its process (a native bug, a hostile file)
                raise BadInputError(
                    f"a worker process died while decoding the files from {readers.rel_name(fs, done)!r} on; "
                    "re-run with --workers 1 to name the file"
                ) from None
            if isinstance(got, tuple):
                raise BadInputError(got[0], path=got[1])
            if not state.merge(got):  # decided differently about a name the first file lacked
                part = fs.part(lo, hi)
                for i in range(hi - lo):
                    b = part.load(i)
                    b.start += lo
                    state.add(b, workers=1)
            done = hi
            bar.update(state.seen)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        gc.unfreeze()


class _Progress:
    """``nanscope data: 120/5000 files`` on stderr, redrawn at most 5 times a second."""

    def __init__(self, total: int | None, unit: str, *, enabled: bool) -> None:
        self.total, self.unit, self.enabled, self.last, self.drawn = (
            total,
            unit,
            enabled,
            0.0,
            False,
        )

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 0.2:
            return
        self.last, self.drawn = now, True
        of = f"/{self.total}" if self.total else ""
        sys.stderr.write(f"\rnanscope data: {done}{of} {self.unit}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")


def _label(start: int, i: int, names: list[str] | None) -> str:
    return names[i] if names and i < len(names) else f"sample {start + i}"


class _InputAudit:
    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype: str | None = None
        self.sample_shape: tuple[int, ...] | None = None
        self.shapes_vary = False
        self.stats = ArrayStats()
        self.channel_axis: int | None = None
        self.channels: list[ArrayStats] | None = None
        self.nonfinite, self.constant = Hits(), Hits()

    def update(
        self,
        x: np.ndarray | SampleStats,
        start: int,
        names: list[str] | None,
        workers: int,
        pool: ThreadPoolExecutor | None = None,
    ) -> None:
        summary = x if isinstance(x, SampleStats) else None
        if summary is None:
            x = np.asarray(x)
            if x.dtype.kind == "b":
                x = x.view(np.uint8)
            if x.dtype.kind not in "fiu" or x.ndim == 0:
                return
        n, sample_shape = x.shape[0], tuple(x.shape[1:])
        if self.dtype is None:
            self.dtype, self.sample_shape = dtype_name(x.dtype), sample_shape
            self.channel_axis = channel_axis(self.sample_shape)
        elif sample_shape != self.sample_shape:
            self.shapes_vary = True
        per_sample = math.prod(sample_shape)
        if not n or not per_sample:
            return
        ax = self.channel_axis
        by_channel = (
            ax is not None
            and len(sample_shape) == len(self.sample_shape or ())
            and sample_shape[ax] == (self.sample_shape or ())[ax]
        )
        check_constant = per_sample >= 16 or x.ndim >= 3
        if summary is None and not (by_channel or check_constant):
            # few values per sample (tabular rows): the whole-batch kernel, rows only when needed
            self._update_flat(x, start, names, workers)
            return
        if summary is None:
            summary = batch_stats(x, ax if by_channel else None, workers=workers, pool=pool)
        rows = summary.rows  # (n, channels): one fused pass gave every number below
        split = by_channel and summary.channel_axis == ax
        if n == 1:  # one image: a few numbers, merged in Python (numpy calls cost more here)
            per = rows.items()
            part = ArrayStats()
            for c in per:
                part = part.merge(c)
            if split:
                self._merge_channels(per)
            self.stats = self.stats.merge(part)
            if part.nonfinite:
                self.nonfinite.add(
                    start,
                    names[0] if names else None,
                    f"{_label(start, 0, names)}: {part.nonfinite} non-finite of {per_sample}",
                )
            if check_constant and part.count and not part.nonfinite and part.min == part.max:
                self.constant.add(
                    start,
                    names[0] if names else None,
                    f"{_label(start, 0, names)}: every value is {fmt(part.min)}",
                )
            return
        if split:
            per = rows.combine(0).items()
            self._merge_channels(per)
            part = ArrayStats()
            for c in per:  # the batch is the merge of its channels, in channel order
                part = part.merge(c)
        else:
            part = rows.combine(1).combine(0).item()
        self.stats = self.stats.merge(part)
        sample = rows.combine(1)
        if part.nonfinite:
            bad = sample.nonfinite
            for i in np.flatnonzero(bad).tolist():
                self.nonfinite.add(
                    start + i,
                    names[i] if names else None,
                    f"{_label(start, i, names)}: {bad[i]} non-finite of {per_sample}",
                )
        if check_constant:
            # min == max over the finite values of a sample with no NaN/Inf: every value is the same
            same = (sample.nonfinite == 0) & (sample.count > 0) & (sample.min == sample.max)
            for i in np.flatnonzero(same).tolist():
                self.constant.add(
                    start + i,
                    names[i] if names else None,
                    f"{_label(start, i, names)}: every value is {fmt(float(sample.min[i]))}",
                )

    def blank(self) -> _InputAudit:
        out = _InputAudit(self.name)
        out.dtype, out.sample_shape, out.channel_axis = (
            self.dtype,
            self.sample_shape,
            self.channel_axis,
        )
        return out

    def same_decisions(self, other: _InputAudit) -> bool:
        return other.dtype is None or (self.dtype, self.sample_shape, self.channel_axis) == (
            other.dtype,
            other.sample_shape,
            other.channel_axis,
        )

    def merge(self, later: _InputAudit) -> None:
        if self.dtype is None:
            self.dtype, self.sample_shape, self.channel_axis = (
                later.dtype,
                later.sample_shape,
                later.channel_axis,
            )
        self.shapes_vary |= later.shapes_vary
        self.stats = self.stats.merge(later.stats)
        if later.channels is not None:
            self._merge_channels(later.channels)
        self.nonfinite.merge(later.nonfinite)
        self.constant.merge(later.constant)

    def _merge_channels(self, per: list[ArrayStats]) -> None:
        self.channels = (
            per
            if self.channels is None
            else [a.merge(b) for a, b in zip(self.channels, per, strict=True)]
        )

    def _update_flat(
        self, x: np.ndarray, start: int, names: list[str] | None, workers: int
    ) -> None:
        part = array_stats(x, workers=workers)
        self.stats = self.stats.merge(part)
        if part.nonfinite:
            flat = x.reshape(x.shape[0], -1)
            bad = np.count_nonzero(~np.isfinite(flat), axis=1)
            for i in np.flatnonzero(bad):
                self.nonfinite.add(
                    start + i,
                    names[i] if names else None,
                    f"{_label(start, i, names)}: {bad[i]} non-finite of {flat.shape[1]}",
                )

    def to_dict(self) -> dict:
        d: dict = {
            "dtype": self.dtype,
            "sample_shape": list(self.sample_shape or ()) if not self.shapes_vary else "varies",
        }
        d.update(self.stats.to_dict())
        d["nonfinite_samples"] = self.nonfinite.count
        d["constant_samples"] = self.constant.count
        if self.channels:
            d["channel_mean"] = [c.mean for c in self.channels]
            d["channel_std"] = [c.std for c in self.channels]
            if self.dtype == "uint8":  # the numbers transforms.Normalize wants after ToTensor()
                d["channel_mean_01"] = [
                    round(c.mean / 255, 4) if c.mean is not None else None for c in self.channels
                ]
                d["channel_std_01"] = [
                    round(c.std / 255, 4) if c.std is not None else None for c in self.channels
                ]
        return d


class _TargetAudit:
    def __init__(self, name: str, num_classes: int | None, ignore_index: int | None) -> None:
        self.name, self.num_classes, self.ignore_index = name, num_classes, ignore_index
        self.kind: str | None = None  # "classes", "soft" or "values"
        self.dtype: str | None = None
        self.stats = ArrayStats()
        self.hist = np.zeros(num_classes or 0, dtype=np.int64)
        self.above_cap = 0
        self.valid = self.ignored = 0
        self.bad_values: dict[int, int] = {}
        self.nonfinite, self.out_of_range, self.all_ignored, self.bad_soft = (
            Hits(),
            Hits(),
            Hits(),
            Hits(),
        )

    def blank(self) -> _TargetAudit:
        out = _TargetAudit(self.name, self.num_classes, self.ignore_index)
        out.kind, out.dtype = self.kind, self.dtype
        return out

    def same_decisions(self, other: _TargetAudit) -> bool:
        return other.kind is None or (self.kind, self.dtype) == (other.kind, other.dtype)

    def merge(self, later: _TargetAudit) -> None:
        if self.kind is None:
            self.kind, self.dtype = later.kind, later.dtype
        self.stats = self.stats.merge(later.stats)
        if later.hist.size > self.hist.size:
            self.hist = np.concatenate(
                [self.hist, np.zeros(later.hist.size - self.hist.size, np.int64)]
            )
        self.hist[: later.hist.size] += later.hist
        self.above_cap += later.above_cap
        self.valid += later.valid
        self.ignored += later.ignored
        for v, c in later.bad_values.items():
            self.bad_values[v] = self.bad_values.get(v, 0) + c
        for mine, theirs in (
            (self.nonfinite, later.nonfinite),
            (self.out_of_range, later.out_of_range),
            (self.all_ignored, later.all_ignored),
            (self.bad_soft, later.bad_soft),
        ):
            mine.merge(theirs)

    def _decide(self, y: np.ndarray) -> str:
        if y.dtype.kind in "iub":
            return "classes"
        f = y[np.isfinite(y)]
        if (
            y.ndim == 2
            and y.shape[1] > 1
            and f.size
            and f.min() >= 0
            and f.max() <= 1
            and (self.num_classes is None or y.shape[1] == self.num_classes)
        ):
            return "soft"
        if not f.size or np.all(f == np.round(f)):
            return "classes"
        return "values"

    def update(self, y: np.ndarray | LabelCounts, start: int, names: list[str] | None) -> None:
        if isinstance(y, LabelCounts):
            self._update_counts(y, start, names)
            return
        y = np.asarray(y)
        if y.dtype.kind == "b":
            y = y.astype(np.uint8)
        if y.dtype.kind not in "fiu":
            return
        if y.ndim == 0:
            y = y[None]
        if self.kind is None:
            self.kind, self.dtype = self._decide(y), dtype_name(y.dtype)
        n = y.shape[0]
        flat = y.reshape(n, -1)
        part = array_stats(flat, workers=1)
        self.stats = self.stats.merge(part)
        finite = np.isfinite(flat) if flat.dtype.kind == "f" else None
        if part.nonfinite:
            for i in np.flatnonzero(~finite.all(axis=1)):
                self.nonfinite.add(
                    start + i,
                    names[i] if names else None,
                    f"{_label(start, i, names)}: {int((~finite[i]).sum())} non-finite labels",
                )
        if self.kind == "soft":
            self._soft(flat, start, names)
        elif self.kind == "classes":
            self._classes(flat, finite, start, names)

    def _update_counts(self, lc: LabelCounts, start: int, names: list[str] | None) -> None:
        """One 8-bit mask from its value counts: the same checks as ``_classes`` on its pixels."""
        if self.kind is None:
            self.kind, self.dtype = "classes", "uint8"  # what _decide says of any integer mask
        self.stats = self.stats.merge(lc.stats())
        if self.kind != "classes":
            return
        n_pix = math.prod(lc.sample_shape)
        values = np.flatnonzero(lc.counts)
        counts = lc.counts[values]
        valid = (
            values != self.ignore_index
            if self.ignore_index is not None
            else np.ones(values.size, bool)
        )
        bad = (
            valid & (values >= self.num_classes)
            if self.num_classes is not None
            else np.zeros(values.size, bool)
        )
        name = names[0] if names else None
        if bad.any():
            for v, c in zip(values[bad].tolist(), counts[bad].tolist(), strict=True):
                self.bad_values[v] = self.bad_values.get(v, 0) + c
            self.out_of_range.add(
                start,
                name,
                f"{_label(start, 0, names)}: label {', '.join(map(str, values[bad][:5].tolist()))} "
                f"at {int(counts[bad].sum())} of {n_pix} positions",
            )
        nvalid = int(counts[valid].sum())
        self.valid += nvalid
        self.ignored += n_pix - nvalid
        if self.ignore_index is not None and n_pix > 1 and nvalid == 0:
            self.all_ignored.add(
                start, name, f"{_label(start, 0, names)}: 0 of {n_pix} values valid"
            )
        good = valid & ~bad
        self._add_counts(values[good], counts[good])

    def _add_counts(self, values: np.ndarray, counts: np.ndarray) -> None:
        """``_count`` for labels given as (value, how many times)."""
        cap = self.num_classes if self.num_classes is not None else _HIST_CAP
        over = values >= cap
        if over.any():
            self.above_cap += int(counts[over].sum())
            values, counts = values[~over], counts[~over]
        if values.size:
            top = int(values.max()) + 1
            if top > self.hist.size:
                self.hist = np.concatenate([self.hist, np.zeros(top - self.hist.size, np.int64)])
            self.hist[values] += counts

    def _soft(self, flat: np.ndarray, start: int, names: list[str] | None) -> None:
        with np.errstate(invalid="ignore"):
            sums = flat.astype(np.float64).sum(axis=1)
            neg = (flat < 0).any(axis=1)
        tol = 1e-3 if flat.dtype.itemsize >= 4 else 1e-2
        bad = np.isfinite(sums) & ((np.abs(sums - 1.0) > tol) | neg)
        for i in np.flatnonzero(bad):
            self.bad_soft.add(
                start + i,
                names[i] if names else None,
                f"{_label(start, i, names)}: row sums to {fmt(float(sums[i]))}",
            )
        ok = np.isfinite(sums)
        if ok.any():
            self._count(np.argmax(np.where(np.isfinite(flat[ok]), flat[ok], -np.inf), axis=1))
            self.valid += int(ok.sum())

    def _classes(
        self, flat: np.ndarray, finite: np.ndarray | None, start: int, names: list[str] | None
    ) -> None:
        labels = flat if finite is None else np.where(finite, flat, 0)
        labels = labels.astype(np.int64, copy=False)
        valid = np.ones(labels.shape, bool) if finite is None else finite.copy()
        if self.ignore_index is not None:
            valid &= labels != self.ignore_index
        bad = valid & (labels < 0)
        if self.num_classes is not None:
            bad |= valid & (labels >= self.num_classes)
        if bad.any():
            vals, counts = np.unique(labels[bad], return_counts=True)
            for v, c in zip(vals.tolist(), counts.tolist(), strict=True):
                self.bad_values[v] = self.bad_values.get(v, 0) + c
            for i in np.flatnonzero(bad.any(axis=1)):
                row_vals = np.unique(labels[i][bad[i]])
                self.out_of_range.add(
                    start + i,
                    names[i] if names else None,
                    f"{_label(start, i, names)}: label {', '.join(map(str, row_vals[:5].tolist()))} "
                    f"at {int(bad[i].sum())} of {labels.shape[1]} positions",
                )
        nvalid = valid.sum(axis=1)
        self.valid += int(nvalid.sum())
        self.ignored += int((~valid).sum())
        if self.ignore_index is not None and labels.shape[1] > 1:
            for i in np.flatnonzero(nvalid == 0):
                self.all_ignored.add(
                    start + i,
                    names[i] if names else None,
                    f"{_label(start, i, names)}: 0 of {labels.shape[1]} values valid",
                )
        good = labels[valid & ~bad]
        if good.size:
            self._count(good)

    def _count(self, labels: np.ndarray) -> None:
        cap = self.num_classes if self.num_classes is not None else _HIST_CAP
        over = labels >= cap
        if over.any():
            self.above_cap += int(over.sum())
            labels = labels[~over]
        if labels.size:
            counts = np.bincount(labels, minlength=self.hist.size)
            if counts.size > self.hist.size:
                self.hist = np.concatenate(
                    [self.hist, np.zeros(counts.size - self.hist.size, np.int64)]
                )
            self.hist += counts

    def histogram(self) -> dict[int, int]:
        if self.kind not in ("classes", "soft"):
            return {}
        return {i: int(c) for i, c in enumerate(self.hist.tolist())}

    def to_dict(self) -> dict:
        d: dict = {"kind": self.kind, "dtype": self.dtype}
        d.update(self.stats.to_dict())
        if self.kind in ("classes", "soft"):
            d["valid"] = self.valid
            if self.kind == "classes":
                d["ignored"] = self.ignored
            h = self.histogram()
            d["histogram"] = {str(k): v for k, v in h.items() if v or self.num_classes is not None}
            if self.num_classes is not None:
                d["unused_classes"] = [c for c in range(self.num_classes) if not h.get(c)]
            if self.above_cap:
                d["labels_above_histogram"] = self.above_cap
        return d
