"""Phase 7: using the Fisher in training and merging — diagonal Fisher scaling, EWC, Fisher merging.

All three take a per-parameter Fisher ``F`` shaped like the parameters.
:func:`parameter_fisher` makes one from a :class:`~fisherjax.fisher.TaskFisher`: its full diagonal
``Î`` where collected, otherwise each group's *mean* Fisher per parameter ``F_g / |g|`` spread over
the group's parameters through the layout (:func:`~fisherjax.analysis.importance.spread_groups`;
the leaf's primary groups, so an MLP out kernel uses its output ``channel`` groups).

* :func:`scale_by_fisher` — optax transformation ``u ← u / (F + ε)``, a diagonal natural-gradient
  preconditioner: chain it before a learning-rate transformation,
  ``optax.chain(scale_by_fisher(F, 1e-8), optax.sgd(lr))``.
* :func:`ewc_penalty` — elastic weight consolidation (Kirkpatrick et al. 2017)
  ``Ω(θ) = λ/2 Σ_k F_k (θ_k − θ*_k)²``; :func:`ewc_regulariser` adds its gradient
  ``λ F ⊙ (θ − θ*)`` to the updates inside an optax chain (like ``optax.add_decayed_weights``).
* :func:`fisher_merge` — Fisher-weighted averaging (Matena & Raffel 2022)
  ``θ = Σ_k c_k F̃_k θ_k / Σ_k c_k F̃_k`` with ``F̃_k = max(F_k, floor)`` (the floor makes a
  parameter no model has Fisher for fall back to the ``c``-weighted mean) and optional model
  coefficients ``c_k``.

With K-FAC (:mod:`fisherjax.curvature.kfac`; the dense kernels get ``F ≈ A ⊗ G``, every other leaf
the diagonal ``F`` when given):

* :func:`scale_by_kfac` — optax transformation ``u ← (A ⊗ G + λI)⁻¹ u`` per covered kernel (the
  exact damped inverse in the Kronecker eigenbasis, EK-FAC's ``S + λ`` when refit),
  ``u / (F + λ)`` elsewhere; optionally refreshing the factors from a ``batch=`` extra argument
  every ``refresh_every`` steps as an exponential moving average (in its jittable state).
* :func:`ewc_kfac_penalty` — ``Ω(θ) = λ/2 Σ_sites tr(Δᵀ A Δ G)`` (+ the diagonal term elsewhere);
  :func:`ewc_kfac_regulariser` adds its gradient ``λ A Δ G`` like :func:`ewc_regulariser`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PyTree

from fisherjax.analysis.importance import primary_group_types, spread_groups
from fisherjax.curvature.factors import KFAC, KroneckerFactor
from fisherjax.curvature.kfac import (
    KFACEigen, batch_factor_sums, decompose, eigen_of, factors_of, kfac_inverse_product, kfac_vector_product,
)
from fisherjax.errors import ConfigError, DataError, NumericalError
from fisherjax.fisher.groups import group_sizes
from fisherjax.fisher.state import TaskFisher
from fisherjax.layout import ModelLayout, flatten, leaf_paths, unflatten

SOURCES = ("auto", "diagonal", "groups")


# ---- per-parameter Fisher -----------------------------------------------------------------


_GROUP_TYPES = frozenset({"head", "head_q", "head_k", "head_v", "channel", "neuron", "row", "element"})


def _is_group_fisher(tree) -> bool:
    """``{path: {group_type: values}}`` (second-level keys are group types), as opposed to a nested params tree."""
    if not isinstance(tree, Mapping) or not tree:
        return False
    return all(isinstance(v, Mapping) and v and set(v) <= _GROUP_TYPES for v in tree.values())


def group_means_to_params(
    group_fisher: Mapping[str, Mapping[str, Any]], layout: ModelLayout, sizes: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, np.ndarray]:
    """``{path: param-shaped}`` where each parameter holds its group's mean ``F_g / |g|``.

    Uses each leaf's primary group types (fused QKV: ``head_q/k/v``; else the first of head,
    channel, row, element). ``sizes`` defaults to :func:`fisherjax.fisher.groups.group_sizes`.
    """
    out = {}
    for path, groups in group_fisher.items():
        if path not in layout.specs:
            raise DataError(f"group Fisher has a parameter the model does not: {path!r}")
        leaf_sizes = (sizes or {}).get(path) or group_sizes(layout, path)
        means = {}
        for group_type in primary_group_types(layout, path, list(groups)):
            values = np.asarray(groups[group_type], np.float64)
            means[group_type] = values / np.maximum(np.asarray(leaf_sizes[group_type], np.float64), 1.0)
        out[path] = np.asarray(spread_groups(layout, path, means), np.float32)
    return out


def parameter_fisher(
    fisher: TaskFisher | Mapping, layout: ModelLayout | None = None, *, like: PyTree | None = None, source: str = "auto"
) -> PyTree:
    """A params-shaped per-parameter Fisher.

    Args:
      fisher: a :class:`TaskFisher`; a group Fisher ``{path: {group_type: values}}``; or a
        per-parameter Fisher already (flat ``{path: array}`` or nested), returned nested.
      layout: needed for group Fisher.
      like: a params tree; the result is checked to have its paths and shapes.
      source: for a TaskFisher, ``diagonal`` (its full diagonal ``Î``), ``groups`` (group means,
        see the module docstring) or ``auto`` (the diagonal where it has the leaf, else groups).

    Returns:
      nested dict of float32 arrays, ``F_k ≥ 0``.

    Raises:
      DataError: a parameter of ``like`` without Fisher, or shapes that differ.
      NumericalError: NaN, inf or negative Fisher.
    """
    if source not in SOURCES:
        raise ConfigError(f"source must be one of {SOURCES}, got {source!r}")
    if isinstance(fisher, TaskFisher):
        diagonal = dict(fisher.diagonal or {})
        if source == "diagonal" and not diagonal:
            raise DataError(f"task {fisher.task!r} has no diagonal Fisher (collect it with diagonal=True)")
        flat = {} if source == "diagonal" else _groups_to_params(fisher.group_fisher, fisher.group_sizes, layout)
        if source != "groups":
            flat.update({p: np.asarray(v, np.float32) for p, v in diagonal.items()})
        name = f"task {fisher.task!r}"
    elif _is_group_fisher(fisher):
        flat = _groups_to_params(fisher, None, layout)
        name = "the group Fisher"
    else:
        flat = flatten(fisher)
        name = "the Fisher"
    for path, value in flat.items():
        value = np.asarray(value)
        if not np.all(np.isfinite(value)) or np.any(value < 0):
            raise NumericalError(f"{name}: {path} has NaN, inf or negative values (a Fisher is finite and ≥ 0)")
    if like is not None:
        _check_same_leaves(flatten(like), flat, "parameters", name)
    return unflatten(flat)


def _groups_to_params(group_fisher, sizes, layout):
    if layout is None:
        raise ConfigError("a group Fisher needs the model's layout to be spread over parameters")
    return group_means_to_params(group_fisher, layout, sizes)


def _check_same_leaves(reference: Mapping[str, Any], other: Mapping[str, Any], ref_name: str, other_name: str) -> None:
    missing = sorted(set(reference) - set(other))
    extra = sorted(set(other) - set(reference))
    if missing or extra:
        raise DataError(f"{other_name} and the {ref_name} differ: missing {missing}, not in the {ref_name} {extra}")
    bad = [f"{p}: {np.shape(other[p])} vs {np.shape(reference[p])}" for p in reference if np.shape(other[p]) != np.shape(reference[p])]
    if bad:
        raise DataError(f"{other_name} has shapes unlike the {ref_name}: {bad}")


def _as_tree_like(tree: PyTree, reference: PyTree, name: str) -> PyTree:
    """``tree`` (flat or nested) restructured like ``reference`` after checking paths and shapes."""
    flat_tree, flat_ref = flatten(tree), flatten(reference)
    _check_same_leaves(flat_ref, flat_tree, "parameters", name)
    return jax.tree.unflatten(jax.tree.structure(reference), [flat_tree[p] for p in leaf_paths(reference)])


# ---- scale_by_fisher ----------------------------------------------------------------------


def scale_by_fisher(fisher: PyTree, eps: float = 1e-8) -> optax.GradientTransformation:
    """Optax transformation ``u ← u / (F + ε)`` (diagonal Fisher preconditioning).

    Args:
      fisher: per-parameter Fisher ``F ≥ 0`` shaped like the parameters (nested like them or flat
        ``{path: array}``; see :func:`parameter_fisher`).
      eps: ``ε > 0`` damping; a parameter with ``F = 0`` has its update scaled by ``1/ε``.

    Returns:
      ``optax.GradientTransformation`` with ``optax.EmptyState``. ``init`` checks that ``F`` has
      the parameters' paths and shapes.
    """
    if not eps > 0:
        raise ConfigError(f"scale_by_fisher needs eps > 0 (it keeps u / (F + eps) finite where F = 0), got {eps}")
    host = {p: np.asarray(v, np.float32) for p, v in flatten(fisher).items()}
    for path, value in host.items():
        if not np.all(np.isfinite(value)) or np.any(value < 0):
            raise NumericalError(f"scale_by_fisher: Fisher {path} has NaN, inf or negative values")
    fisher_flat = {p: jnp.asarray(v) for p, v in host.items()}

    def init_fn(params):
        _check_same_leaves(flatten(params), fisher_flat, "parameters", "the Fisher")
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        denominators = _as_tree_like(fisher_flat, updates, "the Fisher")
        return jax.tree.map(lambda u, f: (u / (f + eps)).astype(u.dtype), updates, denominators), state

    return optax.GradientTransformation(init_fn, update_fn)


# ---- EWC ----------------------------------------------------------------------------------


def ewc_penalty(params: PyTree, anchor: PyTree, fisher: PyTree, lam: float) -> Float[Array, ""]:
    """``Ω(θ) = λ/2 Σ_k F_k (θ_k − θ*_k)²`` over every leaf (a scalar; differentiable, jittable).

    ``params`` θ, ``anchor`` θ* and ``fisher`` F share one structure (``fisher`` may be flat).
    ``∇Ω = λ F ⊙ (θ − θ*)``.
    """
    fisher = _as_tree_like(fisher, params, "the Fisher")
    anchor = _as_tree_like(anchor, params, "the anchor")
    terms = jax.tree.map(lambda p, a, f: jnp.sum(f * jnp.square(p - a)), params, anchor, fisher)
    return 0.5 * lam * sum(jax.tree.leaves(terms))


def ewc_regulariser(anchor: PyTree, fisher: PyTree, lam: float) -> optax.GradientTransformation:
    """Optax transformation ``u ← u + λ F ⊙ (θ − θ*)``, the gradient of :func:`ewc_penalty`.

    Put it first in a chain so the optimiser sees ``∇(L + Ω)``:
    ``optax.chain(ewc_regulariser(θ*, F, λ), optax.adam(lr))``. Its ``update`` needs ``params``.
    """
    if lam < 0:
        raise ConfigError(f"the EWC strength λ must be ≥ 0, got {lam}")

    def init_fn(params):
        _check_same_leaves(flatten(params), flatten(fisher), "parameters", "the Fisher")
        _check_same_leaves(flatten(params), flatten(anchor), "parameters", "the anchor")
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ConfigError("ewc_regulariser needs params: call update(updates, state, params)")
        f = _as_tree_like(fisher, updates, "the Fisher")
        a = _as_tree_like(anchor, updates, "the anchor")
        new = jax.tree.map(lambda u, p, a_, f_: (u + lam * f_ * (p - a_)).astype(u.dtype), updates, params, a, f)
        return new, state

    return optax.GradientTransformation(init_fn, update_fn)


# ---- Fisher merging -----------------------------------------------------------------------


def fisher_merge(
    params_list: Sequence[PyTree],
    fishers: Sequence[TaskFisher | Mapping | PyTree],
    *,
    layout: ModelLayout | None = None,
    floor: float = 1e-8,
    coefficients: Sequence[float] | None = None,
    normalise: bool = False,
    source: str = "auto",
) -> PyTree:
    """Fisher-weighted average of models: ``θ = Σ_k c_k F̃_k θ_k / Σ_k c_k F̃_k``, ``F̃_k = max(F_k, floor)``.

    Args:
      params_list: ``K ≥ 1`` parameter trees of one architecture.
      fishers: ``K`` Fishers — each a :class:`TaskFisher`, a group Fisher ``{path: {group_type: values}}``
        (spread to group means; needs ``layout``) or a per-parameter tree (see :func:`parameter_fisher`).
      floor: ``> 0``; keeps the denominator positive, so where all ``F_k`` are below it the merge is
        the ``c``-weighted mean.
      coefficients: model weights ``c_k ≥ 0`` (default all 1).
      normalise: divide each ``F_k`` by its sum over all parameters first, so no model dominates by
        the overall scale of its Fisher.
      source: how a TaskFisher becomes per-parameter (:func:`parameter_fisher`).

    Returns:
      the merged parameters, structured and typed like ``params_list[0]``.
    """
    if not params_list:
        raise ConfigError("fisher_merge needs at least one model")
    if len(fishers) != len(params_list):
        raise ConfigError(f"fisher_merge got {len(params_list)} models and {len(fishers)} Fishers")
    if not floor > 0:
        raise ConfigError(f"fisher_merge needs floor > 0 (it keeps Σ F positive), got {floor}")
    coefficients = np.ones(len(params_list)) if coefficients is None else np.asarray(coefficients, np.float64)
    if coefficients.shape != (len(params_list),) or np.any(coefficients < 0) or coefficients.sum() <= 0:
        raise ConfigError(f"coefficients must be {len(params_list)} non-negative numbers, not all zero; got {coefficients}")
    reference = params_list[0]
    structure = jax.tree.structure(reference)
    for k, params in enumerate(params_list[1:], start=1):
        if jax.tree.structure(params) != structure:
            _check_same_leaves(flatten(reference), flatten(params), "parameters of model 0", f"model {k}")
            raise DataError(f"model {k} is nested differently from model 0")
        _check_same_leaves(flatten(reference), flatten(params), "parameters of model 0", f"model {k}")
    weights = []
    for fisher in fishers:
        tree = _as_tree_like(parameter_fisher(fisher, layout, like=reference, source=source), reference, "the Fisher")
        if normalise:
            total = sum(float(np.sum(x, dtype=np.float64)) for x in jax.tree.leaves(tree))
            if total <= 0:
                raise NumericalError("cannot normalise a Fisher that is zero everywhere")
            tree = jax.tree.map(lambda x, t=total: x / t, tree)
        weights.append(tree)
    return _merge(tuple(params_list), tuple(weights), jnp.asarray(coefficients, jnp.float32), floor)


@jax.jit
def _merge(params_list, weights, coefficients, floor):
    def leaf(*pairs):
        k = len(pairs) // 2
        thetas = jnp.stack([p.astype(jnp.float32) for p in pairs[:k]])
        fisher = jnp.maximum(jnp.stack([jnp.asarray(f, jnp.float32) for f in pairs[k:]]), floor)
        w = coefficients.reshape((-1,) + (1,) * (thetas.ndim - 1)) * fisher
        return ((w * thetas).sum(0) / w.sum(0)).astype(pairs[0].dtype)

    return jax.tree.map(leaf, *params_list, *weights)


# ---- per-layer merge weights ---------------------------------------------------------------


class MergeWeights(NamedTuple):
    """How a Fisher-weighted merge of two tasks would split each layer's parameters.

    ``layers [n]`` layer ids (:data:`~fisherjax.layout.OUTSIDE_LAYERS` for the parameters outside
    the stack); per layer ``mean_weight_a`` (mean of ``w_A = F̃_A / (F̃_A + F̃_B)``),
    ``dominated_by_a`` / ``dominated_by_b`` (fractions with ``w_A > dominance`` / ``w_A < 1 −
    dominance``) and ``count`` (parameters); ``total`` the same four over the whole model
    (``[mean_weight_a, dominated_by_a, dominated_by_b, count]``).
    """

    layers: np.ndarray
    mean_weight_a: np.ndarray
    dominated_by_a: np.ndarray
    dominated_by_b: np.ndarray
    count: np.ndarray
    total: np.ndarray


TALLY_ELEMENTS = 1 << 22
"""Weights :func:`merge_weights` forms at a time."""


def _weight_tallies(a, b, floor: float, dominance: float) -> np.ndarray:
    """``[rows, 4]``: per row of ``w = F̃_A / (F̃_A + F̃_B)`` (float64), ``Σ w``, ``#{w > dominance}``,
    ``#{w < 1 − dominance}`` and the count."""
    xa = np.maximum(np.asarray(a, np.float64), floor)
    xb = np.maximum(np.asarray(b, np.float64), floor)
    w = xa / (xa + xb)
    return np.stack([w.sum(1), (w > dominance).sum(1), (w < 1 - dominance).sum(1), np.full(len(w), w.shape[1])], 1)


