"""From slice sums to scores: task B's factor ``s_j``, the aggregation over the slice and the GQA
gather of K/V to query heads — ``[block, layer, n_a, n_b, head]``; on a mesh, the same scores left
on the devices and the summaries taken there (pair means, column means, top entries, bootstrap
sums), which are all that is gathered."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float

from fisherjax.analysis.qkov._prepare import Prepared
from fisherjax.analysis.qkov._tiles import Request, raw_scores, shared_raw_scores, sharded_raw_scores
from fisherjax.analysis.qkov.options import KernelOptions, ScoreOptions
from fisherjax.errors import NumericalError
from fisherjax.layout import ATTENTION_BLOCKS, ModelLayout
from fisherjax.sharding import DATA, to_host


def assemble(raw, scale_b, slice_sizes, kv, aggregate: str, xp=np):
    """``[block, layer, n_a, n_b, heads]``: per block ``raw[block] · s_j`` (``raw``: ``{block:
    [layer, n_a, n_b, heads_of_block]}``, ``scale_b``: ``[n_b]``), divided by the slice size for
    ``aggregate="mean"``, K/V gathered to query heads (``kv``); ``xp``: numpy or jax.numpy. On the
    host each block is written in place into the float32 result and then dropped from ``raw``,
    which is consumed (Q and O are scaled in place): the result's pages are taken as it is
    written, so finishing holds the scores and about half that again (a block being gathered and
    written), where it held them twice and a block — a 7B model's scores at 1000 × 1000 samples
    are 17 GB, and a shared pass finishes two."""
    if xp is np:
        heads = raw[ATTENTION_BLOCKS[0]].shape[-1]
        out = np.empty((len(ATTENTION_BLOCKS), *raw[ATTENTION_BLOCKS[0]].shape[:-1], heads), np.float32)
        for n, block in enumerate(ATTENTION_BLOCKS):
            sums = raw.pop(block)
            value = sums[..., kv] if block in ("k", "v") else sums  # the gather copies; Q and O are scaled in place
            del sums
            np.multiply(value, scale_b[None, None, :, None], out=value, casting="same_kind")
            if aggregate == "mean":
                np.divide(value, np.float32(slice_sizes[n]), out=out[n], casting="same_kind")
            else:
                out[n] = value
        return out
    stacked = []
    for n, block in enumerate(ATTENTION_BLOCKS):
        value = raw[block] * scale_b[None, None, :, None]
        if aggregate == "mean":
            value = value / np.float32(slice_sizes[n])
        stacked.append(value[..., kv] if block in ("k", "v") else value)
    return xp.stack(stacked).astype(xp.float32)


def _non_finite(where: tuple[int, int, int]) -> NumericalError:
    block, layer, head = where
    return NumericalError(
        f"qkov: non-finite score in block {ATTENTION_BLOCKS[block]}, layer {layer}, head {head}: the gradients "
        "of one of the tasks contain NaN or inf"
    )


def finish(
    raw: dict[str, np.ndarray], prep: Prepared, layout: ModelLayout, score: ScoreOptions, b_positions: np.ndarray
) -> Float[np.ndarray, "block layer n_a n_b heads"]:
    """``M_ij = s_j · Σ_k a_ik b_jk`` (divided by the slice size for ``aggregate="mean"``), K/V
    gathered to query heads (:func:`assemble`, which consumes ``raw``), float32; a non-finite
    score is a :class:`~fisherjax.errors.NumericalError`."""
    scores = assemble(raw, prep.scale_b[b_positions], prep.slice_sizes, layout.kv_head_of, score.aggregate)
    bad = first_non_finite(scores)
    if bad is not None:
        raise _non_finite(bad)
    return scores


def first_non_finite(scores: Float[np.ndarray, "block layer n_a n_b heads"]) -> tuple[int, int, int] | None:
    """``(block, layer, head)`` of the first NaN or inf score, or None; a block's flags at a time
    (not the scores' size in booleans)."""
    for n, block_scores in enumerate(scores):
        if not np.isfinite(block_scores).all():
            layer, _, _, head = np.argwhere(~np.isfinite(block_scores))[0]
            return n, int(layer), int(head)
    return None


def all_scores(
    prep: Prepared, layout: ModelLayout, score: ScoreOptions, kernel: KernelOptions, *, progress: bool = False, desc: str = "QK-OV"
) -> Float[np.ndarray, "block layer n_a n_b heads"]:
    """Scores of every sample pair and layer (:func:`~._tiles.raw_scores`, :func:`finish`), over
    the prepared positions of both tasks."""
    a_pos, b_pos = prep.a_positions, prep.b_positions
    raw = raw_scores(prep, layout, score, kernel, a_pos, b_pos, np.arange(layout.num_layers), progress=progress, desc=desc)
    return finish(raw, prep, layout, score, b_pos)


def shared_scores(
    requests: list[Request], layout: ModelLayout, score: ScoreOptions, kernel: KernelOptions, *, host_bytes: float | None,
    progress: bool = False, desc: str = "QK-OV",
) -> Iterator[Float[np.ndarray, "block layer n_a n_b heads"]] | None:
    """Scores of each request in turn (:func:`~._tiles.shared_raw_scores`: every stored sample
    formed once per layer chunk for all of them, then :func:`finish`, each request's sums dropped
    as its scores are made), or None where that pass does not fit its memory budget or
    ``host_bytes`` (:func:`~._tiles.shared_scores_fit`)."""
    raws = shared_raw_scores(requests, layout, score, kernel, host_bytes=host_bytes, progress=progress, desc=desc)
    if raws is None:
        return None

    def finished():
        for n, r in enumerate(requests):
            raw, raws[n] = raws[n], None
            yield finish(raw, r.prep, layout, score, r.b_positions)

    return finished()


# ---------------------------------------------------------------------------------------------
# On a mesh
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("slice_sizes", "kv", "aggregate", "n_layers", "n_b", "mesh"))
def _finish_on_mesh(raw, scale_b, *, slice_sizes, kv, aggregate, n_layers, n_b, mesh):
    """:func:`assemble` of sharded sums (layer and B padding sliced off), A's rows staying split
    over ``"data"``; and which ``[block, layer, head]`` cells are all finite."""
    raw = {block: value[:n_layers, :, :n_b] for block, value in raw.items()}
    scores = assemble(raw, scale_b, slice_sizes, np.array(kv), aggregate, jnp)
    scores = jax.lax.with_sharding_constraint(scores, NamedSharding(mesh, P(None, None, DATA)))
    return scores, jnp.isfinite(scores).all(axis=(2, 3))


