"""How the report names a head's behaviour: the category of every (layer, head) from
:mod:`fisherjax.heads` next to its number, in tables, group labels and figures, and interference
summarised per category.

``labels`` is always the ``[layer, query head]`` array of category names of
:class:`fisherjax.heads.HeadCategories`; a kv head (the K and V blocks under grouped-query
attention) is named by the categories of the query heads that read it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

ABBREVIATIONS = {"induction": "ind", "previous_token": "prev", "same_token": "same", "positional": "pos", "content": "cont",
                 "mixed": "mix"}
"""Short names written into figure cells."""

_GROUP = re.compile(r"^L(?P<layer>\d+)\.(?P<block>[qkvo])\.h(?P<head>\d+)$")


def counts(names) -> dict[str, int]:
    """``{category: how many}`` of a sequence or array of category names, in sorted order."""
    values, n = np.unique(np.asarray(names, dtype=str), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, n, strict=True)}


def head_category(labels: np.ndarray, layer: int, head: int, block: str = "q", kv_head_of: np.ndarray | None = None) -> str:
    """The category of a query head; for a K/V head (``block`` k or v, ``head`` a kv head) the
    distinct categories of its query heads joined by ``/``."""
    if block in ("k", "v") and kv_head_of is not None:
        readers = np.flatnonzero(np.asarray(kv_head_of) == head)
        return "/".join(dict.fromkeys(str(labels[layer, h]) for h in readers))
    return str(labels[layer, head])


def name_group(group: str, labels: np.ndarray, kv_head_of: np.ndarray | None = None) -> str:
    """A conflict group label ``L1.q.h2`` with its head's category: ``L1.q.h2 (induction)``;
    labels of other groups are returned as they are."""
    match = _GROUP.match(group)
    if match is None:
        return group
    layer, block, head = int(match["layer"]), match["block"], int(match["head"])
    return f"{group} ({head_category(labels, layer, head, block, kv_head_of)})"


def per_category(values: np.ndarray, labels: np.ndarray, block: str = "q", kv_head_of: np.ndarray | None = None) -> dict[str, float | None]:
    """Mean of a ``[layer, heads of block]`` map over the heads of each category (NaN cells
    ignored; None where a category has no finite value). K/V maps are first spread onto the query
    heads that read each kv head, so every category is averaged over query heads."""
    values = np.asarray(values, np.float64)
    if block in ("k", "v") and kv_head_of is not None and values.shape[-1] != labels.shape[-1]:
        values = values[:, np.asarray(kv_head_of)]
    out = {}
    for category in np.unique(labels):
        chosen = values[labels == category]
        chosen = chosen[np.isfinite(chosen)]
        out[str(category)] = float(chosen.mean()) if chosen.size else None
    return out


def annotate(ax, labels: np.ndarray, columns: np.ndarray | None = None) -> None:
    """Write each head's category abbreviation into its cell of a layer × head image on ``ax``;
    ``columns`` picks the query heads shown (e.g. one per kv head), default all."""
    columns = np.arange(labels.shape[1]) if columns is None else np.asarray(columns)
    for layer in range(labels.shape[0]):
        for x, head in enumerate(columns):
            name = str(labels[layer, head])
            ax.text(x, layer, ABBREVIATIONS.get(name, name[:4]), ha="center", va="center", fontsize=6, color="black",
                    bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "alpha": 0.5, "linewidth": 0})


def category_table(rows: Mapping[str, Mapping[str, float | None]], *, what: str, digits: int = 3) -> list[str]:
    """A Markdown table, one row per key of ``rows`` (e.g. a block), one column per category."""
    categories = sorted({c for row in rows.values() for c in row})
    lines = [f"| {what} | " + " | ".join(categories) + " |", "|---|" + "---|" * len(categories)]
    for key, row in rows.items():
        cells = ["–" if row.get(c) is None else f"{row[c]:.{digits}g}" for c in categories]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines
