"""The page of one diagnosis: what happened, where, how it travelled, the evidence, the plots,
the offending samples and the fixes.

Works from the JSON alone (``nanscope run --json``); a repro bundle adds its manifest and, when
the bundle holds ``samples.npz``, the samples. Everything here reads plain data: no framework.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from nanscope.core.diagnosis import Diagnosis, samples_text
from nanscope.report import plots
from nanscope.report import samples as samples_mod
from nanscope.report.explain import explain
from nanscope.report.images import channel_strip
from nanscope.report.page import Raw, document, esc, pill, plot, rich_text, section, table

CONTEXT_LINES = 6
_PHASES = ["data", "forward", "loss", "backward", "optimizer"]
_REACHED = {
    "loss": "the loss",
    "output": "the model's output",
    "gradient": "a gradient",
    "parameter": "a parameter",
    "parameters": "the parameters",
    "buffer": "a buffer",
    "optimizer": "the optimizer state",
}
# "label: float32[8, 3]: 1 NaN of 24, min -1, max 2" (TensorSummary.describe after a label)
_STATS = re.compile(
    r"^(?P<label>[^:]{1,120}): (?P<dtype>[a-z]+[0-9]*)\[(?P<shape>[^\]]*)\](?:: (?P<rest>.*))?$"
)


# -- source -------------------------------------------------------------------------------------


def source_lines(
    file: str, line: int, *, search: list[Path] = (), context: int = CONTEXT_LINES
) -> tuple[Path, list[tuple[int, str]]] | None:
    """The lines around ``file:line`` when the file can be found here (absolute, or under ``search``)."""
    candidates = (
        [Path(file)]
        + [Path(s) / file for s in search]
        + [Path(s) / Path(file).name for s in search]
    )
    for p in candidates:
        try:
            if p.is_file():
                text = p.read_text(encoding="utf-8", errors="replace").splitlines()
                break
        except OSError:
            continue
    else:
        return None
    if not 1 <= line <= len(text):
        return None
    lo, hi = max(1, line - context), min(len(text), line + context)
    return p, [(i, text[i - 1]) for i in range(lo, hi + 1)]


def source_html(d: Diagnosis, search: list[Path]) -> str:
    loc = d.location
    if loc is None:
        return (
            '<p class="note">no source line: this failure is not tied to a line of code '
            "(stored state, or the data).</p>"
        )
    found = source_lines(loc.file, loc.line, search=search)
    if found is None:
        return (
            f'<p class="note">source file {esc(loc.file)} is not readable on this machine: '
            f"line {loc.line} is not shown.</p>"
        )
    path, lines = found
    rows = "".join(
        f'<div class="{"hit" if i == loc.line else ""}"{" id=culprit-line" if i == loc.line else ""}>'
        f'<span class="ln">{i}</span>{esc(text)}</div>'
        for i, text in lines
    )
    return f'<div class="note">{esc(path)}</div><pre class="source">{rows}</pre>'


# -- the path -------------------------------------------------------------------------------------


def path_nodes(d: Diagnosis) -> list[tuple[str, str, str]]:
    """``(title, subtitle, kind)`` from the origin to what the value poisoned.

    A recorded chain (``details["path"]``: op names, or objects with op / module / phase) is
    shown as is; otherwise the chain is drawn from the producer, its phase and what it reached.
    """
    det = d.details or {}
    recorded = det.get("path")
    if isinstance(recorded, list) and recorded:
        nodes = []
        for i, step in enumerate(recorded):
            if isinstance(step, dict):
                title = str(step.get("op") or step.get("module") or step)
                sub = " · ".join(
                    str(step[k])
                    for k in ("module", "phase")
                    if step.get(k) and step.get(k) != title
                )
            else:
                title, sub = str(step), ""
            nodes.append((title, sub, "origin" if i == 0 else ""))
        if det.get("reached"):
            nodes.append(
                (
                    _REACHED.get(str(det["reached"]), str(det["reached"])),
                    "reached: non-finite",
                    "end",
                )
            )
        return nodes
    cat, phase = str(d.category), str(d.phase) if d.phase else None
    where = " · ".join(x for x in (d.module, str(d.location) if d.location else None) if x)
    producer = (d.op or str(d.op_kind or "?"), " · ".join(x for x in (phase, where) if x), "")
    nodes: list[tuple[str, str, str]] = []
    if cat == "nonfinite_input":
        nodes.append(
            (
                "the batch",
                "samples " + samples_text(d.samples) if d.samples else "the inputs",
                "origin",
            )
        )
        first = next(
            (e.split(":", 1)[1].strip() for e in d.evidence if e.startswith("first op to read it")),
            None,
        )
        if first:
            nodes.append((first, "first op to read it", ""))
    elif cat == "invalid_target":
        nodes.append(
            (
                "the targets",
                "samples " + samples_text(d.samples) if d.samples else "labels",
                "origin",
            )
        )
        if d.op:
            nodes.append(producer)
    elif cat in ("nonfinite_parameters", "corrupt_norm_statistics", "optimizer_state"):
        stored = {
            "nonfinite_parameters": "stored weights",
            "corrupt_norm_statistics": "stored BatchNorm statistics",
            "optimizer_state": "optimizer state",
        }[cat]
        nodes.append(
            (
                stored,
                d.module or ", ".join(map(str, (det.get("tensors") or [])[:2])) or "",
                "origin",
            )
        )
        if cat == "corrupt_norm_statistics":
            nodes.append((d.op or "batch_norm", "evaluation mode reads them", ""))
    elif cat == "exploding_gradients":
        n = len(det.get("grad_norms") or [])
        nodes.append(
            ("growing gradients", f"{n} steps of history" if n else "over several steps", "origin")
        )
        if d.op:
            nodes.append(
                (
                    producer[0],
                    "overflowed here · " + producer[1] if producer[1] else "overflowed here",
                    "",
                )
            )
    elif det.get("forward_producer"):  # a backward producer: its forward op first (the where trap)
        nodes.append(
            (
                str(det["forward_producer"]),
                "forward op: finite, but its derivative is not",
                "origin",
            )
        )
        nodes.append(producer)
    else:
        nodes.append((producer[0], producer[1], "origin"))
    reached = det.get("reached")
    if phase in _PHASES:
        target = {
            "output": "forward",
            "loss": "loss",
            "gradient": "backward",
            "parameter": "optimizer",
        }.get(str(reached), phase)
        if target in _PHASES and _PHASES.index(target) > _PHASES.index(phase):
            for ph in _PHASES[_PHASES.index(phase) + 1 : _PHASES.index(target) + 1]:
                if ph not in ("data",) and (ph != "loss" or reached != "loss"):
                    nodes.append(
                        (f"{ph} pass" if ph in ("forward", "backward") else ph, "carried it on", "")
                    )
    if reached:
        end = _REACHED.get(str(reached), str(reached))
    else:
        end = {
            "data": "the loss",
            "forward": "the model's output",
            "loss": "the loss",
            "backward": "the gradients",
            "optimizer": "the parameters",
            "state": "the model's output in evaluation"
            if cat == "corrupt_norm_statistics"
            else "the model's output",
        }.get(phase or "", "training")
    nodes.append((end, "reached: non-finite", "end"))
    return nodes


def path_html(d: Diagnosis) -> str:
    nodes = path_nodes(d)
    parts = []
    for i, (title, sub, kind) in enumerate(nodes):
        if i:
            parts.append('<span class="arrow">&rarr;</span>')
        parts.append(f'<div class="node {kind}">{esc(title)}<small>{esc(sub)}</small></div>')
    recorded = isinstance((d.details or {}).get("path"), list)
    note = (
        ""
        if recorded
        else (
            '<p class="note">drawn from the producer, its phase and what the value reached; '
            "ops in between only carried the value along (propagators are never the culprit).</p>"
        )
    )
    return f'<div class="path" id="path">{"".join(parts)}</div>{note}'


# -- evidence -------------------------------------------------------------------------------------


def parse_stats(line: str) -> dict[str, Any] | None:
    """A tensor-summary evidence line as fields.

    >>> r = parse_stats("matmul input 1: float16[4, 16]: min -25840, max 13848")
    >>> r["label"], r["dtype"], r["shape"], r["min"], r["max"]
    ('matmul input 1', 'float16', '4, 16', -25840.0, 13848.0)
    """
    m = _STATS.match(line.strip())
    if not m:
        return None
    out: dict[str, Any] = {
        "label": m["label"],
        "dtype": m["dtype"],
        "shape": m["shape"],
        "nonfinite": "",
        "min": None,
        "max": None,
        "other": [],
    }
    for part in (m["rest"] or "").split(", "):
        part = part.strip()
        key, _, val = part.partition(" ")
        if key in ("min", "max"):
            try:
                out[key] = float(val)
            except ValueError:
                out["other"].append(part)
        elif re.search(r"\b(NaN|[+-]?Inf)\b", part):
            out["nonfinite"] = (out["nonfinite"] + ", " if out["nonfinite"] else "") + part
        elif part:
            out["other"].append(part)
    return out


def evidence_html(
    d: Diagnosis, norm_channels: dict[str, dict[str, np.ndarray]] | None
) -> tuple[str, list[dict]]:
    """Tables (tensor statistics, normalization layers) and the remaining lines as a list."""
    stats, rest = [], []
    for e in d.evidence:
        s = parse_stats(e)
        (stats if s else rest).append(s or e)
    parts = []
    if stats:
        rows, bad = [], set()
        for i, s in enumerate(stats):
            rows.append(
                [
                    s["label"],
                    s["dtype"],
                    f"[{s['shape']}]",
                    s["nonfinite"] or "none",
                    s["min"] if s["min"] is not None else "",
                    s["max"] if s["max"] is not None else "",
                    "; ".join(s["other"]),
                ]
            )
            if s["nonfinite"]:
                bad.add((i, 3))
        parts.append(
            "<h3>tensor statistics at the producer</h3>"
            + table(
                ["tensor", "dtype", "shape", "non-finite", "min", "max", "other"],
                rows,
                id="input-stats",
                bad_cells=bad,
            )
        )
    layers = (d.details or {}).get("layers")
    if str(d.category) == "corrupt_norm_statistics" and isinstance(layers, dict) and layers:
        parts.append("<h3>normalization layers</h3>" + norm_table(layers, norm_channels))
    if rest:
        parts.append(
            '<ul class="evidence">'
            + "".join(f"<li>{rich_text(e, copy=False)}</li>" for e in rest)
            + "</ul>"
        )
    return "\n".join(parts), stats


def bad_channels(name: str, values: np.ndarray, *, extreme: float = 1e6) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(v) | (np.abs(np.where(np.isfinite(v), v, 0)) > extreme)
    if "var" in name:
        bad |= np.isfinite(v) & (v < 0)
        fin = v[np.isfinite(v)]
        med = float(np.median(np.abs(fin))) if fin.size else 0.0
        if med > 0:
            bad |= np.isfinite(v) & (np.abs(v) > 1e5 * max(med, 1e-2))
    return bad


def norm_table(layers: dict[str, Any], channels: dict[str, dict[str, np.ndarray]] | None) -> str:
    """Per layer: what is wrong and, when the values are at hand, every channel with the bad ones marked."""
    rows = []
    for layer, problems in layers.items():
        text = "; ".join(map(str, problems)) if isinstance(problems, list) else str(problems)
        strips = []
        for stat, values in ((channels or {}).get(layer) or {}).items():
            v = np.asarray(values)
            bad = bad_channels(stat, v)
            idx = np.flatnonzero(bad)
            shown = ", ".join(f"{int(i)} ({v.reshape(-1)[i]:.3g})" for i in idx[:12]) + (
                " …" if idx.size > 12 else ""
            )
            strips.append(
                f'<div class="note">{esc(stat)}: {v.size} channels, {idx.size} bad'
                + (f": channel {esc(shown)}" if idx.size else "")
                + "</div>"
                + f'<img class="strip" src="{channel_strip(v, bad)}" alt="{esc(stat)} per channel, bad in red">'
            )
        rows.append(
            [
                layer,
                text,
                Raw("".join(strips) or '<span class="note">values not stored here</span>'),
            ]
        )
    return table(
        ["layer", "problem", "channels (red: bad)"],
        rows,
        id="norm-layers",
        row_class=["bad"] * len(rows),
    )


# -- plots ------------------------------------------------------------------------------------------


def plots_html(d: Diagnosis, stats: list[dict]) -> str:
    det = d.details or {}
    out = []
    grad_norms = det.get("grad_norms")
    losses = det.get("losses") or det.get("loss_history")
    if grad_norms or losses:
        out.append(
            plot(
                plots.history(grad_norms, losses, failed_step=d.step),
                "gradient norm per step before the failure (log scale): exploding gradients show as a rising line",
                id="plot-history",
            )
        )
    if det.get("scales"):
        out.append(
            plot(
                plots.loss_scale(det["scales"], det.get("skipped_steps") or [], last_step=d.step),
                "loss scale per step; crosses mark skipped updates",
                id="plot-loss-scale",
            )
        )
    head = det.get("headroom")
    dtype = d.dtype or "float16"
    if isinstance(head, dict) and head.get("layers"):
        out.append(
            plot(
                plots.headroom(
                    head["layers"], dtype=head.get("dtype") or dtype, limit=head.get("max")
                ),
                f"largest magnitude per layer against {head.get('dtype') or dtype}",
                id="plot-headroom",
            )
        )
    elif str(d.category) == "overflow" and stats:
        dtype = d.dtype or stats[0]["dtype"]
        from nanscope.core.limits import limits

        top = limits(dtype).max if limits(dtype) else None
        rows = []
        for s in stats:
            if "Inf" in s["nonfinite"] and top:  # past the limit: drawn beyond the line
                rows.append({"name": s["label"] + " (Inf)", "max_abs": top * 4})
            elif s["min"] is not None or s["max"] is not None:
                rows.append(
                    {"name": s["label"], "max_abs": max(abs(s["min"] or 0.0), abs(s["max"] or 0.0))}
                )
        if rows:
            out.append(
                plot(
                    plots.headroom(rows, dtype=dtype),
                    f"the producer's tensors against the {dtype} maximum (log10 of the largest magnitude)",
                    id="plot-headroom",
                )
            )
    if (grad_norms or det.get("scales") or head) and not plots.available():
        out.append(
            '<p class="note">'
            + rich_text(
                "install matplotlib for the plots: `pip install 'nanscope[plot]'`", copy=False
            )
            + "</p>"
        )
    return "\n".join(o for o in out if o)


# -- the page -------------------------------------------------------------------------------------


def render(
    d: Diagnosis,
    *,
    bundle: Any = None,
    samples: tuple[dict[str, np.ndarray], list[int] | None] | None = None,
    source_search: list[Path] | None = None,
    norm_channels: dict[str, dict[str, np.ndarray]] | None = None,
    doc: dict | None = None,
) -> str:
    """The whole HTML page for ``d``.

    Args:
        bundle: a ``nanscope.core.bundle.BundleInfo`` (its manifest and samples preview are shown).
        samples: ``(arrays, indices)``: the offending rows of the batch, when the caller has them.
        source_search: folders where a relative source path may be found.
        norm_channels: ``{layer: {"running_var": values, ...}}`` for the per-channel view.
        doc: the JSON document the page is made from (embedded for tools); default ``d.to_dict()``.
    """
    cat = str(d.category)
    title, words = explain(cat)
    search = list(source_search or [])
    if bundle is not None:
        search.append(Path(bundle.folder))
    meta = [
        (k, v)
        for k, v in (
            ("framework", d.framework),
            ("phase", d.phase),
            ("step", d.step),
            ("dtype", d.dtype),
            ("samples", samples_text(d.samples) if d.samples else None),
            ("ranks", ", ".join(map(str, d.ranks)) if d.ranks else None),
        )
        if v is not None
    ]
    head = (
        f'<header class="top"><div class="brand">nanscope · diagnosis of a non-finite failure</div>'
        f'<h1 id="summary">{pill(cat)}{esc(d.summary)}</h1>'
        f'<div class="meta" id="meta">'
        + " · ".join(f"{esc(k)} <b>{esc(v)}</b>" for k, v in meta)
        + "</div>"
        f'<div class="explain" id="category"><strong>{esc(cat)}: {esc(title)}</strong>{esc(words)}</div></header>'
    )
    body = [head]

    where_rows = [
        (k, v)
        for k, v in (
            ("op", d.op),
            ("op kind", d.op_kind),
            ("module / layer", d.module),
            ("layer path", (d.details or {}).get("layer_path")),
            (
                "source line",
                f"{d.location} in {d.location.function}"
                if d.location and d.location.function
                else d.location,
            ),
        )
        if v
    ]
    where = (
        table(None, [[k, str(v)] for k, v in where_rows], id="where-table") if where_rows else ""
    )
    body.append(section("Where", where + source_html(d, search), id="where"))
    body.append(section("How it travelled", path_html(d), id="travel"))
    ev_html, stats = evidence_html(d, norm_channels)
    if ev_html:
        body.append(section("Evidence", ev_html, id="evidence"))
    p = plots_html(d, stats)
    if p:
        body.append(section("Plots", p, id="plots"))

    sample_views, note = [], None
    ignore = samples_mod.ignore_index_of(d.summary, *d.evidence, *d.fixes)
    if samples is None and bundle is not None:
        samples = samples_mod.read_preview(bundle.folder)
        if samples is None and d.samples:
            note = (
                "this bundle holds no samples preview (samples.npz); the batch is in its state file"
            )
    if samples is not None:
        arrays, indices = samples
        sample_views = samples_mod.from_arrays(
            arrays,
            indices,
            ignore_index=ignore,
            num_classes=samples_mod.num_classes_of(*d.evidence),
        )
    elif d.samples and note is None:
        note = (
            f"samples {samples_text(d.samples)} of the batch. The JSON does not hold the batch; the repro "
            "bundle of a guarded run does (`nanscope.torch.Guard` writes one): `nanscope report BUNDLE` shows them"
        )
    if sample_views or note:
        body.append(
            section("The offending samples", samples_mod.render(sample_views, note), id="samples")
        )

    if d.fixes:
        fixes = "".join(f"<li>{rich_text(f)}</li>" for f in d.fixes)
        body.append(
            section("What to do", f'<ol class="fixes" id="fixes">{fixes}</ol>', id="what-to-do")
        )
    if bundle is not None:
        body.append(section("Repro bundle", bundle_html(bundle), id="bundle"))
    data = doc if doc is not None else d.to_dict()
    body.append(
        f"<details><summary>the JSON</summary><pre>{esc(json.dumps(data, indent=2, default=str))}</pre></details>"
    )
    return document(f"nanscope: {cat}: {d.summary}", "\n".join(body), data=data)


def bundle_html(info: Any) -> str:
    m = info.manifest
    rows = [
        [k, str(v)]
        for k, v in (
            ("folder", info.folder),
            ("written", m.get("created")),
            ("torch", m.get("torch")),
            ("model tensors", m.get("model_tensors")),
            ("parameters", m.get("model_parameters")),
            ("optimizer", m.get("optimizer")),
            ("batch", "; ".join(map(str, m.get("batch") or []))),
            ("left out", ", ".join(map(str, m.get("left_out") or [])) or None),
            ("state file", f"{m.get('state_file', 'state.pt')}, {m.get('state_bytes')} bytes"),
        )
        if v not in (None, "")
    ]
    code = "nanscope.torch.replay(BUNDLE, model, optimizer, train_step)".replace(
        "BUNDLE", repr(str(info.folder))
    )
    return table(None, rows) + f"<p>reproduce: {rich_text('`' + code + '`')}</p>"
