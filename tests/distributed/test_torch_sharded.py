"""FSDP2 (fully_shard) and DTensor tensor parallel under nanscope.torch.Guard, with 2 and 4
real gloo processes: every rank takes the same decision, every shard stays bit-identical
under skip, and the diagnosis names the rank (and the parameter by its full name)."""

import pytest

pytest.importorskip("torch")


def same_everywhere(results, scenario, key):
    values = [r[scenario][key] for r in results]
    assert all(v == values[0] for v in values), (scenario, key, values)
    return values[0]


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_and_dtensor(world, tmp_path, ranks_of):
    results = ranks_of("torch_fsdp.py", world, tmp_path, timeout=200).results()
    last = world - 1
    for scenario, step in (("input", 2), ("forward", 1), ("shard", 2), ("flip", 2), ("tp", 2)):
        applied = same_everywhere(results, scenario, "applied")
        d = same_everywhere(results, scenario, "diagnosis")
        assert d is not None and d["step"] == step, (scenario, d)
        assert applied[step] is False and all(
            r[scenario]["bit_identical"][step] for r in results
        ), scenario
        assert same_everywhere(results, scenario, "skipped") == 1
    assert results[0]["input"]["applied"] == [True, True, False, True]
    d = results[0]["input"]["diagnosis"]
    assert (d["category"], d["ranks"], d["samples"]) == ("nonfinite_input", [1], [3])

    d = results[0]["forward"]["diagnosis"]
    assert (d["category"], d["op"], d["ranks"], d["samples"]) == (
        "op_domain",
        "aten::log",
        [last],
        [2],
    )

    # A NaN in rank 1's shard: named by the parameter's full name; the stored state is bad, so
    # skipping cannot help and every rank stops together.
    d = results[0]["shard"]["diagnosis"]
    assert (d["category"], d["module"], d["ranks"]) == ("nonfinite_parameters", "body.2", [1])
    assert any("body.2.weight" in e and "shard" in e for e in d["evidence"])
    assert same_everywhere(results, "shard", "should_stop") is True

    # One flipped exponent bit, once, on rank 1: the replay from the same state and batch is
    # finite. Transient, rank 1 named, both results in the evidence, the update kept out.
    assert results[1]["flip"]["flipped"] and not any(
        r["flip"]["flipped"] for i, r in enumerate(results) if i != 1
    )
    d = results[0]["flip"]["diagnosis"]
    assert (d["category"], d["ranks"]) == ("transient", [1])
    assert any("first run: loss non-finite; replay: finite" in e for e in d["evidence"])
    assert any(
        e.startswith("replay on rank 1: loss") and e.endswith("finite") for e in d["evidence"]
    )
    assert any("non-deterministic kernels" in f and "faulty device" in f for f in d["fixes"])
    assert same_everywhere(results, "flip", "should_stop") is False

    d = results[0]["tp"]["diagnosis"]
    assert (d["category"], d["module"], d["ranks"]) == ("nonfinite_parameters", "0", [1])
    for scenario in ("input", "forward", "flip"):  # the skipped update never reached the weights
        assert same_everywhere(results, scenario, "finite") is True
