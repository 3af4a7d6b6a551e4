"""`nanscope run` (in-process, through nanscope.cli.main) on scripts written the way people
write them: inference and evaluation are watched, custom train steps and add_loss terms are
explained, and a run leaves no patch behind."""

import json
import sys
from pathlib import Path

import keras
import pytest
import tensorflow as tf

from nanscope.cli.main import main

SCRIPTS = Path(__file__).parent / "scripts"


def nanscope_run(tmp_path, script, *args):
    out = tmp_path / f"{Path(script).stem}.json"
    rc = main(["run", "--json", str(out), str(SCRIPTS / script), *args])
    return rc, json.loads(out.read_text())


def test_predict_with_corrupt_batchnorm_is_corrupt_norm_statistics(tmp_path, capsys):
    rc, report = nanscope_run(tmp_path, "predict_bn_functional.py")
    assert rc == 1 and report["status"] == "nonfinite" and report["framework"] == "keras"
    d = report["diagnosis"]
    assert d["category"] == "corrupt_norm_statistics" and d["phase"] == "state"
    assert d["op_kind"] == "batch_norm" and d["module"] == "conv_bn"
    assert d["samples"] == list(range(16))  # channel 1 is NaN everywhere: every row of batch 0
    assert d["evidence"][0] == "in model.predict, batch 0 (inference)"
    assert "in model.predict, batch 0 (inference)" in d["summary"]
    assert "conv_bn: moving_variance: 1 negative (min -4)" in d["evidence"]
    assert "first non-finite output in inference mode: Rsqrt in layer conv_bn" in d["evidence"]
    assert d["details"]["call"] == {"call": "model.predict", "batch": 0, "mode": "inference"}
    assert "prediction finite" not in capsys.readouterr().out


def test_evaluate_with_nan_targets_names_the_batch_and_samples(tmp_path):
    rc, report = nanscope_run(tmp_path, "evaluate_nan_targets.py")
    d = report["diagnosis"]
    assert rc == 1 and d["category"] == "invalid_target" and d["phase"] == "data"
    assert d["samples"] == [1, 5] and d["evidence"][0] == "in model.evaluate, batch 1 (inference)"
    assert "dropna" in d["fixes"][0] and "tf.boolean_mask" in d["fixes"][1]  # Keras spelling


def test_predict_on_batch_of_a_subclassed_model_with_a_nan_request(tmp_path, capsys):
    rc, report = nanscope_run(tmp_path, "subclassed_predict_on_batch.py")
    d = report["diagnosis"]
    assert (
        rc == 1
        and d["category"] == "nonfinite_input"
        and d["phase"] == "data"
        and d["samples"] == [2]
    )
    assert d["evidence"][0] == "in model.predict_on_batch (inference)"
    assert (
        capsys.readouterr().out.count("scores finite: True") == 1
    )  # stopped at the second request


def test_eager_inference_call_names_the_log_in_the_custom_layer(tmp_path):
    rc, report = nanscope_run(tmp_path, "call_inference_log.py")
    d = report["diagnosis"]
    assert rc == 1 and d["category"] == "op_domain" and d["phase"] == "forward"
    assert (
        d["op"] == "Log"
        and d["op_kind"] == "log"
        and d["module"] == "log_features"
        and d["samples"] == [1]
    )
    assert (
        d["location"]["file"].endswith("call_inference_log.py")
        and d["location"]["function"] == "call"
    )
    assert d["evidence"][0] == "in model(x, training=False) (inference)"


def test_fit_validation_loss_inf_is_diagnosed(tmp_path, capsys):
    rc, report = nanscope_run(tmp_path, "fit_validation_nan.py")
    d = report["diagnosis"]
    assert (
        rc == 1
        and d["category"] == "invalid_target"
        and d["phase"] == "data"
        and d["samples"] == [3]
    )
    assert d["evidence"][0] == "in model.evaluate, batch 0 (inference)"
    assert "val_loss" not in capsys.readouterr().out
    from nanscope.keras import guard

    assert guard.ACTIVE == 0  # the guard of the fit that ended in the failure is off


def test_train_step_override_without_scale_loss_is_explained_by_its_own_loss(tmp_path, capsys):
    rc, report = nanscope_run(tmp_path, "train_step_override.py")
    d = report["diagnosis"]
    assert rc == 1 and d["category"] == "op_domain" and d["phase"] == "loss"
    assert (
        d["op"] == "Log"
        and d["op_kind"] == "log"
        and d["step"] == 2
        and d["samples"] == [0, 1, 2, 3]
    )
    assert (
        d["location"]["file"].endswith("train_step_override.py")
        and d["location"]["function"] == "train_step"
    )
    assert "training finished" not in capsys.readouterr().out