def sharded_scores(
    prep: Prepared, layout: ModelLayout, score: ScoreOptions, kernel: KernelOptions, mesh: Mesh, *, progress: bool = False,
    desc: str = "QK-OV",
) -> Float[Array, "block layer n_pad n_b heads"]:
    """Scores of every sample pair and layer on ``mesh`` (:func:`~._tiles.sharded_raw_scores`, then
    the arithmetic of :func:`finish` on the devices): ``[block, layer, n_pad, n_b, head]`` with A's
    rows split over ``"data"`` in contiguous blocks; rows ``≥ n_a`` are zero padding. Only the
    finiteness flags ``[block, layer, head]`` come to the host (a non-finite score is a
    :class:`~fisherjax.errors.NumericalError`)."""
    raw = sharded_raw_scores(prep, layout, score, kernel, mesh, progress=progress, desc=desc)
    scores, finite = _finish_on_mesh(
        raw, jnp.asarray(prep.scale_b[prep.b_positions]), slice_sizes=tuple(int(s) for s in prep.slice_sizes),
        kv=tuple(int(g) for g in layout.kv_head_of), aggregate=score.aggregate, n_layers=layout.num_layers, n_b=len(prep.b_positions), mesh=mesh,
    )
    finite = to_host(finite)
    if not finite.all():
        raise _non_finite(tuple(np.argwhere(~finite)[0]))
    return scores


@functools.partial(jax.jit, static_argnames=("n_a", "n_b"))
def _pair_mean(scores, *, n_a, n_b):
    return scores.sum(axis=(2, 3)) / np.float32(n_a * n_b)


def pair_mean(scores: Array, n_a: int, n_b: int) -> Float[np.ndarray, "block layer heads"]:
    """``mean_{i,j} M_ij`` per cell of padded sharded scores (zero padding adds nothing): a sum over
    A's rows across devices (float32, as the host mean), gathered ``[block, layer, head]``."""
    return to_host(_pair_mean(scores, n_a=n_a, n_b=n_b))


column_sums = jax.jit(lambda scores: scores.sum(axis=2))
"""``Σ_i M_ij`` of padded sharded scores: ``[block, layer, n_b, head]`` (a reduction over A's rows
across devices; the only thing the permutation test gathers)."""


@functools.lru_cache(maxsize=8)
def _local_top(mesh: Mesh, k: int):
    """Each device's ``k`` largest ``sign · M`` over candidate entries of its real rows, with their
    flat indices into its block ``[block, layer, n_loc, n_b, head]``; ``[D·k]`` each."""

    def local(scores, candidate, sign, n_a):
        n_loc = scores.shape[2]
        rows = jax.lax.axis_index(DATA) * n_loc + jnp.arange(n_loc)
        keep = candidate & (rows < n_a)[None, None, :, None, None]
        return jax.lax.top_k(jnp.where(keep, sign * scores, -jnp.inf).ravel(), k)

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(None, None, DATA), P(), P(), P()), out_specs=P(DATA), check_vma=False))


def top_entries(scores: Array, n_a: int, candidate: np.ndarray, sign: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(flat indices into [block, layer, n_a, n_b, head], scores)`` of the ``k`` largest
    ``sign · M`` over ``candidate`` entries (``[block, 1, 1, 1, head]``) of padded sharded
    scores, largest first (ties: lower index first). Each device takes its own top ``k``; only those
    ``D·k`` candidates are gathered and merged."""
    mesh = scores.sharding.mesh
    block, layers, n_pad, n_b, heads = scores.shape
    devices = int(mesh.shape[DATA])
    n_loc = n_pad // devices
    per_device = min(k, block * layers * n_loc * n_b * heads)
    values, index = _local_top(mesh, per_device)(scores, jnp.asarray(candidate), jnp.float32(sign), jnp.int32(n_a))
    values, index = to_host(values).reshape(devices, per_device), to_host(index).reshape(devices, per_device)
    b, layer, i, j, h = np.unravel_index(index, (block, layers, n_loc, n_b, heads))
    i = i + np.arange(devices)[:, None] * n_loc
    found = np.isfinite(values)
    flat = np.ravel_multi_index((b[found], layer[found], i[found], j[found], h[found]), (block, layers, n_a, n_b, heads))
    values = values[found]
    order = np.lexsort((flat, -values))[:k]
    return flat[order], sign * values[order]


@jax.jit
def bootstrap_sums(u: Array, v: Array, scores: Array) -> Float[Array, "replicates block layer heads"]:
    """``Σ_ij u_ri v_rj M_ij`` of padded sharded scores (``u [r, n_pad]`` zero on the padding,
    ``v [r, n_b]``): two contractions, the one over A's rows a reduction across devices."""
    hi = jax.lax.Precision.HIGHEST
    over_b = jnp.einsum("rj,klijh->rklih", v, scores, precision=hi)
    return jnp.einsum("ri,rklih->rklh", u, over_b, precision=hi)
