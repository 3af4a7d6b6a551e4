"""nanscope.hf in real transformers Trainer runs that really go NaN (tiny models from configs).

The distillation loss (hf_models.DistillTrainer) is a hand-written KL(teacher || student); the
rows of one step carry a one-hot teacher, so 0 * log 0 = NaN in the loss while the gradients
stay finite: the Trainer's own log shows 'loss': 0 there and it applies the update.
"""

import warnings

import hf_models as H
import pytest
import torch
import transformers

import nanscope.hf
import nanscope.torch
from nanscope import NonFiniteError
from nanscope.core.enums import Category, OpKind, Phase

pytestmark = [
    pytest.mark.filterwarnings("ignore:nanscope:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Model config. (bos|eos)_token_id:UserWarning"),
]


def _train(tmp_path, *, data=None, policy="skip", via="guard", model=None, **kw):
    rec = H.Recorder()
    cbs = [rec]
    cb = None
    if via == "callbacks":
        cb = nanscope.hf.NanGuardCallback(policy, reports=str(tmp_path / "rep"))
        cbs.append(cb)
    trainer = H.DistillTrainer(
        model=model or H.gpt2(),
        args=H.args(tmp_path, **kw),
        train_dataset=data if data is not None else H.distill_data(),
        callbacks=cbs,
    )
    if via == "guard":
        cb = nanscope.hf.guard(trainer, policy=policy, reports=str(tmp_path / "rep"))
    trainer.train()
    return trainer, cb, rec


def _assert_kl_log(d):
    assert d.category is Category.OP_DOMAIN
    assert d.phase is Phase.LOSS
    assert d.op_kind is OpKind.LOG
    assert d.location is not None and d.location.function == "compute_loss"


@pytest.mark.parametrize("via", ["guard", "callbacks"])
def test_the_hidden_nan_loss_is_caught_and_the_step_really_skipped(tmp_path, via):
    trainer, cb, rec = _train(tmp_path, via=via)
    assert cb.nonfinite_steps, "the NaN loss went unnoticed"
    _assert_kl_log(cb.last)
    assert cb.skipped == len(cb.nonfinite_steps)
    for step in rec.lr:
        if step in cb.nonfinite_steps:
            assert rec.unchanged(step), f"vetoed step {step} changed the weights"
            assert rec.lr[step][0] == rec.lr[step][1], (
                f"the LR scheduler advanced on vetoed step {step}"
            )
        else:
            assert not rec.unchanged(step) and rec.lr[step][1] < rec.lr[step][0]
    logs = {e["step"]: e for e in trainer.state.log_history if "loss" in e}
    for step in cb.nonfinite_steps:
        assert (
            logs[step + 1]["loss"] == 0.0
        )  # what the Trainer alone shows (logging_nan_inf_filter)
    last = logs[max(logs)]
    assert last["nanscope/nonfinite_steps"] == len(cb.nonfinite_steps)
    assert last["nanscope/skipped_steps"] == cb.skipped
    assert (tmp_path / "rep").is_dir() and cb.last.bundle


def test_without_nanscope_the_trainer_applies_the_nan_step(tmp_path):
    """The issue, as a test: the NaN loss is logged as 0 and every update is applied."""
    trainer = H.DistillTrainer(
        model=H.gpt2(),
        args=H.args(tmp_path),
        train_dataset=H.distill_data(),
        callbacks=[rec := H.Recorder()],
    )
    trainer.train()
    assert all(not rec.unchanged(s) for s in rec.lr)
    assert 0.0 in [e["loss"] for e in trainer.state.log_history if "loss" in e]


def test_healthy_run_is_silent_and_bit_identical(tmp_path):
    data = H.distill_data(bad=None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        guarded, cb, _ = _train(tmp_path / "a", data=data)
    ours = [str(w.message) for w in seen if "nanscope" in str(w.message)]
    assert not ours, ours
    plain = H.DistillTrainer(model=H.gpt2(), args=H.args(tmp_path / "b"), train_dataset=data)
    plain.train()
    a, b = guarded.model.state_dict(), plain.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert cb.skipped == 0 and cb.last is None and cb.guard.steps == 6
    assert not (tmp_path / "a" / "rep").exists()


def test_raise_leaves_train_with_the_diagnosis(tmp_path):
    with pytest.raises(NonFiniteError) as err:
        _train(tmp_path, policy="raise")
    _assert_kl_log(err.value.diagnosis)


def test_stop_ends_training(tmp_path):
    trainer, cb, rec = _train(tmp_path, policy="stop")
    assert cb.should_stop
    assert trainer.state.global_step == cb.nonfinite_steps[0] + 1
    assert rec.unchanged(cb.nonfinite_steps[0])


def _overflowing_gpt2() -> transformers.GPT2LMHeadModel:
    """float16 GPT-2 whose second MLP's up-projection has weights of order 1e4: its output
    passes float16's 65504."""
    model = H.gpt2()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight.normal_(0, 1e4)
    return model.half()


def test_float16_gpt2_mlp_overflow_names_the_module():
    batch = {
        "input_ids": torch.randint(0, H.VOCAB, (2, H.SEQ)),
        "labels": torch.randint(0, H.VOCAB, (2, H.SEQ)),
    }

    def loss_fn(out, labels):
        return torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten())

    d = nanscope.torch.diagnose(_overflowing_gpt2(), batch, loss_fn)
    assert d.category is Category.OVERFLOW
    assert d.phase is Phase.FORWARD
    assert d.op_kind is OpKind.MATMUL
    assert d.module == "transformer.h.1.mlp.c_fc"
    assert d.dtype == "float16"


class _LMTrainer(transformers.Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(input_ids=inputs["input_ids"])
        loss = torch.nn.functional.cross_entropy(
            out.logits.float().flatten(0, 1), inputs["labels"].flatten()
        )
        return (loss, out) if return_outputs else loss


def test_float16_gpt2_mlp_overflow_under_the_callback(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = [
        {
            "input_ids": torch.randint(0, H.VOCAB, (H.SEQ,), generator=g),
            "labels": torch.randint(0, H.VOCAB, (H.SEQ,), generator=g),
        }
        for _ in range(8)
    ]
    model = _overflowing_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _LMTrainer(model=model, args=H.args(tmp_path, max_steps=2), train_dataset=data)
    cb = nanscope.hf.guard(trainer, policy="skip", reports=None)
    trainer.train()
    d = cb.last
    assert (
        d.category is Category.OVERFLOW
        and d.module == "transformer.h.1.mlp.c_fc"
        and d.op_kind is OpKind.MATMUL
    )
    assert cb.skipped == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
