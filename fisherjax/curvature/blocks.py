"""Exact spectra of the empirical Fisher restricted to every attention head's slice, from the kept
per-sample gradients.

Convention (Phase 1's): sample ``i`` has the token-sum loss ``L_i = Σ_t −log p(y_{t+1} | x_≤t)``
over its ``T_i`` predicted tokens and the gradient ``g_i = ∇L_i``; the empirical Fisher whose
diagonal is Phase 1's ``Î`` is

    F = (1/n) Σ_i g_i g_iᵀ / T_i

over the ``n`` samples with ``T_i > 0`` (rows with ``T_i = 0``, e.g. filler rows, are dropped and
not counted in ``n``). The kept ``g_i`` are always the data labels' gradients, so this is the
empirical Fisher whatever ``fisher_type`` the task was collected with (a TaskFisher of another
type is refused; pass its ``sample_grads`` to ask for the empirical Fisher explicitly).

Slices are QK-OV's (:mod:`fisherjax.analysis.qkov`): block ``q``/``k``/``v`` of layer ``ℓ``, head
``h`` is the head's kernel columns ``W[:, h, :]`` and, with ``include_bias``, its bias ``b[h, :]``;
block ``o`` is the rows ``W_O[h, :, :]`` (the output bias is shared by all heads and belongs to
none). Under grouped-query attention a k/v slice is a *kv* head (``kv_heads`` of them). Heads are
found with :meth:`~fisherjax.layout.ModelLayout.head_index` (GPT-2's ``[Q|K|V]`` and GPT-NeoX's
interleaved fused QKV included).

Restricted to a slice ``S`` of dimension ``D``, ``F_S = XᵀX`` with the rows
``x_i = g_{i,S} / √(n T_i)`` of ``X [n, D]``, and ``eig(XᵀX) \\ {0} = eig(XXᵀ) \\ {0}``: the non-zero
eigenvalues of the ``D × D`` block are those of the ``n × n`` Gram

    K_ij = g_{i,S} · g_{j,S} / (n √(T_i T_j)),

so ``F_S`` has rank ``≤ min(n, D)`` and ``tr K = tr F_S = Σ_{k∈S} Î_k``. Per layer chunk the stored
leaves go to the device once; one einsum per (block, part) gives every layer's and head's Gram
``[layer, heads, n, n]`` (float32, ``Precision.HIGHEST``), and numpy's ``eigvalsh`` (LAPACK's
symmetric eigensolver) diagonalises all of them at once on the host, in float64 (the ``O(n³)``
solve is cheap beside the ``O(n² D)`` Gram, and float32 would cost small eigenvalues their
relative accuracy: :func:`gram_eigenvalues`). Chunks of layers — and, when
one layer does not fit, chunks of a leaf's contraction rows (``d_in`` of q/k/v kernels, ``d_out``
of o kernels), whose Gram terms add up — keep each step within ``memory_budget_bytes``.

Summaries (:class:`BlockSpectra`), per ``(block, layer, head)``, from the eigenvalues ``λ_1 ≥ … ≥
λ_n`` of ``K`` clipped at 0, where those ``≤ rank_tol · λ_1`` count as zero (float32 rounding):

* ``top``: ``λ_1 … λ_k`` (zero-padded when the rank or ``n`` is below ``k``);
* ``trace``: ``Σ λ = tr K = Σ_{k∈S} Î_k`` (from the Gram's diagonal);
* ``rank``: the eigenvalues ``> rank_tol · λ_1``; ``effective_rank``: ``exp(−Σ p log p)`` with
  ``p = λ / Σ λ`` (Roy & Vetterli 2007), 0 for a slice whose gradients are all zero;
* ``lambda_min``: the smallest eigenvalue of the whole ``D × D`` block: 0 when ``D > n`` (rank
  ``≤ n < D``), else ``λ_D`` of the Gram;
* ``condition``: ``(λ_1 + λ) / (λ_min + λ)`` of the damped block ``F_S + λI``, with the damping
  ``λ = relative_damping · tr F_S / D`` (that fraction of the block's mean eigenvalue, the mean of
  ``Î`` over the slice; default ``1e-3``, conflicts' whitening rule) or a fixed ``damping``;
  infinite when ``λ = λ_min = 0 < λ_1`` and NaN for an all-zero slice without damping.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from fisherjax.analysis.qkov import _operands
from fisherjax.errors import ConfigError, DataError
from fisherjax.fisher.factored import read_on_device
from fisherjax.fisher.state import SampleGrads, TaskFisher, sample_grads_of
from fisherjax.layout import ATTENTION_BLOCKS, ModelLayout
from fisherjax.settings import STATIC

__all__ = [
    "COPIES", "GRAM_BYTES", "BlockSpectra", "LargestBlock", "Leaf", "accumulate_grams", "block_spectra", "gram_eigenvalues",
    "gram_spectra", "largest_blocks", "slice_spectrum", "step_plan",
]

COPIES = 3
"""Float32 copies of a step's leaves the device holds: the stored piece, its float32 head view and
the GEMM's operand."""

