"""`nanscope run` on the scenario scripts: each really goes NaN (or stays healthy), and the
JSON diagnosis names the category, phase, op kind, module and samples.

A few run as real subprocesses (the way users run them); the rest in-process through
``nanscope.cli.main.main`` to keep the suite fast. Every in-process run must leave the process
as it found it (the runner's dispatch mode and hooks are removed when the script ends).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from nanscope.cli.main import main as cli_main

SCENARIOS = Path(__file__).parent / "scenarios"

# name -> expected fields of the diagnosis (None: the run must stay clean)
EXPECTED = {
    "nan_input": dict(category="nonfinite_input", phase="data", samples=[5], step=2),
    "log_softmax": dict(
        category="op_domain",
        phase="loss",
        op="aten::log",
        op_kind="log",
        samples=[3],
        function="loss_fn",
        first_fix="replace log(softmax(x)) with log_softmax(x)",
    ),
    "div_zero": dict(
        category="op_domain",
        phase="forward",
        op="aten::div",
        op_kind="div",
        module="norm",
        samples=[2],
    ),
    "sqrt_zero": dict(
        category="singular_gradient",
        phase="backward",
        op_kind="sqrt",
        module="distance",
        samples=[1],
    ),
    "where_trap": dict(
        category="singular_gradient",
        phase="backward",
        op="SqrtBackward0",
        op_kind="sqrt",
        module="act",
        step=0,
    ),
    "fp16_overflow": dict(
        category="overflow",
        phase="forward",
        op_kind="matmul",
        module="encoder",
        dtype="float16",
        samples=[2],
    ),
    "exp_overflow": dict(
        category="overflow",
        phase="forward",
        op="aten::exp",
        op_kind="exp",
        module="softmax",
        samples=[1],
    ),
    "lr_high": dict(category="exploding_gradients"),
    "checkpoint_nan": dict(category="nonfinite_parameters", phase="state", module="fc1", step=0),
    "adam_fp16": dict(
        category="optimizer_state",
        phase="optimizer",
        op="aten::addcdiv_",
        op_kind="div",
        dtype="float16",
        step=0,
    ),
    "attention_mask": dict(
        category="all_masked_softmax",
        phase="forward",
        op_kind="softmax",
        module="attn",
        samples=[2],
    ),
    # nn.Embedding(padding_idx) (it made the recorder stop before) and heads folded into the batch
    "mha_padding": dict(
        category="all_masked_softmax",
        phase="forward",
        op_kind="softmax",
        module="attn",
        samples=[1],
        step=1,
    ),
    # float16 inference after .half(): the replay keeps every dtype as the script had it
    "half_inference": dict(
        category="overflow",
        phase="forward",
        op_kind="matmul",
        module="2",
        dtype="float16",
        samples=[0, 1, 2],
        step=0,
        program="in inference, batch 0 (eval mode, no_grad)",
    ),
    # (batch, sequence) tokens flattened for the loss: the batch row, and the position as evidence
    "token_rows": dict(
        category="op_domain",
        phase="loss",
        op="aten::log",
        op_kind="log",
        samples=[2],
        step=0,
        function="token_nll",
        evidence_has="positions within each sample (tokens, heads): 5",
    ),
    # exp of a log-variance: the fix is to clamp it, not "subtract the max" (that is for a softmax)
    "vae_logvar": dict(
        category="overflow",
        phase="loss",
        op="aten::exp",
        op_kind="exp",
        samples=[3],
        step=1,
        first_fix="clamp what goes into exp",
    ),
    # one big tensor batched by slices: the batch row is the sample, the dataset row is evidence
    "tensor_slices": dict(
        category="nonfinite_input",
        phase="data",
        samples=[5],
        step=4,
        evidence_has="rows of the whole [64, 5] tensor it came from: 37",
    ),
    # a NaN regression target under a key nobody's convention names: decided by what consumed it
    "dict_regression_target": dict(
        category="invalid_target",
        phase="data",
        samples=[3],
        step=2,
        evidence_has="rows of the whole [20, 1] tensor it came from: 13",
    ),
    # MSE written by hand, ((pred - y) ** 2).mean(): no loss function names the target, the
    # subtraction from the model's output does
    "regression_mse_by_hand": dict(
        category="invalid_target",
        phase="data",
        op_kind=None,
        module=None,
        samples=[3],
        step=2,
        function="mse",
        line="# LOSS_LINE",
        evidence_has="rows of the whole [20, 1] tensor it came from: 13",
    ),
    # soft labels (annotators' vote shares) in a cross-entropy written by hand; one is 0/0 = NaN
    "soft_labels": dict(
        category="invalid_target",
        phase="data",
        op_kind=None,
        module=None,
        samples=[1],
        step=1,
        line="# LOSS_LINE",
        evidence_has="rows of the whole [12, 3] tensor it came from: 5",
    ),
    "ctc": dict(category="invalid_target", phase="loss", op_kind="ctc_loss", samples=[1]),
    "seg_ignore": dict(
        category="invalid_target",
        phase="loss",
        op_kind="cross_entropy",
        samples=[0],
        function="eval_step",
        program="in evaluation, batch 2 (eval mode, no_grad), after 3 training steps",
    ),
    # Adam(eps=0): embedding rows not in the batch have a gradient of exactly 0, 0 / 0 in addcdiv_
    "adam_eps0": dict(
        category="optimizer_state",
        phase="optimizer",
        op="aten::addcdiv_",
        op_kind="div",
        module="0",
        samples=[],
        step=0,
        first_fix="give the optimizer an eps > 0",
        evidence_has=(
            "inside optimizer.step(), updating 0.weight, at torch/optim/adam.py:{ADAM_LINE}"
            " (_single_tensor_adam)"
        ),
    ),
    # a hand-written LARS: the trust ratio divides by the norm of a gradient that is exactly 0
    "lars_zero_norm": dict(
        category="op_domain",
        phase="optimizer",
        op="aten::div",
        op_kind="div",
        module="aux",
        samples=[],
        step=2,
        function="step",
        line="# TRUST_LINE",
        evidence_has="inside optimizer.step(), updating aux.weight",
    ),
    "bn_eval": dict(category="corrupt_norm_statistics", phase="state", module="context.1"),
    # forward, loss and backward inside optimizer.step(closure); the loss is Inf, every gradient finite
    "lbfgs_closure": dict(
        category="op_domain",
        phase="loss",
        op="aten::log",
        op_kind="log",
        samples=[0],
        step=0,
        function="nll_poisson",
        first_fix="clamp the argument away from 0",
    ),
    "std_last_batch": dict(
        category="op_domain",
        phase="forward",
        op="aten::std",
        op_kind="std",
        module="0",
        samples=[0],
        step=2,
    ),
    # a siamese pair embedded in one forward, model(torch.cat([anchor, positive])): the NaN row 6
    # of the 8 concatenated rows is sample 2 of the positives
    "siamese_pairs": dict(
        category="op_domain",
        phase="forward",
        op_kind="div",
        module="normalize",
        samples=[2],
        step=1,
        line="# DIV_LINE",
        evidence_has=(
            "rows concatenated by torch.cat at siamese_pairs.py:{CAT_LINE} (2 tensors of 4 rows):"
            " sample 2 of the second tensor of the pair"
        ),
    ),
    # SimCLR: torch.cat([z1, z2]) of two views' projections in the loss; row 5 is sample 1, view 2
    "simclr_views": dict(
        category="op_domain",
        phase="loss",
        op_kind="div",
        module=None,
        samples=[1],
        step=1,
        function="nt_xent",
        line="# DIV_LINE",
        evidence_has=(
            "rows concatenated by torch.cat at simclr_views.py:{CAT_LINE} (2 tensors of 4 rows):"
            " sample 1 of the second tensor of the pair"
        ),
    ),
    "healthy_partial_mask": None,
    "healthy_double_where": None,
    "healthy_bn_ignore": None,
}
# std_last_batch: torch warns (degrees of freedom <= 0), which pytest would turn into an error in-process.
SUBPROCESS = {"nan_input", "seg_ignore", "healthy_bn_ignore", "std_last_batch"}


def marker_line(name: str, marker: str) -> int:
    """The line of scenario ``name`` that carries ``marker`` (a comment such as `# DIV_LINE`)."""
    lines = (SCENARIOS / f"{name}.py").read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.rstrip().endswith(marker))


def torch_line(module_file: str, code: str) -> int:
    """The first line of ``torch/optim/<module_file>`` that holds ``code``."""
    lines = (Path(torch.optim.__file__).parent / module_file).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if code in line)


def check(report: dict, expected: dict | None, name: str) -> None:
    if expected is None:
        assert report["status"] == "clean" and report["diagnosis"] is None, report
        return
    assert report["status"] == "nonfinite" and report["framework"] == "torch"
    d = report["diagnosis"]
    for key, want in expected.items():
        if key == "evidence_has":
            if "{ADAM_LINE}" in want:  # the line of torch's Adam that divides
                want = want.replace(
                    "{ADAM_LINE}",
                    str(torch_line("adam.py", "param.addcdiv_(exp_avg, denom, value=-step_size)")),
                )
            if "{CAT_LINE}" in want:
                want = want.replace("{CAT_LINE}", str(marker_line(name, "# CAT_LINE")))
            assert want in d["evidence"], d["evidence"]
        elif key == "line":  # the line the scenario marks, e.g. `# DIV_LINE`
            assert d["location"]["line"] == marker_line(name, want), d["location"]
        elif key == "program":  # where in the program: the validation pass, not "step 3"
            assert d["evidence"][0] == want and d["summary"].endswith("; " + want), d
        elif key == "first_fix":  # the fix that fits: a log of a softmax, or of anything else
            assert d["fixes"][0].startswith(want), d["fixes"]
        elif key == "function":
            assert d["location"]["function"] == want and d["location"]["file"].endswith(
                f"{name}.py"
            ), d["location"]
        else:
            assert d[key] == want, (key, d)
    assert d["summary"] and d["evidence"] and d["fixes"]


def _run_in_process(name: str, tmp_path: Path, capsys) -> tuple[int, dict]:
    out = tmp_path / f"{name}.json"
    cwd = os.getcwd()
    os.chdir(SCENARIOS)  # locations are shown relative to the working directory
    try:
        rc = cli_main(["run", str(SCENARIOS / f"{name}.py"), "--json", str(out)])
    finally:
        os.chdir(cwd)
    captured = capsys.readouterr()
    assert _get_current_dispatch_mode() is None, "the runner's dispatch mode was left on"
    assert torch.nn.modules.module._global_forward_hooks == {}, "module hooks were left on"
    return rc, json.loads(out.read_text()), captured


@pytest.mark.parametrize("name", sorted(set(EXPECTED) - SUBPROCESS))
def test_run_in_process(name, tmp_path, capsys):
    rc, report, captured = _run_in_process(name, tmp_path, capsys)
    expected = EXPECTED[name]
    check(report, expected, name)
    assert rc == (0 if expected is None else 1)
    if expected is None:
        assert "nanscope" not in captured.err  # healthy: not a word from us
    else:
        assert f"nanscope: {expected['category']}" in captured.err


@pytest.mark.parametrize("name", sorted(SUBPROCESS))
def test_run_as_subprocess(name, tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "nanscope", "run", f"{name}.py", "--json", str(out)],
        cwd=SCENARIOS,
        capture_output=True,
        text=True,
        timeout=120,
    )
    expected = EXPECTED[name]
    assert proc.returncode == (0 if expected is None else 1), proc.stderr
    check(json.loads(out.read_text()), expected, name)
    if expected is None:
        assert proc.stderr == ""
    else:
        assert "Traceback" not in proc.stderr
    if name == "std_last_batch":  # the script's own warning once; nanscope's replay adds none
        assert proc.stderr.count("degrees of freedom") == 1, proc.stderr


def test_scripts_really_go_nan_without_nanscope():
    """The scenario files are plain scripts: python <file> shows the NaN nanscope explains."""
    proc = subprocess.run(
        [sys.executable, "div_zero.py"], cwd=SCENARIOS, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "loss nan" in proc.stdout


def test_clean_script_keeps_its_exit_status(tmp_path):
    script = tmp_path / "exits.py"
    script.write_text("import sys, torch\nprint(torch.ones(3).sum().item())\nsys.exit(3)\n")
    rc = cli_main(["run", str(script)])
    assert rc == 3
    assert _get_current_dispatch_mode() is None
