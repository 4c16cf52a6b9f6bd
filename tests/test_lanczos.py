"""Lanczos top-k, Hutchinson's trace and stochastic Lanczos quadrature against dense numpy
eigendecompositions (float64), and Lanczos on a model's empirical Fisher against the dense Fisher
of torch.func per-sample gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import padded_batch

from fisherjax import ConfigError
from fisherjax.curvature.lanczos import hutchinson_trace, lanczos, spectral_density


def _matrix(eigenvalues, seed: int = 0) -> np.ndarray:
    """``U diag(λ) Uᵀ`` with a random orthogonal ``U``."""
    n = len(eigenvalues)
    u, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return (u * np.asarray(eigenvalues, np.float64)) @ u.T


def _fisher_like(n: int = 200, seed: int = 0) -> np.ndarray:
    """A PSD matrix whose spectrum falls off like a Fisher's (power law, λ_i ∝ i^-2)."""
    return _matrix(10.0 / np.arange(1, n + 1) ** 2, seed)


@pytest.mark.parametrize("k", [1, 5, 10])
def test_top_k_equals_numpy_eigh(k):
    A = _fisher_like()
    expected_values, expected_vectors = np.linalg.eigh(A)
    expected_values, expected_vectors = expected_values[::-1][:k], expected_vectors[:, ::-1][:, :k]
    result = lanczos(lambda v: A @ v, len(A), k, key=jax.random.key(0))
    assert result.steps == max(2 * k + 10, 3 * k)  # the default rule; no early stop on a full-rank A
    np.testing.assert_allclose(result.values, expected_values, rtol=1e-8, atol=0)
    assert result.values.shape == (k,) and result.vectors.shape == (len(A), k) and result.residuals.shape == (k,)
    np.testing.assert_allclose(np.abs(np.sum(result.vectors * expected_vectors, axis=0)), 1.0, atol=1e-8)
    np.testing.assert_allclose(result.vectors.T @ result.vectors, np.eye(k), atol=1e-12)
    # the reported residuals are the true ones
    true_residuals = np.linalg.norm(A @ result.vectors - result.vectors * result.values, axis=0)
    np.testing.assert_allclose(result.residuals, true_residuals, rtol=1e-3, atol=1e-12)


def test_clustered_spectrum_with_more_steps():
    """Eigenvalues 1.0, 0.999, 0.998: close gaps need more than the default steps, which ``steps``
    gives; the residuals say when it is not enough."""
    values = np.concatenate([[1.0, 0.999, 0.998], np.linspace(0.5, 0.0, 297)])
    A = _matrix(values, seed=1)
    short = lanczos(lambda v: A @ v, len(A), 3, key=jax.random.key(1), steps=12)
    assert short.residuals.max() > 1e-6  # not converged, and it says so
    full = lanczos(lambda v: A @ v, len(A), 3, key=jax.random.key(1), steps=120)
    np.testing.assert_allclose(full.values, values[:3], rtol=1e-8)
    assert full.residuals.max() < 1e-6


def test_low_rank_stops_early_with_zero_eigenvalues():
    """Rank 4 < k = 8: the Krylov space is invariant after rank + 1 (or 2) products; the top 4 are
    exact and the rest 0, with orthonormal vectors that are eigenvectors of 0."""
    rng = np.random.default_rng(2)
    B = rng.normal(size=(150, 4))
    A = B @ B.T
    expected = np.linalg.eigh(A)[0][::-1]
    result = lanczos(lambda v: A @ v, len(A), 8, key=jax.random.key(2))
    assert result.steps <= 6 < max(2 * 8 + 10, 24)
    np.testing.assert_allclose(result.values[:4], expected[:4], rtol=1e-10)
    np.testing.assert_allclose(result.values[4:], 0.0, atol=1e-10 * expected[0])
    np.testing.assert_allclose(result.vectors.T @ result.vectors, np.eye(8), atol=1e-12)
    np.testing.assert_allclose(A @ result.vectors, result.vectors * result.values, atol=1e-10 * expected[0])


def test_float32_basis_on_the_device():
    A = _fisher_like(seed=3)
    expected = np.linalg.eigh(A)[0][::-1][:5]
    A32 = jnp.asarray(A, jnp.float32)
    result = lanczos(lambda v: A32 @ v, len(A), 5, key=jax.random.key(3), dtype=np.float32)
    assert isinstance(result.vectors, jax.Array) and result.vectors.dtype == jnp.float32
    np.testing.assert_allclose(result.values, expected, rtol=1e-5)


def test_arguments_are_checked():
    A = np.eye(5)
    with pytest.raises(ConfigError, match="k must be"):
        lanczos(lambda v: A @ v, 5, 6, key=jax.random.key(0))
    with pytest.raises(ConfigError, match="steps must be"):
        lanczos(lambda v: A @ v, 5, 3, steps=2, key=jax.random.key(0))
    with pytest.raises(ConfigError, match="probes"):
        hutchinson_trace(lambda v: A @ v, 5, probes=1, key=jax.random.key(0))


