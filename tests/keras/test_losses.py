"""nanscope.losses on TensorFlow tensors: finite value and gradient at the edges, stock values elsewhere."""

import sys

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import nanscope.losses as L

FAST = settings(max_examples=15, deadline=None)
DTYPES = st.sampled_from(["float32", "float16", "bfloat16"])
EXTREME = st.sampled_from([-1e4, -30.0, 0.0, 1.0, 30.0, 1e4])


def _value_and_grad(fn, *xs):
    xs = [tf.Variable(x) for x in xs]
    with tf.GradientTape() as tape:
        out = fn(*xs)
        total = tf.reduce_sum(tf.cast(out, tf.float32))
    grads = tape.gradient(total, xs)
    return out, grads


def _assert_finite(fn, *xs):
    out, grads = _value_and_grad(fn, *xs)
    assert np.isfinite(np.asarray(tf.cast(out, tf.float32))).all(), out
    for g in grads:
        assert g is not None, "no gradient reached the input"
        assert np.isfinite(np.asarray(tf.cast(tf.convert_to_tensor(g), tf.float32))).all(), g


def test_dispatch_picks_keras_and_never_torch():
    assert L.backend_for(tf.constant(1.0)).__name__ == "nanscope.keras.losses"
    assert "torch" not in sys.modules


@FAST
@given(
    st.lists(EXTREME, min_size=6, max_size=6),
    st.lists(st.integers(0, 2), min_size=2, max_size=2),
    DTYPES,
)
def test_cross_entropy_extreme_logits(values, labels, dtype):
    logits = tf.cast(tf.reshape(tf.constant(values), (2, 3)), dtype)
    _assert_finite(lambda x: L.cross_entropy(x, tf.constant(labels)), logits)


def test_cross_entropy_all_ignored_and_stock_values():
    logits = tf.random.stateless_normal((4, 5), seed=(1, 2))
    labels = tf.constant([1, 4, -100, 0])
    stock = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    ref = stock(tf.gather(labels, [0, 1, 3]), tf.gather(logits, [0, 1, 3]))
    np.testing.assert_allclose(L.cross_entropy(logits, labels), ref, rtol=1e-5)
    with pytest.warns(UserWarning, match="every target equals ignore_index"):
        out, (g,) = _value_and_grad(
            lambda x: L.cross_entropy(x, tf.constant([255, 255]), ignore_index=255),
            tf.zeros((2, 3)),
        )
    assert float(out) == 0.0 and not np.asarray(g).any()


@FAST
@given(
    st.lists(st.sampled_from([0.0, 1.0, 1e-8, 0.4]), min_size=4, max_size=4),
    st.lists(st.sampled_from([0.0, 1.0]), min_size=4, max_size=4),
    DTYPES,
)
def test_bce_and_dice_on_exact_probabilities(probs, target, dtype):
    p = tf.cast(tf.reshape(tf.constant(probs), (2, 2)), dtype)
    y = tf.reshape(tf.constant(target), (2, 2))
    _assert_finite(lambda q: L.binary_cross_entropy(q, y), p)
    _assert_finite(lambda q: L.dice_loss(q, y), p)
    _assert_finite(lambda q: L.tversky_loss(q, y, alpha=0.7, beta=0.3), p)


def test_dice_empty_and_stock():
    empty = tf.zeros((1, 4, 4))
    assert float(L.dice_loss(empty, empty)) == 0.0
    p = tf.random.stateless_uniform((3, 4, 4), seed=(3, 4))
    t = tf.cast(tf.random.stateless_uniform((3, 4, 4), seed=(5, 6)) > 0.5, tf.float32)
    ref = tf.reduce_mean(
        1 - 2 * tf.reduce_sum(p * t, (1, 2)) / (tf.reduce_sum(p, (1, 2)) + tf.reduce_sum(t, (1, 2)))
    )
    np.testing.assert_allclose(L.dice_loss(p, t), ref, rtol=1e-5)
    ref_bce = tf.keras.losses.BinaryCrossentropy()(t, p)
    np.testing.assert_allclose(L.binary_cross_entropy(p, t), ref_bce, rtol=1e-4)


@FAST
@given(st.lists(EXTREME, min_size=4, max_size=4), st.sampled_from([0.0, 0.5, 2.0]), DTYPES)
def test_focal_extreme_logits(values, gamma, dtype):
    x = tf.cast(tf.constant(values), dtype)
    _assert_finite(lambda v: L.focal_loss(v, tf.constant([1.0, 0.0, 1.0, 0.0]), gamma=gamma), x)


def test_focal_matches_keras():
    x = tf.random.stateless_normal((16,), seed=(7, 8))
    y = tf.cast(tf.random.stateless_uniform((16,), seed=(9, 1)) > 0.5, tf.float32)
    ref = tf.keras.losses.BinaryFocalCrossentropy(
        apply_class_balancing=True, alpha=0.25, gamma=2.0, from_logits=True
    )
    np.testing.assert_allclose(
        L.focal_loss(x[:, None], y[:, None]), ref(y[:, None], x[:, None]), rtol=1e-4
    )


@FAST
@given(st.lists(st.sampled_from([0.0, 1e-30, 1.0, 1e4]), min_size=3, max_size=3), DTYPES)
def test_safe_ops_at_zero(values, dtype):
    x = tf.cast(tf.constant(values), dtype)
    _assert_finite(L.safe_log, x)
    _assert_finite(L.safe_sqrt, x)
    _assert_finite(L.safe_norm, x)
    _assert_finite(lambda a: L.safe_div(a, a), x)


def test_safe_ops_match_stock_and_masked_softmax():
    x = tf.random.stateless_uniform((8,), seed=(2, 2)) + 0.1
    np.testing.assert_allclose(L.safe_log(x), tf.math.log(x), rtol=1e-6)
    np.testing.assert_allclose(L.safe_sqrt(x), tf.sqrt(x), rtol=1e-6)
    np.testing.assert_allclose(L.safe_norm(x), tf.norm(x), rtol=1e-6)
    np.testing.assert_allclose(L.safe_div(x, x + 1), x / (x + 1), rtol=1e-6)
    mask = tf.constant([[True, False, True], [False, False, False]])
    logits = tf.constant([[1e4, 0.0, -1e4], [1.0, 2.0, 3.0]])
    _assert_finite(lambda v: L.masked_softmax(v, mask), logits)
    out = np.asarray(L.masked_softmax(logits, mask))
    assert out[1].tolist() == [0.0, 0.0, 0.0] and out[0].tolist() == pytest.approx([1.0, 0.0, 0.0])
    v = tf.Variable([-1.0, 0.0, 4.0])
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(L.double_where(v > 0, tf.sqrt, v))
    assert np.isfinite(tape.gradient(y, v)).all()


def test_docstring_examples_run():
    import doctest

    import nanscope.keras.amp
    import nanscope.keras.losses

    for module in (nanscope.keras.losses, nanscope.keras.amp):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__
