"""Building blocks shared by the Flax decoders.

Every parametrised module here has two ways to be called:

* ``module(x)``: the plain forward pass;
* ``module.site(x) -> (y, recorded)``: the forward pass plus what a per-sample gradient of its
  parameters needs besides the output gradient ``δ = ∂L/∂y`` — the dense input ``a`` (kernel
  gradient ``Σ_t a_t δ_tᵀ``), the normalised input ``x̂`` of a norm (scale gradient
  ``Σ_t x̂_t ⊙ δ_t``), or the token ids of an embedding (row gradient ``Σ_{t: id_t = v} δ_t``).

:class:`Probe` routes calls through ``site`` only when the caller asked for taps, so the model
code reads the same either way. A tap is a zero array added to a module's output; the gradient of
the loss with respect to it is δ, for every sample at once, from one batched backward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from fisherjax.activations import ACTIVATIONS
from fisherjax.errors import ConfigError

def activation(name: str):
    """The activation function named like Hugging Face's ``ACT2FN`` keys.

    Wrapped in ``jax.checkpoint``: the backward pass recomputes it from its input instead of
    keeping the tanh/erf intermediates, each a ``[layer, batch, seq, intermediate]`` array the
    scanned layers would otherwise write and read back (a measurable share of a Phase 1
    step on CPU, where the step is bound by memory traffic).
    """
    if name not in ACTIVATIONS:
        raise ConfigError(f"activation {name!r} is not supported (supported: {', '.join(sorted(ACTIVATIONS))})")
    return jax.checkpoint(ACTIVATIONS[name])


def _normal(rngs: nnx.Rngs, shape, std=0.02):
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` with a Flax-layout kernel ``[d_in, d_out]``."""

    def __init__(self, d_in: int, d_out: int, *, use_bias: bool, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_normal(rngs, (d_in, d_out)))
        self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32)) if use_bias else None

    def __call__(self, x: Float[Array, "... d_in"]) -> Float[Array, "... d_out"]:
        y = x @ self.kernel[...]
        return y if self.bias is None else y + self.bias[...]

    def site(self, x):
        return self(x), x


class LayerNorm(nnx.Module):
    """``y = (x - mean) / sqrt(var + eps) * scale + bias`` over the last axis, in float32."""

    def __init__(self, dim: int, *, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.eps = eps

    def normalize(self, x):
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps)

    def __call__(self, x):
        return self.normalize(x) * self.scale[...] + self.bias[...]

    def site(self, x):
        x_hat = self.normalize(x)
        return x_hat * self.scale[...] + self.bias[...], x_hat


class RMSNorm(nnx.Module):
    """``y = x / sqrt(mean(x²) + eps) * scale`` over the last axis, in float32 (Llama's RMSNorm)."""

    def __init__(self, dim: int, *, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def normalize(self, x):
        return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)

    def __call__(self, x):
        return self.normalize(x) * self.scale[...]

    def site(self, x):
        x_hat = self.normalize(x)
        return x_hat * self.scale[...], x_hat


class Embed(nnx.Module):
    """Row lookup in an ``[num, dim]`` table; also the tied unembedding ``h @ tableᵀ``."""

    def __init__(self, num: int, dim: int, *, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_normal(rngs, (num, dim)))

    def __call__(self, ids: Int[Array, "..."]) -> Float[Array, "... dim"]:
        return jnp.take(self.embedding[...], ids, axis=0)

    def site(self, ids):
        return self(ids), ids

    def attend(self, h: Float[Array, "... dim"]) -> Float[Array, "... num"]:
        return h @ self.embedding[...].T


class TiedUnembed(nnx.Module):
    """Site wrapper for a tied output head: logits ``h @ Eᵀ``, recording ``h``.

    Holds a reference to the embedding module, not a copy, so the parameter appears once.
    """

    def __init__(self, embed: Embed):
        self.embed = embed

    def __call__(self, h):
        return self.embed.attend(h)

    def site(self, h):
        return self.embed.attend(h), h


@dataclasses.dataclass
class Probe:
    """Routes module calls through their sites when taps are requested.

    ``taps`` maps site names to zero arrays shaped like each module's output, or is ``None`` for
    a plain forward pass, or :data:`DISCOVER` to create the zero taps on the fly (used under
    ``jax.eval_shape`` to learn their shapes). ``recorded`` collects, per site, the input its
    per-sample gradient needs; the forward pass returns it, nothing keeps it between calls.
    """

    taps: Mapping[str, Array] | str | None = None
    recorded: dict[str, Array] = dataclasses.field(default_factory=dict)
    created: dict[str, Array] = dataclasses.field(default_factory=dict)

    def __call__(self, name: str, module: nnx.Module, x):
        if self.taps is None:
            return module(x)
        y, self.recorded[name] = module.site(x)
        if self.taps is DISCOVER:
            self.created[name] = jnp.zeros_like(y)
            return y
        return y + self.taps[name]

    def layer(self, taps_of_layer) -> Probe:
        """A fresh probe for one scanned layer, given that layer's slice of the taps."""
        return Probe(taps_of_layer if self.taps is not DISCOVER else DISCOVER)


