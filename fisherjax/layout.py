"""ModelLayout: where every attention head lives in a parameter pytree.

For each parameter path the layout knows its role (q, k, v, o, fused qkv, mlp in / gate / out,
embedding, position embedding, unembedding, norm, other bias), its kind (kernel, bias, scale,
embedding), whether it carries a leading layer axis, and how to view it with explicit head axes.
Everything downstream slices heads through :meth:`ModelLayout.attention`, which works on any
params-shaped pytree — parameters, a diagonal Fisher, per-sample gradients with a leading sample
axis — and returns arrays with named axes:

=============  ===============================================
(q, kernel)    ``[..., layer, d_in, heads, head_dim]``
(k|v, kernel)  ``[..., layer, d_in, kv_heads, head_dim]``
(o, kernel)    ``[..., layer, heads, head_dim, d_out]``
(q, bias)      ``[..., layer, heads, head_dim]``
(k|v, bias)    ``[..., layer, kv_heads, head_dim]``
=============  ===============================================

Kernels are Flax ``[in, out]``. Fused projections are split here and nowhere else: GPT-2's
``c_attn`` has ``[Q | K | V]`` output blocks, GPT-NeoX's ``query_key_value`` interleaves
``[head, (q, k, v), head_dim]``. Under grouped-query attention query head ``h`` reads kv head
``h // (heads / kv_heads)`` (:attr:`ModelLayout.kv_head_of`).

A layout is built from rules (regex → role), so a user's own Flax model gets one with
:meth:`ModelLayout.from_rules`; per-layer (unstacked) parameter trees are supported by a
``(?P<layer>\\d+)`` group in the rule's regex.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fisherjax.errors import ConfigError


class Role(str, enum.Enum):
    Q = "q"
    K = "k"
    V = "v"
    O = "o"  # noqa: E741 - the attention output projection is called O everywhere
    QKV = "qkv"
    MLP_IN = "mlp_in"
    MLP_GATE = "mlp_gate"
    MLP_OUT = "mlp_out"
    EMBED = "embed"
    POS_EMBED = "pos_embed"
    UNEMBED = "unembed"
    NORM = "norm"
    BIAS = "bias"


ATTENTION_BLOCKS = ("q", "k", "v", "o")
"""The attention blocks, in the order every per-block array and table uses."""

QKV_BLOCKS = ATTENTION_BLOCKS[:3]
"""The blocks a fused QKV projection holds (and whose heads sit on a kernel's output axis)."""

KINDS = ("kernel", "bias", "scale", "embedding")

OUTSIDE_LAYERS = -1
"""Layer id of parameters outside the layer stack (embeddings, final norm, unembedding)."""

OUTSIDE_LAYERS_NAME = "outside the layers"
"""What reports call the parameters of :data:`OUTSIDE_LAYERS` (embeddings, position embeddings,
final norm, unembedding)."""


def layer_name(layer: int) -> str:
    """``"layer 3"``, or :data:`OUTSIDE_LAYERS_NAME` for the parameters outside the layer stack."""
    return OUTSIDE_LAYERS_NAME if int(layer) == OUTSIDE_LAYERS else f"layer {int(layer)}"


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter leaf.

    ``layer`` is the layer index of an unstacked leaf; ``layered`` marks a leading layer axis.
    ``fused`` is ``"gpt2"`` or ``"neox"`` for a fused QKV projection. ``tied`` marks an embedding
    that is also the unembedding.
    """

    path: str
    role: Role
    kind: str
    shape: tuple[int, ...]
    layered: bool = False
    layer: int | None = None
    fused: str | None = None
    tied: bool = False


Params = Mapping[str, Any]


def flatten(tree: Params, sep: str = "/") -> dict[str, Any]:
    """Nested dict → ``{"a/b/c": leaf}``."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, f"{prefix}{sep}{key}" if prefix else str(key))
        else:
            out[prefix] = node

    walk(tree, "")
    return out


def leaf_paths(tree) -> list[str]:
    """The :func:`flatten` paths of a nested dict's leaves in ``jax.tree.leaves`` order (the order
    of ``jax.flatten_util.ravel_pytree``; :func:`flatten` keeps the dict's own)."""
    keyed, _ = jax.tree_util.tree_flatten_with_path(tree)
    return ["/".join(str(getattr(k, "key", k)) for k in keys) for keys, _ in keyed]


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict:
    """``{"a/b/c": leaf}`` → nested dict (inverse of :func:`flatten`)."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split(sep)
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


@dataclasses.dataclass(frozen=True)
class ModelLayout:
    """Roles and head views of a model's parameters (see module docstring)."""

    specs: Mapping[str, ParamSpec]
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    # ---- queries ------------------------------------------------------------------------
    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"heads={self.num_heads} is not a multiple of kv_heads={self.num_kv_heads}")

    def __hash__(self) -> int:
        # A layout is immutable data; hashing it lets jitted code take it as a static argument.
        return hash((tuple(self.specs.items()), self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim))

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def kv_head_of(self) -> np.ndarray:
        """``[heads]``: the kv head each query head reads, ``h // (heads / kv_heads)``."""
        return np.arange(self.num_heads) // self.kv_groups

    def spec(self, path: str) -> ParamSpec:
        if path not in self.specs:
            raise KeyError(f"{path!r} is not a parameter of this layout")
        return self.specs[path]

    def paths(self, role: Role | str | None = None, kind: str | None = None) -> list[str]:
        """Parameter paths with the given role and/or kind, in layer order."""
        role = Role(role) if role is not None else None
        chosen = [s for s in self.specs.values() if (role is None or s.role == role) and (kind is None or s.kind == kind)]
        return [s.path for s in sorted(chosen, key=lambda s: (s.layer or 0, s.path))]

    def heads_of(self, block: str) -> int:
        """Number of heads along the head axis of a block's view."""
        return self.num_kv_heads if block in ("k", "v") else self.num_heads

    def block_sources(self, block: str, kind: str) -> list[str]:
        """Paths whose view contributes to (block, kind), in layer order."""
        if block not in ATTENTION_BLOCKS:
            raise ValueError(f"block must be one of {ATTENTION_BLOCKS}, got {block!r}")
        own = self.paths(Role(block), kind)
        fused = self.paths(Role.QKV, kind) if block != "o" else []
        if own and fused:
            raise ConfigError(f"block {block} has both separate ({own}) and fused ({fused}) {kind}s")
        return own or fused

    def attention_blocks(self) -> list[tuple[str, str]]:
        """The (block, kind) pairs present: kernels of q/k/v/o and any per-head q/k/v biases."""
        pairs = []
        for kind in ("kernel", "bias"):
            for block in ATTENTION_BLOCKS:
                if kind == "bias" and block == "o":
                    continue  # output-projection biases are not per head
                if self.block_sources(block, kind):
                    pairs.append((block, kind))
        return pairs

    # ---- head views ---------------------------------------------------------------------
    def view(self, path: str, x, block: str | None = None, *, per_layer: bool = False):
        """View one leaf (any leading axes) with explicit head axes, see the module table.

        A stacked leaf keeps its layer axis; an unstacked one gets none (see :meth:`attention`).
        ``per_layer=True`` views arrays whose trailing axes are one layer's slice of the leaf (any
        number of layers of a stacked leaf, taken out along with other leading axes).
        """
        spec = self.spec(path)
        expected = spec.shape[1:] if per_layer and spec.layered else spec.shape
        lead = x.ndim - len(expected)
        if lead < 0 or tuple(x.shape[lead:]) != expected:
            raise ValueError(f"{path}: expected trailing shape {expected}, got {x.shape}")
        hd = self.head_dim
        if spec.role == Role.QKV:
            if block not in QKV_BLOCKS:
                raise ValueError(f"{path} is a fused QKV projection: pass block= one of {QKV_BLOCKS}")
            x = _split_fused(x, spec.fused, block, self.num_heads, self.num_kv_heads, hd, spec.kind)
        elif spec.role.value != (block or spec.role.value):
            raise ValueError(f"{path} has role {spec.role.value}, not {block}")
        block = block or spec.role.value
        if block == "o":
            if spec.kind != "kernel":
                raise ValueError(f"{path}: output-projection {spec.kind} has no head axis")
            return x.reshape(*x.shape[:-2], self.num_heads, hd, x.shape[-1])
        heads = self.heads_of(block)
        if block in QKV_BLOCKS and spec.role != Role.QKV:
            x = x.reshape(*x.shape[:-1], heads, hd)
        return x

    def output_heads(self, path: str, x, block: str | None = None):
        """View a vector along a leaf's output axis (last axis of a kernel, or a bias) with heads.

        ``x[..., d_out] -> [..., heads_of_block, head_dim]``; for fused QKV leaves pass ``block``.
        Used for marginals such as per-output-channel sums of squared gradients.
        """
        spec = self.spec(path)
        if spec.role == Role.QKV:
            return _split_fused(x, spec.fused, block, self.num_heads, self.num_kv_heads, self.head_dim, "bias")
        if spec.role not in (Role.Q, Role.K, Role.V):
            raise ValueError(f"{path} ({spec.role.value}) has no heads on its output axis")
        return x.reshape(*x.shape[:-1], self.heads_of(spec.role.value), self.head_dim)

    def input_heads(self, path: str, x):
        """View a vector along an O kernel's input axis with heads: ``[..., H·hd] -> [..., H, hd]``."""
        spec = self.spec(path)
        if spec.role != Role.O or spec.kind != "kernel":
            raise ValueError(f"{path} ({spec.role.value} {spec.kind}) has no heads on its input axis")
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

    def head_index(self, path: str, block: str | None = None) -> np.ndarray:
        """``[heads_of(block), head_dim]``: where each head of ``block`` sits along the leaf's head
        axis — the output axis of a q/k/v kernel or bias (fused QKV included), the input axis of
        an O kernel. The one map from heads to positions; everything that slices a head out of a
        stored leaf without a full :meth:`view` (gathers, strided kernels) reads it here.
        """
        spec = self.spec(path)
        if spec.role == Role.O:
            width = spec.shape[-2]
            return np.asarray(self.input_heads(path, np.arange(width)))
        return np.asarray(self.output_heads(path, np.arange(spec.shape[-1]), block))

    def leaf_head_axis(self, path: str) -> int | None:
        """The axis of a leaf along which its heads sit, counted from the end: −1 for q/k/v
        kernels and biases (fused QKV included), −2 for an O kernel; None for a leaf without heads."""
        spec = self.spec(path)
        if spec.role in (Role.Q, Role.K, Role.V, Role.QKV):
            return -1
        return -2 if spec.role == Role.O and spec.kind == "kernel" else None

    def head_group(self, kv_heads: int) -> ModelLayout:
        """The layout of ``kv_heads`` kv heads and the ``kv_heads · kv_groups`` query heads that read
        them: every attention leaf's head axis cut to them, all else as it is. A group of heads
        read out of this layout's leaves (:meth:`head_positions`) is viewed with it, so code that
        works on whole layers works on a group of heads of a layer unchanged."""
        if kv_heads < 1 or self.num_kv_heads % kv_heads:
            raise ValueError(f"a head group needs a divisor of kv_heads={self.num_kv_heads}, got {kv_heads}")
        if kv_heads == self.num_kv_heads:
            return self
        specs = {}
        for path, spec in self.specs.items():
            axis = self.leaf_head_axis(path)
            shape = list(spec.shape)
            if axis is not None:
                shape[axis] = shape[axis] // self.num_kv_heads * kv_heads
            specs[path] = dataclasses.replace(spec, shape=tuple(shape))
        return dataclasses.replace(self, specs=specs, num_heads=kv_heads * self.kv_groups, num_kv_heads=kv_heads)

    def head_positions(self, path: str, kv_start: int, kv_heads: int) -> np.ndarray:
        """``[width]`` positions along the leaf's head axis (:meth:`leaf_head_axis`) of kv heads
        ``kv_start … kv_start + kv_heads − 1`` and their query heads, in the order
        :meth:`head_group` ``(kv_heads)`` views them: ``np.take(leaf, positions, axis)`` is that
        group's leaf."""
        spec, group = self.spec(path), self.head_group(kv_heads)
        kv = slice(kv_start, kv_start + kv_heads)
        q = slice(kv_start * self.kv_groups, (kv_start + kv_heads) * self.kv_groups)
        if spec.role == Role.O:
            return np.asarray(self.input_heads(path, np.arange(spec.shape[-2]))[q]).ravel()
        width = np.arange(spec.shape[-1])
        if spec.role == Role.QKV:
            return np.asarray(group.unview(path, {b: self.output_heads(path, width, b)[q if b == "q" else kv] for b in QKV_BLOCKS}))
        return np.asarray(self.output_heads(path, width)[q if spec.role == Role.Q else kv]).ravel()

    def stack_layers(self, paths: Sequence[str], value_of, axis: int = 0) -> Any:
        """Values of leaves that together cover the layers, with one layer axis: ``value_of(path)``
        of a single layer-stacked leaf as it is, or the per-layer leaves' values (``paths`` in
        layer order, e.g. :meth:`block_sources`) stacked along a new ``axis`` (0: leading;
        negative to stack behind leading sample axes).

        The one way to assemble per-layer leaves (head views, group values, Fisher slices);
        works on numpy and jax arrays.
        """
        values = [value_of(p) for p in paths]
        if len(paths) == 1 and self.specs[paths[0]].layered:
            return values[0]
        xp = jnp if isinstance(values[0], jax.Array) else np
        return xp.stack(values, axis=axis)

    def layer_rows(self, path: str, x) -> tuple[Any, np.ndarray]:
        """A leaf-shaped array as rows that each lie in one layer, and the rows' layer ids.

        A layer-stacked leaf gives ``[layers, rest]`` rows ``0 … L-1``; any other leaf one row
        ``[1, size]`` in its layer (:data:`OUTSIDE_LAYERS` outside the layer stack). Per-layer
        counts then need no per-parameter layer index.
        """
        spec = self.spec(path)
        if spec.layered and x.ndim:
            return x.reshape(x.shape[0], -1), np.arange(x.shape[0])
        return x.reshape(1, -1), np.array([OUTSIDE_LAYERS if spec.layer is None else spec.layer])

    def unview(self, path: str, views: Mapping[str, Any]):
        """Inverse of :meth:`view`: write head views back into the leaf's own layout.

        ``views`` maps block → view (all three for a fused QKV leaf).
        """
        spec = self.spec(path)
        if spec.role == Role.QKV:
            return _merge_fused(views, spec.fused, self.num_heads, self.num_kv_heads, self.head_dim, spec.kind)
        (block, v), = views.items()
        if block == "o":
            return v.reshape(*v.shape[:-3], -1, v.shape[-1])
        return v.reshape(*v.shape[:-2], -1)

    def attention(self, tree: Params) -> dict[tuple[str, str], Any]:
        """All attention blocks of a params-shaped tree as head views keyed by (block, kind).

        Unstacked per-layer leaves are stacked along a new layer axis so every value has one.
        """
        flat = tree if _is_flat(tree) else flatten(tree)
        return {
            (block, kind): self.stack_layers(
                self.block_sources(block, kind), lambda p, block=block: self.view(p, flat[p], block), axis=-(_view_rank(block, kind) + 1)
            )
            for block, kind in self.attention_blocks()
        }

    def head_axis(self, block: str, kind: str) -> int:
        """Position of the head axis in a view, counted from the end."""
        return -3 if block == "o" else -2

    def per_head(self, block: str, kind: str, view):
        """Sum a view over everything but its leading, layer and head axes: ``[..., layer, heads]``."""
        if kind == "bias":
            return view.sum(axis=-1)
        return view.sum(axis=(-2, -1) if block == "o" else (-3, -1))

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_rules(
        cls,
        params: Params,
        rules: Sequence[tuple[str, Role | str] | tuple[str, Role | str, dict]],
        *,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int,
        num_layers: int | None = None,
        layered: str | None = None,
        tied_embedding: bool = False,
    ) -> ModelLayout:
        """Build a layout by matching every leaf path against ``(regex, role[, options])`` rules.

        The first rule whose regex fully matches a path decides its role; ``options`` may give
        ``fused="gpt2" | "neox"``. Kind is the leaf name (kernel, bias, scale, embedding; ``weight``
        is read as kernel). A ``(?P<layer>\\d+)`` group gives the layer of unstacked leaves;
        leaves whose path starts with ``layered`` carry a leading layer axis. Paths no rule
        matches are an error, so a new parameter is never silently ignored.
        """
        flat = flatten(params) if not _is_flat(params) else dict(params)
        compiled = [(re.compile(r[0]), Role(r[1]), r[2] if len(r) > 2 else {}) for r in rules]
        specs, unmatched, layers_seen = {}, [], set()
        for path, leaf in flat.items():
            for regex, role, options in compiled:
                m = regex.fullmatch(path)
                if not m:
                    continue
                leaf_name = path.rsplit("/", 1)[-1]
                kind = {"weight": "kernel", "w": "kernel", "b": "bias"}.get(leaf_name, leaf_name)
                if kind not in KINDS:
                    kind = "kernel" if len(_shape(leaf)) >= 2 else "bias"
                layer = int(m.group("layer")) if "layer" in regex.groupindex else None
                is_layered = bool(layered) and path.startswith(layered)
                if layer is not None:
                    layers_seen.add(layer)
                specs[path] = ParamSpec(
                    path=path,
                    role=role,
                    kind=kind,
                    shape=_shape(leaf),
                    layered=is_layered,
                    layer=layer,
                    fused=options.get("fused"),
                    tied=tied_embedding and role == Role.EMBED,
                )
                break
            else:
                unmatched.append(path)
        if unmatched:
            raise ConfigError(f"no layout rule matches these parameters: {', '.join(sorted(unmatched))}")
        if num_layers is None:
            stacked = [s.shape[0] for s in specs.values() if s.layered]
            num_layers = stacked[0] if stacked else (max(layers_seen) + 1 if layers_seen else 0)
        return cls(specs, num_layers, num_heads, num_kv_heads or num_heads, head_dim)


