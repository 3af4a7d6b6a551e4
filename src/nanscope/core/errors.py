"""Exceptions raised by nanscope.

Hierarchy::

    NanscopeError                 every error nanscope raises on purpose
    ├── BadInputError             the user's input is unusable: a missing or truncated file, a
    │   │                         wrong format, an unwritable path. The CLI prints the message
    │   │                         on one line and exits 2.
    │   └── MissingDependencyError  an optional framework is not installed (names the install)
    └── NonFiniteError            a guard with policy "raise" caught a non-finite step; carries
                                  the ``Diagnosis`` in ``.diagnosis``

    RuntimeWarning
    └── NonFiniteWarning          a guard with policy "skip", "stop" or "warn" caught one: the
                                  warning's text is the diagnosis and what was done
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanscope.core.diagnosis import Diagnosis


class NanscopeError(Exception):
    """Base class of every error nanscope raises on purpose."""


class BadInputError(NanscopeError):
    """The input cannot be used; ``str(err)`` is a one-line reason for the user."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class MissingDependencyError(BadInputError):
    """An optional dependency is missing; the message carries the exact install command."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(
            f"{package} is not installed; install it with: pip install 'nanscope[{extra}]'"
        )
        self.package = package
        self.extra = extra


class NonFiniteError(NanscopeError):
    """A non-finite value was caught; ``.diagnosis`` says where it came from and why."""

    def __init__(self, diagnosis: Diagnosis) -> None:
        super().__init__(diagnosis.headline())
        self.diagnosis = diagnosis

    def __reduce__(self):  # picklable across processes (DDP, multiprocessing)
        return (type(self), (self.diagnosis,))


class NonFiniteWarning(RuntimeWarning):
    """A guarded step was non-finite and the policy was ``skip``, ``stop`` or ``warn``."""
