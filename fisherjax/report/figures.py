"""Figures: matplotlib's object API, never pyplot's global state.

A :class:`matplotlib.figure.Figure` made here belongs to no pyplot window and selects no backend,
so drawing a report never switches a notebook user's backend (``matplotlib.use``) and never
leaks open figures; ``Figure.savefig`` renders PNG with Agg by itself, and a notebook displays
a returned figure through its inline formatter.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def new_figure(**kwargs) -> Figure:
    """A pyplot-free figure (``constrained_layout`` unless ``layout`` is given)."""
    if "layout" not in kwargs and "constrained_layout" not in kwargs:
        kwargs["layout"] = "constrained"
    return Figure(**kwargs)


def save_figure(fig: Figure, out: Path, name: str) -> str:
    """Save under ``out/figures/name.png``; returns the relative path for the report.

    The figure's own canvas, no ``bbox_inches="tight"``: :func:`new_figure`'s constrained layout
    already fits titles, colour bars and legends outside the axes inside it, and the tight box
    would draw every figure twice (once to measure it), the text of its cell labels included."""
    path = Path(out) / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return f"figures/{name}.png"
