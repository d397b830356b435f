"""The report's figures: safety-vs-utility scatter and per-epoch curves, as PNG bytes.

matplotlib is driven through :class:`matplotlib.figure.Figure` and the Agg canvas directly
(no pyplot), so no global backend or figure state is touched and nothing opens a window.
Every string drawn comes from files a user (or a model) wrote: it is passed through
:func:`mpl_text`, which removes control characters and escapes ``$`` so that mathtext never
parses it (a stray ``$\\frac`` in a directory name would otherwise abort the rendering).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .report import clean


def mpl_text(text: object, limit: int = 48) -> str:
    """``text`` made safe and short for matplotlib (no control chars, no mathtext)."""
    s = clean(str(text)).replace("\n", " ")
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return s.replace("$", r"\$")


@dataclass
class Point:
    label: str
    x: float
    y: float
    x_err: tuple[float, float] | None = None  # (lo, hi) absolute bounds
    y_err: tuple[float, float] | None = None


@dataclass
class ScatterPanel:
    title: str
    x_label: str
    y_label: str
    points: list[Point] = field(default_factory=list)


@dataclass
class CurvePanel:
    title: str
    x_label: str
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # run label -> (x, y)
    y_label: str = ""


MARKERS = "osD^vPX*<>"
LINESTYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class Style:
    color: tuple
    marker: str
    linestyle: str


def run_styles(labels: Sequence[str], groups: Sequence[str] | None = None) -> dict[str, Style]:
    """One style per run: the colour names its group (the method), the marker and line
    style tell apart the runs of a group (poison ratios, seeds), so a grid of 30 runs stays
    readable with ten colours."""
    from matplotlib import colormaps

    groups = list(groups) if groups is not None else list(labels)
    order = list(dict.fromkeys(groups))
    cmap = colormaps["tab10" if len(order) <= 10 else "tab20"]
    seen: dict[str, int] = {}
    styles = {}
    for label, group in zip(labels, groups):
        k = seen[group] = seen.get(group, -1) + 1
        styles[label] = Style(cmap(order.index(group) % cmap.N), MARKERS[k % len(MARKERS)],
                              LINESTYLES[(k // len(MARKERS) + k) % len(LINESTYLES)])
    return styles


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _grid(n: int, ncols: int) -> tuple[int, int]:
    cols = min(n, ncols)
    return math.ceil(n / cols), cols


def _legend(fig, handles, labels: Sequence[str]) -> None:
    if not handles:
        return
    ncol = min(len(labels), 3 if len(labels) <= 12 else 4)
    fig.legend(handles, [mpl_text(lab, 60) for lab in labels], loc="outside lower center", ncol=ncol,
               frameon=False, fontsize=9)


def scatter_png(panels: list[ScatterPanel], run_labels: Sequence[str], styles: dict[str, Style] | None = None) -> bytes:
    """One scatter per panel (x = safety, y = utility), 95% intervals as error bars, one
    colour per run shared by all panels, and one legend below them."""
    from matplotlib.figure import Figure

    styles = styles or run_styles(run_labels)
    rows, cols = _grid(len(panels), 3)
    legend_rows = math.ceil(len(run_labels) / (3 if len(run_labels) <= 12 else 4))
    fig = Figure(figsize=(4.6 * cols, 3.8 * rows + 0.22 * legend_rows + 0.2), layout="constrained")
    handles: dict[str, object] = {}
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for p in panel.points:
            xerr = [[p.x - p.x_err[0]], [p.x_err[1] - p.x]] if p.x_err else None
            yerr = [[p.y - p.y_err[0]], [p.y_err[1] - p.y]] if p.y_err else None
            st = styles[p.label]
            h = ax.errorbar([p.x], [p.y], xerr=xerr, yerr=yerr, fmt=st.marker, ms=7, capsize=3,
                            color=st.color, elinewidth=1, alpha=0.9)
            handles.setdefault(p.label, h)
        ax.set_title(mpl_text(panel.title, 60), fontsize=10)
        ax.set_xlabel(mpl_text(panel.x_label, 60), fontsize=9)
        ax.set_ylabel(mpl_text(panel.y_label, 60), fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.margins(0.15)
    order = [lab for lab in run_labels if lab in handles]
    _legend(fig, [handles[lab] for lab in order], order)
    return _png(fig)


def curves_png(panels: list[CurvePanel], run_labels: Sequence[str], styles: dict[str, Style] | None = None) -> bytes:
    """Line plots, one panel per metric, one line per run (markers at every point, so a
    single epoch-end evaluation still shows)."""
    from matplotlib.figure import Figure

    styles = styles or run_styles(run_labels)
    rows, cols = _grid(len(panels), 3)
    legend_rows = math.ceil(len(run_labels) / (3 if len(run_labels) <= 12 else 4))
    fig = Figure(figsize=(4.6 * cols, 3.2 * rows + 0.22 * legend_rows + 0.2), layout="constrained")
    handles: dict[str, object] = {}
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for label in run_labels:
            pts = sorted(panel.series.get(label, []))
            if not pts:
                continue
            xs, ys = zip(*pts)
            st = styles[label]
            (line,) = ax.plot(xs, ys, marker=st.marker if len(pts) <= 30 else None, ms=4, lw=1.5,
                              color=st.color, linestyle=st.linestyle)
            handles.setdefault(label, line)
        ax.set_title(mpl_text(panel.title, 60), fontsize=10)
        ax.set_xlabel(mpl_text(panel.x_label), fontsize=9)
        if panel.y_label:
            ax.set_ylabel(mpl_text(panel.y_label), fontsize=9)
        ax.grid(True, alpha=0.3)
    order = [lab for lab in run_labels if lab in handles]
    _legend(fig, [handles[lab] for lab in order], order)
    return _png(fig)
