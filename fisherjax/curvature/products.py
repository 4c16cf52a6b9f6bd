"""Matrix-free Fisher-vector products ``F v``, on the whole model or on a restriction of it.

Conventions (those of Phase 1): sample ``i`` has the token-sum loss ``L_i = Σ_t −log p(y_{t+1} |
x_≤t)`` over its ``T_i`` predicted tokens (:func:`fisherjax.grads.sample_losses`, after
:func:`fisherjax.data.predicted_labels`) and the gradient ``g_i = ∇L_i``. Over the ``n`` samples
with ``T_i > 0`` (filler rows and rows without a predicted token are not counted), for the
logits Jacobian ``J_{i,t}`` ``[V, D]`` and predictive distribution ``p_{i,t}`` of a predicted
position and ``r_{i,t}(y) = p_{i,t} − e_y`` (so ``g_i = Σ_t J_{i,t}ᵀ r_{i,t}(y_{i,t+1})``):

* ``"empirical"``  ``F = (1/n) Σ_i g_i g_iᵀ / T_i``, whose diagonal is Phase 1's ``Î``;
* ``"true"``       the same with labels drawn from the model at every predicted position,
  averaged over ``true_samples`` draws (the Monte-Carlo true Fisher). Draw ``s`` of sample ``i``
  uses ``jax.random.split(fold_in(key, sample_id_i), true_samples)[s]``, Phase 1's rule, so a
  draw does not depend on the batching;
* ``"ggn"``        the true Fisher's expectation, exactly:
  ``(1/n) Σ_i (1/T_i) Σ_t J_{i,t}ᵀ (diag p_{i,t} − p_{i,t} p_{i,t}ᵀ) J_{i,t}``.

Each product is one forward pass per batch: ``jax.linearize`` of the logits gives ``Jv``
``[b, t, V]`` from the stored linearisation, a cotangent ``c`` ``[b, t, V]`` is formed
elementwise, and ``jax.linear_transpose`` of the same linear map gives ``Jᵀ c``. Neither ``F``
nor any per-sample gradient is materialised:

* empirical / true: ``u_i = g_i · v = Σ_t r_{i,t} · (Jv)_{i,t}`` (every sample's directional
  derivative from the one JVP), ``c_{i,t} = r_{i,t} u_i / (n T_i)`` (draws averaged, all from
  the one linearisation);
* ggn: ``c_{i,t} = (p ⊙ Jv − p (pᵀ Jv))_{i,t} / (n T_i)`` (the softmax Hessian, never formed).

The logits are linearised rather than the loss vector ``L(θ)``: one linearisation serves the
three kinds (and every true-Fisher draw), and the token loss's hand-written VJP
(:func:`fisherjax.grads.token_nll`) has no forward-mode rule.

A :class:`Restriction` names the coordinates a product lives on (whole leaves, one layer, an
attention block, one head's slice); vectors on it are flat float32 ``[restriction.size]`` and
the restricted Fisher is ``P F Pᵀ`` (``Pᵀ = embed``, ``P = project``). :func:`fisher_operator`
builds a reusable :class:`FisherOperator` (``.matvec(v) -> F v`` on flat vectors). The per-batch
work is one jitted function of the whole model's parameters and a params-shaped tangent,
compiled once per model, batch shape and kind and shared by every operator of that kind —
the whole model and any restriction — which applies its restriction around it by gathers and
scatters. A restricted product therefore costs what a whole-model product costs; what it saves
is a compilation per restriction (large models take minutes to compile, per-head spectra need
dozens of restrictions).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, Int, PyTree

from fisherjax.data import IGNORE, Batch, num_active_tokens, predicted_labels
from fisherjax.errors import ConfigError, DataError
from fisherjax.fisher.step import sample_labels_per_row
from fisherjax.layout import ATTENTION_BLOCKS, ModelLayout, flatten, layer_name, unflatten
from fisherjax.models.model import model_jit
from fisherjax.settings import STATIC, check, check_choice

FISHER_KINDS = ("empirical", "true", "ggn")


# ---- restrictions ------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Restriction:
    """Coordinates of the parameters a product lives on: parts ``(path, indices)``.

    A vector on the restriction is the parts' values concatenated in order, each part's in the
    leaf's row-major order: flat ``[size]``. ``embed`` (``Pᵀ``) writes one into a params-shaped
    tree of zeros, ``project`` (``P``) reads one out of a tree.

    Attributes:
      indices: per part, flat positions into the leaf (its layer axis included, so one layer of
        a layer-stacked leaf is a contiguous range), or None for the whole leaf. The pytree's
        leaves: the jitted gathers and scatters take any restriction of the same leaves and
        sizes (another head, another layer) without recompiling.
      paths, shapes: per part, the leaf's flat path and shape; all_paths: every leaf's (path,
        shape), for :meth:`embed`; label: a name for reports. Static.
    """

    indices: tuple[Int[np.ndarray, " m"] | None, ...]
    paths: tuple[str, ...] = dataclasses.field(metadata=STATIC)
    shapes: tuple[tuple[int, ...], ...] = dataclasses.field(metadata=STATIC)
    all_paths: tuple[tuple[str, tuple[int, ...]], ...] = dataclasses.field(metadata=STATIC)
    label: str = dataclasses.field(default="", metadata=STATIC)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Coordinates of each part."""
        return tuple(int(np.prod(s)) if i is None else int(np.shape(i)[0]) for i, s in zip(self.indices, self.shapes))

    @property
    def size(self) -> int:
        """Length of a vector on the restriction."""
        return int(sum(self.sizes))

    def split(self, v) -> list:
        """A flat vector ``[size]`` cut into the parts' pieces."""
        cuts = np.cumsum(self.sizes)[:-1]
        xp = jnp if isinstance(v, jax.Array) else np
        return xp.split(v, cuts)

    def project(self, tree: PyTree) -> Float[Array, " size"]:
        """The restriction's coordinates of a params-shaped tree (nested or flat ``{path: leaf}``):
        flat ``[size]`` (jax or numpy like the tree)."""
        flat = flatten(tree)
        pieces = []
        for path, index in zip(self.paths, self.indices):
            leaf = flat[path].reshape(-1)
            pieces.append(leaf if index is None else leaf[index])
        xp = jnp if any(isinstance(p, jax.Array) for p in pieces) else np
        return xp.concatenate(pieces)

    def embed(self, v: Float[Array, " size"]) -> PyTree:
        """A params-shaped nested tree with ``v`` on the restriction and zeros elsewhere."""
        xp = jnp if isinstance(v, jax.Array) else np
        flat = {path: xp.zeros(shape, v.dtype) for path, shape in self.all_paths}
        return unflatten(self.add_to(flat, v))

    def add_to(self, flat: Mapping[str, Any], v) -> dict:
        """``{path: leaf}`` with ``v`` added on the restriction (``x + embed(v)`` without the zeros)."""
        out = dict(flat)
        for path, index, piece in zip(self.paths, self.indices, self.split(v)):
            leaf = out[path]
            piece = piece.astype(leaf.dtype)
            if index is None:
                out[path] = leaf + piece.reshape(leaf.shape)
            elif isinstance(leaf, jax.Array) or isinstance(piece, jax.Array):
                out[path] = jnp.asarray(leaf).reshape(-1).at[index].add(piece).reshape(leaf.shape)
            else:
                updated = np.array(leaf).reshape(-1)
                np.add.at(updated, index, piece)
                out[path] = updated.reshape(leaf.shape)
        return out


