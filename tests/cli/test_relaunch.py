"""nanscope.cli.relaunch: while nanscope run runs a script, only the command that starts that
same script again (Lightning's launcher) is started under nanscope run; every other command,
and every failure of nanscope's own, leaves the user's subprocess as it was."""

import os
import subprocess
import sys
import warnings

import pytest

from nanscope.cli.relaunch import STARTED_BY, Relaunch
from nanscope.core.ranks import RankBoard

LIGHTNING_ENV = {"LOCAL_RANK": "1", "WORLD_SIZE": "2", "NODE_RANK": "0", "MASTER_PORT": "1"}


@pytest.fixture
def script(tmp_path):
    s = tmp_path / "train.py"
    s.write_text("import os, sys\nprint(os.environ.get('NANSCOPE_RANK'), sys.argv[1:])\n")
    return s


def test_only_the_script_starting_itself_is_rewritten(tmp_path, script):
    boards = []

    def board_for(rank):
        boards.append(RankBoard(tmp_path / "ranks", rank))
        return boards[-1]

    r = Relaunch(str(script), ["--reports", str(tmp_path)], board_for)
    args, env = r.rewrite([sys.executable, str(script), "--lr", "1"], dict(LIGHTNING_ENV))
    assert args == [
        sys.executable,
        "-m",
        "nanscope",
        "run",
        "--reports",
        str(tmp_path),
        str(script),
        "--",
        "--lr",
        "1",
    ]
    assert (env["NANSCOPE_RANK"], env["NANSCOPE_WORLD_SIZE"], env[STARTED_BY]) == (
        "1",
        "2",
        str(os.getpid()),
    )
    assert env["NANSCOPE_RUN_ID"] == boards[0].me.job and boards[0].me.world_size == 2
    for other in (
        [sys.executable, "-c", "print(1)"],  # not the script
        ["git", "status"],
        "python train.py",  # a shell string
    ):
        assert r.rewrite(other, dict(LIGHTNING_ENV)) == (other, LIGHTNING_ENV)
    node_1 = {**LIGHTNING_ENV, "NODE_RANK": "1"}  # another node: its global rank is not known
    assert r.rewrite([sys.executable, str(script)], node_1)[0] == [sys.executable, str(script)]
    assert len(boards) == 1


def test_a_failure_of_nanscope_leaves_the_rank_unwatched_and_popen_put_back(script):
    def board_for(rank):
        raise OSError("read-only file system")

    before = subprocess.Popen
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Relaunch(str(script), [], board_for):
            assert subprocess.Popen is not before
            p = subprocess.Popen(
                [sys.executable, str(script), "x"],
                env={**os.environ, **LIGHTNING_ENV},
                stdout=subprocess.PIPE,
                text=True,
            )
            out, _ = p.communicate(timeout=60)
    assert subprocess.Popen is before
    assert (p.returncode, out.strip()) == (0, "None ['x']")  # ran as the user wrote it
    assert [str(w.message) for w in caught if "nanscope" in str(w.message)] == [
        "nanscope: internal error starting a rank under nanscope run "
        "(OSError('read-only file system')); it runs unwatched"
    ]
