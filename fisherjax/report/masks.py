"""Phases 3–4 as a reader sees them: the pruning masks at each sparsity, how much two tasks'
masks overlap (with merge advice), and what pruning half of the heads costs each task."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
from jaxtyping import PyTree

from fisherjax.analysis import masks, overlap
from fisherjax.analysis.masks import Mask
from fisherjax.analysis.overlap import HIGH, LOW, MaskOverlap
from fisherjax.errors import DataError
from fisherjax.fisher.state import TaskFisher
from fisherjax.report import categories
from fisherjax.layout import ModelLayout, layer_name
from fisherjax.report.base import Section
from fisherjax.report.figures import new_figure
from fisherjax.report.labels import short_layer_name


def mask_summary(mask: Mask, layout: ModelLayout) -> dict:
    """One mask as JSON: achieved unit and parameter sparsity, per-layer and per-role pruned counts,
    the score threshold and (heads) the pruned units."""
    stats = masks.sparsity_stats(mask, layout)
    out = {
        "unit": mask.unit,
        "scope": mask.scope,
        "target_sparsity": mask.target_sparsity,
        "achieved_sparsity": mask.sparsity,
        "param_sparsity": mask.param_sparsity,
        "n_units": mask.n_units,
        "n_pruned": mask.n_pruned,
        "layers": {"layer": stats.layers.tolist(), "name": [layer_name(x) for x in stats.layers.tolist()], "pruned": stats.pruned.tolist(),
               "total": stats.total.tolist(), "fraction": stats.fraction.tolist()},
        "by_role": {r: {"pruned": p, "total": t, "fraction": p / t if t else 0.0} for r, (p, t) in stats.by_role.items()},
    }
    if mask.unit != "parameter":
        out["units_pruned_per_layer"] = np.sum([(~k).sum(-1) for k in mask.keep.values()], axis=0).tolist()
        kept_scores = np.concatenate([np.asarray(s)[k] for s, k in zip(mask.scores.values(), mask.keep.values(), strict=True)])
        pruned_scores = np.concatenate([np.asarray(s)[~k] for s, k in zip(mask.scores.values(), mask.keep.values(), strict=True)])
        out["threshold"] = float(pruned_scores.max()) if pruned_scores.size else None
        out["lowest_kept"] = float(kept_scores.min()) if kept_scores.size else None
    if mask.unit in ("head", "kv_head"):
        out["pruned_units"] = np.argwhere(~mask.keep[mask.unit]).tolist()
    return out


def masks_summary(
    fishers: Mapping[str, TaskFisher],
    layout: ModelLayout,
    *,
    sparsities: Sequence[float] = masks.DEFAULT_SPARSITIES,
    units: Sequence[str] = ("head", "kv_head", "neuron"),
    scope: str = "global",
    unstructured: bool = True,
    criterion: str = "fisher",
    params: PyTree | None = None,
    parameter_masks: Mapping[str, Sequence[Mask]] | None = None,
    structured_masks: Mapping[str, Mapping[str, Sequence[Mask]]] | None = None,
) -> dict:
    """Phase 3 section of ``results.json``: per task, unit and sparsity level, the achieved unit and
    parameter sparsity, per-layer and per-role pruned counts, the score threshold, and the pruned
    heads. Unstructured masks are added when the TaskFisher has a diagonal and ``unstructured``;
    pass ``parameter_masks`` (per task, one per sparsity) when they were already built — for a
    diagonal of every parameter they are the expensive part — and likewise ``structured_masks``
    (``{unit: {task: one per sparsity}}``, which then replaces ``units``). ``criterion`` /
    ``params`` as in :func:`~fisherjax.analysis.masks.structured_mask`.
    """
    out: dict = {"sparsities": list(sparsities), "scope": scope, "criterion": criterion,
                 "units": list(structured_masks if structured_masks is not None else units), "tasks": {}}
    for name, fisher in fishers.items():
        per_task = {}
        if structured_masks is not None:
            per_task = {unit: {f"{s:g}": mask_summary(m, layout) for s, m in zip(sparsities, by_task[name], strict=True)}
                        for unit, by_task in structured_masks.items()}
        for unit in units if structured_masks is None else ():
            per_task[unit] = {
                f"{s:g}": mask_summary(masks.structured_mask(fisher, layout, s, unit=unit, scope=scope, criterion=criterion, params=params), layout)
                for s in sparsities
            }
        if unstructured and fisher.diagonal:
            built = (parameter_masks or {}).get(name) or masks.unstructured_masks(fisher, layout, sparsities, scope=scope)
            per_task["parameter"] = {f"{s:g}": mask_summary(m, layout) for s, m in zip(sparsities, built, strict=True)}
        out["tasks"][name] = per_task
    return out


def overlap_json(o: MaskOverlap) -> dict:
    """One :class:`~fisherjax.analysis.overlap.MaskOverlap` as JSON (every field; layers named)."""
    return {
        "task_a": o.task_a,
        "task_b": o.task_b,
        "level": o.level,
        "unit": o.unit,
        "sparsity": o.sparsity,
        "jaccard": o.jaccard,
        "shared": o.shared,
        "only_a": o.only_a,
        "only_b": o.only_b,
        "neither": o.neither,
        "total": o.total,
        "layers": {
            "layer": o.layers.tolist(),
            "name": [layer_name(x) for x in o.layers.tolist()],
            "jaccard": o.layer_jaccard.tolist(),
            "shared": o.layer_shared.tolist(),
            "only_a": o.layer_only_a.tolist(),
            "only_b": o.layer_only_b.tolist(),
            "total": o.layer_total.tolist(),
            "nothing_kept": ((o.layer_shared + o.layer_only_a + o.layer_only_b) == 0).tolist(),
        },
        "advice": {"level": o.advice.level, "text": o.advice.text},
    }


def overlap_summary(mask_lists: Mapping[str, Mask | Sequence[Mask]], layout: ModelLayout | None = None, *, level: str = "auto") -> dict:
    """The overlap part of ``results.json``: for every pair of tasks, the masks at the same
    position compared (:func:`~fisherjax.analysis.overlap.mask_overlap`):
    ``{"thresholds": ..., "pairs": {"A|B": [overlap_json, ...]}}``."""
    lists = {t: ([m] if isinstance(m, Mask) else list(m)) for t, m in mask_lists.items()}
    lengths = {len(v) for v in lists.values()}
    if len(lengths) > 1:
        raise DataError(f"every task needs the same number of masks, got {({t: len(v) for t, v in lists.items()})}")
    pairs = {}
    for (ta, ma), (tb, mb) in itertools.combinations(lists.items(), 2):
        pairs[f"{ta}|{tb}"] = [overlap_json(overlap.mask_overlap(x, y, layout, level=level, names=(ta, tb))) for x, y in zip(ma, mb, strict=True)]
    return {"thresholds": {"high": HIGH, "low": LOW}, "pairs": pairs}


def overlap_figure(overlaps: Sequence[MaskOverlap] | MaskOverlap):
    """Figure: per-layer Jaccard bars (one bar per overlap in each layer group, with the 0.4 / 0.7
    advice thresholds), and beside them the shared / A-only / B-only counts per layer of the first
    overlap as stacked bars. A layer where neither task keeps anything is drawn hatched, "nothing
    kept", not as agreement; the parameters outside the layer stack are "other".
    """
    overlaps = [overlaps] if isinstance(overlaps, MaskOverlap) else list(overlaps)
    if not overlaps:
        raise DataError("no overlaps to plot")
    layers = overlaps[0].layers
    if any(not np.array_equal(o.layers, layers) for o in overlaps):
        raise DataError("overlaps to plot side by side need the same layers")
    labels = [short_layer_name(x) for x in layers]
    x = np.arange(len(layers))
    fig = new_figure(figsize=(max(6.0, 0.55 * len(layers) * (1 + 0.3 * len(overlaps))) + 4.0, 3.6))
    ax_j, ax_c = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(overlaps)
    for i, o in enumerate(overlaps):
        label = f"s={o.sparsity:g}" if o.sparsity is not None else f"{o.unit}"
        if len({(p.unit, p.level) for p in overlaps}) > 1:
            label = f"{o.unit} {label}" if o.sparsity is not None else label
        bars = ax_j.bar(x + (i - (len(overlaps) - 1) / 2) * width, o.layer_jaccard, width, label=f"{label} (J={o.jaccard:.2f})")
        # A layer where neither task keeps anything has J = 1 by convention; mark it rather than let it read as agreement.
        empty = (o.layer_shared + o.layer_only_a + o.layer_only_b) == 0
        if len(layers) * len(overlaps) <= 24:  # values on the bars, so J = 0 reads as 0 rather than as a missing bar
            ax_j.bar_label(bars, labels=["" if e else f"{v:.2f}" for e, v in zip(empty, o.layer_jaccard, strict=True)], fontsize=6, padding=1)
        for xe in (x + (i - (len(overlaps) - 1) / 2) * width)[empty]:
            ax_j.bar(xe, 1.0, width, color="0.85", hatch="//", edgecolor="0.5")
            ax_j.text(xe, 0.5, "nothing kept", rotation=90, ha="center", va="center", fontsize=7)
    ax_j.axhline(HIGH, color="0.3", linestyle="--", linewidth=0.8, label=f"high > {HIGH}")
    ax_j.axhline(LOW, color="0.3", linestyle=":", linewidth=0.8, label=f"low < {LOW}")
    ax_j.set_xticks(x, labels)
    ax_j.set_ylim(0, 1.05)
    ax_j.set_xlabel("layer")
    ax_j.set_ylabel("Jaccard |A∩B| / |A∪B|")
    ax_j.set_title(f"Kept-set overlap per layer: {overlaps[0].task_a} vs {overlaps[0].task_b}", fontsize=10)
    ax_j.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    first = overlaps[0]
    ax_c.bar(x, first.layer_shared, 0.7, label="shared", color="tab:purple")
    ax_c.bar(x, first.layer_only_a, 0.7, bottom=first.layer_shared, label=f"only {first.task_a}", color="tab:blue")
    ax_c.bar(x, first.layer_only_b, 0.7, bottom=first.layer_shared + first.layer_only_a, label=f"only {first.task_b}", color="tab:orange")
    ax_c.set_xticks(x, labels)
    ax_c.set_xlabel("layer")
    what = f"{first.unit}s" if first.level == "unit" else "parameters"
    ax_c.set_ylabel(f"kept {what}")
    title = f"Kept {what}" + (f" at s={first.sparsity:g}" if first.sparsity is not None else "")
    ax_c.set_title(title, fontsize=10)
    ax_c.yaxis.get_major_locator().set_params(integer=True)
    ax_c.legend(fontsize=7)
    return fig


def _mask_table(summary: Mapping) -> list[str]:
    """Markdown lines: every task's masks, one row per unit and sparsity (units and parameters pruned)."""
    lines = [f"Pruning masks, units ranked {'over the whole model' if summary['scope'] == 'global' else 'within each layer'} "
             "by their Fisher:", "", "| task | unit | target sparsity | units pruned | parameters pruned |", "|---|---|---|---|---|"]
    for name, per_task in summary["tasks"].items():
        for unit, by_level in per_task.items():
            lines += [f"| {name} | {unit.replace('_', ' ')} | {level} | {m['n_pruned']} of {m['n_units']} | {m['param_sparsity']:.1%} |"
                      for level, m in by_level.items()]
    return [*lines, ""]


