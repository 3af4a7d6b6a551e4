"""nanscope.losses on torch tensors: finite value and gradient at the edges, stock values elsewhere."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import nanscope.losses as L

FAST = settings(max_examples=25, deadline=None)
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
EXTREME = st.sampled_from([-1e4, -30.0, -1.0, 0.0, 1.0, 30.0, 1e4])


def _finite_value_and_grad(fn, *leaves):
    out = fn()
    assert torch.isfinite(out).all(), out
    out.float().sum().backward()
    for leaf in leaves:
        assert leaf.grad is None or torch.isfinite(leaf.grad).all(), leaf.grad


def _leaf(values, dtype):
    return torch.tensor(values, dtype=torch.float32).to(dtype).requires_grad_(True)


@FAST
@given(
    st.lists(EXTREME, min_size=6, max_size=6),
    st.lists(st.integers(0, 2), min_size=2, max_size=2),
    DTYPES,
)
def test_cross_entropy_extreme_logits_finite(values, labels, dtype):
    logits = _leaf([values[:3], values[3:]], dtype)
    _finite_value_and_grad(lambda: L.cross_entropy(logits, torch.tensor(labels)), logits)


def test_cross_entropy_all_ignored_is_zero_with_zero_gradient_and_warns():
    logits = torch.randn(3, 4, requires_grad=True)
    stock = F.cross_entropy(logits, torch.full((3,), -100))
    assert torch.isnan(stock)  # the failure this replaces
    with pytest.warns(UserWarning, match="every target equals ignore_index"):
        loss = L.cross_entropy(logits, torch.full((3,), 255), ignore_index=255)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_cross_entropy_matches_stock_on_ordinary_inputs():
    torch.manual_seed(0)
    logits, target = torch.randn(8, 5), torch.randint(0, 5, (8,))
    target[2] = -100
    w = torch.rand(5) + 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(L.cross_entropy(logits, target), F.cross_entropy(logits, target))
        torch.testing.assert_close(
            L.cross_entropy(logits, target, weight=w), F.cross_entropy(logits, target, weight=w)
        )
        torch.testing.assert_close(
            L.cross_entropy(logits, target, label_smoothing=0.1),
            F.cross_entropy(logits, target, label_smoothing=0.1),
        )


@FAST
@given(
    st.lists(st.sampled_from([0.0, 1.0, 1e-8, 0.3, 0.999]), min_size=4, max_size=4),
    st.lists(st.sampled_from([0.0, 1.0]), min_size=4, max_size=4),
    DTYPES,
)
def test_bce_on_probabilities_of_exactly_0_and_1(probs, target, dtype):
    p = _leaf(probs, dtype)
    _finite_value_and_grad(lambda: L.binary_cross_entropy(p, torch.tensor(target)), p)


def test_bce_matches_stock():
    p, y = torch.rand(16) * 0.98 + 0.01, (torch.rand(16) > 0.5).float()
    torch.testing.assert_close(L.binary_cross_entropy(p, y), F.binary_cross_entropy(p, y))


@FAST
@given(
    st.lists(EXTREME, min_size=4, max_size=4),
    st.lists(st.sampled_from([0.0, 1.0]), min_size=4, max_size=4),
    st.sampled_from([0.0, 0.5, 2.0]),
    DTYPES,
)
def test_focal_loss_extreme_logits_and_fractional_gamma(values, target, gamma, dtype):
    x = _leaf(values, dtype)
    _finite_value_and_grad(lambda: L.focal_loss(x, torch.tensor(target), gamma=gamma), x)


def test_focal_loss_matches_the_reference_formula():
    x, y = torch.randn(32), (torch.rand(32) > 0.5).float()
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    ref = ((0.25 * y + 0.75 * (1 - y)) * ce * (1 - p_t) ** 2).mean()
    torch.testing.assert_close(L.focal_loss(x, y), ref)


def _stock_dice(p, t):
    dims = tuple(range(1, p.ndim))
    return (1 - 2 * (p * t).sum(dims) / (p.sum(dims) + t.sum(dims))).mean()


@FAST
@given(st.integers(0, 3), st.booleans(), DTYPES)
def test_dice_and_tversky_with_empty_masks(n_filled, empty_pred, dtype):
    target = torch.zeros(2, 1, 3, 3)
    target[0, 0, 0, :n_filled] = 1.0
    probs = _leaf(
        torch.zeros(2, 1, 3, 3).tolist() if empty_pred else torch.rand(2, 1, 3, 3).tolist(), dtype
    )
    _finite_value_and_grad(lambda: L.dice_loss(probs, target), probs)
    probs.grad = None
    _finite_value_and_grad(lambda: L.tversky_loss(probs, target, alpha=0.7, beta=0.3), probs)


def test_dice_empty_mask_predicted_empty_is_perfect_and_matches_stock_otherwise():
    empty = torch.zeros(1, 4, 4)
    assert torch.isnan(_stock_dice(empty, empty))
    assert L.dice_loss(empty, empty).item() == 0.0 and L.tversky_loss(empty, empty).item() == 0.0
    p, t = torch.rand(3, 4, 4), (torch.rand(3, 4, 4) > 0.5).float()
    torch.testing.assert_close(L.dice_loss(p, t), _stock_dice(p, t))
    tp, fp, fn = (p * t).sum((1, 2)), (p * (1 - t)).sum((1, 2)), ((1 - p) * t).sum((1, 2))
    torch.testing.assert_close(
        L.tversky_loss(p, t, alpha=0.3, beta=0.7), (1 - tp / (tp + 0.3 * fp + 0.7 * fn)).mean()
    )


@FAST
@given(st.lists(st.sampled_from([0.0, 1e-30, 1e-8, 1.0, 1e4]), min_size=3, max_size=3), DTYPES)
def test_safe_log_sqrt_norm_finite_at_zero(values, dtype):
    x = _leaf(values, dtype)
    _finite_value_and_grad(lambda: L.safe_log(x), x)
    x.grad = None
    _finite_value_and_grad(lambda: L.safe_sqrt(x), x)
    x.grad = None
    _finite_value_and_grad(lambda: L.safe_norm(x), x)


def test_safe_ops_match_stock_on_ordinary_inputs():
    x = torch.rand(10) + 0.1
    torch.testing.assert_close(L.safe_log(x), torch.log(x))
    torch.testing.assert_close(L.safe_sqrt(x), torch.sqrt(x))
    m = torch.randn(4, 6)
    torch.testing.assert_close(L.safe_norm(m, dim=1), torch.linalg.vector_norm(m, dim=1))
    torch.testing.assert_close(L.safe_div(x, x + 1), x / (x + 1))
    zero = torch.zeros(3, requires_grad=True)
    torch.sqrt((zero * zero).sum()).backward()
    assert torch.isnan(zero.grad).all()  # the hand-written norm safe_norm replaces


@FAST
@given(
    st.lists(st.sampled_from([0.0, 1.0, -2.0, 1e4]), min_size=3, max_size=3),
    st.lists(st.sampled_from([0.0, 1e-8, 2.0]), min_size=3, max_size=3),
    DTYPES,
)
def test_safe_div_zero_denominators(num, den, dtype):
    a, b = _leaf(num, dtype), _leaf(den, dtype)
    _finite_value_and_grad(lambda: L.safe_div(a, b), a, b)


@FAST
@given(
    st.lists(st.booleans(), min_size=8, max_size=8),
    st.lists(EXTREME, min_size=8, max_size=8),
    DTYPES,
)
def test_masked_softmax_fully_masked_rows(mask_bits, values, dtype):
    mask = torch.tensor(mask_bits).reshape(2, 4)
    x = _leaf(torch.tensor(values).reshape(2, 4).tolist(), dtype)
    _finite_value_and_grad(lambda: L.masked_softmax(x, mask), x)
    out = L.masked_softmax(x.detach(), mask)
    for row in range(2):
        if not mask[row].any():
            assert (out[row] == 0).all()
        else:
            ref = torch.softmax(x.detach()[row].float().masked_fill(~mask[row], float("-inf")), -1)
            torch.testing.assert_close(out[row].float(), ref, atol=1e-2, rtol=1e-2)


def test_double_where_avoids_the_where_trap():
    x = torch.tensor([-1.0, 0.0, 4.0], requires_grad=True)
    torch.where(x > 0, torch.sqrt(x), 0.0).sum().backward()
    assert torch.isnan(x.grad).any()  # the trap
    x.grad = None
    L.double_where(x > 0, torch.sqrt, x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[2].item() == pytest.approx(0.25)


def test_dispatcher_rejects_non_tensors():
    with pytest.raises(TypeError, match="torch or TensorFlow"):
        L.safe_log([1.0, 2.0])


def test_importing_losses_and_fuzz_imports_no_framework():
    import subprocess
    import sys

    code = (
        "import sys, nanscope, nanscope.losses, nanscope.fuzz, nanscope.core.headroom; nanscope.fuzz_loss; "
        "assert not {'torch', 'tensorflow', 'keras'} & set(sys.modules), sorted(sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_docstring_examples_run():
    import doctest

    import nanscope.fuzz
    import nanscope.losses
    import nanscope.torch.amp
    import nanscope.torch.losses

    for module in (nanscope.losses, nanscope.torch.losses, nanscope.torch.amp, nanscope.fuzz):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__
