"""Phase 5 as a reader sees it: the ``conflicts.json`` entry of a task pair (:func:`summary`),
its figure (:func:`figure`) and its lines of ``report.md`` (:func:`markdown`), all from a
:class:`~fisherjax.analysis.conflicts.ConflictReport` (:func:`pair_part`); :func:`section_of` puts
every pair together.

No number is computed here that the report does not already hold, except the descriptive
statistics of the arrays (mean, spread and median of the cosines).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np
from matplotlib.figure import Figure

from fisherjax.analysis.conflicts import ORTHOGONAL_EFFECT, ConflictPair, ConflictReport, head_map
from fisherjax.report import categories
from fisherjax.report.base import Section
from fisherjax.report.figures import new_figure

__all__ = ["TITLE", "PairPart", "effect_words", "figure", "figure_name", "markdown", "pair_part", "section", "section_of", "summary"]

TITLE = "Phase 5 — Sample conflicts"
"""The phase's heading in ``report.md``."""


def summary(report: ConflictReport, labels: np.ndarray | None = None, kv_head_of: np.ndarray | None = None) -> dict:
    """The ``conflicts.json`` entry of one task pair (``pairs["A|B"]``), JSON-serialisable.

    Keys: ``task_a``, ``task_b``, ``n_samples_a``, ``n_samples_b``, ``n_pairs``,
    ``n_significant``, ``group_tests`` (per-group scope: ``tested``, ``kept`` with ``p ≤ alpha``,
    ``significant`` (group, pair) tests), ``settings``, ``null`` (the null hypothesis in words), ``cosine`` (mean,
    std, min, max of the tested cosines and of each side's within-task null), ``top_pairs`` (true
    sample ids, scores and the groups behind each), ``clusters``, ``head_map`` (``blocks``;
    ``values`` one ``[layers][heads of the block]`` list per block — k and v have ``kv_heads``
    columns under grouped-query attention — null where a head has no value; ``over``: what the
    values average) and ``recommendations``. With ``labels`` (``[L, H]`` head categories,
    :mod:`fisherjax.heads`; ``kv_head_of`` names K/V heads by their query heads) every head group
    label carries its category (``L1.q.h2 (induction)``) and ``head_map["by_category"]`` gives, per
    block, the mean net conflict over the heads of each category.
    """
    cos = report.cosines
    maps = head_map(report)
    settings = report.settings
    null_doc = (
        "H0 for pair (i, j): b_j is exchangeable with task A's own samples as far as its cosine with a_i goes "
        "(reference='a'; 'b' swaps the roles, 'both' takes the larger p-value, an external split replaces A's samples). "
        f"One-sided (conflict = lower cosine), tested on {'each parameter group' if settings['scope'] == 'groups' else 'the whole gradient'}; "
        f"test {settings['null']!r}{' with a generalized Pareto tail' if settings.get('tail') else ''}; "
        f"FDR by {settings['fdr_method'].upper()} over all tests; significant = q <= {settings['alpha']} and effect > {settings['min_effect_size']:.3f}."
    )
    entry = dict(
        task_a=report.task_a,
        task_b=report.task_b,
        n_samples_a=int(len(report.sample_ids_a)),
        n_samples_b=int(len(report.sample_ids_b)),
        n_pairs=int(cos.size),
        n_significant=report.n_significant,
        settings={k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in settings.items()},
        null=null_doc,
        cosine=dict(
            mean=float(cos.mean()), std=float(cos.std()), min=float(cos.min()), max=float(cos.max()),
            null_mean={k: float(v.mean()) for k, v in report.null_cosines.items() if v.size},
            null_std={k: float(v.std()) for k, v in report.null_cosines.items() if v.size},
        ),
        top_pairs=[
            dict(
                sample_a=p.sample_a, sample_b=p.sample_b, cosine=p.cosine, effect_size=p.effect_size, pvalue=p.pvalue,
                qvalue=p.qvalue, significant=p.significant,
                groups=[
                    dict(group=g, contribution=c, group_cosine=gc, **({} if np.isnan(q) else dict(group_qvalue=q)))
                    for g, c, gc, q in p.groups
                ],
            )
            for p in report.top_pairs
        ],
        clusters=[
            dict(
                samples_a=np.asarray(c.samples_a).tolist(), samples_b=np.asarray(c.samples_b).tolist(), n_pairs=c.n_pairs,
                mean_cosine=float(c.mean_cosine), groups=[dict(group=g, share=s) for g, s in c.groups],
            )
            for c in report.clusters
        ],
        head_map=dict(
            blocks=list(maps), values=[np.where(np.isnan(m), None, m).tolist() for m in maps.values()],
            over="significant pairs" if report.n_significant else f"top {len(report.top_pairs)} pairs (none significant)",
        ),
        recommendations=_plain(report.recommendations),
    )
    if report.group_tests is not None:  # per group: how many (group, pair) tests, how many kept (p ≤ alpha), how many conflicts
        tests = report.group_tests
        entry["group_tests"] = dict(tested=tests.tested, kept=int(len(tests.index)), significant=tests.n_significant)
    if labels is None:
        return entry
    name = lambda group: categories.name_group(group, labels, kv_head_of)  # noqa: E731
    for pair in entry["top_pairs"]:
        for group in pair["groups"]:
            group["group"] = name(group["group"])
    for cluster in entry["clusters"]:
        for group in cluster["groups"]:
            group["group"] = name(group["group"])
    for hot in entry["recommendations"].get("hotspots", []):
        hot["group"] = name(hot["group"])
    entry["head_map"]["by_category"] = {block: categories.per_category(m, labels, block, kv_head_of) for block, m in maps.items()}
    return entry


