"""The Keras Guard under tf.distribute.MirroredStrategy (2 logical CPU devices, in a worker
process of its own: TensorFlow never shares a process with the torch tests)."""


def test_mirrored_replicas_keep_the_update_out_together(tmp_path, ranks_of):
    r = ranks_of("keras_mirrored.py", 1, tmp_path, timeout=200).result(0)
    assert r["replicas"] == 2
    for scenario in ("input", "flip"):
        s = r[scenario]
        assert s["skipped"] == 1 and s["applied"] == [True, True, False, True], (scenario, s)
        assert s["replicas_equal"] and s["finite"], (
            scenario
        )  # both replicas bit-identical, the veto everywhere
    d = r["input"]["diagnosis"]
    assert (d["category"], d["ranks"], d["samples"], d["step"]) == ("nonfinite_input", [1], [1], 2)
    assert any("replica 1 saw it first" in e for e in d["evidence"])
    d = r["flip"]["diagnosis"]
    assert (d["category"], d["ranks"], d["step"]) == ("transient", [1], 2), d
    assert any("non-deterministic kernels" in f for f in d["fixes"])
