"""The rendered text of one diagnosis of each category, against golden files
(tests/core/golden/<category>.txt), so that a wording change is reviewed, not accidental.

Each diagnosis is built by the core rules from the evidence a tracer would collect. To accept
a deliberate change: ``NANSCOPE_UPDATE_GOLDEN=1 python -m pytest tests/core/test_render_golden.py``
and review the diff of the golden files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from nanscope.core import rules
from nanscope.core.diagnosis import Location
from nanscope.core.enums import Category, Phase
from nanscope.core.rules import ProducerEvidence, classify_producer
from nanscope.core.summary import summarize

GOLDEN = Path(__file__).parent / "golden"
AT = Location("train.py", 42, "loss_fn")


def s(*values, dtype="float32"):
    return summarize(np.array(values, dtype=dtype))


def producer(op, phase, inputs, output, **kw):
    kw.setdefault("location", AT)
    return classify_producer(
        ProducerEvidence(op, phase, inputs, output, step=kw.pop("step", 7), **kw)
    )


CASES = {
    "nonfinite_input": lambda: rules.nonfinite_input(
        "image", s([1.0, np.nan], [0.5, 0.2], [0.1, 0.3]), [0], step=2
    ),
    "invalid_target": lambda: producer(
        "aten::nll_loss2d_forward",
        Phase.LOSS,
        [s(-0.1, -2.3)],
        s(np.nan),
        valid_targets=0,
        ignore_index=255,
        samples=[0, 1],
    ),
    "op_domain": lambda: producer(
        "aten::log", Phase.LOSS, [s(0.5, 0.0, 0.2)], s(-0.69, -np.inf, -1.6), samples=[3]
    ),
    "overflow": lambda: producer(
        "aten::mm",
        Phase.FORWARD,
        [s(300.0, -2.0, dtype="float16"), s(400.0, 1.0, dtype="float16")],
        s(np.inf, 1.0, dtype="float16"),
        module="encoder.fc",
        samples=[2],
    ),
    "singular_gradient": lambda: producer(
        "SqrtBackward0",
        Phase.BACKWARD,
        [s(0.0, 1.0)],
        s(np.inf, 0.5),
        forward_op="aten::sqrt",
        forward_inputs=[s(0.0, 1.0)],
        op_kind="sqrt",
        module="distance",
        samples=[1],
    ),
    "exploding_gradients": lambda: rules.exploding_gradients(
        [1.0, 10.0, 120.0, 1.5e3, 2e4, 3e5], step=6, lr=10.0
    ),
    "nonfinite_parameters": lambda: rules.nonfinite_parameters(
        {"fc.weight": s(np.nan, 1.0)}, step=0
    ),
    "corrupt_norm_statistics": lambda: rules.corrupt_norm_statistics(
        {"layer4.2.bn3": rules.norm_statistics_problems(s(0.0, 0.1), s(1.0, np.nan))},
        train_finite=True,
        eval_finite=False,
        samples=[0, 1, 2],
    ),
    "optimizer_state": lambda: rules.optimizer_state(
        {"fc.weight.exp_avg_sq": s(np.inf, 0.0, dtype="float16")},
        eps=1e-8,
        param_dtype="float16",
        step=3,
    ),
    "all_masked_softmax": lambda: producer(
        "aten::_softmax",
        Phase.FORWARD,
        [s(-np.inf, -np.inf)],
        s(np.nan, np.nan),
        module="attn",
        all_masked_rows=[1],
        samples=[1],
    ),
    "compiled_numerics": lambda: rules.not_reproduced(
        "loss", step=4, compiled="train_step", phase=Phase.LOSS
    ),
    "transient": lambda: rules.not_reproduced("gradient", step=9, phase=Phase.BACKWARD),
    "unknown": lambda: rules.unexplained("gradient", step=5),
}


def test_every_category_has_a_golden_case():
    assert set(CASES) == {str(c) for c in Category}


@pytest.mark.parametrize("category", sorted(CASES))
def test_rendered_text_matches_golden_file(category):
    d = CASES[category]()
    assert str(d.category) == category
    text = str(d) + "\n"
    path = GOLDEN / f"{category}.txt"
    if os.environ.get("NANSCOPE_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"no golden file {path}: run with NANSCOPE_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), (
        f"rendering of {category} changed; if on purpose, update the golden file"
    )
    # The location is said once above the evidence, never repeated by the headline.
    head = text.split("  evidence")[0]
    if d.location is not None:
        assert head.count(str(d.location)) == 1, head
