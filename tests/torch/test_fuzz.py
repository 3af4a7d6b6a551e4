"""fuzz_loss on real hand-written losses: it finds their NaN inputs, names the op and line."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import nanscope
import nanscope.losses as L
from nanscope.cli.main import main as cli_main
from nanscope.core.enums import Category


def handwritten_cross_entropy(logits, labels):
    probs = torch.softmax(logits, dim=-1)
    picked = probs[torch.arange(len(labels)), labels]
    return -torch.log(picked).mean()  # LOG_LINE


def dice_loss(probs, mask):
    inter = (probs * mask).sum(dim=(1, 2))
    return (1 - 2 * inter / (probs.sum(dim=(1, 2)) + mask.sum(dim=(1, 2)))).mean()  # DIV_LINE


def embedding_distance(a, b):
    return torch.sqrt(((a - b) ** 2).sum(-1)).mean()  # SQRT_LINE


def _line(marker):
    src = Path(__file__).read_text().splitlines()
    return next(i for i, s in enumerate(src, 1) if s.rstrip().endswith(marker))


def _ce_example():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=g), torch.randint(0, 5, (6,), generator=g)


def _seg_example():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 8, 8, generator=g), (torch.rand(3, 8, 8, generator=g) > 0.5).float()


def test_finds_log_of_zero_in_handwritten_cross_entropy():
    logits, labels = _ce_example()
    report = nanscope.fuzz_loss(handwritten_cross_entropy, (logits, labels))
    by_case = {f.where_found["case"]: f for f in report.findings}
    f = by_case["logits_extreme"]
    assert f.category is Category.OP_DOMAIN and f.op_kind == "log" and f.op == "aten::log"
    assert (
        f.location.line == _line("# LOG_LINE")
        and f.location.function == "handwritten_cross_entropy"
    )
    assert "log_softmax" in f.fixes[0] and f.samples
    assert report.stats["cases"]["example"] == "finite" and report.exit_code == 1
    assert report.stats["inputs"] == {"argument 1": "logits", "argument 2": "labels"}
    assert torch.equal(logits, _ce_example()[0])  # the example was not modified
    d = report.to_dict()
    assert d["status"] == "problems" and d["findings"][0]["where"]["case"] in by_case


def test_stock_and_safe_cross_entropy():
    logits, labels = _ce_example()
    stock = nanscope.fuzz_loss(F.cross_entropy, (logits, labels))
    assert [f.where_found["case"] for f in stock.findings] == ["all_targets_ignored_minus100"]
    assert stock.findings[0].category is Category.INVALID_TARGET
    assert stock.findings[0].op_kind == "cross_entropy"
    safe = nanscope.fuzz_loss(lambda x, y: L.cross_entropy(x, y), (logits, labels))
    assert safe.findings == [] and safe.exit_code == 0
    assert safe.stats["cases"]["all_targets_ignored_minus100"] == "finite"


def test_finds_zero_over_zero_in_dice_with_an_empty_mask():
    report = nanscope.fuzz_loss(dice_loss, _seg_example())
    f = {f.where_found["case"]: f for f in report.findings}["empty_mask_and_prediction"]
    assert f.category is Category.OP_DOMAIN and f.op_kind == "div" and "0/0" in f.summary
    assert f.location.line == _line("# DIV_LINE") and f.samples == [0, 1, 2]
    assert "safe_div" in " ".join(f.fixes)
    assert report.stats["cases"]["example"] == "finite"
    safe = nanscope.fuzz_loss(lambda p, m: L.dice_loss(p, m), _seg_example())
    assert safe.findings == []


def test_identical_pair_exposes_sqrt_gradient_at_zero():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    report = nanscope.fuzz_loss(embedding_distance, (a, b))
    f = {f.where_found["case"]: f for f in report.findings}["identical_pair"]
    assert f.category is Category.SINGULAR_GRADIENT and "sqrt" in f.summary
    assert "safe_norm" in f.fixes[0]
    assert report.stats["cases"]["identical_pair"] == "non-finite gradient"
    assert not nanscope.fuzz_loss(lambda x, y: L.safe_norm(x - y, dim=-1).mean(), (a, b)).findings


LOSSES_PY = textwrap.dedent("""
    import torch

    def bce(p, y):
        return -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