def _plain(value):
    """Nested mappings and sequences as plain dicts and lists (for JSON)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def figure(report: ConflictReport, labels: np.ndarray | None = None, kv_head_of: np.ndarray | None = None) -> Figure:
    """A :class:`matplotlib.figure.Figure` (pyplot-free, :func:`fisherjax.report.figures.new_figure`):
    the histogram of the tested A × B cosines against the within-task null (significant pairs
    as a rug), and per attention block a layer × head map of mean net conflict
    (:func:`~fisherjax.analysis.conflicts.head_map`; k and v with their own — kv — head count).

    Overall scope: pair cosines. Per-group scope: the cosines of the hottest group (the one
    pulling the significant pairs apart most), against that group's within-task cosines.
    """
    maps = head_map(report)
    label = "cosine"
    values, nulls, marked = report.cosines, dict(report.null_cosines), report.significant
    if report.group_tests is not None and report.n_significant:
        hot = int(np.argmax(report.hotspots))
        g = report.gram
        denom = np.sqrt(g.group_sq_norms_a[hot][:, None].astype(np.float64) * g.group_sq_norms_b[hot][None, :])
        values = np.divide(g.group_dots[hot], denom, out=np.zeros(denom.shape), where=denom > 0)
        nulls = dict(report.hot_null_cosines)
        marked = report.group_tests.significant_map(hot)
        label = f"cosine on {report.groups.labels[hot]}"
    values = values.ravel()
    n_maps = len(maps)
    fig = new_figure(figsize=(6.0 + 2.6 * n_maps, 4.2))
    grid = fig.add_gridspec(1, 1 + n_maps, width_ratios=[2.2] + [1] * n_maps)
    ax = fig.add_subplot(grid[0, 0])
    everything = np.concatenate([values] + [v for v in nulls.values() if v.size])
    bins = np.linspace(everything.min(), everything.max(), 60)
    ax.hist(values, bins=bins, density=True, alpha=0.55, color="tab:blue", label=f"{report.task_a} × {report.task_b} ({values.size} pairs)")
    colors = {"a": "tab:green", "b": "tab:orange", "reference": "tab:green"}
    for key, null in nulls.items():
        name = {"a": f"within {report.task_a}", "b": f"within {report.task_b}"}.get(key, "reference split")
        ax.hist(null, bins=bins, density=True, histtype="step", lw=1.6, color=colors[key], label=f"null: {name}")
    sig = values[marked.ravel()]
    if sig.size:
        ax.plot(sig, np.zeros_like(sig), "|", color="tab:red", ms=14, mew=1.2, label=f"significant ({sig.size}, q ≤ {report.settings['alpha']})")
    whitened = "whitened " if report.settings["whiten"] else ""
    ax.set_xlabel(f"{label} of {whitened}per-sample gradients")
    ax.set_ylabel("density")
    ax.set_title(f"Sample conflicts: {report.task_a} vs {report.task_b}")
    ax.legend(fontsize=7, loc="upper right")
    if n_maps:
        finite = np.concatenate([m[np.isfinite(m)] for m in maps.values()])
        bound = max(float(np.abs(finite).max()) if finite.size else 0.0, 1e-12)
        most_heads = max(m.shape[1] for m in maps.values())
        axes = [fig.add_subplot(grid[0, 1 + b]) for b in range(n_maps)]
        for b, ((block, block_map), axm) in enumerate(zip(maps.items(), axes)):
            image = axm.imshow(block_map, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
            axm.set_title(block if report.n_significant else f"{block}: top {len(report.top_pairs)} pairs, none significant", fontsize=8)
            axm.set_xlabel("kv head" if block in ("k", "v") and block_map.shape[1] < most_heads else "head")
            axm.set_xticks(range(block_map.shape[1]))
            axm.set_yticks(range(block_map.shape[0]))
            if labels is not None:  # each cell names its head's category (a kv head: its first query head's)
                kv = np.asarray(kv_head_of) if kv_head_of is not None else np.arange(labels.shape[1])
                per_kv = block in ("k", "v") and block_map.shape[1] != labels.shape[1]
                categories.annotate(axm, labels, np.array([np.flatnonzero(kv == j)[0] for j in range(block_map.shape[1])]) if per_kv else None)
            if b == 0:
                axm.set_ylabel("layer")
            else:
                axm.set_yticklabels([])
        fig.colorbar(image, ax=axes, shrink=0.85, label="mean −contribution to the cosine\nper pair (red = pulls apart)")
    return fig


def figure_name(report: ConflictReport) -> str:
    """``conflicts_<A>_<B>``, the figure's file stem, with every character of the task names
    outside ``[A-Za-z0-9_.-]`` replaced by ``_`` (task names never become paths unchecked)."""
    safe = lambda name: re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "_"  # noqa: E731
    return f"conflicts_{safe(report.task_a)}_{safe(report.task_b)}"


def effect_words(effect: float) -> str:
    """What an effect size ``‖ĝ_A − ĝ_B‖ / 2`` means, in words: 0 same direction, 1/√2 ≈ 0.71
    orthogonal, 1 opposite."""
    if effect > ORTHOGONAL_EFFECT:
        return f"> {ORTHOGONAL_EFFECT:.2f}: pointing apart"
    return f"≤ {ORTHOGONAL_EFFECT:.2f}: not pointing apart"


def _pair_text(pair: ConflictPair, name=str, no_q: str = "untested") -> str:
    q = f"q {pair.qvalue:.3g}" if np.isfinite(pair.qvalue) else f"q {no_q}"
    text = f"cosine {pair.cosine:+.3f}, effect size {pair.effect_size:.3f} ({effect_words(pair.effect_size)}), {q}"
    groups = ", ".join(f"{name(label)} ({contribution:+.3f})" for label, contribution, *_ in pair.groups[:3])
    return f"{text}; most of it from {groups}" if groups else text


def markdown(report: ConflictReport, summary: Mapping, *, figure_link: str | None = None, top: int = 5,
             labels: np.ndarray | None = None, kv_head_of: np.ndarray | None = None) -> list[str]:
    """The lines of ``report.md`` for one task pair (the section heading, :data:`TITLE`, is the
    caller's): a headline with the number of pairs, significant (pair, head) conflicts and the
    median cross-task cosine; what an effect size means; the ``top`` strongest pairs with the
    groups behind them; the samples to filter or down-weight; the hotspot groups; and, when
    ``figure`` is given (a path relative to the report, or a ``{figure:NAME}`` placeholder of a
    :class:`~fisherjax.report.Section`), the figure.

    ``summary``: :func:`summary` of the same report (its recommendations are listed, and its
    ``head_map["by_category"]`` as a table when present); ``labels`` / ``kv_head_of``: the heads'
    categories, named next to every head group.
    """
    name = (lambda group: categories.name_group(group, labels, kv_head_of)) if labels is not None else str  # noqa: E731
    name_a, name_b = report.task_a, report.task_b
    n_sig = report.group_tests.n_significant if report.group_tests is not None else report.n_significant
    unit = "(pair, head)" if report.group_tests is not None else "pair"
    min_effect = report.settings.get("min_effect_size", ORTHOGONAL_EFFECT)
    # per group, a q-value above alpha is not resolved: a pair without one has every group above it
    no_q = f"> {report.settings.get('alpha', 0.05):g} on every group" if report.group_tests is not None else "untested"
    lines = [
        f"**{name_a} vs {name_b}**: {report.cosines.size} sample pairs, {n_sig} significant {unit} "
        f"conflicts at FDR {report.settings.get('alpha', 0.05)}; median cross-task cosine "
        f"{float(np.median(report.cosines)):.3f}.",
        "",
        f"Effect size = ‖ĝ_A − ĝ_B‖ / 2 of the two unit (whitened) gradients: 0 for the same direction, "
        f"1/√2 ≈ {ORTHOGONAL_EFFECT:.2f} for orthogonal gradients, 1 for opposite ones; a conflict needs an effect size "
        f"above {min_effect:.2f}.",
        "",
    ]
    for pair in report.top_pairs[:top]:
        lines.append(f"- {name_a} sample {pair.sample_a} vs {name_b} sample {pair.sample_b}: "
                     + _pair_text(pair, name, no_q))
    advice = summary.get("recommendations", {})
    which = "mean cosine on the conflicting groups" if report.group_tests is not None else "mean cosine"
    for sample in advice.get("samples", [])[:top]:
        side = name_a if sample.get("task") == "a" else name_b
        lines.append(f"- {sample.get('action', 'review')} {side} sample {sample.get('sample_id')}: "
                     f"in {sample.get('conflicts')} significant conflicts ({which} {sample.get('mean_conflict_cosine', float('nan')):.3f})")
    for hot in advice.get("hotspots", []):
        lines.append(f"- hotspot {hot['group']}: {100 * hot['share']:.0f} % of the conflict pull")
    by_category = summary.get("head_map", {}).get("by_category")
    if by_category:
        lines += ["", "Mean net conflict per head category (positive = pulls the tasks apart):", "",
                  *categories.category_table(by_category, what="block")]
    if figure_link is not None:
        lines += ["", f"![conflicts {name_a} vs {name_b}]({figure_link})"]
    lines.append("")
    return lines


class PairPart(NamedTuple):
    """One task pair's share of the section: its ``conflicts.json`` entry under ``key``
    (``"A|B"``), its ``report.md`` lines and its figures."""

    key: str
    entry: dict
    lines: list[str]
    figures: dict[str, Figure]


def pair_part(name_a: str, name_b: str, report: ConflictReport | None = None, *, skipped: str | None = None,
              note: str | None = None, labels: np.ndarray | None = None, kv_head_of: np.ndarray | None = None) -> PairPart:
    """What a pair adds to the section: its :func:`summary` (with ``"scope_note"``: ``note``, why it
    was tested as it was, and that line before its own), :func:`markdown` and :func:`figure`
    (named :func:`figure_name`); a ``skipped`` pair gets ``{"skipped": reason}`` and one line
    saying why. Made as soon as the pair's report exists, so the report (its ``[G, n_a, n_b]``
    arrays) need not outlive it."""
    key = f"{name_a}|{name_b}"
    if skipped is not None:
        return PairPart(key, {"skipped": skipped}, [f"**{name_a} × {name_b}**: skipped: {skipped}.", ""], {})
    entry = summary(report, labels, kv_head_of)
    lines = []
    if note:
        entry["scope_note"] = note
        lines += [f"**{name_a} × {name_b}**: {note}.", ""]
    name = figure_name(report)
    lines += markdown(report, entry, figure_link=f"{{figure:{name}}}", labels=labels, kv_head_of=kv_head_of)
    return PairPart(key, entry, lines, {name: figure(report, labels, kv_head_of)})


def section_of(parts: Iterable[PairPart]) -> Section:
    """Phase 5 as one :class:`~fisherjax.report.Section` from its pairs' :func:`pair_part`: key
    ``"conflicts"``, json ``{"pairs": {"A|B": entry}}`` (the content of ``conflicts.json``), the
    pairs' lines and figures in order."""
    parts = list(parts)
    lines = [line for part in parts for line in part.lines]
    figures = {name: fig for part in parts for name, fig in part.figures.items()}
    return Section("conflicts", TITLE, {"pairs": {part.key: part.entry for part in parts}}, lines, figures)


def section(reports: Mapping[tuple[str, str], ConflictReport], labels: np.ndarray | None = None,
            kv_head_of: np.ndarray | None = None, skipped: Mapping[tuple[str, str], str] | None = None,
            notes: Mapping[tuple[str, str], str] | None = None) -> Section:
    """:func:`section_of` the ``skipped`` pairs (``{(A, B): reason}``), then the ``reports`` with
    their ``notes``."""
    parts = [pair_part(a, b, skipped=reason) for (a, b), reason in (skipped or {}).items()]
    parts += [pair_part(a, b, report, note=(notes or {}).get((a, b)), labels=labels, kv_head_of=kv_head_of)
              for (a, b), report in reports.items()]
    return section_of(parts)
