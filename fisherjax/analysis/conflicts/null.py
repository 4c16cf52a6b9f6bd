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

import math
import threading
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from jaxtyping import Float

from fisherjax.backend import available_cores, on_host_cores
from fisherjax.errors import DataError
from fisherjax.settings import check_choice

__all__ = ["NULLS", "TAILS", "NullBuilder", "PooledNull", "conflict_pvalues", "pooled_null", "pooled_pvalues", "reference_samples_needed"]

NULLS = ("pooled", "normal", "row")
"""The null tests (module docstring)."""

TAILS = (None, "gpd")
"""The pooled null's far tail: purely empirical (None) or a generalized Pareto fit."""

CHUNK_VALUES = 1 << 20
"""Values in flight (over all cores: :func:`chunk_values`) where the pooled null works piece by
piece: the reference rows, their leave-one-out medians (:func:`median_mad_leave_one_out`, whose
temporaries are a few times a chunk: a few hundred MB of float64 and int64 in all) and the tested
values' p-values (:func:`pooled_pvalues`). All rows at once — every group and sample pair of a
per-group test — were most of the tests' peak memory (RESULTS.md, twenty-third session)."""


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
    resolve: float | None = None,
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
    no spread (a zero or duplicated gradient), get NaN p-values (untested). ``resolve``: only
    p-values up to it are needed; the pooled null then keeps only its lowest values
    (:func:`pooled_null`) and a p-value above ``resolve`` may come back as ``+inf`` (not resolved).
    """
    check_choice("conflict_pvalues", "null", null, NULLS)
    check_choice("conflict_pvalues", "tail", tail, TAILS)
    test = np.asarray(test, np.float64)
    ref = np.asarray(reference, np.float64)
    n = test.shape[-2]
    if ref.shape[:-1] != test.shape[:-1]:
        raise DataError(f"reference cosines have shape {ref.shape}, the tested ones {test.shape}: rows must match")
    if exclude_self and ref.shape[-1] != n:
        raise DataError("a within-task reference must be square")
    m = ref.shape[-1] - exclude_self
    need = reference_samples_needed(null)
    if m < need:
        raise DataError(
            f"the {null!r} null needs at least {need} reference samples per row, got {m}"
            + (f" (a task with fewer than {need + 1} samples cannot be its own reference)" if exclude_self else "")
        )
    if null == "pooled":
        groups = ref.reshape(-1, *ref.shape[-2:])
        pooled = pooled_null(lambda block: groups[block], groups.shape, exclude_self=exclude_self, resolve=resolve,
                             tail_size=tail_size if tail == "gpd" else None)
        shape = ref.shape[:-1]
        return pooled_pvalues(test, *(x.reshape(shape) for x in (pooled.center, pooled.scale, pooled.usable)), pooled)
    ref, row_ok = _reference_rows(ref.reshape(-1, ref.shape[-1]), 0, exclude_self, n)
    ref, row_ok = ref.reshape(*test.shape[:-1], m), row_ok.reshape(test.shape[:-1])
    tested = np.isfinite(test) & row_ok[..., None]
    test = np.where(tested, test, 0.0)
    if null == "row":
        p = _rank_pvalues(test, ref)
    else:
        from scipy import stats

        mean, var = ref.mean(-1), ref.var(-1, ddof=1)
        spread = var > 1e-12 * np.maximum(1.0, mean**2)
        tested &= spread[..., None]
        t = (test - mean[..., None]) / np.sqrt(np.where(spread, var, 1.0) * (1 + 1 / m))[..., None]
        p = stats.t.cdf(t, df=m - 1)
    p = np.asarray(p, np.float64)
    p[~tested] = np.nan
    return p


def _reference_rows(rows, first: int, exclude_self: bool, n: int):
    """``(values [k, m], finite [k])``: the reference rows ``rows [k, r]`` (flat rows ``first ...
    first + k`` of the ``[..., n, r]`` reference) as float64, without their own sample's column when
    ``exclude_self`` (row ``i`` of each group drops column ``i``), a row with a non-finite value
    zeroed and marked."""
    values = np.array(rows, np.float64)
    if exclude_self:
        own = (first + np.arange(len(values))) % n
        values = values[np.arange(values.shape[1])[None, :] != own[:, None]].reshape(len(values), -1)
    finite = np.isfinite(values).all(-1)
    values[~finite] = 0.0
    return values, finite


class PooledNull(NamedTuple):
    """The pooled null of a reference ``[G, n, r]`` (:func:`pooled_null`).

    Per row ``[G · n]`` (groups' rows in order): ``center`` and ``scale`` (median and MAD of the
    row's reference cosines; scale 1 where unusable) and ``usable`` (finite, with spread).
    ``lowest``: the smallest standardised null values, sorted — all ``size`` of them when
    ``complete``; ``gpd``: the generalized Pareto fit of its far tail (:func:`_gpd_fit`) or None.
    """

    center: np.ndarray
    scale: np.ndarray
    usable: np.ndarray
    lowest: np.ndarray
    size: int
    complete: bool
    gpd: tuple[int, float, float, float] | None


def pooled_null(
    read: Callable[[slice], np.ndarray], shape: tuple[int, int, int], *, exclude_self: bool, resolve: float | None = None,
    tail_size: int | None = None,
) -> PooledNull:
    """The pooled null of a reference of ``shape`` ``[G, n, r]``, read a few groups at a time
    (``read(groups) → [g, n, r]`` cosines, e.g. formed from a Gram's dot products as they are read):
    :class:`NullBuilder` fed every group in order."""
    groups, n, r = shape
    builder = NullBuilder(shape, exclude_self=exclude_self, resolve=resolve, tail_size=tail_size)
    per_read = max(1, available_cores() * chunk_values() // max(n * (r - exclude_self), 1))
    for g in range(0, groups, per_read):
        block = slice(g, min(g + per_read, groups))
        builder.add(np.arange(block.start, block.stop), read(block))
    return builder.finish()


class NullBuilder:
    """The pooled null of a reference ``[G, n, r]`` built from its groups in any order, as they
    come (:meth:`add`), then :meth:`finish`: a :class:`PooledNull` equal to the bit whatever the
    order — so a Gram's within-task groups can feed it as each group's parameter slices are read,
    and never be held all at once.

    Every usable row's standardised cosines ``(ref_kl − med_k,−l) / mad_k,−l``, with the row's
    median and MAD recomputed without ``l`` (:func:`median_mad_leave_one_out`). Rows go
    :func:`chunk_values` values at a time on every core (:func:`on_host_cores`). With ``resolve``
    only the ``L = max(⌈resolve · (1 + N_max)⌉, t + 1)`` lowest values are kept (``N_max`` the
    null's size before untested values are dropped, ``t`` the Pareto fit's size with
    ``tail_size``): a p-value ``(1 + #{z_null ≤ z}) / (1 + N)`` is exact for every ``z`` below the
    ``L``-th, and any other is at least ``(1 + L) / (1 + N) > resolve``. Without it the whole null
    is kept, as a per-group test of hundreds of samples a task over hundreds of groups cannot
    afford: ``G · n · r`` float64 values. Host state, filled in place from several threads (a
    lock guards the kept values; each row's statistics have one writer).
    """

    def __init__(self, shape: tuple[int, int, int], *, exclude_self: bool, resolve: float | None = None,
                 tail_size: int | None = None):
        groups, n, r = shape
        self.n, self.exclude_self, self.tail_size = n, exclude_self, tail_size
        m = r - exclude_self
        rows = groups * n
        self.center, self.scale, self.usable = np.empty(rows), np.empty(rows), np.zeros(rows, bool)
        n_max = rows * m
        keep = None
        if resolve is not None:
            keep = max(math.ceil(resolve * (1 + n_max)), (min(tail_size, n_max // 10) + 1) if tail_size is not None else 1)
        self.lowest = _Lowest(n_max, keep)
        self.step = max(1, chunk_values() // max(m, 1))

    def add(self, groups: np.ndarray, cosines: Float[np.ndarray, "g n r"]) -> None:
        """Add the reference cosines of ``groups [g]`` (indices into ``G``, each added once)."""
        n = self.n
        flat = np.asarray(cosines, np.float64).reshape(-1, cosines.shape[-1])
        rows = (np.asarray(groups)[:, None] * n + np.arange(n)).ravel()

        def fill(i: int) -> None:
            x, finite = _reference_rows(flat[i : i + self.step], i, self.exclude_self, n)
            c, s, loo_center, loo_scale = median_mad_leave_one_out(x)
            at = rows[i : i + len(x)]
            self.center[at], self.scale[at] = c, s
            self.usable[at] = finite & (s > 1e-12 * np.maximum(1.0, np.abs(c)))
            keep_values = finite[:, None] & (loo_scale > 1e-12 * np.maximum(1.0, np.abs(loo_center)))
            z = (x - loo_center) / np.where(keep_values, loo_scale, 1.0)
            self.lowest.add(z[keep_values])

        on_host_cores(fill, range(0, len(flat), self.step))

    def finish(self) -> PooledNull:
        """The :class:`PooledNull` of every group added (all ``G`` of them, once each).

        Raises:
          DataError: no row has any spread of cosines.
        """
        values = self.lowest.result()
        if self.lowest.size == 0:
            raise DataError("no reference sample has any spread of cosines (duplicated or collinear gradients)")
        gpd = _gpd_fit(values, self.lowest.size, self.tail_size) if self.tail_size is not None else None
        return PooledNull(self.center, np.where(self.usable, self.scale, 1.0), self.usable, values, self.lowest.size,
                          self.lowest.complete, gpd)


class _Lowest:
    """The ``keep`` smallest of values added piece by piece (all of them for ``keep=None``), in a
    buffer of twice that, partitioned down when it fills; pieces come from several threads."""

    def __init__(self, capacity: int, keep: int | None):
        self.keep = keep if keep is not None and 2 * keep < capacity else None
        self.buffer = np.empty(capacity if self.keep is None else 2 * self.keep)
        self.filled, self.size, self.complete = 0, 0, True
        self.threshold = np.inf
        self.lock = threading.Lock()

    def add(self, values: np.ndarray) -> None:
        with self.lock:
            self.size += values.size
            while values.size:
                if self.keep is not None:
                    values = values[values < self.threshold] if np.isfinite(self.threshold) else values
                take = min(values.size, len(self.buffer) - self.filled)
                self.buffer[self.filled : self.filled + take] = values[:take]
                self.filled += take
                values = values[take:]
                if self.filled == len(self.buffer) and self.keep is not None:
                    self.buffer.partition(self.keep - 1)
                    self.filled, self.complete = self.keep, False
                    self.threshold = self.buffer[self.keep - 1]

    def result(self) -> np.ndarray:
        """The kept values, sorted (the ``keep`` smallest once any was dropped)."""
        values = self.buffer[: self.filled]
        values.sort()
        return values if self.complete else values[: self.keep]


def pooled_pvalues(test, center, scale, usable, null: PooledNull):
    """``(1 + #{z_kl ≤ z_ij}) / (1 + N)`` with ``z_ij = (test_ij − center_i) / scale_i`` against the
    pooled null (:func:`pooled_null`; and its generalized Pareto tail where fitted); NaN where the
    row is not ``usable`` or the test value is not finite; ``+inf`` where the null was kept only in
    part and ``z_ij`` lies above what was kept (not resolved: above the null's ``resolve``).
    ``test [..., n, m]`` may be a transposed view (:func:`~.detect.detect`'s B side): it is read
    :func:`chunk_values` values at a time, by groups or by rows of one group, on every core, and
    never copied whole; ``center``, ``scale`` and ``usable`` are ``[..., n]``."""
    shape, (n, cols) = test.shape, test.shape[-2:]
    test = test.reshape(-1, n, cols)  # merges leading axes only: a view of a transposed array too
    center, scale, usable = (np.asarray(x).reshape(-1, n, 1) for x in (center, scale, usable))
    z_null = null.lowest
    p = np.empty(test.shape)

    def fill(block: tuple[slice, ...]) -> None:
        z = (test[block] - center[block]) / scale[block]
        resolved = np.isfinite(z) if null.complete else z < z_null[-1]  # only these are counted (sorted and searched)
        part = np.full(z.shape, np.inf)
        part[resolved] = (1.0 + _count_at_most(z_null, z[resolved])) / (1.0 + null.size)
        if null.gpd is not None:
            part = _gpd_tail(part, z, null.size, *null.gpd)
        part[~(np.isfinite(z) & usable[block])] = np.nan
        p[block] = part

    on_host_cores(fill, _value_blocks(len(test), n, cols))
    return p.reshape(shape)


def _value_blocks(groups: int, n: int, cols: int) -> list[tuple[slice, ...]]:
    """Index tuples covering ``[groups, n, cols]`` about :func:`chunk_values` values at a time:
    whole groups when one fits, else rows of one group."""
    chunk = chunk_values()
    if n * cols <= chunk:
        step = chunk // max(n * cols, 1)
        return [(slice(g, g + step),) for g in range(0, groups, step)]
    step = max(1, chunk // max(cols, 1))
    return [(slice(g, g + 1), slice(r, r + step)) for g in range(groups) for r in range(0, n, step)]


def chunk_values() -> int:
    """Values per chunk on each core: :data:`CHUNK_VALUES` shared by the cores
    (:func:`fisherjax.backend.available_cores`), so the chunks in flight hold what one did."""
    return max(1, CHUNK_VALUES // available_cores())


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


def _gpd_fit(z_null, size: int, tail_size: int) -> tuple[int, float, float, float] | None:
    """``(t, u, shape, scale)``: a generalized Pareto fit to the far lower tail of the sorted null.

    The ``t`` lowest of the null's ``size`` values (``z_null``: its lowest, sorted) lie below the
    threshold ``u`` (the next one); their excesses
    ``u − z`` are fitted by ``scipy.stats.genpareto`` (shape ≥ 0: a bounded fitted tail falls back
    to the exponential, which is heavier and so conservative). None when the null has fewer than
    200 values (``t < 20``): the empirical p-values are kept.
    """
    from scipy import stats

    t = min(tail_size, size // 10)
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


def _deviation_order_statistics(y: np.ndarray, c: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k``-th and ``(k+1)``-th smallest (0-based) of ``|y_l − c|`` in each row of sorted
    ``y [rows, m]`` about ``c [rows]``: ``([rows], [rows])``; the second is ``inf`` where ``k + 1 = m``.

    The ``K = k + 1`` smallest deviations of a sorted row are a window ``y[a … a + K − 1]``: the
    first ``a`` where the element leaving, ``y[a]``, is no farther from ``c`` than the one entering,
    ``y[a + K]`` (``2c − y[a] − y[a + K]`` does not increase with ``a``, so a bisection over
    ``a`` finds it in ``log2 m`` steps of one value a row). The ``k``-th is the farther of the
    window's ends, the next the nearer of its neighbours. Deviations are ``|y_l − c|`` as
    computed elementwise, so the values are those a partition of them gives, to the bit."""
    rows, m = y.shape
    r = np.arange(rows)
    size = k + 1
    lo, hi = np.zeros(rows, np.intp), np.full(rows, m - size, np.intp)
    while np.any(active := lo < hi):
        mid = (lo + hi) // 2  # < m − size where active; rows already settled read a clamped index, unused
        stop = (c - y[r, mid]) <= (y[r, np.minimum(mid + size, m - 1)] - c)
        hi, lo = np.where(active & stop, mid, hi), np.where(active & ~stop, mid + 1, lo)
    kth = np.maximum(np.abs(y[r, lo] - c), np.abs(y[r, lo + k] - c))
    before = np.where(lo > 0, np.abs(y[r, np.maximum(lo - 1, 0)] - c), np.inf)
    after = np.where(lo + size < m, np.abs(y[r, np.minimum(lo + size, m - 1)] - c), np.inf)
    return kth, np.minimum(before, after)


def median_mad_leave_one_out(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Median and MAD of each row of ``x [rows, m]`` (``[rows]`` each), and the median and MAD of
    each row without its element ``l``, for every ``l`` (``[rows, m]`` each), from one sort of the
    rows: numpy's vectorised sort of a row costs less than one multi-``kth`` ``np.partition`` of
    it, and serves every order statistic below.

    Without ``l`` the median is ``(t[lo] + t[hi]) / 2`` with ``lo, hi`` the middle positions of
    ``m − 1`` values and ``t[k]`` the ``k``-th smallest without ``l``: ``s[k+1]`` where
    ``x_l ≤ s[k]``, else ``s[k]`` (``s`` the sorted row; by value, so a tie gives the same number
    whichever of the tied elements goes). So it takes one of three values a row — ``x_l ≤ s[lo]``,
    between, above ``s[hi]`` — and for each the MAD comes the same way from the order statistics
    ``d[lo], d[lo+1], d[hi], d[hi+1]`` of the deviations from it, which
    :func:`_deviation_order_statistics` reads off the sorted row. Equal to the bit to a median
    and MAD of the ``m − 1`` values taken by selection (``tests/test_conflicts.py``)."""
    rows, m = x.shape
    y = np.sort(x, -1)
    middle = ((m - 1) // 2, m // 2)
    center = y[:, middle[0]] if middle[0] == middle[1] else 0.5 * (y[:, middle[0]] + y[:, middle[1]])
    d = _deviation_order_statistics(y, center, middle[0])
    scale = d[0] if middle[0] == middle[1] else 0.5 * (d[0] + d[1])
    lo, hi = (m - 2) // 2, (m - 1) // 2
    s0, s1, s2, s3 = y[:, lo], y[:, lo + 1], y[:, hi], y[:, hi + 1]
    table = []  # per candidate centre w: [centre, d[lo], d[lo+1], d[hi], d[hi+1]], each [rows]
    for candidate in (0.5 * (s1 + s3), 0.5 * (s0 + s3), 0.5 * (s0 + s2)):
        low = _deviation_order_statistics(y, candidate, lo)
        table.append((candidate, *low, *(low if hi == lo else _deviation_order_statistics(y, candidate, hi))))
    which = (x > s0[:, None]).astype(np.intp) + (x > s2[:, None]) + 3 * np.arange(rows)[:, None]  # l's candidate, flat
    loo_center, d_lo, d_lo1, d_hi, d_hi1 = (np.stack(column, -1).ravel()[which] for column in zip(*table))
    own = np.abs(x - loo_center)
    loo_scale = 0.5 * (np.where(own <= d_lo, d_lo1, d_lo) + np.where(own <= d_hi, d_hi1, d_hi))
    return center, scale, loo_center, loo_scale


def _rank_pvalues(test, ref):
    """``(1 + #{l: ref[i, l] ≤ test[i, j]}) / (1 + m)``, all rows (and groups) in one sorted search."""
    rows = int(np.prod(test.shape[:-1]))
    flat_test, flat_ref = test.reshape(rows, -1), ref.reshape(rows, -1)
    offset = 4.0 * np.arange(rows)[:, None]  # cosines lie in [-1, 1]: shifted rows never overlap
    shifted = np.sort(flat_ref + offset, axis=None)
    start = np.searchsorted(shifted, offset[:, 0] - 2.0, side="left")[:, None]
    hits = _count_at_most(shifted, (flat_test + offset).ravel()).reshape(flat_test.shape) - start
    return ((1.0 + hits) / (1.0 + flat_ref.shape[1])).reshape(test.shape)
