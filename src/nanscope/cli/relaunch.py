"""Ranks a script starts itself, watched too: ``nanscope run train.py`` on a Lightning
``strategy="ddp"`` script.

Lightning's launcher starts rank 1.. by running the script again (``subprocess.Popen([python,
train.py, *args])``, with ``LOCAL_RANK`` / ``WORLD_SIZE`` in the child's environment). While
``nanscope run`` runs the script, that one command (the same interpreter, the same script) is
started as ``python -m nanscope run ... train.py -- *args`` instead, with the rank in
``NANSCOPE_RANK`` / ``NANSCOPE_WORLD_SIZE``; every other command is left alone, and
``subprocess.Popen`` is put back when the script ends. The process that started them becomes
rank ``LOCAL_RANK`` of the job, and the ranks meet on the same board as under torchrun
(``nanscope.core.ranks``). Only one node: with ``NODE_RANK`` other than 0 the global rank is
not known here, and nothing is changed.

Lightning's own watchdog kills the first process as soon as a child exits with a non-zero
status, so a started rank that nanscope stopped exits 0 and the first process carries the
job's status (``nanscope.cli.run._relaunched_exit``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
import warnings
from collections.abc import Callable
from typing import Any

from nanscope.core.ranks import Rank, RankBoard

STARTED_BY = "NANSCOPE_STARTED_BY"  # in a started rank: the pid of the process that started it


class Relaunch:
    """While active, the script starting itself again is started under ``nanscope run``."""

    def __init__(
        self, script: str, options: list[str], board_for: Callable[[Rank], RankBoard]
    ) -> None:
        self.script = os.path.realpath(script)
        self.options = options  # nanscope run's own options, paths made absolute
        self.board_for = board_for
        self.board: RankBoard | None = None  # this process's, once it started a rank
        self._saved: Any = None

    def __enter__(self) -> Relaunch:
        relaunch, original = self, subprocess.Popen
        self._saved = original

        class WatchedPopen(original):  # type: ignore[misc, valid-type]
            def __init__(self, args: Any, *a: Any, **kw: Any) -> None:
                if a:  # bufsize and the rest given by position: not Lightning's call
                    super().__init__(args, *a, **kw)
                    return
                try:
                    args, kw["env"] = relaunch.rewrite(args, kw.get("env"))
                except Exception as err:  # nanscope's own failure: that rank runs unwatched
                    warnings.warn(
                        f"nanscope: internal error starting a rank under nanscope run ({err!r}); "
                        "it runs unwatched",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                super().__init__(args, **kw)

        subprocess.Popen = WatchedPopen  # type: ignore[misc]
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.Popen = self._saved  # type: ignore[misc]

    def rewrite(self, args: Any, env: dict[str, str] | None) -> tuple[Any, dict[str, str] | None]:
        """``args`` and ``env`` for Popen: the same unless they start this script again."""
        if not (
            isinstance(args, (list, tuple))
            and len(args) >= 2
            and all(isinstance(a, str) for a in args)
            and os.path.realpath(args[0]) == os.path.realpath(sys.executable)
            and os.path.realpath(args[1]) == self.script
        ):
            return args, env
        child = dict(os.environ if env is None else env)
        try:
            rank, world = int(child["LOCAL_RANK"]), int(child["WORLD_SIZE"])
        except (KeyError, ValueError):
            return args, env
        if child.get("NODE_RANK", "0") != "0" or not 0 < rank < world:
            return args, env
        if self.board is None:  # this process is the first rank of the job
            job = f"nanscope-{uuid.uuid4().hex}"
            me = Rank(int(os.environ.get("LOCAL_RANK", "0")), world, 0, socket.gethostname(), job)
            self.board = self.board_for(me)
        child["NANSCOPE_RUN_ID"] = self.board.me.job
        child["NANSCOPE_RANK"], child["NANSCOPE_WORLD_SIZE"] = str(rank), str(world)
        child[STARTED_BY] = str(os.getpid())
        command = [args[0], "-m", "nanscope", "run", *self.options, args[1], "--", *args[2:]]
        return command, child
