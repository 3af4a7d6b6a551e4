"""The Guard on real training runs that really go NaN (tests/torch/scenarios), and on healthy
ones that must stay silent: category, phase, op, module, samples; skip keeps every weight,
buffer and optimizer state tensor bit-identical; policies; internal errors never kill training."""

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nanscope.torch.guard as guard_module
from nanscope.core.enums import Category, Phase
from nanscope.core.errors import NonFiniteError
from nanscope.torch import Guard

SCENARIOS = Path(__file__).parent / "scenarios"


def load(name):
    if str(SCENARIOS) not in sys.path:
        sys.path.insert(0, str(SCENARIOS))  # scenarios import each other (bn_eval -> seg_ignore)
    spec = importlib.util.spec_from_file_location(
        f"guard_scenario_{name}", SCENARIOS / f"{name}.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def snapshot(model, optimizer):
    state = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, s in enumerate(optimizer.state.values()):
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                state[f"opt.{i}.{k}"] = v.detach().clone()
    return state


_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t):
    """The raw bits of a float tensor (torch.equal says NaN != NaN; bit-identical is stricter)."""
    return t.view(_INT[t.element_size()]) if t.is_floating_point() else t


def assert_identical(before, after):
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(bits(before[k]), bits(after[k])), f"{k} changed"


def run_guarded(scenario, *, policy="skip", **kw):
    """Train the scenario under a Guard; check at every skipped step that nothing changed."""
    guard = Guard(scenario.model, scenario.optimizer, policy=policy, reports=None, **kw)
    messages = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in scenario.batches:
            before, skipped = snapshot(scenario.model, scenario.optimizer), guard.skipped
            guard.step(scenario.train_step, batch)
            if guard.skipped > skipped:
                assert_identical(before, snapshot(scenario.model, scenario.optimizer))
            if guard.should_stop:
                break
    messages += [str(w.message) for w in caught]
    return guard, messages


# name -> (category, phase, op_kind, module); samples and step come from the scenario's constants.
FAILING = {
    "nan_input": (Category.NONFINITE_INPUT, Phase.DATA, None, None),
    "div_zero": (Category.OP_DOMAIN, Phase.FORWARD, "div", "norm"),
    "log_softmax": (Category.OP_DOMAIN, Phase.LOSS, "log", None),
    "sqrt_zero": (Category.SINGULAR_GRADIENT, Phase.BACKWARD, "sqrt", "distance"),
    "where_trap": (Category.SINGULAR_GRADIENT, Phase.BACKWARD, "sqrt", "act"),
    "attention_mask": (Category.ALL_MASKED_SOFTMAX, Phase.FORWARD, "softmax", "attn"),
    "ctc": (Category.INVALID_TARGET, Phase.LOSS, "ctc_loss", None),
    "exp_overflow": (Category.OVERFLOW, Phase.FORWARD, "exp", "softmax"),
    "fp16_overflow": (Category.OVERFLOW, Phase.FORWARD, "matmul", "encoder"),
}


@pytest.mark.parametrize("name", sorted(FAILING))
def test_one_off_failures_are_skipped_and_explained(name):
    mod = load(name)
    category, phase, op_kind, module = FAILING[name]
    s = mod.build()
    guard, messages = run_guarded(s)
    d = guard.diagnoses[0]
    assert (d.category, d.phase, d.op_kind, d.module) == (category, phase, op_kind, module), str(d)
    assert d.framework == "torch" and d.fixes and d.evidence
    if hasattr(mod, "BAD_BATCH"):
        assert d.step == mod.BAD_BATCH
    if hasattr(mod, "BAD_SAMPLE"):
        assert d.samples == [mod.BAD_SAMPLE]
    # The failure is skipped, not fatal: the loop ran to the end and counted it.
    assert not guard.should_stop and guard.steps == len(s.batches)
    assert guard.skipped == guard.counts[str(category)] >= 1
    assert str(category) in messages[0] and "update skipped, training goes on" in messages[0]


