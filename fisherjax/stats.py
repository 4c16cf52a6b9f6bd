"""Multiple testing, permutation p-values and bootstrap intervals shared by the analysis phases.

scipy does the statistics we do not want to re-derive: ``scipy.stats.false_discovery_control``
gives Benjamini–Hochberg (``"bh"``) and Benjamini–Yekutieli (``"by"``) adjusted p-values.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as _stats


def fdr_qvalues(pvalues, method: str = "bh") -> np.ndarray:
    """Adjusted p-values (q-values) of any-shaped p-values; NaNs stay NaN and are not counted.

    ``method``: ``"bh"`` (independent or positively dependent tests) or ``"by"`` (any dependence).
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if method not in ("bh", "by"):
        raise ValueError(f"method must be 'bh' or 'by', got {method!r}")
    q = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        if (p[finite] < 0).any() or (p[finite] > 1).any():
            raise ValueError("p-values must lie in [0, 1]")
        q[finite] = _stats.false_discovery_control(p[finite], method=method)
    return q


def permutation_pvalue(observed, null, *, alternative: str = "greater") -> np.ndarray:
    """Monte-Carlo p-value ``(1 + #{null ≥ observed}) / (1 + n_null)`` along ``null``'s first axis.

    The +1 keeps p > 0 (Phipson & Smyth 2010), so the test is exact at its resolution.
    ``alternative``: ``"greater"``, ``"less"`` or ``"two-sided"`` (by absolute value).
    """
    observed = np.asarray(observed, dtype=np.float64)
    null = np.asarray(null, dtype=np.float64)
    if alternative == "greater":
        hits = (null >= observed).sum(0)
    elif alternative == "less":
        hits = (null <= observed).sum(0)
    elif alternative == "two-sided":
        hits = (np.abs(null) >= np.abs(observed)).sum(0)
    else:
        raise ValueError(f"unknown alternative {alternative!r}")
    return (1.0 + hits) / (1.0 + null.shape[0])


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
