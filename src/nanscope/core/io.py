"""Writing files safely: atomically, never over a user's input, with one-line errors.

Every file nanscope writes (JSON reports, repro bundles, repaired checkpoints) goes to a
temporary file in the target's folder and is renamed into place, so a crash or a full disk
never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from nanscope.core.errors import BadInputError


def check_writable(path: str | os.PathLike, *, what: str = "output file") -> Path:
    """Fail early (before any work) when ``path`` cannot be written."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise BadInputError(f"cannot write {what} {str(p)!r}: it is a folder", path=str(p))
    if not folder.is_dir():
        raise BadInputError(
            f"cannot write {what} {str(p)!r}: folder {str(folder)!r} does not exist", path=str(p)
        )
    if not os.access(folder, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise BadInputError(f"cannot write {what} {str(p)!r}: permission denied", path=str(p))
    return p


def _create_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0o666 less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_CREATE_MODE = _create_mode()


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[Path], None],
    *,
    what: str = "output file",
    suffix: str = ".part",
) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    ``suffix`` ends the temporary file's name, for writers that insist on one (Keras: ``.keras``).
    """
    p = check_writable(path, what=what)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{p.name}.", suffix=suffix, dir=p.parent if str(p.parent) else "."
    )
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp makes the file owner-only: give it the mode open(path, "w") would (an
        # existing file's own, else 0o666 less the umask)
        os.chmod(tmp, stat.S_IMODE(p.stat().st_mode) if p.exists() else _CREATE_MODE)
        os.replace(tmp, p)
    except OSError as err:
        raise BadInputError(
            f"cannot write {what} {str(p)!r}: {err.strerror or err}", path=str(p)
        ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


def write_text(path: str | os.PathLike, text: str, *, what: str = "output file") -> Path:
    return atomic_write(path, lambda t: t.write_text(text, encoding="utf-8"), what=what)


def write_json(path: str | os.PathLike, data: dict, *, what: str = "JSON report") -> Path:
    return write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n", what=what)


def _jsonable(obj: object) -> object:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def refuse_same_file(source: str | os.PathLike, output: str | os.PathLike) -> None:
    """nanscope never overwrites the user's input (a checkpoint, a dataset file)."""
    s, o = Path(source), Path(output)
    if o.exists() and (s.resolve() == o.resolve() or os.path.samefile(s, o)):
        raise BadInputError(
            f"refusing to overwrite the input {str(s)!r}: choose another output with -o"
        )
