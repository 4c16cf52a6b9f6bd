"""fisherjax.stats.pooled_quantiles against numpy's quantile of the joined values."""

import numpy as np
import pytest

from fisherjax import stats

QUANTILES = [0, 0.01, 0.25, 1 / 3, 0.5, 0.75, 0.99, 1]


def _values(rng, kind: str, size: int) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal(size)
    if kind == "wide":  # Fisher-like: non-negative over sixty decades
        return np.abs(rng.standard_normal(size)) * 10.0 ** rng.integers(-30, 30, size)
    if kind == "ties":
        return rng.integers(0, 3, size).astype(float)
    return np.zeros(size)


@pytest.mark.parametrize("seed", range(8))
def test_pooled_quantiles_equal_numpy_on_the_joined_values(seed, monkeypatch):
    # a small chunk makes every array span several chunks, as a model's leaves do
    monkeypatch.setattr(stats, "POOLED_CHUNK", 97)
    rng = np.random.default_rng(seed)
    kinds = ("normal", "wide", "ties", "zeros")
    arrays = [_values(rng, kinds[(seed + i) % 4], int(rng.integers(0, 700))).astype(np.float32).reshape(-1, 1)
              for i in range(1 + seed % 4)] + [np.float32([seed])]
    joined = np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in arrays])
    np.testing.assert_array_equal(stats.pooled_quantiles(arrays, QUANTILES), np.quantile(joined, QUANTILES))


def test_pooled_quantiles_of_one_value_and_bad_input():
    np.testing.assert_array_equal(stats.pooled_quantiles([np.float32([2.5]), np.zeros(0, np.float32)], QUANTILES), 2.5)
    with pytest.raises(ValueError, match="no values"):
        stats.pooled_quantiles([np.zeros((0, 3), np.float32)], [0.5])
    with pytest.raises(ValueError, match="finite"):
        stats.pooled_quantiles([np.float32([1.0, np.nan])], [0.5])
