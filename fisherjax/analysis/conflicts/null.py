"""Significance of a cross-task cosine: p-values against the tasks' own within-task cosines.

Null hypothesis for the pair ``(i, j)`` (reference side ``"a"``): *b_j pulls against a_i no more
than a sample of task A itself would*, i.e. ``b_j`` is exchangeable with A's other samples as far
as its cosine with ``a_i`` goes (it holds when both tasks draw their samples i.i.d. from one
distribution, as two random halves of one task do). The alternative is one-sided: ``cos_ij``
lower than the within-task cosines. The reference distribution of row ``i`` is
``{cos(a_i, a_k): k ≠ i}`` (or the cosines with a held-out *reference split* of task A). Three
tests match this null (``null=``):

* ``"pooled"`` (default): standardise ``z_ij = (cos_ij − med_i) / mad_i`` by the median and
  median absolute deviation of row ``i``'s reference cosines (robust, so a coherent minority of
  A that shares a direction does not inflate the scale), and compare against the pooled
  empirical null of the reference's own standardised cosines ``z_kl`` (median and MAD of row
  ``k`` recomputed without ``l``, so the held-out partner plays the role of ``b_j``):
  ``p = (1 + #{z_kl ≤ z_ij}) / (1 + N)``. Assumes the standardised within-task cosines share
  one distribution across rows (and groups, for the per-group scope): a location-scale family
  per sample; no shape assumption. The empirical p-value cannot go below ``1 / (1 + N)`` with
  ``N ≈ n²`` while BH needs ``α k / (n_a n_b)`` for ``k`` discoveries, so it certifies only
  conflicts that come at least about ``1/α`` at a time (a cluster of samples, a head) — the
  price of calibration: a task can hold a few idiosyncratic pairs far out in the tail that no
  location-scale model of the other rows predicts. ``tail="gpd"`` (opt-in) extends the far lower
  tail with a generalized Pareto fit to the null's 250 lowest values (Knijnenburg et al. 2009,
  shape ≥ 0, so a fitted bounded tail falls back to the heavier exponential) and can then
  certify single pairs; it was calibrated on synthetic tasks but not on random-token GPT-2
  gradients, where one such pair gave a false discovery in 11% of half-splits at α = 0.05.
* ``"normal"``: mean and standard deviation with a Student-t predictive tail,
  ``p = F_{m−1}((cos_ij − μ_i) / (s_i sqrt(1 + 1/m)))``; exact when row ``i``'s reference cosines
  are normal, no guarantee otherwise (on the random-token GPT-2 gradients: a false discovery in
  20% of half-splits at α = 0.05).
* ``"row"``: the exact rank test ``p = (1 + #{k: cos(a_i, a_k) ≤ cos_ij}) / (1 + m)``; valid by
  exchangeability alone, even conditionally on the data under random splits, but its resolution
  ``1/(1 + m)`` rarely survives FDR over many pairs.

Reference side ``"b"`` swaps the roles (a_i exchangeable with B's samples around b_j) and
``"both"`` takes ``max(p_a, p_b)``, valid under either null (:func:`~.detect.detect` combines
them). ``tests/test_conflicts.py`` checks the rate of runs with any false discovery on many random
half-splits of one task (synthetic with clusters, heavy tails and uneven norms, and through a
real model) and the power on planted conflicts.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float

from fisherjax.errors import DataError
from fisherjax.settings import check_choice

__all__ = ["NULLS", "TAILS", "conflict_pvalues", "reference_samples_needed"]

NULLS = ("pooled", "normal", "row")
"""The null tests (module docstring)."""

TAILS = (None, "gpd")
"""The pooled null's far tail: purely empirical (None) or a generalized Pareto fit."""

CHUNK_VALUES = 1 << 20
"""Values per chunk of rows where the pooled null works row by row: the leave-one-out medians
(:func:`_leave_one_out_median_mad`, whose sorts hold about a dozen temporaries of up to three times
a chunk: ~300 MB of float64 and int64) and the tested values' p-values (:func:`_pooled_pvalues`).
All rows at once — every group and sample pair of a per-group test — were most of the tests' peak
memory (RESULTS.md, twenty-third session)."""