def test_add_loss_producer_that_reaches_only_the_loss_is_named(tmp_path):
    rc, report = nanscope_run(tmp_path, "add_loss_log.py")
    d = report["diagnosis"]
    # The penalty's log ran first and reached the loss; the later sqrt reached the output.
    assert (
        rc == 1 and d["category"] == "op_domain" and d["op"] == "Log" and d["module"] == "penalty"
    )
    assert d["phase"] == "forward" and d["step"] == 0 and d["location"]["function"] == "call"


def test_nan_loss_with_no_optimizer_step_after_it_is_not_clean(tmp_path, capsys):
    rc, report = nanscope_run(tmp_path, "loop_accumulate_nan_target.py")
    d = report["diagnosis"]
    assert (
        rc == 1
        and d["category"] == "invalid_target"
        and d["phase"] == "data"
        and d["samples"] == [1]
    )
    assert capsys.readouterr().out.count("micro-batch loss") == 2


def test_the_same_script_gives_the_same_diagnosis_every_run(tmp_path):
    for script in ("predict_bn_functional.py", "train_step_override.py"):
        (tmp_path / "first").mkdir()
        (tmp_path / "second").mkdir()
        assert nanscope_run(tmp_path / "first", script) == nanscope_run(tmp_path / "second", script)
        tmp_path = tmp_path / "again"
        tmp_path.mkdir()


# -- leave no trace -----------------------------------------------------------------------------


def _patchable():
    from keras.src.optimizers.base_optimizer import BaseOptimizer
    from tensorflow.python.eager.polymorphic_function import polymorphic_function

    owners = [
        *keras.Model.__mro__,
        tf.GradientTape,
        BaseOptimizer,
        polymorphic_function.Function,
        keras.losses.Loss,
    ]
    return {(o, name): value for o in owners for name, value in vars(o).items()}


def test_run_leaves_every_patched_attribute_as_it_was(tmp_path):
    from tensorflow.python.framework import op_callbacks

    from nanscope.keras import guard

    before = _patchable()
    callbacks = list(op_callbacks._state.callbacks) if hasattr(op_callbacks, "_state") else None
    # a failing run (predict) and a clean one that goes through fit, the loops and predict
    nanscope_run(tmp_path, "predict_bn_functional.py")
    rc = main(["run", str(SCRIPTS / "healthy_subclassed.py"), str(tmp_path / "w.npy")])
    assert rc == 0
    after = _patchable()
    assert after.keys() == before.keys()
    changed = [f"{o.__name__}.{n}" for (o, n), v in before.items() if after[(o, n)] is not v]
    assert changed == []
    assert guard.ACTIVE == 0
    if callbacks is not None:
        assert list(op_callbacks._state.callbacks) == callbacks
    from nanscope.keras import runner

    assert runner._RUNNERS == {}


# -- nanscope's own errors, other backends ----------------------------------------------------------


def test_an_internal_error_warns_once_naming_nanscope_and_the_script_runs_on(
    tmp_path, monkeypatch, capsys
):
    from nanscope.keras import evaluate

    def broken(*args, **kwargs):
        raise KeyError("outputs")

    monkeypatch.setattr(evaluate, "finite_values", broken)
    with pytest.warns(RuntimeWarning) as caught:
        rc = main(["run", str(SCRIPTS / "healthy_functional.py"), str(tmp_path / "w.npy")])
    assert rc == 0 and "predict" in capsys.readouterr().out and (tmp_path / "w.npy").exists()
    messages = [str(w.message) for w in caught if "nanscope" in str(w.message)]
    assert len(messages) == 1
    assert messages[0].startswith(
        "nanscope: internal error in nanscope's Keras evaluate watcher (KeyError"
    )
    assert (
        "this is a bug in nanscope, not in your script; the run continues unwatched" in messages[0]
    )
    assert (
        "(KeyError: 'outputs', at nanscope/keras/runner.py:" in messages[0]
    )  # what broke, where in nanscope


def test_jax_backend_gets_one_line_and_runs_unwatched(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    before = _patchable()
    out = tmp_path / "r.json"
    rc = main(["run", "--json", str(out), str(SCRIPTS / "predict_bn_functional.py")])
    assert _patchable().keys() == before.keys()
    err = capsys.readouterr()
    assert rc == 0 and "prediction finite: False" in err.out  # unwatched: the script ran to its end
    lines = [line for line in err.err.splitlines() if line.startswith("nanscope")]
    assert lines == [
        "nanscope: Keras on the jax backend is not supported yet; this script runs unwatched "
        "(set KERAS_BACKEND=tensorflow or KERAS_BACKEND=torch to have it watched)"
    ]
    assert json.loads(out.read_text())["status"] == "clean"


@pytest.mark.skipif(
    sys.modules.get("jax") is None and __import__("importlib").util.find_spec("jax") is None,
    reason="jax is not installed (the message path is tested above)",
)
def test_jax_backend_for_real(tmp_path):  # pragma: no cover - jax not in this environment
    import os
    import subprocess

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanscope",
            "run",
            str(SCRIPTS / "healthy_functional.py"),
            str(tmp_path / "w.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert proc.returncode == 0 and "not supported yet" in proc.stderr
