"""The full diagonal Fisher of every parameter, accumulated a piece of a parameter at a time.

``Î = mean_i g_i² / T_i`` over all parameters from materialised per-sample gradients holds
``[batch, P]`` arrays — the gradients, their squares and, for a variance, the Welford
deviations — each several times the model per sample, all written to fresh memory every step
(docs/DECISIONS.md, "The full diagonal"). Every parameter is therefore walked along one axis
(:class:`~fisherjax.fisher.sites.GradWalk`: layers, table rows or output columns), so only one
piece is live at a time, in one of two ways:

* :func:`square_sums` (the default): the running sums ``S = Σ_i w_i g_i²`` with
  ``w_i = 1/T_i`` (0 for skipped and filler rows). On CPU each sample's piece is formed,
  squared and added to the same piece of ``S`` in a loop over samples inside the piece, so the
  piece never leaves the cache and no ``[batch, piece]`` array is written; on GPUs a piece's
  gradients are formed for the whole batch and summed by one product. ``Î = S / n``.
* :func:`diagonal_update` (``diagonal_variance=True``): Welford mean and M2 of ``C_i``, Chan-merged
  a piece at a time, for the variance and intervals of every element — about twice the cost.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from fisherjax.fisher.accumulate import WelfordState, sample_sum, welford_batch, welford_merge
from fisherjax.fisher.sites import GradWalk

PIECE_BYTES = 2**27  # per-sample gradients of one piece, all samples of the batch
SAMPLE_PIECE_BYTES = 2**22  # one sample's piece in the fused loop: a few MB, so it stays in cache


def piece_width(walk: GradWalk, shape: tuple[int, ...], batch: int, piece_bytes: float) -> int:
    """Slices along ``walk.axis`` per piece, so ``batch`` samples of a piece fit ``piece_bytes``."""
    slice_floats = math.prod(shape) // shape[walk.axis]
    return int(max(1, min(walk.size, piece_bytes // (4 * batch * slice_floats))))


def materialised_walk(grads: Float[Array, "batch ..."]) -> GradWalk:
    """A :class:`GradWalk` over per-sample gradients already formed (``[batch, *shape]``), along
    the parameter's first axis: kept contributions need them anyway, so they are not formed twice."""
    return GradWalk(
        0,
        grads.shape[1],
        lambda start, width: jax.lax.dynamic_slice_in_dim(grads, start, width, 1),
        lambda i, start, width: jax.lax.dynamic_slice_in_dim(grads[i], start, width, 0),
    )


def square_sums(
    sums: dict,
    walks: dict[str, GradWalk],
    weights: Float[Array, " batch"],
    *,
    loop: bool,
    piece_bytes: float | None = None,
) -> dict:
    """``sums[path] + Σ_i w_i g_i²`` for every parameter in ``walks`` (``sums``: param-shaped).

    ``weights``: ``w_i = 1/T_i``, 0 for rows that must not count. ``loop`` (CPU): a
    ``fori_loop`` over (piece, sample), samples innermost, each sample's piece formed by
    ``walk.sample`` and squared into the piece of ``sums`` — the piece stays in cache and XLA
    updates ``sums`` in place; ``piece_bytes`` bounds one sample's piece (default
    :data:`SAMPLE_PIECE_BYTES`; layer-stacked kernels go one layer at a time whatever their size).
    Otherwise (GPU) a piece of all samples (:data:`PIECE_BYTES`) is formed at once and summed by
    a product over samples (:func:`~fisherjax.fisher.accumulate.sample_sum`).
    """
    batch = weights.shape[0]
    out = dict(sums)
    for path, walk in walks.items():
        if loop:
            width = piece_width(walk, out[path].shape, 1, SAMPLE_PIECE_BYTES if piece_bytes is None else piece_bytes)
            out[path] = _fused_sums(out[path], walk, width, weights)
        else:
            width = piece_width(walk, out[path].shape, batch, PIECE_BYTES if piece_bytes is None else piece_bytes)
            out[path] = _batched_sums(out[path], walk, width, weights)
    return out


