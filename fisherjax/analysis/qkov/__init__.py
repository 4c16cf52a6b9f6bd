"""Phase 6: QK-OV interference — which attention heads task B's gradients push where task A keeps
its knowledge.

Score. For sample ``i`` of task A, sample ``j`` of task B, layer ``ℓ``, head ``h`` and block
``B ∈ {q, k, v, o}``

    M^B_{ij,ℓ,h} = s_j · Σ_{k ∈ slice(B,ℓ,h)}  C_{i,k} / (Î_k + λ) · |g_{j,k}|

with ``C_i = g_i² / T_i`` task A's per-sample contributions, ``g_j`` task B's signed token-sum
gradients, ``s_j`` task B's per-sample factor (``normalize_gj``) and ``Î`` the diagonal Fisher
(``fisher_pool``) on the *full* parameter tensors (float32), never a group-reduced Fisher. Per
slice the sum is a matrix product ``M = A · Gᵀ`` with ``A[i,k] = C_{i,k}/(Î_k+λ)`` and
``G[j,k] = |g_{j,k}|``; :func:`heatmap` returns ``scores [block, layer, n_a, n_b, head]``.

Slices. Heads are read only through :class:`~fisherjax.layout.ModelLayout` (Flax ``[in, out]``
kernels, GPT-2's ``[Q|K|V]`` and GPT-NeoX's per-head interleaved fused QKV). The slice of
``(q|k|v, ℓ, h)`` is the head's kernel columns ``W[:, h, :]`` *and* its bias ``b[h, :]`` when the
model has q/k/v biases (``include_bias=True``: the bias is a parameter of that head alone); the
slice of ``(o, ℓ, h)`` is the rows ``W_O[h, :, :]`` (the output bias is shared by all heads and
belongs to none). Slices partition the block, so with ``aggregate="sum"`` and a fixed ridge the
per-head scores add up to the score of the whole block. Under grouped-query attention query head
``h`` reads kv head ``h // (H / H_kv)``; K and V are computed once per kv head and gathered to
query heads (:attr:`QKOVResult.kv_head_of`).

Options. :class:`ScoreOptions` is the maths, :class:`KernelOptions` the compute (they change the
scores only by rounding); entry points take both and/or keyword overrides of their fields.

* ridge: ``λ = max(ridge_lambda, ridge_lambda_rel · median(Î_slice), ε)`` per slice; the
  denominator is ``Î_k + λ`` (``ε`` is not added to ``Î``: it keeps ``Î_k + λ ≥ ε > 0`` when a
  slice's Fisher is exactly zero and both ridges are 0, and marks dead entries in the diagnostics).
* ``aggregate``: ``"mean"`` divides each score by the slice size, ``"sum"`` keeps the sum.
* ``normalize_gj``: ``s_j = 1`` (``"none"``: ``g_j`` as stored, token sums), ``1/T_j``
  (``"per_token_mean"``) or ``1/Σ_{j'∈B} T_{j'}`` (``"per_token_sum"``: the total active tokens
  of task B, so the scale is the same for every ``j``). ``g_j`` scaled by ``s_j`` makes
  ``C_j = g_j²/T_j`` scale by ``s_j²``, so in *every* variant the score is multiplied by ``s_j``.
* ``fisher_pool`` (:mod:`fisherjax.fisher.pool`): ``Î`` of task ``"A"`` (default), ``"B"``,
  ``"pooled"`` ``(Î_A + Î_B)/2`` or ``"pooled_by_count"`` (the mean over both tasks' samples).
* ``variant``: ``"unsigned"`` (above); ``"signed"`` ``g_i · g_j / (Î + λ)`` (negative: the tasks
  pull the head's parameters in opposite directions); ``"symmetric"`` ``sqrt(C_i C_j) / (Î + λ)``;
  ``"natural"`` (natural-gradient) ``C_i / (Î + λ) · |g_j| / sqrt(Î + λ)``; each times ``s_j``.
  ``"kfac"`` (:mod:`.kronecker`) replaces the diagonal by task A's damped K-FAC block of the
  slice, ``s_j · g_iᵀ (A_{ℓ,h} ⊗ G_{ℓ,h} + λI)⁻¹ g_j`` with ``λ = max(ridge_lambda,
  ridge_lambda_rel · mean(diag A) · mean(diag G), ε)``, the factors passed as ``heatmap(...,
  kfac={block: HeadFactors})`` (:func:`fisherjax.curvature.kfac.attention_factors`); its
  diagnostics describe the block's eigenvalues, and on a mesh its scores are gathered tile by tile. :data:`VARIANTS` are the
  four computed from the tasks alone, :data:`CURVATURE_VARIANTS` those that take a curvature;
  ``"signed"`` and ``"kfac"`` are signed (:data:`SIGNED_VARIANTS`: their strongest entries are
  the most negative).
* ``contraction`` (:class:`KernelOptions`): ``"batched"`` (whole head-major operands, one batched
  split-K GEMM; GPUs), ``"looped"`` (the contraction walked in cache-sized pieces, stored leaves
  read in place, blocks and layer ranges on a thread pool; CPUs), ``"pallas"`` (each head's strided
  slice read inside the GEMM; a Triton kernel, interpreted elsewhere) or ``"auto"``
  (:func:`fisherjax.backend.qkov_contraction`). Tiles over chunks of samples and layers (and, where
  task B is not one chunk, over the slices' parts that share no stored leaf, then over groups of
  heads of a part) keep each step within
  ``memory_budget_bytes`` (:func:`tile_plan`; unset, the backend's: 2 GB on a CPU, half an
  accelerator's free memory). :func:`partner_reads` counts how often a score array reads task B.

The original system's conventions. fisherjax follows the seed where it once departed from it:
``"per_token_sum"`` divides by task B's total active tokens (it once equalled ``"none"``); the
symmetric variant honours ``normalize_gj`` (it once ignored it); ``"pooled"`` weighs the two
tasks equally (it once weighted them by their sample counts, now ``"pooled_by_count"``); and the
defaults are the seed's, ``ridge_lambda_rel = 1e-6``, ``ridge_lambda = 1e-8``, ``ε = 1e-10``.

Scale. Multiplying both tasks' losses by ``a > 0`` scales ``g`` by ``a`` and ``C``, ``Î`` by
``a²``; when the ridge scales with the Fisher (``ridge_lambda = 0``) the unsigned score scales by
``a`` and the signed, symmetric and natural-gradient scores do not change. A binding absolute
floor ``ridge_lambda`` does not scale, so there the invariance is only approximate.

Samples with no active tokens (``T_i = 0``) carry no contribution: they are dropped with a
warning and never counted in ``Î``. A Fisher from fewer than ``min_fisher_samples`` samples is an
error. An empty task B gives zero scores and a warning.

Meshes. :func:`heatmap` and :func:`permutation_test` take ``mesh=`` (a ``("data",)`` or
``("data", "model")`` :class:`jax.sharding.Mesh`): task A's samples are split over ``"data"``,
task B's tiles and the weights broadcast, every device contracts its rows of A with all of B; the
Fisher, ridges and ``s_j`` are the host's, as without a mesh. Only summaries are gathered unless
the full scores are asked for (``gather_scores``; :class:`ShardedScores`).

Statistics: :func:`permutation_test` (A-vs-B against A-vs-A', a held-out split of A, with
Benjamini–Hochberg q-values) and :func:`bootstrap_layer_head_avg`. What a reader sees (summaries,
figures, report lines) is in :mod:`fisherjax.report.qkov`.

Modules: :mod:`.options`, :mod:`.results`, :mod:`.interference` (heatmap, sample_pair,
top_conflicts, flops), :mod:`.kronecker` (the K-FAC variant), :mod:`.stats`, :mod:`.pair` (a task
pair's heatmaps and tests both ways from one formation of each task's samples); private by purpose: ``_prepare`` (inputs → Fisher views,
weights, diagnostics), ``_operands`` (what every kernel shares), the kernels ``_batched``,
``_looped``, ``_pallas``, ``_tiles`` (the tile loop, which selects the kernel once) and
``_scores`` (sums → scores).
"""