GRAM_BYTES = 4 + 3 * 8
"""Bytes per Gram entry: the float32 accumulator on the device; its float64 copy, the symmetrised
matrix and the eigensolver's workspace on the host."""

_HEAD_MAJOR = {"kernel": (1, 3, 0, 2, 4), "o": (1, 2, 0, 3, 4), "bias": (1, 2, 0, 3)}
"""Axes that move one part's head view to ``[layer, heads, n, ...]``: q/k/v kernels ``[n, layer,
rows, heads, head_dim]``, o kernels ``[n, layer, heads, head_dim, rows]``, biases ``[n, layer,
heads, head_dim]`` (``rows``: the contraction axis). Moved explicitly, the Gram is one batched
GEMM ``[layer, heads]`` of ``[n, s] × [s, n]``; on the unmoved views XLA:CPU chose a slower plan."""


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockSpectra:
    """Spectral summaries of every (block, layer, head) slice of the empirical Fisher.

    Per-slice arrays are ``[block, layer, heads_max]`` (blocks in :data:`ATTENTION_BLOCKS` order,
    ``heads_max`` the query heads) float64, NaN where a block has fewer heads (k and v under
    grouped-query attention: head index = kv head); ``rank`` is int64 with -1 there. Formulas in
    the module docstring.

    Attributes:
      top: ``[block, layer, heads_max, k]`` the ``k`` largest eigenvalues, descending.
      trace: ``Σ λ = Σ_{k∈S} Î_k``; effective_rank: ``exp(entropy of λ / Σ λ)``; rank: eigenvalues
        above ``rank_tol · λ_max``.
      lambda_min: smallest eigenvalue of the ``D × D`` block (0 when ``D > n``).
      damping: the ``λ`` of each slice; condition: ``(λ_max + λ) / (λ_min + λ)``.
      sample_ids: ``[n]`` the samples the Fisher averages (those with ``T_i > 0``).
      dimension: ``D`` of each block's slices; heads: each block's number of heads;
      n_samples: ``n``; rank_tol; damping_rule: how ``damping`` was set; include_bias.
    """

    top: Float[np.ndarray, "block layer heads k"]
    trace: Float[np.ndarray, "block layer heads"]
    effective_rank: Float[np.ndarray, "block layer heads"]
    rank: Int[np.ndarray, "block layer heads"]
    lambda_min: Float[np.ndarray, "block layer heads"]
    damping: Float[np.ndarray, "block layer heads"]
    condition: Float[np.ndarray, "block layer heads"]
    sample_ids: Int[np.ndarray, " n"]
    dimension: tuple[int, ...] = dataclasses.field(metadata=STATIC)
    heads: tuple[int, ...] = dataclasses.field(metadata=STATIC)
    n_samples: int = dataclasses.field(metadata=STATIC)
    rank_tol: float = dataclasses.field(metadata=STATIC)
    damping_rule: str = dataclasses.field(metadata=STATIC)
    include_bias: bool = dataclasses.field(default=True, metadata=STATIC)
    blocks: tuple[str, ...] = dataclasses.field(default=ATTENTION_BLOCKS, metadata=STATIC)

    @property
    def lambda_max(self) -> Float[np.ndarray, "block layer heads"]:
        """``λ_max`` of every slice (``top[..., 0]``)."""
        return self.top[..., 0]

    @property
    def present(self) -> np.ndarray:
        """``[block, 1, heads_max]`` bool: which head indices each block has."""
        return (np.arange(max(self.heads))[None, :] < np.asarray(self.heads)[:, None])[:, None, :]


class LargestBlock(NamedTuple):
    """One slice of :func:`largest_blocks` (``head``: a kv head for k and v under GQA)."""

    block: str
    layer: int
    head: int
    lambda_max: float


# ---------------------------------------------------------------------------------------------
# Plan: which leaves, which pieces per step
# ---------------------------------------------------------------------------------------------


class Leaf(NamedTuple):
    """One stored leaf (or per-layer leaves) and the slices it feeds."""

    key: str
    """The first source path (names the leaf everywhere)."""
    paths: tuple[str, ...]
    """Source paths in layer order (one layer-stacked path, or one per layer)."""
    parts: tuple[tuple[str, str], ...]
    """The ``(block, kind)`` parts viewed from it (q, k, v of a fused projection share a leaf)."""
    rows: int
    """Length of its contraction axis (1 for a bias, which is never cut)."""
    row_floats: int
    """Floats of one layer's contraction row."""


def _leaves(layout: ModelLayout, kinds: _operands.BlockKinds) -> tuple[Leaf, ...]:
    out = []
    for key, paths in _operands.leaf_sources(layout, kinds).items():
        spec = layout.spec(key)
        shape = spec.shape[1:] if spec.layered else spec.shape
        rows = 1 if spec.kind == "bias" else shape[-1 if spec.role.value == "o" else -2]
        parts = tuple((b, k) for b, k in kinds if layout.block_sources(b, k)[0] == key)
        out.append(Leaf(key, tuple(paths), parts, rows, math.prod(shape) // rows))
    return tuple(out)


def _largest_divisor(n: int, at_most: float) -> int:
    """The largest divisor of ``n`` that is ``≤ at_most`` (at least 1), so every chunk has one shape."""
    return max(d for d in range(1, n + 1) if n % d == 0 and (d <= at_most or d == 1))


Step = tuple[tuple[int, tuple[int, int]], ...]
"""One device step: ``(leaf position, (first row, end row))`` pieces."""


def step_plan(
    leaves: Sequence[Leaf], n: int, n_layers: int, heads: int, memory_budget_bytes: float
) -> tuple[int, tuple[Step, ...]]:
    """Layers per chunk and the steps of one chunk, within ``memory_budget_bytes``.

    A step holds :data:`COPIES` float32 copies of its pieces for ``n`` samples and the chunk's
    layers, besides the Grams (:data:`GRAM_BYTES` per entry, ``heads · n²`` entries a layer;
    ``heads`` summed over the blocks). When every leaf of a layer fits, a chunk of layers
    (a divisor of ``n_layers``) is one step; otherwise chunks are one layer and each leaf is cut
    along its contraction rows (a divisor of ``rows``), one piece a step.
    """
    grams = GRAM_BYTES * heads * n * n
    row_bytes = [COPIES * 4 * n * leaf.row_floats for leaf in leaves]
    layer_bytes = sum(b * leaf.rows for b, leaf in zip(row_bytes, leaves)) + grams
    if layer_bytes <= memory_budget_bytes:
        whole = tuple((i, (0, leaf.rows)) for i, leaf in enumerate(leaves))
        return _largest_divisor(n_layers, memory_budget_bytes // layer_bytes), (whole,)
    steps = []
    for i, (leaf, b) in enumerate(zip(leaves, row_bytes)):
        size = _largest_divisor(leaf.rows, (memory_budget_bytes - grams) / b)
        steps.extend(((i, (r, r + size)),) for r in range(0, leaf.rows, size))
    return 1, tuple(steps)


def _piece(store: Mapping[str, np.ndarray], layout: ModelLayout, leaf: Leaf, layers: slice, rows: tuple[int, int]) -> Array:
    """``[n, layers, *one layer's piece]`` on the device: the leaf's layers and contraction rows
    (a plain slice of the stored array; per-layer leaves stacked on the device)."""
    spec = layout.spec(leaf.key)
    cut = (Ellipsis,) if spec.kind == "bias" else (Ellipsis, slice(*rows)) if spec.role.value == "o" else (Ellipsis, slice(*rows), slice(None))
    if spec.layered:  # one read: kept token factors (FactoredGrads) form just this piece, on the device
        return read_on_device(store[leaf.key], (slice(None), layers, *cut))
    return layout.stack_layers(list(leaf.paths[layers]), lambda p: read_on_device(store[p], cut), axis=1)


# ---------------------------------------------------------------------------------------------
# Device kernels
# ---------------------------------------------------------------------------------------------


def _heads_along(x: Array, index: np.ndarray, axis: int) -> Array:
    """``x`` with ``axis`` replaced by ``[heads, head_dim]`` positions ``index`` (a slice and a
    reshape when the heads are one contiguous run, else a gather)."""
    axis = axis % x.ndim
    flat = index.ravel()
    if np.all(np.diff(flat) == 1):
        x = jax.lax.slice_in_dim(x, int(flat[0]), int(flat[-1]) + 1, axis=axis)
        return x.reshape(x.shape[:axis] + index.shape + x.shape[axis + 1 :])
    return jnp.take(x, jnp.asarray(index), axis=axis)


@functools.partial(jax.jit, static_argnames=("layout", "leaves"), donate_argnums=(0,))
def accumulate_grams(
    grams: dict[str, Float[Array, "layer heads n n"]], pieces: dict[str, Array], *, layout: ModelLayout, leaves: tuple[Leaf, ...]
) -> dict[str, Float[Array, "layer heads n n"]]:
    """``grams[block] += Σ_parts g_{i,piece} · g_{j,piece}`` per (layer, head) for the stored pieces
    ``{leaf key: [n, layer, *piece]}`` (float32, ``Precision.HIGHEST``)."""
    out = dict(grams)
    for leaf in leaves:
        x = pieces[leaf.key].astype(jnp.float32)
        for block, kind in leaf.parts:
            index = layout.head_index(leaf.key, block)
            part = "bias" if kind == "bias" else "o" if block == "o" else "kernel"
            view = _heads_along(x, index, -2 if part == "o" else -1)
            moved = jnp.transpose(view, _HEAD_MAJOR[part])
            rows = moved.reshape(*moved.shape[:3], -1)  # [layer, heads, n, slice piece]
            out[block] = out[block] + jnp.einsum("lhis,lhjs->lhij", rows, rows, precision=jax.lax.Precision.HIGHEST)
    return out


def gram_eigenvalues(
    grams: dict[str, Float[Array, "layer heads n n"]], weights: Float[np.ndarray, " n"]
) -> dict[str, tuple[Float[np.ndarray, "layer heads n"], Float[np.ndarray, "layer heads"]]]:
    """``{block: (eigenvalues descending, trace)}`` of ``K = G ⊙ w wᵀ`` (``w_i = 1/√(n T_i)``), in
    float64 on the host (numpy's LAPACK ``eigvalsh``, batched over layers and heads).

    The float32 Gram is exact to its own rounding (``≈ 1e-7`` relative to ``λ_max``), while a
    float32 eigensolver has an absolute error of order ``n·ε·λ_max``, a relative error of ``1e-5``
    on an eigenvalue ``5e-3 · λ_max`` of a six-sample Gram; the ``O(n³)`` solve is cheap beside
    the ``O(n² D)`` Gram, so it runs in float64. On the host, not the device: XLA:CPU's float64
    ``eigvalsh`` under ``jax.enable_x64`` hung on the second layer chunk of a GPT-2-small-sized
    run (128 samples, 2 cores), and the Grams are small (``n × n`` per slice).
    """
    w = np.asarray(weights, np.float64)
    out = {}
    for block, gram in grams.items():
        k = np.asarray(gram, np.float64) * w[:, None] * w[None, :]
        k = (k + np.swapaxes(k, -1, -2)) / 2  # exactly symmetric
        out[block] = (np.linalg.eigvalsh(k)[..., ::-1], np.trace(k, axis1=-2, axis2=-1))
    return out


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def _samples(task: TaskFisher | SampleGrads) -> SampleGrads:
    """The task's kept per-sample gradients with ``T_i > 0``."""
    if isinstance(task, TaskFisher) and task.fisher_type != "empirical":
        raise DataError(
            f"block spectra: task {task.task!r} is a {task.fisher_type!r} Fisher, but its kept g_i are the data labels' "
            "gradients, whose Gram is the empirical Fisher; pass task.sample_grads to ask for that"
        )
    samples, name = sample_grads_of(task)
    tokens = np.asarray(samples.tokens)
    if not (tokens > 0).any():
        raise DataError(f"block spectra: task {name!r} has no sample with active tokens (T_i > 0)")
    return samples if (tokens > 0).all() else samples.select(np.flatnonzero(tokens > 0))


def _checked_kinds(layout: ModelLayout, samples: SampleGrads, include_bias: bool, blocks: Sequence[str]) -> _operands.BlockKinds:
    kinds = tuple((b, k) for b, k in _operands.block_kinds(layout, include_bias) if b in blocks)
    missing = sorted({p for b, k in kinds for p in layout.block_sources(b, k)} - set(samples.grads))
    if missing:
        hint = " (or pass include_bias=False)" if include_bias and any(p.endswith("bias") for p in missing) else ""
        raise DataError(f"block spectra: no per-sample gradients of {missing}; collect them with keep_sample_grads{hint}")
    return kinds


def gram_spectra(
    task: TaskFisher | SampleGrads,
    layout: ModelLayout,
    *,
    include_bias: bool = True,
    memory_budget_bytes: float = 2e9,
    blocks: Sequence[str] = ATTENTION_BLOCKS,
    layers: slice = slice(None),
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], SampleGrads]:
    """``{block: (eigenvalues [layer, heads_of_block, n] descending, traces [layer, heads_of_block])}``
    of every slice's Gram ``K`` (formed in float32, diagonalised in float64, :func:`gram_eigenvalues`),
    for ``blocks`` and the layer range ``layers``, and the samples used (``T_i > 0``).
    """
    samples = _samples(task)
    kinds = _checked_kinds(layout, samples, include_bias, blocks)
    chosen = range(layout.num_layers)[layers]
    if not len(chosen) or chosen.step != 1:
        raise ConfigError(f"block spectra: layers must be a non-empty contiguous range, got {layers}")
    leaves = _leaves(layout, kinds)
    n = len(samples)
    used = tuple(dict.fromkeys(b for b, _ in kinds))
    heads = {b: layout.heads_of(b) for b in used}
    c_l, steps = step_plan(leaves, n, len(chosen), sum(heads.values()), memory_budget_bytes)
    weights = 1.0 / np.sqrt(n * np.asarray(samples.tokens, np.float64))
    chunks = []
    for first in range(chosen.start, chosen.stop, c_l):
        grams = {b: jnp.zeros((c_l, heads[b], n, n), jnp.float32) for b in used}
        for step in steps:
            pieces = {leaves[i].key: _piece(samples.grads, layout, leaves[i], slice(first, first + c_l), rows) for i, rows in step}
            grams = accumulate_grams(grams, pieces, layout=layout, leaves=tuple(leaves[i] for i, _ in step))
        chunks.append(gram_eigenvalues(grams, weights))
    out = {b: tuple(np.concatenate([chunk[b][j] for chunk in chunks]) for j in (0, 1)) for b in used}
    return out, samples


def _summaries(eigenvalues: np.ndarray, trace: np.ndarray, dimension: int, top_k: int, rank_tol: float,
               damping: float | None, relative_damping: float) -> dict[str, np.ndarray]:
    """Per-slice summaries of Gram eigenvalues ``[..., n]`` (descending), see the module docstring."""
    lam = np.maximum(eigenvalues, 0.0)
    largest = lam[..., 0]
    kept = np.where(lam > rank_tol * largest[..., None], lam, 0.0)
    n = lam.shape[-1]
    top = np.zeros(lam.shape[:-1] + (top_k,))
    top[..., : min(n, top_k)] = kept[..., :top_k]
    total = kept.sum(-1, keepdims=True)
    p = np.divide(kept, total, out=np.zeros_like(kept), where=total > 0)
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
    effective_rank = np.where(total[..., 0] > 0, np.exp(entropy), 0.0)
    lambda_min = kept[..., dimension - 1] if dimension <= n else np.zeros_like(largest)
    ridge = relative_damping * trace / dimension if damping is None else np.full_like(largest, damping)
    numerator, denominator = largest + ridge, lambda_min + ridge
    condition = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.where(numerator > 0, np.inf, np.nan))
    return dict(top=top, trace=trace, effective_rank=effective_rank, rank=(kept > 0).sum(-1), lambda_min=lambda_min,
                damping=ridge, condition=condition)


def _slice_dimension(layout: ModelLayout, kinds: _operands.BlockKinds, block: str) -> int:
    """``D``: parameters of one head's slice of ``block`` (``d_in · head_dim`` of a q/k/v kernel plus
    ``head_dim`` of its bias, ``head_dim · d_out`` of an o kernel)."""
    total = 0
    for b, kind in kinds:
        if b == block:
            shape = layout.spec(layout.block_sources(b, kind)[0]).shape
            total += layout.head_dim * (1 if kind == "bias" else shape[-1] if b == "o" else shape[-2])
    return total


def block_spectra(
    task: TaskFisher | SampleGrads,
    layout: ModelLayout,
    *,
    top_k: int = 10,
    damping: float | None = None,
    relative_damping: float = 1e-3,
    rank_tol: float = 1e-5,
    include_bias: bool = True,
    memory_budget_bytes: float = 2e9,
) -> BlockSpectra:
    """Exact spectral summaries of the empirical Fisher ``F = (1/n) Σ_i g_i g_iᵀ / T_i`` restricted
    to every (block q/k/v/o, layer, head) slice, from the kept per-sample gradients (module
    docstring: slices, the Gram identity, the summaries' definitions).

    Args:
      task: a :class:`TaskFisher` collected with ``keep_sample_grads`` (the attention parameters;
        an empirical Fisher) or its :class:`SampleGrads`. Samples with ``T_i = 0`` are dropped.
      layout: the model's :class:`~fisherjax.layout.ModelLayout`.
      top_k: eigenvalues kept per slice. damping: a fixed ``λ`` for every slice, or None for
        ``relative_damping · tr F_S / D`` (that fraction of the block's mean eigenvalue).
      rank_tol: eigenvalues ``≤ rank_tol · λ_max`` count as zero (float32 rounding of the Gram).
      include_bias: q/k/v biases belong to their head's slice (as in QK-OV).
      memory_budget_bytes: device memory a step may hold (:func:`step_plan`).

    Returns:
      :class:`BlockSpectra`, per-slice arrays ``[block, layer, heads_max(, top_k)]``.

    Raises:
      ConfigError: a bad ``top_k``, tolerance or damping. DataError: no kept gradients, a
      parameter they miss, no sample with ``T_i > 0``, or a non-empirical TaskFisher.
    """
    if top_k < 1 or not 0 <= rank_tol < 1 or relative_damping < 0 or (damping is not None and damping < 0):
        raise ConfigError(
            f"block spectra: need top_k ≥ 1, 0 ≤ rank_tol < 1 and non-negative damping, got top_k={top_k}, "
            f"rank_tol={rank_tol}, damping={damping}, relative_damping={relative_damping}"
        )
    spectra, samples = gram_spectra(task, layout, include_bias=include_bias, memory_budget_bytes=memory_budget_bytes)
    kinds = _operands.block_kinds(layout, include_bias)
    heads = tuple(layout.heads_of(b) for b in ATTENTION_BLOCKS)
    dims = tuple(_slice_dimension(layout, kinds, b) for b in ATTENTION_BLOCKS)
    columns: dict[str, list[np.ndarray]] = {}
    for block, dimension, h in zip(ATTENTION_BLOCKS, dims, heads):
        summary = _summaries(*spectra[block], dimension, top_k, rank_tol, damping, relative_damping)
        for name, value in summary.items():
            pad = np.full(value.shape[:1] + (max(heads) - h,) + value.shape[2:], -1 if name == "rank" else np.nan)
            columns.setdefault(name, []).append(np.concatenate([value, pad.astype(value.dtype)], axis=1))
    rule = f"{damping:g} (fixed)" if damping is not None else f"{relative_damping:g} · tr F_S / D"
    return BlockSpectra(
        **{name: np.stack(values) for name, values in columns.items()},
        sample_ids=np.asarray(samples.sample_ids), dimension=dims, heads=heads, n_samples=len(samples), rank_tol=rank_tol,
        damping_rule=rule, include_bias=include_bias,
    )


def slice_spectrum(
    task: TaskFisher | SampleGrads,
    layout: ModelLayout,
    block: str,
    layer: int,
    head: int,
    *,
    include_bias: bool = True,
    rank_tol: float = 1e-5,
) -> Float[np.ndarray, " rank"]:
    """The non-zero eigenvalues (``> rank_tol · λ_max``, descending, float64) of one slice's
    empirical Fisher block ``F_S`` (``head``: a kv head for k and v under GQA), from its Gram as in
    :func:`block_spectra`."""
    if block not in ATTENTION_BLOCKS:
        raise ConfigError(f"block spectra: block must be one of {ATTENTION_BLOCKS}, got {block!r}")
    if not 0 <= layer < layout.num_layers or not 0 <= head < layout.heads_of(block):
        raise ConfigError(
            f"block spectra: block {block} has layers 0..{layout.num_layers - 1} and heads 0..{layout.heads_of(block) - 1}, "
            f"got layer {layer}, head {head}"
        )
    spectra, _ = gram_spectra(task, layout, include_bias=include_bias, blocks=(block,), layers=slice(layer, layer + 1))
    lam = np.maximum(spectra[block][0][0, head], 0.0)
    return lam[lam > rank_tol * lam[0]]


def largest_blocks(spectra: BlockSpectra, count: int = 10) -> list[LargestBlock]:
    """The ``count`` slices with the largest ``λ_max``, largest first (absent kv heads skipped)."""
    lam = np.where(np.isnan(spectra.lambda_max), -np.inf, spectra.lambda_max)
    order = np.argsort(-lam, axis=None, kind="stable")[: min(count, int(np.isfinite(lam).sum()))]
    return [
        LargestBlock(spectra.blocks[b], int(layer), int(head), float(spectra.lambda_max[b, layer, head]))
        for b, layer, head in zip(*np.unravel_index(order, lam.shape))
    ]
