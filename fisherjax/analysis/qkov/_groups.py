"""Private by purpose: a group of heads of the QK-OV slices, for the tiles of :mod:`._tiles` that
cannot hold a whole layer of task B. A group is some kv heads and the query heads that read them
(:meth:`~fisherjax.layout.ModelLayout.head_group` is its layout); its stored leaves and weights are
the whole model's read through the group's columns (:meth:`~fisherjax.layout.ModelLayout.head_positions`),
taken from what each read selects, so the kernels run on a group as on a whole layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fisherjax.analysis.qkov._operands import BlockKinds, Side, slice_key
from fisherjax.fisher.factored import FactoredGrads
from fisherjax.layout import ModelLayout

__all__ = ["HeadGroup", "TakenLeaf", "group_side", "group_store", "group_weights", "head_groups"]


class HeadGroup(NamedTuple):
    """kv heads ``kv`` and the query heads ``q`` that read them: one group of a part cut by
    :func:`._tiles.head_cut`, viewed with :attr:`layout` (:meth:`ModelLayout.head_group`)."""

    layout: ModelLayout
    kv: slice
    q: slice

    def heads(self, block: str) -> slice:
        """Where the group's heads of ``block`` sit along the whole model's head axis of that block."""
        return self.kv if block in ("k", "v") else self.q


def head_groups(layout: ModelLayout, kv_heads: int) -> list[HeadGroup]:
    """The model's heads in groups of ``kv_heads`` kv heads (all of them: one group, ``layout``
    itself)."""
    group, g = layout.head_group(kv_heads), layout.kv_groups
    return [HeadGroup(group, slice(k, k + kv_heads), slice(k * g, (k + kv_heads) * g)) for k in range(0, layout.num_kv_heads, kv_heads)]


class TakenLeaf:
    """A stored per-sample array (numpy, or staged on the device) read through ``take(·,
    positions, axis)`` along one of its trailing axes, taken from what each read selects
    (``leaf[key]`` indexes the leading sample and layer axes), so no copy of the whole array is
    ever made."""

    def __init__(self, leaf, positions: np.ndarray, axis: int):
        self.leaf, self.positions, self.axis = leaf, positions, axis
        shape = list(np.shape(leaf))
        shape[axis] = len(positions)
        self.shape, self.dtype = tuple(shape), leaf.dtype

    def __getitem__(self, key):
        selected = self.leaf[key]
        return (jnp if isinstance(selected, jax.Array) else np).take(selected, self.positions, axis=self.axis)


def group_store(store: Mapping, layout: ModelLayout, sources: Mapping[str, tuple[str, ...]], group: HeadGroup) -> Mapping:
    """``store`` whose leaves of ``sources`` are read as ``group``'s heads only
    (:meth:`ModelLayout.head_positions`): kept token factors take the group's columns of their
    factors (:meth:`~fisherjax.fisher.factored.FactoredGrads.take`), arrays are taken on read
    (:class:`TakenLeaf`). The whole model's heads: ``store`` itself."""
    if group.layout is layout:
        return store
    kv_start, kv_heads = group.kv.start, group.kv.stop - group.kv.start
    taken = dict(store)
    for paths in sources.values():
        for path in paths:
            positions, axis = layout.head_positions(path, kv_start, kv_heads), layout.leaf_head_axis(path)
            leaf = store[path]
            taken[path] = leaf.take(positions, axis) if isinstance(leaf, FactoredGrads) else TakenLeaf(leaf, positions, axis)
    return taken


def group_side(side: Side, layout: ModelLayout, sources: Mapping[str, tuple[str, ...]], group: HeadGroup) -> Side:
    """``side`` with its store read as ``group``'s heads (:func:`group_store`)."""
    return side._replace(store=group_store(side.store, layout, sources, group))


def group_weights(weights: Mapping[str, np.ndarray], layout: ModelLayout, kinds: BlockKinds, group: HeadGroup) -> dict[str, np.ndarray]:
    """The ``kinds``' weights ``{block/kind: [layer, *view]}`` of ``group``'s heads."""
    keys = [(slice_key(block, kind), block, kind) for block, kind in kinds]
    if group.layout is layout:
        return {key: weights[key] for key, _, _ in keys}
    return {key: np.take(weights[key], np.arange(layout.heads_of(block))[group.heads(block)], axis=layout.head_axis(block, kind))
            for key, block, kind in keys}
