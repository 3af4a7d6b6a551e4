"""Guard inside a real model.fit: the bad update is never applied, policies, compiled steps,
BackupAndRestore, LossScaleOptimizer, and healthy runs that raise no alarm."""

import warnings

import keras
import numpy as np
import pytest

from nanscope.core.enums import Category, Phase
from nanscope.core.errors import NonFiniteError
from nanscope.keras import Guard
from nanscope.keras.guard import NonFiniteWarning


def small_cnn(jit_compile=False, optimizer=None, run_eagerly=False):
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, padding="same", name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, name="logits"),
        ]
    )
    model.compile(
        optimizer or keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,
        run_eagerly=run_eagerly,
    )
    return model


def data(n=16, bad_rows=()):
    x = np.random.rand(n, 8, 8, 3).astype("float32")
    for r in bad_rows:
        x[r, 1, 2, 0] = np.nan
    return x, np.random.randint(0, 3, n)


def snapshot(model):
    return (
        [v.numpy().copy() for v in model.variables],
        [v.numpy().copy() for v in model.optimizer.variables],
    )


def unchanged(model, snap):
    weights, opt = snap
    return all(
        np.array_equal(a, v.numpy()) for a, v in zip(weights, model.variables, strict=True)
    ) and all(
        np.array_equal(a, v.numpy()) for a, v in zip(opt, model.optimizer.variables, strict=True)
    )


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(1)
    model = small_cnn()
    model.fit(*data(), batch_size=8, verbose=0)  # builds optimizer state (Adam moments, iterations)
    return model


@pytest.mark.parametrize("mode", ["tf.function", "jit_compile", "run_eagerly"])
def test_raise_keeps_every_variable_exactly(mode):
    model = small_cnn(jit_compile=mode == "jit_compile", run_eagerly=mode == "run_eagerly")
    model.fit(*data(), batch_size=8, verbose=0)
    snap = snapshot(model)
    x, y = data(bad_rows=[3])
    guard = Guard(policy="raise")
    with pytest.raises(NonFiniteError) as info:
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[guard])
    d = info.value.diagnosis
    assert (
        d.category is Category.NONFINITE_INPUT
        and d.phase is Phase.DATA
        and d.samples == [3]
        and d.step == 0
    )
    assert unchanged(model, snap)  # weights, BatchNorm moving statistics, Adam moments, iterations
    assert np.array_equal(guard.batch[0].numpy()[3], x[3], equal_nan=True)  # the batch is kept
    assert "train_step" not in vars(model) and "apply" not in vars(
        model.optimizer
    )  # patches removed


def test_skip_drops_only_the_bad_batch_and_keeps_training(trained):
    model = trained
    x, y = data(n=24, bad_rows=[10])
    iterations = int(model.optimizer.iterations.numpy())
    guard = Guard(policy="skip")
    with pytest.warns(NonFiniteWarning, match="update skipped"):
        history = model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[guard])
    assert guard.skipped == 1 and guard.diagnoses[0].step == 1 and guard.diagnoses[0].samples == [2]
    assert int(model.optimizer.iterations.numpy()) == iterations + 2  # 3 batches, 1 skipped
    assert np.isfinite(history.history["loss"][0])  # metrics restored too
    assert all(np.isfinite(v.numpy()).all() for v in model.variables)


# Keras' own checkpoint writer trips numpy 2's __array__(copy=) deprecation; not ours.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_stop_ends_training_and_backup_and_restore_keeps_its_backup(tmp_path, trained):
    model = trained
    backup = tmp_path / "backup"
    x, y = data(n=32, bad_rows=[17])
    guard = Guard(policy="stop")
    with pytest.warns(NonFiniteWarning, match="training stopped"):
        history = model.fit(
            x,
            y,
            batch_size=8,
            epochs=3,
            shuffle=False,
            verbose=0,
            callbacks=[keras.callbacks.BackupAndRestore(str(backup)), guard],
        )
    assert len(history.history["loss"]) == 1 and guard.skipped == 1
    assert backup.exists() and any(backup.iterdir())  # Keras would have deleted it
    assert all(np.isfinite(v.numpy()).all() for v in model.variables)


def test_warn_lets_the_update_through():
    model = small_cnn()
    x, y = data(bad_rows=[0])
    guard = Guard(policy="warn")
    with pytest.warns(NonFiniteWarning, match="update applied"):
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[guard])
    assert len(guard.diagnoses) == 1 and guard.skipped == 0
    assert not np.isfinite(model.get_layer("conv").kernel.numpy()).all()


def test_healthy_training_is_silent_and_compiled(trained):
    model = trained
    guard = Guard(policy="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(*data(n=32), batch_size=8, epochs=2, verbose=0, callbacks=[guard])
    assert guard.diagnoses == [] and guard.skipped == 0 and guard.history.grad_norm
    assert (
        model.train_function is None
    )  # the guarded step is dropped; the next fit traces a clean one
    model.fit(*data(n=8), batch_size=8, verbose=0)


def test_loss_scale_skip_is_not_a_failure(mixed_float16):
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=2.0**60)
    model = small_cnn(optimizer=opt)
    guard = Guard(policy="raise")
    model.fit(
        *data(), batch_size=8, verbose=0, callbacks=[guard]
    )  # the scale overflows and halves: fine
    assert guard.diagnoses == []
    assert float(model.optimizer.dynamic_scale.numpy()) < 2.0**60


def test_steps_per_execution_keeps_every_batch():
    model = small_cnn()
    model.compile(
        keras.optimizers.SGD(0.01),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=2,
    )
    x, y = data(n=32, bad_rows=[13])
    with pytest.raises(NonFiniteError) as info:
        model.fit(x, y, batch_size=4, shuffle=False, verbose=0, callbacks=[Guard(policy="raise")])
    assert (
        info.value.diagnosis.samples == [1]
        and info.value.diagnosis.category is Category.NONFINITE_INPUT
    )


