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

from nanscope.core.diagnosis import Diagnosis, clean_report
from nanscope.core.errors import BadInputError, NonFiniteError
from nanscope.core.importwatch import stop_watching, when_imported
from nanscope.core.io import check_writable, write_json
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
    when_imported("torch", _attach(session, "torch", "torch"))
    when_imported("tensorflow", _attach(session, "keras", "tensorflow"))
    when_imported("keras", _attach(session, "keras", "keras"))

    exit_code = 0
    saved_argv = sys.argv[:]
    sys.argv = [args.script, *script_args]
    sys.path.insert(0, session.script_dir)
    try:
        runpy.run_path(args.script, run_name="__main__")
    except NonFiniteError:
        exit_code = 1
    except SystemExit as exc:
        code = exc.code
        exit_code = code if isinstance(code, int) else (0 if code is None else 1)
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
    except BaseException:
        # The script's own error: show it as Python would, then our diagnosis if we have one.
        traceback.print_exc()
        exit_code = 1
    finally:
        stop_watching()
        session.close()
        sys.argv = saved_argv
        if sys.path and sys.path[0] == session.script_dir:
            sys.path.pop(0)

    framework = session.frameworks[0] if session.frameworks else None
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
