"""K-FAC of the dense layers from the site recordings, its products, damped inverse and EK-FAC.

Conventions (those of Phase 1): sample ``i``'s loss is the token sum
``L_i = Σ_t −log p(y_{t+1} | x_≤t)`` over its ``T_i`` predicted tokens
(:func:`fisherjax.data.predicted_labels`), ``g_i = ∇L_i``, and the empirical Fisher whose diagonal
Phase 1 reports is ``F = (1/n) Σ_i g_i g_iᵀ / T_i`` over the ``n`` samples with ``T_i > 0`` (filler
rows, ``sample_id < 0``, do not count). The true Fisher replaces the data labels by labels drawn
from the model at the predicted positions, sample ``i``'s draws from
``fold_in(key, sample_id_i)`` split ``true_samples`` ways, exactly as Phase 1
(:func:`fisherjax.fisher.step.sample_labels_per_row`); ``G`` averages over the draws.

For a dense site (input ``a_t``, output gradient ``δ_t = ∂L_i/∂(output at t)``, Flax kernel
``W [d_in, d_out]``) ``g_i = Σ_t ā_t δ_tᵀ`` with ``ā = [a, 1]`` when the site has a bias (the bias
is the kernel's last input row). K-FAC "expand" keeps the ``t = s`` terms of ``g_i g_iᵀ`` and
factorises their weighted sum (:mod:`fisherjax.curvature.factors`):

    A = (1/n) Σ_i (1/R_i) Σ_{t ∈ P_i} ā_t ā_tᵀ        G = (1/n) Σ_i (1/T_i) Σ_{t ∈ P_i} δ_t δ_tᵀ

``P_i`` are the positions where ``δ`` can be non-zero: the real tokens up to the last position
that predicts a label (``R_i = |P_i|``). Without prompt tokens ``P_i`` is exactly the ``T_i``
predicting positions and the weights are ``w_{i,t} = 1/(n T_i)`` for both factors, as in
:mod:`~fisherjax.curvature.factors`. A prompt position predicts no label but its ``δ`` is not zero
(later positions attend to it), so it is kept; ``A`` stays a mean over the positions that enter
``g_i`` and ``G`` keeps the Fisher's ``1/(n T_i)`` weights. Positions after the last predicted one
and padding have ``δ = 0`` and are not counted. With one sample whose only non-zero ``δ`` is at one
position, ``A ⊗ G = g gᵀ / T`` exactly.

Covered: every dense site (attention q/k/v/o, MLP in/gate/out). A fused QKV kernel (GPT-2
``c_attn``, GPT-NeoX ``query_key_value``) gets one factor per block, keyed ``"path#q"`` etc.,
with the shared ``A`` and ``G`` over the block's own output columns
(:meth:`~fisherjax.layout.ModelLayout.head_index`; NeoX interleaves them). Not covered: embeddings
and the unembedding (their ``G`` would be ``vocab × vocab`` or their ``A`` a one-hot second moment
of the vocabulary) and norms (not dense); products fall back to the diagonal there.

In the Kronecker eigenbasis (``A = U_A diag(s_A) U_Aᵀ``, ``G = U_G diag(s_G) U_Gᵀ``, from
``jnp.linalg.eigh``) the damped inverse is exact, not the factored Tikhonov approximation:

    (A ⊗ G + λI)⁻¹ vec(W) = U_A [ (U_Aᵀ W U_G) / (s_A s_Gᵀ + λ) ] U_Gᵀ

and EK-FAC (George et al. 2018) replaces ``s_A s_Gᵀ`` by the exact diagonal of ``F`` in that basis,
``S = (1/n) Σ_i (U_Aᵀ g_i U_G)² / T_i`` (:func:`refit_eigenvalues`).

Every contraction runs at ``Precision.HIGHEST`` (float32 products, not TF32/bf16 passes on GPUs),
except the factors' own sums when :func:`kfac_factors` is given another ``precision`` (one of
:data:`FACTOR_PRECISIONS`): the model's gradient pass itself runs at JAX's default precision, TF32
on recent GPUs, where full float32 factor GEMMs cost several times the pass (``benchmarks/curvature.py
--factor-precision`` measures both the time and the factors' error).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PyTree

from fisherjax import backend
from fisherjax.curvature.factors import KFAC, HeadFactors, KroneckerFactor
from fisherjax.data import IGNORE, predicted_labels
from fisherjax.errors import ConfigError, DataError
from fisherjax.fisher.sites import discover_sites
from fisherjax.fisher.step import data_cotangent, sample_labels_per_row, site_names
from fisherjax.layout import ModelLayout, Role, flatten, unflatten
from fisherjax.models.model import model_jit
from fisherjax.settings import STATIC, check_choice

FISHER_TYPES = ("empirical", "true")
HIGHEST = jax.lax.Precision.HIGHEST
FACTOR_PRECISIONS = ("highest", "high", "default", "tensorfloat32", "bfloat16_3x")
"""Precisions the factor sums take: :class:`jax.lax.Precision` names and the dot algorithms
``"tensorfloat32"`` (``TF32_TF32_F32``) and ``"bfloat16_3x"`` (``BF16_BF16_F32_X3``, about float32
accuracy on tensor cores); XLA:CPU computes every one of them but TF32, which it lacks, in float32."""
_PRECISION_VALUES = {"highest": HIGHEST, "high": jax.lax.Precision.HIGH, "default": jax.lax.Precision.DEFAULT,
                     "tensorfloat32": "TF32_TF32_F32", "bfloat16_3x": "BF16_BF16_F32_X3"}


# ---- factors from recordings ------------------------------------------------------------------


def with_bias_coordinate(a: Float[Array, "... d"], bias: bool) -> Float[Array, "... d1"]:
    """``ā = [a, 1]`` when the site has a bias (the bias is the kernel's last input row), else ``a``."""
    return jnp.concatenate([a, jnp.ones_like(a[..., :1])], axis=-1) if bias else a


SYMMETRIC_BLOCK = 384
"""Width of the blocks :func:`weighted_gram` multiplies: a factor of width ``d`` is cut into
``k = min(8, d // 384)`` blocks and only the ``k(k+1)/2`` on and above the diagonal are formed,
``(k+1)/2k`` of the full product's work (9/16 for GPT-2's 3072-wide MLP factors)."""


def weighted_gram(x: Float[Array, "*l b t d"], weights: Float[Array, "b t"], precision: str = "highest") -> Float[Array, "*l d d"]:
    """``Σ_{b,t} w_{b,t} x_{b,t} x_{b,t}ᵀ`` (``[.., d, d]``; leading axes kept; ``precision``: one of
    :data:`FACTOR_PRECISIONS`).

    XLA has no symmetric rank-k update (BLAS' ``syrk``), so a wide factor is cut into blocks and
    each block below the diagonal is the transpose of one above it (:data:`SYMMETRIC_BLOCK`); the
    factors are most of K-FAC's work beyond the backward pass to the layer inputs.
    """
    x = x.astype(jnp.float32)
    xw = x * weights[..., None]
    d = x.shape[-1]
    k = min(8, d // SYMMETRIC_BLOCK)
    check_choice("kfac", "precision", precision, FACTOR_PRECISIONS)
    how = _PRECISION_VALUES[precision]
    if k < 2:
        return jnp.einsum("...bti,...btj->...ij", xw, x, precision=how)
    edges = [round(i * d / k) for i in range(k + 1)]
    cols = [x[..., lo:hi] for lo, hi in zip(edges, edges[1:])]
    rows = [xw[..., lo:hi] for lo, hi in zip(edges, edges[1:])]
    upper = {(p, q): jnp.einsum("...bti,...btj->...ij", rows[p], cols[q], precision=how) for p in range(k) for q in range(p, k)}
    block = lambda p, q: upper[p, q] if p <= q else jnp.swapaxes(upper[q, p], -1, -2)  # noqa: E731
    return jnp.concatenate([jnp.concatenate([block(p, q) for q in range(k)], axis=-1) for p in range(k)], axis=-2)


def input_factor(a: Float[Array, "*l b t i"], weights: Float[Array, "b t"], bias: bool, precision: str = "highest") -> Float[Array, "*l i1 i1"]:
    """``Σ_{b,t} w_{b,t} ā_{b,t} ā_{b,t}ᵀ`` (``[.., d_in(+1), d_in(+1)]``; leading axes kept)."""
    return weighted_gram(with_bias_coordinate(a.astype(jnp.float32), bias), weights, precision)


def output_factor(delta: Float[Array, "*l b t o"], weights: Float[Array, "b t"], precision: str = "highest") -> Float[Array, "*l o o"]:
    """``Σ_{b,t} w_{b,t} δ_{b,t} δ_{b,t}ᵀ`` (``[.., d_out, d_out]``; leading axes kept)."""
    return weighted_gram(delta, weights, precision)


def factors_from_recordings(
    a: Float[Array, "*l b t i"],
    delta: Float[Array, "*l b t o"],
    weights: Float[Array, "b t"],
    bias: bool,
    *,
    input_weights: Float[Array, "b t"] | None = None,
) -> tuple[Float[Array, "*l i1 i1"], Float[Array, "*l o o"]]:
    """``(A, G) = (Σ u ā āᵀ, Σ w δ δᵀ)`` over the batch and position axes of one dense site.

    ``a [.., b, t, d_in]`` the recorded inputs, ``delta [.., b, t, d_out]`` the output gradients
    (leading axes such as layers are kept), ``weights`` ``w [b, t]`` and ``input_weights`` ``u``
    (default ``w``). With weights summing to 1 (e.g. ``1/(n T_i)`` on the predicting positions)
    these are the K-FAC factors of the module docstring; the model path passes ``1/T_i`` and
    ``1/R_i`` and divides by ``n`` at the end.
    """
    return input_factor(a, weights if input_weights is None else input_weights, bias), output_factor(delta, weights)


class PositionWeights(NamedTuple):
    """Per-position weights of one batch before the ``1/n``: ``inputs`` ``1/R_i`` and ``outputs``
    ``1/T_i`` on the counted positions ``P_i`` (0 elsewhere and on rows that do not count),
    ``tokens`` ``T_i`` and ``valid`` (``sample_id ≥ 0`` and ``T_i > 0``)."""

    inputs: Float[Array, "b t"]
    outputs: Float[Array, "b t"]
    tokens: Int[Array, " b"]
    valid: Array


def position_weights(labels: Int[Array, "b t"], attention_mask: Int[Array, "b t"], sample_ids: Int[Array, " b"]) -> PositionWeights:
    """The counted positions ``P_i`` (real tokens up to the last one that predicts a label) and
    their weights ``1/R_i`` (``A``) and ``1/T_i`` (``G``); see the module docstring."""
    labels = predicted_labels(labels, attention_mask)
    predicting = jnp.concatenate([labels[:, 1:] != IGNORE, jnp.zeros_like(labels[:, :1], bool)], axis=1)
    later = jnp.flip(jnp.cumsum(jnp.flip(predicting, 1), axis=1), 1) > 0  # some s ≥ t predicts
    tokens = predicting.sum(1)
    valid = (jnp.asarray(sample_ids) >= 0) & (tokens > 0)
    counted = later & (attention_mask != 0) & valid[:, None]

    def per_position(count):
        return counted * jnp.where(valid, 1.0 / jnp.maximum(count, 1), 0.0)[:, None]

    return PositionWeights(per_position(counted.sum(1)), per_position(tokens), tokens, valid)


# ---- which sites get factors ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FactorSite:
    """One factor of a model: its key, the site it is read from, its parameters and, for a fused
    QKV block, the block's output columns (``columns``, a tuple of ints)."""

    key: str
    site: str
    kernel: str
    bias: str | None
    block: str | None
    columns: tuple[int, ...] | None


def factor_sites(model) -> tuple[FactorSite, ...]:
    """The model's covered dense sites in forward order (fused QKV sites split per block)."""
    layout = model.layout
    out = []
    for site in discover_sites(layout, site_names(model)):
        if site.kind != "dense":
            continue
        kernel, bias = site.params["kernel"], site.params.get("bias")
        if layout.specs[kernel].role == Role.QKV:
            for block in ("q", "k", "v"):
                columns = tuple(int(c) for c in layout.head_index(kernel, block).reshape(-1))
                out.append(FactorSite(factor_key(kernel, block), site.name, kernel, bias, block, columns))
        else:
            out.append(FactorSite(factor_key(kernel, None), site.name, kernel, bias, None, None))
    return tuple(out)


def chosen_sites(model, keys: Iterable[str] | None = None) -> tuple[FactorSite, ...]:
    """:func:`factor_sites` whose key is in ``keys`` (all of them for None), in forward order.

    Raises:
      ConfigError: a key that is no factor of the model.
    """
    sites = factor_sites(model)
    if keys is None:
        return sites
    keys = set(keys)
    unknown = sorted(keys - {fs.key for fs in sites})
    if unknown:
        raise ConfigError(f"kfac: {unknown} are not factors of the model (see kfac.factor_sites)")
    return tuple(fs for fs in sites if fs.key in keys)


def factor_dims(model, site: FactorSite) -> tuple[int | None, int, int]:
    """``(layers, d_in(+1), d_out)`` of one site's factors ``A [(layers,) i, i]``, ``G [(layers,) o,
    o]``: the stacked layers (None for an unstacked leaf), the kernel's input width with the bias
    coordinate, and its output width (a fused QKV block's own columns)."""
    spec = model.layout.specs[site.kernel]
    d_out = len(site.columns) if site.columns is not None else spec.shape[-1]
    return (spec.shape[0] if spec.layered else None), spec.shape[-2] + (site.bias is not None), d_out


def factor_floats(model, keys: Iterable[str] | None = None) -> int:
    """Floats the K-FAC factors of ``model`` (those in ``keys``: :func:`chosen_sites`) take,
    ``layers · ((d_in + bias)² + d_out²)`` each (:func:`factor_dims`)."""
    total = 0
    for site in chosen_sites(model, keys):
        layers, d_in, d_out = factor_dims(model, site)
        total += (layers or 1) * (d_in * d_in + d_out * d_out)
    return total


def factor_key(path: str, block: str | None) -> str:
    """The key of a kernel's factor in :attr:`KFAC.factors`: the path, or ``"path#q"`` for a block."""
    return path if block is None else f"{path}#{block}"


def _site_value(tree: dict, name: str):
    return tree["layers"][name[len("layers/"):]] if name.startswith("layers/") else tree[name]


def _block_columns(x, columns):
    return x if columns is None else x[..., np.asarray(columns)]


# ---- one batch ------------------------------------------------------------------------------


class Recordings(NamedTuple):
    """One batch's forward: the sites' inputs, the pullback to their output gradients, the
    logits, the predicted labels and the position weights."""

    inputs: dict
    pullback: Callable
    logits: Array
    labels: Array
    weights: PositionWeights


def record(model, params, input_ids, attention_mask, labels, sample_ids) -> Recordings:
    """One forward pass that records every site's input and keeps the pullback to the site
    outputs (``jax.vjp`` with respect to the zero taps, as Phase 1's step)."""
    batch, seq = input_ids.shape
    weights = position_weights(labels, attention_mask, sample_ids)
    labels = predicted_labels(labels, attention_mask)

    def forward(taps):
        out = model.forward(params, input_ids, attention_mask, taps=taps)
        return out.logits, out.recorded

    logits, pullback, inputs = jax.vjp(forward, model.zero_taps(batch, seq), has_aux=True)
    return Recordings(inputs, pullback, logits, labels, weights)


def label_draws(rec: Recordings, sample_ids, key, fisher_type: str, true_samples: int) -> tuple[Callable, Array]:
    """``(cotangent_of, xs)``: the cotangents ``∂(Σ L)/∂logits`` to pull back are
    ``cotangent_of(x)`` for ``x`` in ``xs`` — once with the data labels (empirical), or
    ``true_samples`` times with labels drawn from the model (true; sample ``i``'s draws from
    ``split(fold_in(key, sample_id_i), true_samples)``, as Phase 1)."""
    if fisher_type == "empirical":
        return (lambda _: data_cotangent(rec.logits, rec.labels)), jnp.zeros((1,))
    row_keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i), true_samples))(sample_ids)
    keys = jnp.swapaxes(row_keys, 0, 1)  # [draws, batch]
    return (lambda k: data_cotangent(rec.logits, sample_labels_per_row(k, rec.logits, rec.labels))), keys


