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

Where even ``G̃`` is too large to hold, the Gram is summed over column slices of it, one
per-sample gradient pass each (:func:`sliced_gram`), and what the products of ``G̃`` gave comes
from passes over the samples instead: ``G̃ᵀ c`` from one weighted gradient
(:func:`combined_gradient`), ``G̃ v`` from one JVP of the logits (:func:`gradients_times`).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fisherjax.curvature.lanczos import Eigen
from fisherjax.curvature.products import count_samples, directional_derivatives
from fisherjax.data import Batch, num_active_tokens
from fisherjax.errors import DataError
from fisherjax.grads import per_sample_grads, sample_losses
from fisherjax.layout import flatten, leaf_paths, unflatten
from fisherjax.models.model import model_jit

__all__ = [
    "column_slices", "combined_gradient", "decoded", "empirical_eigen", "gradients_times", "gram_eigen", "gram_pairs", "gram_top",
    "leaf_columns", "pass_temporaries", "product", "residual_norms", "scaled_gradients", "slice_count", "sliced_gram", "transposed_times",
    "weighted_gradient_pass",
]


def leaf_columns(params) -> tuple[tuple[str, int, int], ...]:
    """``(path, start, stop)`` of every parameter leaf's columns in ``jax.flatten_util.ravel_pytree``
    order (the Fisher operator's, ``G̃``'s), with :func:`fisherjax.layout.leaf_paths`."""
    out, start = [], 0
    for path, leaf in zip(leaf_paths(params), jax.tree.leaves(params), strict=True):
        size = int(np.size(leaf))
        out.append((path, start, start + size))
        start += size
    return tuple(out)


def scaled_gradients(model, params, batches: Sequence[Batch], *, columns: tuple[int, int] | None = None,
                     memory_budget_bytes: float = 1e9, dtype=jnp.float32) -> jax.Array:
    """``G̃ [rows, D]``: ``g_i / sqrt(n T_i)`` for every row of the batches in
    ``jax.flatten_util.ravel_pytree`` order (the Fisher operator's), stored as ``dtype`` (float32,
    or bfloat16 kept as its uint16 bit patterns: see :func:`decoded`), with zero
    rows where a row is not one of the ``n`` samples (filler rows, rows without a predicted token),
    which change neither ``F = G̃ᵀ G̃`` nor its non-zero eigenpairs; with ``columns = (lo, hi)``
    only ``G̃[:, lo:hi]`` (:func:`sliced_gram`), from the per-sample gradients of the leaves those
    columns cross (:func:`leaf_columns`). ``G̃`` is allocated once and each
    parameter's rows are written into its columns in place (a donated buffer), a piece of a batch
    at a time: the largest divisor of the batch whose :data:`PIECE_COPIES` float32 rows of the
    gradients formed fit ``memory_budget_bytes`` (one compiled pass per piece shape), so what is alive besides ``G̃``
    stays within the budget. Every product of this module reads ``G̃`` a column slice at a time in
    float32, so a bfloat16 ``G̃`` (half the memory) costs no float32 copy of it. It is kept as bits
    because XLA:CPU writes rows into a bfloat16 buffer by converting all of it to float32 and back,
    where integer rows are written in place.

    Raises:
      DataError: no sample of the batches predicts a token.
    """
    n = count_samples(batches)
    if n == 0:
        raise DataError("no sample of the batches has a predicted token, so the Fisher is undefined")
    leaves = leaf_columns(params)
    lo, hi = columns if columns is not None else (0, leaves[-1][2])
    crossed = tuple((path, max(lo, start) - start, min(hi, stop) - start) for path, start, stop in leaves if start < hi and stop > lo)
    if not crossed:
        raise ValueError(f"scaled_gradients: columns {columns} lie outside the model's {leaves[-1][2]} parameters")
    sizes = {path: stop - start for path, start, stop in leaves}
    formed = sum(sizes[path] for path, _, _ in crossed)  # the crossed leaves' gradients are formed whole
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"scaled_gradients stores float32 or bfloat16, not {jnp.dtype(dtype)}")
    stored = BFLOAT16_BITS if jnp.dtype(dtype) == jnp.bfloat16 else jnp.float32
    g = jnp.zeros((sum(int(np.shape(b.input_ids)[0]) for b in batches), hi - lo), stored)
    paths = [path for path, _, _ in crossed]
    start = 0
    for batch in batches:
        rows = len(batch.sample_ids)
        piece = max((d for d in range(1, rows + 1) if rows % d == 0 and d * PIECE_COPIES * 4 * formed <= memory_budget_bytes), default=1)
        for part in batch.pieces(piece):
            sample = per_sample_grads(model, params, part, paths=paths, memory_budget_bytes=memory_budget_bytes)
            counted, norms = _row_norms(sample.tokens, part.sample_ids, n)
            scale = np.where(counted, 1.0 / norms, 0.0).astype(np.float32)
            g = _write_rows(g, sample.grads, scale, start, crossed)
            start += piece
            del sample
    return g


