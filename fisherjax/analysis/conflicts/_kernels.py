"""Private by purpose: the jitted pieces of a Gram, for :mod:`.gram` (and tests/benchmarks that
check one path against another).

A chunk of per-sample gradients is whitened, viewed as group-major features
``{key: [c, G_leaf, D]}`` (:class:`~.sources.Grouping`), padded to the chunk size (one compile
per model and chunk size) and reduced to squared group norms in one jitted pass
(:func:`prepare_chunk`); a chunk pair's dot products are one GEMM ``[c_a, D] · [D, c_b]`` per
group (:func:`block_gram`).

A stored task can also be read one parameter *slice* at a time (:func:`slice_dots`): every
sample's gradient of one slice of one leaf, for all tasks of the Grams at once, whitened, viewed
group-major ``[G_leaf, n, D]`` and multiplied pair by pair. Each stored gradient is then read and
whitened once, however many Grams and samples there are (:func:`~.gram.sliced_grams`).

On a mesh the row side of a Gram is split over ``"data"`` (each chunk zero-padded to whole rows
per device, prepared and multiplied under ``jax.shard_map``: :func:`sharded_prepare`,
:func:`sharded_block_gram`) and the column side is replicated (its chunks prepared on every
device); each device computes its rows against the whole column chunk, and only the dot products
and norms (the summaries) come back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from jaxtyping import Array, Float

from fisherjax import backend
from fisherjax.analysis.conflicts.sources import Grouping, Stream
from fisherjax.errors import ConfigError, DataError, NumericalError
from fisherjax.fisher.factored import read_on_device
from fisherjax.sharding import DATA, data_size, placements, put_replicated, to_host

__all__ = [
    "PreparedChunk",
    "block_gram",
    "prepare_chunk",
    "prepared",
    "prepared_chunks",
    "rows_per_chunk",
    "sharded_block_gram",
    "sharded_prepare",
    "sharded_slice_dots",
    "slice_dots",
]

PreparedChunk = tuple[np.ndarray, dict[str, Array], np.ndarray, int]
"""``(sample_ids [c], features {key: [size, G_leaf, D]} padded to the chunk size, squared group
norms [G, c], real count c)``."""


@functools.partial(jax.jit, static_argnames=("members", "n_groups", "by_group", "mapped"))
def _block_gram(features_a, features_b, members, n_groups, by_group, mapped):
    hi = jax.lax.Precision.HIGHEST
    if not by_group:
        total = sum(
            jnp.dot(features_a[k].reshape(features_a[k].shape[0], -1), features_b[k].reshape(features_b[k].shape[0], -1).T, precision=hi)
            for k, _ in members
        )
        return total, None

    def leaf_dots(xa, xb):  # [c_a, G_leaf, D], [c_b, G_leaf, D] -> [G_leaf, c_a, c_b]
        if not mapped:
            return jnp.einsum("cgd,egd->gce", xa, xb, precision=hi)

        def group_dots(g):
            a = jax.lax.dynamic_index_in_dim(xa, g, axis=1, keepdims=False)
            b = jax.lax.dynamic_index_in_dim(xb, g, axis=1, keepdims=False)
            return jnp.dot(a, b.T, precision=hi)

        return jax.lax.map(group_dots, jnp.arange(xa.shape[1]))

    ca, cb = next(iter(features_a.values())).shape[0], next(iter(features_b.values())).shape[0]
    grouped = jnp.zeros((n_groups, ca, cb), jnp.float32)
    for key, ids in members:
        grouped = grouped.at[np.array(ids)].add(leaf_dots(features_a[key], features_b[key]))
    return grouped.sum(0), grouped


def _slice_features(x, inv_sqrt, views):
    """One task's slice ``[n_s, *slice]``: its nonfinite flags ``[n_s]`` and whitened group-major
    features ``{key: [G_leaf, n_s, D]}``."""
    bad = ~jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
    x = x.astype(jnp.float32)
    if inv_sqrt is not None:
        x = x * inv_sqrt
    return bad, {v.key: jnp.swapaxes(v.apply(x), 0, 1) for v in views}


def _slice_pair_dots(features_s, features_t, grouped: bool):
    """``X_s X_tᵀ`` per group ``{key: [G_leaf, n_s, n_t]}`` (``grouped``), else summed ``[n_s, n_t]``."""
    per_key = {k: jnp.einsum("gcd,ged->gce", features_s[k], features_t[k], precision=jax.lax.Precision.HIGHEST) for k in features_s}
    return per_key if grouped else sum(d.sum(0) for d in per_key.values())


def _slice_outputs(rows, inv_sqrt, views, pairs, columns=None):
    """Flags and norms of the ``rows`` of every task, and every pair's dots of task ``s``'s rows
    with all of task ``t``: ``t``'s features from ``columns`` when given (a mesh's replicated
    slice), else from ``rows`` themselves."""
    bad, features = zip(*(_slice_features(x, inv_sqrt, views) for x in rows))
    whole = features if columns is None else {t: _slice_features(columns[t], inv_sqrt, views)[1] for t in {t for _, t, _ in pairs}}
    norms = tuple({k: jnp.sum(jnp.square(f), -1) for k, f in feats.items()} for feats in features)
    return bad, norms, tuple(_slice_pair_dots(features[s], whole[t], grouped) for s, t, grouped in pairs)


@functools.partial(jax.jit, static_argnames=("views", "pairs"))
def slice_dots(parts, inv_sqrt, views, pairs):
    """Dot products of one parameter slice, for several tasks and task pairs at once.

    ``parts``: per task ``[n_s, *slice]`` (stored dtype, widened here); ``inv_sqrt``: ``[*slice]``
    ``(Î + ε)^{-1/2}`` or None; ``views``: the slice's :class:`~.sources.FeatureView` values (a
    fused QKV leaf has three), each giving features ``X_s [G_leaf, n_s, D]``; ``pairs``:
    ``((s, t, grouped), ...)``.

    Returns per task the nonfinite flags ``[n_s]`` and squared group norms ``{key: [G_leaf, n_s]}``,
    and per pair ``X_s X_tᵀ`` per group ``{key: [G_leaf, n_s, n_t]}`` when ``grouped``, else its sum
    over groups and keys ``[n_s, n_t]``.
    """
    return _slice_outputs(parts, inv_sqrt, views, pairs)


@functools.lru_cache(maxsize=64)
def sharded_slice_dots(mesh: Mesh, views, pairs, n_tasks: int):
    """:func:`slice_dots` on a mesh: called with each task's slice twice, ``rows`` split over
    ``"data"`` (zero rows padding it to a multiple of the ``"data"`` size) and ``columns``
    replicated, each device multiplies its rows of task ``s`` with all of task ``t``. The flags,
    norms and dot products stay split along the rows (``[n_s]``, ``{key: [G_leaf, n_s]}``, per pair
    ``{key: [G_leaf, n_s, n_t]}`` or ``[n_s, n_t]``) until they are read. Jitted once per mesh,
    slice views and pairs; a ``"model"`` axis replicates the work."""

    def local(rows, columns, inv_sqrt):
        return _slice_outputs(rows, inv_sqrt, views, pairs, columns)

    keys = tuple(v.key for v in views)
    tasks = range(n_tasks)
    out_specs = (
        tuple(P(DATA) for _ in tasks),
        tuple({k: P(None, DATA) for k in keys} for _ in tasks),
        tuple({k: P(None, DATA) for k in keys} if grouped else P(DATA) for _, _, grouped in pairs),
    )
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(DATA), P(), P()), out_specs=out_specs, check_vma=False))


def block_gram(
    features_a: Mapping[str, Float[Array, "c_a g d"]],
    features_b: Mapping[str, Float[Array, "c_b g d"]],
    members: tuple[tuple[str, tuple[int, ...]], ...],
    n_groups: int,
    by_group: bool,
    *,
    mapped: bool | None = None,
) -> tuple[Float[Array, "c_a c_b"], Float[Array, "groups c_a c_b"] | None]:
    """Dot products of one chunk pair of features ``{key: [c, G_leaf, D]}``: the total
    ``[c_a, c_b]`` and, ``by_group``, per global group ``[G, c_a, c_b]`` (else None).

    ``members``: :attr:`Grouping.static_members`, ``n_groups`` the number of global groups.
    Per group one GEMM ``[c_a, D] · [D, c_b]``. ``mapped`` (default
    :func:`fisherjax.backend.map_groups`) walks a leaf's groups with ``lax.map``: each group's
    rows are contiguous runs of ``D`` floats, so its slice is a cheap copy, where one einsum
    batched over groups made XLA:CPU move both sides group-major first (docs/DECISIONS.md).
    Otherwise the batched einsum keeps a GPU's GEMMs wide. Both give the same numbers.
    """
    mapped = backend.map_groups() if mapped is None else bool(mapped)
    return _block_gram(features_a, features_b, members, n_groups, by_group, mapped)


@functools.partial(jax.jit, static_argnames=("whitened_paths", "views", "members", "n_groups", "size"))
def prepare_chunk(grads, inv_sqrt, whitened_paths, views, members, n_groups, size):
    """One chunk: nonfinite flags ``{path: [c]}``, whitened group features padded to ``size``
    samples ``{key: [size, G_leaf, D]}``, and squared group norms ``[G, size]``.

    ``grads``: ``{path: [c, *shape]}`` float32 (or features, ``views`` None); ``inv_sqrt``:
    ``{path: (Î + ε)^{-1/2}}`` for the ``whitened_paths``; ``views``, ``members``, ``n_groups``:
    the :class:`~.sources.Grouping`'s (static).
    """
    bad = {p: ~jnp.all(jnp.isfinite(g.reshape(g.shape[0], -1)), axis=1) for p, g in grads.items()}
    grads = {p: (g * inv_sqrt[p] if p in whitened_paths else g) for p, g in grads.items()}
    features = {v.key: v.apply(grads[v.path]) for v in views} if views is not None else grads
    c = next(iter(features.values())).shape[0]
    features = {k: jnp.pad(v, [(0, size - c)] + [(0, 0)] * (v.ndim - 1)) for k, v in features.items()}
    norms = jnp.zeros((n_groups, size), jnp.float32)
    for key, ids in members:
        norms = norms.at[np.array(ids)].add(jnp.sum(jnp.square(features[key]), -1).T)
    return bad, features, norms


@functools.lru_cache(maxsize=16)
def sharded_prepare(mesh: Mesh, whitened_paths, views, members, n_groups: int, rows: int):
    """:func:`prepare_chunk` of a chunk whose ``rows`` samples (a multiple of the ``"data"``
    size, zero rows after the real ones) are split over ``"data"``: each device whitens, views and
    measures its ``rows / D`` samples; flags ``{path: [rows]}`` and features keep the split, norms
    are ``[G, rows]`` split along the samples. ``inv_sqrt`` is replicated. Jitted once per mesh,
    grouping and size."""
    local = functools.partial(
        prepare_chunk, whitened_paths=whitened_paths, views=views, members=members, n_groups=n_groups, size=rows // data_size(mesh)
    )
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(DATA), P()), out_specs=(P(DATA), P(DATA), P(None, DATA)), check_vma=False)
    return jax.jit(mapped)


@functools.lru_cache(maxsize=16)
def sharded_block_gram(mesh: Mesh, members, n_groups: int, by_group: bool, mapped: bool):
    """:func:`block_gram` of a row chunk split over ``"data"`` and a replicated column chunk: each
    device multiplies its rows with every column; the total ``[c_a, c_b]`` (and per group
    ``[G, c_a, c_b]``) stays split along the rows until it is read. Jitted once per mesh and
    grouping."""

    def local(features_a, features_b):
        total, grouped = _block_gram(features_a, features_b, members, n_groups, by_group, mapped)
        return (total, grouped) if by_group else (total,)

    out_specs = (P(DATA), P(None, DATA)) if by_group else (P(DATA),)
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(DATA), P()), out_specs=out_specs, check_vma=False))


def rows_per_chunk(stream: Stream, chunk_size: int, mesh: Mesh) -> int:
    """Samples of one row chunk of ``stream`` on ``mesh`` (a multiple of the ``"data"`` size
    ``D``): ``D · min(chunk_size, ceil(n / D))`` for a stored stream — every device holds at most
    ``chunk_size`` rows, and a task that fits is one chunk with under ``D`` rows of padding — and
    ``D · ceil(chunk_size / D)`` for a callable one, whose chunks of at most ``chunk_size`` are
    padded to it."""
    devices = data_size(mesh)
    per_device = -(-chunk_size // devices) if stream.size is None else min(chunk_size, -(-stream.size // devices))
    return devices * max(per_device, 1)


def prepared_chunks(
    stream: Stream, grouping: Grouping, inv_sqrt: Mapping[str, Array] | None, chunk_size: int, *, mesh: Mesh | None = None,
    split: bool = False,
) -> Iterator[PreparedChunk]:
    """Yields a :data:`PreparedChunk` per chunk of ``stream``, whitened with ``inv_sqrt``
    (``{path: (Î + ε)^{-1/2}}``, None: not whitened).

    With a ``mesh``: ``split`` (the row side of a Gram) reads chunks of ``chunk_size`` samples (a
    multiple of the ``"data"`` size, :func:`rows_per_chunk`), zero-pads each to it and splits it
    over ``"data"`` (:func:`sharded_prepare`); otherwise (the column side) each chunk is replicated
    on every device and prepared there.

    Raises:
      NumericalError: a NaN/inf gradient (naming the sample and parameter). DataError: a chunk
        with other parameters than the stream's first. ConfigError: a chunk larger than
        ``chunk_size``.
    """
    paths = tuple(sorted(inv_sqrt)) if inv_sqrt else ()
    if mesh is not None and inv_sqrt:
        inv_sqrt = put_replicated(dict(inv_sqrt), mesh)
    split_rows, replicate = placements(mesh) if mesh is not None else (None, None)
    for chunk in stream.chunks(chunk_size):
        if set(chunk.grads) != set(stream.shapes):
            raise DataError(f"task {stream.name!r}: a chunk holds gradients of {sorted(chunk.grads)}, expected {sorted(stream.shapes)}")
        ids = np.asarray(chunk.sample_ids)
        c = len(ids)
        if c > chunk_size:
            raise ConfigError(f"task {stream.name!r}: a chunk of {c} samples exceeds chunk_size={chunk_size}")
        statics = (paths, grouping.views, grouping.static_members, len(grouping.index))
        weights = {p: inv_sqrt[p] for p in paths}
        # moved in their stored dtype (kept factors: formed where they land) and widened by XLA:
        # numpy's bfloat16 casts run elementwise in Python's ml_dtypes
        if mesh is not None and split:
            grads = {p: read_on_device(g, (), place=split_rows, pad_to=chunk_size).astype(jnp.float32)
                     for p, g in chunk.grads.items()}
            bad, features, norms = sharded_prepare(mesh, *statics, chunk_size)(grads, weights)
        else:
            grads = {p: read_on_device(g, (), place=replicate).astype(jnp.float32) for p, g in chunk.grads.items()}
            bad, features, norms = prepare_chunk(grads, weights, *statics, chunk_size)
        for path, flags in bad.items():
            flags = to_host(flags)
            if flags.any():
                raise NumericalError(f"task {stream.name!r}: gradient of sample {int(ids[np.argmax(flags)])} on {path!r} is NaN or inf")
        yield ids, features, to_host(norms)[:, :c], c


def prepared(
    stream: Stream, grouping: Grouping, inv_sqrt: Mapping[str, Array] | None, chunk_size: int, *, mesh: Mesh | None = None,
    split: bool = False,
) -> Callable[[], Iterator[PreparedChunk]]:
    """A function returning a fresh iterator of :func:`prepared_chunks` (``mesh``, ``split``: as
    there).

    A stored stream that fits in one chunk (the usual case: ``n ≤ chunk_size``) is prepared once
    and its chunk kept, so the Grams :func:`~fisherjax.analysis.conflicts.detect` builds from it
    (A·B, A·A, B·B) whiten and view it once instead of once per side per Gram. Memory is what
    one Gram already holds: one chunk of each side.
    """
    if stream.size is None or stream.size > chunk_size:
        return lambda: prepared_chunks(stream, grouping, inv_sqrt, chunk_size, mesh=mesh, split=split)
    kept: list = []

    def chunks():
        if not kept:
            kept.extend(prepared_chunks(stream, grouping, inv_sqrt, chunk_size, mesh=mesh, split=split))
        return iter(kept)

    return chunks
