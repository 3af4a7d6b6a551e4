"""The rules on evidence computed with numpy, the way the framework tracers collect it."""

import numpy as np
import pytest

from nanscope.core.enums import Category, Phase
from nanscope.core.rules import ProducerEvidence, classify_producer, norm_statistics_problems
from nanscope.core.summary import bad_rows, summarize
from nanscope.core.trend import is_exploding


def ev(op, phase, inputs, output, **kw):
    with np.errstate(all="ignore"):
        return classify_producer(
            ProducerEvidence(op, phase, [summarize(x) for x in inputs], summarize(output), **kw)
        )


def test_log_of_zero_is_op_domain():
    p = np.array([[0.9, 0.1, 0.0], [0.3, 0.3, 0.4]], dtype=np.float32)
    with np.errstate(all="ignore"):
        d = ev("aten::log", Phase.LOSS, [p], np.log(p), samples=bad_rows(np.log(p)))
    assert d.category is Category.OP_DOMAIN and d.op_kind == "log" and d.samples == [0]
    assert "1 zero" in d.summary and "log_softmax" in d.fixes[0]


def test_division_by_zero():
    x, y = np.ones(4, np.float32), np.array([1, 0, 2, 0], np.float32)
    with np.errstate(all="ignore"):
        d = ev("RealDiv", Phase.FORWARD, [x, y], x / y, framework="keras")
    assert d.category is Category.OP_DOMAIN and d.op_kind == "div" and "x/0" in d.summary
    assert "divide_no_nan" in d.fixes[0]


def test_float16_overflow_names_dtype_and_limit():
    x = np.full((2, 4), 300.0, np.float16)
    w = np.full((4, 4), 100.0, np.float16)
    with np.errstate(all="ignore"):
        out = x @ w
    d = ev("aten::addmm", Phase.FORWARD, [x, w], out, module="head.fc")
    assert d.category is Category.OVERFLOW and d.dtype == "float16" and "65504" in d.summary
    assert "float32" in d.fixes[0] and "head.fc" in d.fixes[0]


def test_all_masked_softmax():
    s = np.array([[0.0, -np.inf], [-np.inf, -np.inf]], np.float32)
    d = ev(
        "aten::_softmax",
        Phase.FORWARD,
        [s],
        np.array([[1, 0], [np.nan, np.nan]], np.float32),
        all_masked_rows=[1],
        samples=[1],
    )
    assert d.category is Category.ALL_MASKED_SOFTMAX and d.samples == [1]
    assert d.summary == "softmax over a row where every position is masked (-Inf) (sample 1)"
    assert d.evidence[0] == "1 row entirely -Inf"


def test_all_ignored_targets():
    logits = np.zeros((2, 3), np.float32)
    d = ev(
        "aten::nll_loss_nd",
        Phase.LOSS,
        [logits],
        np.array(np.nan, np.float32),
        valid_targets=0,
        ignore_index=255,
    )
    assert d.category is Category.INVALID_TARGET and "255" in d.evidence[0]


def test_backward_of_sqrt_at_zero_is_singular_gradient():
    x = np.array([0.0, 1.0], np.float32)
    d = ev(
        "SqrtBackward0",
        Phase.BACKWARD,
        [x],
        np.array([np.inf, 0.5], np.float32),
        forward_op="aten::sqrt",
        forward_inputs=[summarize(x)],
    )
    assert d.category is Category.SINGULAR_GRADIENT and "safe_sqrt" in d.fixes[0]
    assert d.summary == "the gradient of sqrt is +Inf at its input 0"
    assert d.evidence[0] == "forward aten::sqrt was finite; its derivative is not at 1 input == 0"


@pytest.mark.parametrize(
    "op,x,summary",
    [
        (
            "aten::acos",
            np.array([1.5], np.float32),
            "acos received values outside [-1, 1] (max |x| 1.5)",
        ),
        ("aten::sqrt", np.array([-1.0], np.float32), "sqrt received 1 negative value, min -1"),
        (
            "aten::pow",
            np.array([-8.0], np.float32),
            "pow of a negative base to a fractional exponent",
        ),
    ],
)
def test_domain_errors(op, x, summary):
    with np.errstate(all="ignore"):
        out = {
            "aten::acos": np.arccos,
            "aten::sqrt": np.sqrt,
            "aten::pow": lambda a: np.power(a, 0.5),
        }[op](x)
    d = ev(op, Phase.FORWARD, [x], out)
    assert d.category is Category.OP_DOMAIN and d.summary == summary


