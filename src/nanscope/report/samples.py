"""The offending samples, shown as what they are: images as thumbnails with the bad pixels
marked, masks beside them, tabular rows with the bad columns highlighted, token sequences with
their positions.

Where the samples come from (all framework-free):
    - a repro bundle's ``samples.npz`` (written beside ``state.pt``: the offending rows of every
      batch tensor, named as in the manifest, plus ``samples``, their indices in the batch);
    - arrays handed over by the caller (``nanscope demo``);
    - the dataset folder of a ``nanscope data`` audit (image + mask files re-read by name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nanscope.report.images import Thumb, as_hwc, image_thumb, mask_thumb
from nanscope.report.page import esc, rich_text

MAX_SAMPLES = 16
PREVIEW_FILE = "samples.npz"
_TARGET_NAME = re.compile(r"(mask|label|target|gt|annotation|segment|^y$|\[1\]|\[\"y\"\])", re.I)


@dataclass
class SampleView:
    """One sample: its index in the batch (or dataset), a title, and what to show of it."""

    index: int
    title: str
    thumbs: list[Thumb] = field(default_factory=list)
    html_parts: list[str] = field(default_factory=list)  # tables / token strips

    def html(self) -> str:
        figs = "".join(
            f'<figure><img class="thumb {t.kind}" src="{t.uri}" width="{t.width}" height="{t.height}" '
            f'alt="{esc(t.kind)} of sample {self.index}"><figcaption>{esc(t.caption)}</figcaption></figure>'
            for t in self.thumbs
        )
        return (
            f'<div class="sample" data-sample="{self.index}"><div class="title">{esc(self.title)}</div>'
            f'<div class="pair">{figs}</div>{"".join(self.html_parts)}</div>'
        )


def ignore_index_of(*texts: str) -> int | None:
    """The ignore_index a diagnosis or audit names in its words (``ignore_index 255``)."""
    for t in texts:
        m = re.search(r"ignore_index[ =]+(-?\d+)", t or "")
        if m:
            return int(m.group(1))
    return None


def num_classes_of(*texts: str) -> int | None:
    for t in texts:
        m = re.search(r"outside \[0, (\d+)\)", t or "")
        if m:
            return int(m.group(1))
    return None


def _is_target(name: str) -> bool:
    return bool(_TARGET_NAME.search(name))


def _row_html(name: str, row: np.ndarray) -> str:
    """A 1-d sample: a token sequence (integers) or a tabular row (floats), bad entries marked."""
    row = np.asarray(row).reshape(-1)
    if row.dtype.kind in "iub" and row.size > 1:
        shown = row[:256]
        spans = "".join(
            f'<span title="position {i}">{int(v)}<sub>{i}</sub></span>' for i, v in enumerate(shown)
        )
        more = f" … {row.size} tokens in all" if row.size > shown.size else ""
        note = f'<div class="note">{esc(name)}: {row.size} tokens (value<sub>position</sub>){more}</div>'
        return note + f'<div class="tokens">{spans}</div>'
    if row.size == 1:
        v = row[0]
        bad = row.dtype.kind == "f" and not np.isfinite(v)
        return f'<div class="note">{esc(name)}: <b class="{"bad" if bad else ""}">{esc(_num(v))}</b></div>'
    shown = row[:64]
    bad = ~np.isfinite(shown) if shown.dtype.kind == "f" else np.zeros(shown.shape, bool)
    head = "".join(f"<th>{i}</th>" for i in range(shown.size))
    cells = "".join(
        f'<td class="num{" bad" if b else ""}">{esc(_num(v))}</td>'
        for v, b in zip(shown, bad, strict=True)
    )
    more = f" (first 64 of {row.size})" if row.size > 64 else ""
    n_bad = int((~np.isfinite(row)).sum()) if row.dtype.kind == "f" else 0
    note = f"{esc(name)}: {row.size} columns{more}" + (
        f", {n_bad} non-finite (highlighted)" if n_bad else ""
    )
    return (
        f'<div class="note">{note}</div><div style="overflow-x:auto"><table class="row"><thead><tr>{head}'
        f"</tr></thead><tbody><tr>{cells}</tr></tbody></table></div>"
    )


def _num(v: object) -> str:
    from nanscope.core.summary import fmt

    if isinstance(v, (np.floating, float)):
        return fmt(float(v))
    if isinstance(v, (np.integer, int)):
        return str(int(v))
    return str(v)


def from_arrays(
    arrays: dict[str, np.ndarray],
    indices: list[int] | None = None,
    *,
    ignore_index: int | None = None,
    num_classes: int | None = None,
) -> list[SampleView]:
    """Views of the rows of ``arrays`` (each with a leading sample axis, rows aligned).

    ``indices`` are the rows' indices in the batch (for the titles); row ``i`` of every array is
    sample ``indices[i]``.
    """
    arrays = {k: np.asarray(v) for k, v in arrays.items() if np.asarray(v).ndim >= 1}
    if not arrays:
        return []
    n = min(a.shape[0] for a in arrays.values())
    indices = list(indices) if indices is not None else list(range(n))
    views = []
    for i in range(min(n, len(indices), MAX_SAMPLES)):
        v = SampleView(indices[i], f"sample {indices[i]}")
        for name, a in arrays.items():
            row = a[i]
            target = _is_target(name)
            if (
                target
                and row.ndim in (2, 3)
                and row.dtype.kind in "iub"
                and as_hwc(row) is not None
                and (row.ndim == 2 or 1 in (row.shape[0], row.shape[-1]))
            ):
                t = mask_thumb(
                    row, ignore_index=ignore_index, num_classes=num_classes, caption=name
                )
            elif row.ndim >= 2:
                t = image_thumb(row, caption=name)
            else:
                t = None
            if t is not None:
                v.thumbs.append(t)
            elif row.ndim <= 1:
                v.html_parts.append(_row_html(name, row))
            else:
                v.html_parts.append(
                    f'<div class="note">{esc(name)}: shape {tuple(row.shape)}, not shown</div>'
                )
        views.append(v)
    return views


def read_preview(folder: Path) -> tuple[dict[str, np.ndarray], list[int]] | None:
    """A bundle's ``samples.npz`` (never unpickled), or None when the bundle has none."""
    p = Path(folder) / PREVIEW_FILE
    if not p.is_file():
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception:  # a damaged preview only costs the thumbnails
        return None
    idx = arrays.pop("samples", None)
    indices = [int(i) for i in idx.reshape(-1)] if idx is not None else None
    return arrays, indices or list(
        range(min((a.shape[0] for a in arrays.values() if a.ndim), default=0))
    )


