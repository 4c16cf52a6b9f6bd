"""Multiple testing, permutation p-values, bootstrap intervals and pooled quantiles shared by the
analysis phases.

The Benjamini–Hochberg and –Yekutieli q-values are ``scipy.stats.false_discovery_control``'s
arithmetic in bounded memory (:func:`fdr_qvalues`).
"""

from __future__ import annotations

import numpy as np

from fisherjax.backend import available_cores, on_host_cores


def fdr_qvalues(pvalues, method: str = "bh", *, tests: int | None = None, bound: float | None = None) -> np.ndarray:
    """Adjusted p-values (q-values) of any-shaped p-values; NaNs stay NaN and are not counted.

    ``method``: ``"bh"`` (Benjamini–Hochberg: independent or positively dependent tests) or
    ``"by"`` (Benjamini–Yekutieli: any dependence). With the ``m`` non-NaN p-values sorted,
    ``q_(k) = min_{j ≥ k} min(1, p_(j) · m / j · c)``, ``c = 1`` for BH and ``Σ_{i ≤ m} 1/i`` for BY.

    The same arithmetic as ``scipy.stats.false_discovery_control`` (equal to its last bit, tested),
    which it replaces because scipy holds about six float64 copies of the p-values at once: the
    per-group conflict tests pass hundreds of millions. Here the sort order and the result are
    the only arrays of their size (the order is found on every core: :func:`ascending_order`); the
    running minimum goes from the largest p-values down, :data:`FDR_CHUNK` at a time.

    ``tests`` and ``bound``: ``pvalues`` are only the tests with ``p ≤ bound`` of ``tests`` in all
    (every other one's p-value is above ``bound``). Then ``m = tests``, and the q-values are exact
    where they are ``≤ bound`` and NaN elsewhere (above ``bound``, not resolved): the terms
    ``p_(j) · m / j`` of the tests left out all exceed ``bound``, so they set no q-value at or
    below it. With ``bound = alpha`` every discovery and its q-value are the full procedure's.
    """
    if method not in ("bh", "by"):
        raise ValueError(f"method must be 'bh' or 'by', got {method!r}")
    if (tests is None) != (bound is None):
        raise ValueError("pass tests and bound together (the p-values at most bound of that many tests)")
    p = np.asarray(pvalues, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    flat, out = p.reshape(-1), q.reshape(-1)
    given = flat.size - int(np.count_nonzero(np.isnan(flat)))
    m = given if tests is None else int(tests)
    if given == 0:
        return q
    if np.nanmin(flat) < 0 or np.nanmax(flat) > (1 if bound is None else bound):
        raise ValueError("p-values must lie in [0, 1]" if bound is None else f"p-values must lie in [0, {bound}]")
    if m < given:
        raise ValueError(f"{given} p-values given of {m} tests")
    scale = harmonic_number(m) if method == "by" else None
    order = ascending_order(flat)  # NaNs last: the first `given` are the tested values, ascending
    running = np.inf
    for stop in range(given, 0, -FDR_CHUNK):
        start = max(0, stop - FDR_CHUNK)
        taken = order[start:stop]
        values = flat[taken] * (m / np.arange(start + 1, stop + 1, dtype=np.float64))
        if scale is not None:
            values *= scale
        np.minimum.accumulate(values[::-1], out=values[::-1])
        np.minimum(values, running, out=values)
        running = values[0]
        out[taken] = np.clip(values, 0.0, 1.0)
    if bound is not None:
        q[q > bound] = np.nan
    return q


def harmonic_number(m: int) -> float:
    """``Σ_{i ≤ m} 1/i``: summed as scipy sums it up to ``2^24`` terms; beyond, ``ψ(m + 1) + γ``
    (``scipy.special.digamma``), equal to float64 rounding, without an ``m``-long array (the
    per-group tests count billions)."""
    if m <= 1 << 24:
        return float(np.sum(1 / np.arange(1, m + 1, dtype=np.float64)))
    from scipy import special

    return float(special.digamma(m + 1.0) + np.euler_gamma)


FDR_CHUNK = 1 << 20
"""p-values per step of :func:`fdr_qvalues`'s running minimum, and per piece of
:func:`ascending_order`'s labelling."""

ORDER_RANGES_PER_CORE = 8
"""Value ranges per core in :func:`ascending_order`: more ranges than threads, so the ranges
being sorted at once hold a fraction of the values' temporaries and the threads end evenly."""


def ascending_order(x: np.ndarray) -> np.ndarray:
    """Indices that sort the 1-D float array ``x`` ascending, NaNs last: ``x[order]`` equals
    ``np.sort(x)`` (ties in any order).

    ``np.argsort`` on one core where there is one or ``x`` is small; otherwise on every core
    (:func:`fisherjax.backend.on_host_cores`): the values are cut into ranges at quantiles of a
    sample, each piece of ``x`` writes its indices into its ranges' parts of the order, and the
    ranges are argsorted side by side, :data:`ORDER_RANGES_PER_CORE` per core. Beside the order
    it holds two bytes per value (each one's range) and a fraction of ``x`` in each range's sort.
    """
    cores = available_cores()
    if cores == 1 or x.size <= 2 * FDR_CHUNK:
        return np.argsort(x)
    count = cores * ORDER_RANGES_PER_CORE
    sample = x[:: max(1, x.size // (64 * count))]
    sample = np.sort(sample[~np.isnan(sample)])
    bounds = sample[(np.arange(1, count) * len(sample)) // count] if len(sample) else np.zeros(0)
    starts = range(0, x.size, FDR_CHUNK)
    label = np.empty(x.size, np.uint16)  # each value's range; NaN: the last, left unsorted
    counts = np.zeros((len(starts), count + 1), np.int64)

    def labelled(k: int) -> None:
        piece = x[starts[k] : starts[k] + FDR_CHUNK]
        r = np.searchsorted(bounds, piece, side="right")
        r[np.isnan(piece)] = count
        label[starts[k] : starts[k] + FDR_CHUNK] = r
        counts[k] = np.bincount(r, minlength=count + 1)

    on_host_cores(labelled, range(len(starts)))
    ends = np.cumsum(counts.T.ravel()).reshape(count + 1, len(starts))  # range-major, then piece
    offsets = ends - counts.T
    order = np.empty(x.size, np.int64)

    def scattered(k: int) -> None:
        r = label[starts[k] : starts[k] + FDR_CHUNK]
        by_range = np.argsort(r, kind="stable")
        cut = np.concatenate([[0], np.cumsum(counts[k])])
        for j in np.flatnonzero(counts[k]):
            order[offsets[j, k] : ends[j, k]] = starts[k] + by_range[cut[j] : cut[j + 1]]

    on_host_cores(scattered, range(len(starts)))
    label = None  # freed before the ranges' sorts

    def sorted_range(j: int) -> None:
        lo, hi = offsets[j, 0], ends[j, -1]
        index = order[lo:hi]
        order[lo:hi] = index[np.argsort(x[index])]

    on_host_cores(sorted_range, sorted(range(count), key=lambda j: offsets[j, 0] - ends[j, -1]))
    return order


def permutation_pvalue(observed, null, *, alternative: str = "greater") -> np.ndarray:
    """Monte-Carlo p-value ``(1 + #{null ≥ observed}) / (1 + n_null)`` along ``null``'s first axis.

    The +1 keeps p > 0 (Phipson & Smyth 2010), so the test is exact at its resolution.
    ``alternative``: ``"greater"``, ``"less"`` or ``"two-sided"`` (by absolute value). A null value
    within :data:`TIE_RTOL` of the observed (relative) is a tie and counts, as
    ``scipy.stats.permutation_test`` counts it: a relabelling that draws the observed labels again
    gives the observed statistic up to the order of its float64 sums, and whether it counted
    would otherwise depend on that order.
    """
    observed = np.asarray(observed, dtype=np.float64)
    null = np.asarray(null, dtype=np.float64)
    if alternative == "greater":
        hits = (null >= observed - TIE_RTOL * np.abs(observed)).sum(0)
    elif alternative == "less":
        hits = (null <= observed + TIE_RTOL * np.abs(observed)).sum(0)
    elif alternative == "two-sided":
        hits = (np.abs(null) >= np.abs(observed) * (1 - TIE_RTOL)).sum(0)
    else:
        raise ValueError(f"unknown alternative {alternative!r}")
    return (1.0 + hits) / (1.0 + null.shape[0])


TIE_RTOL = 100 * np.finfo(np.float64).eps
"""Relative distance within which :func:`permutation_pvalue` takes a null value for the observed
one (scipy's choice for float64 statistics)."""


def bootstrap_indices(n: int, n_bootstrap: int, seed: int = 0) -> np.ndarray:
    """``[n_bootstrap, n]`` resampling indices (with replacement)."""
    if n < 1:
        raise ValueError("bootstrap needs at least one sample")
    return np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))


def percentile_interval(replicates, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of bootstrap replicates along their first axis."""
    alpha = (1 - level) / 2
    reps = np.asarray(replicates)
    return np.quantile(reps, alpha, axis=0), np.quantile(reps, 1 - alpha, axis=0)


def bootstrap_mean_interval(values, *, n_bootstrap: int = 1000, level: float = 0.95, seed: int = 0):
    """Percentile bootstrap interval of the mean over the first axis of ``values``.

    Resamples samples (rows) with replacement; the mean of each replicate is one matrix product
    with the replicate's count vector, so no Python loop over replicates.
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    idx = bootstrap_indices(n, n_bootstrap, seed)
    counts = np.zeros((n_bootstrap, n))
    np.add.at(counts, (np.arange(n_bootstrap)[:, None], idx), 1.0)
    means = (counts / n) @ values.reshape(n, -1)
    lo, hi = percentile_interval(means, level)
    return lo.reshape(values.shape[1:]), hi.reshape(values.shape[1:])


POOLED_CHUNK = 1 << 22
"""Elements of an array :func:`pooled_quantiles` reads at a time: its temporaries stay a few tens of
MB whatever the model's size."""


def _ordered_keys(x: np.ndarray) -> np.ndarray:
    """float32 values as uint32 keys in the same order (sign bit flipped for ≥ 0, all bits for < 0)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31))


def _key_value(key: int) -> float:
    """The float32 value of an :func:`_ordered_keys` key."""
    bits = key & 0x7FFFFFFF if key >> 31 else ~key & 0xFFFFFFFF
    return float(np.array(bits, np.uint32).view(np.float32))


def _chunks(arrays):
    for a in arrays:
        flat = np.asarray(a).reshape(-1)
        for start in range(0, flat.size, POOLED_CHUNK):
            yield _ordered_keys(flat[start : start + POOLED_CHUNK])


def pooled_order_statistics(arrays, ranks) -> dict[int, float]:
    """``{r: x_(r)}``: the ``r``-th smallest (0-based) of the finite float32 values held in many
    arrays, as if they were joined, without joining them (:func:`pooled_quantiles`' selection: the
    keys' high 16 bits counted in one pass, their low 16 bits inside the bins holding a wanted rank
    in a second; a key is a value, so nothing is sorted). Values are returned as Python floats.

    Raises:
      ValueError: no values, a NaN or infinite one, or a rank outside ``[0, n)``.
    """
    arrays = [a for a in arrays if np.size(a)]
    n = sum(int(np.size(a)) for a in arrays)
    if n == 0:
        raise ValueError("pooled order statistics: no values")
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError("pooled order statistics: values must be finite")
    ranks = np.unique(np.asarray(list(ranks), np.int64))
    if len(ranks) and (ranks[0] < 0 or ranks[-1] >= n):
        raise ValueError(f"pooled order statistics: ranks must lie in [0, {n}), got {ranks.tolist()}")
    high = np.zeros(1 << 16, np.int64)
    for keys in _chunks(arrays):
        high += np.bincount(keys >> 16, minlength=1 << 16)
    ends = np.cumsum(high)
    bins = np.searchsorted(ends, ranks, side="right")  # the high bin holding each rank
    wanted = np.unique(bins)
    low = np.zeros((len(wanted), 1 << 16), np.int64)
    for keys in _chunks(arrays):
        top = keys >> 16
        for i, b in enumerate(wanted.tolist()):
            low[i] += np.bincount(keys[top == b] & 0xFFFF, minlength=1 << 16)
    value = {}
    for rank, b in zip(ranks.tolist(), bins.tolist(), strict=True):
        i = int(np.searchsorted(wanted, b))
        within = rank - (ends[b - 1] if b else 0)
        value[rank] = _key_value((b << 16) | int(np.searchsorted(np.cumsum(low[i]), within, side="right")))
    return value


def pooled_quantiles(arrays, q) -> np.ndarray:
    """``np.quantile(concatenate(arrays), q)`` (its default ``"linear"`` method, in float64) of
    finite float32 values held in many arrays, without joining them: the model-sized float64 copy
    (and the copy ``np.quantile`` partitions) a 7B model's per-parameter Fisher would need is never
    made.

    The order statistics ``x_(r)`` that the interpolation reads are found exactly
    (:func:`pooled_order_statistics`). Then, as numpy does: ``h = (n − 1)·q``, ``x_(⌊h⌋) + (h − ⌊h⌋)
    (x_(⌊h⌋+1) − x_(⌊h⌋))`` (from the upper neighbour when ``h − ⌊h⌋ ≥ ½``).

    Raises:
      ValueError: no values, or a NaN or infinite one.
    """
    q = np.asarray(q, np.float64)
    n = sum(int(np.size(a)) for a in arrays)
    virtual = (n - 1) * q  # numpy's linear method, with its rounding
    below = np.floor(virtual)
    gamma = virtual - below
    last = virtual >= n - 1  # numpy takes the largest value for both neighbours there
    lower = np.where(last, n - 1, below).astype(np.int64)
    upper = np.where(last, n - 1, below + 1).astype(np.int64)
    value = pooled_order_statistics(arrays, np.concatenate([lower, upper]))  # no values: raised there, before any rank
    a = np.array([value[r] for r in lower.tolist()], np.float64)
    b = np.array([value[r] for r in upper.tolist()], np.float64)
    diff = b - a
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)
