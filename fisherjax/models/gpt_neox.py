"""GPT-NeoX (Pythia): parallel residual, partial rotary, fused ``query_key_value``.

The fused projection's output columns interleave per head as ``[head, (q, k, v), head_dim]``,
unlike GPT-2's ``[Q | K | V]`` blocks; :mod:`fisherjax.layout` knows both orders.
"""

from __future__ import annotations

from flax import nnx

from fisherjax.config import DecoderConfig
from fisherjax.models.common import Dense, LayerNorm, Probe, activation, apply_rotary, attend, merge_heads


class NeoXAttention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.query_key_value = Dense(d, 3 * d, use_bias=cfg.qkv_bias, rngs=rngs)
        self.dense = Dense(d, d, use_bias=cfg.o_bias, rngs=rngs)


class NeoXMLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        self.dense_h_to_4h = Dense(cfg.hidden_size, cfg.intermediate_size, use_bias=True, rngs=rngs)
        self.dense_4h_to_h = Dense(cfg.intermediate_size, cfg.hidden_size, use_bias=True, rngs=rngs)


class NeoXBlock(nnx.Module):
    """Parallel: ``x + attn(ln_in(x)) + mlp(ln_post(x))``; sequential when configured so."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        self.input_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attention = NeoXAttention(cfg, rngs)
        self.mlp = NeoXMLP(cfg, rngs)
        self.head_dim = cfg.head_dim
        self.parallel = cfg.parallel_residual
        self.act = cfg.activation

    def __call__(self, x, ctx, layer, probe: Probe):
        h = probe("input_layernorm", self.input_layernorm, x)
        qkv = probe("attention/query_key_value", self.attention.query_key_value, h)
        qkv = qkv.reshape(*qkv.shape[:-1], -1, 3, self.head_dim)
        q, k, v = (qkv[..., i, :] for i in range(3))
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        heads, probs = attend(q, k, v, ctx, scale=layer["scale"], window=layer["window"])
        attn_out = probe("attention/dense", self.attention.dense, merge_heads(heads))
        mlp_in = x if self.parallel else x + attn_out
        h = probe("post_attention_layernorm", self.post_attention_layernorm, mlp_in)
        h = activation(self.act)(probe("mlp/dense_h_to_4h", self.mlp.dense_h_to_4h, h))
        mlp_out = probe("mlp/dense_4h_to_h", self.mlp.dense_4h_to_h, h)
        return x + attn_out + mlp_out if self.parallel else mlp_in + mlp_out, probs