def _restriction(layout: ModelLayout, parts: Sequence[tuple[str, np.ndarray | None]], label: str) -> Restriction:
    if not parts:
        raise ConfigError(f"restriction {label!r} selects no parameter of this model")
    too_large = [p for p, _ in parts if np.prod(layout.spec(p).shape) >= np.iinfo(np.int32).max]
    if too_large:  # positions are int32 on the device (JAX's default integer)
        raise ConfigError(f"restriction {label!r}: leaf {too_large[0]} has 2³¹ entries or more, too many to index")
    return Restriction(
        indices=tuple(None if i is None else np.asarray(i, np.int32) for _, i in parts),
        paths=tuple(p for p, _ in parts),
        shapes=tuple(tuple(layout.spec(p).shape) for p, _ in parts),
        all_paths=tuple((p, tuple(s.shape)) for p, s in layout.specs.items()),
        label=label,
    )


def _check_path(layout: ModelLayout, path: str) -> None:
    if path not in layout.specs:
        raise ConfigError(f"{path!r} is not a parameter of this model")


def _check_layer(layout: ModelLayout, layer: int) -> None:
    if not 0 <= int(layer) < layout.num_layers:
        raise ConfigError(f"layer {layer} is out of range: the model has {layout.num_layers} layers")


def _positions(layout: ModelLayout, path: str, layer: int | None, axis_positions=None, axis: int = -1) -> np.ndarray | None:
    """Flat positions into leaf ``path`` of the entries in ``layer`` (all layers: None) whose index
    along ``axis`` (counted within one layer's slice) is in ``axis_positions`` (all: None);
    ``None`` when that is the whole leaf."""
    spec = layout.spec(path)
    inner = spec.shape[1:] if spec.layered else spec.shape
    if axis_positions is None and (layer is None or not spec.layered):
        return None
    grid = np.arange(int(np.prod(inner)), dtype=np.int64).reshape(inner)
    chosen = grid.reshape(-1) if axis_positions is None else np.take(grid, np.asarray(axis_positions).reshape(-1), axis=axis).reshape(-1)
    if not spec.layered:
        return chosen
    layers = np.arange(spec.shape[0]) if layer is None else np.array([int(layer)])
    return (layers[:, None] * grid.size + chosen[None, :]).reshape(-1)


