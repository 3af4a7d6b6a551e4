"""nanscope.lightning.NanGuard in real Lightning runs that really go NaN.

The model (lit_models.Net) has a residual path that BatchNorm does not normalize; batch 3 of
the data has inputs 1e4 times larger, so the softmax rounds classes to exactly 0 and the
hand-written NLL takes log(0): op_domain, in the loss, op_kind log.
"""

import warnings
from pathlib import Path

import lit_models as M
import pytest
import torch

from nanscope import NonFiniteError
from nanscope.core.enums import Category, OpKind, Phase
from nanscope.lightning import NanGuard

pytestmark = pytest.mark.filterwarnings("ignore:nanscope:RuntimeWarning")


def _fit(guard, module=None, *, loader=None, **kw):
    rec = M.Recorder()
    t = M.trainer([guard, rec] if guard is not None else [rec], **kw)
    module = module or M.Net()
    t.fit(module, loader or M.data())
    return t, module, rec


def _assert_log_of_zero(d):
    assert d.category is Category.OP_DOMAIN
    assert d.phase is Phase.LOSS
    assert d.op_kind is OpKind.LOG
    assert d.location is not None and d.location.file.endswith("lit_models.py")
    assert d.step == M.BAD_BATCH


def _assert_skipped(rec, bad=M.BAD_BATCH):
    assert rec.unchanged(bad), "a vetoed step changed weights or BatchNorm buffers"
    assert rec.lr_before[bad] == rec.lr_after[bad], "the LR scheduler advanced on a vetoed step"
    for i in rec.before:
        if i != bad:
            assert not rec.unchanged(i), f"healthy step {i} was not applied"
            assert rec.lr_after[i] < rec.lr_before[i]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_skip_vetoes_the_step_and_names_the_log(precision):
    guard = NanGuard(policy="skip")
    with pytest.warns(RuntimeWarning, match="op_domain in loss"):
        t, _, rec = _fit(guard, precision=precision)
    _assert_log_of_zero(guard.last)
    assert guard.skipped == 1 and guard.counts == {"op_domain": 1}
    _assert_skipped(rec)
    assert t.global_step == 6  # training went on
    bundle = Path(guard.last.bundle)
    assert (bundle / "diagnosis.json").is_file() and (bundle / "state.pt").is_file()


def test_manual_optimization():
    guard = NanGuard(policy="skip")
    _, _, rec = _fit(guard, M.ManualNet())
    _assert_log_of_zero(guard.last)
    assert guard.skipped == 1
    assert rec.unchanged(M.BAD_BATCH)
    assert not rec.unchanged(M.BAD_BATCH + 1)


def test_healthy_run_is_silent_and_bit_identical():
    loader = M.data(bad=None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        guard = NanGuard(policy="skip")
        _, guarded, _ = _fit(guard, loader=loader)
    ours = [w for w in seen if "nanscope" in str(w.message)]
    assert not ours, [str(w.message) for w in ours]
    _, plain, _ = _fit(None, loader=loader)
    a, b = guarded.state_dict(), plain.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert guard.skipped == 0 and guard.last is None and sum(g.steps for g in guard.guards) == 6
    assert not Path("nanscope-reports").exists()


def test_raise_leaves_fit_with_the_diagnosis():
    with pytest.raises(NonFiniteError) as err:
        _fit(NanGuard(policy="raise", reports=None))
    _assert_log_of_zero(err.value.diagnosis)


def test_stop_ends_fit_cleanly():
    guard = NanGuard(policy="stop", reports=None)
    t, _, rec = _fit(guard)
    assert guard.should_stop and t.should_stop
    assert sorted(rec.before) == list(range(M.BAD_BATCH + 1))
    assert rec.unchanged(M.BAD_BATCH)


def test_warn_applies_the_update_after_explaining_it():
    guard = NanGuard(policy="warn", reports=None)
    _, module, rec = _fit(guard, max_steps=M.BAD_BATCH + 1)
    _assert_log_of_zero(guard.last)  # explained from the pre-update weights
    assert not rec.unchanged(M.BAD_BATCH)
    assert not all(
        torch.isfinite(p).all() for p in module.parameters()
    )  # NaN gradients were applied


def test_validation_nan_is_explained():
    guard = NanGuard(policy="skip", reports=None)
    t = M.trainer([guard], limit_val_batches=None, val_check_interval=2, max_steps=2)
    with pytest.warns(RuntimeWarning, match="in validation"):
        t.fit(M.Net(), M.data(n_batches=2, bad=None), val_dataloaders=M.data(n_batches=4, bad=1))
    assert guard.skipped == 0
    (d,) = guard.eval_diagnoses
    assert d.category is Category.OP_DOMAIN and d.op_kind is OpKind.LOG and d.phase is Phase.LOSS
    assert d.details["batch"] == 1


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's advice about checkpoint folders
def test_counters_survive_a_checkpoint_resume(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    guard = NanGuard(policy="skip", reports=None)
    ckpt = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=5
    )
    t = M.trainer([guard, ckpt], max_steps=5, enable_checkpointing=True)
    t.fit(M.Net(), M.data())
    assert guard.skipped == 1
    resumed = NanGuard(policy="skip", reports=None)
    ckpt2 = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt2", save_last=True, every_n_train_steps=5
    )
    t2 = M.trainer([resumed, ckpt2], max_steps=6, enable_checkpointing=True)
    t2.fit(M.Net(), M.data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.skipped == 1 and resumed.counts == {"op_domain": 1}
    assert resumed.guards[0].steps == 6
    _assert_log_of_zero(resumed.last)
    assert len(resumed.guards[0].history.loss) == 5  # 4 healthy steps before, 1 after the resume


def test_on_failure_and_sinks_callable():
    got, events = [], []
    guard = NanGuard(policy="skip", reports=None, on_failure=got.append, sinks=[events.append])
    _fit(guard)
    assert [d.category for d in got] == [Category.OP_DOMAIN]
    (e,) = events
    assert e.action == "skip" and e.skipped_steps == 1 and e.nonfinite_steps == 1
