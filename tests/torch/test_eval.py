"""diagnose_eval on validation runs that really go NaN: an all-ignore mask, corrupt BatchNorm
statistics, a NaN image; a healthy validation is silent; the model is restored."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from nanscope.core.enums import Category
from nanscope.torch import diagnose_eval

sys.path.insert(0, str(Path(__file__).parent / "scenarios"))


def seg(name):
    s = importlib.import_module(name).build()
    for batch in s.batches:  # train as the script does: the training loss stays finite
        s.optimizer.zero_grad()
        assert torch.isfinite(s.train_step(batch))
        s.optimizer.step()
    return s


def loss_fn(out, y):
    return F.cross_entropy(out, y, ignore_index=255)


def test_all_ignore_mask_is_invalid_target():
    s = seg("seg_ignore")
    d = diagnose_eval(s.model, s.val_batches, loss_fn)
    assert d.category is Category.INVALID_TARGET and d.op_kind == "cross_entropy"
    assert d.details["bad_batches"] == [2] and d.details["batch"] == 2 and d.samples == [0]
    assert any("0 valid targets" in e for e in d.evidence)


def test_corrupt_running_var_names_the_bn_layer():
    s = seg("bn_eval")
    d = diagnose_eval(s.model, s.val_batches, loss_fn)
    assert d.category is Category.CORRUPT_NORM_STATISTICS and d.module == "context.1"
    assert d.details["bad_batches"] == [0, 1, 2, 3]
    assert "train-mode output finite: True; eval-mode output finite: False" in d.evidence[0]
    assert "repair_norm_statistics" in d.fixes[0]


def test_nan_image_in_validation():
    s = seg("healthy_bn_ignore")
    s.val_batches[1][0][0, 0, 2, 2] = float("nan")
    d = diagnose_eval(s.model, s.val_batches, loss_fn)
    assert (
        d.category is Category.NONFINITE_INPUT
        and d.samples == [0]
        and d.details["bad_batches"] == [1]
    )


def test_healthy_validation_is_silent_and_restores_the_model():
    s = seg("healthy_bn_ignore")
    s.model.train()
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    assert diagnose_eval(s.model, s.val_batches, loss_fn) is None
    assert s.model.training and torch.is_grad_enabled()
    assert all(torch.equal(before[k], v) for k, v in s.model.state_dict().items())


def test_bn_eval_restores_running_stats_after_the_train_mode_comparison():
    s = seg("bn_eval")
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    diagnose_eval(s.model, s.val_batches, loss_fn, max_batches=1)
    after = s.model.state_dict()
    assert all(
        torch.equal(before[k], after[k]) or (before[k].isnan() == after[k].isnan()).all()
        for k in before
    )
    assert all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)