def reference_samples_needed(null: str) -> int:
    """Reference samples per row the ``null`` needs: 1 for ``"row"``, 2 for ``"normal"`` (a
    spread), 3 for ``"pooled"`` (a standardised cosine)."""
    check_choice("conflict_pvalues", "null", null, NULLS)
    return {"row": 1, "normal": 2, "pooled": 3}[null]


def conflict_pvalues(
    test: Float[np.ndarray, "*groups n m"],
    reference: Float[np.ndarray, "*groups n r"],
    *,
    exclude_self: bool = False,
    null: str = "pooled",
    tail: str | None = None,
    tail_size: int = 250,
) -> Float[np.ndarray, "*groups n m"]:
    """One-sided p-values that ``test[..., i, j]`` is lower than row ``i``'s reference cosines.

    ``test[..., i, j] = cos(a_i, b_j)``; ``reference[..., i, l] = cos(a_i, r_l)`` for the
    reference samples (``exclude_self``: the reference is task A itself, ``r = n``, and the
    diagonal ``cos(a_i, a_i) = 1`` is left out). Leading axes (parameter groups) are tested
    alongside; the ``"pooled"`` null pools the standardised reference cosines over them too.
    Null: ``b_j`` is exchangeable with the reference samples given ``a_i``; the three tests
    (``null``, one of :data:`NULLS`) are described in the module docstring; ``tail="gpd"``
    extends the pooled null's far lower tail with a generalized Pareto fit, ``None`` (default)
    keeps it purely empirical. NaN test entries, and rows whose reference cosines are NaN or have
    no spread (a zero or duplicated gradient), get NaN p-values (untested).
    """
    check_choice("conflict_pvalues", "null", null, NULLS)
    check_choice("conflict_pvalues", "tail", tail, TAILS)
    test = np.asarray(test, np.float64)
    ref = np.asarray(reference, np.float64)
    n = test.shape[-2]
    if ref.shape[:-1] != test.shape[:-1]:
        raise DataError(f"reference cosines have shape {ref.shape}, the tested ones {test.shape}: rows must match")
    if exclude_self:
        if ref.shape[-1] != n:
            raise DataError("a within-task reference must be square")
        ref = ref[..., ~np.eye(n, dtype=bool)].reshape(*ref.shape[:-1], n - 1)
    m = ref.shape[-1]
    need = reference_samples_needed(null)
    if m < need:
        raise DataError(
            f"the {null!r} null needs at least {need} reference samples per row, got {m}"
            + (f" (a task with fewer than {need + 1} samples cannot be its own reference)" if exclude_self else "")
        )
    row_ok = np.isfinite(ref).all(-1)
    ref = np.where(row_ok[..., None], ref, 0.0)
    tested = np.isfinite(test) & row_ok[..., None]
    if null != "pooled":  # the pooled null's chunks read untested entries as they are: their p-values are masked below
        test = np.where(tested, test, 0.0)
    if null == "row":
        p = _rank_pvalues(test, ref)
    elif null == "normal":
        from scipy import stats

        mean, var = ref.mean(-1), ref.var(-1, ddof=1)
        spread = var > 1e-12 * np.maximum(1.0, mean**2)
        tested &= spread[..., None]
        t = (test - mean[..., None]) / np.sqrt(np.where(spread, var, 1.0) * (1 + 1 / m))[..., None]
        p = stats.t.cdf(t, df=m - 1)
    else:
        center, scale = _median_mad(ref)
        spread = scale > 1e-12 * np.maximum(1.0, np.abs(center))
        tested &= spread[..., None]
        loo_center, loo_scale = _leave_one_out_median_mad(ref)
        keep = row_ok[..., None] & (loo_scale > 1e-12 * np.maximum(1.0, np.abs(loo_center)))
        z_null = np.sort(((ref - loo_center) / np.where(keep, loo_scale, 1.0))[keep])
        if z_null.size == 0:
            raise DataError("no reference sample has any spread of cosines (duplicated or collinear gradients)")
        p = _pooled_pvalues(test, center, np.where(spread, scale, 1.0), z_null, tail_size if tail == "gpd" else None)
    p = np.asarray(p, np.float64)
    p[~tested] = np.nan  # in place: no second test-sized array
    return p


