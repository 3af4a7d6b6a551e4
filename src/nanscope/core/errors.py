"""Exceptions raised by nanscope.

Hierarchy::

    NanscopeError                 every error nanscope raises on purpose
    ├── BadInputError             the user's input is unusable: a missing or truncated file, a
    │   │                         wrong format, an unwritable path. The CLI prints the message
    │   │                         on one line and exits 2.
    │   └── MissingDependencyError  an optional framework is not installed (names the install)
    ├── NonFiniteError            a guard with policy "raise" caught a non-finite step; carries
    │                             the ``Diagnosis`` in ``.diagnosis``
    └── RankLeftError             distributed training: another rank did not reach the guard's
                                  collective within its bound (it raised, died or hangs); names
                                  the ranks in ``.ranks``

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


class RankLeftError(NanscopeError):
    """Under a process group (or a multi-worker strategy), other ranks did not reach the guard's
    collective of step ``step`` within ``waited_s`` seconds; ``ranks`` are the ones that left
    (empty when nanscope could not tell). Raised instead of waiting forever: the process group
    cannot go on without them."""

    def __init__(
        self,
        message: str,
        *,
        ranks: list[int] | None = None,
        step: int | None = None,
        waited_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.ranks = list(ranks or [])
        self.step = step
        self.waited_s = waited_s

    def __reduce__(self):
        return (_rank_left, (str(self), self.ranks, self.step, self.waited_s))


def _rank_left(
    message: str, ranks: list[int], step: int | None, waited_s: float | None
) -> RankLeftError:
    return RankLeftError(message, ranks=ranks, step=step, waited_s=waited_s)


class NonFiniteWarning(RuntimeWarning):
    """A guarded step was non-finite and the policy was ``skip``, ``stop`` or ``warn``."""
