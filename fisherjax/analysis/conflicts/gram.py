"""Whitened all-pairs Gram matrices of per-sample gradients, overall and per parameter group.

For sample ``i`` with signed token-sum gradient ``g_i`` and a diagonal Fisher ``Î`` the whitened
gradient is ``g̃_i = g_i / sqrt(Î + ε)`` (:func:`whiten`, damping :func:`damping`), and for every
``i ∈ A``, ``j ∈ B``

    cos_ij = ⟨g̃_i, g̃_j⟩ / (‖g̃_i‖ ‖g̃_j‖)            effect_ij = ‖ĝ_i − ĝ_j‖ / 2 = sqrt((1 − cos_ij) / 2)

(``ĝ`` the unit vectors; effect 0 = same direction, 1/√2 = orthogonal, 1 = opposite,
:func:`effect_sizes`). Whitening measures directions in the Fisher metric, so parameters the
tasks barely use do not dominate a cosine merely because their gradients are large.

The dot products are one Gram matrix (:class:`Gram`), accumulated over chunk pairs of samples:
per parameter leaf one GEMM ``[c_a, D] × [D, c_b]`` per parameter *group* (attention head per
(block, layer, head), every other leaf per layer; :class:`~.sources.Grouping`), so per-sample
gradients stream through in chunks and a chunk pair is the most that is ever on the device.
Because groups partition the parameters, ``cos_ij = Σ_g ⟨g̃_i,g, g̃_j,g⟩ / (‖g̃_i‖ ‖g̃_j‖)``: the
per-group *contributions* say which layer, block and head carry a conflict; per-group cosines
are kept too.

Stored tasks (no ``chunk_size``) are read the other way round, one parameter *slice*
at a time (:func:`sliced_grams`): a Gram is a sum over parameters as much as over chunk pairs,
and a slice of every sample of every task — the A × B Gram and the reference Grams together —
fits where a chunk of samples of all parameters may not (64 GPT-2-small samples' attention
gradients are 7 GB). Each gradient is then read, whitened and viewed once, where chunk pairs read
each of B's chunks once per chunk of A and per Gram; the GEMMs are ``[n_a, D] · [D, n_b]``
instead of chunk-sized slivers. Slices cut a leaf along an axis that no group spans (a q/k/v
kernel's input axis, an o kernel's output axis, any axis of a per-layer leaf), so every slice
holds all of the leaf's groups (:func:`parameter_slices`).

On a mesh (``mesh=``, :func:`fisherjax.sharding.check_mesh`) the rows of a Gram (task A's
samples) are split over ``"data"`` in contiguous blocks and the columns (task B's samples) are
broadcast to every device: a parameter slice of every task at a time for stored tasks (each
stored gradient still read once), else chunk by chunk. Each device computes its rows' dot
products against the columns, and the Gram — ``[n_a, n_b]``, per group ``[G, n_a, n_b]``, and
the squared norms — is gathered to the host slice by slice (chunk pair by chunk pair), as
without a mesh. A ``"model"`` axis replicates the work.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Float

from fisherjax import backend
from fisherjax.analysis.conflicts._kernels import (
    PreparedChunk, block_gram, prepared, rows_per_chunk, sharded_block_gram, sharded_slice_dots, slice_dots,
)
from fisherjax.analysis.conflicts.sources import (
    FeatureView, GroupIndex, Grouping, Source, Stream, as_stream, check_same_parameters, grouping_for,
)
from fisherjax.errors import ConfigError, DataError, NumericalError
from fisherjax.fisher.factored import FactoredGrads
from fisherjax.layout import ModelLayout
from fisherjax.progressbar import progress_bar
from fisherjax.sharding import check_mesh, data_size, pad_rows, placements, to_host

__all__ = [
    "Gram",
    "GroupSchedule",
    "GroupSink",
    "ParameterSlice",
    "chunk_count",
    "chunk_size_for",
    "damping",
    "effect_sizes",
    "gram_matrix",
    "group_schedule",
    "grouped_pair_entries",
    "inverse_sqrt",
    "layer_major",
    "leaf_groups",
    "least_slice_groups",
    "open_groups",
    "pair_entries",
    "pairwise_cosines",
    "parameter_slices",
    "slice_groups",
    "slice_dots_fit",
    "sliced_grams",
    "slices_fit",
    "split_sides",
    "tested_cosines",
    "whiten",
]

_STATIC = dict(static=True)

# ---------------------------------------------------------------------------------------------
# Whitening
# ---------------------------------------------------------------------------------------------


def damping(fisher: Mapping[str, Any], *, eps: float = 1e-8, relative_eps: float = 1e-3) -> float:
    """The whitening damping ``ε = max(eps, relative_eps · mean(Î))``, mean over every stored entry.

    A relative floor keeps parameters the Fisher barely saw from being amplified without bound.
    """
    total = sum(float(np.sum(np.asarray(v, np.float64))) for v in fisher.values())
    count = sum(int(np.size(v)) for v in fisher.values())
    return max(eps, relative_eps * total / max(count, 1))


def whiten(
    grads: Mapping[str, Float[Array, "n *shape"]],
    fisher: Mapping[str, Float[Array, "*shape"]],
    eps: float,
) -> dict[str, Float[Array, "n *shape"]]:
    """``g̃ = g / sqrt(Î + ε)`` for every leaf; ``grads`` ``{path: [n, *shape]}``, ``fisher`` ``{path: shape}``."""
    missing = sorted(set(grads) - set(fisher))
    if missing:
        raise DataError(f"no Fisher for the gradients of {missing}")
    out = {}
    for path, g in grads.items():
        f = fisher[path]
        if tuple(np.shape(f)) != tuple(np.shape(g)[1:]):
            raise DataError(f"Fisher of {path!r} has shape {tuple(np.shape(f))}, its gradients {tuple(np.shape(g)[1:])}")
        out[path] = g * jax.lax.rsqrt(jnp.asarray(f, jnp.float32) + eps)
    return out


def inverse_sqrt(fisher: Mapping[str, Any], eps: float, stream: Stream) -> dict[str, Array]:
    """``{path: (Î + ε)^{-1/2}}`` for the parameters of a raw-gradient stream, on the device.

    Raises:
      ConfigError: a pre-grouped (projected) stream, whitened when it was projected.
      DataError: a missing Fisher or one of the wrong shape. NumericalError: NaN, inf or
        negative Fisher entries.
    """
    if stream.grouping is not None:
        raise ConfigError("pre-grouped (projected) gradients are whitened when they are projected; pass fisher there")
    missing = sorted(set(stream.shapes) - set(fisher))
    if missing:
        raise DataError(f"no Fisher for the gradients of {missing}")
    out = {}
    for path, shape in stream.shapes.items():
        f = np.asarray(fisher[path], np.float32)
        if f.shape != shape:
            raise DataError(f"Fisher of {path!r} has shape {f.shape}, its gradients {shape}")
        if not np.all(np.isfinite(f)) or (f < 0).any():
            raise NumericalError(f"Fisher of {path!r} has NaN, inf or negative entries")
        out[path] = jax.lax.rsqrt(jnp.asarray(f) + eps)
    return out


def effect_sizes(cosines: Float[np.ndarray, "*pairs"]) -> Float[np.ndarray, "*pairs"]:
    """``‖ĝ_a − ĝ_b‖ / 2 = sqrt((1 − cos) / 2)`` for unit vectors; 0 aligned, 1/√2 orthogonal, 1 opposite."""
    return np.sqrt(np.clip((1.0 - np.asarray(cosines, np.float64)) / 2.0, 0.0, 1.0))


# ---------------------------------------------------------------------------------------------
# Gram matrices
# ---------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Gram:
    """Dot products of every pair and squared norms, overall and per group.

    ``dots [n_a, n_b]``, ``sq_norms_a [n_a]``, ``sq_norms_b [n_b]`` (float64 on the host);
    ``group_dots [G, n_a, n_b]``, ``group_sq_norms_a [G, n_a]``, ``group_sq_norms_b [G, n_b]``
    (float32, None unless computed ``by_group``); ``groups`` the :class:`~.sources.GroupIndex`.
    A pytree: arrays are leaves, ``groups`` static metadata.
    """

    sample_ids_a: np.ndarray
    sample_ids_b: np.ndarray
    dots: np.ndarray
    sq_norms_a: np.ndarray
    sq_norms_b: np.ndarray
    groups: GroupIndex = dataclasses.field(metadata=_STATIC)
    group_dots: np.ndarray | None = None
    group_sq_norms_a: np.ndarray | None = None
    group_sq_norms_b: np.ndarray | None = None

    @property
    def cosines(self) -> Float[np.ndarray, "n_a n_b"]:
        """``⟨g_i, g_j⟩ / (‖g_i‖ ‖g_j‖)``."""
        return self.dots / np.sqrt(np.outer(self.sq_norms_a, self.sq_norms_b))

    @property
    def group_contributions(self) -> Float[np.ndarray, "groups n_a n_b"]:
        """``⟨g_i,g, g_j,g⟩ / (‖g_i‖ ‖g_j‖)``: sums over groups to :attr:`cosines`."""
        return self.group_dots / np.sqrt(np.outer(self.sq_norms_a, self.sq_norms_b))[None].astype(np.float32)

    @property
    def group_cosines(self) -> Float[np.ndarray, "groups n_a n_b"]:
        """``⟨g_i,g, g_j,g⟩ / (‖g_i,g‖ ‖g_j,g‖)`` (0 where a group's gradient is zero)."""
        denom = np.sqrt(self.group_sq_norms_a[:, :, None] * self.group_sq_norms_b[:, None, :])
        return np.divide(self.group_dots, denom, out=np.zeros_like(self.group_dots), where=denom > 0)

    def tested_group_cosines(self, groups: slice = slice(None)) -> Float[np.ndarray, "groups n_a n_b"]:
        """:attr:`group_cosines` of ``groups`` in float64, NaN (untested) where either side's group
        gradient is zero: what the per-group scope tests, a few groups at a time
        (:func:`tested_cosines`)."""
        return tested_cosines(self.group_dots[groups], self.group_sq_norms_a[groups], self.group_sq_norms_b[groups])


def tested_cosines(
    dots: Float[np.ndarray, "g n_a n_b"], sq_norms_a: Float[np.ndarray, "g n_a"], sq_norms_b: Float[np.ndarray, "g n_b"]
) -> Float[np.ndarray, "g n_a n_b"]:
    """``dots_gij / sqrt(sq_a_gi · sq_b_gj)`` in float64, NaN (untested) where either group
    gradient is zero: the group cosines the per-group scope tests."""
    cosines = sq_norms_a[:, :, None].astype(np.float64) * sq_norms_b[:, None, :]
    np.sqrt(cosines, out=cosines)
    untested = cosines <= 0
    with np.errstate(invalid="ignore", divide="ignore"):
        np.divide(dots, cosines, out=cosines)  # in place: one float64 array, not three
    cosines[untested] = np.nan
    return cosines


def gram_matrix(
    chunks_a: Callable[[], Iterator[PreparedChunk]],
    chunks_b: Callable[[], Iterator[PreparedChunk]],
    grouping: Grouping,
    by_group: bool,
    bar=None,
    mesh: Mesh | None = None,
) -> Gram:
    """The :class:`Gram` of two sides' prepared chunks (:func:`~._kernels.prepared`), one chunk
    pair at a time; ``bar`` (a :func:`fisherjax.progressbar.progress_bar`) advances once per
    chunk pair. With a ``mesh``, ``chunks_a`` are split over ``"data"`` and ``chunks_b``
    replicated (:func:`split_sides`), and each chunk pair is :func:`~._kernels.sharded_block_gram`."""
    members, n_groups = grouping.static_members, len(grouping.index)
    pair_gram = block_gram
    if mesh is not None:
        sharded = sharded_block_gram(mesh, members, n_groups, by_group, backend.map_groups())

        def pair_gram(feat_a, feat_b, members, n_groups, by_group):
            out = sharded(feat_a, feat_b)
            return out if by_group else (out[0], None)
    rows, group_rows, norms_a, norms_b, ids_a, ids_b = [], [], [], [], [], []
    for first_a, (sid_a, feat_a, norm_a, ca) in enumerate(chunks_a()):
        ids_a.append(sid_a)
        norms_a.append(norm_a)
        row, group_row = [], []
        for sid_b, feat_b, norm_b, cb in chunks_b():
            if first_a == 0:
                ids_b.append(sid_b)
                norms_b.append(norm_b)
            total, grouped = pair_gram(feat_a, feat_b, members, n_groups, by_group)
            row.append(to_host(total).astype(np.float64)[:ca, :cb])
            if by_group:
                group_row.append(to_host(grouped)[:, :ca, :cb])
            if bar is not None:
                bar.update(1)
        rows.append(np.concatenate(row, 1))
        if by_group:
            group_rows.append(np.concatenate(group_row, 2))
    group_sq_a, group_sq_b = np.concatenate(norms_a, 1), np.concatenate(norms_b, 1)
    return Gram(
        np.concatenate(ids_a),
        np.concatenate(ids_b),
        np.concatenate(rows, 0),
        group_sq_a.astype(np.float64).sum(0),
        group_sq_b.astype(np.float64).sum(0),
        grouping.index,
        np.concatenate(group_rows, 1) if by_group else None,
        group_sq_a if by_group else None,
        group_sq_b if by_group else None,
    )


CHUNK_BUDGET_BYTES = 4e9
"""Default memory of the two chunks a Gram holds at once (prepared float32 features)."""


def chunk_size_for(chunk_size: int | None, *streams: Stream, budget_bytes: float = CHUNK_BUDGET_BYTES) -> int:
    """The chunk size used: ``chunk_size`` — or, when None, as many samples as fit ``budget_bytes``
    with one chunk per side and two float32 copies of a sample's features each (the stored
    gradient read as float32 and its whitened, grouped view): ``budget / (2 · 2 · 4 · F)``, ``F`` the
    features per sample — capped at the largest stored task when every task is stored (no padding
    beyond the data). A fixed count would not do: 64 GPT-2-small samples are 7 GB of features."""
    if chunk_size is None:
        features = max(sum(math.prod(shape) for shape in s.shapes.values()) for s in streams)
        chunk_size = max(1, int(budget_bytes // (16 * max(features, 1))))
    sizes = [s.size for s in streams if s.size is not None]
    return min(chunk_size, max(sizes)) if sizes and len(sizes) == len(streams) else chunk_size


def chunk_count(stream: Stream, chunk_size: int) -> int | None:
    """Chunks a stream is read in (None for a callable source, whose producer decides)."""
    return None if stream.size is None else math.ceil(stream.size / chunk_size)


def split_sides(
    streams: Mapping[str, Stream], grouping: Grouping, inv_sqrt, chunk_size: int, mesh: Mesh | None
) -> tuple[dict[str, Callable[[], Iterator[PreparedChunk]]], dict[str, Callable[[], Iterator[PreparedChunk]]], dict[str, int | None]]:
    """``(rows, columns, row_chunks)``: each stream prepared as the row side of a Gram and as its
    column side (:func:`~._kernels.prepared`), and how many row chunks it is read in (None for a
    callable source). Without a mesh both sides are one prepared stream of ``chunk_size`` chunks;
    on a mesh rows are split over ``"data"`` in chunks of :func:`~._kernels.rows_per_chunk` and
    columns replicated in chunks of ``chunk_size``."""
    if mesh is None:
        both = {name: prepared(s, grouping, inv_sqrt, chunk_size) for name, s in streams.items()}
        return both, both, {name: chunk_count(s, chunk_size) for name, s in streams.items()}
    rows, columns, counts = {}, {}, {}
    for name, s in streams.items():
        size = rows_per_chunk(s, chunk_size, mesh)
        rows[name] = prepared(s, grouping, inv_sqrt, size, mesh=mesh, split=True)
        columns[name] = prepared(s, grouping, inv_sqrt, chunk_size, mesh=mesh)
        counts[name] = chunk_count(s, size)
    return rows, columns, counts


# ---------------------------------------------------------------------------------------------
# Gram matrices of stored tasks, one parameter slice at a time
# ---------------------------------------------------------------------------------------------

SLICE_BYTES_PER_FEATURE = 12
"""Device bytes per sample and feature of a slice: the stored gradient (at most float32), its
whitened float32 copy and its group-major view."""

SLICE_BUDGET_BYTES = 0.5e9
"""The most one slice of :func:`sliced_grams` takes, whatever the memory budget: once a slice's
GEMMs are a few hundred MB wide a larger slice is no faster, and it only holds memory next to the
stored gradients (for 64 + 64 GPT-2-small samples, 4 GB slices were both slower and 3 GB larger
than 0.5 GB ones: benchmarks/RESULTS.md). It also bounds the dot products of the layers one slice
may hold together, so that the groups read in part (:func:`group_schedule`) are one layer's once
they are large. The budget still decides whether one layer's dot products fit
(:func:`slices_fit`) and the chunk size of the chunk-pair route."""


@dataclasses.dataclass(frozen=True)
class ParameterSlice:
    """``stop - start`` indices of axis ``axis`` of leaf ``path``'s per-sample shape (``axis`` None:
    the whole leaf), within its layers ``layers`` (a range of axis 0 of a layer-stacked leaf; None:
    all of them)."""

    path: str
    axis: int | None = None
    start: int = 0
    stop: int = 0
    layers: tuple[int, int] | None = None

    def take(self, array, batched: bool = True, *, place: Callable[[np.ndarray], Array] | None = None, pad_to: int | None = None):
        """The slice of ``[n, *shape]`` (``batched``) or of ``shape``, contiguous for the transfer
        (read by indexing in one go, so that a stored array read lazily, a memory map or
        :class:`~fisherjax.fisher.factored.FactoredGrads`, reads just this slice). Kept token
        factors are formed on the device, or where ``place`` (a mesh placement of a host array)
        puts them, with ``pad_to`` zero rows after the ``n``
        (:meth:`~fisherjax.fisher.factored.FactoredGrads.on_device`); an array's slice is returned
        on the host, for the caller to place."""
        index = [slice(None)] * (int(batched) + (self.axis + 1 if self.axis is not None else 1))
        if self.layers is not None:
            index[int(batched)] = slice(*self.layers)
        if self.axis is not None:
            index[int(batched) + self.axis] = slice(self.start, self.stop)
        if isinstance(array, FactoredGrads):
            return array.on_device(tuple(index), place, pad_to)
        if place is not None or pad_to is not None:
            raise ValueError("ParameterSlice.take places and pads kept token factors only; place an array's slice yourself")
        return np.ascontiguousarray(array[tuple(index)])

    def on_mesh(self, array, rows: int, split: Callable[[np.ndarray], Array], replicate: Callable[[np.ndarray], Array]) -> tuple[Array, Array]:
        """The slice of one task on a mesh, twice: split over ``"data"`` (zero rows up to ``rows``)
        and replicated. Kept token factors are formed on the devices (each its own rows, then all
        of them); an array's slice is read once on the host (a memory map or spilled store: once
        from disk) and placed twice."""
        if isinstance(array, FactoredGrads):
            return self.take(array, place=split, pad_to=rows), self.take(array, place=replicate)
        part = self.take(array)
        return split(pad_rows(part, rows)), replicate(part)

    def groups(self, members: np.ndarray, n_layers: int) -> np.ndarray:
        """The leaf's group indices ``members`` (layer-major, ``n_layers`` layers) that this slice holds."""
        return members if self.layers is None else members.reshape(n_layers, -1)[slice(*self.layers)].ravel()


def _free_axis(views: tuple[FeatureView, ...], shape: tuple[int, ...]) -> int | None:
    """An axis of ``shape`` that no group of the ``views`` spans, so that slicing it keeps every
    group whole: a q/k/v kernel's input axis, an o kernel's output axis, a pre-grouped feature's
    last axis, a per-layer leaf's longest axis after the layer; None for head biases and scalars."""
    kinds = {v.kind for v in views}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if kind == "in_heads":
        return len(shape) - 2 if len(shape) >= 2 else None
    if kind in ("out_heads", "features"):
        return len(shape) - 1 if len(shape) >= 2 else None
    if kind == "bias_heads":
        return None
    axes = range(1 if kind == "layered" else 0, len(shape))
    return max(axes, key=lambda a: shape[a], default=None)


def parameter_slices(
    shapes: Mapping[str, tuple[int, ...]], grouping: Grouping, samples: int, budget_bytes: float,
    dot_bytes_per_group: float = 0.0, dots_budget_bytes: float = math.inf,
) -> tuple[ParameterSlice, ...]:
    """The slices of every leaf such that ``samples`` samples of one slice take at most
    ``budget_bytes`` on the device (:data:`SLICE_BYTES_PER_FEATURE` per feature): a layer-stacked
    leaf with layer-major groups (:data:`LAYER_MAJOR_VIEWS`) whole layers at a time or, when one
    layer is over the budget, one layer at a time cut along the axis :func:`_free_axis` names;
    other leaves cut along that axis across all their layers; in equal parts (:func:`_even_step`).
    A leaf without such an axis, or one index of it that is already over the budget, is one slice
    or one index per slice: the least that can be read. A slice of a layer-major leaf also holds at
    most as many layers as keep its groups' dot products (``dot_bytes_per_group`` each) within
    ``dots_budget_bytes``. Slices holding all layers come first, then layer by layer, the leaves of
    a layer by their first group: a head group that a kernel and its bias share is complete once
    both are read, before the next block's groups open (:func:`group_schedule`)."""
    most = max(1, int(budget_bytes // (SLICE_BYTES_PER_FEATURE * max(samples, 1))))
    out = []
    for path, shape in shapes.items():
        size = math.prod(shape)
        views = grouping.views_of(path)
        axis = _free_axis(views, shape)
        by_layer = layer_major(views, shape)
        dots_fit = leaf_groups(grouping, path) * dot_bytes_per_group <= dots_budget_bytes
        if (size <= most and (dots_fit or not by_layer)) or (axis is None and not by_layer):
            out.append(ParameterSlice(path))
            continue
        if by_layer:
            per_layer = size // shape[0]
            layer_dots = least_slice_groups(grouping, path, shape) * dot_bytes_per_group
            layers_by_dots = shape[0] if layer_dots <= 0 or math.isinf(dots_budget_bytes) else int(dots_budget_bytes // layer_dots)
            if per_layer <= most or axis is None:  # whole layers (a head bias has no other axis to cut)
                step = _even_step(shape[0], min(most // per_layer, max(layers_by_dots, 1)))
                out.extend(ParameterSlice(path, layers=(a, min(a + step, shape[0]))) for a in range(0, shape[0], step))
                continue
            step = _even_step(shape[axis], most // (per_layer // shape[axis]))
            out.extend(ParameterSlice(path, axis, a, min(a + step, shape[axis]), layers=(layer, layer + 1))
                       for layer in range(shape[0]) for a in range(0, shape[axis], step))
            continue
        step = _even_step(shape[axis], most // (size // shape[axis]))
        out.extend(ParameterSlice(path, axis, a, min(a + step, shape[axis])) for a in range(0, shape[axis], step))

    def order(piece: ParameterSlice) -> tuple[int, int]:
        held = slice_groups(piece, grouping, shapes)
        return -1 if piece.layers is None else piece.layers[0], int(held.min(initial=len(grouping.index)))

    return tuple(sorted(out, key=order))  # stable: a leaf's slices stay in order


LAYER_MAJOR_VIEWS = {"in_heads", "out_heads", "layered"}
"""Views of a layer-stacked leaf whose groups are layer-major: a range of layers holds whole groups,
so :func:`parameter_slices` cuts such a leaf one layer (or a few whole layers) at a time before it
cuts the free axis. A slice is then a few wide GEMMs rather than many thin ones, which is what
re-forming kept token factors (:class:`~fisherjax.fisher.factored.FactoredGrads`) needs."""


def _even_step(length: int, most: int) -> int:
    """At most ``max(most, 1)`` indices per part, in equal parts where a count up to twice the
    least one divides ``length`` (fewer distinct shapes to compile)."""
    step = max(1, most)
    count = math.ceil(length / step)
    even = next((c for c in range(count, 2 * count + 1) if length % c == 0), None)
    return length // even if even is not None else step


def layer_major(views: tuple[FeatureView, ...], shape: tuple[int, ...]) -> bool:
    """Whether a leaf is layer-stacked with layer-major groups, so a slice may hold one layer of it
    (:data:`LAYER_MAJOR_VIEWS`; a layer-stacked q/k/v bias ``[L, width]`` too, whose head groups are
    its kernel's, though no axis of it can be cut within a layer)."""
    kinds = {v.kind for v in views}
    if kinds == {"bias_heads"}:
        return len(shape) == 2
    axis = _free_axis(views, shape)
    return axis is not None and axis >= 1 and len(shape) >= 3 and kinds <= LAYER_MAJOR_VIEWS


def leaf_groups(grouping: Grouping, path: str) -> int:
    """The groups of leaf ``path`` (all its views')."""
    return sum(len(grouping.members[v.key]) for v in grouping.views_of(path))


def least_slice_groups(grouping: Grouping, path: str, shape: tuple[int, ...]) -> int:
    """The fewest groups a slice of leaf ``path`` holds: one layer's of a layer-major leaf
    (:func:`layer_major`), all of any other leaf's."""
    return leaf_groups(grouping, path) // (shape[0] if layer_major(grouping.views_of(path), shape) else 1)


def grouped_pair_entries(streams: Mapping[str, Stream], pairs) -> int:
    """``Σ n_x · n_y`` over the grouped pairs: the float32 dot products a slice holds per group."""
    return pair_entries({name: s.size for name, s in streams.items()}, pairs)


def pair_entries(sizes: Mapping[str, int], pairs) -> int:
    """``Σ n_x · n_y`` over the grouped pairs ``(x, y, by_group)`` of streams of ``sizes`` samples."""
    return sum(sizes[x] * sizes[y] for x, y, grouped in pairs if grouped)


def slices_fit(streams: Mapping[str, Stream], pairs, grouping: Grouping, budget_bytes: float) -> bool:
    """Whether :func:`sliced_grams` applies and its per-slice dot products fit ``budget_bytes``:
    every stream stored, and ``[G_s, n_s, n_t]`` float32 of every grouped pair under the budget for
    the fewest groups ``G_s`` a slice of each leaf can hold — one layer's of a layer-major leaf
    (:func:`parameter_slices` cuts those by layer to fit), all of any other leaf's (thousands of
    samples with hundreds of groups per slice go in chunk pairs)."""
    if any(s.arrays is None or s.size is None or s.sample_ids is None for s in streams.values()):
        return False
    return slice_dots_fit(next(iter(streams.values())).shapes, grouping, grouped_pair_entries(streams, pairs), budget_bytes)


def slice_dots_fit(shapes: Mapping[str, tuple[int, ...]], grouping: Grouping, entries: int, budget_bytes: float) -> bool:
    """Whether ``4 · G_s · entries`` bytes fit ``budget_bytes`` for the fewest groups ``G_s`` a
    slice of each leaf of ``shapes`` can hold (:func:`slices_fit`; ``entries``:
    :func:`grouped_pair_entries`)."""
    least = max((least_slice_groups(grouping, p, shape) for p, shape in shapes.items()), default=0)
    return 4 * least * entries <= budget_bytes


GroupSink = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]
"""Where :func:`sliced_grams` hands a streamed pair's groups as their slices are all read:
``sink(groups [g], dots [g, n_x, n_y], sq_norms_x [g, n_x], sq_norms_y [g, n_y])`` (float32
copies, the sink's to keep or drop)."""


@dataclasses.dataclass(frozen=True)
class GroupSchedule:
    """When the groups of a sequence of :class:`ParameterSlice` are complete (:func:`group_schedule`).

    ``closing[s]``: the groups whose last slice is ``s``; ``slot [G]``: each group's row in a buffer
    of ``capacity`` rows that holds the groups read in part (a row is reused once its group closes);
    ``capacity``: the most groups read in part at once."""

    closing: tuple[np.ndarray, ...]
    slot: np.ndarray
    capacity: int


def slice_groups(piece: ParameterSlice, grouping: Grouping, shapes: Mapping[str, tuple[int, ...]]) -> np.ndarray:
    """The group indices ``piece`` holds, over all its leaf's views."""
    n_layers = shapes[piece.path][0]
    keys = [v.key for v in grouping.views_of(piece.path)]
    return np.concatenate([piece.groups(grouping.members[k], n_layers) for k in keys] or [np.zeros(0, int)])


def group_schedule(slices: tuple[ParameterSlice, ...], grouping: Grouping, shapes: Mapping[str, tuple[int, ...]]) -> GroupSchedule:
    """The :class:`GroupSchedule` of ``slices`` read in order: a group opens at its first slice and
    closes after its last; an opening group takes a row freed by a closed one, else a new row."""
    n_groups = len(grouping.index)
    touched = [slice_groups(piece, grouping, shapes) for piece in slices]
    first, last = np.full(n_groups, len(slices)), np.full(n_groups, -1)
    for s, groups in enumerate(touched):
        first[groups] = np.minimum(first[groups], s)
        last[groups] = s
    slot, free, capacity = np.full(n_groups, -1), [], 0
    for s, groups in enumerate(touched):
        for g in groups[first[groups] == s]:  # setup over groups, once: not the hot path
            if free:
                slot[g] = free.pop()
            else:
                slot[g], capacity = capacity, capacity + 1
        free.extend(sorted(slot[groups[last[groups] == s]], reverse=True))
    closing = tuple(groups[last[groups] == s] for s, groups in enumerate(touched))
    return GroupSchedule(closing, slot, capacity)


def open_groups(shapes: Mapping[str, tuple[int, ...]], grouping: Grouping, sizes: Mapping[str, int], pairs,
                budget_bytes: float = CHUNK_BUDGET_BYTES) -> int:
    """The most groups :func:`sliced_grams` holds a streamed pair's dot products of at once, for
    stored streams of ``sizes`` samples and ``pairs`` ``(x, y, by_group)``: the ``capacity`` of its
    slices' :func:`group_schedule`; all the groups where the slices' dot products do not fit
    ``budget_bytes`` (:func:`slice_dots_fit`: the Grams then go in chunk pairs, whole)."""
    if not slice_dots_fit(shapes, grouping, pair_entries(sizes, pairs), budget_bytes):
        return len(grouping.index)
    return group_schedule(_slices_of(shapes, grouping, sizes, pairs, budget_bytes), grouping, shapes).capacity


def _slices_of(shapes, grouping: Grouping, sizes: Mapping[str, int], pairs, budget_bytes: float) -> tuple[ParameterSlice, ...]:
    """:func:`sliced_grams`' slices (:func:`parameter_slices` of every task's samples)."""
    cap = min(budget_bytes, SLICE_BUDGET_BYTES)
    return parameter_slices(shapes, grouping, sum(sizes.values()), cap, 4.0 * pair_entries(sizes, pairs), cap)


def sliced_grams(
    streams: Mapping[str, Stream],
    pairs: tuple[tuple[str, str, bool], ...],
    grouping: Grouping,
    inv_sqrt: Mapping[str, Array] | None,
    budget_bytes: float = CHUNK_BUDGET_BYTES,
    progress: bool = False,
    desc: str = "Gram",
    mesh: Mesh | None = None,
    sinks: Sequence[GroupSink | None] | None = None,
) -> list[Gram]:
    """The :class:`Gram` of every pair ``(x, y, by_group)`` of stored ``streams``, all in one pass
    over :func:`parameter_slices` (each within ``min(budget_bytes, SLICE_BUDGET_BYTES)``): each
    slice of every task is read once, whitened with ``inv_sqrt`` (``{path: (Î + ε)^{-1/2}}``, None:
    not whitened) and multiplied for every pair (:func:`~._kernels.slice_dots`); the dot products
    add up over slices on the host.
    ``progress``: a bar (``desc``) over the slices. ``mesh``: each slice's rows split over
    ``"data"`` and the slice replicated as the columns (:func:`~._kernels.sharded_slice_dots`):
    still one read of every stored gradient, where chunk pairs would read B once per chunk of A.
    ``sinks`` (one per pair, or None): a grouped pair with a :data:`GroupSink` is *streamed*: its
    group dot products are held only while their groups are read in part (:func:`group_schedule`)
    and handed to the sink as each group's last slice is read, so its ``[G, n_x, n_y]`` array is
    never formed; its Gram has ``group_dots`` None (the group norms and the whole-gradient dot
    products as always).

    Raises:
      NumericalError: a NaN/inf gradient (naming the task, sample and parameter).
    """
    names = list(streams)
    sizes = {name: streams[name].size for name in names}
    ids = {name: np.asarray(streams[name].sample_ids) for name in names}
    sinks = tuple(sinks) if sinks is not None else (None,) * len(pairs)
    if any(sink is not None and not by_group for (_, _, by_group), sink in zip(pairs, sinks)):
        raise ValueError("sliced_grams streams per-group dot products only: give a sink to a pair with by_group=True")
    shapes = streams[names[0]].shapes
    n_groups, members = len(grouping.index), grouping.members
    slices = _slices_of(shapes, grouping, sizes, pairs, budget_bytes)
    schedule = group_schedule(slices, grouping, shapes) if any(sinks) else None
    norms = {name: np.zeros((n_groups, sizes[name]), np.float32) for name in names}
    totals = [np.zeros((sizes[x], sizes[y])) for x, y, _ in pairs]
    grouped = [None if not by_group else np.zeros((schedule.capacity if sink else n_groups, sizes[x], sizes[y]), np.float32)
               for (x, y, by_group), sink in zip(pairs, sinks)]
    static_pairs = tuple((names.index(x), names.index(y), bool(by_group)) for x, y, by_group in pairs)
    weights = None if inv_sqrt is None else {p: np.asarray(w, np.float32) for p, w in inv_sqrt.items()}
    padded = {name: -(-sizes[name] // data_size(mesh)) * data_size(mesh) for name in names} if mesh is not None else sizes
    split, replicate = placements(mesh) if mesh is not None else (None, None)
    with progress_bar(progress, total=len(slices), desc=desc, unit="slice") as bar:
        for at, piece in enumerate(slices):
            stored = tuple(streams[name].arrays[piece.path] for name in names)
            weight = None if weights is None or piece.path not in weights else piece.take(weights[piece.path], batched=False)
            views = grouping.views_of(piece.path)
            if mesh is None:
                bad, piece_norms, dots = slice_dots(tuple(piece.take(x) for x in stored), weight, views, static_pairs)
            else:  # each device forms (kept factors) or receives its rows of every task, and all of them as columns
                rows, columns = zip(*(piece.on_mesh(x, padded[name], split, replicate) for name, x in zip(names, stored)))
                bad, piece_norms, dots = sharded_slice_dots(mesh, views, static_pairs, len(names))(rows, columns, replicate(weight))
            for name, flags in zip(names, bad):
                flags = to_host(flags)[: sizes[name]]
                if flags.any():
                    raise NumericalError(f"task {streams[name].name!r}: gradient of sample {int(ids[name][np.argmax(flags)])} "
                                         f"on {piece.path!r} is NaN or inf")
            n_layers = shapes[piece.path][0]
            for name, by_key in zip(names, piece_norms):
                for key, value in by_key.items():
                    norms[name][piece.groups(members[key], n_layers)] += to_host(value)[:, : sizes[name]]
            for (x, _, by_group), piece_dots, total, group_dots, sink in zip(pairs, dots, totals, grouped, sinks):
                if not by_group:
                    total += to_host(piece_dots)[: sizes[x]]
                    continue
                for key, value in piece_dots.items():
                    value = to_host(value)[:, : sizes[x]]
                    held = piece.groups(members[key], n_layers)
                    group_dots[held if sink is None else schedule.slot[held]] += value
                    total += value.sum(0, dtype=np.float64)
            if schedule is not None and len(closed := schedule.closing[at]):
                for (x, y, _), sink, group_dots in zip(pairs, sinks, grouped):
                    if sink is not None:
                        held = schedule.slot[closed]
                        sink(closed, group_dots[held], norms[x][closed], norms[y][closed])
                        group_dots[held] = 0.0  # the rows go to groups opened later
            bar.update(1)
    return [
        Gram(ids[x], ids[y], total, norms[x].sum(0, dtype=np.float64), norms[y].sum(0, dtype=np.float64), grouping.index,
             None if sink is not None else group_dots, norms[x] if by_group else None, norms[y] if by_group else None)
        for (x, y, by_group), total, group_dots, sink in zip(pairs, totals, grouped, sinks)
    ]


def pairwise_cosines(
    grads_a: Source,
    grads_b: Source,
    *,
    layout: ModelLayout | None = None,
    fisher: Mapping[str, Any] | None = None,
    eps: float = 0.0,
    chunk_size: int | None = None,
    by_group: bool = True,
    progress: bool = False,
    memory_budget_bytes: float = CHUNK_BUDGET_BYTES,
    mesh: Mesh | None = None,
) -> Gram:
    """All-pairs dot products (and so cosines) of per-sample gradients, chunked.

    ``Gram.dots[i, j] = Σ_leaves Σ_groups ⟨g̃_i,g, g̃_j,g⟩`` with ``g̃ = g / sqrt(Î + ε)`` when
    ``fisher`` is given (else ``g̃ = g``). Memory holds one chunk of each side. Use
    :attr:`Gram.cosines` for ``[n_a, n_b]`` cosines.

    Args:
      grads_a, grads_b: sources (stored gradients or chunk streams, see :data:`~.sources.Source`).
      layout: the :class:`~fisherjax.layout.ModelLayout` for per-head groups (else one group per leaf).
      fisher: ``{path: param-shaped}`` diagonal Fisher to whiten with, and ``eps`` its damping.
      chunk_size: samples per chunk (stored sources); a stream's chunks must not exceed it. None:
        stored sources are read by parameter slice (:func:`sliced_grams`) when the slices' dot
        products fit ``memory_budget_bytes``, else in chunks sized from it (:func:`chunk_size_for`).
      by_group: also keep ``[G, n_a, n_b]`` per-group dot products.
      progress: show a progress bar over the chunk pairs.
      mesh: a :class:`jax.sharding.Mesh` with axes ``("data",)`` or ``("data", "model")``: A's
        samples split over ``"data"``, B's chunks broadcast (see the module docstring;
        ``chunk_size`` and the budget are then per device); the Gram is gathered. Callable
        sources are handled chunk by chunk (each of A's chunks zero-padded and split).
    """
    mesh = check_mesh(mesh)
    stream_a, stream_b = as_stream(grads_a, None, "A"), as_stream(grads_b, None, "B")
    check_same_parameters([stream_a, stream_b])
    grouping = stream_a.grouping or grouping_for(stream_a.shapes, layout)
    inv_sqrt = inverse_sqrt(fisher, eps, stream_a) if fisher is not None else None
    streams, pairs = {"a": stream_a, "b": stream_b}, (("a", "b", by_group),)
    if chunk_size is None and slices_fit(streams, pairs, grouping, memory_budget_bytes):
        return sliced_grams(streams, pairs, grouping, inv_sqrt, memory_budget_bytes, progress, f"Gram {stream_a.name} × {stream_b.name}",
                            mesh=mesh)[0]
    size = chunk_size_for(chunk_size, stream_a, stream_b, budget_bytes=memory_budget_bytes)
    rows, columns, counts = split_sides({"a": stream_a, "b": stream_b}, grouping, inv_sqrt, size, mesh)
    total = None if None in (counts["a"], chunk_count(stream_b, size)) else counts["a"] * chunk_count(stream_b, size)
    with progress_bar(progress, total=total, desc=f"Gram {stream_a.name} × {stream_b.name}", unit="chunk pair") as bar:
        return gram_matrix(rows["a"], columns["b"], grouping, by_group, bar, mesh=mesh)