def _in_layer(layout: ModelLayout, path: str, layer: int | None) -> bool:
    spec = layout.spec(path)
    return layer is None or spec.layered or spec.layer == int(layer)


def restrict_paths(layout: ModelLayout, paths: Sequence[str]) -> Restriction:
    """Whole leaves ``paths`` (flat parameter paths; every layer of a layer-stacked leaf)."""
    for path in paths:
        _check_path(layout, path)
    return _restriction(layout, [(p, None) for p in paths], "+".join(paths))


def restrict_layer(layout: ModelLayout, paths: Sequence[str] | None, layer: int) -> Restriction:
    """One layer of ``paths``: the layer's slice of layer-stacked leaves, and per-layer (unstacked)
    leaves of that layer. ``paths=None``: every parameter of the layer."""
    _check_layer(layout, layer)
    if paths is None:
        paths = [p for p in layout.paths() if layout.spec(p).layered or layout.spec(p).layer == int(layer)]
    parts = []
    for path in paths:
        _check_path(layout, path)
        spec = layout.spec(path)
        if not spec.layered and spec.layer != int(layer):
            raise ConfigError(f"{path} is not in {layer_name(layer)}")
        parts.append((path, _positions(layout, path, layer)))
    return _restriction(layout, parts, layer_name(layer))


def _block_leaves(layout: ModelLayout, block: str, layer: int | None) -> list[tuple[str, str]]:
    """(path, kind) of the kernels (and q/k/v biases) of ``block`` in ``layer`` (all: None)."""
    if block not in ATTENTION_BLOCKS:
        raise ConfigError(f"block must be one of {ATTENTION_BLOCKS}, got {block!r}")
    if layer is not None:
        _check_layer(layout, layer)
    kinds = ("kernel",) if block == "o" else ("kernel", "bias")
    return [(p, kind) for kind in kinds for p in layout.block_sources(block, kind) if _in_layer(layout, p, layer)]


def restrict_block(layout: ModelLayout, block: str, layer: int | None = None) -> Restriction:
    """Attention block ``block`` (q, k, v or o) in ``layer`` (all layers: None): its kernels and,
    for q/k/v, biases when the model has them. A fused QKV leaf (GPT-2's ``c_attn``, GPT-NeoX's
    ``query_key_value``) contributes only the block's columns (:meth:`ModelLayout.head_index`)."""
    parts = []
    for path, _ in _block_leaves(layout, block, layer):
        fused = layout.spec(path).fused is not None
        columns = layout.head_index(path, block).reshape(-1) if fused else None
        parts.append((path, _positions(layout, path, layer, columns, -1)))
    where = "" if layer is None else f" {layer_name(layer)}"
    return _restriction(layout, parts, f"{block}{where}")


