"""``nanscope run SCRIPT [ARGS...] [--json FILE]``: run a training script unchanged and
diagnose its first non-finite value.

The PyTorch or TensorFlow instrumentation attaches when the script imports that framework
(``nanscope.core.importwatch``); nanscope imports neither itself. ``--json FILE`` may come
before SCRIPT, or as the last two arguments (write ``--`` before the script's own arguments
to pass a trailing ``--json`` through to the script).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path

from nanscope.cli.relaunch import STARTED_BY, Relaunch
from nanscope.core.diagnosis import Diagnosis, clean_report
from nanscope.core.errors import BadInputError, NonFiniteError
from nanscope.core.importwatch import stop_watching, when_imported
from nanscope.core.io import check_writable, write_json
from nanscope.core.ranks import (
    Rank,
    RankBoard,
    failure_id,
    per_rank_text,
    rank_timeout,
    this_rank,
)
from nanscope.core.session import RunSession
from nanscope.report.console import echo

HELP = "run a training script unchanged; stop at the first non-finite value and diagnose it"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json", metavar="FILE", help="write the diagnosis as JSON (the contract's schema)"
    )
    p.add_argument(
        "--html",
        metavar="FILE",
        help="also write a self-contained HTML report (plots, source, fixes)",
    )
    p.add_argument(
        "--reports",
        metavar="DIR",
        default="nanscope-reports",
        help="where repro bundles go (default: %(default)s)",
    )
    p.add_argument("script", help="the Python script to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")


def split_script_args(args: list[str]) -> tuple[list[str], str | None]:
    """Take a trailing ``--json FILE`` for nanscope unless ``--`` hands everything to the script.

    >>> split_script_args(["--lr", "1", "--json", "out.json"])
    (['--lr', '1'], 'out.json')
    >>> split_script_args(["--", "--json", "x"])
    (['--json', 'x'], None)
    """
    if args and args[0] == "--":
        return args[1:], None
    if len(args) >= 2 and args[-2] == "--json":
        return args[:-2], args[-1]
    return args, None


def _attach(session: RunSession, framework: str, module_name: str):
    def callback(module: object) -> None:
        try:
            if framework == "torch":
                from nanscope.torch import runner
            else:
                from nanscope.keras import runner
            runner.attach(session, module_name)
            if framework not in session.frameworks:
                session.frameworks.append(framework)
        except Exception as err:  # never break the user's script
            session.internal_error(f"attaching to {module_name}", err)

    return callback


def main(args: argparse.Namespace) -> int:
    script_args, trailing_json = split_script_args(list(args.args))
    json_path = args.json or trailing_json
    if not os.path.isfile(args.script):
        raise BadInputError(
            f"script {args.script!r} does not exist"
            if not os.path.exists(args.script)
            else f"script {args.script!r} is not a file"
        )
    if json_path:
        check_writable(json_path, what="JSON report")
    if args.html:
        check_writable(args.html, what="HTML report")
    session = RunSession(script=args.script, reports_dir=args.reports)
    me = this_rank()
    board = None
    folder = _ranks_folder(json_path, args.reports)

    def begin(rank: Rank) -> RankBoard:
        b = RankBoard(folder, rank)
        b.begin(progress=lambda: {} if session.steps is None else {"step": session.steps})
        return b

    relaunch = None
    if me is not None:  # one of several processes (torchrun, accelerate launch): see core/ranks
        board = begin(me)
    else:  # the script may start its other ranks itself (Lightning): see cli/relaunch
        relaunch = Relaunch(args.script, _options(args, json_path), begin)
    when_imported("torch", _attach(session, "torch", "torch"))
    when_imported("tensorflow", _attach(session, "keras", "tensorflow"))
    when_imported("keras", _attach(session, "keras", "keras"))

    exit_code = 0
    script_error: BaseException | None = None
    saved_argv = sys.argv[:]
    sys.argv = [args.script, *script_args]
    sys.path.insert(0, session.script_dir)
    try:
        with relaunch or nullcontext():
            runpy.run_path(args.script, run_name="__main__")
    except NonFiniteError:
        exit_code = 1
    except SystemExit as exc:
        code = exc.code
        exit_code = code if isinstance(code, int) else (0 if code is None else 1)
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
    except BaseException as err:
        # The script's own error: show it as Python would, then our diagnosis if we have one.
        if board is None and (relaunch is None or relaunch.board is None):
            traceback.print_exc()
        script_error = err
        exit_code = 1
    finally:
        stop_watching()
        session.close()
        sys.argv = saved_argv
        if sys.path and sys.path[0] == session.script_dir:
            sys.path.pop(0)

    framework = session.frameworks[0] if session.frameworks else None
    if relaunch is not None and relaunch.board is not None:  # it started its other ranks
        board = relaunch.board
    if board is None and session.diagnosis is not None:
        session.diagnosis = _other_ranks_unwatched(session.diagnosis, args.script)
    if board is not None:
        code = _end_rank(board, session, exit_code, script_error, framework, json_path, args.html)
        if relaunch is not None or STARTED_BY in os.environ:
            return _relaunched_exit(board, code)
        return code
    if session.diagnosis is not None:
        echo(session.diagnosis, file=sys.stderr)
        if json_path:
            write_json(json_path, session.diagnosis.to_dict())
        _write_html(args.html, session.diagnosis, session)
        return 1
    if json_path:
        write_json(json_path, clean_report(framework))
    _write_html(args.html, clean_report(framework), session)
    return exit_code


def _other_ranks_unwatched(d: Diagnosis, script: str) -> Diagnosis:
    """A value that came from another rank, in a process no launcher started under nanscope
    run: the script started its other ranks in a way nanscope does not follow
    (``multiprocessing``, a launcher of its own), so they ran unwatched, and the rank whose op
    made it is not in the report."""
    group = d.details.get("process_group")
    if "arrived_through" not in d.details or not group:
        return d
    n = group["size"]
    others = "the other rank" if n == 2 else f"the other {n - 1} ranks"
    d.evidence.append(
        f"this process is rank {group['rank']} of {n}, the only one nanscope run watched: the "
        f"script started {others} itself (multiprocessing, a launcher of its own), without nanscope"
    )
    d.fixes = [  # not "run nanscope run": it ran, on this rank alone
        f"watch every rank: run the script as one rank per process under `torchrun "
        f"--nproc-per-node {n} -m nanscope run {script}`; the report then names the rank whose op "
        "made the value",
    ]
    return d


def _relaunched_exit(board: RankBoard, code: int) -> int:
    """The exit status of a rank when the script started its other ranks itself (cli/relaunch).

    The first process carries the job's status: it waits (bounded) for the report of all ranks
    when another rank wrote it, so that the report is out before the command returns. A rank
    it started exits 0 once nanscope stopped it (its own non-finite value, or a collective
    broken by the rank that stopped): Lightning's watchdog kills the first process as soon as
    a started rank exits otherwise, before it could finish."""
    seen = board.read()
    mine = seen.get(board.me.rank, {}).get("status")
    stopped = any(v["status"] == "nonfinite" for v in seen.values())
    if STARTED_BY not in os.environ:
        if stopped and mine != "nonfinite":
            board.combined_failures(rank_timeout())
        return code
    return 0 if code == 1 and stopped else code


def _options(args: argparse.Namespace, json_path: str | None) -> list[str]:
    """nanscope run's own options, for a rank the script starts itself (absolute paths)."""
    opts = ["--reports", os.path.abspath(args.reports)]
    if json_path:
        opts += ["--json", os.path.abspath(json_path)]
    if args.html:
        opts += ["--html", os.path.abspath(args.html)]
    return opts