# -- dataset folders (nanscope data) ------------------------------------------------------------


def _partner(root: Path, rel: str, want_target: bool) -> Path | None:
    """The mask of an image file, or the image of a mask file: same stem, sibling folder."""
    from nanscope.data.readers import IMAGE_SUFFIXES, INPUT_DIRS, SAMPLE_SUFFIXES, TARGET_DIRS

    p = Path(rel)
    if len(p.parts) < 2:
        return None
    stem = Path(*p.parts[1:]).with_suffix("")
    dirs = TARGET_DIRS if want_target else INPUT_DIRS
    for d in root.iterdir() if root.is_dir() else []:
        if d.is_dir() and d.name.lower() in dirs:
            for suffix in sorted(SAMPLE_SUFFIXES | IMAGE_SUFFIXES):
                q = d / stem.with_suffix(suffix)
                if q.is_file():
                    return q
    return None


def from_dataset(
    root: Path,
    findings: list[dict],
    *,
    ignore_index: int | None = None,
    num_classes: int | None = None,
) -> tuple[list[SampleView], str | None]:
    """Views of the files the findings name, image and mask side by side.

    Returns the views and, when the files cannot be read here (Pillow missing, files moved), a
    sentence saying why.
    """
    try:
        from nanscope.data.readers import read_sample
    except Exception as err:  # pragma: no cover - the data package is part of nanscope
        return [], f"cannot read the samples: {err}"
    root = Path(root)
    base = root if root.is_dir() else root.parent
    seen: dict[str, SampleView] = {}
    views: list[SampleView] = []
    problems: list[str] = []
    for f in findings:
        rel = (f.get("where") or {}).get("file")
        if not rel or rel in seen:
            continue
        if len(views) >= MAX_SAMPLES:
            break
        target = (f.get("where") or {}).get("target") is not None
        path = base / rel if (base / rel).is_file() else root.parent / rel
        if not path.is_file():
            problems.append(rel)
            continue
        image_path, mask_path = (
            (_partner(base, rel, False), path) if target else (path, _partner(base, rel, True))
        )
        samples = f.get("samples") or [None]
        v = SampleView(
            samples[0] if samples[0] is not None else -1,
            f"sample {samples[0]}: {rel}" if samples[0] is not None else rel,
        )
        try:
            if image_path is not None:
                t = image_thumb(read_sample(image_path), caption=image_path.name)
                if t is not None:
                    v.thumbs.append(t)
            if mask_path is not None:
                t = mask_thumb(
                    read_sample(mask_path, as_mask=True),
                    ignore_index=ignore_index,
                    num_classes=num_classes,
                    caption=mask_path.name,
                )
                if t is not None:
                    v.thumbs.append(t)
        except Exception as err:  # MissingDependencyError (Pillow), a file changed since the audit
            problems.append(f"{rel} ({str(err).splitlines()[0][:120]})")
            continue
        v.html_parts.append(f'<div class="note">{esc(f.get("summary", ""))}</div>')
        seen[rel] = v
        views.append(v)
        for other in (image_path, mask_path):
            if other is not None:
                try:
                    seen.setdefault(other.relative_to(base).as_posix(), v)
                except ValueError:
                    pass
    views.sort(key=lambda v: v.index)
    why = (
        ("could not show " + ", ".join(problems[:5]) + (" …" if len(problems) > 5 else ""))
        if problems
        else None
    )
    return views, why


LEGEND = (
    '<div class="note legend">marks:<span style="background:rgb(255,0,255)"></span>non-finite pixel'
    '<span style="background:repeating-linear-gradient(45deg,#969696 0 2px,#c8c8c8 2px 4px)"></span>ignore_index'
    '<span style="background:rgb(230,0,0)"></span>label out of range</div>'
)


def render(views: list[SampleView], note: str | None = None) -> str:
    if not views:
        return f'<p class="note">{rich_text(note, copy=False)}</p>' if note else ""
    body = LEGEND + '<div class="samples">' + "".join(v.html() for v in views) + "</div>"
    if note:
        body += f'<p class="note">{rich_text(note, copy=False)}</p>'
    return body
