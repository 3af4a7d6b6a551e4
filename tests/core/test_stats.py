"""The fused statistics kernel agrees with the slow obvious numpy reference."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nanscope.core.stats import ArrayStats, RunningStats, array_stats, reference_stats


def _assert_same(got: ArrayStats, want: ArrayStats, scale: float) -> None:
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
    else:
        assert got.mean is None and got.std is None


_VALUES = {
    "float16": st.floats(width=16, allow_nan=True, allow_infinity=True),
    "float32": st.floats(width=32, allow_nan=True, allow_infinity=True),
    # float64 beyond 1e150 overflows the reference's own sum of squares: not a fair comparison
    "float64": st.one_of(st.floats(-1e150, 1e150), st.sampled_from([np.nan, np.inf, -np.inf])),
}


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_matches_reference_over_dtypes_shapes_and_values(data):
    dtype = data.draw(st.sampled_from(["float16", "float32", "float64", "int16", "uint8", "bool"]))
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40))
    elements = _VALUES.get(dtype)
    a = data.draw(hnp.arrays(dtype, shape, elements=elements))
    block = data.draw(st.sampled_from([7, 64, 1 << 17]))  # tiny blocks exercise the merging
    want = reference_stats(a)
    scale = max(abs(want.min or 0.0), abs(want.max or 0.0), 1.0)
    _assert_same(array_stats(a, workers=1, block=block), want, scale)


@settings(max_examples=20, deadline=None)
@given(
    hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(-1e3, 1e3, width=32)),
    st.floats(-1e6, 1e6),
)
def test_bfloat16_as_float32_and_large_offsets_keep_the_spread(a, offset):
    # A big mean must not swallow a small spread (E[x^2] - E[x]^2 would).
    shifted = (a.astype(np.float64) * 1e-3 + offset).astype(np.float32)
    want = reference_stats(shifted)
    got = array_stats(shifted, block=16, workers=1)
    assert math.isclose(
        got.m2, want.m2, rel_tol=1e-3, abs_tol=1e-6 * max(1.0, abs(offset)) * want.count
    )


def test_two_threads_agree_with_one_on_a_large_array_with_bad_values():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(3_000_000).astype(np.float32) * 3 + 100
    x[[5, 2_000_000]] = np.nan
    x[1_500_000] = -np.inf
    one, two = array_stats(x, workers=1), array_stats(x, workers=2)
    want = reference_stats(x)
    for got in (one, two):
        _assert_same(got, want, 200.0)
    assert two.nan == 2 and two.neginf == 1
    assert array_stats(x, workers=2) == two  # chunks merge in a fixed order: deterministic


def test_extremes_and_non_contiguous_views():
    x = np.array([3e38, -3e38, 3.4e38, 1.0], dtype=np.float32)  # the float32 sum overflows
    _assert_same(array_stats(x), reference_stats(x), 3.4e38)
    x = np.array([np.nan, 3e38, 3.4e38, np.inf], dtype=np.float32)  # masked, and still overflowing
    _assert_same(array_stats(x), reference_stats(x), 3.4e38)
    y = np.arange(60, dtype=np.float32).reshape(3, 4, 5)[:, ::2, 1:]
    _assert_same(array_stats(y, block=4), reference_stats(y), 60.0)
    big = np.full(4, 1e300)
    assert array_stats(big).max == 1e300 and array_stats(big).std == 0.0


def test_all_nonfinite_and_empty():
    s = array_stats(np.array([np.nan, np.inf, -np.inf, np.nan], np.float32))
    assert (s.count, s.nan, s.posinf, s.neginf, s.min, s.std) == (0, 2, 1, 1, None, None)
    assert array_stats(np.zeros((0, 3))).size == 0


def test_running_stats_stream_equals_one_shot():
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal(n).astype(np.float32) for n in (1, 10, 1000, 7)]
    r = RunningStats()
    for p in parts:
        r.update(p)
    _assert_same(r.result, reference_stats(np.concatenate(parts)), 10.0)


def test_rejects_non_numeric():
    with pytest.raises(TypeError):
        array_stats(np.array(["a"]))