def merge_weights(
    fisher_a: Mapping[str, np.ndarray], fisher_b: Mapping[str, np.ndarray], layout: ModelLayout, *, floor: float = 1e-8, dominance: float = 0.9
) -> MergeWeights:
    """Per-layer statistics of the merge weight ``w_A = F̃_A / (F̃_A + F̃_B)``, ``F̃ = max(F, floor)``,
    of two flat per-parameter Fishers (``{path: param-shaped}``, the paths both have).

    Tallied leaf row by leaf row (:meth:`~fisherjax.layout.ModelLayout.layer_rows`), in float64 on
    column blocks of at most :data:`TALLY_ELEMENTS` weights: no model-sized (or embedding-sized)
    array of weights or layer labels is ever built.
    """
    per_layer: dict[int, np.ndarray] = {}
    for path in (p for p in fisher_a if p in fisher_b):
        rows_a, row_layers = layout.layer_rows(path, np.asarray(fisher_a[path]))
        rows_b, _ = layout.layer_rows(path, np.asarray(fisher_b[path]))
        width = max(TALLY_ELEMENTS // len(rows_a), 1)
        tallies = sum(_weight_tallies(rows_a[:, s : s + width], rows_b[:, s : s + width], floor, dominance)
                      for s in range(0, rows_a.shape[1], width))
        for layer, tally in zip(row_layers.tolist(), tallies, strict=True):
            per_layer[layer] = per_layer.get(layer, 0) + tally
    layers = sorted(per_layer)
    table = np.stack([per_layer[layer] for layer in layers]).astype(np.float64)
    total = table.sum(0)
    return MergeWeights(
        np.array(layers), table[:, 0] / table[:, 3], table[:, 1] / table[:, 3], table[:, 2] / table[:, 3], table[:, 3].astype(np.int64),
        np.array([total[0] / total[3], total[1] / total[3], total[2] / total[3], total[3]]),
    )


# ---- K-FAC: preconditioning and EWC -------------------------------------------------------------


class ScaleByKFACState(NamedTuple):
    """State of :func:`scale_by_kfac`: ``count`` (updates seen), ``factors`` (``{key: (A, G)}``,
    the running factors; empty without refresh) and ``eigen`` (the eigenbasis the updates are
    preconditioned in)."""

    count: Array
    factors: dict
    eigen: KFACEigen


def _eigen_of_factors(eigen: KFACEigen, factors: Mapping) -> KFACEigen:
    """``eigen`` (its keys, counts and names) with every factor's eigendecomposition recomputed."""
    fresh = {k: eigen_of(KroneckerFactor(*factors[k], e.kernel, e.bias, e.block)) for k, e in eigen.factors.items()}
    return dataclasses.replace(eigen, factors=fresh)


def scale_by_kfac(
    kfac_or_eigen: KFAC | KFACEigen,
    damping: float,
    *,
    diagonal: PyTree | None = None,
    model=None,
    refresh_every: int | None = None,
    decay: float = 0.95,
    layout: ModelLayout | None = None,
    key: jax.Array | None = None,
    true_samples: int = 1,
) -> optax.GradientTransformationExtraArgs:
    """Optax transformation ``u ← (A ⊗ G + λI)⁻¹ u`` on every K-FAC-covered kernel (bias as its
    last row; the exact inverse in the Kronecker eigenbasis,
    :func:`~fisherjax.curvature.kfac.kfac_inverse_product`, EK-FAC's ``S + λ`` for a refit
    eigendecomposition), ``u / (F_diag + λ)`` on the other leaves when ``diagonal`` is given,
    else ``u / λ``: chain it before a learning rate, ``optax.chain(scale_by_kfac(kfac, 1e-3),
    optax.sgd(lr))``.

    Args:
      kfac_or_eigen: a :class:`~fisherjax.curvature.factors.KFAC` (decomposed here) or its
        :class:`~fisherjax.curvature.kfac.KFACEigen`.
      damping: ``λ > 0``.
      diagonal: per-parameter Fisher for the uncovered leaves (nested or flat, e.g.
        :func:`parameter_fisher`).
      model, refresh_every, decay: with both set, every ``refresh_every``-th update (steps
        ``refresh_every``, ``2·refresh_every``, …, before preconditioning that step's update)
        replaces the factors by ``decay · old + (1 − decay) · factors of the batch`` given as
        ``update(..., params=params, batch=batch)`` (a :class:`~fisherjax.data.Batch`, at the
        current params, the Fisher type of ``kfac_or_eigen``) and recomputes the
        eigendecomposition. Both run inside the update (``jax.lax.cond``), so the update jits; a
        batch in which no sample predicts a token leaves the factors as they were.
      layout: the model's layout (default ``model.layout``); needed for fused QKV kernels.
      key, true_samples: the true Fisher's draws on refresh (key folded with the step count).

    Returns:
      ``optax.GradientTransformationExtraArgs`` with :class:`ScaleByKFACState`.
    """
    if not damping > 0:
        raise ConfigError(f"scale_by_kfac needs damping > 0 (it keeps (A⊗G + λI) invertible), got {damping}")
    eigen = decompose(kfac_or_eigen) if isinstance(kfac_or_eigen, KFAC) else kfac_or_eigen
    layout = layout if layout is not None else (model.layout if model is not None else None)
    refresh = refresh_every is not None
    if refresh:
        if model is None:
            raise ConfigError("scale_by_kfac refreshes factors from batches: pass model= along with refresh_every=")
        if not (isinstance(refresh_every, int) and refresh_every >= 1):
            raise ConfigError(f"scale_by_kfac refresh_every must be an integer ≥ 1, got {refresh_every!r}")
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"scale_by_kfac decay must be in [0, 1), got {decay}")
        if eigen.refit:
            raise ConfigError("scale_by_kfac cannot refresh EK-FAC scales (a refit needs its own pass): pass the K-FAC factors")
        if eigen.fisher_type == "true" and key is None:
            raise ConfigError("scale_by_kfac refreshes a true Fisher: pass a PRNG key (key=jax.random.key(seed))")
    given = kfac_or_eigen if isinstance(kfac_or_eigen, KFAC) else factors_of(eigen)
    start = {k: (f.inputs, f.outputs) for k, f in given.factors.items()} if refresh else {}
    draw_key = key if key is not None else jax.random.key(0)

    def init_fn(params):
        del params
        return ScaleByKFACState(jnp.zeros((), jnp.int32), start, eigen)

    def refreshed(state: ScaleByKFACState, count, params, batch) -> tuple[dict, KFACEigen]:
        def run(operand):
            factors, _ = operand
            sums = batch_factor_sums(model, params, *batch[:4], jax.random.fold_in(draw_key, count),
                                     fisher_type=eigen.fisher_type, true_samples=true_samples)
            n = sums.samples
            new = {k: tuple(jnp.where(n > 0, decay * old + (1.0 - decay) * s / jnp.maximum(n, 1), old)
                            for old, s in zip(factors[k], sums.factors[k])) for k in factors}
            return new, _eigen_of_factors(eigen, new)

        return jax.lax.cond(count % refresh_every == 0, run, lambda operand: operand, (state.factors, state.eigen))

    def update_fn(updates, state, params=None, *, batch=None, **extra_args):
        del extra_args
        count = state.count + 1
        factors, current = state.factors, state.eigen
        if refresh:
            if params is None or batch is None:
                raise ConfigError("scale_by_kfac with refresh_every needs update(updates, state, params, batch=batch)")
            factors, current = refreshed(state, count, params, batch)
        new = kfac_inverse_product(current, layout, updates, damping, diagonal)
        return _as_tree_like(new, updates, "the preconditioned updates"), ScaleByKFACState(count, factors, current)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ewc_kfac_penalty(
    params: PyTree, anchor: PyTree, kfac: KFAC, lam: float, diagonal: PyTree | None = None, *, layout: ModelLayout | None = None
) -> Float[Array, ""]:
    """K-FAC EWC: ``Ω(θ) = λ/2 Σ_sites tr(Δ̄ᵀ A Δ̄ G)`` with ``Δ̄`` the kernel's ``θ − θ*`` (bias as
    its last row, a fused QKV kernel per block), plus ``λ/2 Σ_k F_k Δ_k²`` on the uncovered leaves
    when ``diagonal`` is given (a scalar; differentiable, jittable). ``∇Ω = λ (A Δ̄ G ⊕ F ⊙ Δ)``.
    ``layout``: needed for fused QKV kernels.
    """
    anchor = _as_tree_like(anchor, params, "the anchor")
    delta = flatten(jax.tree.map(lambda p, a: p - a, params, anchor))
    product = kfac_vector_product(kfac, layout, delta, diagonal)
    return 0.5 * lam * sum(jnp.vdot(delta[p], product[p]) for p in delta)


def ewc_kfac_regulariser(
    anchor: PyTree, kfac: KFAC, lam: float, diagonal: PyTree | None = None, *, layout: ModelLayout | None = None
) -> optax.GradientTransformation:
    """Optax transformation ``u ← u + λ (A Δ̄ G ⊕ F ⊙ Δ)``, ``Δ = θ − θ*``: the gradient of
    :func:`ewc_kfac_penalty`, to put first in a chain like :func:`ewc_regulariser`. Its ``update``
    needs ``params``."""
    if lam < 0:
        raise ConfigError(f"the EWC strength λ must be ≥ 0, got {lam}")

    def init_fn(params):
        _check_same_leaves(flatten(params), flatten(anchor), "parameters", "the anchor")
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ConfigError("ewc_kfac_regulariser needs params: call update(updates, state, params)")
        a = _as_tree_like(anchor, params, "the anchor")
        pull = _as_tree_like(kfac_vector_product(kfac, layout, jax.tree.map(lambda p, a_: p - a_, params, a), diagonal), updates, "the EWC gradient")
        return jax.tree.map(lambda u, g: (u + lam * g).astype(u.dtype), updates, pull), state

    return optax.GradientTransformation(init_fn, update_fn)
