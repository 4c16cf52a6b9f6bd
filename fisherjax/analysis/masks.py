"""Phase 3: pruning masks — keep what a task's Fisher says matters, drop the rest.

A mask is a params-shaped boolean pytree (``True`` = keep) with the same nested structure as
``model.params``, so :func:`apply_mask` is one ``tree_map``. It is built from *unit* scores:

=============  ========================================================================  =========
unit           score (group Fisher, :mod:`fisherjax.analysis.importance`)                removes
=============  ========================================================================  =========
``head``       ``F_head[ℓ, h] = F^q + F^o + (F^k + F^v)[κ(h)] / G`` (query heads)        Q columns and q bias of h, O rows of h;
                                                                                         K/V of kv head j once *all* query heads reading j are gone
``kv_head``    ``F_kv_head[ℓ, j] = F^k + F^v + Σ_{κ(h)=j} (F^q + F^o)`` (GQA groups)     kv head j with all its query heads
``neuron``     ``Σ`` of the MLP in/gate ``channel`` groups, the out ``neuron`` group    in/gate columns (and biases), out rows
               and the in/gate bias elements of intermediate unit f
``channel``    each MLP kernel's ``channel`` groups (output channels), per leaf         that kernel's column (and bias)
``parameter``  the full diagonal ``Î`` (``TaskFisher.diagonal``), unstructured         single parameters
=============  ========================================================================  =========

Criterion. ``criterion="fisher"`` (default) ranks units by the group Fisher above — how sensitive
the loss is to moving the unit's parameters. ``criterion="saliency"`` ranks them by
``½ Σ_{k∈unit} Î_k θ_k²``, the second-order (optimal-brain-damage) estimate of the loss increase
from *zeroing* the unit with the diagonal Fisher as curvature; it needs ``TaskFisher.diagonal``
and the parameters (:func:`saliency_fisher`), and is then combined across Q/K/V/O exactly like the
Fisher.

Under grouped-query attention a kv head serves ``G = H / H_kv`` query heads, so the ``head``
unit never removes a kv head that a kept query head still reads; use ``kv_head`` to prune whole
GQA groups. All head slicing goes through :meth:`ModelLayout.view` / :meth:`ModelLayout.unview`
(:func:`~fisherjax.analysis.importance.spread_groups`), so fused QKV and GQA need no special case.

Threshold. For ``n`` units and target sparsity ``s`` the ``k = ⌊s·n + ½⌋`` lowest-scoring units
are pruned — a quantile threshold at the k-th smallest score, with ties at the threshold broken
by table order (layer, then index) so the count is exact: the achieved sparsity is within half a
unit of the target. ``scope="global"`` ranks all units of the model together, ``scope="layer"``
ranks each layer's units separately (non-layer parameters — embeddings, final norm, unembedding —
are their own "layer" ``-1`` for ``parameter`` masks). ``s = 0`` keeps everything, ``s = 1`` prunes
everything; a Fisher that is constant over the units to rank (e.g. all zero) has no ranking and
is an error for ``0 < k < n``.

:func:`head_pruning_experiment` measures what Fisher-guided head pruning costs each task, against
random pruning of the same number of heads.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, PyTree

from fisherjax.analysis.importance import _stack_layers, head_importance, spread_groups
from fisherjax.errors import ConfigError, DataError, NumericalError
from fisherjax.fisher.state import TaskFisher
from fisherjax.layout import ModelLayout, Role, flatten, unflatten

UNITS = ("head", "kv_head", "neuron", "channel", "parameter")
STRUCTURED_UNITS = ("head", "kv_head", "neuron", "channel")
SCOPES = ("global", "layer")
CRITERIA = ("fisher", "saliency")
DEFAULT_SPARSITIES = (0.5, 0.7, 0.9)
_MLP_INPUT_ROLES = (Role.MLP_IN, Role.MLP_GATE)


@dataclasses.dataclass(frozen=True)
class Mask:
    """A pruning mask and the unit decisions behind it.

    Attributes:
      tree: params-shaped nested dict of bool arrays (``True`` = keep).
      unit: one of :data:`UNITS`; scope: ``global`` or ``layer``; target_sparsity: ``s``.
      keep: unit decisions — ``{"head": [L, H]}``, ``{"kv_head": [L, H_kv]}``, ``{"neuron": [L, F]}``,
        ``{path: [L, d_out]}`` per MLP kernel for ``channel``, ``{path: param-shaped}`` for ``parameter``.
      scores: the scores ranked, same keys and shapes as ``keep``.
      task: the task whose Fisher made the mask (None for random masks).
    """

    tree: dict
    unit: str
    scope: str
    target_sparsity: float
    keep: Mapping[str, np.ndarray]
    scores: Mapping[str, np.ndarray]
    task: str | None = None

    @property
    def n_units(self) -> int:
        return int(sum(k.size for k in self.keep.values()))

    @property
    def n_pruned(self) -> int:
        return int(sum((~k).sum() for k in self.keep.values()))

    @property
    def sparsity(self) -> float:
        """Achieved sparsity in units: pruned units / units."""
        return self.n_pruned / max(self.n_units, 1)

    @property
    def param_sparsity(self) -> float:
        """Achieved sparsity in parameters over the whole tree."""
        leaves = jax.tree.leaves(self.tree)
        return float(sum(int((~np.asarray(x)).sum()) for x in leaves) / max(sum(x.size for x in leaves), 1))


# ---- thresholds ---------------------------------------------------------------------------


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"mask {name} must be one of {allowed}, got {value!r}")


def pruned_count(sparsity: float, n: np.ndarray | int) -> np.ndarray:
    """``k = ⌊s·n + ½⌋`` units to prune of ``n`` (round half up)."""
    return np.floor(sparsity * np.asarray(n) + 0.5).astype(np.int64)


_SELECTION_ABOVE = 1 << 20  # scores; above this, selection (O(n) per group) beats one stable sort


def keep_highest(
    scores: Float[Array, " n"], groups: np.ndarray, sparsity: float, *, what: str = "scores"
) -> Bool[Array, " n"]:
    """Keep all but the ``⌊s·n_g + ½⌋`` lowest scores within each group ``g``.

    ``groups`` ``[n]`` int labels (e.g. layer, or one label for a global threshold). Ties are broken
    by position (the earlier of two equal scores is pruned first), so each group loses exactly its
    count. :func:`keep_highest_each` at one sparsity.

    Raises:
      ConfigError: ``s`` outside ``[0, 1]``.
      NumericalError: NaN scores, or scores that are all equal in a group that must be split.
    """
    return keep_highest_each(scores, groups, (sparsity,), what=what)[0]


def keep_highest_each(
    scores: Float[Array, " n"], groups: np.ndarray, sparsities: Sequence[float], *, what: str = "scores"
) -> Bool[np.ndarray, "levels n"]:
    """:func:`keep_highest` at every sparsity in ``sparsities`` from one ranking.

    Small inputs (many small groups: random draws × layers × heads) are ranked with one stable
    ``np.lexsort``; large ones (a diagonal Fisher of every parameter) by one selection per group
    (``np.partition`` with every level's k finds all k-th smallest scores in one O(n) pass), which
    gives the same masks. Scores are ranked in their own dtype (float32 or float64; an upcast
    changes no order), so a diagonal of every parameter is not copied to float64.

    Raises:
      ConfigError: a sparsity outside ``[0, 1]``.
      NumericalError: NaN scores, or scores that are all equal in a group that some level must split.
    """
    for sparsity in sparsities:
        if not 0.0 <= sparsity <= 1.0:
            raise ConfigError(f"sparsity must be in [0, 1], got {sparsity}")
    scores = np.asarray(scores).reshape(-1)
    if scores.dtype not in (np.float32, np.float64):
        scores = scores.astype(np.float64)
    groups = np.asarray(groups).reshape(-1)
    if np.isnan(scores).any():
        raise NumericalError(f"{what} contain NaN")
    prune = _pruned_by_sorting if len(scores) <= _SELECTION_ABOVE else _pruned_by_selection
    pruned, flat = prune(scores, groups, tuple(sparsities))
    if flat:
        value, size, k = flat
        raise NumericalError(
            f"{what} are all equal ({value}) within a group of {size}; "
            f"pruning {k} of them would be arbitrary (an all-zero Fisher has no ranking)"
        )
    return ~pruned


def _pruned_by_sorting(scores: np.ndarray, groups: np.ndarray, sparsities: tuple[float, ...]):
    """``(pruned [levels, n] bool, flat)`` from one stable sort by (group, score); ``flat`` names the
    first group whose scores are all equal but must be split at some level (``()`` if none)."""
    order = np.lexsort((scores, groups))
    _, starts, counts = np.unique(groups[order], return_index=True, return_counts=True)
    k = np.stack([pruned_count(s, counts) for s in sparsities])  # [levels, groups]
    splits = (k > 0) & (k < counts)  # levels that must divide a group
    if splits.any():
        lo = np.minimum.reduceat(scores[order], starts)
        hi = np.maximum.reduceat(scores[order], starts)
        flat = np.flatnonzero(splits.any(0) & (lo == hi))
        if len(flat):
            g = flat[0]
            return None, (lo[g], counts[g], k[splits[:, g], g][0])
    group_of = np.repeat(np.arange(len(counts)), counts)
    position = np.arange(len(order)) - starts[group_of]
    pruned = np.empty((len(sparsities), len(order)), bool)
    pruned[:, order] = position[None] < k[:, group_of]
    return pruned, ()


def _pruned_by_selection(scores: np.ndarray, groups: np.ndarray, sparsities: tuple[float, ...]):
    """The same as :func:`_pruned_by_sorting`, group by group: the k-th smallest score ``t`` of
    every level by one selection; every score below ``t`` is pruned, and of those equal to ``t``
    the earliest."""
    single = bool(np.all(groups == groups[0])) if len(groups) else True
    members = [None] if single else np.split(*_grouped_positions(groups))
    pruned = np.zeros((len(sparsities), len(scores)), bool)
    for index in members:
        group_scores = scores if index is None else scores[index]
        size = len(group_scores)
        ks = [int(pruned_count(s, size)) for s in sparsities]
        splits = [k for k in ks if 0 < k < size]  # levels that must divide the group
        if splits and group_scores.min() == group_scores.max():
            return None, (group_scores[0], size, splits[0])
        interior = sorted({k - 1 for k in splits})
        thresholds = dict(zip(interior, np.partition(group_scores, interior)[interior], strict=True)) if interior else {}
        for level, k in enumerate(ks):
            if k == 0:
                continue
            if k == size:
                below = np.ones(size, bool)
            else:
                below = group_scores < thresholds[k - 1]
                ties = np.flatnonzero(group_scores == thresholds[k - 1])[: k - int(np.count_nonzero(below))]
                below[ties] = True
            if index is None:
                pruned[level] = below
            else:
                pruned[level, index[below]] = True
    return pruned, ()


def _grouped_positions(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions ordered by group (increasing within a group), and where each group after the first starts."""
    order = np.argsort(groups, kind="stable")
    starts = np.flatnonzero(np.diff(groups[order])) + 1
    return order, starts


def _keep_matrix(scores: np.ndarray, sparsity: float, scope: str, what: str) -> np.ndarray:
    """``keep_highest`` on ``[..., L, U]`` scores: per layer, or over all units; leading axes are independent draws."""
    lead = scores.shape[:-2]
    draws = int(np.prod(lead, dtype=np.int64))
    layers, units = scores.shape[-2:]
    draw_id = np.repeat(np.arange(draws), layers * units)
    layer_id = np.tile(np.repeat(np.arange(layers), units), draws)
    groups = draw_id * layers + layer_id if scope == "layer" else draw_id
    return keep_highest(scores, groups, sparsity, what=what).reshape(scores.shape)


# ---- unit scores --------------------------------------------------------------------------


def _mlp_bias_of(layout: ModelLayout, kernel_path: str) -> str | None:
    bias = kernel_path.rsplit("/", 1)[0] + "/bias"
    return bias if bias in layout.specs else None


def _group(fisher: TaskFisher, path: str, group_type: str) -> np.ndarray:
    groups = fisher.group_fisher.get(path)
    if groups is None or group_type not in groups:
        raise DataError(f"task {fisher.task!r} has no {group_type!r} group Fisher for {path}")
    return np.asarray(groups[group_type], np.float64)


def _mlp_paths(layout: ModelLayout) -> dict[Role, list[str]]:
    paths = {role: layout.paths(role, "kernel") for role in (*_MLP_INPUT_ROLES, Role.MLP_OUT)}
    if not paths[Role.MLP_IN] or not paths[Role.MLP_OUT]:
        raise ConfigError("the model's layout has no MLP in/out kernels to prune neurons of")
    return paths


def saliency_fisher(fisher: TaskFisher, params: PyTree, layout: ModelLayout) -> TaskFisher:
    """The same task with every group value replaced by its saliency ``½ Σ_{k∈g} Î_k θ_k²``.

    Group sums of the elementwise ``½ Î ⊙ θ²`` (:func:`fisherjax.fisher.groups.groups_of_elementwise`),
    for every leaf of ``fisher.diagonal``; the result feeds :func:`unit_scores` unchanged.

    Raises:
      DataError: no diagonal, or a diagonal leaf the parameters lack or shape differently.
    """
    from fisherjax.fisher.groups import groups_of_elementwise

    if not fisher.diagonal:
        raise DataError(f"task {fisher.task!r} has no diagonal Fisher; the saliency criterion needs it (collect with diagonal=True)")
    flat = flatten(params)
    groups = {}
    for path, diag in fisher.diagonal.items():
        if path not in flat or tuple(np.shape(flat[path])) != tuple(np.shape(diag)):
            raise DataError(f"task {fisher.task!r}: diagonal Fisher {path} has no parameter of its shape")
        elementwise = 0.5 * np.asarray(diag, np.float64) * np.square(np.asarray(flat[path], np.float64))
        groups[path] = {k: np.asarray(v) for k, v in groups_of_elementwise(layout, path, elementwise).items()}
    return dataclasses.replace(fisher, group_fisher=groups, diagonal=None, sample_grads=None, per_sample_groups=None)


def _criterion_fisher(fisher: TaskFisher, layout: ModelLayout, criterion: str, params) -> TaskFisher:
    _check_choice("criterion", criterion, CRITERIA)
    if criterion == "fisher":
        return fisher
    if params is None:
        raise ConfigError("the saliency criterion needs the parameters (params=...)")
    return saliency_fisher(fisher, params, layout)


def unit_scores(fisher: TaskFisher, layout: ModelLayout, unit: str) -> dict[str, np.ndarray]:
    """Scores of the structured units (module table), each ``[L, units]``.

    ``head`` → ``{"head": F_head}``, ``kv_head`` → ``{"kv_head": F_kv_head}``, ``neuron`` →
    ``{"neuron": Σ_in/gate channel + out neuron + in/gate bias}``, ``channel`` → ``{path: channel}``
    for each MLP kernel.
    """
    _check_choice("unit", unit, STRUCTURED_UNITS)
    if unit in ("head", "kv_head"):
        heads = head_importance(fisher, layout)
        return {unit: heads.head if unit == "head" else heads.kv_head}
    paths = _mlp_paths(layout)
    if unit == "neuron":
        total = _stack_layers(layout, paths[Role.MLP_OUT], lambda p: _group(fisher, p, "neuron"))
        for role in _MLP_INPUT_ROLES:
            if paths[role]:
                total = total + _stack_layers(layout, paths[role], lambda p: _group(fisher, p, "channel"))
                biases = [_mlp_bias_of(layout, p) for p in paths[role]]
                if all(biases):
                    total = total + _stack_layers(layout, biases, lambda p: _group(fisher, p, "element"))
        return {"neuron": total}
    kernels = [p for role in (*_MLP_INPUT_ROLES, Role.MLP_OUT) for p in paths[role]]
    if not all(layout.spec(p).layered for p in kernels):
        raise ConfigError("channel masks need layer-stacked MLP kernels")
    return {p: _group(fisher, p, "channel") for p in kernels}


# ---- unit decisions → params-shaped trees ------------------------------------------------


def _ones_tree(layout: ModelLayout, lead: tuple[int, ...], xp) -> dict[str, object]:
    return {p: xp.ones((*lead, *s.shape), bool) for p, s in layout.specs.items()}


def _layer_slice(layout: ModelLayout, path: str, values):
    """A ``[..., L, units]`` decision restricted to one leaf (all layers if stacked, its own layer if not)."""
    spec = layout.spec(path)
    return values if spec.layered else values[..., spec.layer, :]


def kv_keep_of(layout: ModelLayout, head_keep: Bool[Array, "... layer heads"]) -> Bool[Array, "... layer kv_heads"]:
    """A kv head is kept while any query head reading it is kept: ``any_{h: κ(h)=j} keep[h]``."""
    xp = jnp if isinstance(head_keep, jax.Array) else np
    onehot = xp.asarray(layout.kv_head_of[:, None] == np.arange(layout.num_kv_heads)[None, :], dtype=xp.float32)
    return (head_keep.astype(xp.float32) @ onehot) > 0


def mask_tree(layout: ModelLayout, unit: str, keep: Mapping[str, object]) -> dict:
    """Params-shaped bool tree from unit decisions (module table).

    ``keep`` as in :attr:`Mask.keep`; arrays may carry leading axes (e.g. random draws
    ``[n, L, H]``), which every leaf of the returned tree then carries too. Works on numpy and jax
    arrays (inside ``jit``). Leaves no unit touches are all ``True``.
    """
    _check_choice("unit", unit, UNITS)
    if unit == "parameter":
        first_path, first = next(iter(keep.items()))
        lead = first.shape[: first.ndim - len(layout.spec(first_path).shape)]
        xp = jnp if isinstance(first, jax.Array) else np
        flat = _ones_tree(layout, lead, xp)
        flat.update({p: keep[p] for p in keep})
        return unflatten(flat)
    first = next(iter(keep.values()))
    xp = jnp if isinstance(first, jax.Array) else np
    lead = first.shape[:-2]
    flat = _ones_tree(layout, lead, xp)
    if unit in ("head", "kv_head"):
        if unit == "head":
            head_keep = keep["head"]
            kv_keep = kv_keep_of(layout, head_keep)
        else:
            kv_keep = keep["kv_head"]
            head_keep = kv_keep[..., layout.kv_head_of]
        per_block = {"q": head_keep, "o": head_keep, "k": kv_keep, "v": kv_keep}
        groups: dict[str, dict[str, object]] = {}
        for block, kind in layout.attention_blocks():
            for path in layout.block_sources(block, kind):
                key = f"head_{block}" if layout.spec(path).role == Role.QKV else "head"
                groups.setdefault(path, {})[key] = _layer_slice(layout, path, per_block[block])
        for path, values in groups.items():
            flat[path] = spread_groups(layout, path, values, fill=True)
    elif unit == "neuron":
        paths = _mlp_paths(layout)
        neuron_keep = keep["neuron"]
        for role in _MLP_INPUT_ROLES:
            for path in paths[role]:
                flat[path] = spread_groups(layout, path, {"channel": _layer_slice(layout, path, neuron_keep)})
                bias = _mlp_bias_of(layout, path)
                if bias:
                    flat[bias] = spread_groups(layout, bias, {"element": _layer_slice(layout, bias, neuron_keep)})
        for path in paths[Role.MLP_OUT]:
            flat[path] = spread_groups(layout, path, {"neuron": _layer_slice(layout, path, neuron_keep)})
    else:  # channel
        for path, channel_keep in keep.items():
            flat[path] = spread_groups(layout, path, {"channel": channel_keep})
            bias = _mlp_bias_of(layout, path)
            if bias:
                flat[bias] = spread_groups(layout, bias, {"element": channel_keep})
    return unflatten(flat)


# ---- masks --------------------------------------------------------------------------------


def _keep_units(scores: Mapping[str, np.ndarray], sparsity: float, scope: str, what: str) -> dict[str, np.ndarray]:
    """Threshold several ``[..., L, U_i]`` score arrays together (concatenated along units)."""
    names = list(scores)
    widths = np.cumsum([scores[n].shape[-1] for n in names])[:-1]
    joined = np.concatenate([np.asarray(scores[n], np.float64) for n in names], axis=-1)
    keep = _keep_matrix(joined, sparsity, scope, what)
    return dict(zip(names, np.split(keep, widths, axis=-1), strict=True))


def structured_mask(
    fisher: TaskFisher,
    layout: ModelLayout,
    sparsity: float,
    *,
    unit: str = "head",
    scope: str = "global",
    criterion: str = "fisher",
    params: PyTree | None = None,
) -> Mask:
    """Prune the lowest-Fisher structured units (module table and threshold rule).

    Args:
      fisher: the task's Fisher (group Fisher only is needed).
      layout: the model's layout.
      sparsity: target fraction ``s`` of units to prune, in ``[0, 1]``.
      unit: ``head`` (query heads), ``kv_head`` (GQA groups), ``neuron`` (MLP intermediate units)
        or ``channel`` (each MLP kernel's output channels).
      scope: ``global`` (one threshold over all layers) or ``layer`` (``s`` of each layer's units).
      criterion: ``fisher`` (group Fisher) or ``saliency`` (``½ Σ Î θ²``, needs ``params`` and the
        diagonal).
      params: the parameters, for the saliency criterion.

    Returns:
      :class:`Mask` with ``tree`` params-shaped, ``keep`` / ``scores`` ``[L, units]`` per unit family.
    """
    _check_choice("unit", unit, STRUCTURED_UNITS)
    _check_choice("scope", scope, SCOPES)
    scores = unit_scores(_criterion_fisher(fisher, layout, criterion, params), layout, unit)
    keep = _keep_units(scores, sparsity, scope, f"task {fisher.task!r} {unit} Fisher scores")
    return Mask(mask_tree(layout, unit, keep), unit, scope, float(sparsity), keep, scores, fisher.task)


def unstructured_mask(fisher: TaskFisher, layout: ModelLayout, sparsity: float, *, scope: str = "global") -> Mask:
    """Prune single parameters with the lowest diagonal Fisher ``Î`` (``fisher.diagonal``).

    ``k = ⌊s·N + ½⌋`` of the ``N`` parameters in the diagonal (per layer with ``scope="layer"``,
    the non-layer parameters being one more group). Leaves absent from the diagonal are kept.
    :func:`unstructured_masks` at one sparsity.

    Raises:
      DataError: the TaskFisher has no diagonal (collect it with ``diagonal=True``).
    """
    return unstructured_masks(fisher, layout, (sparsity,), scope=scope)[0]


def unstructured_masks(fisher: TaskFisher, layout: ModelLayout, sparsities: Sequence[float], *, scope: str = "global") -> tuple[Mask, ...]:
    """:func:`unstructured_mask` at every sparsity in ``sparsities``, from one ranking of the
    diagonal (:func:`keep_highest_each`); the masks share one ``scores`` mapping (the diagonal as
    stored, not a copy). For a diagonal of every parameter this is the expensive part of Phase 3:
    GPT-2-small's 124 M entries cost one selection per task here instead of one per sparsity.
    """
    _check_choice("scope", scope, SCOPES)
    if not fisher.diagonal:
        raise DataError(f"task {fisher.task!r} has no diagonal Fisher; unstructured masks need it (collect with diagonal=True)")
    paths = [p for p in layout.specs if p in fisher.diagonal]
    unknown = sorted(set(fisher.diagonal) - set(layout.specs))
    if unknown:
        raise DataError(f"task {fisher.task!r}: diagonal Fisher has parameters the model does not: {unknown}")
    values = {p: np.asarray(fisher.diagonal[p]) for p in paths}
    for p, v in values.items():
        if v.shape != layout.spec(p).shape:
            raise DataError(f"task {fisher.task!r}: diagonal Fisher {p} has shape {v.shape}, the parameter {layout.spec(p).shape}")
    flat_scores = np.concatenate([v.reshape(-1) for v in values.values()])
    if scope == "layer":
        groups = np.concatenate([np.repeat(ids, rows.shape[1]) for rows, ids in (layout.layer_rows(p, v) for p, v in values.items())])
    else:
        groups = np.zeros(len(flat_scores), np.int8)
    keep_levels = keep_highest_each(flat_scores, groups, sparsities, what=f"task {fisher.task!r} diagonal Fisher")
    del flat_scores, groups
    sizes = np.cumsum([v.size for v in values.values()])[:-1]
    out = []
    for sparsity, keep_flat in zip(sparsities, keep_levels, strict=True):
        keep = {p: k.reshape(values[p].shape) for p, k in zip(paths, np.split(keep_flat, sizes), strict=True)}
        out.append(Mask(mask_tree(layout, "parameter", keep), "parameter", scope, float(sparsity), keep, values, fisher.task))
    return tuple(out)


def apply_mask(params: PyTree, mask: Mask | PyTree) -> PyTree:
    """``θ ⊙ m``: zero every parameter the mask drops (``jnp.where(m, θ, 0)`` leaf by leaf).

    ``mask`` is a :class:`Mask` or a bool tree with the structure of ``params``.
    """
    tree = mask.tree if isinstance(mask, Mask) else mask
    if jax.tree.structure(tree) != jax.tree.structure(params):
        missing = sorted(set(flatten(params)) ^ set(flatten(tree)))
        raise ConfigError(f"mask and params have different structures (differing leaves: {missing or 'same paths, different nesting'})")
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), p.dtype)), params, tree)


