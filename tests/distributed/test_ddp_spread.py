"""Under DDP the guard's flag rides DDP's own gradient all-reduce: a healthy step issues no
collective of nanscope's own. What only one rank can see must still stop both ranks: a NaN
loss with finite gradients, a BatchNorm running variance that overflowed while its output
stayed finite. Healthy runs stay bit-identical to an untouched DDP model, and a comm hook the
user registered keeps working."""

import pytest

pytest.importorskip("torch")


@pytest.mark.parametrize("case", ["healthy", "user_hook"])
def test_healthy_ddp_is_bit_identical_to_unguarded(case, tmp_path, ranks_of):
    r0, r1 = ranks_of("torch_ddp_spread.py", 2, tmp_path, case, timeout=120).results()
    for r in (r0, r1):
        assert r["applied"] == [True] * 5 and r["skipped"] == 0 and not r["disabled"]
        assert r["same_as_unguarded"], r
    assert r0["weights"] == r1["weights"]


@pytest.mark.parametrize("case", ["loss_only", "buffer_only"])
def test_what_one_rank_sees_stops_both(case, tmp_path, ranks_of):
    r0, r1 = ranks_of("torch_ddp_spread.py", 2, tmp_path, case, timeout=120).results()
    for r in (r0, r1):
        assert r["applied"] == [True, True, False, True, True], r
        assert r["skipped"] == 1 and not r["disabled"]
        d = r["diagnosis"]
        assert d["step"] == 2 and d["ranks"] == [1], d
    assert r0["diagnosis"] == r1["diagnosis"]
    assert r0["weights"] == r1["weights"]
    expected = {"loss_only": "nonfinite_input", "buffer_only": "corrupt_norm_statistics"}[case]
    assert r0["diagnosis"]["category"] == expected, r0["diagnosis"]  # (the NaN loss term comes
    # from outside the watched ops: an input)