def restrict_head(layout: ModelLayout, block: str, layer: int, head: int) -> Restriction:
    """One head's slice of block ``block`` in ``layer``: the positions ``head_index(path,
    block)[head]`` along the head axis — the output axis of a q/k/v kernel or bias, the input
    axis of an O kernel. For k/v, ``head`` is a kv head (``< num_kv_heads``)."""
    if block in ATTENTION_BLOCKS and not 0 <= int(head) < layout.heads_of(block):
        raise ConfigError(f"head {head} is out of range: block {block} has {layout.heads_of(block)} heads")
    parts = []
    for path, kind in _block_leaves(layout, block, layer):
        axis = -2 if block == "o" else -1
        parts.append((path, _positions(layout, path, layer, layout.head_index(path, block)[int(head)], axis)))
    return _restriction(layout, parts, f"{block} {layer_name(layer)} head {int(head)}")


def restrict_union(*restrictions: Restriction) -> Restriction:
    """Disjoint restrictions of one model together (e.g. a head's q and k slices): their parts
    concatenated in the order given. Overlapping coordinates are a ConfigError."""
    check(len(restrictions) >= 1, "restrict_union needs at least one restriction")
    first = restrictions[0]
    if any(r.all_paths != first.all_paths for r in restrictions[1:]):
        raise ConfigError("restrict_union: the restrictions are of different models")
    taken: dict[str, np.ndarray] = {}
    for r in restrictions:
        for path, index, shape in zip(r.paths, r.indices, r.shapes):
            positions = np.arange(int(np.prod(shape))) if index is None else np.asarray(index)
            if path in taken and np.intersect1d(taken[path], positions).size:
                raise ConfigError(f"restrict_union: the restrictions overlap in {path}")
            taken[path] = positions if path not in taken else np.concatenate([taken[path], positions])
    return Restriction(
        indices=sum((r.indices for r in restrictions), ()),
        paths=sum((r.paths for r in restrictions), ()),
        shapes=sum((r.shapes for r in restrictions), ()),
        all_paths=first.all_paths,
        label=" ∪ ".join(r.label for r in restrictions),
    )


# ---- the product -------------------------------------------------------------------------------
def _targets(labels):
    """``[b, t]``: the label position ``t`` predicts (``labels[t + 1]``), ``IGNORE`` at the end."""
    return jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], axis=1)


def _label_residual(p, targets):
    """``r = p − e_y`` on predicted positions, 0 elsewhere: the token loss's gradient in the logits."""
    valid = (targets != IGNORE)[..., None]
    one_hot = targets[..., None] == jnp.arange(p.shape[-1])
    return jnp.where(valid, p - one_hot, 0.0)


def _label_cotangent(p, jv, targets, weights):
    """``c = r u w`` with ``r = (p − e_y)`` on predicted positions and ``u_i = Σ_t r · Jv``."""
    r = _label_residual(p, targets)
    u = jnp.einsum("btv,btv->b", r, jv)
    return r * (u * weights)[:, None, None]


@model_jit(static_argnames="model")
def _batch_directional(model, params, tangent, ids, mask, labels):
    """``[b]``: ``g_i · v = Σ_t r_{i,t} · (Jv)_{i,t}`` of every row, for ``v`` given as a
    params-shaped ``tangent`` (the JVP half of an empirical product)."""
    labels = predicted_labels(labels, mask)
    tangent = jax.tree.map(lambda t, p: t.astype(p.dtype), tangent, params)
    logits, jv = jax.jvp(lambda theta: model.apply(theta, ids, mask), (params,), (tangent,))
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.einsum("btv,btv->b", _label_residual(p, _targets(labels)), jv.astype(jnp.float32))


