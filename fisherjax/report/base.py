"""The shape of a report section and the writer of an output directory's report files."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fisherjax.report.figures import save_figure


class Section(NamedTuple):
    """One phase as shown to a reader.

    ``key``: its key in ``results.json``; ``title``: its Markdown heading; ``json``: its
    ``results.json`` value (JSON-ready after :func:`jsonable`); ``lines``: its Markdown body, in
    which ``{figure:NAME}`` stands for the link to figure ``NAME``; ``figures``: ``{NAME:
    matplotlib Figure}``.
    """

    key: str
    title: str
    json: Mapping[str, Any]
    lines: Sequence[str] = ()
    figures: Mapping[str, Any] = {}


def jsonable(value):
    """numpy scalars/arrays, paths and tuples as plain JSON types; non-finite floats as null."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write(out: Path, header: Mapping[str, Any], sections: Sequence[Section], *, heading: Sequence[str] = ()) -> dict:
    """Write ``figures/*.png``, ``results.json`` (``header`` then each section's ``json`` under
    its key) and ``report.md`` (``heading``, then the sections in the order given); returns the
    ``results.json`` content."""
    out = Path(out)
    results = dict(header)
    lines = ["# fisherjax report", "", *heading]
    for section in save_figures(out, sections):
        results[section.key] = section.json
        lines += [f"## {section.title}", "", *section.lines, ""]
    results = jsonable(results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    files = ["- `results.json` — every number above", "- `group_fisher.npz` — keys `task|param_path|group_type`",
             "- `fisher_state/<task>/` — orbax checkpoint of each task's Fisher state"]
    files += [f"- `{extra}`" for extra in ("heads.json", "qkov.npz", "conflicts.json") if (out / extra).exists()]
    (out / "report.md").write_text("\n".join([*lines, "## Files", "", *files]) + "\n")
    return results


def save_figures(out: Path, sections: Sequence[Section]) -> list[Section]:
    """Save every section's figures as ``figures/NAME.png`` and return the sections without them:
    each figure's ``{figure:NAME}`` replaced by its link and the links listed under ``"figures"``
    in its ``json``. A section without figures is returned as it is, so :func:`write` may be
    handed sections whose figures are already saved (a run then times the drawing apart)."""
    saved = []
    for section in sections:
        if not section.figures:
            saved.append(section)
            continue
        links = {name: save_figure(fig, out, name) for name, fig in section.figures.items()}
        saved.append(section._replace(json={**section.json, "figures": list(links.values())},
                                      lines=[_link(line, links) for line in section.lines], figures={}))
    return saved


def _link(line: str, links: Mapping[str, str]) -> str:
    """``{figure:NAME}`` → the figure's relative path."""
    for name, path in links.items():
        line = line.replace(f"{{figure:{name}}}", path)
    return line
