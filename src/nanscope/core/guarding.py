"""What every guard keeps, whatever the framework: the policy outcome and its escalation,
the counters, the diagnoses, warn-once, nanscope's own errors, and the loss-scale history.

Framework-free; ``nanscope.torch.Guard`` and ``nanscope.keras.Guard`` each hold one
``Ledger`` and expose its attributes under the same names (``should_stop``, ``skipped``,
``counts``, ``diagnoses``, ``last``, ``history``), so the two guards behave alike and a
policy is decided in one place.

Design constraints: nothing here touches a tensor; warnings are raised through the
``warn`` callable the guard passes in (each framework attributes them to the user's line).
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nanscope.core.diagnosis import Diagnosis
from nanscope.core.enums import Phase, Policy
from nanscope.core.errors import NonFiniteWarning
from nanscope.core.source import is_user_file
from nanscope.core.trend import History

# Failures that live in the stored state: skipping the update cannot undo them.
STATE_PHASES = (Phase.STATE, Phase.OPTIMIZER)
KEEP_DIAGNOSES = 32


def warn_at_user(text: str, category: type[Warning] = RuntimeWarning) -> None:
    """A warning attributed to the user's line that led into nanscope (past nanscope's own
    frames and the framework's, such as Keras' fit loop), so it reads as about their code."""
    level, f = 2, sys._getframe(1)  # stacklevel 2 is warn_at_user's caller
    while f is not None and not is_user_file(f.f_code.co_filename):
        f, level = f.f_back, level + 1
    warnings.warn(text, category, stacklevel=level if f is not None else 2)


_NANSCOPE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _nanscope_frame(err: BaseException) -> str | None:
    """``nanscope/file.py:line`` of the innermost frame of nanscope's own code in the traceback."""
    where = None
    for fs in traceback.extract_tb(err.__traceback__):
        if os.path.normcase(os.path.abspath(fs.filename)).startswith(_NANSCOPE_DIR):
            where = f"{os.path.relpath(fs.filename, os.path.dirname(_NANSCOPE_DIR.rstrip(os.sep)))}:{fs.lineno}"
    return where


def internal_error_text(
    where: str, err: BaseException, *, then: str = "the run continues unwatched"
) -> str:
    """The one warning for nanscope's own error, in every front end: it names nanscope, where
    in nanscope it broke, and says plainly that it is not the user's script.

    >>> print(internal_error_text("nanscope's Guard, checking the step", KeyError("x")).replace("; ", ";\\n"))
    nanscope: internal error in nanscope's Guard, checking the step (KeyError: 'x');
    this is a bug in nanscope, not in your script;
    the run continues unwatched
    """
    at = _nanscope_frame(err)
    detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return (
        f"nanscope: internal error in {where} ({detail}{', at ' + at if at else ''}); "
        f"this is a bug in nanscope, not in your script; {then}"
    )


@dataclass
class LossScaleHistory:
    """A dynamic loss scale (GradScaler, LossScaleOptimizer) after each step, and the steps it skipped."""

    scales: list[float] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    limit: int = 256

    def add(self, scale: float, *, skipped_step: int | None = None) -> None:
        self.scales = (self.scales + [float(scale)])[-self.limit :]
        if skipped_step is not None:
            self.skipped = (self.skipped + [skipped_step])[-self.limit :]

    def clear(self) -> None:
        self.scales, self.skipped = [], []