def over_draws(fn: Callable[[dict], dict], cotangent_of: Callable, xs, pullback) -> dict:
    """``mean_x fn(site output gradients of cotangent_of(x))`` over the draws ``xs`` (a
    ``jax.lax.scan``, so one draw's gradients are alive at a time)."""

    def step(total, x):
        return jax.tree.map(jnp.add, total, fn(pullback(cotangent_of(x))[0])), None

    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(lambda: fn(pullback(cotangent_of(xs[0]))[0])))
    total, _ = jax.lax.scan(step, zero, xs)
    return jax.tree.map(lambda t: t / xs.shape[0], total)


class FactorSums(NamedTuple):
    """One batch's unnormalised factors ``{key: (Σ_i (1/R_i) Σ_t ā āᵀ, Σ_i (1/T_i) Σ_t δ δᵀ)}``
    (``G`` averaged over the draws), the number of samples that count and their tokens."""

    factors: dict
    samples: Array
    tokens: Array


@model_jit(static_argnames=("model", "fisher_type", "true_samples", "precision", "keys", "layers"))
def batch_factor_sums(model, params, input_ids, attention_mask, labels, sample_ids, key, *, fisher_type: str, true_samples: int,
                      precision: str = "highest", keys: tuple[str, ...] | None = None,
                      layers: tuple[int, int] | None = None) -> FactorSums:
    """:class:`FactorSums` of one batch (jitted once per model, batch shape, Fisher type, precision,
    factor keys and layers), of every factor or of those in ``keys``, over every layer or the
    stacked layers ``lo ≤ l < hi`` of ``layers`` (a site outside the stacked layers whole).

    ``key`` is only read by the true Fisher (pass any key otherwise).
    """
    rec = record(model, params, input_ids, attention_mask, labels, sample_ids)
    w = rec.weights
    sites = chosen_sites(model, keys)
    inputs = {}
    def value(tree, name):
        x = _site_value(tree, name)
        return x[layers[0] : layers[1]] if layers is not None and name.startswith("layers/") else x

    for fs in sites:
        if fs.site not in inputs:
            inputs[fs.site] = input_factor(value(rec.inputs, fs.site), w.inputs, fs.bias is not None, precision)

    def output_grams(deltas):
        return {fs.key: output_factor(_block_columns(value(deltas, fs.site), fs.columns), w.outputs, precision) for fs in sites}

    grams = over_draws(output_grams, *label_draws(rec, sample_ids, key, fisher_type, true_samples), rec.pullback)
    factors = {fs.key: (inputs[fs.site], grams[fs.key]) for fs in sites}
    return FactorSums(factors, w.valid.sum(), jnp.where(w.valid, w.tokens, 0).sum())