# ---- statistics ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SparsityStats:
    """Pruned parameters per layer and per role.

    Attributes:
      layers: ``[n]`` layer ids (``-1`` = outside the layer stack); pruned, total: ``[n]`` counts;
      fraction: ``pruned / total``; by_role: ``{role: (pruned, total)}``.
    """

    layers: np.ndarray
    pruned: np.ndarray
    total: np.ndarray
    fraction: np.ndarray
    by_role: Mapping[str, tuple[int, int]]


def sparsity_stats(mask: Mask | PyTree, layout: ModelLayout) -> SparsityStats:
    """Per-layer and per-role parameter sparsity of a mask.

    Counted per layer row of each leaf (:meth:`~fisherjax.layout.ModelLayout.layer_rows`,
    ``np.count_nonzero``), then summed per layer with ``np.bincount``.
    """
    flat = flatten(mask.tree if isinstance(mask, Mask) else mask)
    layer_ids, pruned, total, by_role = [], [], [], {}
    for path, keep in flat.items():
        keep = np.asarray(keep)
        rows, ids = layout.layer_rows(path, keep)
        dropped = rows.shape[1] - np.count_nonzero(rows, axis=1)
        layer_ids.append(ids)
        pruned.append(dropped)
        total.append(np.full(len(rows), rows.shape[1]))
        role = layout.spec(path).role.value
        p, t = by_role.get(role, (0, 0))
        by_role[role] = (p + int(dropped.sum()), t + keep.size)
    layers, position = np.unique(np.concatenate(layer_ids), return_inverse=True)
    n_total = np.bincount(position, weights=np.concatenate(total)).astype(np.int64)
    n_pruned = np.bincount(position, weights=np.concatenate(pruned)).astype(np.int64)
    return SparsityStats(layers, n_pruned, n_total, n_pruned / n_total, by_role)


