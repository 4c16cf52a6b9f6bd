"""Per-sample gradients, grouped and streamed: where Phase 5 reads its inputs.

A :class:`Grouping` assigns every scalar of the selected parameters to a group — one per
(block, layer, head) for attention kernels and biases, one per (parameter, layer) otherwise — so
Gram matrices can be accumulated per group. Where head ``h`` sits along a leaf is
:meth:`~fisherjax.layout.ModelLayout.head_index`'s answer (fused QKV orders and GQA included),
never re-derived here.

Per-sample gradients arrive from a :data:`Source`: stored :class:`~fisherjax.fisher.SampleGrads`
(or a :class:`~fisherjax.fisher.TaskFisher` holding them, read through
:func:`fisherjax.fisher.state.sample_grads_of`), projected :class:`GroupedGrads`
(:mod:`.projection`), or a callable yielding :class:`GradChunk` values on demand, so a task's
gradients never have to be held at once. :func:`as_stream` turns any of them into one
:class:`Stream` shape that the Gram code reads chunk by chunk.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from fisherjax.errors import ConfigError, DataError
from fisherjax.fisher.factored import FactoredGrads
from fisherjax.fisher.state import SampleGrads, TaskFisher, sample_grads_of
from fisherjax.layout import QKV_BLOCKS, ModelLayout, Role

__all__ = [
    "FeatureView",
    "GradChunk",
    "GroupIndex",
    "GroupedGrads",
    "Grouping",
    "Source",
    "Stream",
    "as_stream",
    "check_same_parameters",
    "grouping_for",
]

_STATIC = dict(static=True)  # dataclass field metadata: pytree metadata, not a leaf

# ---------------------------------------------------------------------------------------------
# Parameter groups
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class GroupIndex:
    """The parameter groups a cosine is split into, ``G`` of them.

    Attributes:
      labels: ``[G]`` names, ``"L3.q.h5"`` for an attention head, ``"path@L3"`` for a layer of
        any other leaf, ``"path"`` for an unstacked leaf.
      block: ``[G]`` ``"q" | "k" | "v" | "o"`` for attention heads, ``""`` otherwise.
      layer: ``[G]`` layer index, ``-1`` where unknown.
      head: ``[G]`` head index (kv head for k/v), ``-1`` for non-head groups.
      source: ``[G]`` the parameter path the group comes from (the first one for attention heads
        that several leaves feed, e.g. a q kernel and its bias).

    Equal (and hashed) by content, so it can be static pytree metadata of a :class:`Gram`.
    """

    labels: tuple[str, ...]
    block: np.ndarray
    layer: np.ndarray
    head: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __hash__(self) -> int:
        return hash(self.labels)

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        if not isinstance(other, GroupIndex) or self.labels != other.labels:
            return False
        return all(np.array_equal(getattr(self, f), getattr(other, f)) for f in ("block", "layer", "head", "source"))

    @property
    def is_head(self) -> np.ndarray:
        return self.head >= 0


@dataclasses.dataclass(frozen=True)
class FeatureView:
    """How one feature array ``[n, G_leaf, D]`` is read from a parameter leaf ``[n, *shape]``.

    ``kind``: ``"in_heads"`` (q/k/v kernel: ``index [H, hd]`` picks each head's columns of the
    output axis, features ``[.., H, d_in·hd]``), ``"bias_heads"`` (q/k/v bias, same ``index``),
    ``"out_heads"`` (o kernel: ``index`` picks each head's rows of the input axis), ``"layered"``
    (one group per layer), ``"whole"`` (one group), ``"features"`` (already ``[n, G_leaf, D]``:
    pre-grouped inputs). ``index`` is
    :meth:`~fisherjax.layout.ModelLayout.head_index` as a nested tuple, so a view is hashable and
    the jitted chunk preparation compiles once per model.
    """

    key: str
    path: str
    block: str | None
    kind: str
    index: tuple[tuple[int, ...], ...] | None = None

    def _heads(self, x, axis: int):
        """``x`` with ``axis`` replaced by ``[H, hd]`` head axes: a slice and a reshape when the
        heads are contiguous (separate and GPT-2-fused projections), a gather otherwise (NeoX)."""
        index = np.array(self.index)
        axis = axis % x.ndim
        if np.array_equal(index.ravel(), index.flat[0] + np.arange(index.size)):
            x = jax.lax.slice_in_dim(x, int(index.flat[0]), int(index.flat[0]) + index.size, axis=axis)
            return x.reshape(*x.shape[:axis], *index.shape, *x.shape[axis + 1 :])
        return jnp.take(x, index, axis=axis)

    def apply(self, x: Float[Array, "c *shape"]) -> Float[Array, "c groups dim"]:
        c = x.shape[0]
        if self.kind == "in_heads":
            v = jnp.moveaxis(self._heads(x, -1), -2, -3)  # [c, (L), H, d_in, hd]
            return v.reshape(c, -1, v.shape[-2] * v.shape[-1])
        if self.kind == "bias_heads":
            return self._heads(x, -1).reshape(c, -1, len(self.index[0]))
        if self.kind == "out_heads":
            v = self._heads(x, -2)  # [c, (L), H, hd, d_out]
            return v.reshape(c, -1, v.shape[-2] * v.shape[-1])
        if self.kind == "layered":
            return x.reshape(c, x.shape[1], -1)
        if self.kind == "features":
            return x
        return x.reshape(c, 1, -1)


@dataclasses.dataclass(frozen=True, eq=False)
class Grouping:
    """Maps per-sample gradients to group-major features and features to global groups.

    Attributes:
      index: the :class:`GroupIndex`.
      members: ``{feature key: [G_leaf] global group ids}``.
      views: how each feature is read from raw gradients ``{path: [n, *shape]}``; ``None`` when
        the inputs already are features ``{key: [n, G_leaf, D]}`` (projected gradients).

    Hashed by identity (static pytree metadata of :class:`GroupedGrads`).
    """

    index: GroupIndex
    members: Mapping[str, np.ndarray]
    views: tuple[FeatureView, ...] | None = None

    def views_of(self, path: str) -> tuple[FeatureView, ...]:
        """The views that read parameter ``path`` (a fused QKV leaf has one per block), or, for
        pre-grouped inputs, the identity view of feature ``path``."""
        if self.views is None:
            return (FeatureView(path, path, None, "features"),)
        return tuple(v for v in self.views if v.path == path)

    @functools.cached_property
    def static_members(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """``members`` as nested tuples (a static argument of the jitted kernels)."""
        return tuple((k, tuple(int(i) for i in v)) for k, v in self.members.items())

    def features(self, grads: Mapping[str, Array]) -> dict[str, Array]:
        """``{path: [c, *shape]}`` → ``{key: [c, G_leaf, D]}`` (identity for pre-grouped inputs)."""
        if self.views is None:
            return {k: grads[k] for k in self.members}
        return {view.key: view.apply(grads[view.path]) for view in self.views}


def _nested(index: np.ndarray) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(v) for v in row) for row in index)


def _head_label(block: str, layer: int, head: int) -> str:
    return f"L{layer}.{block}.h{head}"


def _leaf_label(path: str, layer: int) -> str:
    return f"{path}@L{layer}" if layer >= 0 else path


def _build_index(keys: Sequence[tuple]) -> GroupIndex:
    """A :class:`GroupIndex` from group keys ``("head", block, layer, head, source)`` or
    ``("leaf", path, layer)``, in the given order."""
    labels, block, layer, head, source = [], [], [], [], []
    for key in keys:
        if key[0] == "head":
            _, b, lay, h, src = key
            labels.append(_head_label(b, lay, h))
            block.append(b), layer.append(lay), head.append(h), source.append(src)
        else:
            _, path, lay = key
            labels.append(_leaf_label(path, lay))
            block.append(""), layer.append(lay), head.append(-1), source.append(path)
    return GroupIndex(tuple(labels), np.array(block, dtype=object), np.array(layer, int), np.array(head, int), np.array(source, dtype=object))


class _GroupTable:
    """Assigns consecutive ids to group keys (a construction-time helper, never stored)."""

    def __init__(self):
        self.ids: dict[tuple, int] = {}
        self.sources: dict[tuple, str] = {}

    def head(self, block: str, layers: Sequence[int], heads: int, source: str) -> np.ndarray:
        """Ids of ``[len(layers) * heads]`` head groups, layer-major (the feature order)."""
        out = []
        for lay in layers:
            for h in range(heads):
                key = ("head", block, lay, h)
                self.sources.setdefault(key, source)
                out.append(self.ids.setdefault(key, len(self.ids)))
        return np.array(out, int)

    def leaf(self, path: str, layers: Sequence[int]) -> np.ndarray:
        return np.array([self.ids.setdefault(("leaf", path, lay), len(self.ids)) for lay in layers], int)

    def index(self) -> GroupIndex:
        keys = [k + (self.sources[k],) if k[0] == "head" else k for k in self.ids]
        return _build_index(keys)


def _layers_of(spec, shape) -> list[int]:
    if spec.layered:
        return list(range(shape[0]))
    return [spec.layer if spec.layer is not None else -1]


def grouping_for(shapes: Mapping[str, tuple[int, ...]], layout: ModelLayout | None = None) -> Grouping:
    """Groups for raw per-sample gradients of the given parameter shapes ``{path: shape}``.

    With a layout: q/k/v kernels and biases and o kernels split per (block, layer, head) (a fused
    QKV leaf feeds three blocks; a kernel and its bias feed the same head group; k/v have
    ``kv_heads`` groups per layer); every other leaf per layer (stacked leaves) or whole. Without
    a layout: one group per leaf.
    """
    table = _GroupTable()
    views, members = [], {}
    for path, shape in shapes.items():
        spec = layout.spec(path) if layout is not None and path in layout.specs else None
        if layout is not None and spec is None:
            raise DataError(f"gradient {path!r} is not a parameter of this model's layout")
        if spec is not None and tuple(shape) != spec.shape:
            raise DataError(f"gradient {path!r} has shape {tuple(shape)}, the parameter has {spec.shape}")
        if spec is None:
            views.append(FeatureView(path, path, None, "whole"))
            members[path] = table.leaf(path, [-1])
            continue
        layers = _layers_of(spec, shape)
        head_kind = {"kernel": "in_heads", "bias": "bias_heads"}.get(spec.kind)
        if spec.role in (Role.Q, Role.K, Role.V, Role.QKV) and head_kind:
            blocks = QKV_BLOCKS if spec.role == Role.QKV else (spec.role.value,)
            for block in blocks:
                key = f"{path}#{block}" if spec.role == Role.QKV else path
                views.append(FeatureView(key, path, block, head_kind, _nested(layout.head_index(path, block))))
                members[key] = table.head(block, layers, layout.heads_of(block), path)
        elif spec.role == Role.O and spec.kind == "kernel":
            views.append(FeatureView(path, path, "o", "out_heads", _nested(layout.head_index(path))))
            members[path] = table.head("o", layers, layout.heads_of("o"), path)
        elif spec.layered:
            views.append(FeatureView(path, path, None, "layered"))
            members[path] = table.leaf(path, layers)
        else:
            views.append(FeatureView(path, path, None, "whole"))
            members[path] = table.leaf(path, layers)
    return Grouping(table.index(), members, tuple(views))


# ---------------------------------------------------------------------------------------------
# Sources of per-sample gradients
# ---------------------------------------------------------------------------------------------


class GradChunk(NamedTuple):
    """A chunk of per-sample gradients: ``sample_ids [c]`` and ``grads {path: [c, *shape]}``
    (or, for pre-grouped sources, features ``{key: [c, G_leaf, D]}``)."""

    sample_ids: np.ndarray
    grads: Mapping[str, Any]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class GroupedGrads:
    """Per-sample features already split by group, e.g. projected gradients (:mod:`.projection`).

    ``sample_ids [n]``; ``features``: ``{key: [n, G_leaf, D]}``; ``grouping``: their
    :class:`Grouping` (``views`` None); ``whitened``: whether the Fisher whitening was applied
    when they were made. Tasks compared with each other must come from the same projection (same
    random factors). A pytree: the arrays are leaves, ``name``, ``grouping`` and ``whitened``
    static metadata.
    """

    name: str = dataclasses.field(metadata=_STATIC)
    sample_ids: np.ndarray
    features: Mapping[str, Any]
    grouping: Grouping = dataclasses.field(metadata=_STATIC)
    whitened: bool = dataclasses.field(default=False, metadata=_STATIC)

    def __len__(self) -> int:
        return len(self.sample_ids)


Source = TaskFisher | SampleGrads | GroupedGrads | Callable[[], Iterable[GradChunk]]
"""What :func:`~fisherjax.analysis.conflicts.pairwise_cosines` and
:func:`~fisherjax.analysis.conflicts.detect` read: stored gradients (a TaskFisher with kept
per-sample gradients, SampleGrads, GroupedGrads), or a function returning a fresh iterator of
:class:`GradChunk` (gradients computed on the fly; called once per pass)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Stream:
    """One task's per-sample gradients as the Gram code reads them.

    Attributes:
      name: the task's name (for messages and the report).
      chunks: ``chunks(size)`` returns a fresh iterator of :class:`GradChunk` of at most ``size``
        samples (a callable source decides its own chunk size).
      shapes: ``{path or feature key: per-sample shape}``.
      size: the number of samples when known (stored sources), else None.
      grouping: the :class:`Grouping` of pre-grouped features, None for raw gradients.
      whitened: pre-grouped features were whitened when made.
      fisher: returns the task's own diagonal Fisher ``{path: param-shaped}``, None when the
        source has none (streams, projections).
      arrays: the stored ``{path or feature key: [n, *shape]}`` a stored source reads from (None
        for a callable source), so a Gram can read one parameter slice of every sample at once
        (:func:`~.gram.sliced_grams`).
      sample_ids: a stored source's ``[n]`` sample ids in stored order (None for a callable source),
        known without reading a gradient.
    """

    name: str
    chunks: Callable[[int], Iterator[GradChunk]]
    shapes: dict[str, tuple[int, ...]]
    size: int | None
    grouping: Grouping | None
    whitened: bool
    fisher: Callable[[], dict[str, np.ndarray]] | None
    arrays: Mapping[str, Any] | None = None
    sample_ids: np.ndarray | None = None


def _stored_chunks(sample_ids, arrays):
    """Chunks of stored arrays; kept token factors stay factors (formed where the chunk is read)."""
    def rows(v, index: slice):
        return v.take_rows(index) if isinstance(v, FactoredGrads) else v[index]

    def chunks(size: int) -> Iterator[GradChunk]:
        for start in range(0, len(sample_ids), size):
            yield GradChunk(sample_ids[start : start + size], {k: rows(v, slice(start, start + size)) for k, v in arrays.items()})

    return chunks


def as_stream(source: Source, name: str | None = None, default: str = "task") -> Stream:
    """Wrap a :data:`Source` as a :class:`Stream`.

    ``name`` overrides the source's own (a TaskFisher's task, a GroupedGrads' name), then
    ``default``. A TaskFisher's Fisher is its stored full diagonal when that covers the stored
    gradients, else the mean of its per-sample contributions.

    Raises:
      DataError: a TaskFisher without kept per-sample gradients, empty SampleGrads, a stream
        that yields nothing. ConfigError: an iterator (sources are read more than once) or an
        unknown type.
    """
    if isinstance(source, TaskFisher):
        sample_grads, task_name = sample_grads_of(source, name)

        def fisher():
            if source.diagonal is not None and all(p in source.diagonal for p in sample_grads.grads):
                return {p: np.asarray(source.diagonal[p], np.float32) for p in sample_grads.grads}
            return sample_grads.fisher()

        return dataclasses.replace(as_stream(sample_grads, task_name, default), fisher=fisher)
    if isinstance(source, SampleGrads):
        if not source.grads:
            raise DataError(f"task {name or default!r}: its SampleGrads hold no signed gradients")
        ids = np.asarray(source.sample_ids)
        shapes = {p: tuple(np.shape(g)[1:]) for p, g in source.grads.items()}
        return Stream(name or default, _stored_chunks(ids, source.grads), shapes, len(ids), None, False, source.fisher, source.grads, ids)
    if isinstance(source, GroupedGrads):
        ids = np.asarray(source.sample_ids)
        shapes = {k: tuple(np.shape(v)[1:]) for k, v in source.features.items()}
        return Stream(name or source.name, _stored_chunks(ids, source.features), shapes, len(ids), source.grouping, source.whitened, None,
                      source.features, ids)
    if callable(source):
        first = next(iter(source()), None)
        if first is None:
            raise DataError(f"task {name or default!r}: its gradient stream yielded no chunks")
        shapes = {p: tuple(np.shape(g)[1:]) for p, g in first.grads.items()}

        def chunks(size: int) -> Iterator[GradChunk]:
            del size  # the producer decides its chunk size
            return iter(source())

        return Stream(name or default, chunks, shapes, None, None, False, None)
    if isinstance(source, Iterator):
        raise ConfigError("pass a function returning a fresh iterator of GradChunk, not an iterator (sources are read more than once)")
    raise ConfigError(f"cannot read per-sample gradients from {type(source).__name__}")


def check_same_parameters(streams: Sequence[Stream]) -> None:
    """Raise a DataError unless every stream holds gradients of the same parameters and shapes,
    all raw or all pre-grouped with the same groups."""
    first = streams[0]
    for other in streams[1:]:
        if other.shapes != first.shapes:
            only_a = sorted(set(first.shapes) - set(other.shapes))
            only_b = sorted(set(other.shapes) - set(first.shapes))
            shape_diff = sorted(p for p in set(first.shapes) & set(other.shapes) if first.shapes[p] != other.shapes[p])
            raise DataError(
                f"tasks {first.name!r} and {other.name!r} store gradients of different parameters: "
                f"only in {first.name!r}: {only_a}; only in {other.name!r}: {only_b}; different shapes: {shape_diff}"
            )
        if (first.grouping is None) != (other.grouping is None):
            raise DataError(f"tasks {first.name!r} and {other.name!r} mix raw and pre-grouped (projected) gradients")
        if first.grouping is not None and first.grouping.index.labels != other.grouping.index.labels:
            raise DataError(f"tasks {first.name!r} and {other.name!r} were projected with different groupings")