DISCOVER = "discover"
"""Sentinel for :class:`Probe`: create zero taps instead of reading them."""


# ---------------------------------------------------------------------------------------------
# Positions, masks, rotary embeddings and attention
# ---------------------------------------------------------------------------------------------


def positions_from_mask(attention_mask: Int[Array, "batch seq"]) -> Int[Array, "batch seq"]:
    """Position ids = cumulative count of real tokens minus one (0 on padding).

    A left-padded sample then gets the same positions, hence the same logits, as unpadded.
    """
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0) * mask


@dataclasses.dataclass(frozen=True)
class AttentionContext:
    """Per-batch inputs every attention layer shares.

    ``allowed[b, q, k]`` is causal attention restricted to real keys; the diagonal is always
    allowed so that a padded query row never has every key masked (0/0 in softmax would give NaN
    whose gradient poisons the whole batch even where the loss is masked). ``distance = q - k``
    lets each layer apply its own sliding window. ``cos``/``sin`` are the rotary tables
    ``[batch, seq, rotary_dim]`` or None for learned positions.
    """

    allowed: Bool[Array, "batch seq seq"]
    distance: Int[Array, "seq seq"]
    cos: Float[Array, "batch seq rot"] | None
    sin: Float[Array, "batch seq rot"] | None

    def tree_flatten(self):
        return (self.allowed, self.distance, self.cos, self.sin), None

    @classmethod
    def tree_unflatten(cls, _, leaves):
        return cls(*leaves)


jax.tree_util.register_pytree_node(AttentionContext, AttentionContext.tree_flatten, AttentionContext.tree_unflatten)


def attention_context(attention_mask, positions, rope_tables=None) -> AttentionContext:
    """Build the shared mask and rotary tables for a batch (see :class:`AttentionContext`)."""
    seq = attention_mask.shape[-1]
    idx = jnp.arange(seq)
    distance = idx[:, None] - idx[None, :]
    key_ok = attention_mask.astype(bool)[:, None, :]
    allowed = ((distance >= 0)[None] & key_ok) | (distance == 0)[None]
    cos = sin = None
    if rope_tables is not None:
        inv_freq, scale = rope_tables
        freqs = positions[..., None].astype(jnp.float32) * inv_freq
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.cos(emb) * scale, jnp.sin(emb) * scale
    return AttentionContext(allowed=allowed, distance=distance, cos=cos, sin=sin)


def apply_rotary(x: Float[Array, "batch seq heads head_dim"], cos, sin) -> Float[Array, "batch seq heads head_dim"]:
    """Rotate the first ``rotary_dim`` dims of each head (rotate-half convention); the rest pass."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = x_rot * cos + rotated * sin
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


def attend(
    q: Float[Array, "batch seq heads head_dim"],
    k: Float[Array, "batch seq kv_heads head_dim"],
    v: Float[Array, "batch seq kv_heads head_dim"],
    ctx: AttentionContext,
    *,
    scale: Float[Array, ""] | float,
    window: Int[Array, ""] | int = 0,
) -> tuple[Float[Array, "batch seq heads head_dim"], Float[Array, "batch heads seq seq"]]:
    """Grouped-query softmax attention; query head ``h`` reads kv head ``h // (heads / kv_heads)``.

    ``softmax(q kᵀ · scale + mask) v`` with the mask of ``ctx`` and, when ``window > 0``, keys
    restricted to ``q - k < window``. Returns the output and the probabilities
    ``[batch, heads, q, k]``.
    """
    b, t, heads, hd = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    qg = q.reshape(b, t, kv_heads, groups, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k) * scale
    allowed = ctx.allowed & ((window <= 0) | (ctx.distance < window) | (ctx.distance == 0))[None]
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, heads, hd)
    return out, probs.reshape(b, heads, t, t)


def split_heads(x: Float[Array, "batch seq width"], head_dim: int) -> Float[Array, "batch seq heads head_dim"]:
    """``[..., heads * head_dim] -> [..., heads, head_dim]`` (Hugging Face's head-major order)."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // head_dim, head_dim)


def merge_heads(x: Float[Array, "batch seq heads head_dim"]) -> Float[Array, "batch seq width"]:
    return x.reshape(*x.shape[:-2], -1)


LayerInputs = Mapping[str, Any]
"""Per-layer scan inputs: ``scale`` (attention scale) and ``window`` (sliding window, 0 = off)."""
