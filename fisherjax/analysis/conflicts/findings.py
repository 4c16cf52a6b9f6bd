"""What detection reports beyond the arrays: top pairs, clusters of conflicting samples, and
recommendations, each read off a :class:`~.gram.Gram` and the significance arrays.

Shapes: ``cosines``, ``effects``, ``pvalues``, ``qvalues``, ``significant`` are ``[n_a, n_b]``;
``group_tests`` the per-group scope's kept tests (:class:`~.group_tests.GroupTests`, else None).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jaxtyping import Float

from fisherjax.analysis.conflicts.gram import Gram
from fisherjax.analysis.conflicts.group_tests import GroupTests

__all__ = ["ConflictCluster", "ConflictPair", "clusters", "pair_groups", "recommendations", "top_pairs"]

_STATIC = dict(static=True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ConflictPair:
    """One pair: true sample ids, positions, scores, and the groups that pull it apart.

    ``groups``: ``(label, contribution to the cosine, group cosine, group q-value)``, most
    negative contribution first (per-group scope: significant groups first; q NaN otherwise).
    A pytree: the scores are leaves; ids, positions and ``groups`` static metadata.
    """

    sample_a: int = dataclasses.field(metadata=_STATIC)
    sample_b: int = dataclasses.field(metadata=_STATIC)
    index_a: int = dataclasses.field(metadata=_STATIC)
    index_b: int = dataclasses.field(metadata=_STATIC)
    cosine: float
    effect_size: float
    pvalue: float
    qvalue: float
    significant: bool
    groups: tuple[tuple[str, float, float, float], ...] = dataclasses.field(default=(), metadata=_STATIC)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ConflictCluster:
    """A connected component of the conflict graph (edges = significant pairs): its samples of
    A and B (true ids), its number of significant pairs and their mean cosine, and the groups
    pulling it apart ``(label, share of the cluster's net pull)``. A pytree: the id arrays and
    the mean cosine are leaves; ``n_pairs`` and ``groups`` static metadata."""

    samples_a: np.ndarray
    samples_b: np.ndarray
    n_pairs: int = dataclasses.field(metadata=_STATIC)
    mean_cosine: float
    groups: tuple[tuple[str, float], ...] = dataclasses.field(default=(), metadata=_STATIC)


def pair_groups(gram: Gram, i, j, top_groups: int, group_tests: GroupTests | None = None) -> list[tuple]:
    """Groups that pull pairs ``(i, j)`` apart: ``(label, contribution, group cosine, group q)``.

    Ordered by most negative contribution (per-group scope: significant groups first; q NaN
    where above ``alpha`` or, in the overall scope, not tested per group)."""
    if gram.group_dots is None or len(i) == 0:
        return [()] * len(i)
    dots = gram.group_dots[:, i, j].astype(np.float64)  # [G, P]
    contrib = dots / np.sqrt(gram.sq_norms_a[i] * gram.sq_norms_b[j])[None]
    denom = np.sqrt(gram.group_sq_norms_a[:, i].astype(np.float64) * gram.group_sq_norms_b[:, j])
    group_cos = np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)
    if group_tests is not None:
        q, sig = group_tests.at_pairs(i, j)
    else:
        q, sig = np.full(dots.shape, np.nan), np.ones(dots.shape, bool)
    first = ~sig
    order = np.lexsort((contrib, first), axis=0)[:top_groups]  # [top, P]
    labels = np.array(gram.groups.labels, dtype=object)
    cols = np.arange(len(i))[None]
    names, values, cosines, qs = labels[order], contrib[order, cols], group_cos[order, cols], q[order, cols]
    return [
        tuple(zip(names[:, p].tolist(), values[:, p].tolist(), cosines[:, p].tolist(), qs[:, p].tolist()))
        for p in range(len(i))
    ]


def top_pairs(gram: Gram, cosines, effects, pvalues, qvalues, significant, group_tests: GroupTests | None, top_k: int,
              top_groups: int) -> tuple[ConflictPair, ...]:
    """The ``top_k`` pairs: significant pairs first, strongest effect first; then the strongest
    of the rest."""
    order = np.lexsort((-effects.ravel(), ~significant.ravel()))[:top_k]
    i, j = np.unravel_index(order, cosines.shape)
    groups = pair_groups(gram, i, j, top_groups, group_tests)
    return tuple(
        ConflictPair(
            int(gram.sample_ids_a[a]), int(gram.sample_ids_b[b]), int(a), int(b), float(cosines[a, b]),
            float(effects[a, b]), float(pvalues[a, b]), float(qvalues[a, b]), bool(significant[a, b]), g,
        )
        for a, b, g in zip(i, j, groups)
    )


def clusters(gram: Gram, cosines, significant, group_tests: GroupTests | None, max_clusters: int,
             top_groups: int) -> tuple[ConflictCluster, ...]:
    """Connected components of the bipartite graph A ∪ B whose edges are the significant pairs
    (``scipy.sparse.csgraph.connected_components``), largest first, with the groups that pull
    each apart: every group of an edge, or per group, the edge's significant groups."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n_a, n_b = cosines.shape
    i, j = np.nonzero(significant)
    if len(i) == 0:
        return ()
    graph = coo_matrix((np.ones(len(i)), (i, n_a + j)), shape=(n_a + n_b, n_a + n_b))
    _, labels = connected_components(graph, directed=False)
    edge_label = labels[i]
    sizes = np.bincount(edge_label, minlength=labels.max() + 1)
    chosen = np.argsort(-sizes)[: min(max_clusters, int((sizes > 0).sum()))]
    label_names = np.array(gram.groups.labels, dtype=object)
    if gram.group_dots is not None:
        per_cluster = np.zeros((labels.max() + 1, len(gram.groups)))
        if group_tests is not None:  # the significant (group, pair) tests, each on its pair's cluster
            for _, g, gi, gj in group_tests.blocks(group_tests.significant):
                contrib = gram.group_dots[g, gi, gj] / np.sqrt(gram.sq_norms_a[gi] * gram.sq_norms_b[gj])
                np.add.at(per_cluster, (labels[gi], g), -contrib)
        else:
            contrib = gram.group_dots[:, i, j] / np.sqrt(gram.sq_norms_a[i] * gram.sq_norms_b[j])[None]
            np.add.at(per_cluster, edge_label, -contrib.T)  # net pull apart per cluster and group
    out = []
    for c in chosen:
        on_edges = edge_label == c
        groups = ()
        if gram.group_dots is not None:
            pull = np.maximum(per_cluster[c], 0)
            share = pull / max(pull.sum(), 1e-30)
            best = np.argsort(-share)[:top_groups]
            groups = tuple((str(label_names[g]), float(share[g])) for g in best if share[g] > 0)
        out.append(
            ConflictCluster(
                gram.sample_ids_a[np.unique(i[on_edges])], gram.sample_ids_b[np.unique(j[on_edges])], int(on_edges.sum()),
                float(cosines[i[on_edges], j[on_edges]].mean()), groups,
            )
        )
    return tuple(out)


def recommendations(
    gram: Gram, pair_scores: Float[np.ndarray, "n_a n_b"], significant, hotspots, filter_fraction: float, max_hotspots: int = 5
) -> dict:
    """Samples to filter or down-weight and hotspot groups, each with the numbers behind it.

    ``pair_scores [n_a, n_b]``: the cosine of each pair (overall scope) or its most negative
    significant group cosine (per-group scope); reported as ``mean_conflict_cosine``.
    ``hotspots [G]``: net pull apart per group (None without per-group scores). Returns
    ``{"samples": [...], "removal": {"samples", "fraction_of_conflicts_removed"}, "hotspots": [...]}``:
    a greedy cover of the significant pairs by the fewest samples, and the groups with at least
    5 % of the pull.
    """
    cosines = pair_scores
    n_a, n_b = cosines.shape
    n_sig = int(significant.sum())
    samples = []
    for side, ids, degree, other in (("a", gram.sample_ids_a, significant.sum(1), n_b), ("b", gram.sample_ids_b, significant.sum(0), n_a)):
        sig_cos = np.where(significant, cosines, 0.0).sum(1 if side == "a" else 0)
        for k in np.nonzero(degree)[0]:
            fraction = degree[k] / other
            samples.append(
                dict(
                    task=side, sample_id=int(ids[k]), conflicts=int(degree[k]), fraction_of_other_task=float(fraction),
                    mean_conflict_cosine=float(sig_cos[k] / degree[k]), action="filter" if fraction >= filter_fraction else "reweight",
                )
            )
    samples.sort(key=lambda s: -s["conflicts"])
    # Greedy cover: which few samples, removed, take away most significant pairs.
    remaining, removed = significant.copy(), []
    while remaining.any() and len(removed) < max(1, (n_a + n_b) // 10):
        deg_a, deg_b = remaining.sum(1), remaining.sum(0)
        if deg_a.max() >= deg_b.max():
            k = int(deg_a.argmax())
            removed.append(("a", int(gram.sample_ids_a[k])))
            remaining[k, :] = False
        else:
            k = int(deg_b.argmax())
            removed.append(("b", int(gram.sample_ids_b[k])))
            remaining[:, k] = False
        if 1 - remaining.sum() / n_sig >= 0.8:
            break
    hot = []
    if hotspots is not None and n_sig:
        pull = np.maximum(hotspots, 0)
        share = pull / max(pull.sum(), 1e-30)
        for g in np.argsort(-share)[:max_hotspots]:
            if share[g] >= 0.05:
                hot.append(dict(group=gram.groups.labels[g], share=float(share[g]), mean_contribution=float(-hotspots[g] / n_sig)))
    return dict(
        samples=samples,
        removal=dict(
            samples=[dict(task=t, sample_id=s) for t, s in removed],
            fraction_of_conflicts_removed=float(1 - remaining.sum() / n_sig) if n_sig else 0.0,
        ),
        hotspots=hot,
    )
