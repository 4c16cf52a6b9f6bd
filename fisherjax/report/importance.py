"""Phase 2 as a reader sees it: which groups and heads each task's Fisher says matter, with the
bootstrap intervals of the head values, and how two tasks' rankings compare."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from fisherjax.analysis import importance
from fisherjax.errors import DataError
from fisherjax.fisher.state import TaskFisher
from fisherjax.layout import ATTENTION_BLOCKS, ModelLayout, layer_name
from fisherjax.report.base import Section
from fisherjax.report.figures import new_figure


def summary(
    fishers: Mapping[str, TaskFisher] | Sequence[TaskFisher],
    layout: ModelLayout,
    *,
    k: int = 10,
    level: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
    labels: np.ndarray | None = None,
) -> dict:
    """The ``results.json["importance"]`` section.

    Per task: total Fisher, per-layer totals and shares (by role), the top-``k`` groups by global
    and by layer share, head importance ``[L, H]`` / ``[L, H_kv]`` with per-block values and (when
    per-sample group values were kept) its percentile bootstrap interval
    (:func:`~fisherjax.analysis.importance.head_importance_intervals`), and the top-``k`` heads
    with their share of the task's attention Fisher. With ``labels`` (``[L, H]`` behavioural
    categories, :mod:`fisherjax.heads`) every top head carries its ``category`` and ``by_category``
    gives each category's share of the task's attention Fisher (``Σ F_head`` over its heads). Per
    pair of tasks:
    :func:`~fisherjax.analysis.importance.compare_tasks` overall and over attention heads.
    """
    fishers = _by_name(fishers)
    tasks = {}
    for name, fisher in fishers.items():
        table = importance.group_table(fisher, layout)
        totals = importance.layer_totals(table)
        heads = importance.head_importance(fisher, layout)
        total = heads.head.sum()
        head_share = heads.head / total if total > 0 else np.zeros_like(heads.head)
        interval = None
        if fisher.per_sample_groups is not None and fisher.n_samples >= 2:
            interval = importance.head_importance_intervals(fisher, layout, level=level, n_bootstrap=n_bootstrap, seed=seed)
        top_heads = np.argsort(-heads.head, axis=None, kind="stable")[:k]
        top = []
        for layer, h in zip(*np.unravel_index(top_heads, heads.head.shape), strict=True):
            row = {"layer": int(layer), "head": int(h), "kv_head": int(layout.kv_head_of[h]), "value": float(heads.head[layer, h]),
                   "share": float(head_share[layer, h])}
            if interval is not None:
                row["interval"] = [float(interval[0][layer, h]), float(interval[1][layer, h])]
            if labels is not None:
                row["category"] = str(labels[layer, h])
            top.append(row)
        tasks[name] = {
            "total_fisher": float(table.value[table.primary].sum()),
            "n_groups": len(table),
            "layers": {
                "layer": totals.layers.tolist(),
                "name": [layer_name(x) for x in totals.layers.tolist()],
                "total": totals.total.tolist(),
                "share": totals.share.tolist(),
                "roles": list(totals.roles),
                "by_role": totals.by_role.tolist(),
            },
            "top_groups": table.top(k, "global_share").rows(),
            "top_groups_in_layer": table.top(k, "layer_share").rows(),
            "heads": {
                "head": heads.head.tolist(),
                "kv_head": heads.kv_head.tolist(),
                "blocks": {b: v.tolist() for b, v in heads.blocks.items()},
                "interval": None if interval is None else {"level": level, "n_bootstrap": n_bootstrap,
                                                           "low": interval[0].tolist(), "high": interval[1].tolist()},
                "top": top,
            },
        }
        if labels is not None:
            tasks[name]["heads"]["by_category"] = category_shares(head_share, labels)
    comparisons = {}
    for (name_a, fa), (name_b, fb) in itertools.combinations(fishers.items(), 2):
        overall = importance.compare_tasks(fa, fb, layout, k=k, intersect=True)
        attention = importance.compare_tasks(fa, fb, layout, k=k, intersect=True, roles=ATTENTION_BLOCKS)
        comparisons[f"{name_a}|{name_b}"] = {
            "spearman": overall.spearman,
            "spearman_p": overall.spearman_p,
            "n_groups": overall.n_groups,
            "by_role": {r: {"spearman": rho, "n_groups": n} for r, (rho, n) in overall.by_role.items()},
            "attention_spearman": attention.spearman,
            "most_different": overall.differences,
        }
    return {"tasks": tasks, "comparisons": comparisons}


def category_shares(values: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``{category: Σ values over its heads}`` for the categories some head carries, largest first."""
    sums = {str(c): float(values[labels == c].sum()) for c in np.unique(labels)}
    return dict(sorted(sums.items(), key=lambda kv: -kv[1]))


