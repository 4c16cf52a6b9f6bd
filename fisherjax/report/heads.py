"""Behavioural head categories as a reader sees them: ``heads.json`` / ``results.json["heads"]``
(every score, the labels and thresholds, kv heads), a figure of the scores and categories per
(layer, head), each task's head-mask importance against its Fisher head importance, and the
single-head ablation table.

Numbers come from :mod:`fisherjax.heads`; the Fisher head importance from
:func:`fisherjax.analysis.importance.head_importance`. Nothing else is computed here but ranks.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fisherjax import heads
from fisherjax.report import categories
from fisherjax.report.base import Section
from fisherjax.report.figures import new_figure

TITLE = "Heads — behavioural categories, head-mask importance and ablation"


def task_summary(importance: heads.HeadMaskImportance, fisher_head: np.ndarray, ablation: heads.HeadAblation | None,
                 labels: np.ndarray, *, top: int = 10) -> dict:
    """One task's entry: head-mask importance ``[L, H]`` (mean |∂ℓ/∂ξ| and signed mean), its
    Spearman correlation with the Fisher head importance ``fisher_head`` ``[L, H]``, and the
    ablation (baseline, loss and accuracy ``[L, H]``, the ``top`` heads whose removal costs the
    most accuracy — then loss — each with its category)."""
    entry = {
        "n_samples": importance.n_samples,
        "head_mask_importance": np.asarray(importance.mean_abs).tolist(),
        "head_mask_importance_signed": np.asarray(importance.mean).tolist(),
        "fisher_head_importance": np.asarray(fisher_head).tolist(),
        "spearman_vs_fisher": heads.rank_correlation(importance.mean_abs, fisher_head),
    }
    if ablation is not None:
        drop = ablation.baseline_accuracy - np.asarray(ablation.accuracy)
        rise = np.asarray(ablation.loss) - ablation.baseline_loss
        ablated = np.flatnonzero(np.isfinite(drop.ravel()))  # heads not ablated (NaN) are not ranked
        order = ablated[np.lexsort((-rise.ravel()[ablated], -drop.ravel()[ablated]))][:top]
        worst = []
        for flat in order:
            layer, head = np.unravel_index(int(flat), drop.shape)
            worst.append({"layer": int(layer), "head": int(head), "category": str(labels[layer, head]),
                          "accuracy": float(ablation.accuracy[layer, head]), "loss": float(ablation.loss[layer, head])})
        entry["ablation"] = {"n_samples": ablation.n_samples, "n_heads": int(np.isfinite(drop).sum()), "baseline_accuracy": ablation.baseline_accuracy,
                             "baseline_loss": ablation.baseline_loss, "accuracy": np.asarray(ablation.accuracy).tolist(),
                             "loss": np.asarray(ablation.loss).tolist(), "most_needed": worst}
    return entry


def figure(cats: heads.HeadCategories):
    """One layer × head panel per score (0–1, shared colour scale), every cell naming its
    head's category."""
    fields = [f for f in cats.scores._fields if not f.endswith("_tl")]  # the TransformerLens-normalised copies stay in the JSON
    labels = np.asarray(cats.labels)
    n_layers, n_heads = labels.shape
    cols = min(4, len(fields))
    rows = -(-len(fields) // cols)
    fig = new_figure(figsize=(cols * max(2.6, 0.5 * n_heads + 1.0), rows * max(2.0, 0.35 * n_layers + 1.2)))
    image = None
    axes = []
    for i, name in enumerate(fields):
        ax = fig.add_subplot(rows, cols, i + 1)
        axes.append(ax)
        image = ax.imshow(np.asarray(getattr(cats.scores, name), np.float64), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        categories.annotate(ax, labels)
        ax.set_title(name.replace("_", " "), fontsize=9)
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label="score")
    fig.suptitle("Head scores per layer and head, with each head's category", fontsize=10)
    return fig


def section(cats: heads.HeadCategories, tasks: Mapping[str, dict]) -> Section:
    """The section ``heads``: ``cats`` as :func:`fisherjax.heads.to_json` writes it, ``tasks``
    ``{task: task_summary(...)}``; lines: the categories table, the score figure, the rank
    correlations and the ablation tables."""
    labels = np.asarray(cats.labels)
    data = {**heads.to_json(cats), "tasks": dict(tasks)}
    fields = [f for f in cats.scores._fields if not f.endswith("_tl")]  # the TransformerLens-normalised copies stay in the JSON
    lines = ["Categories: " + ", ".join(f"{n} {c}" for c, n in sorted(categories.counts(labels.ravel()).items(), key=lambda kv: -kv[1]))
             + f" (thresholds in `heads.json`; probes: {cats.n_probe} sequences).", "",
             "| layer | head | kv head | category | " + " | ".join(f.replace("_", " ") for f in fields) + " |",
             "|---|---|---|---|" + "---|" * len(fields)]
    kv = np.asarray(cats.kv_head)
    for layer in range(labels.shape[0]):
        for head in range(labels.shape[1]):
            values = " | ".join(f"{float(np.asarray(getattr(cats.scores, f))[layer, head]):.2f}" for f in fields)
            lines.append(f"| {layer} | {head} | {int(kv[head])} | {labels[layer, head]} | {values} |")
    lines += ["", "![head scores]({figure:heads})", ""]
    for name, entry in tasks.items():
        rho = entry["spearman_vs_fisher"]
        lines.append(f"**{name}**: head-mask importance (E|∂ℓ/∂ξ_h|, {entry['n_samples']} samples) vs Fisher head importance: "
                     f"Spearman {'n/a' if rho is None or not np.isfinite(rho) else f'{rho:.3f}'}.")
        ablation = entry.get("ablation")
        if ablation:
            lines += ["", f"Heads {name} needs most (one head's output zeroed, {ablation['n_heads']} heads with the largest head-mask "
                      f"importance tried; baseline accuracy {ablation['baseline_accuracy']:.3f}, loss {ablation['baseline_loss']:.4f}, "
                      f"{ablation['n_samples']} samples):", "",
                      "| layer | head | category | exact-match accuracy | loss per token |", "|---|---|---|---|---|"]
            lines += [f"| {r['layer']} | {r['head']} | {r['category']} | {r['accuracy']:.3f} | {r['loss']:.4f} |"
                      for r in ablation["most_needed"][:5]]
        lines.append("")
    return Section("heads", TITLE, data, lines, {"heads": figure(cats)})