def _batch_arrays(batch) -> tuple:
    ids, mask, labels = (np.asarray(x) for x in batch[:3])
    sample_ids = np.asarray(batch[3]) if len(batch) > 3 else np.arange(ids.shape[0])
    return ids, mask, labels, sample_ids


def _checked_key(fisher_type: str, key, true_samples: int) -> Any:
    """The key of the label draws (any key for the empirical Fisher) after checking the options."""
    check_choice("kfac", "fisher_type", fisher_type, FISHER_TYPES)
    if true_samples < 1:
        raise ConfigError(f"kfac true_samples must be ≥ 1, got {true_samples}")
    if fisher_type == "true" and key is None:
        raise ConfigError("fisher_type='true' draws labels from the model: pass a PRNG key (key=jax.random.key(seed))")
    return key if key is not None else jax.random.key(0)


# ---- K-FAC of a model -----------------------------------------------------------------------


def kfac_factors(
    model, params: PyTree, batches: Iterable, *, fisher_type: str = "empirical", key: jax.Array | None = None, true_samples: int = 1,
    precision: str = "highest", keys: Iterable[str] | None = None, layers: tuple[int, int] | None = None,
) -> KFAC:
    """K-FAC of every dense site of ``model`` over ``batches`` (see the module docstring), or of the
    factors in ``keys`` alone (:func:`chosen_sites`) and of the stacked layers ``lo ≤ l < hi`` of
    ``layers`` alone: the same forward and backward, fewer sums.

    Args:
      model: a :class:`~fisherjax.models.Model`; params: its parameters.
      batches: :class:`~fisherjax.data.Batch` es (or ``(ids, mask, labels[, sample_ids])``);
        one jitted accumulation per batch shape, summed over batches, normalised at the end.
      fisher_type: ``"empirical"`` (data labels) or ``"true"`` (labels drawn from the model,
        ``G`` averaged over ``true_samples`` draws; needs ``key``).
      precision: of the factor sums (:data:`FACTOR_PRECISIONS`; the module docstring says why).

    Returns:
      :class:`~fisherjax.curvature.factors.KFAC` with ``A [layer, d_in(+1), d_in(+1)]`` and
      ``G [layer, d_out, d_out]`` per site (``[.., width_of_block, ..]`` for a fused QKV block).

    Raises:
      DataError: no sample predicts a token.
    """
    key = _checked_key(fisher_type, key, true_samples)
    check_choice("kfac", "precision", precision, FACTOR_PRECISIONS)
    if precision == "tensorfloat32" and backend.is_cpu():
        raise ConfigError("kfac precision 'tensorfloat32' needs a GPU (XLA:CPU has no TF32); use 'highest' there")
    sites = chosen_sites(model, keys)
    keys = None if keys is None else tuple(fs.key for fs in sites)
    totals = None
    for batch in batches:  # summed on the device: no transfer until the end
        sums = batch_factor_sums(model, params, *_batch_arrays(batch), key, fisher_type=fisher_type, true_samples=true_samples,
                                 precision=precision, keys=keys, layers=None if layers is None else tuple(layers))
        totals = sums if totals is None else _tree_sum(totals, sums)
    samples, tokens = (0, 0) if totals is None else (int(totals.samples), int(totals.tokens))
    if not samples:
        raise DataError("kfac_factors: no sample of the batches predicts a token")
    means = _divided(totals.factors, samples)  # a dict keyed like totals.factors; the order is factor_sites'
    factors = {fs.key: KroneckerFactor(*means[fs.key], fs.kernel, fs.bias, fs.block) for fs in sites}
    return KFAC(factors, samples, tokens, fisher_type)


