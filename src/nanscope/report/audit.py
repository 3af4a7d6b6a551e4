"""The page of an audit (``nanscope data``, ``inspect``, ``fuzz-loss``): the findings as a
sortable table, each finding's evidence and fixes, the class histogram, the per-layer table
with its float16 headroom, and the offending samples when the dataset is at hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from nanscope.core.diagnosis import AuditReport, samples_text
from nanscope.report import plots
from nanscope.report import samples as samples_mod
from nanscope.report.explain import explain
from nanscope.report.failure import norm_table
from nanscope.report.page import document, esc, pill, plot, rich_text, section, table


def _where(w: dict) -> str:
    return ", ".join(
        f"{k} {v if not isinstance(v, list) else ', '.join(map(str, v[:6])) + (' …' if len(v) > 6 else '')}"
        for k, v in w.items()
    )


def findings_html(report: AuditReport) -> tuple[str, str]:
    """The sortable table, and one card per finding (evidence, fixes)."""
    if not report.findings:
        return (
            '<p id="findings-clean">no findings: nothing in this input makes training non-finite.</p>',
            "",
        )
    order = sorted(report.findings, key=lambda f: f.severity != "error")
    rows = [
        [
            i + 1,
            f.severity,
            str(f.category),
            f.summary,
            _where(f.where_found),
            len(f.samples),
            samples_text(f.samples, limit=6) if f.samples else "",
        ]
        for i, f in enumerate(order)
    ]
    t = table(
        ["#", "severity", "category", "summary", "where", "samples (n)", "samples"],
        rows,
        sortable=True,
        id="findings",
        row_class=["bad" if f.severity == "error" else "warning" for f in order],
    )
    cards = []
    for i, f in enumerate(order):
        title, words = explain(str(f.category))
        ev = "".join(f"<li>{rich_text(e, copy=False)}</li>" for e in f.evidence)
        fixes = "".join(f"<li>{rich_text(x)}</li>" for x in f.fixes)
        cards.append(
            f'<details class="finding" {"open" if i < 3 else ""}><summary>{i + 1}. '
            f"{pill(f.severity, f.severity)}{pill(str(f.category), 'soft')}{esc(f.summary)}</summary>"
            f'<div class="explain"><strong>{esc(title)}</strong>{esc(words)}</div>'
            + (f'<ul class="evidence">{ev}</ul>' if ev else "")
            + (f'<h3>what to do</h3><ol class="fixes">{fixes}</ol>' if fixes else "")
            + "</details>"
        )
    return t + '<p class="note">click a column to sort</p>', "".join(cards)


def _targets(stats: dict) -> dict[str, dict]:
    t = stats.get("targets")
    return {k: v for k, v in t.items() if isinstance(v, dict)} if isinstance(t, dict) else {}


def histogram_html(stats: dict) -> str:
    out = []
    for name, t in _targets(stats).items():
        hist = t.get("histogram")
        if not isinstance(hist, dict) or not hist:
            continue
        uri = plots.class_histogram(
            hist, unused=t.get("unused_classes") or [], ignored=t.get("ignored")
        )
        out.append(
            plot(
                uri,
                f"class histogram of target '{name}'"
                + (
                    f"; classes {', '.join(map(str, t['unused_classes']))} never occur"
                    if t.get("unused_classes")
                    else ""
                ),
                id=f"plot-histogram-{name}",
            )
        )
        if uri is None:
            out.append(
                table(
                    ["class", "count"], [[int(k), int(v)] for k, v in hist.items()], sortable=True
                )
            )
    return "\n".join(out)


def _flat(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("histogram", "layers"):
            rows += _flat(v, key + ".")
        elif k in ("histogram", "layers"):
            continue
        else:
            rows.append((key, v))
    return rows


def stats_html(stats: dict) -> str:
    if not stats:
        return ""
    rows = []
    for k, v in _flat(stats):
        if isinstance(v, list):
            v = ", ".join(map(str, v[:24])) + (f" … ({len(v)} in all)" if len(v) > 24 else "")
        rows.append([k, v if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)])
    return table(["statistic", "value"], rows, id="stats")


def layers_html(stats: dict) -> str:
    layers = stats.get("layers")
    if not isinstance(layers, dict) or not layers:
        return ""
    rows, cls = [], []
    for name, r in layers.items():
        if not isinstance(r, dict):
            continue
        rows.append(
            [
                name,
                r.get("dtype") or "",
                r.get("numel", 0),
                float(r.get("max_abs") or 0.0),
                r.get("nonfinite", 0),
            ]
        )
        cls.append("bad" if r.get("nonfinite") else "")
    uri = plots.headroom(
        [
            {"name": n, "max_abs": float(r.get("max_abs") or 0.0)}
            for n, r in layers.items()
            if isinstance(r, dict)
        ],
        dtype="float16",
    )
    return plot(
        uri,
        "largest magnitude per layer against float16 (what a cast to half would overflow)",
        id="plot-headroom",
    ) + table(
        ["layer", "dtype", "values", "max |x|", "non-finite"],
        rows,
        sortable=True,
        id="layers",
        row_class=cls,
    )


def render(
    report: AuditReport,
    *,
    data_root: str | Path | None = None,
    doc: dict | None = None,
    norm_channels: dict[str, dict[str, np.ndarray]] | None = None,
    samples: Any = None,
) -> str:
    """The whole HTML page of an audit; ``data_root`` (the audited folder) adds sample thumbnails."""
    data = doc if doc is not None else report.to_dict()
    stats = report.stats or {}
    n_err, n_warn = len(report.problems), len(report.findings) - len(report.problems)
    status = "problems" if n_err else ("warn" if n_warn else "clean")
    what = (
        report.title
        if report.title != "audit"
        else ("nanscope " + ("inspect" if "layers" in stats else "data"))
    )
    counts = (
        f"{n_err} problem{'s' if n_err != 1 else ''}"
        + (f", {n_warn} warning{'s' if n_warn != 1 else ''}" if n_warn else "")
        if report.findings
        else "clean, no problems found"
    )
    meta = [
        (k, v)
        for k, v in (
            ("source", stats.get("source") or stats.get("format")),
            ("samples", stats.get("samples")),
            ("file", stats.get("file")),
            ("tensors", stats.get("tensors")),
            ("framework", report.framework),
        )
        if v is not None
    ]
    body = [
        f'<header class="top {"" if n_err else status}"><div class="brand">nanscope · audit</div>'
        f'<h1 id="summary">{pill(status, status)}{esc(what)}: {esc(counts)}</h1>'
        f'<div class="meta" id="meta">'
        + " · ".join(f"{esc(k)} <b>{esc(v)}</b>" for k, v in meta)
        + "</div>"
        + (
            '<div class="explain" id="category"><strong>categories found</strong>'
            + esc(", ".join(dict.fromkeys(str(f.category) for f in report.findings)))
            + "</div>"
            if report.findings
            else ""
        )
        + "</header>"
    ]
    findings_table, cards = findings_html(report)
    body.append(section("Findings", findings_table, id="findings-section"))

    views, note = [], None
    if samples is not None:
        views = samples_mod.from_arrays(*samples)
    elif data_root is not None:
        texts = [t for f in report.findings for t in (f.summary, *f.evidence, *f.fixes)]
        num = next(
            (t.get("num_classes") for t in _targets(stats).values() if t.get("num_classes")), None
        )
        views, note = samples_mod.from_dataset(
            Path(data_root),
            [f.to_dict() for f in report.findings],
            ignore_index=samples_mod.ignore_index_of(*texts),
            num_classes=num or samples_mod.num_classes_of(*texts),
        )
    elif any(f.where_found.get("file") for f in report.findings):
        note = (
            "render with the dataset at hand (`nanscope data PATH --html FILE`, "
            "or `nanscope report JSON --data PATH`) to see the files"
        )
    if views or note:
        body.append(section("The offending samples", samples_mod.render(views, note), id="samples"))

    hist = histogram_html(stats)
    if hist:
        body.append(section("Class histogram", hist, id="histogram"))
    bn = [
        f
        for f in report.findings
        if str(f.category) == "corrupt_norm_statistics"
        and isinstance(f.details.get("layers"), dict)
    ]
    if bn:
        body.append(
            section(
                "Normalization layers",
                norm_table(bn[0].details["layers"], norm_channels),
                id="norm",
            )
        )
    if cards:
        body.append(section("Each finding: evidence and what to do", cards, id="finding-details"))
    lay = layers_html(stats)
    if lay:
        body.append(section("Layers", lay, id="layers-section"))
    st = stats_html(stats)
    if st:
        body.append(section("Statistics", st, id="statistics"))
    body.append(
        f"<details><summary>the JSON</summary><pre>{esc(json.dumps(data, indent=2, default=str))}</pre></details>"
    )
    return document(f"{what}: {counts}", "\n".join(body), data=data)
