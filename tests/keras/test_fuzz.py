"""fuzz_loss on hand-written TensorFlow losses: the op, the line, the cause, and no torch import."""

import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

import nanscope
import nanscope.losses as L
from nanscope.core.enums import Category


def handwritten_cross_entropy(logits, labels):
    probs = tf.nn.softmax(logits, axis=-1)
    picked = tf.gather(probs, labels, batch_dims=1)
    return -tf.reduce_mean(tf.math.log(picked))  # LOG_LINE


def dice_loss(probs, mask):
    inter = tf.reduce_sum(probs * mask, axis=(1, 2))
    union = tf.reduce_sum(probs, axis=(1, 2)) + tf.reduce_sum(mask, axis=(1, 2))
    return tf.reduce_mean(1 - 2 * inter / union)  # DIV_LINE


def _line(marker):
    return next(
        i
        for i, s in enumerate(Path(__file__).read_text().splitlines(), 1)
        if s.rstrip().endswith(marker)
    )


def test_finds_log_of_zero_in_handwritten_cross_entropy():
    rng = np.random.default_rng(0)
    logits, labels = (
        tf.constant(rng.normal(size=(6, 5)), tf.float32),
        tf.constant(rng.integers(0, 5, 6)),
    )
    report = nanscope.fuzz_loss(handwritten_cross_entropy, (logits, labels))
    f = {f.where_found["case"]: f for f in report.findings}["logits_extreme"]
    assert f.category is Category.OP_DOMAIN and f.op_kind == "log" and f.framework == "keras"
    assert f.location.line == _line("# LOG_LINE")
    assert "from_logits=True" in f.fixes[0]
    assert report.framework == "keras" and report.stats["cases"]["example"] == "finite"
    assert "torch" not in sys.modules


def test_finds_zero_over_zero_in_dice_with_an_empty_mask_and_safe_dice_is_clean():
    rng = np.random.default_rng(0)
    probs = rng.random((3, 8, 8)).astype("float32")
    mask = (rng.random((3, 8, 8)) > 0.5).astype("float32")
    report = nanscope.fuzz_loss(
        dice_loss, (probs, mask)
    )  # numpy example: framework from the loss's module
    f = {f.where_found["case"]: f for f in report.findings}["empty_mask_and_prediction"]
    assert f.category is Category.OP_DOMAIN and f.op_kind == "div"
    assert f.location.line == _line("# DIV_LINE")
    assert "divide_no_nan" in f.fixes[0]
    assert not nanscope.fuzz_loss(
        lambda p, m: L.dice_loss(p, m), (tf.constant(probs), tf.constant(mask))
    ).findings


def test_cli_on_a_tensorflow_loss(tmp_path, capsys):
    import json

    from nanscope.cli.main import main as cli_main

    (tmp_path / "tf_losses.py").write_text(
        "import tensorflow as tf\n\n\ndef bce(p, y):\n"
        "    return -tf.reduce_mean(y * tf.math.log(p) + (1 - y) * tf.math.log(1 - p))\n"
    )
    np.savez(
        tmp_path / "batch.npz",
        np.array([[0.2, 0.7]], np.float32),
        np.array([[0.0, 1.0]], np.float32),
    )
    out = tmp_path / "r.json"
    code = cli_main(
        [
            "fuzz-loss",
            f"{tmp_path / 'tf_losses.py'}:bce",
            "--example",
            str(tmp_path / "batch.npz"),
            "--json",
            str(out),
        ]
    )
    doc = json.loads(out.read_text())
    assert code == 1 and doc["framework"] == "keras"
    assert {f["op_kind"] for f in doc["findings"]} == {"log"}
    assert "probabilities_exactly_0_and_1" in capsys.readouterr().out
    assert "torch" not in sys.modules