def _by_name(fishers) -> dict[str, TaskFisher]:
    if isinstance(fishers, Mapping):
        return dict(fishers)
    named = {f.task: f for f in fishers}
    if len(named) != len(fishers):
        raise DataError("two TaskFisher values have the same task name")
    return named


def figure(heads: Sequence[importance.HeadImportance] | Mapping[str, importance.HeadImportance], *, blocks: Sequence[str] = (*ATTENTION_BLOCKS, "head")):
    """One row of panels per task, one panel per block (Q, K, V, O, combined head): a layer ×
    head map of the block's Fisher as a share of the task's attention Fisher (``Σ F_head``), so
    colours compare across blocks of a task; K and V panels have one column per kv head."""
    heads = list(heads.values()) if isinstance(heads, Mapping) else list(heads)
    if not heads:
        raise DataError("no tasks to plot")
    rows, cols = len(heads), len(blocks)
    layers = heads[0].head.shape[0]
    fig = new_figure(figsize=(2.6 * cols + 0.6, 0.25 * layers * rows + 1.4 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    for row, task in enumerate(heads):
        total = task.head.sum()
        scale = 1.0 / total if total > 0 else 0.0
        for col, block in enumerate(blocks):
            values = (task.head if block == "head" else task.blocks[block]) * scale
            ax = axes[row, col]
            image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
            fig.colorbar(image, ax=ax, shrink=0.9, format="%.2g")
            ax.set_title(f"{task.task} · {block.upper() if block != 'head' else 'head (Q+K+V+O)'}", fontsize=9)
            ax.set_xlabel("kv head" if block in ("k", "v") else "head", fontsize=8)
            ax.set_ylabel("layer", fontsize=8)
            if values.shape[1] <= 16:
                ax.set_xticks(range(values.shape[1]))
            if values.shape[0] <= 24:
                ax.set_yticks(range(values.shape[0]))
            ax.tick_params(labelsize=7)
    fig.suptitle("Attention Fisher per layer and head (share of the task's attention Fisher)", fontsize=10)
    return fig


def section(fishers: Mapping[str, TaskFisher], layout: ModelLayout, *, k: int = 10, seed: int = 0, rows: int = 5,
            labels: np.ndarray | None = None) -> Section:
    """Phase 2: the summary, the head figure, the top heads of each task (with their category when
    ``labels`` are given) and bootstrap intervals, each category's share, and the tasks' rank
    correlations."""
    data = summary(fishers, layout, k=k, seed=seed, labels=labels)
    heads = {name: importance.head_importance(f, layout) for name, f in fishers.items()}
    category = labels is not None
    lines = ["![head importance]({figure:importance_heads})", "",
             "Most important heads (combined Q/K/V/O Fisher, as a share of the task's attention Fisher):", "",
             "| task | layer | head | kv head |" + (" category |" if category else "") + " share | Fisher (95 % bootstrap interval) |",
             "|---|---|---|---|" + ("---|" if category else "") + "---|---|"]
    for name, task in data["tasks"].items():
        for row in task["heads"]["top"][:rows]:
            interval = f" ({row['interval'][0]:.3g} – {row['interval'][1]:.3g})" if "interval" in row else ""
            named = f" {row['category']} |" if category else ""
            lines.append(f"| {name} | {row['layer']} | {row['head']} | {row['kv_head']} |{named} {row['share']:.3f} | {row['value']:.3g}{interval} |")
    if category:
        lines += ["", "Share of each task's attention Fisher by head category:", "",
                  "| task | " + " | ".join(sorted(np.unique(labels).tolist())) + " |", "|---|" + "---|" * len(np.unique(labels))]
        for name, task in data["tasks"].items():
            shares = task["heads"]["by_category"]
            lines.append(f"| {name} | " + " | ".join(f"{shares[c]:.3f}" for c in sorted(shares)) + " |")
    for pair, c in data["comparisons"].items():
        lines += ["", f"Rank correlation of group importance, {pair.replace('|', ' vs ')}: Spearman "
                  f"{c['spearman']:.3f} over {c['n_groups']} groups (attention heads only: {c['attention_spearman']:.3f})."]
    return Section("importance", "Phase 2 — Importance", data, lines, {"importance_heads": figure(heads)})