def test_nan_batch_does_not_poison_batchnorm_and_training_goes_on():
    mod = load("nan_input")
    s = mod.build()
    bn = s.model[1]
    guard = Guard(s.model, s.optimizer, policy="skip", reports=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i, batch in enumerate(s.batches):
            stats = (
                bn.running_mean.clone(),
                bn.running_var.clone(),
                bn.num_batches_tracked.clone(),
            )
            weight = s.model[0].weight.detach().clone()
            guard.step(s.train_step, batch)
            if i == mod.BAD_BATCH:  # train-mode BN would have written NaN into running_mean
                assert all(
                    torch.equal(a, b)
                    for a, b in zip(
                        stats,
                        (bn.running_mean, bn.running_var, bn.num_batches_tracked),
                        strict=True,
                    )
                )
            else:  # healthy steps are applied as usual
                assert not torch.equal(weight, s.model[0].weight)
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(s.model[0].weight).all()
    assert guard.skipped == 1


@pytest.mark.parametrize(
    "name", ["healthy_bn_ignore", "healthy_double_where", "healthy_partial_mask"]
)
def test_healthy_runs_are_silent_and_bit_identical_to_unguarded(name, tmp_path):
    mod = load(name)
    plain = mod.build()
    for batch in plain.batches:
        plain.optimizer.zero_grad(set_to_none=True)
        plain.train_step(batch)
        plain.optimizer.step()
    s = mod.build()
    reports = tmp_path / "reports"
    guard = Guard(s.model, s.optimizer, policy="skip", reports=str(reports), check_weights_every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in s.batches:
            guard.step(s.train_step, batch)
    assert [str(w.message) for w in caught] == []
    assert (
        guard.skipped == 0 and guard.last is None and not guard.should_stop and not reports.exists()
    )
    assert_identical(snapshot(plain.model, plain.optimizer), snapshot(s.model, s.optimizer))


def test_nan_weight_from_a_checkpoint_stops_under_skip():
    s = load("checkpoint_nan").build()
    guard, messages = run_guarded(s)
    d = guard.last
    assert (d.category, d.phase, d.module, d.step) == (
        Category.NONFINITE_PARAMETERS,
        Phase.STATE,
        "fc1",
        0,
    )
    assert "fc1.weight" in d.summary
    assert guard.should_stop and guard.steps == 1  # skipping cannot repair a NaN weight
    assert "skipping cannot help" in messages[0]


def test_corrupt_running_var_is_caught_in_training_mode():
    s = load("bn_eval").build()
    guard, _ = run_guarded(s)
    d = guard.last
    assert (d.category, d.phase) == (Category.CORRUPT_NORM_STATISTICS, Phase.STATE)
    bad = [
        n
        for n, m in s.model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and not torch.isfinite(m.running_var).all()
    ]
    assert d.module == bad[0]


def test_adam_eps_in_float16_is_attributed_to_the_update_before():
    s = load("adam_fp16").build()
    guard, _ = run_guarded(s)
    d = guard.last
    assert (d.category, d.phase, d.dtype) == (Category.OPTIMIZER_STATE, Phase.OPTIMIZER, "float16")
    assert d.step == guard.steps - 2  # found at the next step's check
    assert any("eps=1e-08" in e and "rounds to 0" in e for e in d.evidence)
    assert guard.should_stop


def test_learning_rate_too_high_is_exploding_gradients_with_an_early_warning():
    s = load("lr_high").build()
    guard, messages = run_guarded(s, max_skips_in_a_row=3)
    d = guard.diagnoses[0]
    assert d.category is Category.EXPLODING_GRADIENTS
    assert "learning rate 0.03" in d.summary and "clip_grad_norm_" in d.fixes[1]
    early = [m for m in messages if "growing fast" in m]
    assert len(early) == 1 and messages.index(early[0]) == 0  # warned once, before the failure
    assert len(guard.history.grad_norm) >= 5
    # Exploded weights fail every batch: the guard gives up after 3 skips in a row.
    assert guard.should_stop and guard.skipped == 3


def test_one_off_failure_after_steady_norms_is_not_exploding():
    s = load("div_zero").build()
    guard, messages = run_guarded(s)
    assert guard.last.category is Category.OP_DOMAIN
    assert not any("growing fast" in m for m in messages)


def _tiny(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)

    def train_step(batch):
        x, y = batch
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(6, 4, generator=g), torch.randint(0, 2, (6,), generator=g)) for _ in range(4)
    ]
    batches[2][0][4, 0] = float("inf")
    return net, opt, train_step, batches


