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

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from nanscope.core.diagnosis import Diagnosis
from nanscope.core.enums import Phase, Policy
from nanscope.core.trend import History

# Failures that live in the stored state: skipping the update cannot undo them.
STATE_PHASES = (Phase.STATE, Phase.OPTIMIZER)
KEEP_DIAGNOSES = 32


def _warn(text: str) -> None:
    warnings.warn(text, RuntimeWarning, stacklevel=3)


def internal_error_text(who: str, where: str, err: BaseException) -> str:
    """The one warning for nanscope's own error: it says plainly whose error it is.

    >>> internal_error_text("Guard", "checking the step", KeyError("x"))
    "nanscope Guard: internal error while checking the step (KeyError: 'x'). This is a bug in nanscope, not in your script; training continues unguarded. Please report it with NANSCOPE_DEBUG=1 output."
    """
    return (f"nanscope {who}: internal error while {where} ({type(err).__name__}: {err}). This is a bug in "
            "nanscope, not in your script; training continues unguarded. Please report it with NANSCOPE_DEBUG=1 output.")


@dataclass
class LossScaleHistory:
    """A dynamic loss scale (GradScaler, LossScaleOptimizer) after each step, and the steps it skipped."""

    scales: list[float] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    limit: int = 256

    def add(self, scale: float, *, skipped_step: int | None = None) -> None:
        self.scales = (self.scales + [float(scale)])[-self.limit:]
        if skipped_step is not None:
            self.skipped = (self.skipped + [skipped_step])[-self.limit:]

    def clear(self) -> None:
        self.scales, self.skipped = [], []


class Ledger:
    """The bookkeeping of one guard.

    Example:
        >>> from nanscope.core.enums import Category
        >>> book = Ledger("skip", warn=lambda text: None)
        >>> d = Diagnosis(Category.OP_DOMAIN, "log received 1 zero", phase="loss")
        >>> book.record(d); book.act(d, unrecoverable=False)
        <Policy.SKIP: 'skip'>
        >>> book.skipped, book.counts["op_domain"], book.should_stop
        (1, 1, False)
    """

    def __init__(self, policy: Policy | str = Policy.SKIP, *, max_skips_in_a_row: int = 10,
                 warn: Callable[[str], None] | None = None, who: str = "Guard") -> None:
        self.policy = Policy(policy)
        self.max_skips_in_a_row = max(1, int(max_skips_in_a_row))
        self.warn = warn or _warn
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
            d.evidence.append("skipping cannot help: the stored state itself is non-finite, so the guard stops")
        self.in_a_row += 1
        if policy is Policy.SKIP and self.in_a_row >= self.max_skips_in_a_row:
            policy = Policy.STOP
            d.evidence.append(f"{self.in_a_row} steps in a row failed: skipping does not help, so the guard stops")
        if policy in (Policy.SKIP, Policy.STOP):
            self.skipped += 1
        if policy is Policy.STOP:
            self.should_stop = True
        return policy

    def outcome_text(self, policy: Policy) -> str:
        return {
            Policy.WARN: "the update was applied anyway (policy 'warn')",
            Policy.STOP: "the update was not applied; stopping",
            Policy.SKIP: f"the update was not applied; training goes on ({self.skipped} skipped so far)",
            Policy.RAISE: "the update was not applied; raising NonFiniteError",
        }[policy]

    def say(self, d: Diagnosis, what: str) -> None:
        """The full diagnosis the first time a (category, op, module) is seen, one line after."""
        key = f"{d.category}:{d.op}:{d.module}"
        text = f"{d}\n  {what}" if key not in self._warned else f"nanscope: {d.headline()} ({what})"
        self._warned.add(key)
        self.warn(text)

    def warn_once(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.warn(text)

    def internal(self, where: str, err: BaseException) -> None:
        """nanscope's own error: one warning, and the guard steps aside."""
        self.disabled = True
        self.warn_once("internal", internal_error_text(self.who, where, err))

    def describe(self) -> str:
        why = ", ".join(f"{n} {c}" for c, n in self.counts.most_common())
        state = " (stopped)" if self.should_stop else (" (unguarded after an internal error)" if self.disabled else "")
        return (f"<nanscope {self.who} policy={self.policy}: {self.steps} steps, {self.skipped} skipped"
                + (f"; failures: {why}" if why else "") + f"{state}>")
