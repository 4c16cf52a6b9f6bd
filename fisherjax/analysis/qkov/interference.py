"""The public entry points of the score: :func:`heatmap` (every sample pair, layer, head and
block), :func:`sample_pair` (one pair, layer and head), :func:`top_conflicts` (the strongest
entries of a result) and :func:`flops` (the GEMM work of a heatmap). ``variant="kfac"`` is computed
by :mod:`~fisherjax.analysis.qkov.kronecker` (its factors passed as ``kfac=``)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
from jax.sharding import Mesh

from fisherjax.analysis.qkov import _scores, kronecker
from fisherjax.analysis.qkov._operands import block_kinds
from fisherjax.analysis.qkov._prepare import Prepared, prepare
from fisherjax.analysis.qkov._scores import all_scores, finish
from fisherjax.analysis.qkov._tiles import raw_scores
from fisherjax.analysis.qkov.options import SIGNED_VARIANTS, KernelOptions, ScoreOptions, resolve
from fisherjax.analysis.qkov.results import QKOVResult, ShardedScores, result_of
from fisherjax.curvature.factors import HeadFactors
from fisherjax.errors import DataError
from fisherjax.fisher.state import SampleGrads, TaskFisher
from fisherjax.layout import ATTENTION_BLOCKS, ModelLayout
from fisherjax.sharding import check_mesh, to_host


def heatmap(
    task_a: TaskFisher | SampleGrads,
    task_b: TaskFisher | SampleGrads,
    layout: ModelLayout,
    *,
    score: ScoreOptions | None = None,
    kernel: KernelOptions | None = None,
    progress: bool = False,
    mesh: Mesh | None = None,
    gather_scores: bool = True,
    kfac: Mapping[str, HeadFactors] | None = None,
    **overrides,
) -> QKOVResult:
    """QK-OV interference of task B on task A for every sample pair, layer, head and block.

    ``M^B_{ij,ℓ,h} = s_j · Σ_{k∈slice(B,ℓ,h)} C_{i,k}/(Î_k+λ) · |g_{j,k}|`` (or a variant, see
    :mod:`fisherjax.analysis.qkov`), divided by the slice size for ``aggregate="mean"``.

    Args:
      task_a, task_b: :class:`~fisherjax.fisher.TaskFisher` values with per-sample gradients of the
        attention parameters (or :class:`~fisherjax.fisher.SampleGrads`). A TaskFisher's ``Î`` is
        its own full diagonal when that is the mean over exactly its kept samples, else (and for
        SampleGrads) the mean of the kept samples' contributions.
      layout: the model's :class:`~fisherjax.layout.ModelLayout`; all head slicing goes through it.
      score, kernel: :class:`ScoreOptions` / :class:`KernelOptions`; keyword ``overrides`` replace
        fields of either (``variant="signed"``, ``contraction="looped"``, ``memory_budget_bytes=1e9``).
      progress: a progress bar over the tiles.
      mesh: a :class:`jax.sharding.Mesh` with axes ``("data",)`` or ``("data", "model")``
        (:func:`fisherjax.sharding.check_mesh`). Task A's samples are split over ``"data"`` in
        contiguous blocks (zero rows pad them to whole tiles), task B's tiles and the weights
        ``1/(Î+λ)`` are broadcast, and every device contracts its rows of A with all of B in one
        ``shard_map`` step per tile (``memory_budget_bytes`` is then per device). The Fisher,
        ridges, diagnostics and ``s_j`` come from the whole tasks on the host exactly as without a
        mesh, so the scores differ only by float32 rounding. A ``"model"`` axis replicates the
        work (these are per-sample gradients of the attention parameters only). None (default):
        one device, as always.
      gather_scores: with a mesh, gather the full scores to the host (default). False: ``scores``
        is a :class:`ShardedScores` left on the devices and ``layer_head_avg`` a sum over A's
        rows across devices (float32); only ``[block, layer, head]`` summaries are gathered.
      kfac: ``{block: HeadFactors}`` (:func:`fisherjax.curvature.kfac.attention_factors`), task A's
        K-FAC factors: read by ``variant="kfac"`` and only there
        (``M_ij = s_j · g_iᵀ (A ⊗ G + λI)⁻¹ g_j``, :mod:`~fisherjax.analysis.qkov.kronecker`; on a
        mesh each tile's rows of A are split over ``"data"`` and its sums gathered, whatever
        ``gather_scores`` says).

    Returns:
      :class:`QKOVResult` with ``scores [block, layer, n_a, n_b, head]``, ``layer_head_avg
      [block, layer, head]``, true sample ids and per-slice diagnostics.
    """
    mesh = check_mesh(mesh)
    score, kernel = resolve(score, kernel, overrides)
    kronecker.check_request(score, kfac)
    if score.variant == "kfac":  # its scores come to the host tile by tile (gather_scores=False keeps nothing on the mesh)
        return kronecker.heatmap(task_a, task_b, layout, kfac, score, kernel, progress=progress, mesh=mesh)
    prep = prepare(task_a, task_b, layout, score)
    n_a, n_b = len(prep.a_positions), len(prep.b_positions)
    if n_b == 0:
        warnings.warn(f"qkov: task {prep.name_b!r} has no samples; its interference scores are all zero", stacklevel=2)
    desc = f"QK-OV {prep.name_b} → {prep.name_a}"
    if mesh is not None and n_a and n_b:
        padded = _scores.sharded_scores(prep, layout, score, kernel, mesh, progress=progress, desc=desc)
        if gather_scores:
            scores = to_host(padded)[:, :, :n_a]
            avg = scores.mean(axis=(2, 3))
        else:
            scores, avg = ShardedScores(padded, n_a), _scores.pair_mean(padded, n_a, n_b)
        return result_of(prep, scores, avg, layout.kv_head_of, score)
    return result_from_scores(prep, all_scores(prep, layout, score, kernel, progress=progress, desc=desc), layout, score)


def result_from_scores(prep: Prepared, scores: np.ndarray, layout: ModelLayout, score: ScoreOptions) -> QKOVResult:
    """The :class:`QKOVResult` of a prepared heatmap and its host scores ``[block, layer, n_a, n_b,
    head]``: ``layer_head_avg`` their mean over sample pairs (zero without pairs)."""
    n_a, n_b = scores.shape[2:4]
    avg = scores.mean(axis=(2, 3)) if n_a and n_b else np.zeros(scores.shape[:2] + scores.shape[-1:], np.float32)
    return result_of(prep, scores, avg, layout.kv_head_of, score)


def sample_pair(
    task_a: TaskFisher | SampleGrads,
    task_b: TaskFisher | SampleGrads,
    layout: ModelLayout,
    sample_a: int,
    sample_b: int,
    layer: int,
    head: int,
    *,
    score: ScoreOptions | None = None,
    kernel: KernelOptions | None = None,
    kfac: Mapping[str, HeadFactors] | None = None,
    **overrides,
) -> dict[str, float]:
    """The four block scores ``{q, k, v, o: M^B_{ij,ℓ,h}}`` of one sample pair, layer and query head.

    ``sample_a`` / ``sample_b`` are true sample ids. The Fisher (or ``kfac=``'s factors for
    ``variant="kfac"``), the ridges and ``s_j`` come from the whole tasks exactly as in
    :func:`heatmap`; only the one pair and layer go through the kernel.
    """
    score, kernel = resolve(score, kernel, overrides)
    kronecker.check_request(score, kfac)
    if score.variant == "kfac":
        prep = kronecker.prepare(task_a, task_b, layout, kfac, score)
    else:
        prep = prepare(task_a, task_b, layout, score)
    positions = []
    for ids, sample, name in ((prep.a.sample_ids, sample_a, prep.name_a), (prep.b.sample_ids, sample_b, prep.name_b)):
        found = np.flatnonzero(np.asarray(ids) == sample)
        if not len(found):
            raise DataError(f"qkov: task {name!r} has no sample with id {sample} (among samples with active tokens)")
        positions.append(found[:1])
    if not 0 <= layer < layout.num_layers or not 0 <= head < layout.num_heads:
        raise DataError(f"qkov: layer {layer} / head {head} outside the model's {layout.num_layers} layers × {layout.num_heads} heads")
    if score.variant == "kfac":
        raw = kronecker.slice_sums(prep, layout, kernel, positions[0], positions[1], np.array([layer]))
        scores = kronecker.finish(raw, prep, layout, score, positions[1])
    else:
        raw = raw_scores(prep, layout, score, kernel, positions[0], positions[1], np.array([layer]))
        scores = finish(raw, prep, layout, score, positions[1])
    return {block: float(scores[n, 0, 0, 0, head]) for n, block in enumerate(ATTENTION_BLOCKS)}


def top_conflicts(result: QKOVResult, k: int = 20) -> tuple[dict, ...]:
    """The ``k`` strongest entries of ``result.scores`` (largest first; most negative first for the
    signed variants, :data:`~.options.SIGNED_VARIANTS`), each a dict with the true sample ids of
    both tasks (``sample_a``, ``sample_b``), ``block``, ``layer``, ``head``, ``kv_head`` and
    ``score``. A K/V entry appears once per kv head (at its first query head), with
    ``query_heads`` listing the heads that read it.
    Scores left on a mesh (:class:`ShardedScores`) are ranked on the devices, each its own rows,
    and only the ``k`` best of each device are gathered.
    """
    sharded = isinstance(result.scores, ShardedScores)
    scores = result.scores if sharded else np.asarray(result.scores)
    shape = tuple(scores.shape)
    if k <= 0 or int(np.prod(shape)) == 0:
        return ()
    kv = np.asarray(result.kv_head_of)
    first_of_group = np.r_[True, kv[1:] != kv[:-1]]
    candidate = np.ones(shape[0:1] + (1, 1, 1) + shape[-1:], bool)
    for n, block in enumerate(result.blocks):
        if block in ("k", "v"):
            candidate[n, ..., ~first_of_group] = False
    sign = -1.0 if result.options.variant in SIGNED_VARIANTS else 1.0
    k = min(k, int(candidate.sum()) * shape[1] * shape[2] * shape[3])
    if sharded:
        top, values = _scores.top_entries(scores.padded, scores.n_a, candidate, sign, k)
    else:
        top, values = _top_entries(scores, candidate, sign, k)
    ids_a, ids_b = np.asarray(result.sample_ids_a), np.asarray(result.sample_ids_b)
    out = []
    for flat, value in zip(top, values):
        b, layer, i, j, h = np.unravel_index(flat, shape)
        block = result.blocks[b]
        entry = {
            "block": block,
            "layer": int(layer),
            "head": int(h),
            "kv_head": int(kv[h]),
            "sample_a": int(ids_a[i]),
            "sample_b": int(ids_b[j]),
            "score": float(value),
        }
        if block in ("k", "v"):
            entry["query_heads"] = [int(q) for q in np.flatnonzero(kv == kv[h])]
        out.append(entry)
    return tuple(out)


TOP_CHUNK_VALUES = 1 << 24
"""Scores :func:`top_conflicts` ranks at a time on the host (whole ``[n_a, n_b, heads]`` slabs of a
block and layer, at least one): a key and an index per value of a chunk, never of all the scores —
a 7B model's scores at 1000 × 1000 samples are 17 GB, and ranking them whole took three times that."""