def test_hutchinson_trace_is_unbiased():
    A = _matrix(np.random.default_rng(4).uniform(0.0, 2.0, 120), seed=4) + 0.3  # off-diagonal mass too
    trace, error = hutchinson_trace(lambda v: A @ v, len(A), probes=50, key=jax.random.key(4))
    assert error > 0 and abs(trace - np.trace(A)) <= 4 * error
    # the standard error is that of the mean of the quadratic forms: over 40 keys, the estimates
    # spread like it (a loose check of both)
    estimates = [hutchinson_trace(lambda v: A @ v, len(A), probes=10, key=jax.random.key(100 + s)) for s in range(40)]
    means, errors = np.array([e[0] for e in estimates]), np.array([e[1] for e in estimates])
    assert abs(means.mean() - np.trace(A)) <= 4 * means.std(ddof=1) / np.sqrt(len(means))
    assert 0.6 <= means.std(ddof=1) / np.sqrt(np.mean(errors**2)) <= 1.6
    # a diagonal matrix: zᵀ D z = tr D for every Rademacher z
    D = np.diag(np.arange(1.0, 31.0))
    trace, error = hutchinson_trace(lambda v: D @ v, 30, probes=3, key=jax.random.key(5))
    assert trace == pytest.approx(np.trace(D), rel=1e-12) and error == pytest.approx(0.0, abs=1e-9)


def test_spectral_density_integrates_to_one_and_has_the_mean_eigenvalue():
    A = _fisher_like(seed=5)
    probes = 20
    density = spectral_density(lambda v: A @ v, len(A), probes=probes, steps=25, key=jax.random.key(6))
    assert np.trapezoid(density.density, density.grid) == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(density.weights.sum(1), 1.0, rtol=1e-10)
    eigenvalues = np.linalg.eigh(A)[0]
    used = density.weights > 0
    assert density.nodes[used].min() >= eigenvalues[0] - 1e-10 and density.nodes[used].max() <= eigenvalues[-1] + 1e-10
    mean = np.trapezoid(density.grid * density.density, density.grid)
    per_probe = (density.weights * density.nodes).sum(1)  # q_0ᵀ A q_0 of each probe
    standard_error = per_probe.std(ddof=1) / np.sqrt(probes)
    assert abs(mean - np.trace(A) / len(A)) <= 4 * standard_error
    assert mean == pytest.approx(per_probe.mean(), rel=1e-4)  # the grid holds the broadened mass


def test_spectral_density_of_a_few_distinct_eigenvalues():
    """Eigenvalues 1, 2 and 5 with multiplicities 60, 30 and 10: three Lanczos steps find them
    exactly, and the quadrature weights are the multiplicities' shares, up to sampling."""
    A = _matrix(np.repeat([1.0, 2.0, 5.0], [60, 30, 10]), seed=6)
    density = spectral_density(lambda v: A @ v, 100, probes=30, steps=6, key=jax.random.key(7), sigma=0.05)
    used = density.weights > 1e-12
    assert np.all(np.min(np.abs(density.nodes[used][:, None] - np.array([1.0, 2.0, 5.0])), axis=1) < 1e-8)
    for value, share in ((1.0, 0.6), (2.0, 0.3), (5.0, 0.1)):
        mass = np.trapezoid(np.where(np.abs(density.grid - value) < 0.5, density.density, 0.0), density.grid)
        assert mass == pytest.approx(share, abs=0.06)


# ---- end to end: the empirical Fisher of a tiny checkpoint ------------------------------------------
def test_lanczos_on_the_empirical_fisher_equals_the_dense_fisher(hf_checkpoint):
    """16 short samples (more than k, so the top 10 are not 0): Lanczos on ``F`` of the whole model
    and on one q head's and one o head's slice equals ``numpy.linalg.eigh`` of the dense Fisher
    from torch.func per-sample gradients (its non-zero eigenvalues are those of the n × n Gram
    ``(1/n) g_i · g_j / √(T_i T_j)``, restricted to the slice's HF entries)."""
    pytest.importorskip("torch")
    import fisherjax
    from fisherjax.curvature.products import fisher_operator, restrict_head
    from fisherjax.data import IGNORE, Batch
    from torch_reference import torch_per_sample_grads

    directory, torch_model = hf_checkpoint("llama")
    model = fisherjax.load_pretrained(directory)
    rng = np.random.default_rng(8)
    lengths = rng.integers(4, 9, size=16)
    ids, mask = padded_batch(rng, lengths, 8, "right")
    labels = np.where(mask == 1, ids, IGNORE).astype(np.int32)
    labels[0, :2] = IGNORE
    batch = Batch(ids, mask, labels, np.arange(16))
    grads = torch_per_sample_grads(torch_model, ids, labels)
    tokens = (labels[:, 1:] != IGNORE).sum(1)
    scale = 1.0 / np.sqrt(16 * tokens)
    hd, k = model.config.head_dim, 10

    def dense_top(select) -> np.ndarray:
        rows = np.concatenate([select(name, g).reshape(16, -1) for name, g in sorted(grads.items())], axis=1) * scale[:, None]
        return np.linalg.eigh(rows @ rows.T)[0][::-1][:k]

    q_head, o_head = 3, 2  # layer 1; q head 3 reads kv head 1
    cases = {
        None: dense_top(lambda name, g: g),
        restrict_head(model.layout, "q", 1, q_head): dense_top(
            lambda name, g: g[:, q_head * hd:(q_head + 1) * hd] if name == "model.layers.1.self_attn.q_proj.weight" else g[:, :0]),
        restrict_head(model.layout, "o", 1, o_head): dense_top(
            lambda name, g: g[:, :, o_head * hd:(o_head + 1) * hd] if name == "model.layers.1.self_attn.o_proj.weight" else g[:, :0]),
    }
    for restriction, expected in cases.items():
        op = fisher_operator(model, model.params, [batch], restrict=restriction)
        result = lanczos(op.matvec, op.size, k, key=jax.random.key(9))
        assert expected[-1] > 1e-3 * expected[0]  # the top k are well away from 0
        np.testing.assert_allclose(result.values, expected, rtol=1e-4, err_msg=str(restriction and restriction.label))
        assert result.steps <= 20 < 30  # rank ≤ 16: invariant after 17 steps, up to rounding; default 30
