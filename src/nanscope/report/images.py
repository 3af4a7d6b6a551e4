"""Sample thumbnails as inline PNG: images with their non-finite pixels marked, masks in a
class palette with ``ignore_index`` hatched and out-of-range labels in red.

Design constraints:
    - numpy + stdlib only (the PNG encoder is ``zlib``): no Pillow, no framework, so the page
      renders wherever the JSON can be read.
    - Bounded: a thumbnail is at most ``MAX_SIDE`` pixels a side (strided, with the bad-pixel
      mark max-pooled so a single NaN pixel survives the downscale); the browser scales it up
      with ``image-rendering: pixelated``.
"""

from __future__ import annotations

import base64
import struct
import zlib
from dataclasses import dataclass

import numpy as np

MAX_SIDE = 128
BAD_RGB = (255, 0, 255)  # non-finite pixel: magenta, a colour no natural image is made of
OUT_OF_RANGE_RGB = (230, 0, 0)
IGNORE_RGB = ((150, 150, 150), (200, 200, 200))  # two greys, hatched
# A qualitative palette (tab20 order) for class labels; class k gets PALETTE[k % 20].
PALETTE = np.array(
    [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
        (174, 199, 232),
        (255, 187, 120),
        (152, 223, 138),
        (255, 152, 150),
        (197, 176, 213),
        (196, 156, 148),
        (247, 182, 210),
        (199, 199, 199),
        (219, 219, 141),
        (158, 218, 229),
    ],
    dtype=np.uint8,
)
PALETTE[0] = (20, 20, 20)  # class 0 is usually background: dark


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 array as PNG (stdlib zlib only).

    >>> png_bytes(np.zeros((2, 3, 3), np.uint8))[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
    """
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w = rgb.shape[:2]
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + tag
            + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def data_uri(rgb: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode("ascii")


@dataclass
class Thumb:
    """One rendered thumbnail: the PNG data URI, its size, and what it shows in words."""

    uri: str
    width: int
    height: int
    caption: str
    bad: int = 0  # marked pixels (non-finite, or labels out of range)
    kind: str = "image"  # "image" or "mask"


def as_hwc(a: np.ndarray) -> np.ndarray | None:
    """One sample as ``(H, W, C)`` (C = 1, 3 or 4), or None when it is not image-shaped.

    >>> as_hwc(np.zeros((3, 8, 9))).shape, as_hwc(np.zeros((8, 9, 3))).shape, as_hwc(np.zeros(5))
    ((8, 9, 3), (8, 9, 3), None)
    """
    a = np.asarray(a)
    if a.ndim == 2 and min(a.shape) >= 4:
        return a[:, :, None]
    if a.ndim == 3:
        if (
            a.shape[0] in (1, 3, 4)
            and a.shape[1] >= 4
            and a.shape[2] >= 4
            and a.shape[2] not in (1, 3, 4)
        ):
            return np.moveaxis(a, 0, -1)
        if a.shape[-1] in (1, 3, 4) and min(a.shape[:2]) >= 4:
            return a
        if a.shape[0] in (1, 3, 4) and min(a.shape[1:]) >= 4:
            return np.moveaxis(a, 0, -1)
    return None


def _downscale(a: np.ndarray, mark: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    step = max(1, -(-max(a.shape[:2]) // MAX_SIDE))
    if step == 1:
        return a, mark
    h, w = (a.shape[0] // step) * step, (a.shape[1] // step) * step
    small = a[:h:step, :w:step]
    m = mark[:h, :w].reshape(h // step, step, w // step, step).any(axis=(1, 3))
    return small, m


def _visible(mark: np.ndarray) -> np.ndarray:
    """A few bad pixels grown to 3x3 so a single NaN pixel is seen at thumbnail size."""
    if not mark.any() or mark.mean() > 0.01:
        return mark
    grown = mark.copy()
    grown[1:] |= mark[:-1]
    grown[:-1] |= mark[1:]
    g2 = grown.copy()
    g2[:, 1:] |= grown[:, :-1]
    g2[:, :-1] |= grown[:, 1:]
    return g2


def image_thumb(sample: np.ndarray, caption: str = "") -> Thumb | None:
    """An image sample, contrast-stretched over its finite values, non-finite pixels in magenta."""
    hwc = as_hwc(sample)
    if hwc is None:
        return None
    x = np.abs(hwc) if hwc.dtype.kind == "c" else hwc.astype(np.float64)
    bad = ~np.isfinite(x).all(axis=-1)
    finite = x[np.isfinite(x)]
    if hwc.dtype == np.uint8:
        lo, hi = 0.0, 255.0
    elif finite.size:
        lo, hi = float(finite.min()), float(finite.max())
    else:
        lo, hi = 0.0, 1.0
    scaled = np.where(np.isfinite(x), (x - lo) / (hi - lo if hi > lo else 1.0), 0.0)
    img = (np.clip(scaled, 0, 1) * 255).astype(np.uint8)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    elif img.shape[-1] == 4:
        img = img[..., :3]
    img, mark = _downscale(img, bad)
    img = img.copy()
    img[_visible(mark)] = BAD_RGB
    n_bad = int(bad.sum())
    words = caption + (f" · {n_bad} non-finite pixel{'s' if n_bad != 1 else ''}" if n_bad else "")
    return Thumb(data_uri(img), img.shape[1], img.shape[0], words.strip(" ·"), n_bad, "image")


def mask_thumb(
    sample: np.ndarray,
    *,
    ignore_index: int | None = None,
    num_classes: int | None = None,
    caption: str = "",
) -> Thumb | None:
    """A label mask in a class palette; ignored pixels hatched grey, out-of-range labels red."""
    m = np.asarray(sample)
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2 or min(m.shape) < 2:
        return None
    finite = np.isfinite(m) if m.dtype.kind == "f" else np.ones(m.shape, bool)
    labels = np.where(finite, m, 0).astype(np.int64)
    ignored = (
        finite & (labels == ignore_index) if ignore_index is not None else np.zeros(m.shape, bool)
    )
    out = ~finite | (labels < 0) & ~ignored
    if num_classes is not None:
        out |= (labels >= num_classes) & ~ignored
    rgb = PALETTE[np.mod(labels, len(PALETTE))]
    yy, xx = np.indices(m.shape)
    hatch = ((yy + xx) // 2) % 2 == 0
    rgb = np.where((ignored & hatch)[..., None], np.array(IGNORE_RGB[0], np.uint8), rgb)
    rgb = np.where((ignored & ~hatch)[..., None], np.array(IGNORE_RGB[1], np.uint8), rgb)
    rgb, mark = _downscale(rgb.astype(np.uint8), out)
    rgb = rgb.copy()
    rgb[_visible(mark)] = OUT_OF_RANGE_RGB
    n = m.size
    valid = int(n - ignored.sum() - out.sum())
    words = [caption] if caption else []
    if ignore_index is not None:
        words.append(f"{valid} of {n} valid" + (" (all ignore_index)" if ignored.all() else ""))
    if out.any():
        words.append(f"{int(out.sum())} out of range")
    return Thumb(
        data_uri(rgb), rgb.shape[1], rgb.shape[0], " · ".join(words), int(out.sum()), "mask"
    )


def channel_strip(values: np.ndarray, bad: np.ndarray) -> str:
    """A one-row strip, one cell per channel, bad channels in red (for BatchNorm statistics)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    fin = np.isfinite(v)
    mag = np.log10(np.abs(np.where(fin, v, 1.0)) + 1e-12)
    lo, hi = (float(mag[fin].min()), float(mag[fin].max())) if fin.any() else (0.0, 1.0)
    g = ((mag - lo) / (hi - lo if hi > lo else 1.0) * 180 + 40).astype(np.uint8)
    rgb = np.stack([g, g, g], axis=-1)[None].repeat(6, axis=0)
    rgb[:, np.asarray(bad, bool).reshape(-1)] = OUT_OF_RANGE_RGB
    return data_uri(rgb)