def directional_derivatives(model, params: PyTree, batches: Sequence[Batch], tangent: PyTree) -> np.ndarray:
    """``[rows]`` float64: ``g_i · v``, the derivative of each row's token-sum loss ``L_i`` along the
    params-shaped ``tangent`` ``v``, for every row of the batches in turn (0 for a row without a
    predicted token): one JVP of the logits per batch, half of a Fisher-vector product, and no
    per-sample gradient."""
    return np.concatenate([np.asarray(_batch_directional(model, params, tangent, b.input_ids, b.attention_mask, b.labels),
                                      np.float64) for b in batches])


@model_jit(static_argnames=("model", "kind", "true_samples"), donate_argnames=("total",))
def _batch_product(model, kind: str, true_samples: int, params, tangent, ids, mask, labels, sample_ids, key, total):
    """``total + Σ_i (1/T_i) [g_i g_iᵀ, or its expectation] v`` over one batch (params-shaped, float32;
    not yet divided by ``n``), for ``v`` given as a params-shaped ``tangent``."""
    labels = predicted_labels(labels, mask)
    tokens = num_active_tokens(labels)
    weights = jnp.where((tokens > 0) & (sample_ids >= 0), 1.0 / jnp.maximum(tokens, 1), 0.0).astype(jnp.float32)
    tangent = jax.tree.map(lambda t, p: t.astype(p.dtype), tangent, params)
    logits, jvp = jax.linearize(lambda theta: model.apply(theta, ids, mask), params)
    z = logits.astype(jnp.float32)
    jv = jvp(tangent).astype(jnp.float32)
    p = jax.nn.softmax(z, axis=-1)
    targets = _targets(labels)

    def empirical():
        return _label_cotangent(p, jv, targets, weights)

    def true():
        row_keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i), true_samples))(sample_ids)
        keys = jnp.swapaxes(row_keys, 0, 1)  # [draws, batch]

        def one_draw(acc, draw_keys):
            drawn = _targets(sample_labels_per_row(draw_keys, z, labels))
            return acc + _label_cotangent(p, jv, drawn, weights), None

        return jax.lax.scan(one_draw, jnp.zeros_like(z), keys)[0] / true_samples

    def ggn():
        pjv = p * jv
        scale = jnp.where(targets != IGNORE, weights[:, None], 0.0)[..., None]
        return (pjv - p * pjv.sum(-1, keepdims=True)) * scale

    cotangent = {"empirical": empirical, "true": true, "ggn": ggn}[kind]()
    (pulled,) = jax.linear_transpose(jvp, params)(cotangent.astype(logits.dtype))
    return jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32), total, pulled)


@jax.jit
def _unravel(like, v):
    return jax.tree.map(lambda x: x.astype(jnp.float32), ravel_pytree(like)[1](v))


@jax.jit
def _ravel(tree):
    return ravel_pytree(tree)[0].astype(jnp.float32)


@jax.jit
def _embed(restriction, v):
    return restriction.embed(v)


@jax.jit
def _project(restriction, tree):
    return restriction.project(tree)


@dataclasses.dataclass(frozen=True, eq=False)
class FisherOperator:
    """``v ↦ F v`` on flat float32 vectors ``[size]`` (see the module docstring for ``F``);
    :meth:`unravel` and :meth:`ravel` turn such a vector into a params-shaped tree and back.

    Attributes:
      model, params: the model and the parameters ``F`` is taken at.
      batches: the samples (a tuple of :class:`~fisherjax.data.Batch`, read at every product).
      kind: ``"empirical"``, ``"true"`` or ``"ggn"``; key, true_samples: the true Fisher's draws.
      restriction: the coordinates (a :class:`Restriction`), or None for the whole model in
        ``jax.flatten_util.ravel_pytree`` order.
      size: length of the vectors; n_samples: ``n``, the samples with ``T_i > 0``.
    """

    model: Any
    params: PyTree
    batches: tuple[Batch, ...]
    kind: str
    restriction: Restriction | None
    key: jax.Array
    true_samples: int
    size: int
    n_samples: int

    def matvec(self, v: Float[Array, " size"]) -> Float[Array, " size"]:
        """``F v`` ``[size]`` float32 (a jax array), summed over the batches, divided by ``n``."""
        v = jnp.asarray(v, jnp.float32)
        if v.shape != (self.size,):
            raise ConfigError(f"FisherOperator.matvec takes a flat vector of length {self.size}, got shape {v.shape}")
        tangent = self.unravel(v)
        total = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), self.params)
        for batch in self.batches:
            total = _batch_product(
                self.model, self.kind, self.true_samples, self.params, tangent, batch.input_ids, batch.attention_mask,
                batch.labels, np.asarray(batch.sample_ids, np.int32), self.key, total)
        return self.ravel(total) / self.n_samples

    __call__ = matvec

    def ravel(self, tree: PyTree) -> Float[Array, " size"]:
        """A params-shaped tree's coordinates on the operator's vectors (``ravel_pytree`` order for
        the whole model, :meth:`Restriction.project` otherwise), float32."""
        if self.restriction is None:
            return _ravel(tree)
        return _project(self._unlabelled, tree).astype(jnp.float32)

    def unravel(self, v: Float[Array, " size"]) -> PyTree:
        """A vector as a params-shaped float32 tree (zeros outside a restriction)."""
        v = jnp.asarray(v, jnp.float32)
        if self.restriction is None:
            return _unravel(self.params, v)
        return _embed(self._unlabelled, v)

    @property
    def _unlabelled(self) -> Restriction:
        # the label is a name only: restrictions of the same leaves and sizes share a compilation
        return dataclasses.replace(self.restriction, label="")