def _ranks_folder(json_path: str | None, reports: str) -> Path:
    """Where the ranks leave their results: ``out.ranks/`` beside ``--json out.json``."""
    if json_path:
        p = Path(json_path)
        return p.with_suffix(".ranks") if p.suffix else p.with_name(p.name + ".ranks")
    return Path(reports) / "ranks"


def _end_rank(
    board: RankBoard,
    session: RunSession,
    exit_code: int,
    error: BaseException | None,
    framework: str | None,
    json_path: str | None,
    html: str | None,
) -> int:
    """One rank of several ends: leave its result; the first rank that failed waits (bounded)
    for the others' answers and reports for all of them."""
    me, d = board.me, session.diagnosis
    if d is None:
        if error is None:
            board.end("clean", exit_code=exit_code, framework=framework, step=session.steps)
        else:
            failed = sorted(r for r, v in board.read().items() if v["status"] == "nonfinite")
            if failed and not isinstance(error, KeyboardInterrupt):
                # The script's collective broke because nanscope stopped the failed rank: the
                # traceback would only repeat that.
                who = ", ".join(map(str, failed))
                print(
                    f"nanscope: rank {me.rank} stopped: {_one_line(error)} (rank {who} had "
                    "stopped at its non-finite value)",
                    file=sys.stderr,
                )
            else:
                traceback.print_exception(error)
            board.end(
                "error",
                exit_code=exit_code,
                framework=framework,
                step=session.steps,
                error=_one_line(error),
            )
        lead, doc = board.publish(json_path)
        if lead is None:
            _write_html(html, doc, session)
        return exit_code
    board.end(
        "nonfinite",
        exit_code=1,
        framework=d.framework or framework,
        step=d.step,
        seen_at=session.failed_at,
        diagnosis=d.to_dict(),
    )
    mine = failure_id(board.read().get(me.rank, {"rank": me.rank, "seen_at": session.failed_at}))
    if board.claim_combiner():
        seen = board.wait_for_answers(mine, rank_timeout())
        lead, doc = board.publish(json_path)
        board.mark_combined(seen)
        assert lead is not None  # this rank's own failure is in it
        echo(lead, file=sys.stderr)
        print(per_rank_text(doc), file=sys.stderr)
        if json_path:
            print(
                f"nanscope: the report of all {me.world_size} ranks is in {json_path}",
                file=sys.stderr,
            )
        _write_html(html, lead, session)
        return 1
    print(f"nanscope: rank {me.rank}: {d.headline()}", file=sys.stderr)
    # Stay until the combiner has written its report (the launcher stops every rank once one
    # has exited), then put this rank's failure in it if it came too late.
    included = board.combined_failures(rank_timeout())
    lead, doc = board.publish(json_path)
    if included is not None and mine in included:
        return 1
    late = f"nanscope: rank {me.rank} failed after the report of all ranks was written"
    if lead is not None and me.rank in lead.ranks:  # at an earlier step: the report changes
        print(f"{late}, at an earlier step: it saw it first. The report, updated:", file=sys.stderr)
        echo(lead, file=sys.stderr)
        print(per_rank_text(doc), file=sys.stderr)
    else:
        print(f"{late}" + (f"; {json_path} now includes it" if json_path else ""), file=sys.stderr)
    return 1


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _write_html(path: str | None, what, session: RunSession) -> None:
    if not path:
        return
    from nanscope.core.bundle import read_bundle
    from nanscope.report import write_report

    bundle = None
    if getattr(what, "bundle", None):
        try:
            bundle = read_bundle(what.bundle, verify=False)
        except Exception:  # a bundle that failed to write: the page shows the diagnosis alone
            bundle = None
    kw = (
        {"source_search": [session.script_dir], "bundle": bundle}
        if isinstance(what, Diagnosis)
        else {}
    )
    print(f"nanscope: HTML report written to {write_report(path, what, **kw)}", file=sys.stderr)
