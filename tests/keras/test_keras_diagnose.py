"""The seeds and root causes, reproduced with real Keras models that really go NaN.

Each test asserts the diagnosis fields (category, phase, op, op_kind, layer, samples) and
that nothing was left changed.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from nanscope.core.enums import Category, OpKind, Phase
from nanscope.core.errors import NonFiniteError
from nanscope.keras import Guard, diagnose


def _all_values(model):
    return [v.numpy().copy() for v in model.variables]


def _same(model, values):
    return all(
        np.array_equal(a, v.numpy(), equal_nan=True)
        for a, v in zip(values, model.variables, strict=True)
    )


# -- the x_train / 0.0 seed -------------------------------------------------------------------


def _seed_model():
    model = keras.Sequential(
        [keras.Input((784,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10)]
    )
    model.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def test_divided_by_zero_inputs_in_fit_are_nonfinite_input():
    x_train = tf.random.uniform((64, 784))
    y_train = tf.random.uniform((64,), maxval=10, dtype=tf.int32)
    x_train_with_nan = x_train / 0.0
    model = _seed_model()
    model.build((None, 784))
    before = _all_values(model)
    with pytest.raises(NonFiniteError) as info:
        model.fit(
            x_train_with_nan,
            y_train,
            epochs=3,
            batch_size=32,
            verbose=0,
            callbacks=[Guard(policy="raise")],
        )
    d = info.value.diagnosis
    assert (
        d.category is Category.NONFINITE_INPUT and d.phase is Phase.DATA and d.framework == "keras"
    )
    assert d.samples == list(range(32)) and d.step == 0
    assert "+Inf" in d.evidence[0]
    assert _same(model, before)


def test_only_the_rows_that_were_zero_are_nan():
    x = np.random.rand(8, 784).astype("float32")
    x[5] = 0.0  # 0/0 = NaN here, x/0 = Inf elsewhere; make row 2 finite to check the sample list
    x = (tf.constant(x) / 0.0).numpy()
    x[2] = 1.0
    d = diagnose(_seed_model(), (x, np.zeros(8, "int32")))
    assert d.category is Category.NONFINITE_INPUT and d.samples == [0, 1, 3, 4, 5, 6, 7]
    assert "NaN" in d.evidence[0] and "+Inf" in d.evidence[0]


# -- DeepLabv3-style segmentation, hand-written cross-entropy on probabilities ---------------


def deeplab_like(num_classes=4, size=16):
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="stem_conv")(inp)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU()(x)
    b1 = keras.layers.Conv2D(8, 1, padding="same", name="aspp_1x1")(x)
    b2 = keras.layers.Conv2D(8, 3, padding="same", dilation_rate=2, name="aspp_rate2")(x)
    pool = keras.layers.GlobalAveragePooling2D(keepdims=True, name="aspp_pool")(x)
    pool = keras.layers.UpSampling2D(size // 2, name="aspp_pool_up")(pool)
    x = keras.layers.Concatenate(name="aspp_concat")([b1, b2, pool])
    x = keras.layers.Conv2D(8, 1, name="aspp_project")(x)
    x = keras.layers.UpSampling2D(2, interpolation="bilinear", name="decoder_up")(x)
    x = keras.layers.Conv2D(num_classes, 1, name="classifier")(x)
    out = keras.layers.Softmax(name="probs")(x)
    return keras.Model(inp, out, name="deeplab_like")


def handwritten_cross_entropy(y_true, y_pred):
    return -tf.reduce_sum(y_true * tf.math.log(y_pred)) / tf.cast(tf.shape(y_true)[0], tf.float32)


def test_deeplab_handwritten_cross_entropy_is_op_domain_at_log():
    model = deeplab_like()
    model.compile(keras.optimizers.SGD(0.01), loss=handwritten_cross_entropy)
    x = np.random.rand(4, 16, 16, 3).astype("float32")
    y = keras.utils.to_categorical(np.random.randint(0, 4, (4, 16, 16)), 4)
    model.fit(x, y, batch_size=2, verbose=0, callbacks=[Guard(policy="raise")])  # healthy: no alarm
    head = model.get_layer("classifier")
    head.kernel.assign(head.kernel * 1e4)  # the logits grew: softmax saturates to exact zeros
    before = _all_values(model)
    with pytest.raises(NonFiniteError) as info:
        model.fit(x, y, batch_size=2, verbose=0, callbacks=[Guard(policy="raise")])
    d = info.value.diagnosis
    assert d.category is Category.OP_DOMAIN and d.phase is Phase.LOSS
    assert d.op == "Log" and d.op_kind is OpKind.LOG
    assert d.location is not None and d.location.function == "handwritten_cross_entropy"
    assert d.location.file.endswith("test_keras_diagnose.py")
    assert d.samples and set(d.samples) <= {0, 1}
    assert "from_logits=True" in d.fixes[0] and "clip_by_value" in d.fixes[1]
    assert _same(model, before)


# -- singular gradient: sqrt at 0 in a custom distance layer ---------------------------------


class EuclideanDistance(keras.layers.Layer):
    def call(self, inputs):
        a, b = inputs
        return tf.sqrt(tf.reduce_sum(tf.square(a - b), axis=-1, keepdims=True))


def siamese():
    left, right = keras.Input((6,)), keras.Input((6,))
    embed = keras.layers.Dense(4, name="embed")
    dist = EuclideanDistance(name="distance")([embed(left), embed(right)])
    return keras.Model([left, right], keras.layers.Dense(1, name="score")(dist))


def test_sqrt_at_zero_in_custom_layer_is_singular_gradient():
    model = siamese()
    model.compile("sgd", "mse")
    a = np.random.rand(4, 6).astype("float32")
    b = a + 0.3
    b[2] = a[2]  # a pair of identical inputs: distance exactly 0
    with pytest.raises(NonFiniteError) as info:
        model.fit(
            (a, b),
            np.ones((4, 1), "float32"),
            batch_size=4,
            shuffle=False,
            verbose=0,
            callbacks=[Guard(policy="raise")],
        )
    d = info.value.diagnosis
    assert d.category is Category.SINGULAR_GRADIENT and d.phase is Phase.BACKWARD
    assert d.op == "SqrtGrad" and d.module == "distance" and d.samples == [2]
    assert d.location is not None and d.location.function == "call"
    assert any("== 0" in e for e in d.evidence) and "1e-12" in d.fixes[0]


# -- invalid target: an ignore-style mask with no valid pixel --------------------------------


def masked_cross_entropy(y_true, logits, ignore=255):
    valid = tf.cast(tf.not_equal(y_true, ignore), tf.float32)
    labels = tf.where(tf.equal(y_true, ignore), tf.zeros_like(y_true), y_true)
    ce = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    return tf.reduce_sum(ce * valid) / tf.reduce_sum(valid)


def test_all_ignored_mask_is_invalid_target():
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(5, 1, name="seg_head")])
    x = np.random.rand(2, 8, 8, 3).astype("float32")
    y = np.full((2, 8, 8), 255, "int32")
    d = diagnose(model, (x, y), masked_cross_entropy, ignore_index=255)
    assert d.category is Category.INVALID_TARGET and d.phase is Phase.LOSS and d.op == "RealDiv"
    assert d.location.function == "masked_cross_entropy"
    assert "0 valid targets" in d.evidence[0]
    y[1, :2, :2] = 3  # a few valid pixels: finite
    assert diagnose(model, (x, y), masked_cross_entropy, ignore_index=255) is None


# -- a NaN weight loaded from a file ---------------------------------------------------------


def test_nan_weight_loaded_from_file_is_nonfinite_parameters(tmp_path):
    def make():
        m = keras.Sequential(
            [
                keras.Input((5,)),
                keras.layers.Dense(4, name="hidden"),
                keras.layers.Dense(1, name="out"),
            ]
        )
        m.compile("adam", "mse")
        return m

    saved = make()
    kernel = saved.get_layer("hidden").kernel.numpy()
    kernel[2, 1] = np.nan
    saved.get_layer("hidden").kernel.assign(kernel)
    path = tmp_path / "ckpt.weights.h5"
    saved.save_weights(path)
    model = make()
    model.load_weights(path)
    with pytest.raises(NonFiniteError) as info:
        model.fit(
            np.random.rand(8, 5),
            np.random.rand(8, 1),
            batch_size=4,
            verbose=0,
            callbacks=[Guard(policy="raise")],
        )
    d = info.value.diagnosis
    assert d.category is Category.NONFINITE_PARAMETERS and d.phase is Phase.STATE
    assert d.module == "hidden" and d.details["tensors"] == ["hidden.kernel"]
    assert "1 NaN of 20" in d.evidence[0]


# -- exploding gradients from a learning rate far too high -----------------------------------


def test_learning_rate_far_too_high_is_exploding_gradients():
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile(keras.optimizers.SGD(learning_rate=5.0), "mse")
    x = np.random.normal(0, 3, (256, 10)).astype("float32")
    y = (x.sum(axis=1, keepdims=True) * 10).astype("float32")
    guard = Guard(policy="raise")
    with pytest.raises(NonFiniteError) as info:
        model.fit(x, y, batch_size=16, epochs=5, verbose=0, callbacks=[guard])
    d = info.value.diagnosis
    assert d.category is Category.EXPLODING_GRADIENTS, d
    assert d.step is not None and d.step >= 2
    norms = d.details["grad_norms"]
    assert norms[-1] > 1e3 * norms[0]
    assert "learning rate 5" in " ".join(d.evidence)
    assert "clipnorm" in d.fixes[1]


# -- healthy runs stay silent ----------------------------------------------------------------


def test_healthy_batch_diagnoses_nothing_and_changes_nothing():
    model = deeplab_like()
    model.compile("adam", "categorical_crossentropy")
    x = np.random.rand(2, 16, 16, 3).astype("float32")
    y = keras.utils.to_categorical(np.random.randint(0, 4, (2, 16, 16)), 4)
    model.fit(x, y, verbose=0)
    before = _all_values(model)
    assert diagnose(model, (x, y)) is None
    assert _same(model, before)


def test_nan_in_discarded_where_branch_is_not_a_failure():
    inp = keras.Input((4,))
    out = keras.layers.Lambda(
        lambda t: tf.where(t > 0, tf.math.log(tf.maximum(t, 1e-3)), tf.zeros_like(t))
    )(inp)
    model = keras.Model(inp, keras.layers.Dense(1)(out))
    x = np.array([[0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 0.5, 2.0]], "float32")
    assert diagnose(model, (x, np.zeros((2, 1), "float32")), "mse") is None


class SafeLog(keras.layers.Layer):
    """log only where positive, 0 elsewhere: a finite forward pass, the where trap backward."""

    def call(self, x):
        return tf.where(x > 0, tf.math.log(x), tf.zeros_like(x))


def test_where_trap_is_singular_gradient_at_the_discarded_log():
    inp = keras.Input((3,))
    hidden = keras.layers.Dense(3, activation="relu", name="pre")(inp)
    model = keras.Model(inp, keras.layers.Dense(1, name="out")(SafeLog(name="safe_log")(hidden)))
    pre = model.get_layer("pre")
    pre.kernel.assign(np.eye(3, dtype="float32"))
    pre.bias.assign(np.array([0.0, 0.0, -5.0], "float32"))  # relu: the third feature is exactly 0
    x = np.random.rand(4, 3).astype("float32")
    assert np.isfinite(model(x).numpy()).all()  # the forward pass is finite
    d = diagnose(model, (x, np.zeros((4, 1), "float32")), "mse")
    assert d.category is Category.SINGULAR_GRADIENT and d.phase is Phase.BACKWARD
    assert d.module == "safe_log" and d.location.function == "call" and d.samples == [0, 1, 2, 3]
    assert any("forward op Log" in e for e in d.evidence) and any(
        "the where trap" in e for e in d.evidence
    )
    assert "where" in d.fixes[1]


def test_an_update_that_overflows_the_weights_is_blamed_on_the_optimizer():
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="hidden"), keras.layers.Dense(1, name="out")]
    )
    model.compile(
        keras.optimizers.SGD(learning_rate=1e38), "mse"
    )  # finite gradients, infinite steps
    x, y = np.random.rand(16, 4).astype("float32"), np.full((16, 1), 100.0, "float32")
    with pytest.raises(NonFiniteError) as info:
        model.fit(x, y, batch_size=8, verbose=0, callbacks=[Guard(policy="raise")])
    d = info.value.diagnosis
    # found at step 1, written by the update of step 0
    assert (
        d.category is Category.NONFINITE_PARAMETERS and d.phase is Phase.OPTIMIZER and d.step == 0
    )
    assert "finite when training began" in d.evidence[0] and "learning rate 1e+38" in d.evidence[-2]
    assert d.evidence[-1] == "the update of step 0 made them non-finite; step 1 found them"


def test_a_missing_cell_in_a_table_of_named_inputs_names_the_column_and_a_working_filter():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    table = {
        "age": rng.uniform(18, 90, (64, 1)).astype("float32"),
        "income": rng.lognormal(10, 1, (64, 1)).astype("float32"),
    }
    table["income"][37] = np.nan  # an empty cell: batch 2, sample 5
    label = rng.integers(0, 2, (64, 1)).astype("float32")
    inputs = {k: keras.Input(shape=(1,), name=k) for k in table}
    h = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()(list(inputs.values())))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(h))
    model.compile("adam", "binary_crossentropy")
    ds = tf.data.Dataset.from_tensor_slices((table, label)).batch(16)
    with pytest.raises(NonFiniteError) as info:
        model.fit(ds, epochs=1, verbose=0, callbacks=[Guard(policy="raise")])
    d = info.value.diagnosis
    assert (d.category, d.phase, d.step, d.samples) == (
        Category.NONFINITE_INPUT,
        Phase.DATA,
        2,
        [5],
    )
    assert d.evidence[0].startswith('x["income"]')
    # the filter it suggests is code that runs on this dataset, and drops exactly that row
    code = d.fixes[2].split("`")[1]
    assert code.startswith("dataset.filter(") and "x.values()" in code
    kept = eval(code, {"tf": tf, "dataset": ds.unbatch()})  # noqa: S307 - our own fix text
    assert sum(1 for _ in kept) == 63