def _shape(leaf) -> tuple[int, ...]:
    """Shape of an array or of an abstract ``jax.ShapeDtypeStruct``."""
    return tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(np.shape(leaf))


def _is_flat(tree) -> bool:
    return isinstance(tree, Mapping) and all(not isinstance(v, Mapping) for v in tree.values())


def _view_rank(block: str, kind: str) -> int:
    """Rank of an unstacked view (no layer axis)."""
    return 3 if kind == "kernel" else 2


def _split_fused(x, order: str, block: str, heads: int, kv_heads: int, hd: int, kind: str):
    """One of q/k/v from a fused projection's last axis, as ``[..., heads_of_block, head_dim]``."""
    index = "qkv".index(block)
    if order == "gpt2":
        widths = (heads * hd, kv_heads * hd, kv_heads * hd)
        start = sum(widths[:index])
        part = x[..., start : start + widths[index]]
        return part.reshape(*part.shape[:-1], widths[index] // hd, hd)
    if order == "neox":
        if heads != kv_heads:
            raise ConfigError("an interleaved (NeoX) fused QKV projection cannot have grouped kv heads")
        grouped = x.reshape(*x.shape[:-1], heads, 3, hd)
        return grouped[..., index, :]
    raise ConfigError(f"unknown fused QKV order {order!r} (expected 'gpt2' or 'neox')")


def _merge_fused(views: Mapping[str, Any], order: str, heads: int, kv_heads: int, hd: int, kind: str):
    xp = jnp if any(isinstance(v, jax.Array) for v in views.values()) else np
    q, k, v = (views[b] for b in "qkv")
    if order == "gpt2":
        flat = [t.reshape(*t.shape[:-2], -1) for t in (q, k, v)]
        return xp.concatenate(flat, axis=-1)
    stacked = xp.stack([q, k, v], axis=-2)
    return stacked.reshape(*stacked.shape[:-3], -1)


# ---- the families' rules --------------------------------------------------------------------

_COMMON_TAIL = [
    (r"embed/embedding", Role.EMBED),
    (r"pos_embed/embedding", Role.POS_EMBED),
    (r"final_norm/(scale|bias)", Role.NORM),
    (r"lm_head/kernel", Role.UNEMBED),
]

FAMILY_RULES: dict[str, list] = {
    "gpt2": [
        (r"layers/attn/c_attn/(kernel|bias)", Role.QKV, {"fused": "gpt2"}),
        (r"layers/attn/c_proj/kernel", Role.O),
        (r"layers/attn/c_proj/bias", Role.BIAS),
        (r"layers/mlp/c_fc/kernel", Role.MLP_IN),
        (r"layers/mlp/c_proj/kernel", Role.MLP_OUT),
        (r"layers/mlp/c_(fc|proj)/bias", Role.BIAS),
        (r"layers/ln_[12]/(scale|bias)", Role.NORM),
        *_COMMON_TAIL,
    ],
    "llama": [
        (r"layers/self_attn/q_proj/(kernel|bias)", Role.Q),
        (r"layers/self_attn/k_proj/(kernel|bias)", Role.K),
        (r"layers/self_attn/v_proj/(kernel|bias)", Role.V),
        (r"layers/self_attn/o_proj/kernel", Role.O),
        (r"layers/self_attn/o_proj/bias", Role.BIAS),
        (r"layers/mlp/gate_proj/kernel", Role.MLP_GATE),
        (r"layers/mlp/up_proj/kernel", Role.MLP_IN),
        (r"layers/mlp/down_proj/kernel", Role.MLP_OUT),
        (r"layers/mlp/\w+/bias", Role.BIAS),
        (r"layers/\w*layernorm/scale", Role.NORM),
        *_COMMON_TAIL,
    ],
    "gpt_neox": [
        (r"layers/attention/query_key_value/(kernel|bias)", Role.QKV, {"fused": "neox"}),
        (r"layers/attention/dense/kernel", Role.O),
        (r"layers/attention/dense/bias", Role.BIAS),
        (r"layers/mlp/dense_h_to_4h/kernel", Role.MLP_IN),
        (r"layers/mlp/dense_4h_to_h/kernel", Role.MLP_OUT),
        (r"layers/mlp/\w+/bias", Role.BIAS),
        (r"layers/\w*layernorm/(scale|bias)", Role.NORM),
        *_COMMON_TAIL,
    ],
}


def layout_for(config, params: Params) -> ModelLayout:
    """The layout of one of fisherjax's own decoders."""
    return ModelLayout.from_rules(
        params,
        FAMILY_RULES[config.family],
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        num_layers=config.num_layers,
        layered="layers/",
        tied_embedding=config.tie_word_embeddings,
    )
