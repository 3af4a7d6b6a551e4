"""The result objects: ``Diagnosis`` (one failure), ``Finding`` and ``AuditReport`` (audits).

Each renders itself three ways: plain text (``str()``, safe in CI logs), the JSON contract of
../shared/DIAGNOSIS.md (``to_dict()``), and rich output (``__rich_console__``; rich is imported
inside the method, so it stays optional).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from nanscope.core.enums import Category, OpKind, Phase, Status

SCHEMA = 1


@dataclass
class Location:
    """A line of the user's source code."""

    file: str
    line: int
    function: str | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "function": self.function}

    @classmethod
    def from_dict(cls, d: dict | None) -> Location | None:
        return None if not d else cls(d["file"], int(d["line"]), d.get("function"))


@dataclass
class Diagnosis:
    """Where a non-finite value came from, why, and what to do.

    Example:
        >>> d = Diagnosis(Category.OP_DOMAIN, "log received 1 zero", phase="loss", op="aten::log")
        >>> d.op_kind, d.to_dict()["status"], d.to_dict()["diagnosis"]["category"]
        (<OpKind.LOG: 'log'>, 'nonfinite', 'op_domain')
    """

    category: Category
    summary: str
    phase: Phase | None = None
    op: str | None = None
    op_kind: OpKind | None = None
    module: str | None = None
    location: Location | None = None
    dtype: str | None = None
    samples: list[int] = field(default_factory=list)
    step: int | None = None
    evidence: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)
    framework: str | None = None
    # Extensions of the contract (never required by readers):
    ranks: list[int] | None = None  # DDP: ranks that saw the non-finite value first
    bundle: str | None = None  # path of the repro bundle written for this failure
    details: dict[str, Any] = field(default_factory=dict)  # structured evidence (numbers)

    def __post_init__(self) -> None:
        self.category = Category(self.category)
        if self.phase is not None:
            self.phase = Phase(self.phase)
        if self.op_kind is None and self.op is not None:
            self.op_kind = OpKind.of(self.op)
        elif self.op_kind is not None:
            self.op_kind = OpKind(self.op_kind)
        if isinstance(self.location, dict):
            self.location = Location.from_dict(self.location)
        self.samples = [int(s) for s in self.samples]

    # -- JSON -------------------------------------------------------------------------------
    def fields_dict(self) -> dict:
        """The inner ``diagnosis`` object of the contract."""
        d: dict[str, Any] = {
            "category": str(self.category),
            "phase": str(self.phase) if self.phase else None,
            "op": self.op,
            "op_kind": str(self.op_kind) if self.op_kind else None,
            "module": self.module,
            "location": self.location.to_dict() if self.location else None,
            "dtype": self.dtype,
            "samples": list(self.samples),
            "step": self.step,
            "summary": self.summary,
            "evidence": list(self.evidence),
            "fixes": list(self.fixes),
        }
        if self.ranks is not None:
            d["ranks"] = list(self.ranks)
        if self.bundle is not None:
            d["bundle"] = self.bundle
        if self.details:
            d["details"] = self.details
        return d

    def to_dict(self) -> dict:
        """The whole JSON document of the contract (``status: nonfinite``)."""
        return {
            "schema": SCHEMA,
            "status": str(Status.NONFINITE),
            "framework": self.framework,
            "diagnosis": self.fields_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_dict(cls, d: dict) -> Diagnosis:
        """Read either the whole document or the inner ``diagnosis`` object."""
        framework = d.get("framework")
        if "diagnosis" in d:
            d = d["diagnosis"]
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw.setdefault("framework", framework)
        return cls(**kw)

    # -- text -------------------------------------------------------------------------------
    # One renderer: the summary (as in the JSON) ends with where it happened and which samples
    # (see ``compose_summary``); the text report says those once, on their own lines.
    def headline(self) -> str:
        """One line: category, phase, step and the whole summary (exceptions, repeated warnings)."""
        return self._headline(self.summary)

    def cause(self) -> str:
        """The summary without its place and samples suffix (said on their own lines); where
        in the program it happened (``rules.in_program``) stays."""
        summary, program = self.summary, ""
        call = self.details.get("call") if isinstance(self.details, dict) else None
        if call and self.evidence and summary.endswith("; " + self.evidence[0]):
            program = "; " + self.evidence[0]
            summary = summary[: -len(program)]
        suffix = samples_phrase(self.samples) + where_phrase(self.module, self.location)
        if suffix and summary.endswith(suffix) and len(summary) > len(suffix):
            summary = summary[: -len(suffix)]
        return summary + program

    def _headline(self, summary: str) -> str:
        step = f", step {self.step}" if self.step is not None else ""
        phase = f" in {self.phase}" if self.phase else ""
        return f"{self.category}{phase}{step}: {summary}"

    def where(self) -> str:
        """``aten::log (log) in encoder in dice_loss at train.py:42``: op, module, line, once."""
        parts = []
        if self.op:
            kind = (
                f" ({self.op_kind})"
                if self.op_kind and str(self.op_kind) not in self.op.lower()
                else ""
            )
            parts.append(f"{self.op}{kind}")
        return (" ".join(parts) + where_phrase(self.module, self.location)).strip()

    def __str__(self) -> str:
        lines = [f"nanscope: {self._headline(self.cause())}"]
        if w := self.where():
            lines.append(f"  where     {w}")
        if self.samples:
            lines.append(f"  samples   {samples_text(self.samples)}")
        if self.ranks:
            lines.append(f"  ranks     {', '.join(map(str, self.ranks))}")
        if self.dtype:
            lines.append(f"  dtype     {self.dtype}")
        if self.evidence:
            lines.append("  evidence")
            lines += [f"    - {e}" for e in self.evidence]
        if self.fixes:
            lines.append("  what to do")
            lines += [f"    {i}. {f}" for i, f in enumerate(self.fixes, 1)]
        if self.bundle:
            lines.append(f"  repro bundle: {self.bundle}  (nanscope show {self.bundle})")
        return "\n".join(lines)

    def __rich_console__(self, console, options):  # pragma: no cover - cosmetic
        from rich.panel import Panel
        from rich.text import Text

        body = Text()
        if w := self.where():
            body.append("where  ", style="bold")
            body.append(w + "\n")
        if self.samples:
            body.append("samples  ", style="bold")
            body.append(samples_text(self.samples) + "\n")
        for e in self.evidence:
            body.append("• " + e + "\n", style="dim")
        for i, f in enumerate(self.fixes, 1):
            body.append(f"{i}. ", style="bold green")
            body.append(f + "\n")
        yield Panel(body, title=f"[bold red]{self.category}[/] {self.cause()}")


def samples_text(samples: list[int], limit: int = 12) -> str:
    """``0, 1, 2`` or, past ``limit``, ``0, 1, … (40 in all)``: the one samples formatter."""
    head = ", ".join(map(str, samples[:limit]))
    return head + (f", … ({len(samples)} in all)" if len(samples) > limit else "")


def samples_phrase(samples: list[int]) -> str:
    """The samples as a summary ends with them: `` (sample 3)``, `` (samples 1, 2)``, `` (40 samples)``.

    >>> samples_phrase([3]), samples_phrase([0, 1, 2, 3, 4]), samples_phrase([])
    (' (sample 3)', ' (5 samples)', '')
    """
    if not samples:
        return ""
    if len(samples) <= 4:
        return f" (sample{'s' if len(samples) > 1 else ''} {samples_text(samples)})"
    return f" ({len(samples)} samples)"


def where_phrase(module: str | None, location: Location | None) -> str:
    """Where it happened, in one order everywhere: `` in encoder in dice_loss at train.py:42``.

    >>> where_phrase("head", Location("train.py", 42, "dice_loss"))
    ' in head in dice_loss at train.py:42'
    """
    bits = []
    if module:
        bits.append(f"in {module}")
    if location:
        fn = location.function
        bits.append(f"{'in ' + fn + ' ' if fn and fn != '<module>' else ''}at {location}")
    return (" " + " ".join(bits)) if bits else ""


def compose_summary(
    cause: str, samples: list[int], module: str | None, location: Location | None
) -> str:
    """The contract's ``summary``: the cause, then the samples, then where."""
    return cause + samples_phrase(samples) + where_phrase(module, location)


@dataclass
class Finding(Diagnosis):
    """One problem found by an audit: a diagnosis plus where it was found."""

    where_found: dict[str, Any] = field(default_factory=dict)
    severity: str = "error"  # "error" makes the audit fail; "warning" is reported only

    @classmethod
    def of(
        cls,
        diagnosis: Diagnosis,
        where_found: dict[str, Any],
        *,
        severity: str = "error",
        **changes: Any,
    ) -> Finding:
        """A rule's diagnosis as an audit finding; ``changes`` replace fields (e.g. ``summary``)."""
        kw = {f.name: getattr(diagnosis, f.name) for f in fields(Diagnosis)}
        kw.update(changes)
        return cls(**kw, where_found=where_found, severity=severity)

    def fields_dict(self) -> dict:
        d = super().fields_dict()
        d["where"] = dict(self.where_found)
        d["severity"] = self.severity
        return d

    def to_dict(self) -> dict:
        return self.fields_dict()

    @classmethod
    def from_dict(cls, d: dict) -> Finding:
        d = dict(d)
        d["where_found"] = d.pop("where", {}) or {}
        return super().from_dict.__func__(cls, d)  # type: ignore[attr-defined]

    def __str__(self) -> str:
        place = ", ".join(f"{k} {v}" for k, v in self.where_found.items())
        lines = [
            f"[{self.severity}] {self.category}: {self.summary}" + (f"  ({place})" if place else "")
        ]
        lines += [f"    - {e}" for e in self.evidence]
        lines += [f"    fix: {f}" for f in self.fixes[:2]]
        return "\n".join(lines)


@dataclass
class AuditReport:
    """What ``nanscope data`` / ``inspect`` / ``fuzz-loss`` found: findings and statistics."""

    findings: list[Finding] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    framework: str | None = None
    title: str = "audit"

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def status(self) -> Status:
        return Status.PROBLEMS if self.problems else Status.CLEAN

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "status": str(self.status),
            "framework": self.framework,
            "findings": [f.to_dict() for f in self.findings],
            "stats": self.stats,
        }

    @classmethod
    def from_dict(cls, d: dict) -> AuditReport:
        return cls(
            [Finding.from_dict(f) for f in d.get("findings", [])],
            d.get("stats", {}),
            d.get("framework"),
        )

    def __str__(self) -> str:
        n_err, n_warn = len(self.problems), len(self.findings) - len(self.problems)
        head = f"nanscope {self.title}: " + (
            f"{n_err} problem{'s' if n_err != 1 else ''}"
            + (f", {n_warn} warning{'s' if n_warn != 1 else ''}" if n_warn else "")
            if self.findings
            else "clean, no problems found"
        )
        lines = [head]
        ordered = sorted(self.findings, key=lambda f: f.severity != "error")
        lines += [str(f) for f in ordered]
        if self.stats:
            lines.append("statistics")
            lines += _stats_lines(self.stats, indent="  ")
        return "\n".join(lines)


def _stats_lines(stats: dict, indent: str) -> list[str]:
    out = []
    for k, v in stats.items():
        if isinstance(v, dict) and v and all(not isinstance(x, dict) for x in v.values()):
            out.append(f"{indent}{k}: " + ", ".join(f"{a}={_short(b)}" for a, b in v.items()))
        elif isinstance(v, dict):
            out.append(f"{indent}{k}")
            out += _stats_lines(v, indent + "  ")
        else:
            out.append(f"{indent}{k}: {_short(v)}")
    return out


def _short(v: Any) -> str:
    from nanscope.core.summary import fmt

    if isinstance(v, float):
        return fmt(v)
    if isinstance(v, list) and len(v) > 8:
        return "[" + ", ".join(_short(x) for x in v[:8]) + f", … {len(v)} in all]"
    if isinstance(v, list):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    return str(v)


def clean_report(framework: str | None = None) -> dict:
    """The JSON document for a run where nothing non-finite happened."""
    return {
        "schema": SCHEMA,
        "status": str(Status.CLEAN),
        "framework": framework,
        "diagnosis": None,
    }
