"""Phase 2: importance — which groups of parameters a task's Fisher says matter most.

Input is a Phase 1 :class:`~fisherjax.fisher.TaskFisher`: ``group_fisher[path][group_type]``, the
mean over samples of each group's sum of ``C_i = g_i² / T_i`` (see
:mod:`fisherjax.fisher.groups`). Everything here is a pure function of those numbers and the
model's :class:`~fisherjax.layout.ModelLayout`.

Group table. :func:`group_table` lays every group out as one row: its parameter path, group type,
role (``q``, ``k``, ``v``, ``o``, ``mlp_in``, ``mlp_gate``, ``mlp_out``, ``embed``, ``norm``...;
a fused QKV leaf's ``head_q`` / ``head_k`` / ``head_v`` groups get roles ``q`` / ``k`` / ``v``), its
layer (``-1`` for parameters outside the layer stack: embeddings, final norm, unembedding), its
index inside that layer (head, kv head, channel, neuron, vocabulary row or element), its Fisher
``F_g`` and its size.

Normalisation. Some leaves are viewed twice (an MLP out kernel has ``channel`` *and* ``neuron``
groups), so totals are taken over one *primary* partition per leaf (``head_*`` for fused QKV,
otherwise the first of head, channel, row, element; ``neuron`` is a second view). With
``F_tot = Σ_{g primary} F_g`` (the trace of the diagonal Fisher) and ``F_ℓ`` the same sum over
the layer of ``g``::

    global_share(g) = F_g / F_tot          layer_share(g) = F_g / F_ℓ

so the primary shares of a layer sum to 1 (and all primary global shares sum to 1). A layer whose
Fisher is exactly zero gets layer shares 0; a task whose whole Fisher is zero has no ranking and
raises :class:`~fisherjax.errors.NumericalError`.

Heads. :func:`head_importance` gathers the attention groups per block, ``F^B[ℓ, h]`` for
``B ∈ {q, k, v, o}`` (kernel plus per-head bias), and combines them per query head::

    F_head[ℓ, h]    = F^q[ℓ, h] + F^o[ℓ, h] + (F^k[ℓ, κ(h)] + F^v[ℓ, κ(h)]) / G
    F_kv_head[ℓ, j] = F^k[ℓ, j] + F^v[ℓ, j] + Σ_{h: κ(h) = j} (F^q[ℓ, h] + F^o[ℓ, h])

with ``κ(h) = h // G`` the kv head query head ``h`` reads and ``G = H / H_kv``: a kv head's
Fisher is shared evenly by the query heads that read it, so ``Σ_h F_head[ℓ, h]`` is the whole
attention Fisher of layer ℓ (output-projection bias excepted, it belongs to no head).

Comparing tasks. :func:`compare_tasks` ranks the same groups under two tasks: Spearman's rank
correlation of their global shares (``scipy.stats.spearmanr``, average ranks for ties), overall
and per role, and the groups whose shares differ most.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from fisherjax import stats
from fisherjax.settings import STATIC
from fisherjax.errors import DataError, NumericalError
from fisherjax.fisher.groups import ROW_BUCKET_SIZE, ROW_BUCKET_THRESHOLD, group_sizes
from fisherjax.fisher.state import TaskFisher
from fisherjax.layout import ATTENTION_BLOCKS, OUTSIDE_LAYERS, ModelLayout, Role

PRIMARY_ORDER = ("head", "channel", "row", "element")
SHARES = ("global_share", "layer_share", "value")
_FUSED_TYPES = ("head_q", "head_k", "head_v")


# ---- groups → parameters ------------------------------------------------------------------


def primary_group_types(layout: ModelLayout, path: str, available: Sequence[str]) -> tuple[str, ...]:
    """The group types of ``path`` that partition it once (see the module docstring)."""
    if layout.spec(path).role == Role.QKV:
        return tuple(t for t in _FUSED_TYPES if t in available)
    for group_type in PRIMARY_ORDER:
        if group_type in available:
            return (group_type,)
    return tuple(available[:1])


def _xp(x):
    return jnp if isinstance(x, jax.Array) else np


def _unbucket(values, rows: int):
    """Undo the 1000-row buckets of tables with more than 50 000 rows (each row gets its bucket's value)."""
    if rows <= ROW_BUCKET_THRESHOLD:
        return values
    return _xp(values).repeat(values, ROW_BUCKET_SIZE, axis=-1)[..., :rows]


def spread_groups(layout: ModelLayout, path: str, values: Mapping[str, object], *, fill=0):
    """Give every parameter of ``path`` the value of the group it belongs to.

    ``values`` maps group type → group values ``[..., *group_shape]`` (any leading axes, shared by
    all entries). A fused QKV leaf takes any of ``head_q``, ``head_k``, ``head_v`` (missing ones are
    ``fill``); any other leaf takes exactly one group type. Heads are placed through
    :meth:`ModelLayout.view` / :meth:`ModelLayout.unview` (the head axis of a Q/K/V kernel is on its
    output, of an O kernel on its input), channels along a kernel's output axis, neurons along its
    input axis, rows along the vocabulary axis. Works on numpy and jax arrays (inside ``jit``).

    Returns:
      ``[..., *param_shape]``.
    """
    spec = layout.spec(path)
    template = np.empty(spec.shape, np.int8)
    if spec.role == Role.QKV:
        unknown = set(values) - set(_FUSED_TYPES)
        if unknown or not values:
            raise ValueError(f"{path} is a fused QKV leaf: pass head_q / head_k / head_v groups, got {sorted(values)}")
        given = next(iter(values.values()))
        xp = _xp(given)
        lead_and_layer = given.shape[:-1]
        views = {}
        for block in "qkv":
            v = values.get(f"head_{block}")
            if v is None:
                v = xp.full((*lead_and_layer, layout.heads_of(block)), fill, dtype=given.dtype)
            view_shape = layout.view(path, template, block).shape
            views[block] = _broadcast_head(v, view_shape, spec.kind, block)
        return layout.unview(path, views)
    if len(values) != 1:
        raise ValueError(f"{path}: pass exactly one group type to spread, got {sorted(values)}")
    (group_type, v), = values.items()
    xp = _xp(v)
    if group_type == "head":
        block = spec.role.value
        view_shape = layout.view(path, template, block).shape
        return layout.unview(path, {block: _broadcast_head(v, view_shape, spec.kind, block)})
    if group_type == "channel" and spec.kind == "kernel":
        expanded = v[..., None, :]
    elif group_type == "neuron" and spec.kind == "kernel":
        expanded = v[..., :, None]
    elif group_type == "row" and spec.kind == "embedding":
        expanded = _unbucket(v, spec.shape[-2])[..., :, None]
    elif group_type == "row" and spec.kind == "kernel":
        expanded = _unbucket(v, spec.shape[-1])[..., None, :]
    elif group_type == "element":
        expanded = v
    else:
        raise ValueError(f"{path} ({spec.role.value} {spec.kind}) has no {group_type!r} groups")
    lead = expanded.shape[: expanded.ndim - len(spec.shape)]
    return xp.broadcast_to(expanded, (*lead, *spec.shape))


def _broadcast_head(v, view_shape, kind: str, block: str):
    """Per-head values ``[..., (layer), heads]`` broadcast to a head view of the module table."""
    if kind != "kernel":
        expanded = v[..., :, None]  # bias view [.., heads, head_dim]
    elif block == "o":
        expanded = v[..., :, None, None]  # [.., heads, head_dim, d_out]
    else:
        expanded = v[..., None, :, None]  # [.., d_in, heads, head_dim]
    lead = expanded.shape[: expanded.ndim - len(view_shape)]
    return _xp(v).broadcast_to(expanded, (*lead, *view_shape))


# ---- the group table ----------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupTable:
    """All groups of one task, one row each (columns are ``[G]`` arrays).

    Attributes:
      task: task name.
      path, group_type, role: strings per group (role ``q``/``k``/``v`` for fused QKV groups).
      layer: layer of the group, ``-1`` outside the layer stack.
      index: position of the group inside its (path, group type, layer): head, channel, row...
      value: group Fisher ``F_g`` (float64).
      size: parameters in the group.
      primary: whether the group belongs to its leaf's primary partition (counted in totals).
      global_share: ``F_g / F_tot``; layer_share: ``F_g / F_ℓ`` (module docstring).
    """

    task: str = dataclasses.field(metadata=STATIC)
    path: np.ndarray
    group_type: np.ndarray
    role: np.ndarray
    layer: np.ndarray
    index: np.ndarray
    value: np.ndarray
    size: np.ndarray
    primary: np.ndarray
    global_share: np.ndarray
    layer_share: np.ndarray

    def __len__(self) -> int:
        return len(self.value)

    def select(self, index) -> GroupTable:
        """The rows at ``index`` (boolean mask or integer array), in that order."""
        columns = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "task"}
        return GroupTable(self.task, **{k: v[index] for k, v in columns.items()})

    def where(self, *, role=None, group_type=None, layer=None, primary_only: bool = False) -> GroupTable:
        """Rows matching every filter given (each a value or a collection of values)."""
        keep = np.ones(len(self), bool)
        for column, wanted in (("role", role), ("group_type", group_type), ("layer", layer)):
            if wanted is not None:
                wanted = [wanted] if isinstance(wanted, (str, int, np.integer)) else list(wanted)
                keep &= np.isin(getattr(self, column), wanted)
        if primary_only:
            keep &= self.primary
        return self.select(keep)

    def rank(self, by: str = "global_share") -> GroupTable:
        """Rows sorted by ``by`` (``global_share``, ``layer_share`` or ``value``), largest first; ties keep table order."""
        if by not in SHARES:
            raise ValueError(f"rank by one of {SHARES}, got {by!r}")
        return self.select(np.argsort(-getattr(self, by), kind="stable"))

    def top(self, k: int, by: str = "global_share") -> GroupTable:
        """The ``k`` largest rows by ``by``."""
        return self.rank(by).select(slice(0, k))

    def rows(self) -> list[dict]:
        """JSON-ready rows: path, group_type, role, layer, index, value, size, shares."""
        return [
            {
                "path": str(self.path[i]),
                "group_type": str(self.group_type[i]),
                "role": str(self.role[i]),
                "layer": int(self.layer[i]),
                "index": int(self.index[i]),
                "value": float(self.value[i]),
                "size": int(self.size[i]),
                "global_share": float(self.global_share[i]),
                "layer_share": float(self.layer_share[i]),
            }
            for i in range(len(self))
        ]