@jax.jit
def _tree_sum(a, b):
    """``a + b`` leaf by leaf, one compiled program (an eager ``tree.map`` compiles one per shape)."""
    return jax.tree.map(jnp.add, a, b)


@jax.jit
def _divided(tree, count):
    """Every leaf of ``tree`` divided by ``count``, one compiled program."""
    return jax.tree.map(lambda x: x / count, tree)


# ---- eigendecomposition -----------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KroneckerEigen:
    """One factor in its eigenbasis: ``A = U_A diag(s_A) U_Aᵀ``, ``G = U_G diag(s_G) U_Gᵀ``.

    ``scales``: EK-FAC's ``S [.., d_in(+1), d_out]`` (the exact Fisher diagonal in the basis), or
    None (K-FAC: ``s_A s_Gᵀ``). ``kernel``, ``bias``, ``block`` as in :class:`KroneckerFactor`.
    """

    input_values: Float[Array, "... i"]
    input_vectors: Float[Array, "... i i"]
    output_values: Float[Array, "... o"]
    output_vectors: Float[Array, "... o o"]
    scales: Float[Array, "... i o"] | None = None
    kernel: str = dataclasses.field(default="", metadata=STATIC)
    bias: str | None = dataclasses.field(default=None, metadata=STATIC)
    block: str | None = dataclasses.field(default=None, metadata=STATIC)

    @property
    def curvature(self) -> Float[Array, "... i o"]:
        """The eigenvalues of the factor's curvature on ``U_Aᵀ W U_G``: ``S`` or ``s_A s_Gᵀ``."""
        if self.scales is not None:
            return self.scales
        return self.input_values[..., :, None] * self.output_values[..., None, :]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KFACEigen:
    """:func:`decompose` of a :class:`KFAC` (same keys and counts); ``refit`` marks EK-FAC scales."""

    factors: Mapping[str, KroneckerEigen]
    n_samples: int = dataclasses.field(metadata=STATIC)
    n_tokens: int = dataclasses.field(metadata=STATIC)
    fisher_type: str = dataclasses.field(default="empirical", metadata=STATIC)
    refit: bool = dataclasses.field(default=False, metadata=STATIC)