def count_samples(batches: Sequence[Batch]) -> int:
    """``n``: the rows of ``batches`` with a sample id ≥ 0 and ``T_i > 0`` predicted tokens."""
    return int(sum(((np.asarray(num_active_tokens(b.labels, b.attention_mask)) > 0) & (np.asarray(b.sample_ids) >= 0)).sum() for b in batches))


def fisher_operator(
    model,
    params: PyTree,
    batches: Sequence[Batch],
    *,
    kind: str = "empirical",
    restrict: Restriction | None = None,
    key: jax.Array | None = None,
    true_samples: int = 1,
) -> FisherOperator:
    """The reusable operator ``v ↦ F v`` of ``model`` at ``params`` over ``batches``.

    Args:
      model: a :class:`~fisherjax.models.Model`; params: its parameters (e.g. ``model.params``).
      batches: a sequence of :class:`~fisherjax.data.Batch` (kept, and read at every product).
      kind: ``"empirical"``, ``"true"`` (Monte-Carlo, ``true_samples`` draws per sample from
        ``key``; default ``jax.random.key(0)``) or ``"ggn"`` (the true Fisher's expectation).
      restrict: a :class:`Restriction` (:func:`restrict_paths`, :func:`restrict_layer`,
        :func:`restrict_block`, :func:`restrict_head`), or None for the whole model.

    Raises:
      ConfigError: an unknown kind or ``true_samples < 1``; DataError: no sample predicts a token.
    """
    check_choice("fisher_operator", "kind", kind, FISHER_KINDS)
    check(isinstance(true_samples, int) and true_samples >= 1, f"fisher_operator true_samples must be an integer ≥ 1, got {true_samples!r}")
    batches = tuple(batches)
    n = count_samples(batches)
    if n == 0:
        raise DataError("fisher_operator: no sample of the batches has a predicted token, so the Fisher is undefined")
    size = restrict.size if restrict is not None else int(sum(np.size(x) for x in jax.tree.leaves(params)))
    key = key if key is not None else jax.random.key(0)
    return FisherOperator(model, params, batches, kind, restrict, key, true_samples, size, n)


def fisher_vector_product(
    model,
    params: PyTree,
    batches: Sequence[Batch],
    v,
    *,
    kind: str = "empirical",
    restrict: Restriction | None = None,
    key: jax.Array | None = None,
    true_samples: int = 1,
):
    """``F v``: a params-shaped tree for a params-shaped ``v`` when ``restrict`` is None, else a flat
    ``[restrict.size]`` vector. A thin wrapper of :func:`fisher_operator` (build that once to
    take many products)."""
    op = fisher_operator(model, params, batches, kind=kind, restrict=restrict, key=key, true_samples=true_samples)
    if restrict is None:
        return op.unravel(op.matvec(op.ravel(v)))
    return op.matvec(v)
