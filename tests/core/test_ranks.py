"""The combined report of several ranks (core/ranks.combine): which rank saw it first, by
which rule, and how the ranks that stayed clean, raised or never answered are listed. The
records are what real ranks write (tests/distributed/test_launchers.py runs them for real)."""

import time

from nanscope.core import rules
from nanscope.core.diagnosis import Diagnosis
from nanscope.core.ranks import Rank, RankBoard, combine, per_rank_text


def _failed(rank: int, d: Diagnosis, *, at: float, host: str = "h") -> dict:
    d.framework = "torch"
    return {
        "rank": rank,
        "host": host,
        "status": "nonfinite",
        "seen_at": at,
        "diagnosis": d.to_dict(),
    }


def bad_input(step: int) -> Diagnosis:
    return Diagnosis("nonfinite_input", "an input held 1 NaN", phase="data", step=step, samples=[3])


def from_all_reduce(step: int) -> Diagnosis:
    return rules.unexplained("gradient", step=step, phase="backward")


def test_the_lower_step_decides_before_the_clock():
    lead, doc = combine(
        {0: _failed(0, bad_input(3), at=1.0), 1: _failed(1, bad_input(1), at=9.0)}, 2
    )
    assert lead.ranks == [1] and lead.step == 1
    assert doc["first"]["decided_by"] == "step"
    assert lead.evidence[-1] == (
        "rank 1 saw it first: it failed at step 1, the earliest step "
        "(rank 0: nonfinite_input at step 3 in data)"
    )
    assert [e["first"] for e in doc["per_rank"]] == [False, True]


def test_the_earlier_phase_decides_within_a_step():
    late = Diagnosis("op_domain", "log of 0", phase="loss", step=2, op="aten::log")
    _, doc = combine({0: _failed(0, late, at=1.0), 1: _failed(1, bad_input(2), at=2.0)}, 2)
    assert doc["first"]["ranks"] == [1] and doc["first"]["decided_by"] == "phase"


def test_a_rank_whose_own_ops_produced_it_comes_before_one_it_reached():
    own = Diagnosis("singular_gradient", "sqrt at 0", phase="backward", step=2, op="aten::sqrt")
    _, doc = combine({0: _failed(0, from_all_reduce(2), at=1.0), 1: _failed(1, own, at=2.0)}, 2)
    assert doc["first"]["ranks"] == [1] and doc["first"]["decided_by"] == "producer"


def test_a_tie_names_every_rank_and_shows_the_one_seen_earliest_on_one_host():
    lead, doc = combine(
        {0: _failed(0, bad_input(2), at=5.5), 1: _failed(1, bad_input(2), at=5.0)}, 2
    )
    assert lead.ranks == [0, 1] and doc["first"]["decided_by"] == "tie"
    assert (
        "rank 1's diagnosis is shown (it saw it 0.50 s earlier, same host)" in doc["first"]["why"]
    )
    # Different hosts: their clocks are not compared; the lowest rank's diagnosis is shown.
    _, doc = combine(
        {
            0: _failed(0, bad_input(2), at=5.5, host="a"),
            1: _failed(1, bad_input(2), at=5.0, host="b"),
        },
        2,
    )
    assert doc["first"]["why"].endswith("rank 0's diagnosis is shown (the lowest rank)")


def test_clean_raised_unanswered_and_missing_ranks():
    failed = _failed(1, bad_input(2), at=1.0)
    records = {
        0: {"rank": 0, "status": "running", "answering": ["1@1.0"], "step": 2},
        1: failed,
        2: {"rank": 2, "status": "error", "error": "RuntimeError: Connection closed by peer"},
        3: {"rank": 3, "status": "running", "answering": []},
    }
    lead, doc = combine(records, 5)
    assert doc["status"] == "nonfinite" and doc["world_size"] == 5
    assert [e["status"] for e in doc["per_rank"]] == [
        "clean",
        "nonfinite",
        "clean",
        "missing",
        "missing",
    ]
    assert doc["missing_ranks"] == [3, 4]
    text = per_rank_text(doc)
    assert "rank 0  clean      no non-finite value seen (still running when rank 1 stopped)" in text
    assert (
        "rank 2  clean      no non-finite value seen; the script raised (after rank 1 stopped)"
        in text
    )
    assert (
        "rank 4  missing    no result: its process died or never started under nanscope run" in text
    )


def test_a_clean_job():
    lead, doc = combine({r: {"rank": r, "status": "clean", "exit_code": 0} for r in (0, 1)}, 2)
    assert lead is None and doc["status"] == "clean" and doc["diagnosis"] is None
    assert "first" not in doc and "missing_ranks" not in doc


def test_board_ignores_other_jobs_and_bounds_its_wait(tmp_path):
    mine = RankBoard(tmp_path, Rank(1, 2, 1, "h", "job-b"))
    RankBoard(tmp_path, Rank(0, 2, 0, "h", "job-a")).begin(answer=False)  # an earlier run's file
    mine.begin(answer=False)
    assert set(mine.read()) == {1}
    start = time.monotonic()
    seen = mine.wait_for_answers("1@0", timeout=0.5)  # rank 0 of this job never answers
    assert 0.5 <= time.monotonic() - start < 3 and set(seen) == {1}
    assert (
        mine.claim_combiner()
        and not RankBoard(tmp_path, Rank(0, 2, 0, "h", "job-b")).claim_combiner()
    )