def _row_norms(tokens, sample_ids, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(counted, sqrt(n T_i))`` for each row of ``G̃`` (float64): whether the row is one of the
    ``n`` samples (not a filler row, and with a predicted token), and what its gradient is divided by."""
    t = np.asarray(tokens, np.float64)
    return (t > 0) & (np.asarray(sample_ids) >= 0), np.sqrt(n * np.maximum(t, 1.0))


PIECE_COPIES = 2
"""Float32 arrays of the gradients formed per row that :func:`scaled_gradients` counts against its
budget for a piece of a batch: the per-sample gradients and the gradient pass's own (each
parameter's rows go straight into its columns of ``G̃``, without a raveled copy)."""


@functools.partial(jax.jit, donate_argnums=0, static_argnums=4)
def _write_rows(g, grads, scale, start, crossed):
    """``g`` with rows ``start : start + b`` set to the per-sample ``grads`` (flat ``{path: [b,
    ...]}``) times ``scale``: each crossed leaf's raveled columns ``a : e`` (``crossed``: ``(path,
    a, e)`` in column order) into its own columns."""
    column = 0
    for path, first, stop in crossed:
        leaf = grads[path]
        rows = leaf.reshape(leaf.shape[0], -1)[:, first:stop].astype(jnp.float32) * scale[:, None]
        if g.dtype == BFLOAT16_BITS:
            rows = jax.lax.bitcast_convert_type(rows.astype(jnp.bfloat16), BFLOAT16_BITS)  # rounded to nearest
        g = jax.lax.dynamic_update_slice(g, rows, (start, column))
        column += rows.shape[1]
    return g


def slice_count(size: int, rows: int, budget_bytes: float | None, itemsize: int) -> int:
    """How many column slices :func:`column_slices` cuts a ``[rows, size]`` ``G̃`` of ``itemsize``
    bytes a value into so that each fits ``budget_bytes`` (1 when the budget is None or holds all
    of it; a slice has at least one column)."""
    if budget_bytes is None or rows * size * itemsize <= budget_bytes:
        return 1
    return math.ceil(size / max(1, int(budget_bytes // (rows * itemsize))))


def column_slices(size: int, rows: int, budget_bytes: float | None, itemsize: int) -> tuple[tuple[int, int], ...]:
    """``(lo, hi)`` column ranges of a ``[rows, size]`` ``G̃`` of ``itemsize`` bytes a value, as few
    (:func:`slice_count`) and as even as fit ``budget_bytes`` each."""
    width = math.ceil(size / slice_count(size, rows, budget_bytes, itemsize))
    return tuple((lo, min(size, lo + width)) for lo in range(0, size, width))


def sliced_gram(model, params, batches: Sequence[Batch], slices: Sequence[tuple[int, int]], *, memory_budget_bytes: float = 1e9,
                dtype=jnp.float32) -> np.ndarray:
    """``K = G̃ G̃ᵀ = Σ_s G̃_s G̃_sᵀ`` ``[rows, rows]`` (float64 on the host) over the column ranges
    ``slices`` (:func:`column_slices`), one :func:`scaled_gradients` slice alive at a time: the
    Gram of gradients too large to hold, at one per-sample gradient pass per slice (a leaf that
    straddles slices is differentiated in each)."""
    gram = None
    for columns in slices:
        g = scaled_gradients(model, params, batches, columns=columns, memory_budget_bytes=memory_budget_bytes, dtype=dtype)
        part = np.asarray(_gram(g), np.float64)
        del g
        gram = part if gram is None else gram + part
    return gram


def combined_gradient(model, params, batches: Sequence[Batch], c, paths: Sequence[str] | None = None) -> dict[str, jax.Array]:
    """``G̃ᵀ c = Σ_i c_i g_i / sqrt(n T_i)`` on the leaves ``paths`` (every leaf for None), as flat
    ``{path: float32 array}`` (``c`` ``[rows]``, in ``G̃``'s row order: the batches' rows in turn),
    without ``G̃``: per batch one gradient of the weighted loss ``Σ_i c_i L_i / sqrt(n T_i)`` with
    respect to those leaves alone (the others are constants, so no cotangent of theirs is formed),
    added into the running sum in place — the eigenvector ``G̃ᵀ c`` of a Gram formed by
    :func:`sliced_gram`, or its restriction to a group of leaves."""
    n = count_samples(batches)
    c = np.asarray(c, np.float64).reshape(-1)
    paths = tuple(leaf_paths(params)) if paths is None else tuple(paths)
    flat, start = flatten(params), 0
    total = {p: jnp.zeros(np.shape(flat[p]), jnp.float32) for p in paths}  # one program for every batch
    for batch in batches:
        rows = len(batch.sample_ids)
        total = _weighted_gradient(model, paths, params, batch.input_ids, batch.attention_mask, batch.labels,
                                   np.asarray(batch.sample_ids, np.int32), jnp.asarray(c[start : start + rows], jnp.float32), n, total)
        start += rows
    return total


def gradients_times(model, params, batches: Sequence[Batch], v) -> np.ndarray:
    """``G̃ v = (g_i · v / sqrt(n T_i))_i`` ``[rows]`` float64 (``v`` ``[D]`` in ravel order, or
    params-shaped; 0 on rows that are not samples) without ``G̃``: one JVP of the logits per batch
    (:func:`~fisherjax.curvature.products.directional_derivatives`)."""
    n = count_samples(batches)
    tangent = ravel_pytree(params)[1](jnp.asarray(v, jnp.float32)) if isinstance(v, (np.ndarray, jax.Array)) else v
    u = directional_derivatives(model, params, batches, tangent)
    tokens = np.concatenate([np.asarray(num_active_tokens(b.labels, b.attention_mask)) for b in batches])
    counted, norms = _row_norms(tokens, np.concatenate([np.asarray(b.sample_ids) for b in batches]), n)
    return np.where(counted, u / norms, 0.0)


@model_jit(static_argnums=(0, 1, 8), donate_argnums=(9,))
def _weighted_gradient(model, paths, params, ids, mask, labels, sample_ids, c, n, total):
    """``total + Σ_i c_i g_i / sqrt(n T_i)`` over one batch on the leaves ``paths``, flat float32
    (rows without a sample id or a predicted token weigh 0)."""
    flat = flatten(params)

    def loss(chosen):
        losses, tokens = sample_losses(model, unflatten({**flat, **chosen}), ids, mask, labels)
        weights = jnp.where((tokens > 0) & (sample_ids >= 0), c / jnp.sqrt(n * jnp.maximum(tokens, 1).astype(jnp.float32)), 0.0)
        return jnp.sum(weights * losses.astype(jnp.float32))

    grads = jax.grad(loss)({p: flat[p] for p in paths})
    return {p: total[p] + g.astype(jnp.float32) for p, g in grads.items()}


def weighted_gradient_pass(model, paths: Sequence[str], rows: int, seq_len: int) -> jax.stages.Lowered:
    """:func:`combined_gradient`'s per-batch program of the leaves ``paths``, lowered for ``rows ×
    seq_len`` tokens from the parameters' shapes (nothing allocated), for XLA's memory analysis."""
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), model.params)
    ids = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32)
    row = jax.ShapeDtypeStruct((rows,), jnp.int32)
    flat = flatten(params)
    total = {p: jax.ShapeDtypeStruct(flat[p].shape, jnp.float32) for p in paths}
    return _weighted_gradient.lower(model, tuple(paths), params, ids, ids, ids, row, jax.ShapeDtypeStruct((rows,), jnp.float32), 1, total)


_TEMPORARIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
""":func:`pass_temporaries` already measured, per model (weakly held: a dropped model's parameters
are not kept alive by it) and ``(rows, seq_len)``."""


def pass_temporaries(model, rows: int, seq_len: int) -> int | None:
    """XLA's temporaries (``memory_analysis().temp_size_in_bytes``, on the default backend) of one
    weighted gradient pass (:func:`combined_gradient`) over ``rows × seq_len`` tokens that
    differentiates the smallest leaf of the layers, so the backward goes through every layer: the
    activations the backward keeps and the logits' working arrays, what a pass holds beside its
    inputs and outputs. Compiled once per model and shape from the parameters' shapes (nothing is
    allocated); None where the backend does not report it."""
    known = _TEMPORARIES.setdefault(model, {})
    if (rows, seq_len) not in known:
        known[rows, seq_len] = _measured_temporaries(model, rows, seq_len)
    return known[rows, seq_len]


def temporaries_bound(model, rows: int, seq_len: int) -> int:
    """An upper bound of :func:`pass_temporaries` without compiling anything:
    ``8 · rows · seq_len · (L · (20·d + 4·d_ff + 3·heads·seq_len) + 4·vocab)`` bytes, twice a
    float32 count of what a backward keeps a token (every layer's norms, projections, attention
    probabilities and MLP activations, and the logits' working arrays). XLA's figure was 2.3–4.8×
    below it for the 4-layer d = 256 benchmark model, GPT-2 small, Qwen2.5-1.5B and Llama-7B at
    128 and 512 positions (``benchmarks/pass_memory.py``, RESULTS.md): a rule that fits at the
    bound fits, and needs no pass compiled to say so."""
    cfg = model.config
    layer = 20 * cfg.hidden_size + 4 * cfg.intermediate_size + 3 * cfg.num_heads * seq_len
    return 8 * rows * seq_len * (cfg.num_layers * layer + 4 * cfg.vocab_size)


def _measured_temporaries(model, rows: int, seq_len: int) -> int | None:
    flat, specs = flatten(model.params), model.layout.specs
    layered = [p for p in flat if specs[p].layered or specs[p].layer == 0] or list(flat)  # the first layer's
    path = min(layered, key=lambda p: math.prod(np.shape(flat[p])))
    analysis = weighted_gradient_pass(model, (path,), rows, seq_len).compile().memory_analysis()
    temp = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None
    return int(temp) if temp is not None else None


BFLOAT16_BITS = jnp.uint16
"""The dtype a bfloat16 ``G̃`` is kept in: its bit patterns (:func:`scaled_gradients`)."""


def decoded(g: jax.Array) -> jax.Array:
    """``G̃`` (or a slice of it) in float32: as it is, or from bfloat16 bit patterns by a 16-bit
    shift into a float32's high half (exact; as fast as reading float32, where a bitcast to
    bfloat16 and a conversion ran at half the speed on XLA:CPU)."""
    if g.dtype == BFLOAT16_BITS:
        return jax.lax.bitcast_convert_type(g.astype(jnp.uint32) << 16, jnp.float32)
    return g.astype(jnp.float32)


GRAM_COLUMNS = 1 << 15
"""Columns of ``G̃`` per step of its products (:func:`_gram`, :func:`_times`, :func:`_transposed_times`):
32 samples' decoded float32 slice is 4 MB and stays in cache between its decoding and its
products; slices of ``2^19`` columns (64 MB) made the Gram of GPT-2 small's 32 gradients three
times slower on this project's CPU (RESULTS.md, twenty-second session)."""


def _column_steps(g, step, carry):
    """``carry`` through ``step(x, first, carry)`` over the column slices ``x = g[:, first : first +
    w]`` (``w`` = :data:`GRAM_COLUMNS`, then the remainder) in float32. One ``dot`` over all of ``g``
    made XLA:CPU copy ``G̃`` first (a second ``n × D`` array at the phase's peak), and a bfloat16
    ``G̃`` would be decoded whole; the slices cost the same time."""
    steps, rest = divmod(g.shape[1], GRAM_COLUMNS)
    if steps:
        def body(i, carry):
            first = i * GRAM_COLUMNS
            return step(decoded(jax.lax.dynamic_slice_in_dim(g, first, GRAM_COLUMNS, axis=1)), first, carry)

        carry = jax.lax.fori_loop(0, steps, body, carry)
    if rest:
        carry = step(decoded(g[:, steps * GRAM_COLUMNS :]), steps * GRAM_COLUMNS, carry)
    return carry


HIGHEST = jax.lax.Precision.HIGHEST


@jax.jit
def _gram(g):
    """``K = G̃ G̃ᵀ [n, n]``, float32."""
    return _column_steps(g, lambda x, first, total: total + jnp.dot(x, x.T, precision=HIGHEST), jnp.zeros((g.shape[0],) * 2, jnp.float32))


def _times(g, v):
    """``G̃ v``: ``v`` ``[D]`` or ``[D, k]`` → ``[n]`` or ``[n, k]``."""
    def step(x, first, total):
        return total + jnp.dot(x, jax.lax.dynamic_slice_in_dim(v, first, x.shape[1]), precision=HIGHEST)

    return _column_steps(g, step, jnp.zeros((g.shape[0], *v.shape[1:]), jnp.float32))


def _transposed_times(g, c):
    """``G̃ᵀ c``: ``c`` ``[n]`` or ``[n, k]`` → ``[D]`` or ``[D, k]``, each slice's rows written in place."""
    def step(x, first, out):
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.dot(x.T, c, precision=HIGHEST), first, axis=0)

    return _column_steps(g, step, jnp.zeros((g.shape[1], *c.shape[1:]), jnp.float32))