from __future__ import annotations

from fisherjax.analysis.qkov._tiles import partner_reads, samples_in_place, stored_sample_layer_bytes, tile_plan
from fisherjax.analysis.qkov.interference import flops, heatmap, sample_pair, scores_bytes, top_conflicts
from fisherjax.analysis.qkov.options import (
    AGGREGATES,
    CONTRACTIONS,
    CURVATURE_VARIANTS,
    NORMALIZE_GJ,
    SIGNED_VARIANTS,
    VARIANTS,
    KernelOptions,
    ScoreOptions,
)
from fisherjax.analysis.qkov.pair import Way, both_ways, formed_once
from fisherjax.analysis.qkov.results import (
    BootstrapInterval,
    PermutationResult,
    QKOVResult,
    ShardedScores,
    SliceDiagnostics,
    save_npz,
    to_arrays,
)
from fisherjax.analysis.qkov.stats import (bootstrap_layer_head_avg, heldout_permutation_test, heldout_positions, heldout_rows, heldout_split,
                                           permutation_test)
from fisherjax.fisher.pool import FISHER_POOLS
from fisherjax.layout import ATTENTION_BLOCKS as BLOCKS

__all__ = [
    "AGGREGATES",
    "BLOCKS",
    "CONTRACTIONS",
    "CURVATURE_VARIANTS",
    "FISHER_POOLS",
    "NORMALIZE_GJ",
    "SIGNED_VARIANTS",
    "VARIANTS",
    "BootstrapInterval",
    "KernelOptions",
    "PermutationResult",
    "QKOVResult",
    "ScoreOptions",
    "ShardedScores",
    "SliceDiagnostics",
    "Way",
    "both_ways",
    "bootstrap_layer_head_avg",
    "flops",
    "formed_once",
    "heatmap",
    "heldout_permutation_test",
    "heldout_positions",
    "heldout_rows",
    "heldout_split",
    "partner_reads",
    "permutation_test",
    "sample_pair",
    "samples_in_place",
    "scores_bytes",
    "save_npz",
    "stored_sample_layer_bytes",
    "tile_plan",
    "to_arrays",
    "top_conflicts",
]
