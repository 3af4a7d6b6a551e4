"""Several processes of one job under ``nanscope run`` (``torchrun``, ``accelerate launch``):
every rank is watched, and ONE combined report names the rank that saw the non-finite value
first. Framework-free (stdlib only).

How the ranks talk, and why so:

* through files in one folder (``out.ranks/`` beside ``--json out.json``), each written
  atomically (``core.io``): ``rank<R>.json`` is what rank R saw. Not through the process group:
  the rank that stopped at its NaN has left the script's collectives, and the others are often
  blocked inside one of them (DDP's gradient all-reduce) waiting for it;
* a rank blocked in a collective still answers: a daemon thread (started only when there are
  several ranks) lists the folder every 0.2 s and, when another rank has failed, writes "no
  non-finite value seen so far". The blocked call releases the GIL, so the thread runs;
* the first rank that fails becomes the *combiner* (an exclusive file): it waits for every
  other rank's answer, at most ``NANSCOPE_RANK_TIMEOUT`` seconds (default 30; a rank that died
  never answers and is named as missing), then writes the combined JSON and prints the report.
  It stays alive meanwhile, so the launcher (which stops every rank once one has exited) does
  not stop the others before they answered. A rank that fails after the report was written
  rewrites the JSON with itself in it and prints one line;
* "first" is decided by, in order: the lowest step (optimizer steps are the ranks' common
  clock in synchronous training); the earlier phase of that step (data, forward, loss,
  backward, optimizer); a rank whose own ops produced the value over one whose values arrived
  from another rank (an ``unknown`` diagnosis: no op of its own made it, e.g. the gradient
  all-reduce brought it). Ranks still tied all saw it first, independently; the diagnosis shown
  is the one seen earliest by the wall clock when they share a host (clocks of different hosts
  are not compared), else the lowest rank's. ``first.decided_by`` says which rule decided.

The job a result belongs to: ``NANSCOPE_RUN_ID`` when set (set it on every node of a job that
spans several), else torchrun's per-launch folder (one node), else
``MASTER_ADDR:MASTER_PORT`` with torchrun's run id and restart count. Results of another job
in the same folder are ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nanscope.core.diagnosis import SCHEMA, Diagnosis
from nanscope.core.enums import Category, Phase, Status
from nanscope.core.io import write_json

__all__ = [
    "Rank",
    "RankBoard",
    "combine",
    "failure_id",
    "per_rank_text",
    "rank_timeout",
    "this_rank",
]

_DEFAULT_TIMEOUT_S = 30.0
_POLL_S = 0.2
# A phase's place within one step; ``state`` was bad before the step began.
_PHASE_ORDER = {
    Phase.STATE: 0,
    Phase.DATA: 1,
    Phase.FORWARD: 2,
    Phase.LOSS: 3,
    Phase.BACKWARD: 4,
    Phase.OPTIMIZER: 5,
}
_FINAL = {"clean", "nonfinite", "error"}


@dataclass(frozen=True)
class Rank:
    """This process's place in a job of several processes."""

    rank: int
    world_size: int
    local_rank: int | None
    host: str
    job: str


def this_rank(environ: dict[str, str] | None = None) -> Rank | None:
    """This process's rank, from the launcher's environment; None when it runs alone.

    >>> this_rank({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}).rank
    1
    >>> this_rank({"RANK": "0", "WORLD_SIZE": "1"}) is None
    True
    >>> this_rank({"NANSCOPE_RANK": "1", "NANSCOPE_WORLD_SIZE": "2", "NANSCOPE_RUN_ID": "j"}).job
    'j'
    """
    env = os.environ if environ is None else environ
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    except (KeyError, ValueError):
        try:  # a rank the script started itself under nanscope run (nanscope.cli.relaunch)
            rank, world = int(env["NANSCOPE_RANK"]), int(env["NANSCOPE_WORLD_SIZE"])
        except (KeyError, ValueError):
            return None
    if world <= 1 or not 0 <= rank < world:
        return None
    local = env.get("LOCAL_RANK")
    error_file = env.get("TORCHELASTIC_ERROR_FILE")
    if env.get("NANSCOPE_RUN_ID"):
        job = env["NANSCOPE_RUN_ID"]
    elif error_file and env.get("GROUP_WORLD_SIZE", "1") == "1":
        # torchrun's per-launch, per-attempt folder (.../attempt_0/<local rank>/error.json):
        # shared by the ranks of this launch only, so a rerun never reads the last run's files.
        job = str(Path(error_file).parent.parent)
    else:
        job = "/".join(
            env.get(k, "")
            for k in (
                "MASTER_ADDR",
                "MASTER_PORT",
                "TORCHELASTIC_RUN_ID",
                "TORCHELASTIC_RESTART_COUNT",
            )
        )
    return Rank(
        rank,
        world,
        int(local) if local and local.isdigit() else None,
        socket.gethostname(),
        job,
    )


