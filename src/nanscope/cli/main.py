"""Entry point of the ``nanscope`` command.

Each subcommand is a module of ``nanscope.cli`` with ``HELP``, ``add_arguments(parser)`` and
``main(args) -> int``. Exit status (../shared/DIAGNOSIS.md): 0 clean, 1 a non-finite failure
or audit problems, 2 bad usage or unreadable input, always with a one-line reason.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from nanscope import __version__
from nanscope.core.errors import BadInputError

COMMANDS = {
    "run": "nanscope.cli.run",
    "demo": "nanscope.cli.demo",
    "data": "nanscope.cli.data",
    "inspect": "nanscope.cli.inspect",
    "repair": "nanscope.cli.repair",
    "show": "nanscope.cli.show",
    "fuzz-loss": "nanscope.cli.fuzz_loss",
    "report": "nanscope.cli.report",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"nanscope: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nanscope", description="Find where NaN/Inf came from, why, and what to do."
    )
    parser.add_argument("--version", action="version", version=f"nanscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, modname in COMMANDS.items():
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return 2
    try:
        return int(args._main(args) or 0)
    except BadInputError as err:
        print(f"nanscope: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nanscope: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`nanscope data X | head`): stop quietly, as shell tools do.
        # Point stdout at devnull so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as err:  # nanscope's own bug: one line, and the traceback on request
        if os.environ.get("NANSCOPE_DEBUG"):
            raise
        print(
            f"nanscope: internal error: {type(err).__name__}: {err} (set NANSCOPE_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 2


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
