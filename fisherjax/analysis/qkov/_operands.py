"""What every QK-OV kernel shares: the slices' (block, kind) parts, the side of the product read
from the stored per-sample leaves, the elementwise transforms and precisions, the weighting, head
views of leaves, the head-major move and the per-block sums.

A slice product is ``Σ_k a_ik · b_jk`` with ``a_i = f_a(stored_i) · s_i · w`` (task A, weighted
by ``w = 1/(Î+λ)`` or its 3/2 power) and ``b_j = f_b(stored_j) · s_j`` (task B), where ``f`` is a
:data:`TRANSFORMS` entry and ``s`` a per-sample factor (:class:`Side`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from fisherjax.fisher.factored import TRANSFORMS
from fisherjax.fisher.state import SampleGrads
from fisherjax.layout import ModelLayout


PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "high": jax.lax.Precision.HIGH, "default": jax.lax.Precision.DEFAULT}
"""GEMM precision by name (:attr:`~fisherjax.analysis.qkov.KernelOptions.precision`)."""

BlockKinds = tuple[tuple[str, str], ...]
"""The ``(block, kind)`` parts that make up the slices, e.g. ``(("q", "kernel"), ("q", "bias"), ...)``."""


def block_kinds(layout: ModelLayout, include_bias: bool) -> BlockKinds:
    """The ``(block, kind)`` parts of the layout's slices: every kernel, and q/k/v biases when
    ``include_bias``."""
    return tuple((b, k) for b, k in layout.attention_blocks() if k == "kernel" or include_bias)


def slice_key(block: str, kind: str) -> str:
    """``"block/kind"``: the key of a part's views and weights."""
    return f"{block}/{kind}"


def leaf_sources(layout: ModelLayout, kinds: BlockKinds) -> dict[str, tuple[str, ...]]:
    """``{leaf key: source paths in layer order}``: the stored leaves the parts are viewed from.

    The key is the first source path; a layer-stacked leaf is its own single source, a model with
    one leaf per layer has one source per layer. Q, K and V of a fused projection share a leaf,
    which is therefore moved to the device once.
    """
    return {sources[0]: tuple(sources) for sources in (tuple(layout.block_sources(b, k)) for b, k in kinds)}


class Side(NamedTuple):
    """Where one side of the GEMM comes from: ``x_i = transform(store_i) · scale_i``."""

    store: Mapping[str, np.ndarray]
    """``{path: [n, *shape]}`` stored per-sample arrays."""
    transform: str
    """A :data:`TRANSFORMS` key."""
    scale: np.ndarray
    """``[n]`` float32 per-sample factor."""


def side_of(samples: SampleGrads, role: str, variant: str) -> Side:
    """Task A's (``role="a"``) or B's factor of the slice product, read from what is stored.

    A: ``C_i`` (``g_i`` for signed, ``sqrt(C_i)`` for symmetric); B: ``|g_j|`` (``g_j`` for signed,
    ``sqrt(C_j)`` for symmetric). Contributions derived from gradients (the empirical Fisher stores
    only ``g``) are formed on the device from ``g`` and ``1/T``, so ``g²`` is never built on the
    host: ``C = g² · (1/T)``, ``sqrt(C) = |g| · sqrt(1/T)``. (The partner factor ``s_j`` of
    ``normalize_gj`` is applied to the finished sums, not here.)
    """
    ones = np.ones(len(samples), np.float32)
    wants = "grads" if variant == "signed" or (role == "b" and variant != "symmetric") else "contributions"
    if wants == "grads":
        return Side(samples.grads, "identity" if variant == "signed" else "abs", ones)
    if samples.derived:
        inv_tokens = samples.contributions.inv_tokens
        if variant == "symmetric":
            return Side(samples.grads, "abs", np.sqrt(inv_tokens))
        return Side(samples.grads, "square", inv_tokens)
    return Side(samples.contributions, "sqrt" if variant == "symmetric" else "identity", ones)


def views_of(layout: ModelLayout, leaves: Mapping[str, Array], kinds: BlockKinds) -> dict[str, Array]:
    """``{block/kind: [c, layer, *view]}``: the layout's head views of ``{leaf key: [c, layer, *shape]}``."""
    views = {}
    for block, kind in kinds:
        key = layout.block_sources(block, kind)[0]
        views[slice_key(block, kind)] = layout.view(key, leaves[key], block, per_layer=True)
    return views


def weighted(x: Array, transform: str, scale: Array, weight: Array | None) -> Array:
    """``transform(x_i) · scale_i · w`` in float32: ``x`` ``[c, ...]``, ``scale`` ``[c]``, ``weight``
    ``x.shape[1:]`` (``1/(Î+λ)`` on task A's side) or ``None``."""
    x = TRANSFORMS[transform](x.astype(jnp.float32)) * scale.reshape((-1,) + (1,) * (x.ndim - 1))
    return x if weight is None else x * weight[None]


def head_major(x: Array, block: str, kind: str, split_k: int) -> Float[Array, "layer heads split c s"]:
    """A view with a leading sample axis ``[c, layer, *view]`` → ``[layer, heads, split, c, slice / split]``.

    The slice (contraction) axis is cut into ``split`` pieces that become a batch axis of the GEMM
    (split-K: each piece is one more independent GEMM; the pieces are summed afterwards). Kernels
    split their non-head axis (``d_in`` for q/k/v, ``d_out`` for o) by ``gcd(axis, split_k)``;
    biases do not split.
    """
    c, layers = x.shape[:2]
    if kind == "bias":  # [c, l, h, e]
        return jnp.transpose(x, (1, 2, 0, 3))[:, :, None]
    if block == "o":  # [c, l, h, e, d_out]
        heads, e, d = x.shape[2:]
        k = math.gcd(d, split_k)
        moved = jnp.transpose(x.reshape(c, layers, heads, e, k, d // k), (1, 2, 4, 0, 3, 5))
    else:  # [c, l, d_in, h, e]
        d, heads, e = x.shape[2:]
        k = math.gcd(d, split_k)
        moved = jnp.transpose(x.reshape(c, layers, k, d // k, heads, e), (1, 4, 2, 0, 3, 5))
    return moved.reshape(*moved.shape[:4], -1)


def per_block(terms: Iterable[tuple[str, Array]]) -> dict[str, Float[Array, "layer c_a c_b heads"]]:
    """Sum ``(block, [layer, head, c_a, c_b])`` terms (kernel, bias) per block:
    ``{block: [layer, c_a, c_b, heads]}``."""
    out: dict[str, Array] = {}
    for block, term in terms:
        out[block] = out[block] + term if block in out else term
    return {block: jnp.transpose(value, (0, 2, 3, 1)) for block, value in out.items()}
