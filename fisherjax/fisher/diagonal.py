"""The full diagonal Fisher of every parameter, accumulated a piece of a parameter at a time.

``Î = mean_i g_i² / T_i`` over all parameters from materialised per-sample gradients holds
``[batch, P]`` arrays: the gradients, their squares and the Welford deviations, each several times
the model per sample, all written to fresh memory every step (docs/DECISIONS.md, "The full
diagonal"). Here every parameter is walked along one axis
(:class:`~fisherjax.fisher.sites.GradWalk`: layers, table rows or output columns); a piece's
per-sample gradients are formed, squared, divided by ``T_i`` and Chan-merged into the same piece
of the running state inside a ``fori_loop``, so only one piece is live at a time. The result is
that of :func:`~fisherjax.fisher.accumulate.welford_update` on the materialised ``C_i``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from fisherjax.fisher.accumulate import WelfordState, welford_batch, welford_merge
from fisherjax.fisher.sites import GradWalk

PIECE_BYTES = 2**27  # per-sample gradients of one piece, all samples of the batch


def piece_width(walk: GradWalk, shape: tuple[int, ...], batch: int, piece_bytes: float) -> int:
    """Slices along ``walk.axis`` per piece, so ``batch`` samples of a piece fit ``piece_bytes``."""
    slice_floats = math.prod(shape) // shape[walk.axis]
    return int(max(1, min(walk.size, piece_bytes // (4 * batch * slice_floats))))


def materialised_walk(grads: Float[Array, "batch ..."]) -> GradWalk:
    """A :class:`GradWalk` over per-sample gradients already formed (``[batch, *shape]``), along
    the parameter's first axis: kept contributions need them anyway, so they are not formed twice."""
    return GradWalk(0, grads.shape[1], lambda start, width: jax.lax.dynamic_slice_in_dim(grads, start, width, 1))


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

    whole, rest = divmod(walk.size, width)
    if whole == 1 and rest == 0:
        return merge(0, width, mean, m2)
    mean, m2 = jax.lax.fori_loop(0, whole, lambda k, carry: merge(k * width, width, *carry), (mean, m2))
    if rest:
        mean, m2 = merge(whole * width, rest, mean, m2)
    return mean, m2
