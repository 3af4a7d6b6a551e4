"""The terminal stays plain where it should: rich output on an interactive terminal, plain text
when piped, in CI, under ``NO_COLOR`` or ``TERM=dumb``, or when rich is not installed.

The plain text (``str()``) is the contract; rich is only a nicer rendering of the same object.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any


def use_rich(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default stdout) gets rich output.

    >>> import io
    >>> use_rich(io.StringIO())
    False
    """
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR") or os.environ.get("CI") or os.environ.get("TERM") == "dumb":
        return False
    try:
        if not stream.isatty():
            return False
        import rich  # noqa: F401
    except (ImportError, AttributeError, ValueError):
        return False
    return True


def echo(obj: Any, *, file: IO[str] | None = None) -> None:
    """Print ``obj``: rich on a terminal (its ``__rich_console__``), else its plain text."""
    stream = file or sys.stdout
    if use_rich(stream):
        from rich.console import Console

        console = Console(file=stream, soft_wrap=True)
        if hasattr(obj, "__rich_console__") or hasattr(obj, "__rich__"):
            console.print(obj)
        else:  # its text, highlighted; "[error]" is text, not rich markup
            console.print(str(obj), markup=False)
    else:
        print(str(obj), file=stream)