def test_policy_raise_carries_the_diagnosis_and_a_bundle(tmp_path):
    net, opt, train_step, batches = _tiny()
    guard = Guard(net, opt, policy="raise", reports=str(tmp_path))
    guard.step(train_step, batches[0])
    before = snapshot(net, opt)
    with pytest.raises(NonFiniteError) as info:
        guard.step(train_step, batches[2])
    d = info.value.diagnosis
    assert d.category is Category.NONFINITE_INPUT and d.samples == [4] and d.step == 1
    assert Path(d.bundle).parent == tmp_path and (Path(d.bundle) / "state.pt").is_file()
    assert_identical(before, snapshot(net, opt))
    assert all(p.grad is None for p in net.parameters())  # no NaN gradient left behind


def test_policy_stop_and_warn():
    net, opt, train_step, batches = _tiny()
    guard = Guard(net, opt, policy="stop", reports=None)
    with pytest.warns(RuntimeWarning, match="training stopped") as record:
        guard.step(train_step, batches[2])
    assert record[0].filename == __file__  # the warning points at the user's guard.step line
    assert guard.should_stop and guard.skipped == 1 and torch.isfinite(net[0].weight).all()

    net, opt, train_step, batches = _tiny()
    guard = Guard(net, opt, policy="warn", reports=None)
    with pytest.warns(RuntimeWarning, match="applied anyway"):
        guard.step(train_step, batches[2])
    assert not guard.should_stop and guard.skipped == 0
    assert not torch.isfinite(net[0].weight).all()  # the user asked for the update to go through


