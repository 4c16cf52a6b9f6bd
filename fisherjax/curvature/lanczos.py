"""The spectrum of a symmetric operator known only through products: Lanczos top-k eigenpairs,
Hutchinson's trace and the stochastic-Lanczos-quadrature spectral density.

All three take ``matvec`` (a flat vector ``[size]`` → ``A v`` ``[size]``, e.g.
:meth:`fisherjax.curvature.products.FisherOperator.matvec`) and count their cost in products.

Lanczos (:func:`lanczos`): from a random unit ``q_0``, ``q_{j+1} β_j = A q_j − α_j q_j − β_{j−1}
q_{j−1}`` builds an orthonormal basis ``Q_m`` of the Krylov space with ``Q_mᵀ A Q_m = T_m``
tridiagonal (``α`` on the diagonal, ``β`` beside it). Every new vector is orthogonalised against
*all* previous ones, twice (classical Gram–Schmidt twice is enough, Giraud et al. 2005), so
the basis stays orthonormal to working precision and no spurious copies of converged
eigenvalues appear. The eigenpairs ``(θ_j, s_j)`` of ``T_m`` (``scipy.linalg.eigh_tridiagonal``)
give Ritz pairs ``(θ_j, Q_m s_j)`` with residual ``‖A y_j − θ_j y_j‖ = |β_m s_{m,j}|``, reported.

Why this and not LOBPCG (``jax.experimental.sparse.linalg.lobpcg_standard``) or ARPACK
(``scipy.sparse.linalg.eigsh``): the number of products is exactly ``steps`` — the expensive
part, a forward and backward pass over every batch — with no restarts that discard Krylov
information (ARPACK's implicit restarts, LOBPCG's block iterations of ``k`` products each);
the only other work is orthogonalising against a few dozen vectors, done in float64 on the
host by default; and stopping when the Krylov space is invariant (``β ≈ 0``) is immediate — the
empirical Fisher of ``n`` samples has rank ≤ ``n``, so it is common.

Default steps ``min(size, max(2k + 10, 3k))``: Lanczos converges from the ends of the spectrum
inwards, and with full re-orthogonalisation two to three Krylov dimensions per wanted
eigenvalue resolve the top ``k`` of a spectrum that falls off as fast as a Fisher's; the ``+10``
gives small ``k`` room for a cluster at the top. For ``k = 20`` this is 60 products. Check
``residuals`` (relative to ``values``) and raise ``steps`` when they are not small.

Storage: the basis is ``[steps + 1, size]``, never more. ``dtype=float64`` (the default) keeps it
as a host numpy array (``8 (steps + 1) size`` bytes); ``float32`` keeps it on the default JAX device
(``4 (steps + 1) size`` bytes, GPT-2 small with 60 steps: 30 GB), with each
re-orthogonalisation pass as two GEMVs against the whole buffer (rows not yet written are zero),
which is updated in place (a donated buffer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jaxtyping import Array, Float

from fisherjax.errors import ConfigError
from fisherjax.settings import STATIC

Matvec = Callable[[Array], Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Eigen:
    """The ``k`` largest Ritz pairs.

    Attributes:
      values: ``[k]`` eigenvalue estimates, descending.
      vectors: ``[size, k]`` orthonormal Ritz vectors (numpy for a float64 basis, else jax).
      residuals: ``[k]`` ``‖A y_j − θ_j y_j‖`` (``|β_m s_{m,j}|``; the residual of an eigenpair).
      steps: products taken (``m``; fewer than asked when the Krylov space became invariant).
    """

    values: Float[Array, " k"]
    vectors: Float[Array, "size k"]
    residuals: Float[Array, " k"]
    steps: int = dataclasses.field(metadata=STATIC)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpectralDensity:
    """A Gaussian-broadened spectral density estimated by stochastic Lanczos quadrature.

    Attributes:
      grid: ``[points]`` eigenvalue axis; density: ``[points]`` ``φ(x)`` on it (∫ φ = 1).
      nodes: ``[probes, steps]`` Ritz values ``θ_{p,j}`` of each probe; weights: ``[probes, steps]``
        their quadrature weights ``τ_{p,j}²`` (each probe's sum to 1; 0 on unused steps).
      sigma: the Gaussian's standard deviation.
    """

    grid: Float[Array, " points"]
    density: Float[Array, " points"]
    nodes: Float[Array, "probes steps"]
    weights: Float[Array, "probes steps"]
    sigma: float = dataclasses.field(metadata=STATIC)


# ---- where the vectors live --------------------------------------------------------------------
@jax.jit(donate_argnums=(0,))
def _device_set_row(basis, j, q):
    return basis.at[j].set(q)


@jax.jit
def _device_orthogonalise(basis, w):
    c1 = basis @ w
    w = w - c1 @ basis
    c2 = basis @ w
    return w - c2 @ basis, c1 + c2


class _Basis:
    """The Lanczos vectors ``[steps + 1, size]``: host numpy (float64) or a device buffer."""

    def __init__(self, size: int, rows: int, dtype):
        self.dtype = np.dtype(dtype)
        self.host = self.dtype == np.float64
        self.rows = 0
        self.data = np.zeros((rows, size), self.dtype) if self.host else jnp.zeros((rows, size), self.dtype)

    def asarray(self, x):
        return np.asarray(x, self.dtype) if self.host else jnp.asarray(x, self.dtype)

    def norm(self, x) -> float:
        return float(np.linalg.norm(x)) if self.host else float(jnp.linalg.norm(x))

    def append(self, q) -> None:
        if self.host:
            self.data[self.rows] = q
        else:
            self.data = _device_set_row(self.data, self.rows, q)
        self.rows += 1

    def orthogonalise(self, w):
        """``w`` minus its projection on the basis, twice; and the total coefficients ``[rows]``."""
        if self.host:
            q = self.data[: self.rows]
            c1 = q @ w
            w = w - c1 @ q
            c2 = q @ w
            return w - c2 @ q, c1 + c2
        w, c = _device_orthogonalise(self.data, w)
        return w, np.asarray(c, np.float64)[: self.rows]

    def combine(self, coefficients: np.ndarray):
        """``Q_mᵀ S``: ``[size, k]`` for ``S`` ``[m, k]``."""
        if self.host:
            return self.data[: coefficients.shape[0]].T @ coefficients
        padded = np.zeros((self.data.shape[0], coefficients.shape[1]), np.float64)
        padded[: coefficients.shape[0]] = coefficients
        return self.data.T @ jnp.asarray(padded, self.dtype)


def _random(key, size: int, basis: _Basis, kind: str = "normal"):
    x = jax.random.rademacher(key, (size,), jnp.float32) if kind == "rademacher" else jax.random.normal(key, (size,), jnp.float32)
    return basis.asarray(x)


def _default_tol(result) -> float:
    """The size of ``β`` taken for 0: 100 rounding units of the products' own precision."""
    dtype = np.float32 if isinstance(result, jax.Array) and result.dtype != jnp.float64 else np.asarray(result).dtype
    return 100 * float(np.finfo(dtype if np.issubdtype(dtype, np.floating) else np.float64).eps)


def _tridiagonal(matvec: Matvec, start, steps: int, basis: _Basis, tol: float | None):
    """Lanczos with full re-orthogonalisation from ``start`` (unit norm): ``(α [m], β [m])`` where
    ``β[:-1]`` are the couplings of ``T_m`` and ``β[-1]`` the one that would add ``q_m``."""
    alphas, betas = [], []
    scale = 0.0
    q = start
    basis.append(q)
    for j in range(steps):
        product = matvec(q)
        tol = _default_tol(product) if tol is None else tol
        w, c = basis.orthogonalise(basis.asarray(product))
        alpha, beta = float(c[j]), basis.norm(w)
        alphas.append(alpha)
        betas.append(beta)
        scale = max(scale, abs(alpha) + beta + (betas[-2] if j else 0.0))
        if j == steps - 1 or beta <= tol * scale or basis.rows == basis.data.shape[1]:
            break  # budget spent, or an invariant subspace (T_m's eigenpairs are exact), or size reached
        q = w / beta
        basis.append(q)
    return np.array(alphas), np.array(betas)


def default_steps(size: int, k: int) -> int:
    """Products :func:`lanczos` takes for ``k`` eigenpairs by default: ``min(size, max(2k + 10, 3k))``."""
    return min(size, max(2 * k + 10, 3 * k))


def lanczos(
    matvec: Matvec,
    size: int,
    k: int,
    *,
    steps: int | None = None,
    key: jax.Array,
    dtype=np.float64,
    tol: float | None = None,
) -> Eigen:
    """The ``k`` largest eigenpairs of a symmetric operator from ``steps`` products (module docstring).

    Args:
      matvec: ``v [size] -> A v [size]`` (numpy or jax).
      size: the operator's dimension; k: eigenpairs wanted (``1 ≤ k ≤ size``).
      steps: products at most (default ``min(size, max(2k + 10, 3k))``; at least ``k``).
      key: PRNG key of the random start vector.
      dtype: the basis's dtype: float64 on the host (default) or float32 on the JAX device.
      tol: ``β_j ≤ tol · ‖T‖`` counts as an invariant subspace (default 100 rounding units of the
        products' own dtype).

    Returns:
      :class:`Eigen`. After an early stop at an invariant Krylov space of dimension ``m`` the
      space holds one eigenvector of every distinct eigenvalue of ``A`` (a random start has a
      component along each), so what it misses are further copies of repeated eigenvalues —
      for a Fisher of ``n`` samples, its null space. When ``m < k`` the missing entries are
      padded with eigenvalue 0, unit vectors orthogonal to the basis (and to each other) and
      the residual ``β_m``.
    """
    size, k = int(size), int(k)
    if not 1 <= k <= size:
        raise ConfigError(f"lanczos: k must be between 1 and size = {size}, got {k}")
    steps = default_steps(size, k) if steps is None else int(steps)
    if not k <= steps <= size:
        raise ConfigError(f"lanczos: steps must be between k = {k} and size = {size}, got {steps}")
    basis = _Basis(size, steps + 1, dtype)
    start = _random(key, size, basis)
    alphas, betas = _tridiagonal(matvec, start / basis.norm(start), steps, basis, tol)
    m = len(alphas)
    theta, s = scipy.linalg.eigh_tridiagonal(alphas, betas[:-1])
    order = np.argsort(theta)[::-1][:k]
    values, coefficients = theta[order], s[:, order]
    residuals = np.abs(betas[-1] * coefficients[-1])
    vectors = basis.combine(coefficients)
    if m < k:  # an invariant space smaller than k: pad (see Returns)
        missing = k - m
        pad_keys = jax.random.split(jax.random.fold_in(key, 1), missing)
        extra = []
        for pad_key in pad_keys:
            w, _ = basis.orthogonalise(_random(pad_key, size, basis))
            w = w / basis.norm(w)
            basis.append(w)
            extra.append(w)
        xp = np if basis.host else jnp
        vectors = xp.concatenate([vectors, xp.stack(extra, axis=1)], axis=1)
        values = np.concatenate([values, np.zeros(missing)])
        residuals = np.concatenate([residuals, np.full(missing, betas[-1])])
    return Eigen(values, vectors, residuals, m)


def _check_probes(name: str, probes: int, least: int) -> None:
    if not isinstance(probes, (int, np.integer)) or probes < least:
        raise ConfigError(f"{name}: probes must be an integer ≥ {least}, got {probes!r}")


def hutchinson_trace(matvec: Matvec, size: int, *, probes: int, key: jax.Array) -> tuple[float, float]:
    """Hutchinson's estimate of ``tr A``: ``(1/P) Σ_p z_pᵀ A z_p`` over ``P`` Rademacher probes
    (entries ±1, probe ``p`` from ``fold_in(key, p)``), and its standard error
    ``std_p(z_pᵀ A z_p, ddof=1) / √P``. Unbiased; ``probes ≥ 2``; the quadratic forms in float64."""
    _check_probes("hutchinson_trace", probes, 2)
    forms = []
    for p in range(int(probes)):
        z = np.asarray(jax.random.rademacher(jax.random.fold_in(key, p), (int(size),), jnp.float32), np.float64)
        forms.append(float(z @ np.asarray(matvec(z), np.float64)))
    forms = np.array(forms)
    return float(forms.mean()), float(forms.std(ddof=1) / np.sqrt(len(forms)))


def spectral_density(
    matvec: Matvec,
    size: int,
    *,
    probes: int,
    steps: int,
    key: jax.Array,
    grid: np.ndarray | None = None,
    sigma: float | None = None,
    dtype=np.float64,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017): the spectral density
    ``φ(x) = (1/size) Σ_i δ(x − λ_i)`` broadened by a Gaussian ``N(0, σ²)``.

    For probe ``p`` (Rademacher ``z_p`` from ``fold_in(key, p)``, ``q_0 = z_p / √size``),
    ``steps`` Lanczos steps give ``T_m = S diag(θ) Sᵀ`` and the Gauss quadrature ``q_0ᵀ f(A) q_0 ≈
    Σ_j τ_j² f(θ_j)`` with ``τ_j = S_{0j}``; ``φ(x) ≈ (1/P) Σ_p Σ_j τ_{p,j}² N(x; θ_{p,j}, σ²)``.
    Its mean ``Σ τ² θ / P = (1/P) Σ_p z_pᵀ A z_p / size`` is Hutchinson's trace over ``size``.

    Args:
      grid: where to evaluate ``φ`` (default 1001 points from the smallest node − 5σ to the
        largest + 5σ, which hold all but ~6e-7 of its mass).
      sigma: default 1 % of the nodes' range (1 % of the largest ``|θ|`` when they coincide, 1
        when that is 0).
      dtype: the basis's dtype (see :func:`lanczos`).
    """
    _check_probes("spectral_density", probes, 1)
    size, steps = int(size), int(steps)
    if not 1 <= steps <= size:
        raise ConfigError(f"spectral_density: steps must be between 1 and size = {size}, got {steps}")
    nodes = np.zeros((probes, steps))
    weights = np.zeros((probes, steps))
    for p in range(int(probes)):
        basis = _Basis(size, steps + 1, dtype)
        z = _random(jax.random.fold_in(key, p), size, basis, "rademacher")
        alphas, betas = _tridiagonal(matvec, z / np.sqrt(size), steps, basis, None)
        theta, s = scipy.linalg.eigh_tridiagonal(alphas, betas[:-1])
        nodes[p, : len(theta)] = theta
        weights[p, : len(theta)] = s[0] ** 2
    used = weights > 0
    low, high = nodes[used].min(), nodes[used].max()
    if sigma is None:
        spread = high - low if high > low else abs(high)
        sigma = 0.01 * spread if spread > 0 else 1.0
    sigma = float(sigma)
    if not sigma > 0:
        raise ConfigError(f"spectral_density: sigma must be > 0, got {sigma}")
    grid = np.linspace(low - 5 * sigma, high + 5 * sigma, 1001) if grid is None else np.asarray(grid, np.float64)
    gauss = np.exp(-0.5 * ((grid[:, None, None] - nodes[None]) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
    density = (gauss * weights[None]).sum(axis=(1, 2)) / probes
    return SpectralDensity(grid, density, nodes, weights, sigma)