def _overlap_line(o: dict) -> str:
    if o["advice"]["level"] == "none":
        return f"- sparsity {o['sparsity']:g}: {o['advice']['text']}"
    return f"- sparsity {o['sparsity']:g}: Jaccard {o['jaccard']:.3f} — {o['advice']['text']}"


def _samples_of(r: Mapping) -> str:
    """``"32 of 64"``: the samples a task's head-pruning losses were measured on, of those with a
    predicted token (results written before the subsample existed: all of them)."""
    if "n_samples" not in r:
        return "all"
    return f"{r['n_samples']} of {r['n_eligible']}"


def _subsample_words(experiment: Mapping) -> str:
    """How the head-pruning experiment's samples were chosen, in words."""
    per_task = "; ".join(f"{name}: {_samples_of(r)} samples" for name, r in experiment["tasks"].items())
    limit = experiment.get("samples")
    rule = "every sample" if limit is None else f"at most {limit} samples per task, drawn with seed {experiment['seed']}"
    return f"{rule}; {per_task}"


def section(
    fishers: Mapping[str, TaskFisher],
    layout: ModelLayout,
    *,
    sparsities: Sequence[float],
    head_masks: Mapping[str, Sequence[Mask]] | None = None,
    parameter_masks: Mapping[str, Sequence[Mask]] | None,
    experiment: Mapping | None,
    labels: np.ndarray | None = None,
    unit_masks: Mapping[str, Mapping[str, Sequence[Mask]]] | None = None,
    scope: str = "global",
) -> Section:
    """Phases 3–4: every task's masks of each structured unit (``unit_masks``: ``{unit: {task: one
    mask per sparsity}}``, ranked at ``scope``; ``head_masks`` is short for ``{"head": head_masks}``)
    and unstructured masks, their overlaps between tasks with merge advice, the overlap figure of
    the first two tasks (head masks, else the first unit's), and the head-pruning experiment's table
    (:mod:`fisherjax.analysis.experiments`). With ``labels`` (``[L, H]`` head categories,
    :mod:`fisherjax.heads`): how many heads of each category each task's Fisher mask prunes, and the
    experiment's masks by category (its ``loss_extra``)."""
    if unit_masks is None:
        if head_masks is None:
            raise DataError("the masks section needs unit_masks (or head_masks)")
        unit_masks = {"head": head_masks}
    data = {"masks": masks_summary(fishers, layout, sparsities=sparsities, scope=scope, parameter_masks=parameter_masks,
                                   structured_masks=unit_masks)}
    data["overlap"] = {unit: overlap_summary(by_task, layout) for unit, by_task in unit_masks.items()}
    if parameter_masks is not None:
        data["overlap"]["parameter"] = overlap_summary(parameter_masks, layout)
    lines, figures = _mask_table(data["masks"]), {}
    for level, summary in data["overlap"].items():
        for pair, overlaps in summary["pairs"].items():
            lines += [f"**{pair.replace('|', ' vs ')}, {level} masks**", ""]
            lines += [_overlap_line(o) for o in overlaps]
            lines.append("")
    if len(fishers) >= 2:
        names = list(fishers)[:2]
        unit = "head" if "head" in unit_masks else next(iter(unit_masks))
        drawn = unit_masks[unit]
        pair_overlaps = [overlap.mask_overlap(a, b, layout, names=(names[0], names[1])) for a, b in zip(drawn[names[0]], drawn[names[1]], strict=True)]
        key = f"overlap_{unit}s"
        figures[key] = overlap_figure(pair_overlaps)
        lines += [f"![{unit.replace('_', ' ')}-mask overlap]({{figure:{key}}})", ""]
    if experiment is not None:
        data["head_pruning"] = {**experiment, "subsample": _subsample_words(experiment)}
        scope = "each layer's" if experiment["scope"] == "layer" else "all"
        lines += [f"Loss per token after pruning {experiment['sparsity']:.0%} of {scope} heads (Fisher-guided vs "
                  f"{experiment['n_random']} random draws of as many heads), on a fixed random subsample of each task "
                  f"({_subsample_words(experiment)}):", "",
                  "| task | samples | before | Fisher mask | random mean ± sd | random masks worse |", "|---|---|---|---|---|---|"]
        for name, r in experiment["tasks"].items():
            lines.append(f"| {name} | {_samples_of(r)} | {r['loss_before']:.4f} | {r['loss_fisher']:.4f} "
                         f"| {r['loss_random_mean']:.4f} ± {r['loss_random_sd']:.4f} | {r['fraction_random_worse']:.0%} |")
        if labels is not None and experiment.get("unit") == "head":
            pruned = {name: categories.counts([labels[layer, head] for layer, head in r["pruned"]])
                      for name, r in experiment["tasks"].items()}
            data["head_pruning"]["pruned_by_category"] = pruned
            every = categories.counts(labels.ravel())
            lines += ["", "Heads the Fisher mask prunes, by category (of all heads of the category):", "",
                      "| task | " + " | ".join(every) + " |", "|---|" + "---|" * len(every)]
            lines += [f"| {name} | " + " | ".join(f"{counts.get(c, 0)} of {n}" for c, n in every.items()) + " |"
                      for name, counts in pruned.items()]
        extra = list(next(iter(experiment["tasks"].values())).get("loss_extra", {}))
        if extra:
            lines += ["", "Loss per token with the heads of a category removed, or only them kept (same subsample):", "",
                      "| task | before | " + " | ".join(extra) + " |", "|---|---|" + "---|" * len(extra)]
            lines += [f"| {name} | {r['loss_before']:.4f} | " + " | ".join(f"{r['loss_extra'][e]:.4f}" for e in extra) + " |"
                      for name, r in experiment["tasks"].items()]
    return Section("masks", "Phases 3–4 — Pruning masks and their overlap", data, lines, figures)
