"""row_stats (one fused pass, every row at once) agrees with the slow reference row by row, and
the per-sample statistics the data audit builds on it agree with numpy."""

import math
import pickle

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from nanscope.core.stats import ArrayStats, reference_stats, row_stats
from nanscope.data.samples import batch_stats, image_stats


def _same(got: ArrayStats, want: ArrayStats, scale: float) -> None:
    assert (got.count, got.nan, got.posinf, got.neginf) == (
        want.count,
        want.nan,
        want.posinf,
        want.neginf,
    )
    assert got.min == want.min and got.max == want.max
    if want.count:
        assert math.isclose(got.mean, want.mean, rel_tol=1e-5, abs_tol=1e-6 * scale)
        assert math.isclose(
            got.m2, want.m2, rel_tol=1e-4, abs_tol=1e-5 * scale * scale * want.count
        )


_VALUES = {
    "float16": st.floats(width=16, allow_nan=True, allow_infinity=True),
    "float32": st.floats(width=32, allow_nan=True, allow_infinity=True),
    "float64": st.one_of(st.floats(-1e150, 1e150), st.sampled_from([np.nan, np.inf, -np.inf])),
}


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_every_row_matches_the_reference(data):
    dtype = data.draw(st.sampled_from(["float16", "float32", "float64", "int16", "uint8", "bool"]))
    shape = data.draw(hnp.array_shapes(min_dims=2, max_dims=4, min_side=0, max_side=12))
    a = data.draw(hnp.arrays(dtype, shape, elements=_VALUES.get(dtype)))
    if data.draw(st.booleans()) and a.ndim >= 3:
        a = np.moveaxis(
            a, -1, 1
        )  # a strided view (channels last seen channels first): copied per group
    block = data.draw(
        st.sampled_from([1, 5, 64, 1 << 18])
    )  # tiny blocks: many groups, long-row path
    r = row_stats(a, workers=data.draw(st.sampled_from([1, 2])), block=block)
    assert r.shape == a.shape[:-1]
    for idx in np.ndindex(*a.shape[:-1]):
        want = reference_stats(a[idx])
        scale = max(abs(want.min or 0.0), abs(want.max or 0.0), 1.0)
        _same(r.item(*idx), want, scale)
    if a.size:
        total = r.reshape(-1).combine(0).item()
        want = reference_stats(a)
        _same(total, want, max(abs(want.min or 0.0), abs(want.max or 0.0), 1.0))


def test_large_batch_two_threads_equal_one_and_bad_rows_are_exact():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((600, 3, 1024)) * 40 + 120).astype(np.float32)  # 7 MiB: threads start
    x[5, 1, 7] = np.nan
    x[400, 2, :] = np.inf
    x[401, 0, 3] = 3.4e38  # finite, but the row's float32 sum overflows
    x[402, 0, :3] = [3.4e38, -3.4e38, 3.4e38]
    one, two = row_stats(x, workers=1), row_stats(x, workers=2)
    for f in ("count", "nan", "posinf", "neginf", "min", "max", "mean", "m2"):
        assert np.array_equal(getattr(one, f), getattr(two, f)), (
            f
        )  # deterministic, whatever the timing
    for idx in [(5, 1), (400, 2), (401, 0), (402, 0), (0, 0), (599, 2)]:
        want = reference_stats(x[idx])
        _same(one.item(*idx), want, max(abs(want.min or 0.0), abs(want.max or 0.0), 1.0))
    assert one.nan[5, 1] == 1 and one.posinf[400, 2] == 1024 and one.count[400, 2] == 0
    back = pickle.loads(pickle.dumps(one))  # how worker processes send them
    for f in ("count", "nan", "posinf", "neginf", "min", "max", "mean", "m2"):
        assert (
            np.array_equal(getattr(back, f), getattr(one, f))
            and getattr(back, f).dtype == getattr(one, f).dtype
        ), f


def test_constant_rows_have_zero_spread_and_equal_extremes():
    x = np.full((4, 2, 300), 0.1, np.float32)
    x[1, 1] = 0.0
    x[2, 0, 7] = 0.2
    r = row_stats(x)
    assert (r.m2[[0, 1, 3]] == 0).all() and r.m2[2, 0] > 0
    sample = r.combine(1)
    assert ((sample.min == sample.max) == [True, False, False, True]).all()


def test_channels_last_batch_and_8bit_images_from_their_histogram():
    rng = np.random.default_rng(3)
    hwc = rng.integers(0, 256, (2, 9, 7, 3), dtype=np.uint8)
    s = batch_stats(hwc, 2)
    for c in range(3):
        want = reference_stats(hwc[..., c])
        _same(s.rows.combine(0).item(c), want, 255.0)
    for mode, arr in [
        ("RGB", hwc[0]),
        ("L", hwc[0, ..., 0]),
        ("RGBA", rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)),
    ]:
        im = Image.fromarray(arr, mode)
        h = image_stats(im)
        a = batch_stats(np.asarray(im)[None], 2 if arr.ndim == 3 else None)
        assert h.shape == a.shape and h.channel_axis == a.channel_axis
        for idx in np.ndindex(*h.rows.shape):
            _same(h.rows.item(*idx), a.rows.item(*idx), 255.0)
    assert image_stats(Image.new("F", (8, 8))) is None  # floats may hold NaN: the array path
    assert (
        image_stats(Image.new("RGB", (8, 3))) is None
    )  # 3 rows read as channels first: the array path