def _mask_summary(mask: Mask, layout: ModelLayout) -> dict:
    stats = sparsity_stats(mask, layout)
    out = {
        "unit": mask.unit,
        "scope": mask.scope,
        "target_sparsity": mask.target_sparsity,
        "achieved_sparsity": mask.sparsity,
        "param_sparsity": mask.param_sparsity,
        "n_units": mask.n_units,
        "n_pruned": mask.n_pruned,
        "layers": {"layer": stats.layers.tolist(), "pruned": stats.pruned.tolist(), "total": stats.total.tolist(), "fraction": stats.fraction.tolist()},
        "by_role": {r: {"pruned": p, "total": t, "fraction": p / t if t else 0.0} for r, (p, t) in stats.by_role.items()},
    }
    if mask.unit != "parameter":
        out["units_pruned_per_layer"] = np.sum([(~k).sum(-1) for k in mask.keep.values()], axis=0).tolist()
        kept_scores = np.concatenate([np.asarray(s)[k] for s, k in zip(mask.scores.values(), mask.keep.values(), strict=True)])
        pruned_scores = np.concatenate([np.asarray(s)[~k] for s, k in zip(mask.scores.values(), mask.keep.values(), strict=True)])
        out["threshold"] = float(pruned_scores.max()) if pruned_scores.size else None
        out["lowest_kept"] = float(kept_scores.min()) if kept_scores.size else None
    if mask.unit in ("head", "kv_head"):
        out["pruned_units"] = np.argwhere(~mask.keep[mask.unit]).tolist()
    return out