def test_exp_overflow_float32():
    x = np.array([100.0, 1.0], np.float32)
    with np.errstate(all="ignore"):
        d = ev("aten::exp", Phase.FORWARD, [x], np.exp(x))
    assert (
        d.category is Category.OVERFLOW
        and "max" in d.fixes[0]
        and d.summary == "exp overflowed float32"
    )
    assert d.evidence[0].startswith("float32 holds at most 3.403e+38; largest |input| 100")


def test_norm_statistics_problems():
    ok = norm_statistics_problems(summarize(np.zeros(3)), summarize(np.ones(3)))
    assert ok == []
    bad = norm_statistics_problems(summarize(np.zeros(3)), summarize(np.array([np.inf, 1e9, 1.0])))
    assert any("+Inf" in b for b in bad) and any("extreme" in b for b in bad)


def test_norm_statistics_problems_in_keras_names():
    bad = norm_statistics_problems(
        summarize(np.array([np.nan, 0.0])),
        summarize(np.array([1.0, -2.0])),
        names=("moving_mean", "moving_variance"),
    )
    assert bad == ["moving_mean: 1 NaN of 2", "moving_variance: 1 negative (min -2)"]


def test_trend_tells_explosion_from_one_off():
    assert is_exploding([1.0, 1.2, 3.0, 30.0, 900.0])
    assert not is_exploding([1.0, 1.2, 0.9, 1.1, 1.0])


def test_loss_scale_collapse_below_one_and_in_a_row():
    from nanscope.core.rules import loss_scale_collapse

    scales = [2.0 ** (4 - i) for i in range(6)]  # 16 .. 0.5, every step skipped
    d = loss_scale_collapse(
        scales, list(range(6)), bad_parameters=["ffn.wo.weight"], nonfinite_loss_steps=6
    )
    assert d.category is Category.OVERFLOW and d.phase is Phase.FORWARD and d.dtype == "float16"
    assert d.module == "ffn.wo" and "locate_overflow" in d.fixes[0] and "bfloat16" in d.fixes[1]
    healthy = [65536.0, 32768.0, 32768.0, 32768.0]
    assert loss_scale_collapse(healthy, [1]) is None
    many = [1024.0] * 10
    assert loss_scale_collapse(many, list(range(10)), max_consecutive=8).phase is Phase.BACKWARD


def test_overflow_fix_names_the_module_to_keep_in_float32():
    from nanscope.core.fixes import fixes_for

    f = fixes_for(Category.OVERFLOW, framework="torch", module="block.ffn.wo", dtype="float16")
    assert "model.block.ffn.wo(x.float())" in f[0] and "bfloat16" in f[1]


def test_where_trap_is_named_even_when_the_forward_op_is_sqrt():
    # where(x > 0, sqrt(x), 0) with x < 0: sqrt made NaN in the discarded branch; its backward
    # multiplied the zero gradient by it. The where trap must be said, not "sqrt at 0".
    x = np.array([-1.0, 4.0], np.float32)
    with np.errstate(invalid="ignore"):
        y = np.sqrt(x)
    d = ev(
        "SqrtBackward0",
        Phase.BACKWARD,
        [x],
        y,
        forward_op="aten::sqrt",
        forward_inputs=[summarize(x)],
        details={"where_trap": True},
    )
    assert d.category is Category.SINGULAR_GRADIENT
    assert "where trap" in d.summary and "discarded" in d.evidence[0]


def test_audit_fixes_name_the_numbers_and_the_framework():
    from nanscope.core.fixes import audit_fixes

    f = audit_fixes("label_out_of_range", num_classes=21, ignore_index=255)
    assert "[0, 21)" in f[0] and "255" in f[0]
    assert "Rescaling" in audit_fixes("unnormalized_input", framework="keras")[0]
    assert "Normalize" in audit_fixes("unnormalized_input", framework="torch")[0]
    assert audit_fixes("no_such_problem")


def test_with_history_tells_explosion_from_one_off():
    from nanscope.core.diagnosis import Diagnosis
    from nanscope.core.rules import with_history

    one_off = Diagnosis(Category.OP_DOMAIN, "inf - inf", phase="forward", op="aten::sub")
    steady = [1.0, 1.2, 0.9, 1.1, 1.0]
    assert with_history(one_off, steady) is one_off
    growing = [0.5, 2.0, 9.0, 40.0, 170.0, 800.0]
    d = with_history(one_off, growing, lr=5.0)
    assert (
        d.category is Category.EXPLODING_GRADIENTS
        and d.op == "aten::sub"
        and d.phase is Phase.FORWARD
    )
    assert "learning rate 5" in d.summary and any("inf - inf" in e for e in d.evidence)
    bad_data = Diagnosis(Category.NONFINITE_INPUT, "NaN pixel", phase="data", samples=[3])
    assert with_history(bad_data, growing) is bad_data


