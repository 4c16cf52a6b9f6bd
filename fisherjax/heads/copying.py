"""Copying score of every (layer, query head), from the weights alone.

For ``S`` probe tokens ``s`` (ordinary tokens of the vocabulary, :func:`~fisherjax.heads.probes.
ordinary_tokens`, sampled without replacement), what does head ``h`` of layer ``l`` write to the
logits when it attends to ``s``?

    x_s = norm_l(E[s])                          the layer's attention-input norm (ln_1 /
                                                input_layernorm) of the token's embedding row;
                                                no position is added (GPT-2 included)
    v_s = x_s W_V^{kv(h)} + b_V^{kv(h)}          the value of query head h's kv head (GQA:
                                                kv(h) = ``layout.kv_head_of[h]``)
    o_s = v_s W_O^h                             the head's share of the attention output
    R[s, s'] = (n(o_s) ⊙ γ_f) · W_U[:, s']      the final norm's normalisation n (centring for a
                                                LayerNorm, then division by the RMS) and scale γ_f,
                                                then the unembedding (Eᵀ when tied)

``copying[l, h] = mean_s (1 − rank_s / (S − 1))`` where ``rank_s`` is the number of probe tokens
``s'`` with ``R[s, s'] > R[s, s]`` (0 = the attended token gets the highest logit). 1: the head
always raises the token it attends to the most; about 0.5 for a head unrelated to copying; 0: it
lowers it the most. The final norm's bias and the output projection's bias are left out: both add
the same logit vector whatever the head attends to, so they carry no copying signal (they would
shift every row by the same prior).

The norm kind is read from the parameters: a norm with a bias is a LayerNorm, one without is an
RMSNorm (the families fisherjax loads). All layers and heads are one einsum, taken a few layers at
a time (``jax.lax.map``) so the ``[layers, heads, S, d_model]`` intermediate stays within a
memory budget on large models.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from fisherjax.errors import ConfigError
from fisherjax.heads.probes import ordinary_tokens
from fisherjax.layout import Role, flatten
from fisherjax.models import check_token_ids

ATTENTION_INPUT_NORMS = ("ln_1", "input_layernorm")
"""Names of the norm each block applies before its attention (GPT-2; Llama and GPT-NeoX)."""

MAX_TOKENS = 512
BUDGET_BYTES = 512 * 2**20
"""Memory the per-layer intermediates of one ``lax.map`` step may take."""


def copying_tokens(model, *, n_tokens: int = 256, seed: int = 0) -> np.ndarray:
    """``min(n_tokens, 512, #ordinary tokens)`` distinct ordinary token ids, sorted, seeded."""
    tokens = ordinary_tokens(model)
    count = min(int(n_tokens), MAX_TOKENS, tokens.size)
    if count < 2:
        raise ConfigError(f"the copying score needs at least 2 probe tokens, got n_tokens={n_tokens}")
    return np.sort(np.random.default_rng([seed, 2]).choice(tokens, size=count, replace=False))


def copying_scores(model, params=None, *, n_tokens: int = 256, seed: int = 0, tokens=None) -> Float[Array, "layer head"]:
    """``copying [layer, head]`` (see the module docstring) on :func:`copying_tokens`, or on the
    given ``tokens`` ids."""
    params = model.params if params is None else params
    layout = model.layout
    flat = flatten(params)
    if tokens is None:
        tokens = copying_tokens(model, n_tokens=n_tokens, seed=seed)
    tokens = np.asarray(tokens, np.int64)
    if tokens.ndim != 1 or not 2 <= tokens.size <= MAX_TOKENS or np.unique(tokens).size != tokens.size:
        raise ConfigError(f"copying tokens must be 2 to {MAX_TOKENS} distinct ids, got shape {tokens.shape}")
    check_token_ids(tokens, model.config.vocab_size)
    views = layout.attention(params)
    w_v, w_o = views[("v", "kernel")], views[("o", "kernel")]
    b_v = views.get(("v", "bias"), jnp.zeros(w_v.shape[:1] + w_v.shape[2:], w_v.dtype))
    in_scale, in_bias = _norm_leaves(flat, _attention_input_norm(layout))
    out_scale, out_bias = _norm_leaves(flat, _final_norm(layout))
    embed = jnp.asarray(flat[_single(layout.paths(Role.EMBED, "embedding"), "embedding")])
    unembed = layout.paths(Role.UNEMBED, "kernel")
    columns = jnp.asarray(flat[_single(unembed, "unembedding")])[:, tokens] if unembed else embed[tokens].T
    per_layer = 4 * layout.num_heads * tokens.size * (w_o.shape[-1] + tokens.size) * 3
    return _scores(
        embed[tokens], (in_scale, in_bias, w_v, b_v, w_o), out_scale, columns,
        kv_head_of=tuple(int(k) for k in layout.kv_head_of),
        eps=float(model.config.norm_eps),
        centred=(in_bias is not None, out_bias is not None),
        batch=int(max(1, min(layout.num_layers, BUDGET_BYTES // per_layer))),
    )


@partial(jax.jit, static_argnames=("kv_head_of", "eps", "centred", "batch"))
def _scores(rows, per_layer, out_scale, columns, *, kv_head_of, eps, centred, batch):
    kv = jnp.asarray(kv_head_of)

    def layer(xs):
        in_scale, in_bias, w_v, b_v, w_o = xs
        x = _normalise(rows, centred[0], eps) * in_scale
        if in_bias is not None:
            x = x + in_bias
        v = jnp.einsum("sd,dke->ske", x, w_v) + b_v
        o = jnp.einsum("she,hed->hsd", v[:, kv], w_o)
        logits = jnp.einsum("hsd,dt->hst", _normalise(o, centred[1], eps) * out_scale, columns)
        own = jnp.diagonal(logits, axis1=-2, axis2=-1)
        rank = (logits > own[..., None]).sum(-1)
        return (1.0 - rank / (rows.shape[0] - 1)).mean(-1)

    return jax.lax.map(layer, per_layer, batch_size=batch)


def _normalise(x, centred: bool, eps: float):
    """LayerNorm's (centred) or RMSNorm's normalisation over the last axis, in float32."""
    x = x.astype(jnp.float32)
    if centred:
        x = x - x.mean(-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps)


def _attention_input_norm(layout) -> str:
    """The ``.../scale`` path of the layer-stacked norm in front of the attention."""
    found = [
        p for p in layout.paths(Role.NORM, "scale")
        if layout.spec(p).layered and p.rsplit("/", 2)[-2] in ATTENTION_INPUT_NORMS
    ]
    return _single(found, f"attention-input norm (one of {', '.join(ATTENTION_INPUT_NORMS)}, stacked over layers)")


def _final_norm(layout) -> str:
    found = [p for p in layout.paths(Role.NORM, "scale") if not layout.spec(p).layered and layout.spec(p).layer is None]
    return _single(found, "final norm")


def _norm_leaves(flat, scale_path: str):
    """(scale, bias or None) of the norm whose scale lives at ``scale_path``."""
    bias_path = scale_path.rsplit("/", 1)[0] + "/bias"
    bias = flat.get(bias_path)
    return jnp.asarray(flat[scale_path]), None if bias is None else jnp.asarray(bias)


def _single(paths, what: str) -> str:
    if len(paths) != 1:
        raise ConfigError(f"the copying score needs exactly one {what}; the layout has {len(paths)}: {paths}")
    return paths[0]
