"""Phase 6 as a reader sees it: the ``results.json`` entry of a task pair (:func:`summary`, with
:func:`bootstrap_summary` and :func:`permutation_summary`), its figures (:func:`figures`, one per
block) and its lines of ``report.md`` (:func:`markdown`), all from the values of
:mod:`fisherjax.analysis.qkov`; :func:`section` puts every pair together.

No number is computed here that the results do not already hold, except picking maxima.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

from fisherjax.analysis.qkov import SIGNED_VARIANTS, BootstrapInterval, PermutationResult, QKOVResult, top_conflicts
from fisherjax.report import categories
from fisherjax.report.base import Section
from fisherjax.report.figures import new_figure

__all__ = [
    "TITLE",
    "bootstrap_summary",
    "figure_name",
    "figures",
    "low_damping",
    "markdown",
    "permutation_summary",
    "section",
    "summary",
]

TITLE = "Phase 6 — QK-OV interference"
"""The phase's heading in ``report.md``."""


def _finite_list(x) -> list:
    return np.where(np.isfinite(x), x, 0.0).astype(float).tolist()


def summary(result: QKOVResult, *, top_k: int = 20, labels: np.ndarray | None = None) -> dict:
    """The ``results.json`` entry of one task pair (``qkov.pairs["A|B"]``), JSON-serialisable.

    Keys: ``task_a``, ``task_b``, ``n_a``, ``n_b``, ``dropped_a``, ``dropped_b`` (sample ids with
    no active tokens), ``options`` (the :class:`~fisherjax.analysis.qkov.ScoreOptions`),
    ``kv_head_of``, ``blocks`` (per block: ``layer_head_avg`` ``[layer][query head]``, the
    ``strongest`` cell — most negative for the signed variants (signed, kfac) — its ``slice_size`` and the
    Fisher ``diagnostics`` per cell) and ``top_conflicts`` (the ``top_k`` strongest entries with
    true sample ids, :func:`~fisherjax.analysis.qkov.top_conflicts`). With ``labels`` (``[L, H]``
    head categories, :mod:`fisherjax.heads`) the strongest cells and top conflicts carry their
    head's ``category`` and ``by_category`` gives, per block, the mean ``layer_head_avg`` over the
    query heads of each category.
    """
    blocks = {}
    sign = -1.0 if result.options.variant in SIGNED_VARIANTS else 1.0
    avg_all = np.asarray(result.layer_head_avg)
    for n, block in enumerate(result.blocks):
        avg = avg_all[n]
        layer, head = np.unravel_index(int(np.argmax(sign * avg)), avg.shape) if avg.size else (0, 0)
        blocks[block] = {
            "layer_head_avg": _finite_list(avg),
            "strongest": {"layer": int(layer), "head": int(head), "kv_head": int(result.kv_head_of[head]),
                          "value": float(avg[layer, head]) if avg.size else 0.0},
            "slice_size": int(result.slice_sizes[n]),
            "diagnostics": {name: _finite_list(np.asarray(value)[n]) for name, value in result.diagnostics.as_dict().items()},
        }
        if labels is not None:
            blocks[block]["strongest"]["category"] = categories.head_category(labels, int(layer), int(head))
    top = [dict(c) for c in top_conflicts(result, top_k)]
    named = {}
    if labels is not None:
        for row in top:
            row["category"] = categories.head_category(labels, int(row["layer"]), int(row["head"]))
        named["by_category"] = {block: categories.per_category(avg_all[n], labels) for n, block in enumerate(result.blocks)}
    return {
        "task_a": result.task_a,
        "task_b": result.task_b,
        "n_a": int(np.shape(result.scores)[2]),
        "n_b": int(np.shape(result.scores)[3]),
        "dropped_a": list(result.dropped_a),
        "dropped_b": list(result.dropped_b),
        "options": dataclasses.asdict(result.options),
        "kv_head_of": [int(g) for g in np.asarray(result.kv_head_of)],
        "blocks": blocks,
        "top_conflicts": top,
        **named,
    }


def bootstrap_summary(interval: BootstrapInterval) -> dict:
    """``{"level", "n_bootstrap", "low", "high"}`` of :func:`~fisherjax.analysis.qkov.bootstrap_layer_head_avg`
    (``low`` / ``high``: ``[block][layer][query head]``)."""
    return {"level": interval.level, "n_bootstrap": interval.n_bootstrap,
            "low": np.asarray(interval.low).tolist(), "high": np.asarray(interval.high).tolist()}


