"""Phase 6: QK-OV interference — which attention heads task B's gradients push where task A keeps its knowledge.

Score. For sample ``i`` of task A, sample ``j`` of task B, layer ``ℓ``, head ``h`` and block
``B ∈ {q, k, v, o}``

    M^B_{ij,ℓ,h} = Σ_{k ∈ slice(B,ℓ,h)}  C_{i,k} / (Î_k + λ) · |g_{j,k}|

with ``C_i = g_i² / T_i`` task A's per-sample contributions, ``g_j`` task B's signed token-sum
gradients and ``Î = mean_i C_i`` the diagonal Fisher of task A on the *full* parameter tensors
(float32), never a group-reduced Fisher. Per slice the sum is a matrix product,
``M = A · Gᵀ`` with ``A[i,k] = C_{i,k}/(Î_k+λ)`` and ``G[j,k] = |g_{j,k}|``: one batched GEMM
over (layer, head) per block, ``einsum('lhcs,lhbs->lcbh')`` on head-major operands
``[layer, head, sample, slice]`` (weighting, ``|·|`` and the transpose fused into the pass that
builds them). On a GPU each side is built whole once and the contraction is cut into split-K pieces
that run as one batched GEMM; on a CPU the contraction is walked in cache-sized pieces, each built
and multiplied in one loop step, stored leaves are read in place (``QKOVOptions.contraction``) and
blocks and layer ranges run as concurrent computations, one per core (``QKOVOptions.workers``).
``contraction="pallas"`` instead reads each head's strided slice of the stored leaves inside the
GEMM, one pass over the inputs (:mod:`fisherjax.analysis.qkov_pallas`, a Triton kernel for GPUs).
Tiles over chunks of samples and layers keep the arrays on the device within a memory budget.

Slices. Heads are read only through :class:`~fisherjax.layout.ModelLayout` views (Flax ``[in, out]``
kernels, GPT-2's ``[Q|K|V]`` and GPT-NeoX's per-head interleaved fused QKV). The slice of
``(q|k|v, ℓ, h)`` is the head's kernel columns ``W[:, h, :]`` *and* its bias ``b[h, :]`` when the
model has q/k/v biases (``include_bias=True``, the default: the bias is a parameter of that head
alone); the slice of ``(o, ℓ, h)`` is the rows ``W_O[h, :, :]`` (the output bias is shared by all
heads and belongs to none). Slices partition the block, so with ``aggregate="sum"`` and a fixed
ridge the per-head scores add up to the score of the whole block. Under grouped-query attention
query head ``h`` reads kv head ``h // (H / H_kv)``; K and V are computed once per kv head and
gathered to query heads (:attr:`QKOVResult.kv_head_of` records the map).

Options (:class:`QKOVOptions`):

* ridge: ``λ = max(ridge_lambda, ridge_lambda_rel · median(Î_slice), ε)`` per slice. The
  denominator is ``Î_k + λ``; ``ε`` is *not* added to ``Î``. ``ε`` guards the denominator: it keeps
  ``Î_k + λ ≥ ε > 0`` when a slice's Fisher is exactly zero and both ridges are set to 0, and it
  is the threshold below which a Fisher entry counts as numerically dead in the diagnostics.
* ``aggregate``: ``"mean"`` divides each score by the slice size, ``"sum"`` keeps the sum.
* ``normalize_gj``: ``"none"`` uses ``g_j`` as stored (fisherjax stores token-*sum* gradients,
  so this equals ``"per_token_sum"``; the name is kept from the original system, whose stored
  gradients were token means), ``"per_token_mean"`` uses ``g_j / T_j``. It applies wherever
  ``g_j`` appears (unsigned, signed, natural); the symmetric variant uses ``C_j``, which is
  per-token already.
* ``fisher_pool``: the Fisher ``Î`` from task ``"A"`` (default), ``"B"``, or ``"pooled"`` (mean
  over the samples of both).
* ``variant``: ``"unsigned"`` (above), ``"signed"`` ``g_i · g_j / (Î + λ)`` (negative = the tasks
  pull the head's parameters in opposite directions), ``"symmetric"`` ``sqrt(C_i C_j) / (Î + λ)``,
  ``"natural"`` (natural-gradient) ``C_i / (Î + λ) · |g_j| / sqrt(Î + λ)``.

Scale. Multiplying both tasks' losses by ``a > 0`` scales ``g`` by ``a`` and ``C``, ``Î`` by
``a²``; when the ridge scales with the Fisher (``ridge_lambda = 0``, so ``λ = λ_rel·median(Î)``
above ``ε``) the unsigned score scales by ``a`` and the signed, symmetric and natural-gradient
scores do not change. A binding absolute floor ``ridge_lambda`` does not scale, so there the
invariance is only approximate (exact in the limit ``ridge_lambda ≪ Î``).

Samples with no active tokens (``T_i = 0``) carry no contribution: they are dropped with a
warning and never counted in ``Î``. A Fisher from fewer than ``min_fisher_samples`` samples is an
error. An empty task B gives zero scores and a warning.

Statistics: :func:`permutation_test` (does A-vs-B interference on a (block, layer, head) exceed
A-vs-A', a held-out split of A?) with Benjamini–Hochberg q-values over all cells
(:func:`fisherjax.stats.fdr_qvalues`, i.e. scipy), and :func:`bootstrap_layer_head_avg`
(percentile intervals over resampled samples of both tasks).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from fisherjax.errors import ConfigError, DataError, NumericalError
from fisherjax.backend import HOST_ALIGNMENT
from fisherjax.fisher.state import SampleGrads, TaskFisher, sample_grads_of
from fisherjax.layout import ModelLayout
from fisherjax.stats import bootstrap_indices, fdr_qvalues, percentile_interval, permutation_pvalue

BLOCKS = ("q", "k", "v", "o")
VARIANTS = ("unsigned", "signed", "symmetric", "natural")
AGGREGATES = ("mean", "sum")
NORMALIZE_GJ = ("none", "per_token_mean", "per_token_sum")
FISHER_POOLS = ("A", "B", "pooled")
CONTRACTIONS = ("auto", "batched", "looped", "pallas")



@dataclasses.dataclass(frozen=True)
class QKOVOptions:
    """Settings of the score (see the module docstring for their meaning).

    ``precision`` (``"highest"``: true float32 GEMMs; ``"default"`` lets a GPU use TF32) and
    ``contraction`` (how each slice's contraction is evaluated: ``"batched"`` builds whole head-major
    operands and cuts the contraction into ``split_k`` pieces that run as one batched GEMM, so
    ``layer · heads`` small GEMMs fill a GPU — 32 measured best on an H100; ``"looped"`` walks the
    contraction in pieces of about ``piece_floats`` floats per side (2 MiB, measured best of 1–4 MiB
    at 64 samples per task: 8 rows of a GPT-2-small q/k/v kernel or of one head's o rows), each
    weighted, made a GEMM operand and multiplied in one loop step, which a CPU needs (3–5× faster
    there); ``"pallas"`` reads each head's strided slice of the stored leaves inside the GEMM, one
    pass over the inputs (:mod:`fisherjax.analysis.qkov_pallas`, a Triton kernel for GPUs; elsewhere
    it runs in Pallas' interpret mode, for tests); ``"auto"``: looped on CPU, batched elsewhere; see
    ``benchmarks/RESULTS.md``) and ``workers`` (looped contraction runs its blocks and layer ranges
    as this many concurrent computations; ``None``: the cores this process may use — XLA:CPU runs a
    GEMM with a small ``c_a × c_b`` output on about one core) are compute settings: they change the
    scores only by rounding.
    """

    eps: float = 1e-10
    ridge_lambda: float = 1e-8
    ridge_lambda_rel: float = 1e-3
    aggregate: str = "mean"
    normalize_gj: str = "none"
    fisher_pool: str = "A"
    variant: str = "unsigned"
    include_bias: bool = True
    min_fisher_samples: int = 8
    top_k: int = 20
    precision: str = "highest"
    split_k: int = 32
    contraction: str = "auto"
    piece_floats: int = 2**19
    workers: int | None = None

    def __post_init__(self):
        for name, allowed in (
            ("aggregate", AGGREGATES),
            ("normalize_gj", NORMALIZE_GJ),
            ("fisher_pool", FISHER_POOLS),
            ("variant", VARIANTS),
            ("precision", ("highest", "high", "default")),
            ("contraction", CONTRACTIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"qkov {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.eps > 0:
            raise ConfigError(f"qkov eps must be > 0 (it keeps the denominator Î + λ positive), got {self.eps}")
        if self.ridge_lambda < 0 or self.ridge_lambda_rel < 0:
            raise ConfigError(f"qkov ridges must be ≥ 0, got ridge_lambda={self.ridge_lambda}, ridge_lambda_rel={self.ridge_lambda_rel}")
        if self.min_fisher_samples < 1:
            raise ConfigError(f"qkov min_fisher_samples must be ≥ 1, got {self.min_fisher_samples}")
        if self.split_k < 1 or self.piece_floats < 1:
            raise ConfigError(f"qkov split_k and piece_floats must be ≥ 1, got {self.split_k} and {self.piece_floats}")
        if self.top_k < 0:
            raise ConfigError(f"qkov top_k must be ≥ 0, got {self.top_k}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"qkov workers must be ≥ 1 or None (the cores available), got {self.workers}")

    @property
    def looped(self) -> bool:
        """Whether the kernel walks each contraction in pieces (:func:`_looped_sums`)."""
        return self.contraction == "looped" or (self.contraction == "auto" and jax.default_backend() == "cpu")

    @property
    def concurrency(self) -> int:
        """How many computations of looped contraction run at once (:func:`_in_parallel`)."""
        return self.workers if self.workers is not None else _available_cores()


def _available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


class SliceDiagnostics(NamedTuple):
    """Numerical health of the Fisher per slice, each ``[block, layer, head]`` (K/V rows describe
    the kv head that query head ``h`` reads): min / median / max of ``Î`` over the slice, the share
    of its entries below ``ε``, and the ridge ``λ`` actually applied."""

    fisher_min: Float[np.ndarray, "block layer heads"]
    fisher_median: Float[np.ndarray, "block layer heads"]
    fisher_max: Float[np.ndarray, "block layer heads"]
    share_below_eps: Float[np.ndarray, "block layer heads"]
    ridge: Float[np.ndarray, "block layer heads"]


@dataclasses.dataclass(frozen=True, eq=False)
class QKOVResult:
    """The interference of task B on task A per (block, layer, sample pair, head).

    Attributes:
      scores: ``[block, layer, n_a, n_b, head]`` float32, blocks in :data:`BLOCKS` order; K/V
        entries of query head ``h`` are those of kv head ``kv_head_of[h]``.
      layer_head_avg: ``[block, layer, head]`` mean of ``scores`` over all sample pairs.
      sample_ids_a, sample_ids_b: ``[n_a]``, ``[n_b]`` true sample ids of the rows / columns.
      kv_head_of: ``[head]`` the kv head each query head reads.
      slice_sizes: ``[block]`` parameters per slice (the divisor of ``aggregate="mean"``).
      diagnostics: :class:`SliceDiagnostics` of the Fisher used.
      top_conflicts: the ``top_k`` strongest entries (most negative for the signed variant), each
        a dict with the true sample ids of both tasks, block, layer, head, kv head and score; a
        K/V entry appears once per kv head (``query_heads`` lists the heads that read it).
      options: the :class:`QKOVOptions` used.
      task_a, task_b: task names; dropped_a, dropped_b: sample ids dropped for ``T_i = 0``.
    """

    scores: Float[np.ndarray, "block layer n_a n_b heads"]
    layer_head_avg: Float[np.ndarray, "block layer heads"]
    sample_ids_a: Int[np.ndarray, " n_a"]
    sample_ids_b: Int[np.ndarray, " n_b"]
    kv_head_of: Int[np.ndarray, " heads"]
    slice_sizes: Int[np.ndarray, " block"]
    diagnostics: SliceDiagnostics
    top_conflicts: tuple[dict, ...]
    options: QKOVOptions
    task_a: str = "A"
    task_b: str = "B"
    dropped_a: tuple[int, ...] = ()
    dropped_b: tuple[int, ...] = ()
    blocks: tuple[str, ...] = BLOCKS

    def block(self, name: str) -> Float[np.ndarray, "layer n_a n_b heads"]:
        """Scores of one block."""
        return self.scores[self.blocks.index(name)]


# ---------------------------------------------------------------------------------------------
# Inputs: per-block head views of contributions, gradients and the Fisher
# ---------------------------------------------------------------------------------------------


def _contributions_of(task, default_name: str) -> tuple[SampleGrads, str]:
    if isinstance(task, TaskFisher):
        return sample_grads_of(task)
    return sample_grads_of(task, default_name)


def _active(contributions: SampleGrads, name: str) -> tuple[SampleGrads, tuple[int, ...]]:
    """Drop samples with ``T_i = 0`` (they carry no contribution), with a warning."""
    tokens = np.asarray(contributions.tokens)
    keep = tokens > 0
    if keep.all():
        return contributions, ()
    dropped = tuple(int(s) for s in np.asarray(contributions.sample_ids)[~keep])
    warnings.warn(
        f"qkov: task {name!r} has {len(dropped)} sample(s) with no active tokens (T_i = 0); they carry no "
        f"contribution and are dropped (sample ids {list(dropped[:10])})",
        stacklevel=4,
    )
    return contributions.select(np.flatnonzero(keep)), dropped


def _block_kinds(layout: ModelLayout, include_bias: bool) -> list[tuple[str, str]]:
    """The (block, kind) pairs that make up the slices."""
    return [(b, k) for b, k in layout.attention_blocks() if k == "kernel" or include_bias]


def _key(block: str, kind: str) -> str:
    return f"{block}/{kind}"


def _required_paths(layout: ModelLayout, pairs) -> list[str]:
    return sorted({p for b, k in pairs for p in layout.block_sources(b, k)})


def _check_paths(store: Mapping[str, Any], needed: Sequence[str], what: str, task: str, include_bias: bool) -> None:
    missing = [p for p in needed if p not in store]
    if missing:
        hint = " (or pass include_bias=False)" if any(p.endswith("bias") for p in missing) and include_bias else ""
        raise DataError(f"qkov: task {task!r} stores no {what} for {missing}; collect them{hint}")


def _views(layout: ModelLayout, flat: Mapping[str, np.ndarray], pairs) -> dict[str, np.ndarray]:
    """``{block/kind: [layer, *view]}`` head views of unbatched leaves (per-layer leaves stacked)."""
    out = {}
    for block, kind in pairs:
        sources = layout.block_sources(block, kind)
        views = [np.asarray(layout.view(p, flat[p], block)) for p in sources]
        out[_key(block, kind)] = views[0] if len(sources) == 1 and layout.specs[sources[0]].layered else np.stack(views)
    return out


def _slice_matrix(view: np.ndarray, block: str, kind: str) -> np.ndarray:
    """``[layer, heads, slice]`` of an unbatched Fisher view (head axis moved before the rest)."""
    if kind == "bias":
        return view
    if block == "o":
        return view.reshape(view.shape[0], view.shape[1], -1)
    moved = np.moveaxis(view, -2, 1)  # [L, H, d_in, hd]
    return moved.reshape(moved.shape[0], moved.shape[1], -1)


def _ridge_shape(block: str, kind: str, ridge: np.ndarray) -> np.ndarray:
    """Broadcast a per-(layer, head) ridge ``[L, H]`` against a view of (block, kind)."""
    if kind == "bias":
        return ridge[:, :, None]
    if block == "o":
        return ridge[:, :, None, None]
    return ridge[:, None, :, None]


class _Prepared(NamedTuple):
    """Everything the tiles need, computed once per heatmap."""

    a: SampleGrads
    b: SampleGrads
    name_a: str
    name_b: str
    dropped_a: tuple[int, ...]
    dropped_b: tuple[int, ...]
    pairs: tuple[tuple[str, str], ...]
    weights: dict[str, np.ndarray]  # key -> [L, ...] view-shaped 1/(Î+λ) (or its 3/2 power)
    diagnostics: dict[str, dict[str, np.ndarray]]  # block -> stat -> [L, heads_of_block]
    slice_sizes: dict[str, int]
    scale_b: np.ndarray  # [n_b] per-sample factor of g_j (normalize_gj)


def _fisher_views(a: SampleGrads, b: SampleGrads, layout, pairs, options: QKOVOptions, names) -> dict[str, np.ndarray]:
    """Head views of ``Î`` (float32 mean of C over the pool's samples) on the full tensors."""
    pool = {"A": (a,), "B": (b,), "pooled": (a, b)}[options.fisher_pool]
    label = {"A": names[0], "B": names[1], "pooled": f"{names[0]}+{names[1]}"}[options.fisher_pool]
    n_pool = sum(len(c) for c in pool)
    if n_pool < options.min_fisher_samples:
        raise DataError(
            f"qkov: the Fisher of {label!r} would rest on {n_pool} sample(s) with active tokens; a stable "
            f"Fisher needs at least min_fisher_samples={options.min_fisher_samples}"
        )
    paths = _required_paths(layout, pairs)
    means = [c.fisher(paths) for c in pool if len(c)]
    counts = [len(c) for c in pool if len(c)]
    fisher = {p: (sum(n * m[p].astype(np.float64) for n, m in zip(counts, means)) / sum(counts)).astype(np.float32) for p in paths}
    for p, value in fisher.items():
        if not np.isfinite(value).all():
            raise NumericalError(f"qkov: the contributions of {label!r} for {p!r} contain NaN or inf")
    return _views(layout, fisher, pairs)


def _prepare(task_a, task_b, layout: ModelLayout, options: QKOVOptions) -> _Prepared:
    a, name_a = _contributions_of(task_a, "A")
    a, dropped_a = _active(a, name_a)
    b, name_b, dropped_b = _partner(task_b, "B")
    pairs = tuple(_block_kinds(layout, options.include_bias))
    paths = _required_paths(layout, pairs)
    a_side = "grads" if options.variant == "signed" else "contributions"
    _check_paths(getattr(a, a_side), paths, a_side, name_a, options.include_bias)
    _check_partner(b, name_b, paths, options)
    pool_tasks = {"A": ((a, name_a),), "B": ((b, name_b),), "pooled": ((a, name_a), (b, name_b))}[options.fisher_pool]
    for c, name in pool_tasks:
        _check_paths(c.contributions, paths, "contributions", name, options.include_bias)

    fisher = _fisher_views(a, b, layout, pairs, options, (name_a, name_b))
    weights, diagnostics, slice_sizes = {}, {}, {}
    for block in BLOCKS:
        kinds = [k for bb, k in pairs if bb == block]
        if not kinds:
            raise DataError(f"qkov: the layout has no {block} block")
        slices = np.concatenate([_slice_matrix(fisher[_key(block, k)], block, k) for k in kinds], axis=-1)
        median = np.median(slices, axis=-1)
        ridge = np.maximum(np.maximum(options.ridge_lambda, options.ridge_lambda_rel * median), options.eps).astype(np.float32)
        diagnostics[block] = {
            "fisher_min": slices.min(-1),
            "fisher_median": median,
            "fisher_max": slices.max(-1),
            "share_below_eps": (slices < options.eps).mean(-1),
            "ridge": ridge,
        }
        slice_sizes[block] = int(slices.shape[-1])
        power = 1.5 if options.variant == "natural" else 1.0
        for kind in kinds:
            denominator = fisher[_key(block, kind)] + _ridge_shape(block, kind, ridge)
            weights[_key(block, kind)] = (denominator ** -power).astype(np.float32)

    return _Prepared(a, b, name_a, name_b, dropped_a, dropped_b, pairs, weights, diagnostics, slice_sizes, _partner_scale(b, options))


def _partner_scale(b: SampleGrads, options: QKOVOptions) -> np.ndarray:
    """``[n_b]`` per-sample factor of ``g_j``: ``1/T_j`` for ``normalize_gj="per_token_mean"``, else 1."""
    if options.normalize_gj == "per_token_mean" and options.variant != "symmetric":
        return (1.0 / np.asarray(b.tokens, np.float64)).astype(np.float32)
    return np.ones(len(b), np.float32)


def _partner(task_b, default_name: str) -> tuple[SampleGrads, str, tuple[int, ...]]:
    """Task B's contributions with samples of no active tokens dropped, its name and the dropped ids."""
    b, name_b = _contributions_of(task_b, default_name)
    b, dropped_b = _active(b, name_b)
    return b, name_b, dropped_b


def _check_partner(b: SampleGrads, name_b: str, paths: Sequence[str], options: QKOVOptions) -> None:
    """Task B stores what its side of the product reads (``C`` for the symmetric variant, else ``g``)."""
    b_side = "contributions" if options.variant == "symmetric" else "grads"
    _check_paths(getattr(b, b_side), paths, b_side, name_b, options.include_bias)


def _with_partner(prep: _Prepared, task_b, layout: ModelLayout, options: QKOVOptions, default_name: str = "B") -> _Prepared:
    """``prep`` with another task B: valid as long as the Fisher is A's alone (``fisher_pool="A"``),
    so A's Fisher, weights and diagnostics are computed once for several partner sets."""
    if options.fisher_pool != "A":
        raise ConfigError("qkov: swapping task B keeps A's Fisher, which needs fisher_pool='A'")
    b, name_b, dropped_b = _partner(task_b, default_name)
    _check_partner(b, name_b, _required_paths(layout, prep.pairs), options)
    return prep._replace(b=b, name_b=name_b, dropped_b=dropped_b, scale_b=_partner_scale(b, options))


# ---------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------


def _head_major(x: Array, block: str, kind: str, split_k: int) -> Array:
    """A view with a leading sample axis ``[c, layer, *view]`` → ``[layer, heads, split, c, slice / split]``.

    The slice (contraction) axis is cut into ``split`` pieces that become a batch axis of the GEMM
    (split-K: ``layer · heads`` GEMMs of ``c_a × c_b`` outputs are too few to fill a GPU, each
    piece is one more independent GEMM; the pieces are summed afterwards). Kernels split their
    non-head axis (``d_in`` for q/k/v, ``d_out`` for o) by ``gcd(axis, split_k)``; biases do not split.
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


class _Side(NamedTuple):
    """Where one side of the GEMM comes from: ``x_i = transform(store_i) · scale_i``."""

    store: Mapping[str, np.ndarray]  # {path: [n, *shape]} stored per-sample arrays
    transform: str  # "identity" | "abs" | "sqrt" | "square"
    scale: np.ndarray  # [n] float32 per-sample factor


def _side(c: SampleGrads, role: str, variant: str) -> _Side:
    """Task A's (``role="a"``) or B's factor of the slice product, read from what is stored.

    A: ``C_i`` (``g_i`` for signed, ``sqrt(C_i)`` for symmetric); B: ``|g_j|`` (``g_j`` for signed,
    ``sqrt(C_j)`` for symmetric). SampleGrads derived from gradients (the empirical Fisher
    stores only ``g``) are formed on the device from ``g`` and ``1/T``, so ``g²`` is never built on
    the host: ``C = g² · (1/T)``, ``sqrt(C) = |g| · sqrt(1/T)``.
    """
    ones = np.ones(len(c), np.float32)
    wants = "grads" if variant == "signed" or (role == "b" and variant != "symmetric") else "contributions"
    if wants == "grads":
        return _Side(c.grads, "identity" if variant == "signed" else "abs", ones)
    if c.derived:
        inv_tokens = c.contributions.inv_tokens
        if variant == "symmetric":
            return _Side(c.grads, "abs", np.sqrt(inv_tokens))
        return _Side(c.grads, "square", inv_tokens)
    return _Side(c.contributions, "sqrt" if variant == "symmetric" else "identity", ones)


def _leaf_sources(layout: ModelLayout, pairs) -> dict[str, tuple[str, ...]]:
    """``{leaf key: source paths in layer order}``: the stored leaves the blocks are viewed from.

    The key is the first source path; a layer-stacked leaf is its own single source, a model with
    one leaf per layer has one source per layer. Q, K and V of a fused projection share a leaf,
    which is therefore moved to the device once.
    """
    return {sources[0]: tuple(sources) for sources in (tuple(layout.block_sources(b, k)) for b, k in pairs)}


def _device_leaves(store, layout: ModelLayout, sources: dict[str, tuple[str, ...]], samples, layers) -> dict[str, Array]:
    """``{leaf key: [c, layer, *shape]}`` on the device for the selected samples and layers.

    Contiguous runs are moved as plain slices of the stored arrays (no host gather) and, on a CPU,
    used in place where :func:`_in_place` allows; per-layer leaves are stacked on the device.
    """
    out = {}
    for key, paths in sources.items():
        if layout.spec(key).layered:
            out[key] = jax.device_put(_take(store[key], samples, layers), may_alias=True)
        else:
            rows = slice(samples[0], samples[-1] + 1) if _is_run(samples) else samples
            out[key] = jnp.stack([jnp.asarray(store[paths[layer]][rows]) for layer in layers], axis=1)
    return out


def _in_place(store, layout: ModelLayout, sources: dict[str, tuple[str, ...]]) -> bool:
    """Whether the CPU backend can read every stored leaf in place (layer-stacked, C-contiguous,
    :data:`~fisherjax.fisher.state.HOST_ALIGNMENT`-aligned, as :func:`~fisherjax.fisher.collect`
    stores them): then a tile of whole sample runs over all layers costs no copy at all."""
    if jax.default_backend() != "cpu":
        return False
    for key in sources:
        x = store[key]
        if not (layout.spec(key).layered and isinstance(x, np.ndarray) and x.flags.c_contiguous):
            return False
        if x.ctypes.data % HOST_ALIGNMENT:
            return False
    return True


_TRANSFORMS = {"identity": lambda x: x, "abs": jnp.abs, "sqrt": jnp.sqrt, "square": jnp.square}


def _weighted(x: Array, transform: str, scale: Array, weight: Array | None) -> Array:
    """``transform(x_i) · scale_i · w`` in float32: ``x`` ``[c, ...]``, ``scale`` ``[c]``, ``weight``
    ``x.shape[1:]`` (``1/(Î+λ)`` on task A's side) or ``None``."""
    x = _TRANSFORMS[transform](x.astype(jnp.float32)) * scale.reshape((-1,) + (1,) * (x.ndim - 1))
    return x if weight is None else x * weight[None]


def _per_block(terms) -> dict[str, Array]:
    """Sum ``(block, [layer, head, c_a, c_b])`` terms (kernel, bias) per block: ``{block: [layer, c_a, c_b, heads]}``."""
    out: dict[str, Array] = {}
    for block, term in terms:
        out[block] = out[block] + term if block in out else term
    return {block: jnp.transpose(value, (0, 2, 3, 1)) for block, value in out.items()}


@functools.partial(jax.jit, static_argnames=("transform", "split_k"))
def _operand(views: dict, scale: Array, weights: dict | None, *, transform: str, split_k: int = 1) -> dict[str, Array]:
    """One side of the GEMM, head-major: ``transform(x_i) · scale_i · w`` (:func:`_head_major`).

    ``views``: ``{block/kind: [c, layer, *view]}``; ``scale``: ``[c]``; ``weights``: ``{block/kind:
    [layer, *view]}`` — ``1/(Î+λ)`` (or its 3/2 power) on task A's side, ``None`` on task B's.
    """
    out = {}
    for key, x in views.items():
        block, kind = key.split("/")
        out[key] = _head_major(_weighted(x, transform, scale, None if weights is None else weights[key]), block, kind, split_k)
    return out


@functools.partial(jax.jit, static_argnames=("layout", "pairs", "transform", "split_k"))
def _operand_from_leaves(leaves: dict, scale: Array, weights: dict | None, *, layout: ModelLayout, pairs, transform: str, split_k: int):
    """:func:`_operand` of the layout's head views of stored leaves ``{leaf key: [c, layer, *shape]}``;
    views, weighting and the move to head-major fuse into one pass over the leaves."""
    return _operand(_views_of(layout, leaves, pairs), scale, weights, transform=transform, split_k=split_k)


def _views_of(layout: ModelLayout, leaves: dict, pairs) -> dict[str, Array]:
    """``{block/kind: [c, layer, *view]}``: the layout's head views of ``{leaf key: [c, layer, *shape]}``."""
    views = {}
    for block, kind in pairs:
        key = layout.block_sources(block, kind)[0]
        views[_key(block, kind)] = layout.view(key, leaves[key], block, per_layer=True)
    return views


_PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "high": jax.lax.Precision.HIGH, "default": jax.lax.Precision.DEFAULT}


@functools.partial(jax.jit, static_argnames=("precision",))
def _slice_products(a: dict, b: dict, *, precision: str) -> dict[str, Array]:
    """``M = A · Gᵀ`` per (layer, head) slice: per (block, kind) one batched GEMM over (layer, head,
    split) and a sum over the split and the kinds: ``{block: [layer, c_a, c_b, heads]}``."""
    def term(key):
        partial = jnp.einsum("lhkcs,lhkbs->lhkcb", a[key], b[key], precision=_PRECISIONS[precision], preferred_element_type=jnp.float32)
        return partial.sum(axis=2)

    return _per_block((key.split("/")[0], term(key)) for key in sorted(a))


_MAX_STACKED_ROWS = 8  # a q/k/v piece's rows are moved head-major one by one, unrolled in the loop body


def _rows_per_piece(rows: int, floats_per_row: int, target_floats: int, most: int | None = None) -> int:
    """The most rows ``r`` (a divisor of ``rows``, at most ``most``) with ``r · floats_per_row ≤
    target_floats``; at least 1."""
    fits = [r for r in range(1, (most or rows) + 1) if rows % r == 0 and r * floats_per_row <= target_floats]
    return max(fits, default=1)


def _looped_sums(
    views_a: dict, scale_a: Array, weights: dict, views_b: dict, scale_b: Array, first_layer: Int[Array, ""] | int = 0, *,
    n_layers: int | None = None, transform_a: str, transform_b: str, piece_floats: int, precision: str,
    row_heads: Mapping[str, Callable[[Array], Array]] | None = None,
) -> dict[str, Array]:
    """``M = A · Gᵀ`` per (layer, head) slice of layers ``[first_layer, first_layer + n_layers)``
    (all by default), walking each slice's contraction in pieces.

    The same sums as :func:`_operand` + :func:`_slice_products` (``{block: [n_layers, c_a, c_b,
    heads]}``), for backends where a pass that writes whole head-major operands costs more than the
    GEMMs (a CPU: fresh operand buffers fault page by page and XLA's transposing copies run far
    below memory bandwidth). A ``fori_loop`` per kernel walks pieces of about ``piece_floats``
    floats per side, each weighted, made a GEMM operand while it is in cache, multiplied and added
    to its slice's sum:

    * q/k/v kernels ``[c, layer, d_in, h, e]``: ``r`` rows of ``d_in`` of one layer, every head.
      Each row's ``[c, h, e] → [h, c, e]`` is a small 3-D transpose, which XLA:CPU does at cache
      speed (a 4-D ``[c, r, h, e] → [h, c, r, e]`` ran at ≈ 4 GB/s); ``r`` of them stacked give
      every head one GEMM with a contraction of ``r · e`` (one GEMM per row, 64 long, was dominated
      by per-call cost).
    * o kernels ``[c, layer, h, e, d_out]``: ``r`` rows of ``e`` of one head and layer — ``r ·
      d_out`` contiguous floats per sample, already the GEMM operand ``[c, r · d_out]``.
    * biases ``[c, layer, h, e]`` are small and taken whole.

    A q/k/v kernel may also be given as its stored leaf ``[c, layer, d_in, columns]`` with
    ``row_heads[key]`` viewing one row ``[c, columns] → [c, h, e]``: GPT-2's and GPT-NeoX's fused
    QKV leaves are then sliced piece by piece, where a whole q/k/v view of them would be one
    strided copy of the block before the loop (3.5× the loop's own time for GPT-2-small's q).
    ``first_layer`` is traced, so every layer range of one length shares a compilation.
    """
    n_layers = n_layers or next(iter(views_a.values())).shape[1]
    dot = functools.partial(jnp.einsum, precision=_PRECISIONS[precision], preferred_element_type=jnp.float32)

    def layers_of(x, offset):  # offset: 1 for views [c, layer, ...], 0 for weights [layer, ...]
        return jax.lax.dynamic_slice_in_dim(x, first_layer, n_layers, axis=1 - offset)

    def take(x, start, sizes):  # x[:, first_layer + start[0], ...] of a view; weights: without the sample axis
        lead = x.ndim - len(start)
        return jax.lax.dynamic_slice(x, (0,) * lead + (first_layer + start[0], *start[1:]), x.shape[:lead] + sizes)

    def all_heads_walk(xa, xb, w, to_heads):
        c, _, d_in, *row_shape = xa.shape
        heads, e = jax.eval_shape(to_heads, jax.ShapeDtypeStruct((c, *row_shape), xa.dtype)).shape[1:]
        r = _rows_per_piece(d_in, c * heads * e, piece_floats, _MAX_STACKED_ROWS)

        def operand(x, layer, row, transform, scale, weighted):
            rows = []
            for i in range(r):
                xi = to_heads(take(x, (layer, row + i) + (0,) * len(row_shape), (1, 1, *row_shape)).reshape(x.shape[0], *row_shape))
                wi = take(w, (layer, row + i, 0, 0), (1, 1, heads, e)).reshape(heads, e) if weighted else None
                rows.append(jnp.transpose(_weighted(xi, transform, scale, wi), (1, 0, 2)))
            return jnp.stack(rows, axis=2).reshape(heads, x.shape[0], r * e)

        def body(k, acc):
            layer, row = k // (d_in // r), (k % (d_in // r)) * r
            m = dot("hcs,hbs->hcb", operand(xa, layer, row, transform_a, scale_a, w is not None),
                    operand(xb, layer, row, transform_b, scale_b, False))
            return jax.lax.dynamic_update_index_in_dim(acc, acc[layer] + m, layer, axis=0)

        zero = jnp.zeros((n_layers, heads, c, xb.shape[0]), jnp.float32)
        return jax.lax.fori_loop(0, n_layers * (d_in // r), body, zero)

    def one_head_walk(xa, xb, w):
        c, _, heads, e, d_out = xa.shape
        r = _rows_per_piece(e, c * d_out, piece_floats)
        pieces = e // r

        def operand(x, layer, head, row, transform, scale, weighted):
            x = take(x, (layer, head, row, 0), (1, 1, r, d_out)).reshape(x.shape[0], r * d_out)
            return _weighted(x, transform, scale, take(w, (layer, head, row, 0), (1, 1, r, d_out)).reshape(-1) if weighted else None)

        def body(k, acc):
            layer, head, row = k // (heads * pieces), (k // pieces) % heads, (k % pieces) * r
            m = dot("cs,bs->cb", operand(xa, layer, head, row, transform_a, scale_a, w is not None),
                    operand(xb, layer, head, row, transform_b, scale_b, False))
            return jax.lax.dynamic_update_slice(acc, (acc[layer, head] + m)[None, None], (layer, head, 0, 0))

        zero = jnp.zeros((n_layers, heads, c, xb.shape[0]), jnp.float32)
        return jax.lax.fori_loop(0, n_layers * heads * pieces, body, zero)

    def term(key):
        block, kind = key.split("/")
        xa, xb, w = views_a[key], views_b[key], weights.get(key) if weights is not None else None
        if kind == "bias":
            a = _head_major(_weighted(layers_of(xa, 0), transform_a, scale_a, None if w is None else layers_of(w, 1)), block, kind, 1)
            b = _head_major(_weighted(layers_of(xb, 0), transform_b, scale_b, None), block, kind, 1)
            return dot("lhcs,lhbs->lhcb", a[:, :, 0], b[:, :, 0])
        if block == "o":
            return one_head_walk(xa, xb, w)
        return all_heads_walk(xa, xb, w, (row_heads or {}).get(key, lambda x: x))

    return _per_block((key.split("/")[0], term(key)) for key in sorted(views_a))


@functools.partial(jax.jit, static_argnames=("layout", "pairs", "n_layers", "transform_a", "transform_b", "piece_floats", "precision"))
def _looped_from_leaves(
    leaves_a: dict, scale_a: Array, weights: dict, leaves_b: dict, scale_b: Array, first_layer: Int[Array, ""] | int = 0, *,
    layout: ModelLayout, pairs, n_layers: int | None = None, transform_a: str, transform_b: str, piece_floats: int, precision: str,
) -> dict[str, Array]:
    """:func:`_looped_sums` of both tasks' stored leaves: q/k/v kernels as leaves whose row pieces
    are viewed with heads (:meth:`ModelLayout.output_heads`), o kernels and biases as head views."""
    row_heads = {}
    for block, kind in pairs:
        if kind == "kernel" and block != "o":
            row_heads[_key(block, kind)] = functools.partial(layout.output_heads, layout.block_sources(block, kind)[0], block=block)

    def sides(leaves):
        views = _views_of(layout, leaves, tuple(p for p in pairs if _key(*p) not in row_heads))
        return views | {key: leaves[layout.block_sources(*key.split("/"))[0]] for key in row_heads}

    return _looped_sums(
        sides(leaves_a), scale_a, weights, sides(leaves_b), scale_b, first_layer, n_layers=n_layers, transform_a=transform_a,
        transform_b=transform_b, piece_floats=piece_floats, precision=precision, row_heads=row_heads,
    )


def _layer_ranges(n_layers: int, parts: int) -> list[tuple[int, int]]:
    """``(first, count)`` of at most ``parts`` contiguous layer ranges covering ``n_layers``, sizes
    differing by at most one (so at most two lengths, i.e. two compilations per block)."""
    parts = max(1, min(parts, n_layers))
    sizes = [n_layers // parts + (p < n_layers % parts) for p in range(parts)]
    starts = np.cumsum([0] + sizes[:-1])
    return [(int(first), count) for first, count in zip(starts, sizes)]


def _in_parallel(
    work: Callable[[tuple, int, int], dict[str, Array]],
    pairs: tuple[tuple[str, str], ...],
    n_layers: int,
    workers: int,
    cost: Callable[[str], float] = lambda block: 1.0,
) -> dict[str, np.ndarray]:
    """``{block: [n_layers, c_a, c_b, heads]}``: ``work(block_pairs, first_layer, count)`` for every
    block and layer range, as ``workers`` concurrent computations.

    Why threads: XLA:CPU runs a GEMM with a small output (``c_a × c_b`` = 64 × 64) on about one
    core, and runs the computations dispatched from one thread one after another, so a second core
    only helps when a second thread runs a computation of its own (2 cores: 1.5–1.8× measured). Each
    block is cut into ``workers`` layer ranges; the pieces are handed to a thread pool (the standard
    library's ``ThreadPoolExecutor``), largest ``cost`` first so the pool ends evenly.
    """
    if workers <= 1:
        return {block: np.asarray(value) for block, value in work(pairs, 0, n_layers).items()}
    blocks = {block: tuple(p for p in pairs if p[0] == block) for block, _ in pairs}
    ranges = _layer_ranges(n_layers, workers)
    units = sorted(((block, first, count) for block in blocks for first, count in ranges), key=lambda u: cost(u[0]) * u[2], reverse=True)

    def run(unit):
        block, first, count = unit
        return unit, np.asarray(work(blocks[block], first, count)[block])  # waits for it on this thread

    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = dict(pool.map(run, units))
    return {block: np.concatenate([parts[block, first, count] for first, count in ranges]) for block in blocks}


def _looped_tile(
    leaves_a: dict, scale_a: Array, weights: dict, leaves_b: dict, scale_b: Array, *,
    layout: ModelLayout, pairs, workers: int, transform_a: str, transform_b: str, piece_floats: int, precision: str,
) -> dict[str, np.ndarray]:
    """Looped contraction of one tile (``weights``: ``{block/kind: [layer, *view]}``): the
    (block, layer range) computations of :func:`_looped_from_leaves`, run by :func:`_in_parallel`
    with each block's cost its number of weights."""
    cost = {block: sum(int(np.prod(w.shape[1:])) for key, w in weights.items() if key.startswith(block + "/")) for block in BLOCKS}

    def work(block_pairs, first, count):
        return _looped_from_leaves(
            leaves_a, scale_a, weights, leaves_b, scale_b, first, layout=layout, pairs=block_pairs, n_layers=count,
            transform_a=transform_a, transform_b=transform_b, piece_floats=piece_floats, precision=precision,
        )

    n_layers = next(iter(weights.values())).shape[0]
    return _in_parallel(work, pairs, n_layers, workers, cost.get)


def _pallas_tile(
    leaves_a: dict, scale_a: Array, weights: dict, leaves_b: dict, scale_b: Array, *,
    layout: ModelLayout, pairs, transform_a: str, transform_b: str, split_k: int, precision: str,
) -> dict[str, Array]:
    """One tile by :func:`~fisherjax.analysis.qkov_pallas.kernel_products` (kernels, read in place
    from the stored leaves) plus the q/k/v biases, which are small, by the batched path."""
    from fisherjax.analysis import qkov_pallas  # it imports this module

    kernels = tuple(p for p in pairs if p[1] == "kernel")
    biases = tuple(p for p in pairs if p[1] == "bias")
    out = qkov_pallas.kernel_products(
        leaves_a, scale_a, weights, leaves_b, scale_b, layout=layout, pairs=kernels, transform_a=transform_a,
        transform_b=transform_b, split_k=split_k, precision=precision, interpret=jax.default_backend() != "gpu",
    )
    if biases:
        side = functools.partial(_operand_from_leaves, layout=layout, pairs=biases, split_k=1)
        bias = _slice_products(
            side(leaves_a, scale_a, weights, transform=transform_a), side(leaves_b, scale_b, None, transform=transform_b), precision=precision
        )
        out = {block: out[block] + bias[block] if block in bias else out[block] for block in out}
    return out


def tile_plan(
    n_a: int, n_b: int, n_layers: int, floats_per_layer: int, memory_budget_bytes: float, copies: int = 3
) -> tuple[int, int, int]:
    """Sample chunks ``(c_a, c_b)`` and layer chunk ``c_l`` whose tile fits the memory budget.

    A tile holds ``c_a + c_b`` samples of ``c_l`` layers, ``copies`` float32 copies of each (three
    for batched contraction: input, head-major operand, slack for the GEMM; one for looped
    contraction, whose pieces are small, and for the Pallas kernel, which reads the stored leaves
    themselves; none when the inputs are read in place, so everything is one tile) plus the
    weights. All layers are kept together as long as at least ``min(n, 32)`` samples of each task
    fit; otherwise layers are split.
    """
    if copies == 0:
        return max(n_a, 1), max(n_b, 1), n_layers
    per_sample_layer = copies * 4 * max(floats_per_layer, 1)
    want = max(1, min(max(n_a, n_b), 32))
    for c_l in range(n_layers, 0, -1):
        fit = int(memory_budget_bytes // (c_l * per_sample_layer) - 1)  # one slot for the weights
        if fit >= 2 * want or c_l == 1:
            c_a = max(1, min(n_a, fit // 2 if n_b else fit))
            c_b = max(1, min(n_b, fit - c_a))
            return c_a, c_b, c_l
    raise AssertionError("unreachable")


def _chunk_index(start: int, size: int, n: int) -> np.ndarray:
    """``size`` positions from ``start``; past the end the last one repeats (results are discarded),
    so every tile has one shape and the jitted kernel compiles once."""
    return np.minimum(np.arange(start, start + size), n - 1)


def _take(x, samples: np.ndarray, layers: np.ndarray):
    """``x[samples][:, layers]``, as a plain slice (no gather) when both index runs are contiguous."""
    if _is_run(samples) and _is_run(layers):
        return x[samples[0] : samples[-1] + 1, layers[0] : layers[-1] + 1]
    return x[samples[:, None], layers[None, :]]


def _is_run(index: np.ndarray) -> bool:
    return bool(len(index)) and bool(np.all(np.diff(index) == 1))


def _raw_scores(
    prep: _Prepared,
    layout: ModelLayout,
    options: QKOVOptions,
    a_positions: np.ndarray,
    b_positions: np.ndarray,
    layers: np.ndarray,
    memory_budget_bytes: float,
) -> dict[str, np.ndarray]:
    """``{block: [layer, n_a, n_b, heads_of_block]}`` slice sums for the selected samples and layers.

    Tiles: chunks of layers × chunks of A × chunks of B. Each side's stored leaves are moved to the
    device once per tile row / column (B's once per layer chunk when it fits in one chunk). Batched
    contraction turns them there into head-major GEMM operands, so the per-tile work is the batched
    GEMM alone; looped contraction does weighting, head-major pieces and GEMMs in one loop per
    tile, and when a CPU can read the stored leaves in place (:func:`_in_place`) the whole problem
    is one tile and nothing is copied.
    """
    a_side, b_side = _side(prep.a, "a", options.variant), _side(prep.b, "b", options.variant)
    sources = _leaf_sources(layout, prep.pairs)
    n_a, n_b, n_l = len(a_positions), len(b_positions), len(layers)
    out = {block: np.zeros((n_l, n_a, n_b, layout.heads_of(block)), np.float32) for block in BLOCKS}
    if n_a == 0 or n_b == 0:
        return out
    floats_per_layer = sum(int(np.prod(w.shape[1:])) for w in prep.weights.values())
    looped, pallas = options.looped, options.contraction == "pallas"
    if (looped or pallas) and _in_place(a_side.store, layout, sources) and _in_place(b_side.store, layout, sources):
        copies = 0
    else:
        copies = 1 if looped or pallas else 3
    c_a, c_b, c_l = tile_plan(n_a, n_b, n_l, floats_per_layer, memory_budget_bytes, copies=copies)
    if pallas:
        from fisherjax.analysis.qkov_pallas import sample_chunk  # it imports this module

        c_a, c_b = sample_chunk(c_a, n_a), sample_chunk(c_b, n_b)
        if jax.default_backend() != "gpu":
            warnings.warn(
                f"qkov: contraction='pallas' is a GPU (Triton) kernel; on {jax.default_backend()} it runs in Pallas' "
                "interpret mode, which is slow (contraction='auto' picks the fast path here)",
                stacklevel=3,
            )
    statics = dict(layout=layout, pairs=prep.pairs)

    def operand(side: _Side, positions, layer_index, weights):
        """The side's stored leaves on the device (looped, pallas) or its head-major operand (batched)."""
        leaves = _device_leaves(side.store, layout, sources, positions, layer_index)
        scale = jnp.asarray(side.scale[positions])
        if looped or pallas:
            return leaves, scale
        return _operand_from_leaves(leaves, scale, weights, transform=side.transform, split_k=options.split_k, **statics)

    def products(a_operand, b_operand, weights):
        transforms = dict(transform_a=a_side.transform, transform_b=b_side.transform)
        if looped:
            return _looped_tile(
                *a_operand, weights, *b_operand, workers=options.concurrency, piece_floats=options.piece_floats,
                precision=options.precision, **transforms, **statics,
            )
        if pallas:
            return _pallas_tile(*a_operand, weights, *b_operand, split_k=options.split_k, precision=options.precision, **transforms, **statics)
        return _slice_products(a_operand, b_operand, precision=options.precision)

    b_chunks = range(0, n_b, c_b)
    for l0 in range(0, n_l, c_l):
        lsel = layers[_chunk_index(l0, c_l, n_l)]
        weights = {k: jnp.asarray(w[lsel]) for k, w in prep.weights.items()}
        b_cached = None
        for i0 in range(0, n_a, c_a):
            a_operand = operand(a_side, a_positions[_chunk_index(i0, c_a, n_a)], lsel, weights)
            for j0 in b_chunks:
                if b_cached is None or len(b_chunks) > 1:
                    b_cached = operand(b_side, b_positions[_chunk_index(j0, c_b, n_b)], lsel, None)
                tile = products(a_operand, b_cached, weights)
                li, ii, ji = min(c_l, n_l - l0), min(c_a, n_a - i0), min(c_b, n_b - j0)
                for block, value in tile.items():
                    out[block][l0 : l0 + li, i0 : i0 + ii, j0 : j0 + ji] = np.asarray(value)[:li, :ii, :ji]
    return out


def _finish(raw: dict[str, np.ndarray], prep: _Prepared, layout: ModelLayout, options: QKOVOptions, b_positions) -> np.ndarray:
    """Per-sample factors, aggregation and the GQA gather: ``[block, layer, n_a, n_b, heads]``."""
    kv = layout.kv_head_of
    stacked = []
    for block in BLOCKS:
        value = raw[block] * prep.scale_b[b_positions][None, None, :, None]
        if options.aggregate == "mean":
            value = value / np.float32(prep.slice_sizes[block])
        stacked.append(value[..., kv] if block in ("k", "v") else value)
    scores = np.stack(stacked).astype(np.float32)
    if not np.isfinite(scores).all():
        bad = np.argwhere(~np.isfinite(scores))[0]
        raise NumericalError(
            f"qkov: non-finite score in block {BLOCKS[bad[0]]}, layer {bad[1]}, head {bad[4]}: the gradients "
            "of one of the tasks contain NaN or inf"
        )
    return scores


def _scores(prep: _Prepared, layout: ModelLayout, options: QKOVOptions, memory_budget_bytes: float) -> np.ndarray:
    """``[block, layer, n_a, n_b, head]`` scores of every sample pair (:func:`_raw_scores`, :func:`_finish`)."""
    a_pos, b_pos = np.arange(len(prep.a)), np.arange(len(prep.b))
    raw = _raw_scores(prep, layout, options, a_pos, b_pos, np.arange(layout.num_layers), memory_budget_bytes)
    return _finish(raw, prep, layout, options, b_pos)


def _stack_diagnostics(prep: _Prepared, layout: ModelLayout) -> SliceDiagnostics:
    kv = layout.kv_head_of

    def stat(name):
        return np.stack([prep.diagnostics[b][name][:, kv] if b in ("k", "v") else prep.diagnostics[b][name] for b in BLOCKS])

    return SliceDiagnostics(*(stat(name).astype(np.float64) for name in SliceDiagnostics._fields))


def _options(options: QKOVOptions | None, overrides: Mapping[str, Any]) -> QKOVOptions:
    base = options or QKOVOptions()
    unknown = set(overrides) - {f.name for f in dataclasses.fields(QKOVOptions)}
    if unknown:
        raise ConfigError(f"qkov: unknown options {sorted(unknown)}")
    return dataclasses.replace(base, **overrides)


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def heatmap(
    task_a: TaskFisher | SampleGrads,
    task_b: TaskFisher | SampleGrads,
    layout: ModelLayout,
    *,
    options: QKOVOptions | None = None,
    memory_budget_bytes: float = 2e9,
    **overrides,
) -> QKOVResult:
    """QK-OV interference of task B on task A for every sample pair, layer, head and block.

    ``M^B_{ij,ℓ,h} = Σ_{k∈slice(B,ℓ,h)} C_{i,k}/(Î_k+λ) · |g_{j,k}|`` (or a variant, see the module
    docstring), divided by the slice size for ``aggregate="mean"``; ``Î`` is the float32 mean of
    the pool's per-sample contributions on the full attention tensors.

    Args:
      task_a, task_b: :class:`~fisherjax.fisher.TaskFisher` values with contributions and signed
        gradients of the attention parameters (or :class:`~fisherjax.fisher.SampleGrads`).
      layout: the model's :class:`~fisherjax.layout.ModelLayout`; all head slicing goes through it.
      options: a :class:`QKOVOptions`; keyword ``overrides`` replace its fields
        (``variant="signed"``, ``ridge_lambda_rel=0.0``, ...).
      memory_budget_bytes: bound on the arrays one tile puts on the device (see :func:`tile_plan`).

    Returns:
      :class:`QKOVResult` with ``scores [block, layer, n_a, n_b, head]``, ``layer_head_avg
      [block, layer, head]``, top conflicts with true sample ids and per-slice diagnostics.
    """
    options = _options(options, overrides)
    prep = _prepare(task_a, task_b, layout, options)
    n_a, n_b = len(prep.a), len(prep.b)
    if n_b == 0:
        warnings.warn(f"qkov: task {prep.name_b!r} has no samples; its interference scores are all zero", stacklevel=2)
    scores = _scores(prep, layout, options, memory_budget_bytes)
    avg = scores.mean(axis=(2, 3)) if n_a and n_b else np.zeros(scores.shape[:2] + scores.shape[-1:], np.float32)
    ids_a, ids_b = np.asarray(prep.a.sample_ids), np.asarray(prep.b.sample_ids)
    return QKOVResult(
        scores=scores,
        layer_head_avg=avg.astype(np.float32),
        sample_ids_a=ids_a,
        sample_ids_b=ids_b,
        kv_head_of=np.asarray(layout.kv_head_of),
        slice_sizes=np.array([prep.slice_sizes[b] for b in BLOCKS]),
        diagnostics=_stack_diagnostics(prep, layout),
        top_conflicts=_top_conflicts(scores, ids_a, ids_b, layout, options),
        options=options,
        task_a=prep.name_a,
        task_b=prep.name_b,
        dropped_a=prep.dropped_a,
        dropped_b=prep.dropped_b,
    )


def sample_pair(
    task_a: TaskFisher | SampleGrads,
    task_b: TaskFisher | SampleGrads,
    layout: ModelLayout,
    sample_a: int,
    sample_b: int,
    layer: int,
    head: int,
    *,
    options: QKOVOptions | None = None,
    **overrides,
) -> dict[str, float]:
    """The four block scores ``{q, k, v, o: M^B_{ij,ℓ,h}}`` of one sample pair, layer and query head.

    ``sample_a`` / ``sample_b`` are true sample ids. The Fisher and ridges come from the whole pool
    exactly as in :func:`heatmap`; only the one pair and layer go through the kernel.
    """
    options = _options(options, overrides)
    prep = _prepare(task_a, task_b, layout, options)
    positions = []
    for ids, sample, name in ((prep.a.sample_ids, sample_a, prep.name_a), (prep.b.sample_ids, sample_b, prep.name_b)):
        found = np.flatnonzero(np.asarray(ids) == sample)
        if not len(found):
            raise DataError(f"qkov: task {name!r} has no sample with id {sample} (among samples with active tokens)")
        positions.append(found[:1])
    if not 0 <= layer < layout.num_layers or not 0 <= head < layout.num_heads:
        raise DataError(f"qkov: layer {layer} / head {head} outside the model's {layout.num_layers} layers × {layout.num_heads} heads")
    raw = _raw_scores(prep, layout, options, positions[0], positions[1], np.array([layer]), 2e9)
    scores = _finish(raw, prep, layout, options, positions[1])
    return {block: float(scores[n, 0, 0, 0, head]) for n, block in enumerate(BLOCKS)}


def _top_conflicts(scores, ids_a, ids_b, layout: ModelLayout, options: QKOVOptions) -> tuple[dict, ...]:
    """The ``top_k`` strongest entries; K/V entries once per kv head (its first query head)."""
    if options.top_k == 0 or scores.size == 0:
        return ()
    kv = np.asarray(layout.kv_head_of)
    first_of_group = np.r_[True, kv[1:] != kv[:-1]]
    candidate = np.ones(scores.shape[0:1] + (1, 1, 1) + scores.shape[-1:], bool)
    candidate[1:3, ..., ~first_of_group] = False  # k and v
    sign = -1.0 if options.variant == "signed" else 1.0
    key = np.where(candidate, sign * scores, -np.inf).ravel()
    k = min(options.top_k, int(candidate.sum()) * scores.shape[1] * scores.shape[2] * scores.shape[3])
    top = np.argpartition(-key, k - 1)[:k]
    top = top[np.argsort(-key[top], kind="stable")]
    out = []
    for flat in top:
        b, layer, i, j, h = np.unravel_index(flat, scores.shape)
        entry = {
            "block": BLOCKS[b],
            "layer": int(layer),
            "head": int(h),
            "kv_head": int(kv[h]),
            "sample_a": int(ids_a[i]),
            "sample_b": int(ids_b[j]),
            "score": float(scores[b, layer, i, j, h]),
        }
        if BLOCKS[b] in ("k", "v"):
            entry["query_heads"] = [int(q) for q in np.flatnonzero(kv == kv[h])]
        out.append(entry)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def heldout_split(task: TaskFisher | SampleGrads, fraction: float = 0.5, seed: int = 0) -> tuple[SampleGrads, SampleGrads]:
    """Split a task's samples at random into ``(A, A')`` with ``A'`` holding ``fraction`` of them."""
    contributions, name = _contributions_of(task, "A")
    n = len(contributions)
    n_held = int(round(fraction * n))
    if not 0 < n_held < n:
        raise DataError(f"qkov: cannot hold out {fraction:.0%} of the {n} samples of task {name!r}")
    order = np.random.default_rng(seed).permutation(n)
    return contributions.select(np.sort(order[n_held:])), contributions.select(np.sort(order[:n_held]))


class PermutationResult(NamedTuple):
    """A-vs-B against A-vs-A' per cell ``[block, layer, head]``.

    ``observed``: mean score over A×B minus mean over A×A'; ``pvalues``: one-sided permutation
    p-values (B's interference exceeds A''s); ``qvalues``: Benjamini–Hochberg over all distinct
    cells (K/V once per kv head, then gathered to query heads); ``significant``: ``q ≤ alpha``.
    """

    observed: Float[np.ndarray, "block layer heads"]
    pvalues: Float[np.ndarray, "block layer heads"]
    qvalues: Float[np.ndarray, "block layer heads"]
    significant: Bool[np.ndarray, "block layer heads"]
    n_permutations: int
    alpha: float


def permutation_test(
    task_a: TaskFisher | SampleGrads,
    task_b: TaskFisher | SampleGrads,
    task_a_heldout: TaskFisher | SampleGrads,
    layout: ModelLayout,
    *,
    n_permutations: int = 2000,
    alpha: float = 0.05,
    fdr_method: str = "bh",
    seed: int = 0,
    options: QKOVOptions | None = None,
    memory_budget_bytes: float = 2e9,
    **overrides,
) -> PermutationResult:
    """Does task B interfere with task A on a (block, layer, head) more than A's own held-out samples?

    Statistic per cell: ``mean_{i∈A, j∈B} M_ij − mean_{i∈A, j∈A'} M_ij`` with ``Î`` from A. Null:
    the B and A' samples are exchangeable as partners of A's samples; the column means
    ``m_j = mean_i M_ij`` of the pooled ``B ∪ A'`` are relabelled at random ``n_permutations``
    times (all permutations at once, one matrix product), and
    ``p = (1 + #{null ≥ observed}) / (1 + n_permutations)`` (:func:`fisherjax.stats.permutation_pvalue`).
    q-values by :func:`fisherjax.stats.fdr_qvalues` (scipy's Benjamini–Hochberg, or BY).
    """
    options = _options(options, overrides)
    if options.fisher_pool != "A":
        raise ConfigError("qkov permutation_test compares B with A' against A's own Fisher: use fisher_pool='A'")
    # Î is A's alone (fisher_pool="A"), so a column's scores do not depend on the other columns:
    # A's Fisher once, then one score array per partner set (not one over a host copy of B and
    # A' joined, GB per task).
    with_b = _prepare(task_a, task_b, layout, options)
    with_held = _with_partner(with_b, task_a_heldout, layout, options, default_name=f"{with_b.name_a} (held out)")
    b, held = with_b.b, with_held.b
    if not len(b) or not len(held):
        raise DataError("qkov permutation_test needs samples in both task B and the held-out split A'")
    scores = [_scores(prep, layout, options, memory_budget_bytes) for prep in (with_b, with_held)]
    column_means = np.concatenate([s.astype(np.float64).mean(axis=2) for s in scores], axis=2)  # [block, layer, n_b + n_held, head]
    is_b = np.r_[np.ones(len(b), bool), np.zeros(len(held), bool)]

    def contrast(labels):  # [..., n] bool -> weights giving mean over B minus mean over A'
        return labels / labels.sum(-1, keepdims=True) - ~labels / (~labels).sum(-1, keepdims=True)

    observed = np.einsum("j,kljh->klh", contrast(is_b), column_means)
    shuffled = np.random.default_rng(seed).permuted(np.tile(is_b, (n_permutations, 1)), axis=1)
    null = np.einsum("pj,kljh->pklh", contrast(shuffled), column_means)
    pvalues = permutation_pvalue(observed, null, alternative="greater")
    qvalues = _qvalues_distinct(pvalues, layout, fdr_method)
    return PermutationResult(observed, pvalues, qvalues, qvalues <= alpha, n_permutations, alpha)


def _qvalues_distinct(pvalues: np.ndarray, layout: ModelLayout, method: str) -> np.ndarray:
    """BH over distinct cells: Q/O per query head, K/V per kv head (their query heads share one test)."""
    kv = np.asarray(layout.kv_head_of)
    first = np.array([np.flatnonzero(kv == g)[0] for g in range(layout.num_kv_heads)])
    parts = [pvalues[n][:, first] if block in ("k", "v") else pvalues[n] for n, block in enumerate(BLOCKS)]
    sizes = [p.size for p in parts]
    q_flat = fdr_qvalues(np.concatenate([p.ravel() for p in parts]), method=method)
    out, start = [], 0
    for n, block in enumerate(BLOCKS):
        q = q_flat[start : start + sizes[n]].reshape(parts[n].shape)
        start += sizes[n]
        out.append(q[:, kv] if block in ("k", "v") else q)
    return np.stack(out)


class BootstrapInterval(NamedTuple):
    """Percentile bootstrap interval of ``layer_head_avg``, each ``[block, layer, head]``."""

    low: Float[np.ndarray, "block layer heads"]
    high: Float[np.ndarray, "block layer heads"]
    level: float
    n_bootstrap: int


def bootstrap_layer_head_avg(
    result: QKOVResult, *, n_bootstrap: int = 1000, level: float = 0.95, seed: int = 0, chunk: int = 64
) -> BootstrapInterval:
    """Percentile intervals of the mean score per cell under resampling of samples of *both* tasks.

    Replicate ``r`` draws samples of A and of B with replacement (counts ``u_r [n_a]``, ``v_r [n_b]``)
    and takes ``Σ_ij u_ri v_rj M_ij / (n_a n_b)`` — two contractions, no loop over pairs; replicates
    go in chunks of ``chunk`` to bound memory. Indices from :func:`fisherjax.stats.bootstrap_indices`,
    intervals from :func:`fisherjax.stats.percentile_interval`.
    """
    scores = result.scores
    n_a, n_b = scores.shape[2], scores.shape[3]
    if n_a == 0 or n_b == 0:
        zeros = np.zeros_like(result.layer_head_avg, dtype=np.float64)
        return BootstrapInterval(zeros, zeros, level, n_bootstrap)
    u = _counts(bootstrap_indices(n_a, n_bootstrap, seed), n_a) / n_a
    v = _counts(bootstrap_indices(n_b, n_bootstrap, seed + 1), n_b) / n_b
    replicates = np.empty((n_bootstrap,) + result.layer_head_avg.shape)
    for r0 in range(0, n_bootstrap, chunk):
        over_b = np.einsum("rj,klijh->rklih", v[r0 : r0 + chunk], scores, optimize=True)
        replicates[r0 : r0 + chunk] = np.einsum("ri,rklih->rklh", u[r0 : r0 + chunk], over_b, optimize=True)
    low, high = percentile_interval(replicates, level)
    return BootstrapInterval(low, high, level, n_bootstrap)


def _counts(indices: np.ndarray, n: int) -> np.ndarray:
    """``[replicates, n]`` resampling indices → how often each sample was drawn."""
    rows = np.repeat(np.arange(indices.shape[0]), indices.shape[1])
    return np.bincount(rows * n + indices.ravel(), minlength=indices.shape[0] * n).reshape(indices.shape[0], n).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def to_arrays(result: QKOVResult) -> dict[str, np.ndarray]:
    """The arrays of ``qkov.npz``: scores, layer_head_avg, sample ids, kv map, slice sizes and the
    diagnostics (``fisher_min``, ``fisher_median``, ``fisher_max``, ``share_below_eps``, ``ridge``)."""
    return {
        "scores": result.scores,
        "layer_head_avg": result.layer_head_avg,
        "blocks": np.array(result.blocks),
        "sample_ids_a": result.sample_ids_a,
        "sample_ids_b": result.sample_ids_b,
        "kv_head_of": result.kv_head_of,
        "slice_sizes": result.slice_sizes,
        **{name: np.asarray(value) for name, value in result.diagnostics._asdict().items()},
    }


def save_npz(result: QKOVResult, path) -> None:
    """Write :func:`to_arrays` to ``path`` (``numpy.savez_compressed``)."""
    np.savez_compressed(path, **to_arrays(result))


def summarize(result: QKOVResult) -> dict:
    """A JSON-serialisable summary: options, sample counts, per block the layer × head averages,
    the strongest head and the Fisher diagnostics, and the top conflicts with true sample ids."""
    blocks = {}
    sign = -1.0 if result.options.variant == "signed" else 1.0
    for n, block in enumerate(result.blocks):
        avg = result.layer_head_avg[n]
        layer, head = np.unravel_index(int(np.argmax(sign * avg)), avg.shape) if avg.size else (0, 0)
        diag = {name: _finite_list(value[n]) for name, value in result.diagnostics._asdict().items()}
        blocks[block] = {
            "layer_head_avg": _finite_list(avg),
            "strongest": {"layer": int(layer), "head": int(head), "kv_head": int(result.kv_head_of[head]), "value": float(avg[layer, head]) if avg.size else 0.0},
            "slice_size": int(result.slice_sizes[n]),
            "diagnostics": diag,
        }
    return {
        "task_a": result.task_a,
        "task_b": result.task_b,
        "n_a": int(result.scores.shape[2]),
        "n_b": int(result.scores.shape[3]),
        "dropped_a": list(result.dropped_a),
        "dropped_b": list(result.dropped_b),
        "options": dataclasses.asdict(result.options),
        "kv_head_of": [int(g) for g in result.kv_head_of],
        "blocks": blocks,
        "top_conflicts": [dict(c) for c in result.top_conflicts],
    }


def _finite_list(x) -> list:
    return np.where(np.isfinite(x), x, 0.0).astype(float).tolist()


def plot_heatmaps(result: QKOVResult) -> dict[str, Any]:
    """One figure per block: the layer × head map of ``layer_head_avg`` (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    n_layers, n_heads = result.layer_head_avg.shape[1:]
    signed = result.options.variant == "signed"
    for n, block in enumerate(result.blocks):
        avg = result.layer_head_avg[n]
        fig, ax = plt.subplots(figsize=(max(4.0, 1.6 + 0.45 * n_heads), max(3.0, 1.4 + 0.35 * n_layers)), layout="constrained")
        if signed:
            bound = float(np.abs(avg).max()) or 1.0
            image = ax.imshow(avg, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
        else:
            image = ax.imshow(avg, cmap="viridis", aspect="auto")
        ax.set_xlabel("query head" if block in ("q", "o") else "query head (reads kv head h // groups)")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        what = f"{result.options.variant}, {result.options.aggregate}"
        ax.set_title(f"QK-OV {block.upper()}: {result.task_b} → {result.task_a}\n({what}, mean over {result.scores.shape[2]}×{result.scores.shape[3]} pairs)", fontsize=9)
        fig.colorbar(image, ax=ax, label="interference score")
        figures[block] = fig
    return figures


def flops(n_a: int, n_b: int, layout: ModelLayout, include_bias: bool = True) -> float:
    """FLOPs of the GEMMs of one heatmap: ``2 · n_a · n_b · P_attn`` (``P_attn``: the parameters in
    all slices, K/V counted once per kv head)."""
    per_layer = 0
    for block, kind in _block_kinds(layout, include_bias):
        heads = layout.heads_of(block)
        if kind == "bias":
            per_layer += heads * layout.head_dim
        else:
            spec = layout.spec(layout.block_sources(block, kind)[0])
            other = spec.shape[-1] if block == "o" else spec.shape[-2]
            per_layer += heads * layout.head_dim * other
    return 2.0 * n_a * n_b * per_layer * layout.num_layers


__all__ = [
    "BLOCKS",
    "BootstrapInterval",
    "PermutationResult",
    "QKOVOptions",
    "QKOVResult",
    "SliceDiagnostics",
    "bootstrap_layer_head_avg",
    "flops",
    "heatmap",
    "heldout_split",
    "permutation_test",
    "plot_heatmaps",
    "sample_pair",
    "save_npz",
    "summarize",
    "tile_plan",
    "to_arrays",
]