def eigen_of(factor: KroneckerFactor) -> KroneckerEigen:
    """``jnp.linalg.eigh`` of ``A`` and ``G`` (batched over layers); eigenvalues clipped at 0
    (both are PSD; rounding can make the smallest slightly negative)."""
    s_a, u_a = jnp.linalg.eigh(factor.inputs)
    s_g, u_g = jnp.linalg.eigh(factor.outputs)
    return KroneckerEigen(jnp.maximum(s_a, 0.0), u_a, jnp.maximum(s_g, 0.0), u_g, None, factor.kernel, factor.bias, factor.block)


def decompose(kfac: KFAC) -> KFACEigen:
    """Every factor's eigendecomposition (:func:`eigen_of`), one after another: jitted together,
    XLA:CPU ran their LAPACK calls concurrently and the process hung (seventeenth session)."""
    return KFACEigen({k: eigen_of(f) for k, f in kfac.factors.items()}, kfac.n_samples, kfac.n_tokens, kfac.fisher_type)


def factors_of(eigen: KFACEigen) -> KFAC:
    """The K-FAC of an eigendecomposition: ``A = U_A diag(s_A) U_Aᵀ``, ``G = U_G diag(s_G) U_Gᵀ``
    (with the clipped eigenvalues; EK-FAC scales are not part of it)."""

    def rebuild(values, vectors):
        return jnp.einsum("...ij,...j,...kj->...ik", vectors, values, vectors, precision=HIGHEST)

    factors = {k: KroneckerFactor(rebuild(e.input_values, e.input_vectors), rebuild(e.output_values, e.output_vectors), e.kernel, e.bias, e.block)
               for k, e in eigen.factors.items()}
    return KFAC(factors, eigen.n_samples, eigen.n_tokens, eigen.fisher_type)


def eigenvalues(eigen: KFACEigen) -> Float[Array, " m"]:
    """Every eigenvalue of the block-diagonal K-FAC on the covered kernels: each factor's
    ``s_A s_Gᵀ`` (EK-FAC: ``S``) over all layers, flattened and concatenated in factor order."""
    return jnp.concatenate([e.curvature.reshape(-1) for e in eigen.factors.values()])


@jax.jit
def _symmetric_values(x: Float[Array, "... d d"]) -> Float[Array, "... d"]:
    """Eigenvalues of each ``d × d`` matrix of ``x``, clipped at 0, one matrix at a time
    (``lax.map``): the eigenvectors LAPACK forms beside them live for one matrix, not a stack."""
    flat = x.reshape(-1, *x.shape[-2:])
    return jnp.maximum(jax.lax.map(jnp.linalg.eigvalsh, flat), 0.0).reshape(x.shape[:-1])