@jax.jit
def product(g: jax.Array, v: jax.Array) -> jax.Array:
    """``F v = G̃ᵀ (G̃ v)`` for ``F = G̃ᵀ G̃`` (``g`` ``[n, D]`` from :func:`scaled_gradients`; ``v`` ``[D]`` or
    ``[D, k]``): exact for the stored ``G̃``, two reads of it instead of a Fisher-vector product's
    linearisation."""
    return _transposed_times(g, _times(g, v.astype(jnp.float32)))


@jax.jit
def transposed_times(g: jax.Array, c: jax.Array) -> jax.Array:
    """``G̃ᵀ c`` (``g`` ``[n, D]`` from :func:`scaled_gradients`, ``c`` ``[n]`` or ``[n, k]``):
    the eigenvectors ``v = G̃ᵀ c`` of ``F`` for the scaled Gram eigenvectors ``c``, float32."""
    return _transposed_times(g, c.astype(jnp.float32))


@jax.jit
def _products_of_combinations(g, coefficients):
    """``[k, n]``: ``G̃ v_j`` with ``v_j = G̃ᵀ c_j`` for each column ``c_j`` of ``coefficients``
    ``[n, k]``: what :func:`gram_top` needs of the float32 eigenvectors, ``‖F v − λ v‖ = ‖G̃ᵀ (G̃ v
    − λ c)‖``. One pass over ``G̃``'s column slices ``x``: each slice of every ``v_j`` is formed in
    float32 (``xᵀ C``, ``[w, k]``) and at once multiplied back (``x (xᵀ C)``), so neither ``[D, k]``
    of them nor ``2k`` reads of ``G̃`` are needed."""
    def step(x, first, total):
        return total + jnp.dot(x, jnp.dot(x.T, coefficients, precision=HIGHEST), precision=HIGHEST)

    return _column_steps(g, step, jnp.zeros((g.shape[0], coefficients.shape[1]), jnp.float32)).T


