"""fisherjax.stats against independent code: pooled_quantiles against numpy's quantile of the joined
values, fdr_qvalues against scipy's false_discovery_control."""

import math

import numpy as np
import pytest
from scipy.stats import false_discovery_control

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


@pytest.mark.parametrize("method", ["bh", "by"])
@pytest.mark.parametrize("kind", ["uniform", "ties", "signal"])
@pytest.mark.parametrize("cores", [1, 3])
def test_fdr_qvalues_equal_scipy_with_nans_and_chunks(method, kind, cores, monkeypatch):
    # chunks of 7 p-values: the running minimum crosses many chunk borders, and with several
    # cores the order is found by value ranges (stats.ascending_order)
    from fisherjax import backend

    monkeypatch.setattr(stats, "FDR_CHUNK", 7)
    monkeypatch.setattr(stats, "available_cores", lambda: cores)
    monkeypatch.setattr(backend, "available_cores", lambda: cores)
    rng = np.random.default_rng(len(kind))
    p = {"uniform": rng.uniform(size=(3, 40, 50)), "ties": rng.integers(1, 6, size=(3, 40, 50)) / 6.0,
         "signal": np.where(rng.uniform(size=(3, 40, 50)) < 0.1, rng.uniform(size=(3, 40, 50)) * 1e-5, rng.uniform(size=(3, 40, 50)))}[kind]
    p[rng.uniform(size=p.shape) < 0.2] = np.nan
    tested = ~np.isnan(p)
    q = stats.fdr_qvalues(p, method)
    assert q.shape == p.shape and np.isnan(q[~tested]).all()
    np.testing.assert_array_equal(q[tested], false_discovery_control(p[tested], method=method))
    np.testing.assert_array_equal(stats.fdr_qvalues(np.swapaxes(p, 0, 2), method), np.swapaxes(q, 0, 2))  # not contiguous


@pytest.mark.parametrize("method", ["bh", "by"])
@pytest.mark.parametrize("kind", ["uniform", "signal", "ties"])
def test_fdr_qvalues_of_the_smallest_p_values_only(method, kind, monkeypatch):
    """Given only the p-values ≤ bound of ``tests`` tests, the q-values ≤ bound are the full
    procedure's, to the bit, and the rest NaN; so every discovery at alpha = bound is found."""
    monkeypatch.setattr(stats, "FDR_CHUNK", 7)
    rng = np.random.default_rng(3)
    size = 4000
    p = {"uniform": rng.uniform(size=size), "ties": rng.integers(1, 400, size=size) / 400.0,
         "signal": np.where(rng.uniform(size=size) < 0.2, rng.uniform(size=size) * 1e-3, rng.uniform(size=size))}[kind]
    for bound in (0.05, 0.2):
        full = stats.fdr_qvalues(p, method)
        small = p <= bound
        q = stats.fdr_qvalues(p[small], method, tests=size, bound=bound)
        resolved = ~np.isnan(q)
        np.testing.assert_array_equal(resolved, full[small] <= bound)
        np.testing.assert_array_equal(q[resolved], full[small][resolved])
        assert (full[~small] > bound).all()
    with pytest.raises(ValueError, match="together"):
        stats.fdr_qvalues(p, tests=size)
    with pytest.raises(ValueError, match=r"\[0, 0.05\]"):
        stats.fdr_qvalues(np.array([0.01, 0.2]), tests=10, bound=0.05)


def test_harmonic_number_without_an_array_of_its_length():
    assert stats.harmonic_number(1) == 1.0
    small = stats.harmonic_number(1 << 24)
    np.testing.assert_allclose(stats.harmonic_number((1 << 24) + 1), small + 1 / ((1 << 24) + 1), rtol=1e-15)
    np.testing.assert_allclose(stats.harmonic_number(4_000_000_000), np.log(4e9) + np.euler_gamma + 1 / 8e9, rtol=1e-15)


def test_fdr_qvalues_refuse_what_is_not_a_p_value():
    assert np.isnan(stats.fdr_qvalues(np.full(4, np.nan))).all()
    for bad in (-0.1, 1.5, np.inf):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            stats.fdr_qvalues(np.array([0.2, bad, np.nan]))
    with pytest.raises(ValueError, match="method"):
        stats.fdr_qvalues(np.array([0.2]), "holm")


@pytest.mark.parametrize("kind", ["uniform", "ties", "nans", "all nan", "one value"])
def test_ascending_order_sorts_like_numpy_on_several_cores(kind, monkeypatch):
    from fisherjax import backend

    monkeypatch.setattr(stats, "FDR_CHUNK", 50)
    monkeypatch.setattr(stats, "available_cores", lambda: 3)
    monkeypatch.setattr(backend, "available_cores", lambda: 3)
    rng = np.random.default_rng(3)
    x = {"uniform": rng.uniform(size=2001), "ties": rng.integers(0, 4, 2001) / 4.0, "nans": np.where(rng.uniform(size=2001) < 0.4, np.nan, rng.normal(size=2001)),
         "all nan": np.full(2001, np.nan), "one value": np.full(2001, 0.5)}[kind]
    order = stats.ascending_order(x)
    np.testing.assert_array_equal(np.sort(order), np.arange(x.size))  # a permutation
    np.testing.assert_array_equal(x[order], np.sort(x))


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_permutation_pvalue_counts_a_tie_whatever_the_summation_order(alternative):
    """A relabelling that draws the observed labels again gives the observed statistic summed in
    another order: it is a tie and counts, whichever way the rounding fell (scipy's rule); a null
    value that differs by more than rounding does not."""
    rng = np.random.default_rng(0)
    terms = rng.uniform(-1.0, 3.0, size=(200, 3)) * 10.0 ** rng.integers(-2, 3, size=(200, 3))
    observed = terms.sum(0)  # one order
    orders = [terms[::-1].sum(0), np.sort(terms, axis=0).sum(0), np.array([math.fsum(c) for c in terms.T])]
    assert any((o != observed).any() for o in orders)  # the orders really round differently
    shift = {"greater": -1e-9 * np.abs(observed), "less": 1e-9 * np.abs(observed), "two-sided": -1e-9 * observed}[alternative]
    far = observed + shift  # beyond rounding, on the side that does not count
    p = stats.permutation_pvalue(observed, np.stack(orders + [far]), alternative=alternative)
    np.testing.assert_array_equal(p, np.full(3, 4 / 5))
