"""The one plotting function: metric series as lines in one or more panels, saved as a PNG (matplotlib,
imported only when a plot is drawn)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Line:
    label: str
    x: list
    y: list
    style: str = "-"  # matplotlib format: "-" a line, "o-" points joined
    lw: float = 1.2

    @classmethod
    def of(cls, records: list[dict], key: str, label: str, style: str = "-", lw: float = 1.2) -> "Line":
        """The series `key` of metrics records against their step."""
        pts = [(r["step"], r[key]) for r in records if key in r]
        return cls(label, [p[0] for p in pts], [p[1] for p in pts], style, lw)


@dataclass
class Panel:
    lines: list[Line]
    title: str = ""
    xlabel: str = "step"
    ylabel: str = ""
    ylim: tuple[float, float] | None = None
    hlines: list[tuple[float, str]] = field(default_factory=list)  # (y, label): reference levels (chance, ...)
    xscale: str = "linear"  # "log" for sizes that span decades (labels, parameters)
    yscale: str = "linear"


_told = False


def plot(png: Path, panels: list[Panel], title: str = "") -> Path | None:
    """Draw the panels side by side into `png`; None (and no file) when no panel has data."""
    panels = [p for p in panels if any(line.x for line in p.lines)]
    if not panels:
        return None
    try:
        import matplotlib
    except ImportError:  # an optional extra: metrics.jsonl holds the numbers either way
        global _told
        if not _told:
            print(f"(no plots: `pip install gptlab[plots]` draws {png.name} and the others)")
            _told = True
        return None
    matplotlib.use("Agg")
    import matplotlib.ticker
    import matplotlib.pyplot as plt

    size = (7, 4) if len(panels) == 1 else (4.2 * len(panels), 3.4)
    fig, axes = plt.subplots(1, len(panels), figsize=size, dpi=110, squeeze=False)
    for ax, p in zip(axes[0], panels):
        for line in p.lines:
            if line.x:
                ax.plot(line.x, line.y, line.style, label=line.label or None, lw=line.lw)
        for y, label in p.hlines:
            ax.axhline(y, color="grey", lw=0.8, ls="--", label=label)
        ax.set_xscale(p.xscale)
        ax.set_yscale(p.yscale)
        for axis, scale in ((ax.xaxis, p.xscale), (ax.yaxis, p.yscale)):
            lo, hi = axis.get_view_interval()
            if scale == "log" and 0 < lo and hi / lo < 10:  # within a decade matplotlib writes 3×10⁰: plain reads better
                plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
                axis.set_major_formatter(plain)
                axis.set_minor_formatter(plain)
        ax.set_xlabel(p.xlabel)
        ax.set_ylabel(p.ylabel)
        if p.ylim:
            ax.set_ylim(*p.ylim)
        ax.set_title(p.title or (title if len(panels) == 1 else ""), fontsize=9 if len(panels) > 1 else None)
        ax.grid(alpha=0.3)
        if any(line.label for line in p.lines) or p.hlines:
            ax.legend()
    if len(panels) > 1 and title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return Path(png)
