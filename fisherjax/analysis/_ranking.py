"""Keep the highest scores, exactly: the quantile rule every pruning mask uses.

For ``n`` scores in a group and target sparsity ``s`` the ``k = ⌊s·n + ½⌋`` lowest are pruned,
ties at the threshold broken by position (the earlier of two equal scores goes first), so each
group loses exactly its count. Two implementations give the same masks: one stable sort by
(group, score) for small inputs (many small groups: random draws × layers × heads), and one
``np.partition`` per group with every level's k for large ones (a diagonal of every parameter),
which is O(n) instead of a sort. A diagonal held in many float32 leaves is ranked without joining
them (:func:`pruned_pieces`): the thresholds by an exact pooled selection, the ties walked in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jaxtyping import Array, Bool, Float

from fisherjax.errors import ConfigError, NumericalError
from fisherjax.stats import pooled_order_statistics

SELECTION_ABOVE = 1 << 20
"""Scores above which :func:`keep_highest_each` selects per group instead of sorting."""


def pruned_count(sparsity: float, n: np.ndarray | int) -> np.ndarray:
    """``k = ⌊s·n + ½⌋`` units to prune of ``n`` (round half up)."""
    return np.floor(sparsity * np.asarray(n) + 0.5).astype(np.int64)


def keep_highest(
    scores: Float[Array, " n"], groups: np.ndarray, sparsity: float, *, what: str = "scores"
) -> Bool[Array, " n"]:
    """Keep all but the ``⌊s·n_g + ½⌋`` lowest scores within each group ``g``.

    ``groups`` ``[n]`` int labels (e.g. layer, or one label for a global threshold). Ties are broken
    by position (the earlier of two equal scores is pruned first), so each group loses exactly its
    count. :func:`keep_highest_each` at one sparsity.

    Raises:
      ConfigError: ``s`` outside ``[0, 1]``.
      NumericalError: NaN scores, or scores that are all equal in a group that must be split.
    """
    return keep_highest_each(scores, groups, (sparsity,), what=what)[0]


def keep_highest_each(
    scores: Float[Array, " n"], groups: np.ndarray, sparsities: Sequence[float], *, what: str = "scores"
) -> Bool[np.ndarray, "levels n"]:
    """:func:`keep_highest` at every sparsity in ``sparsities`` from one ranking.

    Small inputs (many small groups: random draws × layers × heads) are ranked with one stable
    ``np.lexsort``; large ones (a diagonal Fisher of every parameter) by one selection per group
    (``np.partition`` with every level's k finds all k-th smallest scores in one O(n) pass), which
    gives the same masks. Scores are ranked in their own dtype (float32 or float64; an upcast
    changes no order), so a diagonal of every parameter is not copied to float64.

    Raises:
      ConfigError: a sparsity outside ``[0, 1]``.
      NumericalError: NaN scores, or scores that are all equal in a group that some level must split.
    """
    _check_sparsities(sparsities)
    scores = np.asarray(scores).reshape(-1)
    if scores.dtype not in (np.float32, np.float64):
        scores = scores.astype(np.float64)
    groups = np.asarray(groups).reshape(-1)
    if np.isnan(scores).any():
        raise NumericalError(f"{what} contain NaN")
    prune = pruned_by_sorting if len(scores) <= SELECTION_ABOVE else pruned_by_selection
    pruned, flat = prune(scores, groups, tuple(sparsities))
    if flat:
        raise _all_equal(what, *flat)
    return ~pruned


def _check_sparsities(sparsities: Sequence[float]) -> None:
    for sparsity in sparsities:
        if not 0.0 <= sparsity <= 1.0:
            raise ConfigError(f"sparsity must be in [0, 1], got {sparsity}")


def _all_equal(what: str, value, size: int, k: int) -> NumericalError:
    """The refusal to split a group of ``size`` equal scores ``value`` by pruning ``k`` of them."""
    return NumericalError(f"{what} are all equal ({value}) within a group of {size}; "
                          f"pruning {k} of them would be arbitrary (an all-zero Fisher has no ranking)")


def pruned_by_sorting(scores: np.ndarray, groups: np.ndarray, sparsities: tuple[float, ...]):
    """``(pruned [levels, n] bool, flat)`` from one stable sort by (group, score); ``flat`` names the
    first group whose scores are all equal but must be split at some level (``()`` if none)."""
    order = np.lexsort((scores, groups))
    _, starts, counts = np.unique(groups[order], return_index=True, return_counts=True)
    k = np.stack([pruned_count(s, counts) for s in sparsities])  # [levels, groups]
    splits = (k > 0) & (k < counts)  # levels that must divide a group
    if splits.any():
        lo = np.minimum.reduceat(scores[order], starts)
        hi = np.maximum.reduceat(scores[order], starts)
        flat = np.flatnonzero(splits.any(0) & (lo == hi))
        if len(flat):
            g = flat[0]
            return None, (lo[g], counts[g], k[splits[:, g], g][0])
    group_of = np.repeat(np.arange(len(counts)), counts)
    position = np.arange(len(order)) - starts[group_of]
    pruned = np.empty((len(sparsities), len(order)), bool)
    pruned[:, order] = position[None] < k[:, group_of]
    return pruned, ()


def pruned_by_selection(scores: np.ndarray, groups: np.ndarray, sparsities: tuple[float, ...]):
    """The same as :func:`pruned_by_sorting`, group by group: the k-th smallest score ``t`` of
    every level by one selection; every score below ``t`` is pruned, and of those equal to ``t``
    the earliest."""
    single = bool(np.all(groups == groups[0])) if len(groups) else True
    members = [None] if single else np.split(*grouped_positions(groups))
    pruned = np.zeros((len(sparsities), len(scores)), bool)
    for index in members:
        group_scores = scores if index is None else scores[index]
        size = len(group_scores)
        ks = [int(pruned_count(s, size)) for s in sparsities]
        splits = [k for k in ks if 0 < k < size]  # levels that must divide the group
        if splits and group_scores.min() == group_scores.max():
            return None, (group_scores[0], size, splits[0])
        interior = sorted({k - 1 for k in splits})
        thresholds = dict(zip(interior, np.partition(group_scores, interior)[interior], strict=True)) if interior else {}
        for level, k in enumerate(ks):
            if k == 0:
                continue
            if k == size:
                below = np.ones(size, bool)
            else:
                below = group_scores < thresholds[k - 1]
                ties = np.flatnonzero(group_scores == thresholds[k - 1])[: k - int(np.count_nonzero(below))]
                below[ties] = True
            if index is None:
                pruned[level] = below
            else:
                pruned[level, index[below]] = True
    return pruned, ()


def pruned_pieces(pieces: Sequence[np.ndarray], sparsities: Sequence[float], *, what: str = "scores") -> list[list[np.ndarray]]:
    """``[level][piece]`` pruned flags of one group whose finite float32 scores are held in
    ``pieces`` (1-D, in the group's order), at every sparsity — the flags :func:`keep_highest_each`
    gives the joined scores (every score below the k-th smallest ``t`` pruned, and of those equal to
    ``t`` the earliest), without joining them: ``t`` by :func:`~fisherjax.stats.pooled_order_statistics`,
    the ties counted piece by piece. Memory: the flags and a piece's comparison.

    Raises:
      ConfigError: a sparsity outside ``[0, 1]``.
      NumericalError: scores that are all equal, and some level must split them.
    """
    _check_sparsities(sparsities)
    size = sum(int(p.size) for p in pieces)
    ks = [int(pruned_count(s, size)) for s in sparsities]
    splits = [k for k in ks if 0 < k < size]
    if splits:
        present = [p for p in pieces if p.size]
        lo, hi = min(float(p.min()) for p in present), max(float(p.max()) for p in present)
        if lo == hi:
            raise _all_equal(what, np.float32(lo), size, splits[0])
    thresholds = {r: np.float32(v) for r, v in pooled_order_statistics(pieces, {k - 1 for k in splits}).items()} if splits else {}
    levels = []
    for k in ks:
        if k in (0, size):
            levels.append([np.full(p.shape, k == size) for p in pieces])
            continue
        t = thresholds[k - 1]
        flags = [p < t for p in pieces]
        need = k - sum(int(np.count_nonzero(f)) for f in flags)
        for p, f in zip(pieces, flags):
            if need <= 0:
                break
            ties = np.flatnonzero(p == t)[:need]
            f[ties] = True
            need -= len(ties)
        levels.append(flags)
    return levels


def grouped_positions(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions ordered by group (increasing within a group), and where each group after the first starts."""
    order = np.argsort(groups, kind="stable")
    starts = np.flatnonzero(np.diff(groups[order])) + 1
    return order, starts


def keep_matrix(scores: np.ndarray, sparsity: float, scope: str, what: str) -> np.ndarray:
    """``keep_highest`` on ``[..., L, U]`` scores: per layer, or over all units; leading axes are independent draws."""
    lead = scores.shape[:-2]
    draws = int(np.prod(lead, dtype=np.int64))
    layers, units = scores.shape[-2:]
    draw_id = np.repeat(np.arange(draws), layers * units)
    layer_id = np.tile(np.repeat(np.arange(layers), units), draws)
    groups = draw_id * layers + layer_id if scope == "layer" else draw_id
    return keep_highest(scores, groups, sparsity, what=what).reshape(scores.shape)
