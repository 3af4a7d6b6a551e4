"""The report's plots: matplotlib figures rendered to inline SVG data URIs.

Design constraints:
    - A bare ``matplotlib.figure.Figure`` (no pyplot): the user's backend and global state stay
      untouched; settings go through ``rc_context`` only.
    - Deterministic SVG (fixed hash salt, no date) with text kept as text, so pages are small and
      the same diagnosis renders the same bytes.
    - Each plot is an ``<img>`` with an SVG data URI: its ids cannot clash with another plot's.
    - matplotlib is optional (``nanscope[plot]``): without it every function returns None and the
      page shows the numbers as tables instead.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

RED, ORANGE, BLUE, GREY, PURPLE = "#d62728", "#ff7f0e", "#1f77b4", "#7f7f7f", "#9467bd"
_RC = {
    "svg.fonttype": "none",
    "svg.hashsalt": "nanscope",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float = 6.4, height: float = 2.8):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def to_uri(fig) -> str:
    buf = io.BytesIO()
    with _rc():
        fig.tight_layout()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _finite(xs: Sequence[float | None]) -> list[float]:
    return [
        float(x) for x in xs if x is not None and isinstance(x, (int, float)) and math.isfinite(x)
    ]


def history(
    grad_norms: Sequence[float] | None,
    losses: Sequence[float] | None = None,
    *,
    failed_step: int | None = None,
) -> str | None:
    """Gradient norm (and loss) per step up to the failure, log scale: growth shows as a line."""
    if not available():
        return None
    series = [(name, list(v)) for name, v in (("gradient norm", grad_norms), ("loss", losses)) if v]
    if not any(_finite(v) for _, v in series):
        return None
    with _rc():
        fig = _figure()
        ax = fig.subplots()
        colors = {"gradient norm": BLUE, "loss": ORANGE}
        for name, values in series:
            n = len(values)
            # Steps are counted back from the failure: the last value is the step before it.
            first = (failed_step - n) if failed_step is not None else 0
            xs = [first + i for i in range(n)]
            pts = [
                (x, v)
                for x, v in zip(xs, values, strict=True)
                if v is not None and math.isfinite(v) and v > 0
            ]
            if not pts:
                continue
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                ms=3,
                color=colors[name],
                label=name,
            )
            bad = [x for x, v in zip(xs, values, strict=True) if v is None or not math.isfinite(v)]
            for x in bad:
                ax.axvline(x, color=RED, alpha=0.3)
        if failed_step is not None:
            ax.axvline(failed_step, color=RED, ls="--", label=f"non-finite at step {failed_step}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title("history up to the failure (log scale)")
        ax.legend(loc="upper left", fontsize="small")
        return to_uri(fig)


def loss_scale(
    scales: Sequence[float], skipped: Sequence[int] = (), *, last_step: int | None = None
) -> str | None:
    """The dynamic loss scale per step, skipped steps marked: a collapse is a staircase down.

    ``scales`` are the newest values, oldest first; the last one is the scale after ``last_step``.
    """
    vals = [float(s) for s in scales]
    if not available() or not _finite(vals):
        return None
    with _rc():
        fig = _figure()
        ax = fig.subplots()
        end = last_step if last_step is not None else max([len(vals) - 1, *skipped])
        first = max(0, end - len(vals) + 1)
        xs = list(range(first, first + len(vals)))
        ax.step(
            xs,
            [v if v > 0 else float("nan") for v in vals],
            where="post",
            color=BLUE,
            label="loss scale",
        )
        sk = [x for x in xs if x in set(skipped)]
        if sk:
            ax.scatter(
                sk,
                [vals[x - first] if vals[x - first] > 0 else float("nan") for x in sk],
                color=RED,
                marker="x",
                zorder=3,
                label="update skipped",
            )
        ax.axhline(1.0, color=GREY, ls=":", label="scale 1")
        ax.set_yscale("log", base=2)
        ax.set_xlabel("step")
        ax.set_title("loss scale (log2)")
        ax.legend(loc="upper right", fontsize="small")
        return to_uri(fig)


def headroom(
    layers: Sequence[dict], *, dtype: str = "float16", limit: float | None = None, top: int = 24
) -> str | None:
    """Largest magnitude per layer against the dtype's max (log10): who overflows, who is close."""
    rows = [r for r in layers if _finite([r.get("act_absmax"), r.get("max_abs")])]
    if not available() or not rows:
        return None
    if limit is None:
        from nanscope.core.limits import limits

        lim = limits(dtype)
        limit = lim.max if lim else None

    def key(r):
        return max(_finite([r.get("act_absmax"), r.get("grad_absmax"), r.get("max_abs")]) or [0.0])

    rows = sorted(rows, key=key, reverse=True)[:top][::-1]
    with _rc():
        fig = _figure(6.4, 0.28 * len(rows) + 1.3)
        ax = fig.subplots()
        vals = [max(key(r), 1e-30) for r in rows]
        colors = [
            RED if limit and v >= limit else ORANGE if limit and v >= limit / 16 else BLUE
            for v in vals
        ]
        ax.barh(range(len(rows)), [math.log10(v) for v in vals], color=colors)
        if limit:
            ax.axvline(math.log10(limit), color=RED, ls="--", label=f"{dtype} max {limit:g}")
            ax.axvline(math.log10(limit / 16), color=ORANGE, ls=":", label="4 doublings left")
        ax.set_yticks(
            list(range(len(rows))), [str(r.get("name") or "(model)") for r in rows], fontsize=7
        )
        ax.set_xlabel("log10 of the largest magnitude")
        ax.set_title(f"headroom against {dtype} per layer")
        ax.legend(loc="lower right", fontsize="small")
        return to_uri(fig)


def class_histogram(
    hist: dict, *, unused: Sequence[int] = (), ignored: int | None = None
) -> str | None:
    """Pixels (or samples) per class; classes that never occur marked in red below the axis."""
    items = sorted(((int(k), int(v)) for k, v in hist.items()), key=lambda kv: kv[0])
    if not available() or not items:
        return None
    with _rc():
        fig = _figure(6.4, 2.6)
        ax = fig.subplots()
        xs = [k for k, _ in items]
        ax.bar(
            xs,
            [v for _, v in items],
            color=[RED if k in set(unused) or v == 0 else BLUE for k, v in items],
        )
        for k, v in items:
            if v == 0:
                ax.annotate("0", (k, 0), ha="center", va="bottom", color=RED, fontsize=7)
        ax.set_xlabel("class")
        ax.set_ylabel("count")
        title = "class histogram" + (f" ({len(unused)} classes never occur)" if unused else "")
        if ignored:
            title += f"; {ignored} ignored"
        ax.set_title(title)
        if len(xs) <= 40:
            ax.set_xticks(xs)
        return to_uri(fig)


def _rc():
    """The report's settings while a figure is built and saved (fonts, spines, SVG text)."""
    import matplotlib

    return matplotlib.rc_context(_RC)