def rank_timeout() -> float:
    """Seconds the combiner waits for the other ranks' answers: ``NANSCOPE_RANK_TIMEOUT``."""
    try:
        return max(0.5, float(os.environ.get("NANSCOPE_RANK_TIMEOUT", _DEFAULT_TIMEOUT_S)))
    except ValueError:
        return _DEFAULT_TIMEOUT_S


class RankBoard:
    """The folder where the ranks of one job leave what they saw.

    Example (two ranks of one job, in one process for the sake of the example):
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> b0 = RankBoard(folder, Rank(0, 2, 0, "h", "job"))
        >>> b1 = RankBoard(folder, Rank(1, 2, 1, "h", "job"))
        >>> b0.begin(answer=False); b1.begin(answer=False)
        >>> b1.end("clean", exit_code=0)
        >>> sorted((r, v["status"]) for r, v in b0.read().items())
        [(0, 'running'), (1, 'clean')]
    """

    def __init__(self, folder: str | os.PathLike, me: Rank) -> None:
        self.folder = Path(folder)
        self.me = me
        self._lock = threading.Lock()
        self._ended = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress: Callable[[], dict] = dict
        self._tag = hashlib.sha1(me.job.encode()).hexdigest()[:12]

    # -- this rank's own file -----------------------------------------------------------------
    def _record(self, status: str, **fields: Any) -> dict:
        me = self.me
        return {
            "rank": me.rank,
            "local_rank": me.local_rank,
            "world_size": me.world_size,
            "host": me.host,
            "pid": os.getpid(),
            "job": me.job,
            "status": status,
            "written_at": time.time(),
            **fields,
        }

    def _write(self, record: dict) -> None:
        write_json(self.folder / f"rank{self.me.rank}.json", record, what="rank result")

    def begin(self, *, answer: bool = True, progress: Callable[[], dict] | None = None) -> None:
        """Say this rank is running; with ``answer``, answer the other ranks' failures from a
        daemon thread (``progress()`` adds what this rank can say about itself, e.g. its step)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._progress = progress or dict
        self._write(self._record("running", answering=[]))
        if answer:
            self._thread = threading.Thread(
                target=self._answer_loop, name="nanscope-rank-board", daemon=True
            )
            self._thread.start()

    def end(self, status: str, **fields: Any) -> None:
        """This rank's final result (``clean``, ``nonfinite`` or ``error``); answers stop."""
        self._stop.set()
        with self._lock:
            self._ended = True
            self._write(self._record(status, **fields))
        if self._thread is not None:
            self._thread.join(timeout=2 * _POLL_S + 1)

    def _answer_loop(self) -> None:
        said: tuple[set[str], dict] = (set(), {})
        while not self._stop.wait(_POLL_S):
            try:
                failed = {
                    failure_id(r)
                    for n, r in self.read().items()
                    if n != self.me.rank and r["status"] == "nonfinite"
                }
                # Answer a new failure, and keep the answer current (its step) while others wait.
                now = (failed, self._progress())
                if failed and now != said:
                    with self._lock:
                        if self._ended:
                            return
                        self._write(self._record("running", answering=sorted(failed), **now[1]))
                    said = now
            except Exception:  # nanscope must never break the script: stop answering
                return

    # -- everyone's files ---------------------------------------------------------------------
    def read(self) -> dict[int, dict]:
        """The latest record of every rank of this job (other jobs' files are ignored)."""
        out: dict[int, dict] = {}
        for r in range(self.me.world_size):
            try:
                rec = json.loads((self.folder / f"rank{r}.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict) and rec.get("job") == self.me.job and rec.get("rank") == r:
                out[r] = rec
        return out

    def wait_for_answers(self, failure: str, timeout: float) -> dict[int, dict]:
        """Every rank's record once each has ended or answered ``failure`` and none that is still
        running could yet fail at an earlier step than the earliest failure (its step is below
        it: ranks not in lock-step); or after ``timeout`` seconds, what there is (a rank that
        died never answers)."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.read()
            if _settled(seen, failure, self.me.world_size) or time.monotonic() > deadline:
                return seen
            time.sleep(_POLL_S / 2)

    # -- who writes the combined report -------------------------------------------------------
    @property
    def _combiner_file(self) -> Path:
        return self.folder / f".combined-{self._tag}"

    def claim_combiner(self) -> bool:
        """True for exactly one rank of the job: the first to ask."""
        try:
            fd = os.open(self._combiner_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def mark_combined(self, seen: dict[int, dict]) -> None:
        """Tell later ranks which results the combined report holds."""
        included = {str(r): failure_id(v) for r, v in seen.items() if v["status"] == "nonfinite"}
        write_json(self._combiner_file, {"job": self.me.job, "failures": included})

    def publish(self, json_path: str | os.PathLike | None) -> tuple[Diagnosis | None, dict]:
        """Combine every rank's latest record and write the JSON report. Serialized between
        ranks (a lock file), so the report written last holds the most recent records."""
        with self._locked():
            lead, doc = combine(self.read(), self.me.world_size)
            if json_path:
                write_json(json_path, doc)
        return lead, doc

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # not POSIX: the writes stay atomic, only their order is not kept
            yield
            return
        with open(self.folder / f".lock-{self._tag}", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def combined_failures(self, timeout: float) -> set[str] | None:
        """The failures the combiner's report holds, once it is written (None: not in time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() <= deadline:
            try:
                done = json.loads(self._combiner_file.read_text(encoding="utf-8"))
                return set(done["failures"].values())
            except (OSError, ValueError, KeyError, TypeError):
                time.sleep(_POLL_S / 2)
        return None


def _settled(seen: dict[int, dict], failure: str, world_size: int) -> bool:
    if not all(
        r in seen and (seen[r]["status"] in _FINAL or failure in seen[r].get("answering", ()))
        for r in range(world_size)
    ):
        return False
    steps = [d.step for r in seen.values() if (d := _failed_diagnosis(r)) and d.step is not None]
    earliest = min(steps, default=None)
    return earliest is None or not any(
        r["status"] == "running" and isinstance(r.get("step"), int) and r["step"] < earliest
        for r in seen.values()
    )


def failure_id(record: dict) -> str:
    """Names one rank's failure (its rank and when it saw it)."""
    return f"{record.get('rank')}@{record.get('seen_at')}"


def _failed_diagnosis(record: dict) -> Diagnosis | None:
    d = record.get("diagnosis")
    return Diagnosis.from_dict(d) if isinstance(d, dict) and d.get("diagnosis") else None


def _order(d: Diagnosis) -> tuple[float, int, int]:
    step = float("inf") if d.step is None else d.step
    phase = _PHASE_ORDER.get(d.phase, len(_PHASE_ORDER)) if d.phase else len(_PHASE_ORDER)
    return step, phase, 1 if d.category is Category.UNKNOWN else 0


def _who(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _at(d: Diagnosis) -> str:
    return " ".join(
        x
        for x in (
            f"step {d.step}" if d.step is not None else "",
            f"in {d.phase}" if d.phase else "",
        )
        if x
    )


def _first(
    failed: dict[int, Diagnosis], records: dict[int, dict]
) -> tuple[list[int], str, str, int]:
    """(the ranks that saw it first, the rule that decided, why, the rank whose diagnosis is shown)."""
    best = min(_order(d) for d in failed.values())
    first = sorted(r for r, d in failed.items() if _order(d) == best)
    later = sorted(r for r in failed if r not in first)
    lead = first[0]
    if len(failed) == 1:
        rule = "only"
        why = "the only rank that saw a non-finite value"
    elif not later:
        rule = "tie"
        why = f"each saw it at {_at(failed[lead])} on its own"
        hosts = {records[r].get("host") for r in first}
        times = {r: records[r].get("seen_at") for r in first}
        if len(hosts) == 1 and all(isinstance(t, (int, float)) for t in times.values()):
            lead = min(first, key=lambda r: (times[r], r))
            gap = sorted(times.values())[1] - times[lead]
            why += f"; rank {lead}'s diagnosis is shown (it saw it {gap:.2f} s earlier, same host)"
        else:
            why += f"; rank {lead}'s diagnosis is shown (the lowest rank)"
    else:
        d = failed[lead]
        # The deepest rule needed to set every later rank apart from the first ones.
        depth = max(
            next(i for i, (a, b) in enumerate(zip(_order(failed[r]), best, strict=True)) if a != b)
            for r in later
        )
        rule = ("step", "phase", "producer")[depth]
        others = "; ".join(f"rank {r}: {failed[r].category} at {_at(failed[r])}" for r in later)
        why = {
            "step": f"it failed at step {d.step}, the earliest step ({others})",
            "phase": f"it failed at {_at(d)}, earlier in that step ({others})",
            "producer": (
                f"its own ops produced the value at {_at(d)}; on {_who(later)} no op of its own "
                f"did (it arrived from another rank, e.g. through the gradient all-reduce)"
            ),
        }[rule]
    return first, rule, why, lead


def _rank_entry(r: int, rec: dict | None, first: list[int], stopped_by: list[int]) -> dict:
    if rec is None:
        return {
            "rank": r,
            "status": "missing",
            "state": "unknown",
            "note": "no result: its process died or never started under nanscope run",
        }
    entry: dict[str, Any] = {
        "rank": r,
        "local_rank": rec.get("local_rank"),
        "host": rec.get("host"),
    }
    status = rec["status"]
    d = _failed_diagnosis(rec)
    if status == "nonfinite" and d is not None:
        entry.update(
            status="nonfinite",
            state="failed",
            step=d.step,
            phase=str(d.phase) if d.phase else None,
            category=str(d.category),
            summary=d.summary,
            first=r in first,
        )
    else:
        entry["status"] = "clean"
        if rec.get("step") is not None:
            entry["step"] = rec["step"]
        if status == "clean":
            entry.update(state="finished", note="the script ended; no non-finite value seen")
        elif status == "error":
            entry.update(
                state="raised",
                error=rec.get("error"),
                note="no non-finite value seen; the script raised"
                + (f" (after {_who(stopped_by)} stopped)" if stopped_by else ""),
            )
        elif not stopped_by:
            entry.update(state="running", note="no non-finite value seen (still running)")
        elif rec.get("answering"):
            entry.update(
                state="running",
                note=f"no non-finite value seen (still running when {_who(stopped_by)} stopped)",
            )
        else:
            entry.update(
                status="missing",
                state="unknown",
                note=f"did not answer after {_who(stopped_by)} stopped: its process died, "
                "or it is stuck outside Python",
            )
    if rec.get("exit_code") is not None:
        entry["exit_code"] = rec["exit_code"]
    return entry


def combine(records: dict[int, dict], world_size: int) -> tuple[Diagnosis | None, dict]:
    """The combined report of every rank's record: (the diagnosis shown, the JSON document).

    The document is the contract's (``status``, ``framework``, ``diagnosis`` with ``ranks``, the
    ranks that saw it first) plus ``first`` (``ranks``, ``decided_by``, ``why``) and ``per_rank``.
    """
    failed = {
        r: d
        for r, rec in records.items()
        if rec["status"] == "nonfinite"
        if (d := _failed_diagnosis(rec))
    }
    framework = next(
        (rec.get("framework") for rec in records.values() if rec.get("framework")), None
    )
    lead: Diagnosis | None = None
    first_doc = None
    first: list[int] = []
    if failed:
        first, rule, why, at = _first(failed, records)
        lead = replace(failed[at], ranks=list(first), evidence=list(failed[at].evidence))
        lead.evidence.append(f"{_who(first)} saw it first: {why}")
        framework = lead.framework or framework
        first_doc = {"ranks": first, "decided_by": rule, "why": why}
    per_rank = [_rank_entry(r, records.get(r), first, sorted(failed)) for r in range(world_size)]
    missing = [e["rank"] for e in per_rank if e["status"] == "missing"]
    doc: dict[str, Any] = (
        lead.to_dict()
        if lead is not None
        else {
            "schema": SCHEMA,
            "status": str(Status.CLEAN),
            "framework": framework,
            "diagnosis": None,
        }
    )
    doc["framework"] = framework
    doc["world_size"] = world_size
    if first_doc is not None:
        doc["first"] = first_doc
    doc["per_rank"] = per_rank
    if missing:
        doc["missing_ranks"] = missing
    return lead, doc


def per_rank_text(doc: dict) -> str:
    """The ``per rank`` block the terminal report ends with."""
    lines = ["  per rank"]
    for e in doc.get("per_rank", []):
        if e["status"] == "nonfinite":
            said = f"{e['category']} at step {e['step']}" + (
                f" in {e['phase']}" if e.get("phase") else ""
            )
            said += "  (saw it first)" if e.get("first") else ""
        else:
            said = e.get("note", "")
            if e.get("error"):
                said += f": {e['error']}"
        lines.append(f"    rank {e['rank']}  {e['status']:<9}  {said}")
    return "\n".join(lines)