def test_nll_loss_forward_is_cross_entropy():
    from nanscope.core.enums import OpKind

    assert OpKind.of("aten::nll_loss_forward") is OpKind.CROSS_ENTROPY
    assert OpKind.of("aten::nll_loss2d_forward.default") is OpKind.CROSS_ENTROPY


def test_tensorflow_op_names_normalize():
    from nanscope.core.enums import OpKind

    names = {
        "MatMul": "matmul",
        "Conv2D": "conv",
        "Conv3D": "conv",
        "BiasAdd": "add",
        "SqrtGrad": "sqrt",
        "Conv2DBackpropInput": "conv",
        "BatchMatMulV2": "matmul",
        "RealDiv": "div",
        "Xlogy": "log",
    }
    assert {n: str(OpKind.of(n)) for n in names} == names


def test_bce_gradient_at_exact_probabilities_suggests_logits():
    from nanscope.core.fixes import fixes_for

    f = fixes_for(
        Category.SINGULAR_GRADIENT,
        op_kind="other",
        forward_op_kind="cross_entropy",
        framework="torch",
    )
    assert (
        "binary_cross_entropy_with_logits" in f[0]
        and "nanscope.losses.binary_cross_entropy" in f[0]
    )


def test_matmul_nan_from_huge_finite_inputs_is_overflow_in_the_accumulation():
    a = summarize(np.array([[1e20, 1e20]], dtype=np.float32))
    w = summarize(np.array([[1e20], [-1e20]], dtype=np.float32))
    out = summarize(np.array([[np.nan]], dtype=np.float32))
    d = classify_producer(ProducerEvidence("MatMul", Phase.FORWARD, [a, w], out, framework="keras"))
    assert d.category is Category.OVERFLOW and "inf - inf" in d.evidence[0]
    small = summarize(np.array([[1.0, 2.0]], dtype=np.float32))
    d = classify_producer(
        ProducerEvidence("MatMul", Phase.FORWARD, [small, small], out, framework="keras")
    )
    assert d.category is Category.UNKNOWN


def test_optimizer_state_says_when_eps_underflows():
    from nanscope.core.rules import optimizer_state

    w = summarize(np.array([np.nan, 1.0], np.float16))
    d = optimizer_state({"fc.weight": w}, eps=1e-8, param_dtype="float16")
    assert "rounds to 0 in float16" in d.summary and "fc.weight" in d.summary
    d32 = optimizer_state({"fc.weight.exp_avg_sq": w}, eps=1e-8, param_dtype="float32")
    assert d32.summary.startswith("optimizer state went non-finite")


def test_nonfinite_input_without_a_name_says_what_was_seen():
    from nanscope.core.rules import nonfinite_input

    s = summarize(np.array([[1.0, np.nan], [0.0, 2.0]], np.float32))
    named = nonfinite_input("images", s, [0])
    assert named.summary.startswith(
        "the batch's input 'images' holds 1 non-finite value (sample 0)"
    )
    unnamed = nonfinite_input(None, s, [0])
    assert unnamed.summary.startswith("an input tensor already held 1 non-finite value (sample 0)")
    assert unnamed.evidence[0].startswith("input tensor: float32[2, 2]")


def test_nonfinite_input_in_every_sample_points_at_preprocessing():
    from nanscope.core.rules import nonfinite_input

    with np.errstate(divide="ignore"):
        x = np.random.default_rng(0).uniform(size=(20, 4)).astype(np.float32) / 0.0
    d = nonfinite_input("x", summarize(x), list(range(20)), framework="keras")
    assert "every sample is bad" in d.summary and d.fixes[0].startswith("check the preprocessing")
    assert d.evidence[1] == "bad samples: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, … (20 in all)"
    one = x.copy()
    one[1:] = 1.0
    d1 = nonfinite_input("x", summarize(one), [0], framework="keras")
    assert "every sample" not in d1.summary and d1.fixes[0].startswith("drop or repair")


def test_log_fix_fits_what_the_log_was_taken_of():
    x = summarize(np.array([0.5, 0.0], dtype=np.float32))
    y = summarize(np.array([-0.69, -np.inf], dtype=np.float32))
    of_softmax = classify_producer(
        ProducerEvidence("aten::log", Phase.LOSS, [x], y, details={"input_op": "softmax"})
    )
    of_relu = classify_producer(
        ProducerEvidence("aten::log", Phase.LOSS, [x], y, details={"input_op": "other"})
    )
    assert of_softmax.fixes[0].startswith("replace log(softmax(x)) with log_softmax(x)")
    assert of_relu.fixes[0].startswith("clamp the argument away from 0")
    assert not any("softmax" in f for f in of_relu.fixes)