def factor_values(kfac: KFAC) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{key: (s_A [(layer,) i], s_G [(layer,) o])}``: the eigenvalues of every factor (float64 on
    the host), without their eigenvectors — what the K-FAC spectrum needs (a Kronecker product's
    eigenvalues are ``s_A ⊗ s_G``) at the memory of the factors alone, where :func:`decompose`
    doubles it. The factors go one after another (see :func:`decompose`)."""
    return {k: (np.asarray(_symmetric_values(f.inputs), np.float64), np.asarray(_symmetric_values(f.outputs), np.float64))
            for k, f in kfac.factors.items()}


def kronecker_top(values: Mapping[str, tuple[np.ndarray, np.ndarray]], k: int) -> np.ndarray:
    """The ``k`` largest eigenvalues of the block-diagonal K-FAC (fewer when it has fewer), from
    :func:`factor_values`, largest first: the top ``k`` of each block's ``s_A ⊗ s_G`` are among the
    products of the top ``k`` of ``s_A`` and of ``s_G`` (both non-negative), so no
    parameter-sized array of products is formed."""
    candidates = []
    for s_a, s_g in values.values():
        a = np.sort(s_a, axis=-1)[..., ::-1][..., :k]
        g = np.sort(s_g, axis=-1)[..., ::-1][..., :k]
        candidates.append((a[..., :, None] * g[..., None, :]).reshape(-1))
    flat = np.concatenate(candidates)
    return np.sort(flat)[::-1][:k]


def kronecker_extremes(values: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """``(λ_min, λ_max)`` of the block-diagonal K-FAC from :func:`factor_values`: over its blocks,
    ``min s_A · min s_G`` and ``max s_A · max s_G`` (non-negative factors' eigenvalues)."""
    low = min(float(np.min(s_a.min(-1) * s_g.min(-1))) for s_a, s_g in values.values())
    high = max(float(np.max(s_a.max(-1) * s_g.max(-1))) for s_a, s_g in values.values())
    return low, high


def slice_top(eigen: KFACEigen, layout: ModelLayout, block_id: tuple[str, int, int], include_bias: bool = True) -> float:
    """The largest eigenvalue of K-FAC restricted to one attention head's slice
    ``(block, layer, head)`` (the slices of :mod:`fisherjax.curvature.blocks`): q/k/v
    ``λ_max(A) λ_max(G_hh)`` (``A`` without its bias coordinate unless ``include_bias``), o
    ``λ_max(A_hh) λ_max(G)`` — a Kronecker product's eigenvalues are the products of its factors'
    (:func:`attention_factors` of :func:`factors_of`; EK-FAC scales are not per head)."""
    return float(slice_tops(eigen, layout, [block_id], include_bias)[0])


def slice_tops(curvature: KFAC | KFACEigen, layout: ModelLayout, block_ids, include_bias: bool = True) -> np.ndarray:
    """:func:`slice_top` of every ``(block, layer, head)`` in ``block_ids``, ``[len(block_ids)]``
    float64, from the factors themselves or from their eigendecomposition (rebuilt first,
    :func:`factors_of`: with GPT-2's 3072-wide factors that is a second set of factors and a
    cubic product each, which a caller holding the factors skips). The factors are split by head
    once (only the blocks ``block_ids`` name, so ``curvature`` needs no other factor), and each
    slice's two small symmetric eigenproblems go to numpy's LAPACK (no compilation per factor
    shape)."""
    blocks = {block for block, _, _ in block_ids}
    heads = attention_factors(factors_of(curvature) if isinstance(curvature, KFACEigen) else curvature, layout, blocks)
    host = {block: (np.asarray(h.inputs, np.float64), np.asarray(h.outputs, np.float64), h.has_bias) for block, h in heads.items()}
    tops = []
    for block, layer, head in block_ids:
        inputs, outputs, has_bias = host[block]
        a, g = inputs[layer], outputs[layer]
        if block == "o":
            a = a[head]
        else:
            g = g[head]
            if has_bias and not include_bias:
                a = a[:-1, :-1]
        tops.append(np.linalg.eigvalsh(a)[-1] * np.linalg.eigvalsh(g)[-1])
    return np.asarray(tops, np.float64)


# ---- products ---------------------------------------------------------------------------------


def _is_flat(tree) -> bool:
    return isinstance(tree, Mapping) and all(not isinstance(v, Mapping) for v in tree.values())


def _kernel_matrix(layout: ModelLayout | None, flat: Mapping, kernel: str, bias: str | None, block: str | None, per_layer: bool = False):
    """``W̄ [.., d_in(+1), d_out_block]``: the kernel (a fused block's columns) with the bias as
    its last row (``per_layer``: leaves of any number of a stacked leaf's layers)."""
    w = flat[kernel]
    if block is not None:
        view = layout.view(kernel, w, block, per_layer=per_layer)  # [.., d_in, heads, hd]
        w = view.reshape(*view.shape[:-2], -1)
    if bias is None:
        return w
    if bias not in flat:
        raise DataError(f"the tree has the kernel {kernel} but not its bias {bias}")
    b = flat[bias]
    if block is not None:
        b = layout.view(bias, b, block, per_layer=per_layer).reshape(*b.shape[:-1], -1)
    return jnp.concatenate([w, b[..., None, :]], axis=-2)


def map_covered(
    factors: Mapping[str, Any],
    layout: ModelLayout | None,
    v: PyTree,
    covered: Callable[[Any, Array], Array],
    uncovered: Callable[[str, Array], Array],
    per_layer: bool = False,
) -> PyTree:
    """``covered(factor, W̄)`` on every factor's ``W̄`` (:func:`_kernel_matrix`), written back into
    the kernel (and bias) leaves, ``uncovered(path, leaf)`` on every other leaf; the result has
    ``v``'s structure (nested or flat ``{path: array}``). Factors whose kernel ``v`` lacks are
    skipped; a fused block needs ``layout``; ``per_layer``: ``v``'s stacked leaves hold a range of
    the layers, as the factors do (:func:`kfac_factors` with ``layers``)."""
    flat = dict(flatten(v)) if not _is_flat(v) else dict(v)
    flat = {p: jnp.asarray(x) for p, x in flat.items()}
    out: dict[str, Array] = {}
    pieces: dict[str, dict] = {}  # fused kernel/bias path -> {block: view}
    for f in factors.values():
        if f.kernel not in flat:
            continue
        if f.block is not None and layout is None:
            raise ConfigError(f"{f.kernel} is a fused QKV kernel: pass the model's layout to split its blocks")
        result = covered(f, _kernel_matrix(layout, flat, f.kernel, f.bias, f.block, per_layer)).astype(flat[f.kernel].dtype)
        w, b = (result[..., :-1, :], result[..., -1, :]) if f.bias is not None else (result, None)
        if f.block is None:
            out[f.kernel] = w
            if b is not None:
                out[f.bias] = b
            continue
        heads = layout.heads_of(f.block)
        pieces.setdefault(f.kernel, {})[f.block] = w.reshape(*w.shape[:-1], heads, layout.head_dim)
        if b is not None:
            pieces.setdefault(f.bias, {})[f.block] = b.reshape(*b.shape[:-1], heads, layout.head_dim)
    for path, views in pieces.items():
        if set(views) != {"q", "k", "v"}:
            raise DataError(f"{path}: K-FAC has factors for blocks {sorted(views)} of a fused QKV leaf, not all of q, k, v")
        out[path] = layout.unview(path, views)
    for path, x in flat.items():
        if path not in out:
            out[path] = uncovered(path, x)
    out = {p: out[p] for p in flat}
    return out if _is_flat(v) else unflatten(out)


def _check_damping(damping) -> None:
    if isinstance(damping, (int, float)) and not damping > 0:
        raise ConfigError(f"the damping λ must be > 0 (it keeps (A⊗G + λI) invertible), got {damping}")


def _diagonal_of(diagonal: PyTree | None, v: PyTree) -> dict | None:
    """The diagonal as flat ``{path: array}`` after checking it has every leaf of ``v``."""
    if diagonal is None:
        return None
    flat = {p: jnp.asarray(x) for p, x in (diagonal.items() if _is_flat(diagonal) else flatten(diagonal).items())}
    missing = sorted(set(v if _is_flat(v) else flatten(v)) - set(flat))
    if missing:
        raise DataError(f"the diagonal has no values for {missing}")
    return flat


def kfac_vector_product(kfac: KFAC, layout: ModelLayout | None, v: PyTree, diagonal: PyTree | None = None) -> PyTree:
    """``(A ⊗ G) vec(W̄) = A W̄ G`` on every covered kernel (bias as its last row, a fused QKV
    leaf block by block); uncovered leaves give zeros, or ``diagonal ⊙ v`` when a params-shaped
    ``diagonal`` is given. ``v`` is params-shaped (nested or flat); so is the result."""
    diag = _diagonal_of(diagonal, v)

    def covered(f: KroneckerFactor, w):
        return jnp.matmul(jnp.matmul(f.inputs, w, precision=HIGHEST), f.outputs, precision=HIGHEST)

    def uncovered(path, x):
        return jnp.zeros_like(x) if diag is None else (diag[path] * x).astype(x.dtype)

    return map_covered(kfac.factors, layout, v, covered, uncovered)


def eigen_inverse(e: KroneckerEigen, w: Float[Array, "... i o"], damping) -> Float[Array, "... i o"]:
    """``U_A [ (U_Aᵀ W̄ U_G) / (curvature + λ) ] U_Gᵀ`` (``curvature`` = ``s_A s_Gᵀ`` or EK-FAC's ``S``)."""
    inner = jnp.matmul(jnp.matmul(jnp.swapaxes(e.input_vectors, -1, -2), w, precision=HIGHEST), e.output_vectors, precision=HIGHEST)
    inner = inner / (e.curvature + damping)
    return jnp.matmul(jnp.matmul(e.input_vectors, inner, precision=HIGHEST), jnp.swapaxes(e.output_vectors, -1, -2), precision=HIGHEST)


def kfac_inverse_product(eigen: KFACEigen, layout: ModelLayout | None, v: PyTree, damping, diagonal: PyTree | None = None) -> PyTree:
    """``(A ⊗ G + λI)⁻¹ vec(W̄)`` on every covered kernel, exactly in the Kronecker eigenbasis
    (:func:`eigen_inverse`; EK-FAC's ``S + λ`` when refit); ``v / (diagonal + λ)`` on the other
    leaves when ``diagonal`` is given, else ``v / λ``. ``v`` params-shaped (nested or flat)."""
    _check_damping(damping)
    diag = _diagonal_of(diagonal, v)

    def uncovered(path, x):
        return (x / ((diag[path] if diag is not None else 0.0) + damping)).astype(x.dtype)

    return map_covered(eigen.factors, layout, v, lambda e, w: eigen_inverse(e, w, damping), uncovered)


# ---- EK-FAC -------------------------------------------------------------------------------------


@model_jit(static_argnames=("model", "fisher_type", "true_samples"))
def batch_scale_sums(model, params, input_ids, attention_mask, labels, sample_ids, key, eigen: KFACEigen, *,
                     fisher_type: str, true_samples: int) -> tuple[dict, Array]:
    """``({key: Σ_i (1/T_i) mean_draws (U_Aᵀ ḡ_i U_G)²}, samples that count)`` of one batch (rows
    that do not count weigh 0); ``ḡ_i = Σ_t ā_t δ_tᵀ`` over all positions (exact: ``δ = 0`` where nothing
    depends on a position), formed one sample at a time in the eigenbasis (``jax.lax.scan``), so
    memory holds one ``[.., d_in(+1), d_out]`` per factor."""
    rec = record(model, params, input_ids, attention_mask, labels, sample_ids)
    inv_t = rec.weights.valid / jnp.maximum(rec.weights.tokens, 1)
    sites = {fs.key: fs for fs in factor_sites(model)}
    projected_in = {}
    for k, e in eigen.factors.items():
        fs = sites[k]
        a = with_bias_coordinate(_site_value(rec.inputs, fs.site).astype(jnp.float32), fs.bias is not None)
        projected_in[k] = jnp.moveaxis(jnp.matmul(a, e.input_vectors[..., None, :, :], precision=HIGHEST), -3, 0)  # [b, .., t, i]

    def squares(deltas):
        projected_out = {}
        for k, e in eigen.factors.items():
            d = _block_columns(_site_value(deltas, sites[k].site), sites[k].columns).astype(jnp.float32)
            projected_out[k] = jnp.moveaxis(jnp.matmul(d, e.output_vectors[..., None, :, :], precision=HIGHEST), -3, 0)

        def sample(acc, xs):
            a_i, d_i, w_i = xs
            return {k: acc[k] + w_i * jnp.square(jnp.einsum("...ti,...to->...io", a_i[k], d_i[k], precision=HIGHEST)) for k in acc}, None

        zero = {k: jnp.zeros(e.curvature.shape, jnp.float32) for k, e in eigen.factors.items()}
        return jax.lax.scan(sample, zero, (projected_in, projected_out, inv_t))[0]

    return over_draws(squares, *label_draws(rec, sample_ids, key, fisher_type, true_samples), rec.pullback), rec.weights.valid.sum()


def refit_eigenvalues(
    model, params: PyTree, batches: Iterable, eigen: KFACEigen, *, key: jax.Array | None = None, true_samples: int = 1
) -> KFACEigen:
    """EK-FAC: ``eigen`` with the exact Fisher diagonal in its Kronecker eigenbasis,
    ``S = (1/n) Σ_i (U_Aᵀ ḡ_i U_G)² / T_i`` (per sample ``ḡ_i = Σ_t ā_t δ_tᵀ``, bias row
    ``Σ_t δ_t``), stored as ``scales [.., d_in(+1), d_out]``; the products then use ``S + λ``.
    The Fisher type is ``eigen.fisher_type`` (true: ``key`` and ``true_samples`` as in
    :func:`kfac_factors`).
    """
    key = _checked_key(eigen.fisher_type, key, true_samples)
    totals, samples = None, 0
    for batch in batches:
        sums, count = batch_scale_sums(model, params, *_batch_arrays(batch), key, eigen, fisher_type=eigen.fisher_type, true_samples=true_samples)
        totals = sums if totals is None else _tree_sum(totals, sums)
        samples = samples + count
    samples = int(samples)
    if not samples:
        raise DataError("refit_eigenvalues: no sample of the batches predicts a token")
    scales = _divided(totals, samples)
    factors = {k: dataclasses.replace(e, scales=scales[k]) for k, e in eigen.factors.items()}
    return dataclasses.replace(eigen, factors=factors, refit=True)


# ---- per-head factors of the attention blocks ----------------------------------------------------


def head_diagonal_blocks(x: Float[Array, "... hd_total hd_total"], heads: int, head_dim: int) -> Float[Array, "... heads hd hd"]:
    """The ``heads`` diagonal ``[head_dim, head_dim]`` blocks of a matrix whose axes are
    head-major (``[heads · head_dim]``)."""
    x = x.reshape(*x.shape[:-2], heads, head_dim, heads, head_dim)
    return jnp.moveaxis(jnp.diagonal(x, axis1=-4, axis2=-2), -1, -3)


def attention_factors(kfac: KFAC, layout: ModelLayout, blocks: Iterable[str] = ("q", "k", "v", "o")) -> dict[str, HeadFactors]:
    """K-FAC restricted to each attention head: ``{block: HeadFactors}`` for q/k/v/o (those in
    ``blocks``).

    q/k/v: ``inputs`` = the site's ``A`` ``[layer, d_in(+1), d_in(+1)]`` (shared by the block's
    heads), ``outputs`` = each head's ``[head_dim, head_dim]`` sub-block of the block's ``G``,
    ``[layer, heads_of_block, hd, hd]``. o (heads on the kernel's input axis): ``inputs`` = each
    head's sub-block of ``A`` ``[layer, heads, hd, hd]`` (without the bias coordinate),
    ``outputs`` = ``G`` ``[layer, d_out, d_out]``. Per-layer (unstacked) leaves are stacked with
    :meth:`~fisherjax.layout.ModelLayout.stack_layers`.
    """
    out = {}
    hd = layout.head_dim
    for block in (b for b in ("q", "k", "v", "o") if b in set(blocks)):
        sources = layout.block_sources(block, "kernel")
        if not sources:
            continue
        keys = {p: factor_key(p, block if layout.specs[p].role == Role.QKV else None) for p in sources}
        missing = [k for k in keys.values() if k not in kfac.factors]
        if missing:
            raise DataError(f"K-FAC has no factor for {missing}")
        first = kfac.factors[keys[sources[0]]]

        def stacked(attr, keys=keys, sources=sources):
            return layout.stack_layers(sources, lambda p: getattr(kfac.factors[keys[p]], attr))

        if block == "o":
            a = stacked("inputs")
            width = layout.num_heads * hd
            out[block] = HeadFactors(head_diagonal_blocks(a[..., :width, :width], layout.num_heads, hd), stacked("outputs"), block, False)
        else:
            g = stacked("outputs")
            out[block] = HeadFactors(stacked("inputs"), head_diagonal_blocks(g, layout.heads_of(block), hd), block, first.bias is not None)
    return out
