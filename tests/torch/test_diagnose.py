"""diagnose(model, batch, loss_fn), trace_step and the checks on the scenario models: real
small models that really go NaN; the diagnosis fields are asserted; healthy steps are silent
and the model is left byte-for-byte as it was."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nanscope.core.enums import Category, Phase
from nanscope.torch import diagnose
from nanscope.torch._util import all_finite, finite_flag
from nanscope.torch.checks import check_batch, check_model_state, check_optimizer_state
from nanscope.torch.trace import trace_step

sys.path.insert(0, str(Path(__file__).parent / "scenarios"))


def scenario(name):
    return importlib.import_module(name).build()


def traced(name, batch_index):
    s = scenario(name)
    return trace_step(lambda: s.train_step(s.batches[batch_index]), model=s.model, step=7)


@pytest.mark.parametrize(
    "name,index,category,phase,op_kind,module,samples",
    [
        ("log_softmax", 1, "op_domain", "loss", "log", None, [3]),
        ("div_zero", 1, "op_domain", "forward", "div", "norm", [2]),
        ("sqrt_zero", 1, "singular_gradient", "backward", "sqrt", "distance", [1]),
        ("where_trap", 0, "singular_gradient", "backward", "sqrt", "act", None),
        ("fp16_overflow", 1, "overflow", "forward", "matmul", "encoder", [2]),
        ("exp_overflow", 1, "overflow", "forward", "exp", "softmax", [1]),
        ("attention_mask", 1, "all_masked_softmax", "forward", "softmax", "attn", [2]),
        ("ctc", 1, "invalid_target", "loss", "ctc_loss", None, [1]),
    ],
)
def test_trace_step_names_the_producer(name, index, category, phase, op_kind, module, samples):
    d = traced(name, index)
    assert (d.category, d.phase, d.op_kind, d.module) == (category, phase, op_kind, module)
    if samples is not None:
        assert d.samples == samples
    assert d.step == 7 and d.framework == "torch"
    assert d.location is not None and d.location.file.endswith(f"{name}.py")
    assert d.evidence and d.fixes


def test_where_trap_says_so_and_the_forward_was_finite():
    d = traced("where_trap", 0)
    assert d.details["where_trap"] and "where" in d.summary
    assert d.op == "SqrtBackward0"


def test_fp16_overflow_evidence_quotes_the_limit():
    d = traced("fp16_overflow", 1)
    assert d.dtype == "float16" and "65504" in d.evidence[0]
    assert "float32" in d.fixes[0] and "encoder" in d.fixes[0]


@pytest.mark.parametrize(
    "name",
    [
        "healthy_partial_mask",
        "healthy_double_where",
        "healthy_bn_ignore",
        "div_zero",
        "attention_mask",
    ],
)
def test_healthy_steps_are_silent(name):
    s = scenario(name)
    for batch in s.batches[:1]:  # batch 0 is healthy in every scenario named here
        assert trace_step(lambda: s.train_step(batch), model=s.model) is None  # noqa: B023


def test_nan_in_a_discarded_where_branch_without_gradient_is_silent():
    x = torch.tensor([-1.0, 4.0])
    assert trace_step(lambda: torch.where(x > 0, torch.sqrt(x), 0.0).sum()) is None


def test_masked_fill_minus_inf_is_legitimate():
    scores = torch.randn(2, 3, requires_grad=True)
    mask = torch.tensor([[False, True, True], [False, False, True]])
    assert (
        trace_step(lambda: scores.masked_fill(mask, float("-inf")).logsumexp(-1).sum().backward())
        is None
    )


# -- diagnose ------------------------------------------------------------------------------


def test_diagnose_nonfinite_input_names_the_sample():
    s = scenario("nan_input")
    d = diagnose(s.model, s.batches[2], F.cross_entropy, step=3)
    assert (d.category, d.phase, d.samples, d.step) == (
        Category.NONFINITE_INPUT,
        Phase.DATA,
        [5],
        3,
    )


def test_diagnose_nonfinite_weight():
    s = scenario("checkpoint_nan")
    d = diagnose(s.model, s.batches[0], F.cross_entropy)
    assert d.category is Category.NONFINITE_PARAMETERS and d.module == "fc1"
    assert "fc1.weight" in d.summary


def test_diagnose_op_in_a_custom_layer():
    s = scenario("div_zero")
    d = diagnose(s.model, s.batches[1], F.cross_entropy)
    assert (d.category, d.op, d.module, d.samples) == (Category.OP_DOMAIN, "aten::div", "norm", [2])


def test_diagnose_optimizer_state():
    s = scenario("adam_fp16")
    s.optimizer.zero_grad()
    s.train_step(s.batches[0])
    s.optimizer.step()
    d = check_optimizer_state(s.optimizer, model=s.model)
    assert d.category is Category.OPTIMIZER_STATE and d.dtype == "float16"
    assert "rounds to 0" in d.evidence[0]


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_diagnose_leaves_no_trace():
    s = scenario("nan_input")  # has BatchNorm: a train-mode forward moves its running stats
    model = s.model
    model.train()
    model[1].eval()  # a mixed mode must come back as it was
    s.train_step(s.batches[0])  # existing gradients must come back too
    before, grads = _snapshot(model), [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    with torch.no_grad():
        assert diagnose(model, s.batches[1], F.cross_entropy) is None
        assert not torch.is_grad_enabled()
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    assert model.training and not model[1].training
    assert torch.equal(rng, torch.get_rng_state())
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    assert _get_current_dispatch_mode() is None
    assert torch.nn.modules.module._global_forward_hooks == {}
    assert torch.nn.modules.module._global_forward_pre_hooks == {}


def test_diagnose_restores_bn_statistics_after_a_failing_step():
    s = scenario("div_zero")
    before = _snapshot(s.model)
    d = diagnose(s.model, s.batches[1], F.cross_entropy)
    assert (d.category, d.op, d.module, d.samples) == (Category.OP_DOMAIN, "aten::div", "norm", [2])
    assert all(torch.equal(before[k], v) for k, v in _snapshot(s.model).items())


# -- checks --------------------------------------------------------------------------------


def test_check_batch_nested_and_targets():
    x = {"image": torch.ones(3, 2), "extra": [torch.ones(3)]}
    x["extra"][0][1] = float("inf")
    d = check_batch(x)
    assert d.category is Category.NONFINITE_INPUT and d.samples == [1] and '"extra"' in d.summary
    d = check_batch(torch.ones(2, 2), torch.tensor([[0.0], [float("nan")]]))
    assert d.category is Category.INVALID_TARGET and d.samples == [1]
    assert check_batch(torch.ones(2), torch.tensor([1, 2])) is None


def test_check_model_state_negative_running_var_and_buffers():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    assert check_model_state(net) is None
    with torch.no_grad():
        net[1].running_var[1] = -3.0
    d = check_model_state(net)
    assert d.category is Category.CORRUPT_NORM_STATISTICS and d.module == "1"
    assert any("negative" in e for e in d.evidence)


# -- the fast finite checks against a slow obvious reference ---------------------------------

_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -0.0, 65504.0, 7e4, 3e38, -3e38, 1e-45]),
)


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(_VALUES, min_size=0, max_size=40),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
)
def test_all_finite_matches_isfinite(values, dtype):
    t = torch.tensor(values, dtype=torch.float64).to(
        dtype
    )  # casting may overflow: that is the point
    expected = bool(torch.isfinite(t).all()) if t.numel() else True
    assert all_finite(t) is expected
    if t.numel() and not expected:  # the cheap flag never misses a non-finite value
        assert not bool(torch.isfinite(finite_flag(t)))
