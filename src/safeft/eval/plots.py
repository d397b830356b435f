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


def _colors(labels: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}


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
    ncol = min(len(labels), 3)
    fig.legend(handles, [mpl_text(lab, 60) for lab in labels], loc="lower center", ncol=ncol,
               frameon=False, fontsize=9)


def scatter_png(panels: list[ScatterPanel], run_labels: Sequence[str]) -> bytes:
    """One scatter per panel (x = safety, y = utility), 95% intervals as error bars, one
    colour per run shared by all panels, and one legend below them."""
    from matplotlib.figure import Figure

    colors = _colors(run_labels)
    rows, cols = _grid(len(panels), 3)
    legend_rows = math.ceil(len(run_labels) / 3)
    fig = Figure(figsize=(4.6 * cols, 3.8 * rows + 0.3 * legend_rows + 0.3))
    handles: dict[str, object] = {}
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for p in panel.points:
            xerr = [[p.x - p.x_err[0]], [p.x_err[1] - p.x]] if p.x_err else None
            yerr = [[p.y - p.y_err[0]], [p.y_err[1] - p.y]] if p.y_err else None
            h = ax.errorbar([p.x], [p.y], xerr=xerr, yerr=yerr, fmt="o", ms=7, capsize=3,
                            color=colors.get(p.label), elinewidth=1)
            handles.setdefault(p.label, h)
        ax.set_title(mpl_text(panel.title, 60), fontsize=10)
        ax.set_xlabel(mpl_text(panel.x_label, 60), fontsize=9)
        ax.set_ylabel(mpl_text(panel.y_label, 60), fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.margins(0.15)
    order = [lab for lab in run_labels if lab in handles]
    _legend(fig, [handles[lab] for lab in order], order)
    fig.tight_layout(rect=(0, min(0.45, (0.3 * legend_rows + 0.3) / fig.get_figheight()), 1, 1))
    return _png(fig)


def curves_png(panels: list[CurvePanel], run_labels: Sequence[str]) -> bytes:
    """Line plots, one panel per metric, one line per run (markers at every point, so a
    single epoch-end evaluation still shows)."""
    from matplotlib.figure import Figure

    colors = _colors(run_labels)
    rows, cols = _grid(len(panels), 3)
    legend_rows = math.ceil(len(run_labels) / 3)
    fig = Figure(figsize=(4.6 * cols, 3.2 * rows + 0.3 * legend_rows + 0.3))
    handles: dict[str, object] = {}
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for label in run_labels:
            pts = sorted(panel.series.get(label, []))
            if not pts:
                continue
            xs, ys = zip(*pts)
            (line,) = ax.plot(xs, ys, marker="o" if len(pts) <= 30 else None, ms=4, lw=1.5,
                              color=colors[label])
            handles.setdefault(label, line)
        ax.set_title(mpl_text(panel.title, 60), fontsize=10)
        ax.set_xlabel(mpl_text(panel.x_label), fontsize=9)
        if panel.y_label:
            ax.set_ylabel(mpl_text(panel.y_label), fontsize=9)
        ax.grid(True, alpha=0.3)
    order = [lab for lab in run_labels if lab in handles]
    _legend(fig, [handles[lab] for lab in order], order)
    fig.tight_layout(rect=(0, min(0.45, (0.3 * legend_rows + 0.3) / fig.get_figheight()), 1, 1))
    return _png(fig)
