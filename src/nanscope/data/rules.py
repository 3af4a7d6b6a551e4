"""The audit rules for inputs and targets: accumulated evidence in, findings out.

Pure functions over plain numbers (counts, sample lists, statistics), so the CLI, the Python
API and any framework adapter decide the same way. Categories come from the contract
(../shared/DIAGNOSIS.md); fix texts from ``nanscope.core.fixes``. Design constraints:

    - Errors are what makes training non-finite: NaN/Inf inputs, non-finite or out-of-range
      labels, masks with no valid pixel, soft labels that do not sum to 1.
    - Warnings are reported but do not fail the audit: constant samples (zero variance),
      un-normalized (0..255) or extreme float inputs, classes that never occur.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nanscope.core.diagnosis import Finding
from nanscope.core.enums import Category, Phase
from nanscope.core.fixes import audit_fixes, fixes_for
from nanscope.core.limits import LIMITS
from nanscope.core.stats import ArrayStats
from nanscope.core.summary import fmt

MAX_LISTED = 1000  # sample indices kept per problem; the count is always exact
MAX_NAMED = 100  # file names kept per problem


@dataclass
class Hits:
    """Samples that show one problem: exact count, the first indices and file names."""

    count: int = 0
    samples: list[int] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, index: int, name: str | None = None, note: str | None = None) -> None:
        self.count += 1
        if len(self.samples) < MAX_LISTED:
            self.samples.append(int(index))
        if name is not None and len(self.files) < MAX_NAMED:
            self.files.append(name)
        if note is not None and len(self.notes) < 5:
            self.notes.append(note)

    def merge(self, later: Hits) -> None:
        """Add the hits of later samples (the same lists as adding them one by one)."""
        self.count += later.count
        self.samples += later.samples[: max(0, MAX_LISTED - len(self.samples))]
        self.files += later.files[: max(0, MAX_NAMED - len(self.files))]
        self.notes += later.notes[: max(0, 5 - len(self.notes))]

    def where(self, **what: object) -> dict:
        w: dict = {k: v for k, v in what.items() if v is not None}
        if self.files:
            w["file"] = self.files[0]
            if len(self.files) > 1:
                w["files"] = list(self.files)
        return w

    def names_text(self) -> str:
        shown = self.files[:3] if self.files else [f"sample {i}" for i in self.samples[:3]]
        more = f" and {self.count - len(shown)} more" if self.count > len(shown) else ""
        return ", ".join(shown) + more


def _finding(
    category: Category,
    summary: str,
    hits: Hits | None,
    where: dict,
    evidence: list[str],
    fixes: list[str],
    severity: str = "error",
    framework: str | None = None,
) -> Finding:
    return Finding(
        category=category,
        summary=summary,
        phase=Phase.DATA,
        samples=list(hits.samples) if hits else [],
        evidence=evidence,
        fixes=fixes,
        where_found=where,
        severity=severity,
        framework=framework,
    )


def _verb(n: int, one: str, many: str) -> str:
    return one if n == 1 else many


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('s') else 's'}"


def input_findings(
    name: str,
    stats: ArrayStats,
    dtype: str,
    *,
    nonfinite: Hits,
    constant: Hits,
    framework: str | None = None,
) -> list[Finding]:
    """Findings for one input: NaN/Inf samples, constant samples, suspicious value ranges.

    Example:
        >>> from nanscope.core.stats import array_stats
        >>> import numpy as np
        >>> bad = Hits(); bad.add(3, "img/3.tif")
        >>> stats = array_stats(np.array([1.0, np.nan]))
        >>> fs = input_findings("image", stats, "float32", nonfinite=bad, constant=Hits())
        >>> fs[0].category, fs[0].samples, fs[0].where_found["file"]
        (<Category.NONFINITE_INPUT: 'nonfinite_input'>, [3], 'img/3.tif')
    """
    out: list[Finding] = []
    if nonfinite.count:
        bad = [(stats.nan, "NaN"), (stats.posinf, "+Inf"), (stats.neginf, "-Inf")]
        counts = ", ".join(f"{n} {w}" for n, w in bad if n)
        out.append(
            _finding(
                Category.NONFINITE_INPUT,
                f"{_plural(nonfinite.count, 'sample')} of input {name!r} "
                f"{_verb(nonfinite.count, 'holds', 'hold')} NaN/Inf: {nonfinite.names_text()}",
                nonfinite,
                nonfinite.where(input=name),
                [f"{name}: {counts} of {stats.size} values", *nonfinite.notes],
                fixes_for(Category.NONFINITE_INPUT, framework=framework),
                framework=framework,
            )
        )
    if constant.count:
        out.append(
            _finding(
                Category.OP_DOMAIN,
                f"{_plural(constant.count, 'sample')} of input {name!r} "
                f"{_verb(constant.count, 'is', 'are')} constant (zero variance): {constant.names_text()}",
                constant,
                constant.where(input=name),
                [*constant.notes],
                audit_fixes("constant_input", framework),
                severity="warning",
                framework=framework,
            )
        )
    if dtype.startswith("float") and stats.count:
        absmax = max(abs(stats.min), abs(stats.max))
        if absmax > LIMITS["float16"].max:
            out.append(
                _finding(
                    Category.OVERFLOW,
                    f"input {name!r} reaches |x| = {fmt(absmax)}, beyond float16's 65504",
                    None,
                    {"input": name},
                    [f"{name}: min {fmt(stats.min)}, max {fmt(stats.max)}"],
                    audit_fixes("extreme_input", framework),
                    severity="warning",
                    framework=framework,
                )
            )
        elif stats.min >= 0 and 2.0 < stats.max <= 255.0 and (stats.mean or 0) > 1.0:
            out.append(
                _finding(
                    Category.OVERFLOW,
                    f"input {name!r} looks like un-normalized 0..255 pixels in {dtype} "
                    f"(max {fmt(stats.max)}, mean {fmt(stats.mean)})",
                    None,
                    {"input": name},
                    [f"{name}: min {fmt(stats.min)}, max {fmt(stats.max)}, mean {fmt(stats.mean)}"],
                    audit_fixes("unnormalized_input", framework),
                    severity="warning",
                    framework=framework,
                )
            )
    return out


def target_findings(
    name: str,
    *,
    nonfinite: Hits,
    out_of_range: Hits,
    all_ignored: Hits,
    bad_soft: Hits,
    histogram: dict[int, int],
    num_classes: int | None,
    ignore_index: int | None,
    bad_values: dict[int, int],
    framework: str | None = None,
) -> list[Finding]:
    """Findings for one target: non-finite or out-of-range labels, masks with no valid pixel,
    soft labels that do not sum to 1, classes that never occur.

    Example:
        >>> oor = Hits(); oor.add(7, "masks/7.png")
        >>> fs = target_findings("mask", nonfinite=Hits(), out_of_range=oor, all_ignored=Hits(), bad_soft=Hits(),
        ...                      histogram={0: 10, 1: 0}, num_classes=2, ignore_index=255, bad_values={21: 4})
        >>> [(f.category.value, f.severity) for f in fs]
        [('invalid_target', 'error'), ('invalid_target', 'warning')]
    """
    out: list[Finding] = []
    ign = f" {ignore_index}" if ignore_index is not None else ""
    if nonfinite.count:
        out.append(
            _finding(
                Category.INVALID_TARGET,
                f"{_plural(nonfinite.count, 'sample')} of target {name!r} "
                f"{_verb(nonfinite.count, 'holds', 'hold')} NaN/Inf: {nonfinite.names_text()}",
                nonfinite,
                nonfinite.where(target=name),
                [*nonfinite.notes],
                fixes_for(Category.NONFINITE_INPUT, framework=framework),
                framework=framework,
            )
        )
    if out_of_range.count:
        rng = f"[0, {num_classes})" if num_classes is not None else "[0, ...)"
        vals = ", ".join(f"{v} ({_plural(c, 'value')})" for v, c in sorted(bad_values.items())[:8])
        out.append(
            _finding(
                Category.INVALID_TARGET,
                f"{_plural(out_of_range.count, 'sample')} of target {name!r} "
                f"{_verb(out_of_range.count, 'has', 'have')} labels outside {rng}"
                + (f" other than ignore_index{ign}" if ignore_index is not None else "")
                + f": {out_of_range.names_text()}",
                out_of_range,
                out_of_range.where(target=name),
                [f"labels outside {rng}: {vals}", *out_of_range.notes],
                audit_fixes(
                    "label_out_of_range",
                    framework,
                    ignore_index=ignore_index,
                    num_classes=num_classes,
                ),
                framework=framework,
            )
        )
    if all_ignored.count:
        out.append(
            _finding(
                Category.INVALID_TARGET,
                f"{_plural(all_ignored.count, 'sample')} of target {name!r} "
                f"{_verb(all_ignored.count, 'has', 'have')} every value = ignore_index{ign}: "
                f"a loss averaged over {_verb(all_ignored.count, 'it', 'them')} is 0/0 = NaN "
                f"({all_ignored.names_text()})",
                all_ignored,
                all_ignored.where(target=name),
                ["0 valid targets in each", *all_ignored.notes],
                audit_fixes("all_ignored", framework, ignore_index=ignore_index),
                framework=framework,
            )
        )
    if bad_soft.count:
        out.append(
            _finding(
                Category.INVALID_TARGET,
                f"{_plural(bad_soft.count, 'sample')} of target {name!r} "
                f"{_verb(bad_soft.count, 'is a soft label that does', 'are soft labels that do')} "
                f"not sum to 1: {bad_soft.names_text()}",
                bad_soft,
                bad_soft.where(target=name),
                [*bad_soft.notes],
                audit_fixes("soft_label_sum", framework),
                framework=framework,
            )
        )
    if num_classes is not None and histogram and sum(histogram.values()):
        unused = [c for c in range(num_classes) if not histogram.get(c)]
        if unused:
            shown = ", ".join(map(str, unused[:20])) + (" …" if len(unused) > 20 else "")
            out.append(
                _finding(
                    Category.INVALID_TARGET,
                    f"{_plural(len(unused), 'class')} of {num_classes} never "
                    f"{_verb(len(unused), 'occurs', 'occur')} in target {name!r}: {shown}",
                    None,
                    {"target": name, "classes": unused},
                    [f"class histogram: {_hist_text(histogram)}"],
                    audit_fixes("unused_class", framework),
                    severity="warning",
                    framework=framework,
                )
            )
    return out


def _hist_text(h: dict[int, int]) -> str:
    items = sorted(h.items())
    text = ", ".join(f"{k}: {v}" for k, v in items[:12])
    return text + (f", … ({len(items)} classes)" if len(items) > 12 else "")
