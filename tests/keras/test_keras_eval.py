"""The inference seed: ResNet101V2 trains fine but predict outputs NaN because BatchNorm moving
statistics are corrupt (conv5_block3_2_bn, post_bn); diagnose_eval names them, and
repair_norm_statistics makes predict finite again."""

import keras
import numpy as np
import pytest

from nanscope.core.enums import Category, Phase
from nanscope.keras import diagnose_eval, repair_norm_statistics


@pytest.fixture(scope="module")
def resnet():
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet101V2(weights=None, input_shape=(32, 32, 3), classes=4)
    model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    x = np.random.rand(8, 32, 32, 3).astype("float32")
    model.fit(x, np.random.randint(0, 4, 8), batch_size=4, verbose=0)  # trained briefly: healthy
    return model, x


def corrupt(model):
    """What a corrupted checkpoint holds, written through the weights API."""
    bn = model.get_layer("conv5_block3_2_bn")
    mean, var, gamma, beta = (
        bn.moving_mean.numpy(),
        bn.moving_variance.numpy(),
        bn.gamma.numpy(),
        bn.beta.numpy(),
    )
    var[:3] = np.inf
    var[3] = 1e9
    bn.set_weights([gamma, beta, mean, var])
    post = model.get_layer("post_bn")
    weights = post.get_weights()
    weights[2][:5] = np.nan  # moving_mean
    post.set_weights(weights)


def test_predict_nan_is_corrupt_norm_statistics_then_repaired(resnet):
    model, x = resnet
    assert diagnose_eval(model, x, batch_size=4) is None  # healthy: silent
    corrupt(model)
    assert np.isfinite(model(x[:4], training=True).numpy()).all()
    assert not np.isfinite(model.predict(x[:4], verbose=0)).all()
    trainable_before = [v.numpy().copy() for v in model.variables]

    d = diagnose_eval(model, x, batch_size=4)
    assert d.category is Category.CORRUPT_NORM_STATISTICS and d.phase is Phase.STATE
    assert d.module == "post_bn" and d.op_kind == "batch_norm"  # the layer that made predict NaN
    layers = d.details["layers"]
    assert list(layers) == ["post_bn", "conv5_block3_2_bn"]
    assert layers["post_bn"] == ["moving_mean: 5 NaN of 2048"]
    assert "moving_variance: 3 +Inf of 512" in layers["conv5_block3_2_bn"]
    assert any("extreme" in p for p in layers["conv5_block3_2_bn"])
    assert d.evidence[0] == "train-mode output finite: True; eval-mode output finite: False"
    assert d.samples == [0, 1, 2, 3]
    assert "repair_norm_statistics" in d.fixes[0]
    # As in the seed, the backbone nested in a multi-output model: the same layers are named.
    inp = keras.Input((32, 32, 3))
    features = model(inp)
    outer = keras.Model(
        inp,
        [
            keras.layers.Dense(2, name="head_a")(features),
            keras.layers.Dense(3, name="head_b")(features),
        ],
    )
    nested = diagnose_eval(outer, x, batch_size=4)
    assert nested.category is Category.CORRUPT_NORM_STATISTICS and list(
        nested.details["layers"]
    ) == list(layers)
    # the training-mode comparison changed nothing
    assert all(
        np.array_equal(a, v.numpy(), equal_nan=True)
        for a, v in zip(trainable_before, model.variables, strict=True)
    )

    report = repair_norm_statistics(model, x, batch_size=4)
    assert report.method == "recomputed" and report.batches == 2
    assert {"conv5_block3_2_bn", "post_bn"} <= set(report.layers)
    assert np.isfinite(model.predict(x, verbose=0)).all()
    assert diagnose_eval(model, x, batch_size=4) is None
    bn = model.get_layer("post_bn")
    assert bn.momentum == 0.99 and bn.trainable  # restored after the passes


def test_reset_fallback_says_what_it_costs():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(name="bn")]
    )
    model.get_layer("bn").moving_variance.assign(np.array([1.0, -2.0, np.nan, 1.0], "float32"))
    with pytest.warns(UserWarning, match="accuracy"):
        report = repair_norm_statistics(model, reset=True, only_bad=True)
    assert report.method == "reset" and report.layers == ["bn"]
    assert np.array_equal(model.get_layer("bn").moving_variance.numpy(), np.ones(4, "float32"))


def test_nonfinite_weight_at_inference_is_nonfinite_parameters():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="head")])
    kernel = model.get_layer("head").kernel.numpy()
    kernel[0, 1] = np.inf
    model.get_layer("head").kernel.assign(kernel)
    d = diagnose_eval(model, [(np.ones((2, 3), "float32"), np.zeros(2))])
    assert d.category is Category.NONFINITE_PARAMETERS and d.module == "head"


def test_bad_input_is_one_line_bad_input_error():
    from nanscope.core.errors import BadInputError
    from nanscope.keras import diagnose

    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(name="bn")])
    with pytest.raises(BadInputError, match="loss="):
        diagnose(
            model, (np.ones((2, 3), "float32"), np.ones((2, 3), "float32"))
        )  # not compiled, no loss
    with pytest.raises(BadInputError, match="needs data"):
        repair_norm_statistics(model)
    with pytest.raises(BadInputError, match="cannot read batches"):
        diagnose_eval(model, 42)
    with pytest.raises(BadInputError, match="a batch is"):
        diagnose(model, (1, 2, 3, 4), "mse")