def summarize(
    fishers: Mapping[str, TaskFisher],
    layout: ModelLayout,
    *,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    units: Sequence[str] = ("head", "kv_head", "neuron"),
    scope: str = "global",
    unstructured: bool = True,
    criterion: str = "fisher",
    params: PyTree | None = None,
    parameter_masks: Mapping[str, Sequence[Mask]] | None = None,
) -> dict:
    """Phase 3 section of ``results.json``: per task, unit and sparsity level, the achieved unit and
    parameter sparsity, per-layer and per-role pruned counts, the score threshold, and the pruned
    heads. Unstructured masks are added when the TaskFisher has a diagonal and ``unstructured``;
    pass ``parameter_masks`` (per task, one per sparsity) when they were already built — for a
    diagonal of every parameter they are the expensive part. ``criterion`` / ``params`` as in
    :func:`structured_mask`.
    """
    out: dict = {"sparsities": list(sparsities), "scope": scope, "criterion": criterion, "tasks": {}}
    for name, fisher in fishers.items():
        per_task = {}
        for unit in units:
            per_task[unit] = {
                f"{s:g}": _mask_summary(structured_mask(fisher, layout, s, unit=unit, scope=scope, criterion=criterion, params=params), layout)
                for s in sparsities
            }
        if unstructured and fisher.diagonal:
            built = (parameter_masks or {}).get(name) or unstructured_masks(fisher, layout, sparsities, scope=scope)
            per_task["parameter"] = {f"{s:g}": _mask_summary(m, layout) for s, m in zip(sparsities, built, strict=True)}
        out["tasks"][name] = per_task
    return out