def _top_entries(scores: np.ndarray, candidate: np.ndarray, sign: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(flat positions, values)`` of the ``k`` largest ``sign · scores [block, layer, n_a, n_b,
    heads]`` where ``candidate [block, 1, 1, 1, heads]``, largest first (ties: lower position first):
    the ``k`` best of each chunk of :data:`TOP_CHUNK_VALUES`, then the best of those."""
    blocks, layers = scores.shape[:2]
    slab = int(np.prod(scores.shape[2:]))
    slabs = scores.reshape(blocks * layers, slab)
    step = max(1, TOP_CHUNK_VALUES // max(slab, 1))
    found, keys = [], []
    for first in range(0, blocks * layers, step):
        rows = slabs[first : first + step]
        allowed = np.broadcast_to(candidate[np.arange(first, first + len(rows)) // layers, 0], (len(rows), *scores.shape[2:]))
        key = np.where(allowed.reshape(len(rows), -1), sign * rows, -np.inf).ravel()
        best = np.argpartition(-key, k - 1)[:k] if key.size > k else np.arange(key.size)
        found.append(best + first * slab)
        keys.append(key[best])
    found, keys = np.concatenate(found), np.concatenate(keys)
    order = np.lexsort((found, -keys))[:k]
    top = found[order]
    return top, scores.reshape(-1)[top]


def scores_bytes(n_a: int, n_b: int, layout: ModelLayout) -> int:
    """Bytes of one heatmap's scores: ``[block, layer, n_a, n_b, heads]`` float32 (what ``qkov.npz``
    stores per ordered pair; the host holds them and, while they are formed, their raw sums)."""
    return 4 * len(ATTENTION_BLOCKS) * layout.num_layers * n_a * n_b * layout.num_heads


def flops(n_a: int, n_b: int, layout: ModelLayout, include_bias: bool = True) -> float:
    """FLOPs of the GEMMs of one heatmap: ``2 · n_a · n_b · P_attn`` (``P_attn``: the parameters in
    all slices, K/V counted once per kv head)."""
    per_layer = 0
    for block, kind in block_kinds(layout, include_bias):
        heads = layout.heads_of(block)
        if kind == "bias":
            per_layer += heads * layout.head_dim
        else:
            spec = layout.spec(layout.block_sources(block, kind)[0])
            other = spec.shape[-1] if block == "o" else spec.shape[-2]
            per_layer += heads * layout.head_dim * other
    return 2.0 * n_a * n_b * per_layer * layout.num_layers
