"""The batched kernel: whole head-major operands of both tasks, then one batched split-K GEMM per
part — what a GPU wants (``layer · heads · split`` independent GEMMs in one call).

``M = A · Gᵀ`` per (layer, head) slice: :func:`leaf_operand` builds
``A [layer, head, split, c_a, slice/split]`` (weighted) and ``G [..., c_b, ...]`` from the stored
leaves in one jitted pass (views, transform, weighting and the move to head-major fuse), and
:func:`products` contracts them: ``einsum('lhkcs,lhkbs->lhcb')`` summed over the split.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from fisherjax.analysis.qkov._operands import PRECISIONS, BlockKinds, head_major, per_block, views_of, weighted
from fisherjax.layout import ModelLayout


def operand(views: Mapping[str, Array], scale: Array, weights: Mapping[str, Array] | None, *, transform: str, split_k: int = 1) -> dict[str, Array]:
    """One side of the GEMM, head-major: ``transform(x_i) · scale_i · w`` (:func:`~._operands.head_major`).

    ``views``: ``{block/kind: [c, layer, *view]}``; ``scale``: ``[c]``; ``weights``: ``{block/kind:
    [layer, *view]}`` — ``1/(Î+λ)`` (or its 3/2 power) on task A's side, ``None`` on task B's.
    Returns ``{block/kind: [layer, heads, split, c, slice / split]}``.
    """
    out = {}
    for key, x in views.items():
        block, kind = key.split("/")
        out[key] = head_major(weighted(x, transform, scale, None if weights is None else weights[key]), block, kind, split_k)
    return out


operand_jit = jax.jit(operand, static_argnames=("transform", "split_k"))
""":func:`operand`, jitted."""


def leaf_operand(
    leaves: Mapping[str, Array], scale: Array, weights: Mapping[str, Array] | None, *, layout: ModelLayout, kinds: BlockKinds,
    transform: str, split_k: int,
) -> dict[str, Array]:
    """:func:`operand` of the layout's head views of stored leaves ``{leaf key: [c, layer, *shape]}``."""
    return operand(views_of(layout, leaves, kinds), scale, weights, transform=transform, split_k=split_k)


leaf_operand_jit = jax.jit(leaf_operand, static_argnames=("layout", "kinds", "transform", "split_k"))
""":func:`leaf_operand`, jitted: views, weighting and the move to head-major fuse into one pass."""


def products(a: Mapping[str, Array], b: Mapping[str, Array], *, precision: str) -> dict[str, Float[Array, "layer c_a c_b heads"]]:
    """``M = A · Gᵀ`` per (layer, head) slice: per part one batched GEMM over (layer, head, split)
    and a sum over the split and the parts: ``{block: [layer, c_a, c_b, heads]}``."""

    def term(key):
        partial = jnp.einsum("lhkcs,lhkbs->lhkcb", a[key], b[key], precision=PRECISIONS[precision], preferred_element_type=jnp.float32)
        return partial.sum(axis=2)

    return per_block((key.split("/")[0], term(key)) for key in sorted(a))


products_jit = jax.jit(products, static_argnames=("precision",))
""":func:`products`, jitted."""