def empirical_eigen(model, params, batches: Sequence[Batch], k: int, *, memory_budget_bytes: float = 1e9, dtype=jnp.float32) -> Eigen:
    """The ``k`` largest eigenpairs of the empirical Fisher of ``batches`` (module docstring):
    :func:`gram_eigen` of their :func:`scaled_gradients` stored as ``dtype`` (bfloat16: half the
    memory, the eigenvalues those of the rounded gradients).

    Raises:
      ValueError: ``k > n``. DataError: no sample predicts a token.
    """
    return gram_eigen(scaled_gradients(model, params, batches, memory_budget_bytes=memory_budget_bytes, dtype=dtype), k)


def gram_pairs(gram: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(values [k], coefficients [n, k])`` from the Gram ``K = G̃ G̃ᵀ`` ``[n, n]`` (float64): the
    ``k`` largest eigenvalues of ``F = G̃ᵀ G̃`` and the ``c_j = u_j / sqrt(λ_j)`` (``K u_j = λ_j
    u_j``) whose ``G̃ᵀ c_j`` are their unit eigenvectors (module docstring); an eigenvalue 0 gets
    zero coefficients.

    Raises:
      ValueError: ``k`` outside ``[1, n]`` (the rank bound).
    """
    n = gram.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"empirical_eigen: k must lie in [1, n = {n}] (the rank of F is at most n), got {k}")
    values, vectors = np.linalg.eigh((gram + gram.T) / 2)
    values, vectors = np.maximum(values[::-1][:k], 0.0), vectors[:, ::-1][:, :k]
    scale = np.where(values > 0, 1.0 / np.sqrt(np.where(values > 0, values, 1.0)), 0.0)
    return values, vectors * scale


def gram_top(g: jax.Array, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values [k], coefficients [n, k], residuals [k])``: the ``k`` largest eigenvalues of
    ``F = G̃ᵀ G̃`` from the Gram ``K = G̃ G̃ᵀ`` (``g`` ``[n, D]``), exact up to float32 rounding,
    with ``v_j = G̃ᵀ coefficients[:, j]`` (:func:`transposed_times`) their unit eigenvectors and
    ``residuals`` the computed ``‖F v_j − λ_j v_j‖`` of those float32 vectors (two reads of ``g``
    per vector, one for the Gram; the norm comes from the Gram). No ``[D, k]`` array is formed. An
    eigenvalue 0 (samples whose gradients are linearly dependent) gets zero coefficients.

    Raises:
      ValueError: ``k`` outside ``[1, n]`` (the rank bound).
    """
    gram = np.asarray(_gram(g), np.float64)
    values, coefficients = gram_pairs(gram, k)
    gv = np.asarray(_products_of_combinations(g, jnp.asarray(coefficients, jnp.float32)), np.float64).T
    return values, coefficients, residual_norms(gram, gv - coefficients * values)


def residual_norms(gram: np.ndarray, misfit: np.ndarray) -> np.ndarray:
    """``[k]``: ``‖F v_j − λ_j v_j‖ = sqrt(m_jᵀ K m_j)`` for ``v_j = G̃ᵀ c_j`` and the misfits
    ``m_j = G̃ v_j − λ_j c_j`` (``misfit`` ``[n, k]``), since ``F v_j − λ_j v_j = G̃ᵀ m_j``."""
    return np.sqrt(np.maximum(np.einsum("ik,ij,jk->k", misfit, gram, misfit), 0.0))


def gram_eigen(g: jax.Array, k: int) -> Eigen:
    """The ``k`` largest eigenpairs of ``F = G̃ᵀ G̃`` (:func:`gram_top`) as an
    :class:`~fisherjax.curvature.lanczos.Eigen` (``vectors`` ``[D, k]`` float32; ``steps``: the
    rows ``n`` of ``g``).

    Raises:
      ValueError: ``k`` outside ``[1, n]``.
    """
    values, coefficients, residuals = gram_top(g, k)
    return Eigen(values, transposed_times(g, jnp.asarray(coefficients, jnp.float32)), residuals, g.shape[0])