def _leaf_layers(layout: ModelLayout, path: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(layer, index)`` per group value of one leaf, both shaped like ``values``."""
    spec = layout.spec(path)
    if spec.layered:
        per_layer = int(np.prod(values.shape[1:], dtype=np.int64))
        layer = np.repeat(np.arange(values.shape[0]), per_layer)
        index = np.tile(np.arange(per_layer), values.shape[0])
    else:
        layer = np.full(values.size, OUTSIDE_LAYERS if spec.layer is None else spec.layer)
        index = np.arange(values.size)
    return layer, index


def _check_finite(task: str, path: str, group_type: str, values: np.ndarray) -> None:
    if not np.all(np.isfinite(values)):
        raise NumericalError(f"task {task!r}: group Fisher {path} [{group_type}] has NaN or inf values")
    if np.any(values < 0):
        raise NumericalError(f"task {task!r}: group Fisher {path} [{group_type}] has negative values (a Fisher is ≥ 0)")


def group_table(fisher: TaskFisher, layout: ModelLayout) -> GroupTable:
    """One row per group of ``fisher.group_fisher``, with global and per-layer shares.

    ``global_share = F_g / Σ_primary F``, ``layer_share = F_g / Σ_{primary, same layer} F``
    (module docstring). Rows come in layout order (path, then group type, layer, index).

    Raises:
      DataError: a path the layout does not know.
      NumericalError: NaN, inf or negative Fisher, or a Fisher that is zero everywhere.
    """
    unknown = [p for p in fisher.group_fisher if p not in layout.specs]
    if unknown:
        raise DataError(f"task {fisher.task!r}: group Fisher has parameters the model does not: {unknown}")
    columns: dict[str, list] = {k: [] for k in ("path", "group_type", "role", "layer", "index", "value", "size", "primary")}
    for path in (p for p in layout.specs if p in fisher.group_fisher):
        groups = fisher.group_fisher[path]
        primary = primary_group_types(layout, path, list(groups))
        sizes = fisher.group_sizes.get(path) if fisher.group_sizes else None
        sizes = sizes if sizes is not None else group_sizes(layout, path)
        role = layout.spec(path).role.value
        for group_type, values in groups.items():
            values = np.asarray(values, np.float64)
            _check_finite(fisher.task, path, group_type, values)
            layer, index = _leaf_layers(layout, path, values)
            n = values.size
            columns["path"].append(np.full(n, path, dtype=object))
            columns["group_type"].append(np.full(n, group_type, dtype=object))
            columns["role"].append(np.full(n, group_type[-1] if group_type in _FUSED_TYPES else role, dtype=object))
            columns["layer"].append(layer)
            columns["index"].append(index)
            columns["value"].append(values.reshape(-1))
            columns["size"].append(np.broadcast_to(np.asarray(sizes[group_type]), values.shape).reshape(-1))
            columns["primary"].append(np.full(n, group_type in primary))
    if not columns["value"]:
        raise DataError(f"task {fisher.task!r} has no group Fisher")
    cat = {k: np.concatenate(v) for k, v in columns.items()}
    cat["layer"] = cat["layer"].astype(np.int64)
    cat["size"] = cat["size"].astype(np.int64)
    primary_value = np.where(cat["primary"], cat["value"], 0.0)
    total = primary_value.sum()
    if total <= 0:
        raise NumericalError(
            f"task {fisher.task!r}: the Fisher is zero everywhere ({len(cat['value'])} groups), so no group is more "
            "important than another (no gradient signal: check the task's labels)"
        )
    # Layers are -1 .. L-1; shift by one to index bincount.
    layer_totals = np.bincount(cat["layer"] + 1, weights=primary_value)
    layer_total = layer_totals[cat["layer"] + 1]
    layer_share = np.divide(cat["value"], layer_total, out=np.zeros_like(cat["value"]), where=layer_total > 0)
    return GroupTable(fisher.task, global_share=cat["value"] / total, layer_share=layer_share, **cat)


# ---- layer totals -------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerTotals:
    """Fisher per layer and role (primary groups only).

    Attributes:
      layers: ``[n]`` layer ids present, ``-1`` = outside the layer stack.
      roles: role names (columns of ``by_role``).
      total: ``[n]`` ``F_ℓ``; share: ``[n]`` ``F_ℓ / F_tot``; by_role: ``[n, roles]``.
    """

    task: str = dataclasses.field(metadata=STATIC)
    layers: np.ndarray
    roles: tuple[str, ...] = dataclasses.field(metadata=STATIC)
    total: np.ndarray
    share: np.ndarray
    by_role: np.ndarray


def layer_totals(table: GroupTable) -> LayerTotals:
    """``F_ℓ = Σ_{primary g in ℓ} F_g`` per layer, split by role (``np.add.at`` over the table)."""
    primary = table.where(primary_only=True)
    layers, layer_pos = np.unique(primary.layer, return_inverse=True)
    roles, role_pos = np.unique(primary.role.astype(str), return_inverse=True)
    by_role = np.zeros((len(layers), len(roles)))
    np.add.at(by_role, (layer_pos, role_pos), primary.value)
    total = by_role.sum(1)
    return LayerTotals(table.task, layers, tuple(roles.tolist()), total, total / total.sum(), by_role)


# ---- heads --------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HeadImportance:
    """Attention Fisher per layer and head of one task.

    Attributes:
      blocks: ``{"q": [L, H], "k": [L, H_kv], "v": [L, H_kv], "o": [L, H]}`` — kernel plus per-head
        bias Fisher of each block.
      head: ``[L, H]`` combined per query head; kv_head: ``[L, H_kv]`` per GQA group (module docstring).
      kv_head_of: ``[H]`` the kv head each query head reads.
    """

    task: str = dataclasses.field(metadata=STATIC)
    blocks: Mapping[str, np.ndarray]
    head: np.ndarray
    kv_head: np.ndarray
    kv_head_of: np.ndarray


def block_group_values(fisher: TaskFisher, layout: ModelLayout, block: str, kind: str, *, per_sample: bool = False) -> np.ndarray:
    """Group Fisher of (block, kind) as ``[L, heads_of(block)]`` (``head`` or fused ``head_<block>``
    groups); with ``per_sample``, each sample's group values ``[n, L, heads_of(block)]`` from
    ``fisher.per_sample_groups``."""
    tree = fisher.per_sample_groups if per_sample else fisher.group_fisher
    if tree is None:
        raise DataError(f"task {fisher.task!r} kept no per-sample group values (collect with keep_per_sample_groups=True)")

    def get(path):
        groups = tree.get(path)
        key = f"head_{block}" if layout.spec(path).role == Role.QKV else "head"
        if groups is None or key not in groups:
            raise DataError(f"task {fisher.task!r} has no {key!r} group Fisher for {path} (needed for {block} heads)")
        return np.asarray(groups[key], np.float64)

    return layout.stack_layers(layout.block_sources(block, kind), get, axis=-2)


def kv_onehot(layout: ModelLayout) -> np.ndarray:
    """``[H, H_kv]`` with 1 where query head ``h`` reads kv head ``κ(h)``."""
    return (layout.kv_head_of[:, None] == np.arange(layout.num_kv_heads)[None, :]).astype(np.float64)


def combine_heads(
    blocks: Mapping[str, Float[Array, "layer heads"]], layout: ModelLayout
) -> tuple[Float[Array, "layer heads"], Float[Array, "layer kv_heads"]]:
    """``(F_head [L, H], F_kv_head [L, H_kv])`` from per-block values (module docstring formulas)."""
    onehot = kv_onehot(layout)
    q_o = blocks["q"] + blocks["o"]
    k_v = blocks["k"] + blocks["v"]
    head = q_o + (k_v @ onehot.T) / layout.kv_groups
    kv_head = k_v + q_o @ onehot
    return head, kv_head


def head_importance(fisher: TaskFisher, layout: ModelLayout) -> HeadImportance:
    """Per-block and combined head Fisher of one task (module docstring).

    Returns ``blocks[B]`` ``[L, heads_of(B)]`` = kernel (+ bias) head groups, ``head`` ``[L, H]``,
    ``kv_head`` ``[L, H_kv]``.
    """
    blocks = {}
    for block, kind in layout.attention_blocks():
        values = block_group_values(fisher, layout, block, kind)
        _check_finite(fisher.task, f"{block} {kind}", "head", values)
        blocks[block] = blocks.get(block, 0.0) + values
    missing = [b for b in ATTENTION_BLOCKS if b not in blocks]
    if missing:
        raise DataError(f"the model's layout has no attention kernels for blocks {missing}")
    head, kv_head = combine_heads(blocks, layout)
    return HeadImportance(fisher.task, blocks, head, kv_head, layout.kv_head_of)


def head_importance_intervals(
    fisher: TaskFisher, layout: ModelLayout, *, level: float = 0.95, n_bootstrap: int = 1000, seed: int = 0
) -> tuple[Float[np.ndarray, "layer heads"], Float[np.ndarray, "layer heads"]]:
    """Percentile bootstrap interval ``(low, high)`` of ``F_head [L, H]`` over resampled samples.

    ``F_head`` is linear in the per-block values, so each sample's combined head value is
    :func:`combine_heads` of its own block values (``per_sample_groups``); the interval is that of
    their mean (:func:`fisherjax.stats.bootstrap_mean_interval`).
    """
    blocks: dict[str, np.ndarray] = {}
    for block, kind in layout.attention_blocks():
        blocks[block] = blocks.get(block, 0.0) + block_group_values(fisher, layout, block, kind, per_sample=True)
    per_sample, _ = combine_heads(blocks, layout)
    return stats.bootstrap_mean_interval(per_sample, n_bootstrap=n_bootstrap, level=level, seed=seed)


# ---- comparing tasks ----------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TaskComparison:
    """Two tasks' importances over the same groups.

    Attributes:
      spearman, spearman_p: rank correlation of the ``by`` shares over all compared groups.
      by_role: ``{role: (rho, n_groups)}`` rank correlation within each role (roles with at least
        3 groups whose shares vary under both tasks).
      n_groups: groups compared; by: the share compared.
      table_a, table_b: the compared rows (same order in both).
      differences: the groups whose shares differ most, ``share_a − share_b`` largest in magnitude.
    """

    task_a: str = dataclasses.field(metadata=STATIC)
    task_b: str = dataclasses.field(metadata=STATIC)
    by: str = dataclasses.field(metadata=STATIC)
    n_groups: int = dataclasses.field(metadata=STATIC)
    spearman: float
    spearman_p: float
    by_role: Mapping[str, tuple[float, int]]
    table_a: GroupTable
    table_b: GroupTable
    differences: list[dict]


def compare_tasks(
    a: TaskFisher,
    b: TaskFisher,
    layout: ModelLayout,
    *,
    by: str = "global_share",
    k: int = 10,
    roles: Sequence[str] | None = None,
    intersect: bool = False,
) -> TaskComparison:
    """Rank correlation and largest differences between two tasks' group importances.

    Over the primary groups (optionally only ``roles``) of both tasks:
    ``ρ = spearman(share_a, share_b)`` with ``scipy.stats.spearmanr`` (average ranks for ties),
    per role as well, and the ``k`` groups with the largest ``|share_a − share_b|``.

    Args:
      a, b: the two tasks' Fisher.
      by: ``global_share`` (default), ``layer_share`` or ``value``.
      k: number of most-different groups to report.
      roles: restrict to these roles (e.g. ``("q", "k", "v", "o")``).
      intersect: compare the groups both tasks have; by default two different parameter sets are
        an error.

    Raises:
      DataError: the tasks cover different parameters or group shapes (unless ``intersect``).
      NumericalError: one task's shares are constant over the compared groups (no ranking).
    """
    from scipy import stats

    table_a = group_table(a, layout).where(primary_only=True, role=roles)
    table_b = group_table(b, layout).where(primary_only=True, role=roles)
    keys_a = list(zip(table_a.path.tolist(), table_a.group_type.tolist(), table_a.layer.tolist(), table_a.index.tolist(), strict=True))
    keys_b = list(zip(table_b.path.tolist(), table_b.group_type.tolist(), table_b.layer.tolist(), table_b.index.tolist(), strict=True))
    if keys_a != keys_b:
        leaves_a = set(zip(table_a.path.tolist(), table_a.group_type.tolist(), strict=True))
        leaves_b = set(zip(table_b.path.tolist(), table_b.group_type.tolist(), strict=True))
        if not intersect:
            only_a, only_b = sorted(leaves_a - leaves_b), sorted(leaves_b - leaves_a)
            detail = f"only in {a.task!r}: {only_a}; only in {b.task!r}: {only_b}" if (only_a or only_b) else "same parameters, different group shapes"
            raise DataError(f"tasks {a.task!r} and {b.task!r} have different group Fisher ({detail}); pass intersect=True to compare the common groups")
        position_b = {key: i for i, key in enumerate(keys_b)}
        common = [(i, position_b[key]) for i, key in enumerate(keys_a) if key in position_b]
        if not common:
            raise DataError(f"tasks {a.task!r} and {b.task!r} share no groups")
        index_a, index_b = (np.asarray(x) for x in zip(*common, strict=True))
        table_a, table_b = table_a.select(index_a), table_b.select(index_b)
    share_a, share_b = getattr(table_a, by), getattr(table_b, by)
    for task, share in ((a.task, share_a), (b.task, share_b)):
        if len(share) < 2 or np.all(share == share[0]):
            raise NumericalError(f"task {task!r}: the {len(share)} compared group importances are all equal, so they have no ranking")
    rho, p = stats.spearmanr(share_a, share_b)
    by_role = {}
    for role in np.unique(table_a.role.astype(str)):
        sel = table_a.role == role
        xa, xb = share_a[sel], share_b[sel]
        if sel.sum() >= 3 and np.ptp(xa) > 0 and np.ptp(xb) > 0:
            by_role[str(role)] = (float(stats.spearmanr(xa, xb)[0]), int(sel.sum()))
    diff = share_a - share_b
    order = np.argsort(-np.abs(diff), kind="stable")[:k]
    differences = [
        {**row, f"{by}_a": float(share_a[i]), f"{by}_b": float(share_b[i]), "difference": float(diff[i])}
        for i, row in zip(order, table_a.select(order).rows(), strict=True)
    ]
    for row in differences:
        for name in ("value", "global_share", "layer_share"):
            row.pop(name)
    return TaskComparison(a.task, b.task, by, len(share_a), float(rho), float(p), by_role, table_a, table_b, differences)


# ---- heads by behaviour ---------------------------------------------------------------------


def category_group_fisher(fisher: TaskFisher, layout: ModelLayout, labels: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Every attention leaf's head groups summed per behavioural category of the query heads.

    ``labels`` ``[L, H]`` names each query head's category (:mod:`fisherjax.heads`). For a leaf
    of block ``B`` and a category ``c``::

        F_c[ℓ] = Σ_{h: label[ℓ, h] = c} F^B[ℓ, h]                 (q, o: query heads)
        F_c[ℓ] = Σ_{h: label[ℓ, h] = c} F^B[ℓ, κ(h)] / G          (k, v: a kv head is shared
                                                                    evenly by its G query heads)

    and a fused QKV leaf adds its ``head_q``, ``head_k`` and ``head_v`` terms, so the categories of a
    layer sum to the leaf's head Fisher of that layer. Returns ``{path: {"<c>_heads": [L]}}`` for
    stacked leaves (``[]``-shaped for a per-layer leaf), the original system's
    ``…/q_proj/kernel|induction_heads`` keys; only categories some head carries appear.
    """
    labels = np.asarray(labels)
    if labels.shape != (layout.num_layers, layout.num_heads):
        raise DataError(f"head labels have shape {labels.shape}, the model has {layout.num_layers} layers × {layout.num_heads} heads")
    categories = sorted(set(labels.ravel().tolist()))
    out: dict[str, dict[str, np.ndarray]] = {}
    for block, kind in layout.attention_blocks():
        for path in layout.block_sources(block, kind):
            spec = layout.spec(path)
            key = f"head_{block}" if spec.role == Role.QKV else "head"
            groups = fisher.group_fisher.get(path, {})
            if key not in groups:
                continue
            values = np.asarray(groups[key], np.float64)  # [L, H_B] stacked, [H_B] per layer
            rows = labels if spec.layered else labels[spec.layer]
            if block in ("k", "v"):
                values = values[..., layout.kv_head_of] / layout.kv_groups  # onto query heads
            groups_of_path = out.setdefault(path, {})
            for category in categories:  # a fused leaf adds its q, k and v terms
                name = f"{category}_heads"
                groups_of_path[name] = groups_of_path.get(name, 0.0) + np.where(rows == category, values, 0.0).sum(-1)
    return out
