"""The exact top of an empirical Fisher of few samples, from their ``n × n`` Gram.

Over the ``n`` samples with ``T_i > 0`` the empirical Fisher of :mod:`~fisherjax.curvature.products`
is ``F = (1/n) Σ_i g_i g_iᵀ / T_i = G̃ᵀ G̃`` with rows ``g̃_i = g_i / sqrt(n T_i)`` (``G̃ [n, D]``).
Its non-zero eigenvalues are those of the Gram ``K = G̃ G̃ᵀ [n, n]``, and for ``K u = λ u``
(``‖u‖ = 1``, ``λ > 0``) the vector ``v = G̃ᵀ u / sqrt(λ)`` is a unit eigenvector of ``F``
with ``F v = λ v``. So one pass of per-sample gradients gives every eigenpair of ``F`` exactly,
where Lanczos takes ``steps`` Fisher-vector products, each a linearisation of the logits and its
transpose over every sample (with a large vocabulary the ``[b, t, V]`` tangents make each product
several gradients' worth). When ``n`` is at most the steps Lanczos would take, this route is
both exact and cheaper, and it holds ``n`` vectors of ``D`` floats where Lanczos holds ``steps``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fisherjax.curvature.lanczos import Eigen
from fisherjax.curvature.products import count_samples
from fisherjax.data import Batch
from fisherjax.errors import DataError
from fisherjax.grads import per_sample_grads

__all__ = ["empirical_eigen", "gram_eigen", "product", "scaled_gradients"]


def scaled_gradients(model, params, batches: Sequence[Batch], *, memory_budget_bytes: float = 1e9) -> jax.Array:
    """``G̃ [rows, D]``: ``g_i / sqrt(n T_i)`` for every row of the batches in
    ``jax.flatten_util.ravel_pytree`` order (the Fisher operator's), float32, with zero rows where a
    row is not one of the ``n`` samples (filler rows, rows without a predicted token), which change
    neither ``F = G̃ᵀ G̃`` nor its non-zero eigenpairs. ``G̃`` is allocated once and the rows are
    written into it in place (a donated buffer), a piece of a batch at a time: the largest divisor
    of the batch whose :data:`PIECE_COPIES` model-sized rows fit ``memory_budget_bytes`` (one
    compiled pass per piece shape), so what is alive besides ``G̃`` stays within the budget.

    Raises:
      DataError: no sample of the batches predicts a token.
    """
    n = count_samples(batches)
    if n == 0:
        raise DataError("no sample of the batches has a predicted token, so the Fisher is undefined")
    size = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    g = jnp.zeros((sum(int(np.shape(b.input_ids)[0]) for b in batches), size), jnp.float32)
    start = 0
    for batch in batches:
        rows = len(batch.sample_ids)
        piece = max((d for d in range(1, rows + 1) if rows % d == 0 and d * PIECE_COPIES * 4 * size <= memory_budget_bytes), default=1)
        for first in range(0, rows, piece):
            part = Batch(*(np.asarray(x)[first : first + piece] for x in batch))
            sample = per_sample_grads(model, params, part, memory_budget_bytes=memory_budget_bytes)
            t = np.asarray(sample.tokens, np.float64)
            counted = (t > 0) & (np.asarray(part.sample_ids) >= 0)
            scale = np.where(counted, 1.0 / np.sqrt(n * np.maximum(t, 1.0)), 0.0).astype(np.float32)
            g = _write_rows(g, sample.grads, scale, start)
            start += piece
            del sample
    return g


PIECE_COPIES = 3
"""Model-sized float32 arrays per row that :func:`scaled_gradients` counts against its budget for
a piece of a batch: the per-sample gradients, their raveled rows, and the gradient pass's own."""


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(g, grads, scale, start):
    """``g`` with rows ``start : start + b`` set to the raveled per-sample ``grads`` times ``scale``."""
    rows = jax.vmap(lambda tree: ravel_pytree(tree)[0])(grads) * scale[:, None]
    return jax.lax.dynamic_update_slice_in_dim(g, rows.astype(g.dtype), start, axis=0)


GRAM_COLUMNS = 1 << 19
"""Columns of ``G̃`` per step of :func:`_gram`."""


@jax.jit
def _gram(g):
    """``G̃ G̃ᵀ`` summed over column slices of ``G̃``: one ``dot(g, g.T)`` made XLA:CPU copy all of
    ``G̃`` first (a second ``n × D`` array at the phase's peak); the slices cost the same time."""
    hi = jax.lax.Precision.HIGHEST
    n, d = g.shape
    steps, rest = divmod(d, GRAM_COLUMNS)

    def step(i, total):
        x = jax.lax.dynamic_slice_in_dim(g, i * GRAM_COLUMNS, GRAM_COLUMNS, axis=1)
        return total + jnp.dot(x, x.T, precision=hi)

    total = jnp.zeros((n, n), jnp.float32)
    if steps:
        total = jax.lax.fori_loop(0, steps, step, total)
    if rest:
        x = g[:, steps * GRAM_COLUMNS :]
        total = total + jnp.dot(x, x.T, precision=hi)
    return total


@jax.jit
def product(g: jax.Array, v: jax.Array) -> jax.Array:
    """``F v = G̃ᵀ (G̃ v)`` for ``F = G̃ᵀ G̃`` (``g`` ``[n, D]``, ``v`` ``[D]`` or ``[D, k]``): exact,
    two GEMVs instead of a Fisher-vector product's linearisation."""
    hi = jax.lax.Precision.HIGHEST
    return jnp.dot(g.T, jnp.dot(g, v, precision=hi), precision=hi)


@jax.jit
def _pairs(g, coefficients):
    """``v = G̃ᵀ c`` (unit eigenvectors for the scaled Gram eigenvectors ``c``) and ``G̃ v``: two
    reads of ``g``, from which :func:`gram_eigen` gets ``‖F v − λ v‖ = ‖G̃ᵀ (G̃ v − λ c)‖``."""
    hi = jax.lax.Precision.HIGHEST
    v = jnp.dot(g.T, coefficients, precision=hi)
    return v, jnp.dot(g, v, precision=hi)


def empirical_eigen(model, params, batches: Sequence[Batch], k: int, *, memory_budget_bytes: float = 1e9) -> Eigen:
    """The ``k`` largest eigenpairs of the empirical Fisher of ``batches`` (module docstring):
    :func:`gram_eigen` of their :func:`scaled_gradients`.

    Raises:
      ValueError: ``k > n``. DataError: no sample predicts a token.
    """
    return gram_eigen(scaled_gradients(model, params, batches, memory_budget_bytes=memory_budget_bytes), k)


def gram_eigen(g: jax.Array, k: int) -> Eigen:
    """The ``k`` largest eigenpairs of ``F = G̃ᵀ G̃`` from the Gram ``G̃ G̃ᵀ`` (``g`` ``[n, D]``),
    exact up to float32 rounding, as an :class:`~fisherjax.curvature.lanczos.Eigen` (``steps``:
    the rows ``n`` of ``g``). ``k`` must not exceed ``n`` (the rank bound); ``residuals`` are the computed
    ``‖F v_j − λ_j v_j‖`` of the returned float32 vectors (two reads of ``g`` for the pairs, one for
    the Gram; the norm comes from the Gram, :func:`_pairs`); an eigenvalue 0 (samples whose gradients are linearly dependent) gets a
    zero vector.

    Raises:
      ValueError: ``k > n``.
    """
    n = g.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"empirical_eigen: k must lie in [1, n = {n}] (the rank of F is at most n), got {k}")
    gram = np.asarray(_gram(g), np.float64)
    values, vectors = np.linalg.eigh((gram + gram.T) / 2)
    values, vectors = np.maximum(values[::-1][:k], 0.0), vectors[:, ::-1][:, :k]
    scale = np.where(values > 0, 1.0 / np.sqrt(np.where(values > 0, values, 1.0)), 0.0)
    coefficients = vectors * scale
    v, gv = _pairs(g, jnp.asarray(coefficients, jnp.float32))
    misfit = np.asarray(gv, np.float64) - coefficients * values  # F v − λ v = G̃ᵀ misfit, so its norm² is misfitᵀ K misfit
    residuals = np.sqrt(np.maximum(np.einsum("ik,ij,jk->k", misfit, gram, misfit), 0.0))
    return Eigen(values, v, residuals, n)