""")


def test_cli_fuzz_loss(tmp_path, capsys):
    (tmp_path / "my_losses.py").write_text(LOSSES_PY)
    example = tmp_path / "batch.npz"
    np.savez(
        example,
        np.array([[0.2, 0.7], [0.9, 0.4]], np.float32),
        np.array([[0, 1], [1, 0]], np.float32),
    )
    out = tmp_path / "report.json"
    code = cli_main(
        [
            "fuzz-loss",
            f"{tmp_path / 'my_losses.py'}:bce",
            "--example",
            str(example),
            "--json",
            str(out),
        ]
    )
    assert code == 1
    doc = json.loads(out.read_text())
    assert doc["status"] == "problems" and doc["framework"] == "torch"
    cases = {f["where"]["case"]: f for f in doc["findings"]}
    assert cases["probabilities_exactly_0_and_1"]["op_kind"] == "log"
    assert cases["probabilities_exactly_0_and_1"]["location"]["line"] == 5
    assert "probabilities_exactly_0_and_1" in capsys.readouterr().out
    assert "tensorflow" not in sys.modules


def _cli(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "nanscope", "fuzz-loss", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    (tmp_path / "plain.py").write_text("def loss(p, y):\n    return p\n")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    for args, words in [
        (["no_such_module:loss"], "cannot import module"),
        (["plain:nope"], "has no function"),
        (["plain.py:loss", "--example", "bad.npz"], "cannot read example"),
        (["plain"], "MODULE:FUNCTION"),
        # a module that imports no framework: nanscope does not import one for it
        (["plain:loss"], "neither torch nor tensorflow"),
    ]:
        r = _cli(args, tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        assert (
            words in r.stderr
            and len(r.stderr.strip().splitlines()) == 1
            and "Traceback" not in r.stderr
        )


def test_without_an_example_the_inputs_are_guessed_from_parameter_names():
    def bce(pred, target):
        return F.binary_cross_entropy(pred, target) + (-(target * torch.log(pred))).mean()

    report = nanscope.fuzz_loss(bce)
    assert report.stats["inputs"] == {"argument 1": "probabilities", "argument 2": "mask"}
    assert "probabilities_exactly_0_and_1" in {f.where_found["case"] for f in report.findings}
    assert all(f.op_kind == "log" for f in report.findings)


def test_stock_safe_losses_are_clean_and_float16_bce_is_caught():
    probs, mask = _seg_example()
    g = torch.Generator().manual_seed(3)
    logits, other = torch.randn(4, 16, generator=g) * 3, torch.randn(4, 16, generator=g)
    for fn, example in [
        (F.mse_loss, (probs, mask)),
        (F.binary_cross_entropy_with_logits, (logits, (logits > 0).float())),
        (F.smooth_l1_loss, (logits, other)),
        (lambda a, b: F.pairwise_distance(a, b).mean(), (logits, other)),
    ]:
        report = nanscope.fuzz_loss(fn, example)
        assert report.findings == [], (fn, [str(f) for f in report.findings])
    bce = nanscope.fuzz_loss(F.binary_cross_entropy, (probs, mask))
    assert [f.where_found["case"] for f in bce.findings] == [
        "float16_extreme"
    ]  # eps 1e-12 is 0 in float16
    assert bce.findings[0].category is Category.SINGULAR_GRADIENT
    assert "binary_cross_entropy_with_logits" in bce.findings[0].fixes[0]


def per_sample_dice(logits, mask):
    probs = torch.sigmoid(logits)
    inter = (probs * mask).flatten(1).sum(1)
    union = probs.flatten(1).sum(1) + mask.flatten(1).sum(1)
    return (1 - 2 * inter / union).mean()  # PER_SAMPLE_DIV


def test_an_integer_mask_from_the_example_gets_an_empty_sample_with_saturated_logits():
    """Segmentation masks are often stored as integers: an int 0/1 mask is a mask too, and the
    example itself with one sample's mask emptied and its logits saturated finds the 0/0."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 8, generator=g)
    mask = (torch.rand(3, 8, 8, generator=g) > 0.5).long()
    report = nanscope.fuzz_loss(per_sample_dice, (logits, mask))
    by_case = {f.where_found["case"]: f for f in report.findings}
    f = by_case["one_sample_empty_mask_saturated"]
    assert f.category is Category.OP_DOMAIN and f.op_kind == "div" and "0/0" in f.summary, str(f)
    assert f.samples == [0] and f.location.line == _line("# PER_SAMPLE_DIV")
    assert report.stats["cases"]["example"] == "finite"


def test_a_function_no_case_can_call_is_exit_2_not_clean(tmp_path, capsys):
    mod = tmp_path / "wrong_losses.py"
    mod.write_text("def three_args(a, b, c):\n    return (a - b).abs().mean() * c\n")
    np.savez(tmp_path / "ex.npz", np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32))
    sys.path.insert(0, str(tmp_path))
    try:
        from nanscope.cli.main import main

        rc = main(["fuzz-loss", "wrong_losses:three_args", "--example", str(tmp_path / "ex.npz")])
    finally:
        sys.path.remove(str(tmp_path))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "failed on all" in err and "Traceback" not in err, (
        err
    )