def permutation_summary(test: PermutationResult, result: QKOVResult) -> dict:
    """The ``permutation_test`` entry of a pair: the null hypothesis in words, ``alpha``,
    ``n_permutations``, ``observed`` / ``pvalues`` / ``qvalues`` ``[block][layer][query head]``
    and the ``significant_cells`` (block, layer, head, q), from
    :func:`~fisherjax.analysis.qkov.permutation_test` on the pair of ``result``."""
    name_a, name_b = result.task_a, result.task_b
    return {
        "null": f"{name_b} samples and held-out {name_a} samples are exchangeable partners of {name_a}'s samples",
        "alpha": test.alpha,
        "n_permutations": test.n_permutations,
        "observed": np.asarray(test.observed).tolist(),
        "pvalues": np.asarray(test.pvalues).tolist(),
        "qvalues": np.asarray(test.qvalues).tolist(),
        "significant_cells": [
            {"block": result.blocks[b], "layer": int(layer), "head": int(h), "q": float(test.qvalues[b, layer, h])}
            for b, layer, h in np.argwhere(np.asarray(test.significant))
        ],
    }


def figures(result: QKOVResult, labels: np.ndarray | None = None) -> dict:
    """``{block: Figure}`` (pyplot-free, :func:`fisherjax.report.figures.new_figure`): the layer ×
    head map of ``layer_head_avg`` per block — q and o over query heads, k and v over kv heads
    (each kv head once) — diverging around 0 for the signed variant; with ``labels`` each cell
    names its head's category (:func:`fisherjax.report.categories.annotate`)."""
    out = {}
    kv = np.asarray(result.kv_head_of)
    first_of_group = np.r_[True, kv[1:] != kv[:-1]]
    signed = result.options.variant in SIGNED_VARIANTS
    n_a, n_b = np.shape(result.scores)[2:4]
    for n, block in enumerate(result.blocks):
        avg = np.asarray(result.layer_head_avg[n])
        per_kv = block in ("k", "v") and not first_of_group.all()
        if per_kv:
            avg = avg[:, first_of_group]
        n_layers, n_heads = avg.shape
        fig = new_figure(figsize=(max(4.0, 1.6 + 0.45 * n_heads), max(3.0, 1.4 + 0.35 * n_layers)))
        ax = fig.add_subplot()
        if signed:
            bound = float(np.abs(avg).max()) if avg.size else 0.0
            bound = bound or 1.0
            image = ax.imshow(avg, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
        else:
            image = ax.imshow(avg, cmap="viridis", aspect="auto")
        ax.set_xlabel("kv head" if per_kv else "head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        what = f"{result.options.variant}, {result.options.aggregate}"
        ax.set_title(f"QK-OV {block.upper()}: {result.task_b} → {result.task_a}\n({what}, mean over {n_a}×{n_b} pairs)", fontsize=9)
        fig.colorbar(image, ax=ax, label="interference score")
        if labels is not None:
            categories.annotate(ax, labels, np.flatnonzero(first_of_group) if per_kv else None)
        out[block] = fig
    return out


def figure_name(name_a: str, name_b: str, block: str) -> str:
    """``qkov_<B>_on_<A>_<block>``, the file stem of a pair's block figure, with every character of
    the task names outside ``[A-Za-z0-9_.-]`` replaced by ``_`` (task names never become paths
    unchecked)."""
    safe = lambda name: re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "_"  # noqa: E731
    return f"qkov_{safe(name_b)}_on_{safe(name_a)}_{block}"


LOW_DAMPING = 1e-6
"""A K-FAC slice whose damping ``λ`` is below this share of its largest eigenvalue gets a line in
the report (:func:`low_damping`): on the demo such slices' scores came for the most part from
directions of near-zero curvature, and float32 computed them to 1e-4–1e-2 (benchmarks/kfac_accuracy.py)."""


def low_damping(name_a: str, summary: Mapping) -> str | None:
    """For a ``variant="kfac"`` pair, the line saying in how many (block, layer, head) slices the
    damping ``λ`` (``diagnostics.ridge``) is below :data:`LOW_DAMPING` of the largest eigenvalue of
    task A's K-FAC block (``diagnostics.fisher_max``); None for other variants or where none is."""
    if summary.get("options", {}).get("variant") != "kfac" or not summary.get("blocks"):
        return None
    ridge, top = (np.concatenate([np.ravel(b["diagnostics"][key]) for b in summary["blocks"].values()]) for key in ("ridge", "fisher_max"))
    ratio = np.divide(ridge, top, out=np.full(ridge.shape, np.inf), where=top > 0)
    low = ratio < LOW_DAMPING
    if not low.any():
        return None
    return (f"In {int(low.sum())} of {low.size} (block, layer, head) slices the damping λ is below {LOW_DAMPING:g} of the largest "
            f"eigenvalue of {name_a}'s K-FAC block (down to {ratio.min():.0e}): their scores come mostly from directions of "
            "near-zero curvature, weighted by up to 1/λ, so the damping (`--qkov-ridge-rel`) sets their size, and float32 "
            "computes them only to 1e-4–1e-2 of a slice's norm (docs/DECISIONS.md, QK-OV kfac).")


def markdown(name_a: str, name_b: str, summary: Mapping, *, top: int = 5, figure_links: Mapping[str, str] | None = None) -> list[str]:
    """The lines of ``report.md`` for the pair "B on A" (the section heading, :data:`TITLE`, is the
    caller's).

    ``summary``: :func:`summary` of the pair's result, with ``"permutation_test"`` set to
    :func:`permutation_summary` or ``{"skipped": reason}``; or just ``{"skipped": reason}`` when
    the pair's heatmap was not computed (one line saying why). Otherwise: a headline with the
    sample counts and the permutation test's verdict, a table of the ``top`` strongest entries,
    and one figure link per block — ``figure_links`` ``{block: path relative to the report}`` when
    given (``{}``: none), else the placeholder ``{figure:NAME}`` of a
    :class:`~fisherjax.report.Section` with ``NAME`` = :func:`figure_name`.
    """
    if "skipped" in summary:
        return [f"**{name_b} → {name_a}**: skipped: {summary['skipped']}.", ""]
    test = summary.get("permutation_test")
    if test is None:
        verdict = "no permutation test."
    elif "skipped" in test:
        verdict = f"permutation test skipped: {test['skipped']}."
    else:
        verdict = (f"{len(test['significant_cells'])} (block, layer, head) cells interfere more than {name_a}'s own "
                   f"held-out half (BH q ≤ {test.get('alpha', 0.05):g}).")
    lines = [f"**{name_b} → {name_a}** ({summary['n_a']} × {summary['n_b']} samples): {verdict}", ""]
    damping = low_damping(name_a, summary)
    if damping is not None:
        lines += [damping, ""]
    rows = summary.get("top_conflicts", [])[:top]
    if rows:
        named = "category" in rows[0]
        lines += ["| block | layer | head | kv head |" + (" category |" if named else "") + " sample A | sample B | score |",
                  "|---|---|---|---|" + ("---|" if named else "") + "---|---|---|"]
        lines += [f"| {t['block']} | {t['layer']} | {t['head']} | {t['kv_head']} |" + (f" {t['category']} |" if named else "")
                  + f" {t['sample_a']} | {t['sample_b']} | {t['score']:.4g} |" for t in rows]
        lines.append("")
    if "by_category" in summary:
        lines += ["Mean interference per head category:", "",
                  *categories.category_table(summary["by_category"], what="block"), ""]
    if figure_links is None:
        figure_links = {block: f"{{figure:{figure_name(name_a, name_b, block)}}}" for block in summary.get("blocks", {})}
    lines += [f"![{name_b} → {name_a} {block}]({link})" for block, link in figure_links.items()]
    lines.append("")
    return lines


def section(summaries: Mapping[tuple[str, str], Mapping], drawn: Mapping[tuple[str, str], Mapping] | None = None) -> Section:
    """Phase 6 as one :class:`~fisherjax.report.Section`: key ``"qkov"``, json
    ``{"pairs": {"A|B": summary}}``, each pair's :func:`markdown` and, for the pairs in
    ``drawn``, its :func:`figures` (``{block: Figure}``, drawn as soon as the pair's result
    existed, so that its scores need not outlive it) named :func:`figure_name`.

    ``summaries``: ``{(A, B): entry}`` in report order, each entry as :func:`markdown` takes it.
    """
    pairs, lines, named = {}, [], {}
    for (name_a, name_b), entry in summaries.items():
        pairs[f"{name_a}|{name_b}"] = dict(entry)
        figs = (drawn or {}).get((name_a, name_b))
        lines += markdown(name_a, name_b, entry, figure_links=None if figs is not None else {})
        for block, fig in (figs or {}).items():
            named[figure_name(name_a, name_b, block)] = fig
    return Section("qkov", TITLE, {"pairs": pairs}, lines, named)