def test_an_internal_error_is_a_warning_and_training_goes_on():
    import tensorflow as tf

    def ce_on_probabilities(y_true, logits):
        p = tf.nn.softmax(logits)
        y = tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), 3)
        return -tf.reduce_mean(tf.reduce_sum(y * tf.math.log(p), axis=-1))

    def broken(y_true, y_pred):  # the diagnosis re-run fails: nanscope's problem, not the user's
        raise RuntimeError("boom")

    model = small_cnn()
    model.compile(keras.optimizers.SGD(0.01), ce_on_probabilities)
    model.fit(*data(n=8), batch_size=8, verbose=0)
    head = model.get_layer("logits")
    head.kernel.assign(head.kernel * 1e6)
    guard = Guard(policy="skip", loss=broken)
    with pytest.warns(RuntimeWarning) as record:
        model.fit(*data(n=16), batch_size=8, verbose=0, callbacks=[guard])
    messages = [str(r.message) for r in record]
    assert any(
        m.startswith(
            "nanscope: internal error in nanscope's Keras fit guard, diagnosing the failed step "
            "(RuntimeError"
        )
        and "this is a bug in nanscope, not in your script" in m
        for m in messages
    )
    assert guard.skipped == 2 and guard.diagnoses[0].category is Category.UNKNOWN
    assert all(np.isfinite(v.numpy()).all() for v in model.variables)


class CustomStepModel(keras.Model):
    """A model with its own train_step, as Keras' "customizing fit" guide writes it."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="relu", name="hidden")
        self.out = keras.layers.Dense(1, name="out")

    def call(self, x):
        return self.out(self.hidden(x))

    def train_step(self, data):
        import tensorflow as tf

        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(y=y, y_pred=self(x, training=True))
        self.optimizer.apply(
            tape.gradient(loss, self.trainable_variables), self.trainable_variables
        )
        return {"loss": loss}


def test_custom_train_step_is_guarded_too():
    model = CustomStepModel()
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    x, y = np.random.rand(16, 4).astype("float32"), np.random.rand(16, 1).astype("float32")
    model.fit(x, y, batch_size=8, verbose=0)
    snap = snapshot(model)
    x[9, 2] = np.inf
    with pytest.raises(NonFiniteError) as info:
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[Guard(policy="raise")])
    assert (
        info.value.diagnosis.category is Category.NONFINITE_INPUT
        and info.value.diagnosis.samples == [1]
    )
    assert info.value.diagnosis.step == 1
    assert (
        int(model.optimizer.iterations.numpy()) == 2 + 1
    )  # first fit: 2 steps; the guarded fit: 1 good step
    assert all(np.isfinite(v.numpy()).all() for v in model.variables)
    assert not unchanged(
        model, snap
    )  # the good first batch was applied, the bad second one was not


def test_weights_an_update_overflowed_after_growing_norms_are_exploding_gradients():
    from nanscope.core import rules
    from nanscope.core.summary import summarize

    def overflowed_weights():
        bad = {"hidden.kernel": summarize(np.array([np.inf, 1.0], "float32"), "float32")}
        return rules.nonfinite_parameters(bad, framework="keras", step=5)

    growing, steady = Guard(policy="raise"), Guard(policy="raise")
    for guard, norms in ((growing, [1.0, 4.0, 16.0, 70.0, 300.0]), (steady, [1.0, 1.1, 0.9, 1.0])):
        guard._weights_finite_at_start = True
        for n in norms:
            guard.history.add(None, n)
    d = growing._blame_an_earlier_update(overflowed_weights(), 0.5)
    assert d.category is Category.EXPLODING_GRADIENTS and d.phase is Phase.OPTIMIZER
    # found at step 5, written by the update of step 4 (as nanscope.torch.Guard says it)
    assert (
        d.module == "hidden"
        and d.step == 4
        and d.details["grad_norms"] == [1.0, 4.0, 16.0, 70.0, 300.0]
    )
    assert "learning rate 0.5" in d.evidence and any(
        "finite when training began" in e for e in d.evidence
    )
    assert any(e.startswith("hidden.kernel: ") and "1 +Inf of 2" in e for e in d.evidence)
    d = steady._blame_an_earlier_update(overflowed_weights(), 0.5)
    assert (
        d.category is Category.NONFINITE_PARAMETERS
        and d.phase is Phase.OPTIMIZER
        and d.module == "hidden"
    )
    assert d.summary == "an update made weights non-finite: hidden.kernel"
    assert "finite when training began" in d.evidence[0] and d.evidence[-2].startswith(
        "learning rate 0.5"
    )
    assert (
        d.evidence[-1] == "the update of step 4 made them non-finite; step 5 found them"
        and d.step == 4
    )


def test_a_finite_gradient_past_float32_sum_of_squares_is_not_an_alarm():
    """Gradients of about 1e20 are finite; their float32 sum of squares (1e40) is not. The
    in-graph check settles that exactly instead of vetoing a finite update."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(
        keras.optimizers.SGD(learning_rate=1e-21),
        lambda y_true, y_pred: keras.ops.sum(y_pred) * 1e20,
    )
    before = model.get_weights()[0].copy()
    guard = Guard(policy="raise")
    model.fit(
        np.ones((4, 10), "float32"),
        np.zeros((4, 1), "float32"),
        batch_size=4,
        verbose=0,
        callbacks=[guard],
    )
    after = model.get_weights()[0]
    assert guard.skipped == 0 and guard.last is None
    assert np.isfinite(after).all() and not np.array_equal(after, before)
    assert guard.history.grad_norm[-1] == pytest.approx(4e20 * 10**0.5, rel=1e-3)