def _pieces(total, walk: GradWalk, width: int, add):
    """Apply ``add(total, start, width)`` over ``walk.size`` in pieces of ``width`` (the last one
    narrower: every slice is added exactly once); ``total`` is any carry (the Welford walk passes
    ``(mean, m2)``)."""
    whole, rest = divmod(walk.size, width)
    if whole == 1 and rest == 0:
        return add(total, 0, width)
    total = jax.lax.fori_loop(0, whole, lambda k, t: add(t, k * width, width), total)
    return add(total, whole * width, rest) if rest else total


def _add_to_piece(total, walk: GradWalk, start, width: int, piece):
    old = jax.lax.dynamic_slice_in_dim(total, start, width, walk.axis)
    return jax.lax.dynamic_update_slice_in_dim(total, old + piece.astype(total.dtype), start, walk.axis)


def _fused_sums(total, walk: GradWalk, width: int, weights):
    """One parameter's ``total + Σ_i w_i g_i²``, sample by sample inside each piece."""
    batch = weights.shape[0]

    def add(total, start, width):
        def one(i, acc):
            g = walk.sample(i, start, width)
            return acc + jnp.where(weights[i] > 0, weights[i] * jnp.square(g), 0.0)  # NaN × 0 would still be NaN

        zero = jnp.zeros(jax.eval_shape(lambda: walk.sample(0, start, width)).shape, total.dtype)
        return _add_to_piece(total, walk, start, width, jax.lax.fori_loop(0, batch, one, zero))

    return _pieces(total, walk, width, add)


def _batched_sums(total, walk: GradWalk, width: int, weights):
    """One parameter's ``total + Σ_i w_i g_i²``, a piece of all samples at a time."""

    def add(total, start, width):
        return _add_to_piece(total, walk, start, width, sample_sum(weights, jnp.square(walk.grads(start, width))))

    return _pieces(total, walk, width, add)


def diagonal_update(
    state: WelfordState,
    walks: dict[str, GradWalk],
    inv_tokens: Float[Array, " batch"],
    valid: Bool[Array, " batch"],
    *,
    piece_bytes: float | None = None,
) -> WelfordState:
    """Merge one batch's ``C_i = g_i² / T_i`` of every parameter in ``walks`` into ``state``.

    ``inv_tokens``: ``1 / T_i`` (0 for skipped samples); rows with ``valid=False`` are ignored.
    ``piece_bytes``: size of one piece's per-sample gradients (default :data:`PIECE_BYTES`).
    """
    piece_bytes = PIECE_BYTES if piece_bytes is None else piece_bytes
    batch = valid.shape[0]
    mean, m2 = dict(state.mean), dict(state.m2)
    for path, walk in walks.items():
        width = piece_width(walk, mean[path].shape, batch, piece_bytes)
        mean[path], m2[path] = _merge_walk(state.count, mean[path], m2[path], walk, width, inv_tokens, valid)
    return WelfordState(state.count + valid.astype(state.count.dtype).sum(), mean, m2)


def _merge_walk(count, mean, m2, walk: GradWalk, width: int, inv_tokens, valid):
    """Chan-merge the batch into ``(mean, m2)`` of one parameter, ``width`` slices at a time."""

    def merge(start, width, mean, m2):
        g = walk.grads(start, width)
        values = jnp.square(g) * inv_tokens.reshape((-1,) + (1,) * (g.ndim - 1))

        def take(x):
            return jax.lax.dynamic_slice_in_dim(x, start, width, walk.axis)

        def put(x, piece):
            return jax.lax.dynamic_update_slice_in_dim(x, piece.astype(x.dtype), start, walk.axis)

        merged = welford_merge(WelfordState(count, take(mean), take(m2)), welford_batch(values, valid))
        return put(mean, merged.mean), put(m2, merged.m2)

    return _pieces((mean, m2), walk, width, lambda carry, start, width: merge(start, width, *carry))