class Ledger:
    """The bookkeeping of one guard.

    Example:
        >>> from nanscope.core.enums import Category
        >>> book = Ledger("skip", warn=lambda text, category=None: None)
        >>> d = Diagnosis(Category.OP_DOMAIN, "log received 1 zero", phase="loss")
        >>> book.record(d); book.act(d, unrecoverable=False)
        <Policy.SKIP: 'skip'>
        >>> book.skipped, book.counts["op_domain"], book.should_stop
        (1, 1, False)
    """

    def __init__(
        self,
        policy: Policy | str = Policy.SKIP,
        *,
        max_skips_in_a_row: int = 10,
        warn: Callable[..., None] | None = None,
        who: str = "Guard",
    ) -> None:
        self.policy = Policy(policy)
        self.max_skips_in_a_row = max(1, int(max_skips_in_a_row))
        self.warn = warn or warn_at_user
        self.who = who
        self.should_stop = False
        self.skipped = 0
        self.steps = 0
        self.counts: Counter[str] = Counter()
        self.diagnoses: list[Diagnosis] = []
        self.history = History()
        self.loss_scale = LossScaleHistory()
        self.disabled = False  # stepped aside after an internal error
        self.in_a_row = 0
        self._warned: set[str] = set()

    @property
    def last(self) -> Diagnosis | None:
        return self.diagnoses[-1] if self.diagnoses else None

    def record(self, d: Diagnosis) -> None:
        self.diagnoses = (self.diagnoses + [d])[-KEEP_DIAGNOSES:]
        self.counts[str(d.category)] += 1

    def healthy(self) -> None:
        self.in_a_row = 0

    def act(self, d: Diagnosis, *, unrecoverable: bool) -> Policy:
        """The policy to carry out for ``d``: ``skip`` escalates to ``stop`` when the stored
        state itself is bad (a skip cannot undo it) or when too many steps failed in a row.
        Counts the skip / stop; the guard then applies or drops the update."""
        policy = self.policy
        if policy is Policy.SKIP and unrecoverable:
            policy = Policy.STOP
            d.evidence.append(
                "skipping cannot help: the stored state itself is non-finite, so the guard stops"
            )
        self.in_a_row += 1
        if policy is Policy.SKIP and self.in_a_row >= self.max_skips_in_a_row:
            policy = Policy.STOP
            d.evidence.append(
                f"{self.in_a_row} steps in a row failed: skipping does not help, so the guard stops"
            )
        if policy in (Policy.SKIP, Policy.STOP):
            self.skipped += 1
        if policy is Policy.STOP:
            self.should_stop = True
        return policy

    def outcome_text(self, policy: Policy) -> str:
        """What the guard did, as both guards say it."""
        return {
            Policy.WARN: "update applied anyway (policy 'warn')",
            Policy.STOP: "update skipped, training stopped",
            Policy.SKIP: f"update skipped, training goes on ({self.skipped} skipped so far)",
            Policy.RAISE: "update skipped, raising NonFiniteError",
        }[policy]

    def say(self, d: Diagnosis, what: str) -> None:
        """The full diagnosis the first time a (category, op, module) is seen, one line after."""
        key = f"{d.category}:{d.op}:{d.module}"
        text = f"{d}\n  {what}" if key not in self._warned else f"nanscope: {d.headline()} ({what})"
        self._warned.add(key)
        self.warn(text, NonFiniteWarning)

    def warn_once(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.warn(text)

    def internal(self, where: str, err: BaseException) -> None:
        """nanscope's own error: one warning, and the guard steps aside."""
        self.disabled = True
        self.warn_once(
            "internal",
            internal_error_text(
                f"nanscope's {self.who}, {where}", err, then="training continues unguarded"
            ),
        )

    def describe(self) -> str:
        why = ", ".join(f"{n} {c}" for c, n in self.counts.most_common())
        state = (
            " (stopped)"
            if self.should_stop
            else (" (unguarded after an internal error)" if self.disabled else "")
        )
        return (
            f"<nanscope {self.who} policy={self.policy}: {self.steps} steps, {self.skipped} skipped"
            + (f"; failures: {why}" if why else "")
            + f"{state}>"
        )


def ledger_attr(name: str, doc: str | None = None) -> property:
    """A guard attribute that lives in its ``ledger`` (same names in every framework's guard)."""

    def get(self: Any) -> Any:
        return getattr(self.ledger, name)

    def set_(self: Any, value: Any) -> None:
        setattr(self.ledger, name, value)

    return property(get, set_, doc=doc)


class GuardState:
    """The attributes every guard shows, read from its ``ledger`` (``nanscope.torch.Guard``,
    ``nanscope.keras.Guard``, the Lightning and Hugging Face callbacks): same names, same
    meaning, in every framework."""

    ledger: Ledger
    policy = ledger_attr("policy", "what a non-finite step gets: raise, skip, stop or warn")
    should_stop = ledger_attr(
        "should_stop", "True after a failure under 'stop' (or one 'skip' cannot undo)"
    )
    skipped = ledger_attr("skipped", "updates not applied")
    counts = ledger_attr("counts", "failures by category (a Counter)")
    diagnoses = ledger_attr("diagnoses", "the diagnoses so far (the last 32)")
    history = ledger_attr("history", "loss and gradient-norm history")
    steps = ledger_attr("steps", "steps seen so far; the contract's ``step`` of the next one")
    max_skips_in_a_row = ledger_attr(
        "max_skips_in_a_row", "failed steps in a row before 'skip' stops"
    )
    disabled = ledger_attr(
        "disabled", "True after nanscope's own error: training goes on unguarded"
    )

    @property
    def last(self) -> Diagnosis | None:
        """The latest diagnosis, or None while every step was finite."""
        return self.ledger.last

    def __repr__(self) -> str:
        return self.ledger.describe()
