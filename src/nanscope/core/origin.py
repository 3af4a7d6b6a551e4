"""The origin tracker: which op first produced the non-finite values that reached the loss.

Framework-free. Both tracers (``nanscope.torch.trace``, ``nanscope.keras.trace``) turn every
op they see into an ``OpSeen`` (op name, phase, and for each floating input and output an
identity key and whether it is finite, NaN or +Inf) and feed it to one ``OriginTracker``,
which keeps, for every non-finite value, where its bad values came from:

* a **producer**: an op whose output is non-finite while its inputs were finite (or held
  only legitimate ``-inf``): the culprit a diagnosis names;
* a **propagator** inherits the origin of a bad input (the earliest producer among them)
  and is never named;
* **legitimate** infinities (``masked_fill(mask, -inf)``, ``full(-inf)``, anything built from
  an infinite constant) are not failures; the op that turns them into NaN is the producer;
* an **external** value was non-finite before the step read it (a weight, a buffer, the
  batch): the adapter's state and data checks name it.

``first_failure`` then picks, among the things that matter (the loss, the model's output,
the gradients), the one whose origin came first, and says how it was reached: a forward
producer reached only through a gradient is the ``where`` trap
(``nanscope.core.rules.where_trap``).

Design constraints: no tensor is touched here (adapters compute the flags); keys are
whatever identity the adapter keeps unique while tracing (``id`` of a tensor it holds
alive); the tracker never decides a category, the rules do.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from nanscope.core.enums import Phase


class OriginKind(StrEnum):
    PRODUCER = "producer"
    EXTERNAL = "external"
    LEGIT = "legit"


class Value:
    """One floating tensor as an op saw it: an identity key and whether it is finite.

    For a non-finite one, whether it holds NaN and +Inf: given, or read through ``probe`` (a
    callable returning ``(nan, posinf)``) the first time the tracker asks, which it does only
    for values whose origin it has to decide.
    """

    __slots__ = ("key", "finite", "_nan", "_posinf", "_probe")

    def __init__(
        self,
        key: Hashable,
        finite: bool,
        nan: bool = False,
        posinf: bool = False,
        probe: Any = None,
    ) -> None:
        self.key, self.finite = key, finite
        self._nan, self._posinf, self._probe = nan, posinf, probe

    def _read(self) -> None:
        if self._probe is not None:
            self._nan, self._posinf = self._probe()
            self._probe = None

    @property
    def nan(self) -> bool:
        self._read()
        return self._nan

    @property
    def posinf(self) -> bool:
        self._read()
        return self._posinf

    @property
    def only_neginf(self) -> bool:
        """Non-finite through ``-inf`` alone: what a mask holds on purpose."""
        return not self.finite and not self.nan and not self.posinf

    def __repr__(self) -> str:
        return f"Value({self.key!r}, finite={self.finite})"


@dataclass(slots=True)
class OpSeen:
    """One op, as an adapter reports it to the tracker."""

    index: int
    op: str
    phase: Phase
    inputs: list[Value]
    outputs: list[Value]
    scalar_inf: bool = False  # an infinite Python constant among its arguments (fill(-inf))
    source: bool = False  # brings values in from outside (a storage, a file, a variable read)
    record: Any = None  # the adapter's own record of the op (module, frame, tensors)


@dataclass
class Origin:
    """Where the bad values of a tensor came from."""

    kind: OriginKind
    op: OpSeen
    value: Value | None = None  # the external value, as first read
    first_backward: OpSeen | None = None  # the first backward op it poisoned
    evidence: Any = None  # ProducerEvidence the adapter took at the producer
    readers: list[OpSeen] = field(
        default_factory=list
    )  # forward ops that carried its values (first 32)

    @property
    def index(self) -> int:
        return self.op.index


@dataclass
class Failure:
    """What ``first_failure`` found: the earliest origin and what it reached."""

    origin: Origin | None  # None: a non-finite value that no traced op produced
    reached: str  # "loss", "output", "gradient", ...
    key: Hashable = None  # the value that matters
    others: list[str] = field(default_factory=list)  # other things that were non-finite


class OriginTracker:
    """Follows the origin of every non-finite value through a sequence of ``OpSeen``.

    Example:
        >>> from nanscope.core.enums import Phase
        >>> t = OriginTracker()
        >>> x, y = Value("x", True), Value("y", False, nan=True)
        >>> t.see(OpSeen(0, "aten::log", Phase.FORWARD, [x], [Value("y", False, posinf=False)])).kind
        <OriginKind.PRODUCER: 'producer'>
        >>> t.see(OpSeen(1, "aten::mul", Phase.LOSS, [Value("y", False)], [Value("z", False, nan=True)]))
        >>> t.first_failure([("loss", Value("z", False, nan=True))]).origin.op.op
        'aten::log'
    """

    def __init__(self) -> None:
        self._origin: dict[Hashable, Origin] = {}

    def origin_of(self, key: Hashable) -> Origin | None:
        return self._origin.get(key)

    def mark_external(self, value: Value, op: OpSeen) -> None:
        """A value known to come from outside the step (the batch), first read by ``op``."""
        if not value.finite:
            self._origin[value.key] = Origin(OriginKind.EXTERNAL, op, value=value)

    def see(self, op: OpSeen) -> Origin | None:
        """Follow one op; returns the new origin when ``op`` is a producer (take evidence now,
        before a later in-place op changes its tensors), else None."""
        bad_outs = [v for v in op.outputs if not v.finite]
        if not bad_outs:
            for v in op.outputs:  # an in-place op may have repaired a tensor
                self._origin.pop(v.key, None)
            return None
        inherited: Origin | None = None
        legit_in = False
        for v in op.inputs:
            if v.finite:
                continue
            o = self._origin.get(v.key)
            if o is None:
                # Bad before any traced op made it: a -inf-only constant (a mask) is
                # legitimate; anything else is external state or data.
                o = Origin(OriginKind.LEGIT if v.only_neginf else OriginKind.EXTERNAL, op, value=v)
                self._origin[v.key] = o
            if o.kind is OriginKind.LEGIT:
                legit_in = True
            elif inherited is None or _earlier(o, inherited):
                inherited = o
        if inherited is not None:  # a propagator
            if op.phase is Phase.BACKWARD and inherited.first_backward is None:
                inherited.first_backward = op
            elif op.phase is not Phase.BACKWARD and len(inherited.readers) < 32:
                inherited.readers.append(op)  # who consumed it decides what it was (input, target)
            for v in bad_outs:
                self._origin[v.key] = inherited
            return None
        made_nan = any(v.nan for v in bad_outs)
        if not made_nan and (legit_in or op.scalar_inf or not op.inputs):
            origin = Origin(OriginKind.LEGIT, op)
        elif op.source:  # bytes from outside (a file, a Python list): not an op's fault
            origin = Origin(OriginKind.EXTERNAL, op, value=bad_outs[0])
        else:
            origin = Origin(OriginKind.PRODUCER, op)
        for v in bad_outs:
            self._origin[v.key] = origin
        return origin if origin.kind is OriginKind.PRODUCER else None

    def first_failure(self, things: list[tuple[str, Value]]) -> Failure | None:
        """The earliest origin among the non-finite ``things`` that matter, ``(what, value)``
        with ``what`` one of ``loss``, ``output``, ``gradient``, ``state``. None when all
        are finite, or when only a legitimate infinity reached the model's output (a mask
        it returns on purpose is not a failure).

        A legitimate infinity that reaches the loss or a gradient is a failure after all:
        the op that made it becomes the producer (the adapter takes its evidence late).
        """
        best: Failure | None = None
        unexplained: Failure | None = None
        seen: list[str] = []
        for what, v in things:
            if v.finite:
                continue
            seen.append(what)
            o = self._origin.get(v.key)
            if o is None:
                unexplained = unexplained or Failure(None, what, v.key)
                continue
            if o.kind is OriginKind.LEGIT:
                if what == "output":
                    continue
                o = Origin(OriginKind.PRODUCER, o.op, first_backward=o.first_backward)
            if best is None or _earlier(o, best.origin):
                best = Failure(o, what, v.key)
        found = best or unexplained
        if found is not None:
            found.others = [w for w in dict.fromkeys(seen) if w != found.reached]
        return found


def _earlier(a: Origin, b: Origin | None) -> bool:
    """Producers come before externals (a computed NaN explains more than the data it read)
    only when they are earlier; otherwise the first op wins."""
    return b is None or a.index < b.index
