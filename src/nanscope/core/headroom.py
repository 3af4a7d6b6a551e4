"""The headroom report: per-layer magnitudes against a reduced dtype's limits (framework-free).

Shared by ``nanscope.torch.headroom`` and ``nanscope.keras.headroom``, which collect the
numbers; this module ranks and renders them (text table, ``to_dict()``, matplotlib plot with
matplotlib imported inside ``plot``).

Example:
    >>> r = HeadroomReport([LayerHeadroom("ffn.wo", "Linear", 3.0e4), LayerHeadroom("head", "Linear", 2.0)])
    >>> r.layers[0].status, r.at_risk[0].name, round(r.layers[0].headroom_bits, 2)
    ('danger', 'ffn.wo', 1.13)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from nanscope.core.limits import limits
from nanscope.core.summary import fmt

__all__ = ["HeadroomReport", "LayerHeadroom"]


@dataclass
class LayerHeadroom:
    """One layer's largest magnitudes, and how close they come to the dtype's limits."""

    name: str
    kind: str
    act_absmax: float
    grad_absmax: float | None = None
    grad_underflow: float | None = (
        None  # fraction of non-zero output gradients that flush to 0 in the dtype
    )
    dtype: str = "float16"

    @property
    def risk(self) -> float:
        """Largest magnitude over the dtype's max: 1.0 or more means it overflows."""
        lim = limits(self.dtype)
        top = max(self.act_absmax, self.grad_absmax or 0.0)
        return top / lim.max if lim else 0.0

    @property
    def headroom_bits(self) -> float:
        """Doublings left before overflow (negative: already past the limit)."""
        return -math.log2(self.risk) if self.risk > 0 else math.inf

    @property
    def status(self) -> str:
        if self.risk >= 1.0:
            return "overflow"
        if self.risk >= 1 / 16:  # fewer than 4 doublings left: one bad batch away
            return "danger"
        if (self.grad_underflow or 0.0) >= 0.05:
            return "underflow"
        return "ok"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "act_absmax": self.act_absmax,
            "grad_absmax": self.grad_absmax,
            "grad_underflow": self.grad_underflow,
            "risk": self.risk,
            "headroom_bits": None if math.isinf(self.headroom_bits) else self.headroom_bits,
            "status": self.status,
        }


@dataclass
class HeadroomReport:
    """Per-layer headroom, most at risk first. ``str()`` is a table; ``.plot(path)`` a chart.

    ``parameters`` lists, per parameter, the fraction of its non-zero gradient entries that
    would flush to zero in the dtype (the float16 underflow loss scaling exists for).
    """

    layers: list[LayerHeadroom]
    dtype: str = "float16"
    parameters: dict[str, float] = field(default_factory=dict)

    @property
    def at_risk(self) -> list[LayerHeadroom]:
        return [r for r in self.layers if r.status != "ok"]

    def __getitem__(self, name: str) -> LayerHeadroom:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict:
        lim = limits(self.dtype)
        return {
            "dtype": self.dtype,
            "max": lim.max if lim else None,
            "tiny": lim.tiny if lim else None,
            "subnormal": lim.subnormal if lim else None,
            "layers": [r.to_dict() for r in self.layers],
            "parameter_underflow": dict(self.parameters),
        }

    def __str__(self) -> str:
        lim = limits(self.dtype)
        head = f"nanscope headroom against {self.dtype}" + (
            f" (max {fmt(lim.max)}, smallest normal {lim.tiny:.2g})" if lim else ""
        )
        rows = [("layer", "kind", "max|act|", "max|grad|", "grad→0", "bits left", "status")]
        for r in self.layers:
            rows.append(
                (
                    r.name or "(model)",
                    r.kind,
                    f"{r.act_absmax:.4g}",
                    "-" if r.grad_absmax is None else f"{r.grad_absmax:.4g}",
                    "-" if r.grad_underflow is None else f"{100 * r.grad_underflow:.0f}%",
                    "inf" if math.isinf(r.headroom_bits) else f"{r.headroom_bits:.1f}",
                    r.status,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [head] + [
            "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        flushed = {n: f for n, f in self.parameters.items() if f >= 0.05}
        if flushed:
            lines.append(f"parameter gradients that flush to zero in {self.dtype}:")
            lines += [
                f"  {n}: {100 * f:.0f}% of non-zero entries"
                for n, f in sorted(flushed.items(), key=lambda kv: -kv[1])
            ]
        return "\n".join(lines)

    def plot(self, path: str | None = None, *, top: int = 30):
        """Bar chart of log10 max |activation| / |gradient| per layer with the dtype's limits.

        Writes PNG or SVG (by ``path``'s suffix) when ``path`` is given; returns the figure.
        Needs matplotlib (``pip install 'nanscope[plot]'``).
        """
        try:  # a bare Figure: no pyplot, so the user's matplotlib backend and state stay untouched
            from matplotlib.figure import Figure
        except ImportError as err:
            from nanscope.core.errors import MissingDependencyError

            raise MissingDependencyError("matplotlib", "plot") from err
        rows = self.layers[:top][::-1]
        fig = Figure(figsize=(8, 0.35 * len(rows) + 1.5))
        ax = fig.subplots()
        ys = range(len(rows))
        log = lambda v: math.log10(v) if v and v > 0 else float("nan")  # noqa: E731
        ax.barh(
            [y + 0.2 for y in ys],
            [log(r.act_absmax) for r in rows],
            height=0.4,
            label="max |activation|",
            color=[
                "#d62728"
                if r.status == "overflow"
                else "#ff7f0e"
                if r.status == "danger"
                else "#1f77b4"
                for r in rows
            ],
        )
        if any(r.grad_absmax for r in rows):
            ax.barh(
                [y - 0.2 for y in ys],
                [log(r.grad_absmax or 0) for r in rows],
                height=0.4,
                color="#9467bd",
                label="max |gradient|",
            )
        lim = limits(self.dtype)
        if lim:
            ax.axvline(math.log10(lim.max), color="red", ls="--", label=f"{self.dtype} max")
            ax.axvline(
                math.log10(lim.tiny), color="gray", ls=":", label=f"{self.dtype} smallest normal"
            )
        ax.set_yticks(list(ys), [r.name or "(model)" for r in rows])
        ax.set_xlabel("log10 magnitude")
        ax.set_title(f"headroom against {self.dtype}")
        ax.legend(loc="lower right", fontsize="small")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig
