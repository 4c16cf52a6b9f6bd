"""QK-OV with a K-FAC preconditioner (``variant="kfac"``): task B's signed gradients against task
A's through the inverse of A's damped Kronecker-factored Fisher block of each head's slice.

Score. For sample ``i`` of task A, sample ``j`` of task B and the slice of ``(block, ℓ, h)``

    M_ij = s_j · g_iᵀ (F̃ + λI)⁻¹ g_j,        F̃ = A_{ℓ,h} ⊗ G_{ℓ,h}

divided by the slice size ``D`` for ``aggregate="mean"``; ``s_j`` is ``normalize_gj``'s factor
(as in every variant) and ``g`` the kept per-sample signed token-sum gradients ``g_i = ∇L_i``,
``L_i = Σ_t −log p(y_{t+1} | x_≤t)``. ``F̃`` is the K-FAC block (:mod:`fisherjax.curvature.factors`,
``F ≈ A ⊗ G`` of ``F = (1/n) Σ_i g_i g_iᵀ / T_i``) restricted to the slice, as
:class:`~fisherjax.curvature.factors.HeadFactors` holds it: q/k/v share ``A`` over heads and
have per-head sub-blocks of ``G``; o has per-head sub-blocks of ``A`` and a shared ``G``. The
slice's gradient is the head view of the kernel, ``[d_in, head_dim]`` for q/k/v (with the q/k/v
bias as its *last input row* when ``include_bias`` and the model has one, matching the bias
coordinate of ``A``) and ``[head_dim, d_out]`` for o; its row-major flattening is the vector
``(A ⊗ G)`` acts on (``(A ⊗ G) vec(W) = vec(A W G)``). Negative scores: the tasks pull the head
in opposite directions in the metric of A's curvature (a signed variant, like ``"signed"``).

Bias. Factors with a bias coordinate used on a slice without a bias (``include_bias=False``, or
a model without q/k/v biases) are restricted to the kernel's rows, ``A[:d_in, :d_in]`` — the
exact restriction of ``A ⊗ G`` to the kernel. Factors *without* a bias coordinate on a slice
*with* a bias are a :class:`~fisherjax.errors.ConfigError` (compute them with the bias, or pass
``include_bias=False``): the bias row's curvature cannot be made up.

Damping, per slice (the K-FAC analogue of the median-Fisher ridge of the diagonal variants):

    λ = max(ridge_lambda, ridge_lambda_rel · mean(diag(A_{ℓ,h}) ⊗ diag(G_{ℓ,h})), ε)

and ``mean(diag A ⊗ diag G) = mean(diag A) · mean(diag G) = tr(F̃)/D``, the mean eigenvalue.

Computation: batched GEMMs, no loop over layers or heads. ``A = U_A S_A U_Aᵀ``, ``G = U_G S_G
U_Gᵀ`` by one batched :func:`jax.numpy.linalg.eigh` per factor, in float64 (eigenvalues clipped
at 0: the factors are PSD and rounding can make a zero eigenvalue slightly negative), so

    (A ⊗ G + λI)⁻¹ = (U_A ⊗ U_G) diag(1 / (s_A ⊗ s_G + λ)) (U_A ⊗ U_G)ᵀ.

Both tasks' slices are rotated into the eigenbasis, ``g̃ = U_Aᵀ g U_G`` (two einsums over
``[n, layer, heads, …]``), A's rotated gradients are divided by ``s_A s_Gᵀ + λ`` and
``M = Σ g̃_A ⊙ g̃_B`` is one einsum per block giving ``[layer, heads, n_a, n_b]``. Samples and
layers are cut into tiles that fit ``memory_budget_bytes`` (:func:`~._tiles.tile_plan`); each
sample is rotated once per layer chunk unless task B needs several tiles. Only the
eigendecomposition is float64 (numpy's LAPACK on the host; its results are cast to
float32): float32 eigenvalues carry an absolute error of about ``1e-7 · ‖A‖ · ‖G‖``, which next to
a small ridge moved scores by 1–20 % on spectra spanning several decades (0.8 % at
``ridge_lambda_rel = 1e-3``); with float64 eigenvectors rounded to float32 the same scores agree
to ``1e-6``. The rotations and products are float32 GEMMs at ``precision``.

What differs from the diagonal variants, and how :class:`~.results.QKOVResult` is filled:

* the curvature is ``kfac=`` as passed (task A's by the definition): ``fisher_pool`` must be
  ``"A"`` (a ConfigError otherwise; pass factors of whatever samples the curvature should come
  from) and ``min_fisher_samples`` is not applied (the factors were computed elsewhere);
* :class:`~.results.SliceDiagnostics` describe the spectrum of ``F̃`` instead of ``Î``'s
  entries: ``fisher_min`` / ``fisher_median`` / ``fisher_max`` are the min / median / max of
  its eigenvalues ``s_A[r] · s_G[c]`` over the slice, ``share_below_eps`` the share of them
  below ``ε``, ``ridge`` the ``λ`` applied;
* of :class:`~.options.KernelOptions` only ``precision`` and ``memory_budget_bytes`` are read;
* on a ``mesh`` every tile's rows of A are split over ``"data"`` and its sums gathered to the
  host (:func:`slice_sums`), so ``gather_scores=False`` keeps nothing on the devices.

As in every variant, samples with no active tokens (``T_i = 0``) are dropped with a warning and
an empty task B gives zero scores and a warning.

Under grouped-query attention a k/v slice is a kv head (its ``G`` sub-block is the kv head's);
its scores are gathered to the query heads that read it, as for every variant
(:attr:`QKOVResult.kv_head_of`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Float

from fisherjax.analysis.qkov._operands import PRECISIONS, BlockKinds, block_kinds, leaf_sources, views_of
from fisherjax.analysis.qkov._prepare import active, partner, partner_scale, required_paths, task_samples, warn_if_rounded
from fisherjax.analysis.qkov._scores import assemble, first_non_finite
from fisherjax.analysis.qkov._tiles import device_leaves, mesh_leaves, padded_positions, tile_plan
from fisherjax.analysis.qkov.options import KernelOptions, ScoreOptions
from fisherjax.analysis.qkov.results import QKOVResult, SliceDiagnostics, result_of
from fisherjax.curvature.factors import HeadFactors
from fisherjax.errors import ConfigError, DataError, NumericalError
from fisherjax.fisher.state import SampleGrads, TaskFisher
from fisherjax.layout import ATTENTION_BLOCKS, ModelLayout
from fisherjax.progressbar import progress_bar
from fisherjax.sharding import data_size, placements, to_host

COPIES = 4
"""Float32 copies of a tile's gradients held at once (:func:`~._tiles.tile_plan`): the stored
leaves, the head-major slices, the half-rotated and the rotated (weighted) slices."""


class Curvature(NamedTuple):
    """Every slice's damped K-FAC block in its eigenbasis, per block (``R``: the slice's input
    rows, ``C`` its output columns; ``H_b`` the block's heads).

    ``u_in``: q/k/v ``[layer, R, R]`` (shared by the heads), o ``[layer, heads, R, R]``;
    ``s_in``: ``[layer, 1 | heads, R]``; ``u_out``: q/k/v ``[layer, H_b, C, C]``, o
    ``[layer, C, C]``; ``s_out``: ``[layer, H_b | 1, C]`` (eigenvalues clipped at 0);
    ``ridge``: ``[layer, H_b]`` float32 ``λ``.
    """

    u_in: dict[str, Array]
    s_in: dict[str, Array]
    u_out: dict[str, Array]
    s_out: dict[str, Array]
    ridge: dict[str, np.ndarray]


class Prepared(NamedTuple):
    """Everything the tiles of a K-FAC heatmap need, computed once."""

    a: SampleGrads
    b: SampleGrads
    name_a: str
    name_b: str
    dropped_a: tuple[int, ...]
    dropped_b: tuple[int, ...]
    kinds: BlockKinds
    curvature: Curvature
    diagnostics: SliceDiagnostics
    slice_sizes: np.ndarray
    """``[block]`` parameters per slice ``D``."""
    scale_b: np.ndarray
    """``[n_b]`` float32 ``s_j``."""


def check_request(score: ScoreOptions, kfac: Mapping[str, HeadFactors] | None) -> None:
    """``kfac=`` is given exactly when ``variant="kfac"``, and ``fisher_pool`` is ``"A"`` then."""
    if score.variant == "kfac" and kfac is None:
        raise ConfigError("qkov variant='kfac' needs task A's K-FAC factors: pass kfac={block: HeadFactors} "
                          "(fisherjax.curvature.kfac.attention_factors)")
    if score.variant != "kfac" and kfac is not None:
        raise ConfigError(f"qkov kfac= is read only by variant='kfac', got variant={score.variant!r}")
    if score.variant == "kfac" and score.fisher_pool != "A":
        raise ConfigError(f"qkov variant='kfac' takes its curvature from kfac= as passed; fisher_pool={score.fisher_pool!r} "
                          "has no meaning there (leave it 'A' and pass the factors of the samples you want)")


def _expect(block: str, what: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(expected):
        raise ConfigError(f"qkov kfac=: block {block} {what} has shape {tuple(shape)}, the layout needs {tuple(expected)}")


def check_factors(kfac: Mapping[str, HeadFactors], layout: ModelLayout, kinds: BlockKinds) -> dict[str, tuple[Array, Array]]:
    """``{block: (A, G)}`` of every slice, checked against the layout (a
    :class:`~fisherjax.errors.ConfigError` naming ``kfac=`` otherwise).

    q/k/v: ``A [layer, R, R]``, ``G [layer, H_b, head_dim, head_dim]``; o: ``A [layer, heads,
    head_dim, head_dim]``, ``G [layer, d_out, d_out]``. ``R = d_in + 1`` when the slice has a
    bias (``kinds`` holds ``(block, "bias")``); a bias coordinate the slice does not have is cut
    off (``A[:d_in, :d_in]``), one it has and the factors lack is an error. Blocks that share a
    factor array (q/k/v of one site share ``A``) get one array back, so it is decomposed once.
    """
    shared: dict[tuple[int, bool], Array] = {}  # (id of the passed array, bias cut off) -> array

    def one_array(x, cut: bool) -> Array:
        key = (id(x), cut)
        if key not in shared:
            value = jnp.asarray(x)
            shared[key] = value[:, :-1, :-1] if cut else value
        return shared[key]

    if not isinstance(kfac, Mapping):
        raise ConfigError(f"qkov kfac= must map blocks {ATTENTION_BLOCKS} to HeadFactors, got {type(kfac).__name__}")
    missing = [b for b in ATTENTION_BLOCKS if b not in kfac]
    if missing:
        raise ConfigError(f"qkov kfac= has no factors for block(s) {missing}")
    L, H, hd = layout.num_layers, layout.num_heads, layout.head_dim
    out = {}
    for block in ATTENTION_BLOCKS:
        factors = kfac[block]
        if not isinstance(factors, HeadFactors):
            raise ConfigError(f"qkov kfac=[{block!r}] must be a HeadFactors, got {type(factors).__name__}")
        if factors.block != block:
            raise ConfigError(f"qkov kfac=[{block!r}] holds the factors of block {factors.block!r}")
        kernel = layout.spec(layout.block_sources(block, "kernel")[0])
        cut = False
        if block == "o":
            if factors.has_bias:
                raise ConfigError("qkov kfac=['o'] has a bias coordinate, but the output bias belongs to no head")
            _expect(block, "inputs", np.shape(factors.inputs), (L, H, hd, hd))
            _expect(block, "outputs", np.shape(factors.outputs), (L, kernel.shape[-1], kernel.shape[-1]))
        else:
            rows = kernel.shape[-2] + factors.has_bias
            _expect(block, "inputs", np.shape(factors.inputs), (L, rows, rows))
            _expect(block, "outputs", np.shape(factors.outputs), (L, layout.heads_of(block), hd, hd))
            with_bias = (block, "bias") in kinds
            if with_bias and not factors.has_bias:
                raise ConfigError(f"qkov kfac=[{block!r}] has no bias coordinate, but the model's {block} bias belongs to "
                                  "the slice: compute the factors with the bias, or pass include_bias=False")
            cut = factors.has_bias and not with_bias
        out[block] = (one_array(factors.inputs, cut), one_array(factors.outputs, False))
    return out


def _eigh(m: Float[Array, "... k k"]) -> tuple[Float[Array, "... k"], Float[Array, "... k k"], np.ndarray]:
    """Eigenvalues (clipped at 0) and eigenvectors of the symmetric part of ``m``, batched, computed
    in float64 on the host (numpy's LAPACK ``eigh``: XLA:CPU's float64 eigensolver under
    ``jax.enable_x64`` hung on repeated calls in a large run, see :mod:`fisherjax.curvature.blocks`)
    and returned as float32 device arrays; and the float64 mean of the diagonal ``[...]``."""
    m = np.asarray(m, np.float64)
    s, u = np.linalg.eigh((m + np.swapaxes(m, -1, -2)) / 2)
    mean_diag = np.diagonal(m, axis1=-2, axis2=-1).mean(-1)
    return jnp.asarray(np.maximum(s, 0), jnp.float32), jnp.asarray(u, jnp.float32), mean_diag


def eigenbasis(factors: Mapping[str, tuple[Array, Array]], score: ScoreOptions) -> Curvature:
    """Every block's :class:`Curvature`: batched float64 ``eigh`` of ``A`` and ``G`` (one per
    distinct factor array: q/k/v of one fused site share ``A``) and the ridge
    ``λ = max(λ_min, λ_rel · mean(diag A) · mean(diag G), ε)`` per (layer, head)."""
    cache: dict[int, tuple[Array, Array, np.ndarray]] = {}

    def decomposed(m):
        if id(m) not in cache:
            cache[id(m)] = _eigh(m)
        return cache[id(m)]

    u_in, s_in, u_out, s_out, ridge = {}, {}, {}, {}, {}
    for block, (inputs, outputs) in factors.items():
        (si, ui, mean_in), (so, uo, mean_out) = decomposed(inputs), decomposed(outputs)
        if block == "o":  # A per head [L, H, hd, hd], G shared [L, d_out, d_out]
            s_in[block], s_out[block] = si, so[:, None]
            mean = mean_in * mean_out[:, None]
        else:  # A shared [L, R, R], G per head [L, H_b, hd, hd]
            s_in[block], s_out[block] = si[:, None], so
            mean = mean_in[:, None] * mean_out
        u_in[block], u_out[block] = ui, uo
        ridge[block] = np.maximum(np.maximum(score.ridge_lambda, score.ridge_lambda_rel * mean), score.eps).astype(np.float32)
    return Curvature(u_in, s_in, u_out, s_out, ridge)


@jax.jit
def _spectrum(s_in: Array, s_out: Array, eps: Array) -> tuple[Array, Array, Array, Array]:
    """min, median, max and share below ``eps`` of the eigenvalues ``s_in[r] · s_out[c]`` of
    every slice, ``[layer, H_b]`` each; one layer at a time (``lax.map``)."""

    def one(pair):
        si, so = pair  # [1 | H, R], [H_b | 1, C]
        products = si[:, :, None] * so[:, None, :]
        products = products.reshape(products.shape[0], -1)
        return products.min(-1), jnp.median(products, -1), products.max(-1), (products < eps).mean(-1)

    return jax.lax.map(one, (s_in, s_out))


def diagnostics(curvature: Curvature, layout: ModelLayout, eps: float) -> SliceDiagnostics:
    """:class:`~.results.SliceDiagnostics` of ``F̃``'s spectrum per slice (K/V rows per query
    head: the kv head it reads): min / median / max eigenvalue, share below ``ε``, ``λ``."""
    kv = layout.kv_head_of
    columns = []
    for block in ATTENTION_BLOCKS:
        stats = [np.asarray(x, np.float64) for x in _spectrum(curvature.s_in[block], curvature.s_out[block], jnp.float32(eps))]
        stats.append(curvature.ridge[block].astype(np.float64))
        columns.append([s[:, kv] if block in ("k", "v") else s for s in stats])
    return SliceDiagnostics(*(np.stack(column) for column in zip(*columns)))


def head_slices(views: Mapping[str, Array], block: str, with_bias: bool) -> Float[Array, "n layer heads r c"]:
    """A block's per-sample slices, head-major and float32: q/k/v ``[n, layer, H_b, d_in(+1),
    head_dim]`` (the bias as the last input row), o ``[n, layer, heads, head_dim, d_out]``, from
    the head views ``{block/kind: [n, layer, *view]}`` (:func:`~._operands.views_of`)."""
    if block == "o":
        return views["o/kernel"].astype(jnp.float32)
    g = jnp.moveaxis(views[f"{block}/kernel"], 2, 3).astype(jnp.float32)  # [n, l, d_in, h, e] -> [n, l, h, d_in, e]
    if with_bias:
        g = jnp.concatenate([g, views[f"{block}/bias"][:, :, :, None, :].astype(jnp.float32)], axis=3)
    return g


def rotate(g: Float[Array, "n layer heads r c"], u_in: Array, u_out: Array, block: str, precision) -> Float[Array, "n layer heads r c"]:
    """``g̃ = U_inᵀ g U_out`` per slice: q/k/v with ``U_in [layer, R, R]`` shared by the heads and
    ``U_out [layer, H_b, C, C]``, o with ``U_in [layer, heads, R, R]`` and ``U_out [layer, C, C]``."""
    if block == "o":
        half = jnp.einsum("nlhrc,lcd->nlhrd", g, u_out, precision=precision)
        return jnp.einsum("lhrs,nlhrd->nlhsd", u_in, half, precision=precision)
    half = jnp.einsum("nlhrc,lhcd->nlhrd", g, u_out, precision=precision)
    return jnp.einsum("lrs,nlhrd->nlhsd", u_in, half, precision=precision)


@functools.partial(jax.jit, static_argnames=("layout", "kinds", "precision"))
def rotated_tile(
    leaves: Mapping[str, Array], bases: Mapping[str, tuple[Array, Array]], denominators: Mapping[str, Array] | None, *,
    layout: ModelLayout, kinds: BlockKinds, precision: str,
) -> dict[str, Float[Array, "n layer heads r c"]]:
    """``{block: g̃ [n, layer, H_b, R, C]}`` of one tile's stored leaves ``{leaf key: [n, layer,
    *shape]}``: the slices rotated into the eigenbasis (``bases``: ``{block: (U_in, U_out)}`` of the
    tile's layers), divided by ``s_in s_outᵀ + λ`` when ``denominators`` (task A's side) is given."""
    views = views_of(layout, leaves, kinds)
    out = {}
    for block in ATTENTION_BLOCKS:
        rotated = rotate(head_slices(views, block, (block, "bias") in kinds), *bases[block], block, PRECISIONS[precision])
        out[block] = rotated if denominators is None else rotated / denominators[block][None]
    return out


@jax.jit
def denominators(s_in: Mapping[str, Array], s_out: Mapping[str, Array], ridge: Mapping[str, Array]) -> dict[str, Float[Array, "layer heads r c"]]:
    """``{block: s_in s_outᵀ + λ}`` ``[layer, H_b, R, C]``: the eigenvalues of ``F̃ + λI``."""
    return {block: s_in[block][..., :, None] * s_out[block][..., None, :] + ridge[block][:, :, None, None] for block in ridge}


@functools.partial(jax.jit, static_argnames=("precision",))
def tile_products(rot_a: Mapping[str, Array], rot_b: Mapping[str, Array], *, precision: str) -> dict[str, Float[Array, "layer c_a c_b heads"]]:
    """``{block: [layer, c_a, c_b, H_b]}`` ``Σ_{r,c} w̃_a[r,c] g̃_b[r,c]`` per slice: one einsum per block."""
    return {block: jnp.einsum("alhrc,blhrc->labh", rot_a[block], rot_b[block], precision=PRECISIONS[precision]) for block in rot_a}


def _check_grads(samples: SampleGrads, name: str, paths, include_bias: bool) -> None:
    missing = [p for p in paths if p not in samples.grads]
    if missing:
        hint = " (or pass include_bias=False)" if include_bias and any(p.endswith("bias") for p in missing) else ""
        raise DataError(f"qkov: task {name!r} stores no grads for {missing}; variant='kfac' reads the signed per-sample "
                        f"gradients of both tasks (keep_sample_grads=True){hint}")


def prepare(
    task_a: TaskFisher | SampleGrads, task_b: TaskFisher | SampleGrads, layout: ModelLayout, kfac: Mapping[str, HeadFactors] | None,
    score: ScoreOptions,
) -> Prepared:
    """Both tasks' samples with active tokens (``T_i = 0`` dropped with a warning), checked to
    store the signed gradients; the factors checked, eigendecomposed and damped; diagnostics,
    slice sizes ``D`` and ``s_j``."""
    check_request(score, kfac)
    a, name_a = task_samples(task_a, "A")
    a, _, dropped_a = active(a, name_a)
    b, _, name_b, dropped_b = partner(task_b, "B")
    kinds = block_kinds(layout, score.include_bias)
    paths = required_paths(layout, kinds)
    for samples, name in ((a, name_a), (b, name_b)):
        _check_grads(samples, name, paths, score.include_bias)
        warn_if_rounded(samples, name, paths, "kfac")
    factors = check_factors(kfac, layout, kinds)
    curvature = eigenbasis(factors, score)
    sizes = np.array([int(curvature.s_in[block].shape[-1] * curvature.s_out[block].shape[-1]) for block in ATTENTION_BLOCKS])
    return Prepared(a, b, name_a, name_b, dropped_a, dropped_b, kinds, curvature, diagnostics(curvature, layout, score.eps), sizes,
                    partner_scale(b, score))


def _chunk(start: int, size: int, n: int) -> np.ndarray:
    """``size`` positions from ``start``, the last repeated past ``n`` (one tile shape, one compilation)."""
    return np.minimum(np.arange(start, start + size), n - 1)


def slice_sums(
    prep: Prepared, layout: ModelLayout, kernel: KernelOptions, a_positions: np.ndarray, b_positions: np.ndarray, layers: np.ndarray, *,
    progress: bool = False, desc: str = "QK-OV kfac", mesh: Mesh | None = None,
) -> dict[str, np.ndarray]:
    """``{block: [layer, n_a, n_b, H_b]}`` ``g_iᵀ (F̃ + λI)⁻¹ g_j`` (before ``s_j`` and the
    aggregation) for the selected samples and layers, tile by tile: per layer chunk the bases and
    denominators go to the device once, each A tile is rotated and weighted once, B's tile once
    per layer chunk (once per A tile when B needs several tiles).

    With a ``mesh`` an A tile holds ``c_a`` rows per device, split over ``"data"`` (zero rows pad
    the last one), and B's tile, the bases and the denominators are replicated: each device
    rotates its rows of A (kept factors formed there, :func:`~._tiles.mesh_leaves`) and multiplies
    them with all of B; the tile's sums come to the host as on one device."""
    cur = prep.curvature
    sources = leaf_sources(layout, prep.kinds)
    n_a, n_b, n_l = len(a_positions), len(b_positions), len(layers)
    out = {block: np.zeros((n_l, n_a, n_b, layout.heads_of(block)), np.float32) for block in ATTENTION_BLOCKS}
    if n_a == 0 or n_b == 0 or n_l == 0:
        return out
    devices = data_size(mesh)
    per_layer = sum(layout.heads_of(block) * int(prep.slice_sizes[n]) for n, block in enumerate(ATTENTION_BLOCKS))
    c_a, c_b, c_l = tile_plan(-(-n_a // devices), n_b, n_l, per_layer, kernel.budget_bytes(), copies=COPIES)
    rows = devices * c_a  # A's rows per tile: c_a on each device
    statics = dict(layout=layout, kinds=prep.kinds, precision=kernel.precision)
    if mesh is not None:
        split, replicate = placements(mesh)

    def a_tile(i0: int, lsel: np.ndarray):
        if mesh is None:
            return device_leaves(prep.a.grads, layout, sources, a_positions[_chunk(i0, c_a, n_a)], lsel)
        return mesh_leaves(prep.a.grads, layout, sources, padded_positions(np.arange(i0, i0 + rows), a_positions), lsel, split)

    def b_tile(j0: int, lsel: np.ndarray):
        positions = b_positions[_chunk(j0, c_b, n_b)]
        return (device_leaves(prep.b.grads, layout, sources, positions, lsel) if mesh is None
                else mesh_leaves(prep.b.grads, layout, sources, positions, lsel, replicate))

    layer_starts, a_starts, b_starts = range(0, n_l, c_l), range(0, n_a, rows), range(0, n_b, c_b)
    with progress_bar(progress, total=len(layer_starts) * len(a_starts) * len(b_starts), desc=desc, unit="tile") as bar:
        for l0 in layer_starts:
            lsel = layers[_chunk(l0, c_l, n_l)]
            at = jnp.asarray(lsel)
            bases = {block: (cur.u_in[block][at], cur.u_out[block][at]) for block in ATTENTION_BLOCKS}
            weights = denominators({k: v[at] for k, v in cur.s_in.items()}, {k: v[at] for k, v in cur.s_out.items()},
                                   {k: jnp.asarray(v[lsel]) for k, v in cur.ridge.items()})
            if mesh is not None:
                bases, weights = replicate((bases, weights))
            b_cached = None
            for i0 in a_starts:
                rot_a = rotated_tile(a_tile(i0, lsel), bases, weights, **statics)
                for j0 in b_starts:
                    if b_cached is None or len(b_starts) > 1:
                        b_cached = rotated_tile(b_tile(j0, lsel), bases, None, **statics)
                    tile = tile_products(rot_a, b_cached, precision=kernel.precision)
                    li, ii, ji = min(c_l, n_l - l0), min(rows, n_a - i0), min(c_b, n_b - j0)
                    for block, value in tile.items():
                        out[block][l0 : l0 + li, i0 : i0 + ii, j0 : j0 + ji] = to_host(value)[:li, :ii, :ji]
                    bar.update()
    return out


def finish(raw: dict[str, np.ndarray], prep: Prepared, layout: ModelLayout, score: ScoreOptions,
           b_positions: np.ndarray) -> Float[np.ndarray, "block layer n_a n_b heads"]:
    """``[block, layer, n_a, n_b, head]``: ``s_j`` applied, divided by ``D`` for
    ``aggregate="mean"``, K/V gathered to query heads (:func:`~._scores.assemble`, which consumes
    ``raw``); a non-finite score is a :class:`~fisherjax.errors.NumericalError`."""
    scores = assemble(raw, prep.scale_b[b_positions], prep.slice_sizes, layout.kv_head_of, score.aggregate)
    bad = first_non_finite(scores)
    if bad is not None:
        block, layer, head = bad
        raise NumericalError(f"qkov: non-finite kfac score in block {ATTENTION_BLOCKS[block]}, layer {layer}, head {head}: the "
                             "gradients or the K-FAC factors contain NaN or inf")
    return scores


def heatmap(
    task_a: TaskFisher | SampleGrads, task_b: TaskFisher | SampleGrads, layout: ModelLayout, kfac: Mapping[str, HeadFactors] | None,
    score: ScoreOptions, kernel: KernelOptions, *, progress: bool = False, mesh: Mesh | None = None,
) -> QKOVResult:
    """The :class:`~.results.QKOVResult` of ``M_ij = s_j · g_iᵀ (F̃ + λI)⁻¹ g_j`` (divided by
    ``D`` for ``aggregate="mean"``) for every sample pair, layer, head and block; what
    :func:`fisherjax.analysis.qkov.heatmap` returns for ``variant="kfac"`` (``mesh``: task A's
    rows of every tile split over its ``"data"`` axis, :func:`slice_sums`)."""
    prep = prepare(task_a, task_b, layout, kfac, score)
    n_a, n_b = len(prep.a), len(prep.b)
    if n_b == 0:
        warnings.warn(f"qkov: task {prep.name_b!r} has no samples; its interference scores are all zero", stacklevel=3)
    a_pos, b_pos = np.arange(n_a), np.arange(n_b)
    raw = slice_sums(prep, layout, kernel, a_pos, b_pos, np.arange(layout.num_layers), progress=progress,
                     desc=f"QK-OV kfac {prep.name_b} → {prep.name_a}", mesh=mesh)
    scores = finish(raw, prep, layout, score, b_pos)
    avg = scores.mean(axis=(2, 3)) if n_a and n_b else np.zeros(scores.shape[:2] + scores.shape[-1:], np.float32)
    return result_of(prep, scores, avg, layout.kv_head_of, score)
