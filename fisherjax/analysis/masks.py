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

:func:`fisherjax.analysis.experiments.head_pruning_experiment` measures what Fisher-guided head pruning costs each task, against
random pruning of the same number of heads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, PyTree

from fisherjax.analysis._ranking import keep_highest, keep_highest_each, keep_matrix, pruned_count  # noqa: F401 — the rule is part of masks' public face
from fisherjax.analysis._ranking import pruned_pieces
from fisherjax.analysis.importance import head_importance, spread_groups
from fisherjax.settings import STATIC
from fisherjax.errors import ConfigError, DataError
from fisherjax.fisher.state import TaskFisher
from fisherjax.layout import ModelLayout, Role, flatten, unflatten
from fisherjax.settings import check_choice

UNITS = ("head", "kv_head", "neuron", "channel", "parameter")
STRUCTURED_UNITS = ("head", "kv_head", "neuron", "channel")
SCOPES = ("global", "layer")
CRITERIA = ("fisher", "saliency")
DEFAULT_SPARSITIES = (0.5, 0.7, 0.9)
_MLP_INPUT_ROLES = (Role.MLP_IN, Role.MLP_GATE)


@jax.tree_util.register_dataclass
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
    unit: str = dataclasses.field(metadata=STATIC)
    scope: str = dataclasses.field(metadata=STATIC)
    target_sparsity: float = dataclasses.field(metadata=STATIC)
    keep: Mapping[str, np.ndarray]
    scores: Mapping[str, np.ndarray]
    task: str | None = dataclasses.field(default=None, metadata=STATIC)

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
    check_choice("mask", "criterion", criterion, CRITERIA)
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
    check_choice("mask", "unit", unit, STRUCTURED_UNITS)
    if unit in ("head", "kv_head"):
        heads = head_importance(fisher, layout)
        return {unit: heads.head if unit == "head" else heads.kv_head}
    paths = _mlp_paths(layout)
    if unit == "neuron":
        total = layout.stack_layers(paths[Role.MLP_OUT], lambda p: _group(fisher, p, "neuron"))
        for role in _MLP_INPUT_ROLES:
            if paths[role]:
                total = total + layout.stack_layers(paths[role], lambda p: _group(fisher, p, "channel"))
                biases = [_mlp_bias_of(layout, p) for p in paths[role]]
                if all(biases):
                    total = total + layout.stack_layers(biases, lambda p: _group(fisher, p, "element"))
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
    check_choice("mask", "unit", unit, UNITS)
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
    keep = keep_matrix(joined, sparsity, scope, what)
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
    check_choice("mask", "unit", unit, STRUCTURED_UNITS)
    check_choice("mask", "scope", scope, SCOPES)
    scores = unit_scores(_criterion_fisher(fisher, layout, criterion, params), layout, unit)
    keep = _keep_units(scores, sparsity, scope, f"task {fisher.task!r} {unit} Fisher scores")
    return Mask(mask_tree(layout, unit, keep), unit, scope, float(sparsity), keep, scores, fisher.task)


def category_mask(layout: ModelLayout, labels: np.ndarray, categories: Sequence[str], *, keep: bool = True) -> Mask:
    """A head mask from behavioural categories: ``keep=True`` keeps only the query heads whose label
    (``labels`` ``[L, H]``, :mod:`fisherjax.heads`) is one of ``categories`` (e.g. only the
    induction heads), ``keep=False`` prunes exactly those. K and V follow :func:`mask_tree`: a kv
    head goes only when every query head reading it goes. ``scope`` is ``"category"`` and
    ``target_sparsity`` the achieved head sparsity; ``scores`` are 1 on the chosen heads."""
    labels = np.asarray(labels)
    if labels.shape != (layout.num_layers, layout.num_heads):
        raise ConfigError(f"head labels have shape {labels.shape}, the model has {layout.num_layers} layers × {layout.num_heads} heads")
    chosen = np.isin(labels, list(categories))
    head_keep = chosen if keep else ~chosen
    sparsity = float((~head_keep).mean())
    return Mask(mask_tree(layout, "head", {"head": head_keep}), "head", "category", sparsity, {"head": head_keep},
                {"head": chosen.astype(np.float64)})


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
    stored, not a copy). For a diagonal of every parameter this is the expensive part of Phase 3,
    so every level shares one selection instead of one per sparsity.
    """
    check_choice("mask", "scope", scope, SCOPES)
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
    what = f"task {fisher.task!r} diagonal Fisher"
    if all(v.dtype == np.float32 and np.isfinite(v).all() for v in values.values()):
        levels = _keep_by_pieces(layout, values, sparsities, scope, what)
    else:  # another dtype, or NaN / inf (named, or ranked where infinite): the joined route
        flat_scores = np.concatenate([v.reshape(-1) for v in values.values()])
        if scope == "layer":
            groups = np.concatenate([np.repeat(ids, rows.shape[1]) for rows, ids in (layout.layer_rows(p, v) for p, v in values.items())])
        else:
            groups = np.zeros(len(flat_scores), np.int8)
        keep_levels = keep_highest_each(flat_scores, groups, sparsities, what=what)
        del flat_scores, groups
        sizes = np.cumsum([v.size for v in values.values()])[:-1]
        levels = [{p: k.reshape(values[p].shape) for p, k in zip(paths, np.split(keep_flat, sizes), strict=True)} for keep_flat in keep_levels]
    return tuple(Mask(mask_tree(layout, "parameter", keep), "parameter", scope, float(sparsity), keep, values, fisher.task)
                 for sparsity, keep in zip(sparsities, levels, strict=True))


def _keep_by_pieces(layout: ModelLayout, values: Mapping[str, np.ndarray], sparsities: Sequence[float], scope: str, what: str):
    """``[level] {path: keep}`` of :func:`unstructured_masks` from float32 leaves without joining
    them (:func:`~fisherjax.analysis._ranking.pruned_pieces`): one group of every leaf's values in
    leaf order (``global``), or one per layer of each leaf's rows in that layer, the non-layer
    leaves one more (``layer``) — the groups and orders of the joined route."""
    def rows_of(path, x):  # a leaf as rows that each lie in one group, and the rows' groups
        return layout.layer_rows(path, x) if scope == "layer" else (x.reshape(1, -1), np.zeros(1, np.int64))

    keep = [{p: np.ones(v.shape, bool) for p, v in values.items()} for _ in sparsities]
    groups: dict[int, list[tuple[str, int, np.ndarray]]] = {}
    for path, value in values.items():
        rows, ids = rows_of(path, value)
        for index, (row, group) in enumerate(zip(rows, ids.tolist(), strict=True)):
            groups.setdefault(group, []).append((path, index, row))
    for members in groups.values():
        pruned = pruned_pieces([row for _, _, row in members], sparsities, what=what)
        for level, flags in zip(keep, pruned, strict=True):
            for (path, index, _), flag in zip(members, flags, strict=True):
                rows_of(path, level[path])[0][index] = ~flag
    return keep


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


@jax.tree_util.register_dataclass
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