def test_rng_state_after_a_skipped_step_is_as_if_the_step_ran_once():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def train_step(x):
        loss = torch.log(net(x).abs().sum() * 0)  # log(0): fails every time
        loss.backward()
        return loss

    x = torch.randn(3, 4)
    torch.manual_seed(7)
    guard = Guard(net, opt, policy="skip", reports=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        guard.step(train_step, x)
    after_guarded = torch.get_rng_state()
    torch.manual_seed(7)
    net(x)  # the same step once, unguarded: one dropout mask drawn
    assert torch.equal(after_guarded, torch.get_rng_state())
    assert guard.last.category is Category.OP_DOMAIN and guard.last.op_kind == "log"


def test_internal_error_warns_once_and_training_goes_on_unguarded(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected failure in the replay")

    monkeypatch.setattr(guard_module, "_replay", broken)
    s = load("div_zero").build()
    guard = Guard(s.model, s.optimizer, policy="skip", reports=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in s.batches + [s.batches[1]]:  # the bad batch comes again at the end
            guard.step(s.train_step, batch)
    internal = [
        str(w.message)
        for w in caught
        if str(w.message).startswith("nanscope: internal error in nanscope's Guard")
    ]
    assert len(internal) == 1 and "injected failure" in internal[0] and "unguarded" in internal[0]
    # The failure it was explaining is still handled (skipped, with what was known) ...
    assert guard.skipped == 1 and guard.last.category is Category.UNKNOWN
    assert guard.steps == len(s.batches) + 1
    # ... and from then on training runs as if there were no guard: the last bad batch went through.
    assert not torch.isfinite(s.model.fc.weight).all()


def test_bundle_write_failure_is_a_warning_not_a_crash(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    net, opt, train_step, batches = _tiny()
    guard = Guard(net, opt, policy="skip", reports=str(not_a_folder))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in batches:
            guard.step(train_step, batch)
    texts = [str(w.message) for w in caught]
    assert any("could not write the repro bundle" in t for t in texts)
    assert guard.skipped == 1 and guard.last.bundle is None and guard.steps == 4


def test_guard_leaves_no_hooks_and_keeps_modes():
    net, opt, train_step, batches = _tiny()
    net.train()
    guard = Guard(net, opt, policy="skip", reports=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for batch in batches:
            guard.step(train_step, batch)
    assert net.training and torch.is_grad_enabled() and not torch.is_anomaly_enabled()
    for m in net.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert (
        not nn.modules.module._global_forward_hooks
        and not nn.modules.module._global_forward_pre_hooks
    )


def test_train_step_may_return_loss_with_outputs():
    net, opt, _, batches = _tiny()

    def train_step(batch):
        x, y = batch
        logits = net(x)
        loss = F.cross_entropy(logits, y) + torch.log(x[:, 1] - x[:, 1]).sum() * (
            y.sum() > 100
        )  # log(0) * 0: NaN
        loss.backward()
        return {"loss": loss, "logits": logits}

    guard = Guard(net, opt, policy="skip", reports=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = guard.step(train_step, batches[0])
    assert set(out) == {"loss", "logits"}
    assert guard.skipped == 1 and guard.last.op_kind == "log" and guard.last.phase is Phase.LOSS


def test_weights_outside_the_loss_are_checked_every_n_steps():
    torch.manual_seed(0)
    net = nn.ModuleDict({"body": nn.Linear(4, 2), "unused_head": nn.Linear(2, 2)})
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def train_step(batch):
        x, y = batch
        loss = F.cross_entropy(net["body"](x), y)
        loss.backward()
        return loss

    batch = (torch.randn(4, 4), torch.tensor([0, 1, 1, 0]))
    guard = Guard(net, opt, policy="stop", reports=None, check_weights_every=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard.step(train_step, batch)  # step 0: weights checked, all finite
        with torch.no_grad():
            net["unused_head"].weight[1, 0] = float("nan")  # written outside training (a bad load)
        guard.step(train_step, batch)  # steps 1 and 2 check loss and gradients only: they are fine
        guard.step(train_step, batch)
        assert not caught and guard.last is None
        guard.step(train_step, batch)  # step 3 checks the weights again
    d = guard.last
    assert (d.category, d.phase, d.module, d.step) == (
        Category.NONFINITE_PARAMETERS,
        Phase.STATE,
        "unused_head",
        3,
    )
    assert guard.should_stop


def test_policy_warn_applies_exactly_the_unguarded_update():
    def make():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 1))
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)

        def train_step(batch):
            x, shift = batch
            loss = torch.log(net(x).abs().squeeze(1) * shift).mean()  # log(0) where shift is 0
            loss.backward()
            return loss

        return net, opt, train_step

    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(5, 4, generator=g), torch.ones(5)) for _ in range(2)]
    batches[1][1][2] = 0.0  # the last step fails (after it, the weights are NaN either way)
    net, opt, train_step = make()
    for b in batches:  # no nanscope
        opt.zero_grad(set_to_none=True)
        train_step(b)
        opt.step()
    plain = snapshot(net, opt)

    net, opt, train_step = make()
    guard = Guard(net, opt, policy="warn", reports=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in batches:
            guard.step(train_step, b)
    assert len(caught) == 1 and "applied anyway" in str(caught[0].message)
    assert guard.last.op_kind == "log" and guard.last.samples == [2] and guard.skipped == 0
    assert_identical(plain, snapshot(net, opt))  # weights, BatchNorm statistics, Adam moments
    assert not torch.isfinite(net[0].weight).all()


def test_a_finite_gradient_past_float32_sum_of_squares_is_not_an_alarm():
    """Gradients of 1e20 are finite, but their float32 sum of squares (1e40) is not: the fused
    check must settle that exactly instead of vetoing a finite update."""
    torch.manual_seed(0)
    net = torch.nn.Linear(10, 1, bias=False)
    opt = torch.optim.SGD(net.parameters(), lr=1e-21)  # an update of 0.1
    guard = Guard(net, opt, policy="skip", reports=None)
    before = net.weight.detach().clone()

    def train_step(x):
        loss = (net(x) * 1e20).sum()
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not a word from the guard
        guard.step(train_step, torch.ones(1, 10))
    assert guard.skipped == 0 and guard.last is None
    assert not torch.equal(net.weight, before) and torch.isfinite(net.weight).all()
    assert guard.history.grad_norm[-1] == pytest.approx(1e20 * 10**0.5, rel=1e-6)
