"""No hangs: one rank of a 2-process guarded DDP run leaves in the middle of a step (killed, or
its own step raises and it lingers). The other rank stops waiting within its bound
(NANSCOPE_COLLECTIVE_TIMEOUT, set small here) with a RankLeftError naming the rank that left.
The launch itself is bounded: a hang fails the test instead of CI."""

import pytest

pytest.importorskip("torch")


@pytest.mark.parametrize("mode", ["kill", "raise"])
def test_the_other_rank_is_told_which_rank_left(mode, tmp_path, ranks_of):
    ranks = ranks_of(
        "torch_leave.py",
        2,
        tmp_path,
        mode,
        "own",
        ok=False,
        timeout=120,
        env={"NANSCOPE_COLLECTIVE_TIMEOUT": "5"},
    )
    rc0, log0 = ranks[0]
    assert rc0 == 0, log0[-3000:]
    r0 = ranks.result(0)
    assert r0["steps_done"] == 2 and r0["error"]["type"] == "RankLeftError", r0
    assert r0["error"]["ranks"] == [1] and r0["error"]["step"] == 2
    assert "rank 1 did not reach the guard's check at step 2" in r0["error"]["message"]
    if mode == "kill":
        assert ranks[1][0] == -9
    else:
        assert ranks.result(1)["error"] == {
            "type": "ValueError",
            "message": "the user's step failed on this rank",
        }


def test_with_the_flag_in_ddps_all_reduce_nanscope_adds_no_wait(tmp_path, ranks_of):
    """Plain DDP: the guard's flag rides DDP's gradient all-reduce, so the healthy check of
    step 2 needs no other rank; the survivor applies it and meets the loss in DDP's own
    all-reduce of step 3, at once (gloo sees the closed socket), as it would without nanscope."""
    ranks = ranks_of(
        "torch_leave.py",
        2,
        tmp_path,
        "kill",
        "spread",
        ok=False,
        timeout=120,
        env={"NANSCOPE_COLLECTIVE_TIMEOUT": "5"},
    )
    rc0, log0 = ranks[0]
    assert rc0 == 0, log0[-3000:]
    r0 = ranks.result(0)
    assert r0["steps_done"] == 3 and r0["error"]["type"] == "RuntimeError", r0
    assert r0["waited_s"] < 30, r0
    assert ranks[1][0] == -9
