"""Finding the user's line: the first stack frame outside the frameworks and nanscope.

Framework-free: it compares file paths against the installed locations of the packages
named in ``FRAMEWORK_PACKAGES`` (looked up in ``sys.modules`` only, never imported).
"""

from __future__ import annotations

import os
import sys
import sysconfig
from types import FrameType

from nanscope.core.diagnosis import Location

FRAMEWORK_PACKAGES = (
    "torch",
    "torchvision",
    "tensorflow",
    "keras",
    "tf_keras",
    "numpy",
    "nanscope",
    "pytest",
    "_pytest",
    "pluggy",
    "lightning",
    "pytorch_lightning",
    "transformers",
    "optree",
)
_STDLIB = os.path.normcase(sysconfig.get_paths()["stdlib"])


def _package_dirs() -> tuple[str, ...]:
    dirs = []
    for name in FRAMEWORK_PACKAGES:
        mod = sys.modules.get(name)
        f = getattr(mod, "__file__", None)
        if f:
            dirs.append(os.path.normcase(os.path.dirname(os.path.abspath(f))) + os.sep)
    return tuple(dirs)


def is_user_file(filename: str, _dirs: tuple[str, ...] | None = None) -> bool:
    if not filename or filename.startswith("<"):
        return False
    path = os.path.normcase(os.path.abspath(filename))
    dirs = _dirs if _dirs is not None else _package_dirs()
    if path.startswith(dirs):
        return False
    return not (path.startswith(_STDLIB) and "site-packages" not in path)


def user_location(
    frame: FrameType | None = None, *, relative_to: str | None = None
) -> Location | None:
    """The innermost frame of user code on the current stack (or above ``frame``)."""
    f = frame or sys._getframe(1)
    dirs = _package_dirs()
    while f is not None:
        if is_user_file(f.f_code.co_filename, dirs):
            return Location(
                _display(f.f_code.co_filename, relative_to), f.f_lineno, f.f_code.co_name
            )
        f = f.f_back
    return None


def location_from_stack(
    frames: list[tuple[str, int, str]], *, relative_to: str | None = None
) -> Location | None:
    """Same, from ``(filename, lineno, function)`` tuples innermost first (a saved stack)."""
    dirs = _package_dirs()
    for filename, lineno, fn in frames:
        if is_user_file(filename, dirs):
            return Location(_display(filename, relative_to), int(lineno), fn)
    return None


def _display(filename: str, relative_to: str | None) -> str:
    base = relative_to or os.getcwd()
    try:
        rel = os.path.relpath(filename, base)
    except ValueError:
        return filename
    return filename if rel.startswith("..") else rel