# ---- the head-pruning experiment ----------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1))
def _masked_loss_sums(model, unit: str, params, head_keeps, input_ids, attention_mask, labels):
    """Token-sum loss of a batch under each of ``head_keeps`` ``[m, L, units]`` (``lax.map``, one mask at a time)."""
    from fisherjax.grads import sample_losses

    def one(keep):
        masked = apply_mask(params, mask_tree(model.layout, unit, {unit: keep}))
        losses, _ = sample_losses(model, masked, input_ids, attention_mask, labels)
        return losses.sum()

    return jax.lax.map(one, head_keeps)


def head_pruning_experiment(
    model,
    params: PyTree,
    task_batches: Mapping[str, Sequence],
    fishers: Mapping[str, TaskFisher],
    sparsity: float = 0.5,
    n_random: int = 10,
    seed: int = 0,
    *,
    unit: str = "head",
    scope: str = "global",
    criterion: str = "fisher",
) -> dict:
    """Each task's loss before pruning, after Fisher-guided pruning and after random pruning.

    For every task ``t`` with a Fisher, the mask :func:`structured_mask` ``(fishers[t], s, unit,
    scope)`` prunes ``k`` heads; ``n_random`` random masks prune the same number of heads (the same
    number per layer with ``scope="layer"``), drawn once (``numpy`` generator ``seed``) and shared by
    all tasks. Losses are token means over all of the task's batches,
    ``Σ_i L_i / Σ_i T_i`` (:func:`fisherjax.grads.sample_losses`); every mask of a batch is
    evaluated in one jitted ``lax.map``.

    Args:
      model: a :class:`~fisherjax.models.Model`; params: its parameters.
      task_batches: ``{task: [Batch, ...]}`` evaluation batches (ideally held out from the Fisher's).
      fishers: ``{task: TaskFisher}``; every task here needs batches.
      sparsity: fraction of units to prune; n_random: random masks; seed: their generator seed.
      unit: ``head`` or ``kv_head``; scope: ``global`` or ``layer``; criterion: ``fisher`` or
        ``saliency`` (:func:`structured_mask`).

    Returns:
      JSON-ready dict: ``n_units``, ``n_pruned``, and per task ``loss_before``, ``loss_fisher``,
      ``loss_random_mean``, ``loss_random_sd`` (ddof 1), ``loss_random``, ``fraction_random_worse``
      (random masks that hurt more than the Fisher mask), ``pruned`` ``[[layer, head], ...]``; and
      ``cross[mask_task][eval_task]``, each task's loss under every task's Fisher mask.
    """
    from fisherjax.data import num_active_tokens

    if unit not in ("head", "kv_head"):
        raise ConfigError(f"the head-pruning experiment prunes 'head' or 'kv_head' units, got {unit!r}")
    if n_random < 2:
        raise ConfigError(f"n_random must be at least 2 for a standard deviation, got {n_random}")
    missing = [t for t in fishers if t not in task_batches or not len(task_batches[t])]
    if missing:
        raise DataError(f"no evaluation batches for tasks {missing}")
    names = list(fishers)
    fisher_masks = {
        t: structured_mask(fishers[t], model.layout, sparsity, unit=unit, scope=scope, criterion=criterion, params=params) for t in names
    }
    shape = fisher_masks[names[0]].keep[unit].shape
    rng = np.random.default_rng(seed)
    random_keep = _keep_matrix(rng.random((n_random, *shape)), sparsity, scope, "random scores")
    keeps = np.concatenate(
        [np.ones((1, *shape), bool), np.stack([fisher_masks[t].keep[unit] for t in names]), random_keep]
    )
    tasks, cross = {}, {t: {} for t in names}
    for task in names:
        sums = np.zeros(len(keeps))
        tokens = 0
        for batch in task_batches[task]:
            sums += np.asarray(
                _masked_loss_sums(model, unit, params, jnp.asarray(keeps), batch.input_ids, batch.attention_mask, batch.labels),
                np.float64,
            )
            tokens += int(num_active_tokens(batch.labels).sum())
        if tokens == 0:
            raise DataError(f"task {task!r} has no predicted tokens in its evaluation batches")
        losses = sums / tokens
        before, by_fisher, by_random = losses[0], losses[1 : 1 + len(names)], losses[1 + len(names) :]
        for mask_task, loss in zip(names, by_fisher, strict=True):
            cross[mask_task][task] = float(loss)
        own = float(by_fisher[names.index(task)])
        tasks[task] = {
            "loss_before": float(before),
            "loss_fisher": own,
            "loss_random_mean": float(by_random.mean()),
            "loss_random_sd": float(by_random.std(ddof=1)),
            "loss_random": by_random.tolist(),
            "fraction_random_worse": float((by_random > own).mean()),
            "pruned": np.argwhere(~fisher_masks[task].keep[unit]).tolist(),
            "n_tokens": tokens,
        }
    return {
        "unit": unit,
        "scope": scope,
        "criterion": criterion,
        "sparsity": float(sparsity),
        "n_random": n_random,
        "seed": seed,
        "n_units": int(np.prod(shape)),
        "n_pruned": fisher_masks[names[0]].n_pruned,
        "tasks": tasks,
        "cross": cross,
    }
