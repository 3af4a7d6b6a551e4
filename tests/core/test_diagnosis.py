import json

from nanscope.core.diagnosis import (
    AuditReport,
    Diagnosis,
    Finding,
    Location,
    clean_report,
    compose_summary,
)
from nanscope.core.enums import Category, OpKind, Phase, Policy
from nanscope.core.errors import NonFiniteError


def _diag():
    at = Location("train.py", 42, "dice_loss")
    return Diagnosis(
        Category.OP_DOMAIN,
        compose_summary("log received 1 zero", [3], None, at),
        phase="loss",
        op="aten::log",
        location=at,
        dtype="float32",
        samples=[3],
        step=17,
        evidence=["log input: min 0.0"],
        fixes=["clamp"],
        framework="torch",
    )


def test_json_matches_contract_and_round_trips():
    d = _diag()
    doc = json.loads(d.to_json())
    assert doc["schema"] == 1 and doc["status"] == "nonfinite" and doc["framework"] == "torch"
    inner = doc["diagnosis"]
    for key in (
        "category",
        "phase",
        "op",
        "op_kind",
        "module",
        "location",
        "dtype",
        "samples",
        "step",
        "summary",
        "evidence",
        "fixes",
    ):
        assert key in inner, key
    assert inner["location"] == {"file": "train.py", "line": 42, "function": "dice_loss"}
    assert inner["op_kind"] == "log"
    back = Diagnosis.from_dict(doc)
    assert back == d


def test_text_rendering_names_everything():
    d = _diag()
    text = str(d)
    assert (
        "op_domain" in text
        and "aten::log" in text
        and "train.py:42" in text
        and "  samples   3\n" in text
    )
    assert "1. clamp" in text
    # Said once: the line, the function and the samples are not repeated by the headline.
    assert text.count("train.py:42") == 1 and text.count("dice_loss") == 1, text
    assert d.summary.endswith("at train.py:42")  # the JSON summary keeps them


def test_strenums_accept_plain_strings():
    assert Policy("skip") is Policy.SKIP
    assert Diagnosis("overflow", "x", phase="forward").category is Category.OVERFLOW
    assert OpKind.of("aten::native_batch_norm") is OpKind.BATCH_NORM
    assert OpKind.of("SparseSoftmaxCrossEntropyWithLogits") is OpKind.CROSS_ENTROPY
    assert OpKind.of("Sqrt") is OpKind.SQRT and OpKind.of("aten::sqrt.default") is OpKind.SQRT
    assert Phase("backward") is Phase.BACKWARD


def test_audit_report_problems_first_and_exit_codes():
    warn = Finding(
        Category.UNKNOWN, "constant image", where_found={"file": "a.png"}, severity="warning"
    )
    err = Finding(
        Category.INVALID_TARGET, "every pixel ignored", where_found={"file": "m.png"}, samples=[7]
    )
    rep = AuditReport([warn, err], stats={"pixels": {"mean": 0.5}})
    assert rep.exit_code == 1 and rep.to_dict()["status"] == "problems"
    text = str(rep)
    assert text.index("every pixel ignored") < text.index("constant image")
    assert rep.to_dict()["findings"][1]["where"] == {"file": "m.png"}
    assert AuditReport.from_dict(json.loads(json.dumps(rep.to_dict()))).to_dict() == rep.to_dict()
    assert AuditReport([warn]).exit_code == 0
    assert clean_report("keras") == {
        "schema": 1,
        "status": "clean",
        "framework": "keras",
        "diagnosis": None,
    }


def test_nonfinite_error_carries_diagnosis_and_pickles():
    import pickle

    err = NonFiniteError(_diag())
    again = pickle.loads(pickle.dumps(err))
    assert again.diagnosis.category is Category.OP_DOMAIN
    assert "op_domain" in str(again)
    assert again.diagnosis == err.diagnosis  # every field survives, not only the category


def test_finding_of_keeps_every_field_of_the_diagnosis():
    d = _diag()
    f = Finding.of(
        d, {"tensor": "bn.running_var"}, severity="warning", summary="case: " + d.summary
    )
    assert f.where_found == {"tensor": "bn.running_var"} and f.severity == "warning"
    assert (
        f.summary == "case: " + d.summary
        and d.summary == "log received 1 zero (sample 3) in dice_loss at train.py:42"
    )
    assert (f.category, f.op, f.location, f.samples, f.step, f.evidence, f.fixes, f.framework) == (
        d.category,
        d.op,
        d.location,
        d.samples,
        d.step,
        d.evidence,
        d.fixes,
        d.framework,
    )