def _pooled_pvalues(test, center, scale, z_null, tail_size: int | None):
    """``(1 + #{z_kl ≤ z_ij}) / (1 + N)`` with ``z_ij = (test_ij − center_i) / scale_i`` against the
    sorted pooled null ``z_null [N]`` (and, with ``tail_size``, its generalized Pareto tail), rows
    :data:`CHUNK_VALUES` values at a time: no test-sized temporaries beside the result."""
    rows, cols = int(np.prod(test.shape[:-1])), test.shape[-1]
    flat, center, scale = test.reshape(rows, cols), center.reshape(rows, 1), scale.reshape(rows, 1)
    tail = _gpd_fit(z_null, tail_size) if tail_size is not None else None
    p = np.empty((rows, cols))
    step = max(1, CHUNK_VALUES // max(cols, 1))
    for i in range(0, rows, step):
        z = (flat[i : i + step] - center[i : i + step]) / scale[i : i + step]
        part = (1.0 + _count_at_most(z_null, z.ravel()).reshape(z.shape)) / (1.0 + z_null.size)
        p[i : i + step] = part if tail is None else _gpd_tail(part, z, z_null.size, *tail)
    return p.reshape(test.shape)


def _count_at_most(sorted_values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``#{v ∈ sorted_values: v ≤ key}`` for every key (``np.searchsorted(..., side="right")``),
    the keys searched in ascending order and the counts put back in theirs. numpy starts each
    search where the previous, smaller key's ended, so the probes stay in cache: with tens of
    millions of keys (every group and pair of a per-group test) against as many null values,
    searching them in their own order is a cache miss per probe and several times slower."""
    order = np.argsort(keys)
    counts = np.empty(keys.shape, np.int64)
    counts[order] = np.searchsorted(sorted_values, keys[order], side="right")
    return counts


def _gpd_fit(z_null, tail_size: int) -> tuple[int, float, float, float] | None:
    """``(t, u, shape, scale)``: a generalized Pareto fit to the far lower tail of the sorted null.

    The ``t`` lowest null values lie below the threshold ``u`` (the next one); their excesses
    ``u − z`` are fitted by ``scipy.stats.genpareto`` (shape ≥ 0: a bounded fitted tail falls back
    to the exponential, which is heavier and so conservative). None when the null has fewer than
    200 values (``t < 20``): the empirical p-values are kept.
    """
    from scipy import stats

    t = min(tail_size, z_null.size // 10)
    if t < 20:
        return None
    threshold = z_null[t]
    excess = threshold - z_null[:t]
    shape, _, scale = stats.genpareto.fit(excess, floc=0.0)
    if shape < 0 or not np.isfinite(scale) or scale <= 0:
        shape, scale = 0.0, max(float(excess.mean()), 1e-12)
    return t, float(threshold), float(shape), float(scale)


def _gpd_tail(p, z_test, n_null: int, t: int, threshold: float, shape: float, scale: float):
    """``p`` with the values of a test below the fitted threshold replaced by
    ``(t + 1) / (N + 1) · S(u − z)`` (:func:`_gpd_fit`) — Knijnenburg et al. (2009), "Fewer
    permutations, more accurate P-values". Without it the empirical p-value cannot go below
    ``1 / (N + 1)``."""
    from scipy import stats

    below = z_test < threshold
    survival = stats.genpareto.sf(np.where(below, threshold - z_test, 0.0), shape, loc=0.0, scale=scale)
    return np.where(below, (t + 1.0) / (n_null + 1.0) * survival, p)


def _median_mad(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median and median absolute deviation along the last axis."""
    center = np.median(x, -1)
    return center, np.median(np.abs(x - center[..., None]), -1)


def _order_stat_without(sorted_rows, k: int, removed_rank):
    """k-th smallest (0-based) of each sorted row once the element of rank ``removed_rank`` is gone."""
    return np.take_along_axis(sorted_rows, k + (k >= removed_rank), -1)


def _leave_one_out_median_mad(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median and MAD of each row of ``x [..., m]`` without its element ``l``, for every ``l``: ``[..., m]``.

    From order statistics: without the element of rank ``r`` the k-th smallest is ``s[k]`` if
    ``k < r`` else ``s[k+1]``; the median takes at most three values per row (``r`` below,
    between or above the two middle positions), and for each the deviations are sorted once.
    Costs ``O(m log m)`` per row instead of ``O(m² log m)``; rows go :data:`CHUNK_VALUES`
    values at a time.
    """
    rows = x.reshape(-1, x.shape[-1])
    step = max(1, CHUNK_VALUES // max(x.shape[-1], 1))
    parts = [_rows_leave_one_out_median_mad(rows[i : i + step]) for i in range(0, len(rows), step)]
    return tuple(np.concatenate([part[k] for part in parts]).reshape(x.shape) for k in (0, 1))


def _rows_leave_one_out_median_mad(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_leave_one_out_median_mad` of the rows of ``x [rows, m]``, all at once."""
    m = x.shape[-1]
    lo, hi = (m - 2) // 2, (m - 1) // 2  # middle positions of m - 1 values
    order = np.argsort(x, -1)
    sorted_x = np.take_along_axis(x, order, -1)
    rank = np.argsort(order, -1)
    center = 0.5 * (_order_stat_without(sorted_x, lo, rank) + _order_stat_without(sorted_x, hi, rank))
    candidates = np.stack(
        [0.5 * (sorted_x[..., lo + 1] + sorted_x[..., hi + 1]), 0.5 * (sorted_x[..., lo] + sorted_x[..., hi + 1]), 0.5 * (sorted_x[..., lo] + sorted_x[..., hi])],
        -1,
    )  # the median when the removed rank is ≤ lo, in (lo, hi], > hi
    which = np.where(rank <= lo, 0, np.where(rank <= hi, 1, 2))
    deviation = np.abs(x[..., None, :] - candidates[..., :, None])  # [..., 3, m]
    dev_order = np.argsort(deviation, -1)
    sorted_dev = np.take_along_axis(deviation, dev_order, -1).reshape(*x.shape[:-1], 3 * m)
    dev_rank = np.argsort(dev_order, -1).reshape(*x.shape[:-1], 3 * m)
    base = which * m
    own_rank = np.take_along_axis(dev_rank, base + np.arange(m), -1)
    scale = 0.5 * (
        np.take_along_axis(sorted_dev, base + lo + (lo >= own_rank), -1) + np.take_along_axis(sorted_dev, base + hi + (hi >= own_rank), -1)
    )
    return center, scale


def _rank_pvalues(test, ref):
    """``(1 + #{l: ref[i, l] ≤ test[i, j]}) / (1 + m)``, all rows (and groups) in one sorted search."""
    rows = int(np.prod(test.shape[:-1]))
    flat_test, flat_ref = test.reshape(rows, -1), ref.reshape(rows, -1)
    offset = 4.0 * np.arange(rows)[:, None]  # cosines lie in [-1, 1]: shifted rows never overlap
    shifted = np.sort(flat_ref + offset, axis=None)
    start = np.searchsorted(shifted, offset[:, 0] - 2.0, side="left")[:, None]
    hits = _count_at_most(shifted, (flat_test + offset).ravel()).reshape(flat_test.shape) - start
    return ((1.0 + hits) / (1.0 + flat_ref.shape[1])).reshape(test.shape)
