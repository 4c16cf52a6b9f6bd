"""GPT-2: learned positions, fused ``c_attn`` with ``[Q | K | V]`` output columns, pre-LayerNorm.

Parameter names follow Hugging Face's (``attn/c_attn``, ``mlp/c_proj``...) so users recognise
them; Conv1D weights are already ``[in, out]`` and load without a transpose.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from fisherjax.config import DecoderConfig
from fisherjax.models.common import Dense, LayerNorm, Probe, activation, attend, merge_heads, split_heads


class GPT2Attention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.c_attn = Dense(d, 3 * d, use_bias=True, rngs=rngs)
        self.c_proj = Dense(d, d, use_bias=True, rngs=rngs)


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        self.c_fc = Dense(cfg.hidden_size, cfg.intermediate_size, use_bias=True, rngs=rngs)
        self.c_proj = Dense(cfg.intermediate_size, cfg.hidden_size, use_bias=True, rngs=rngs)


class GPT2Block(nnx.Module):
    """``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg, rngs)
        self.ln_2 = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg, rngs)
        self.head_dim = cfg.head_dim
        self.act = cfg.activation

    def __call__(self, x, ctx, layer, probe: Probe):
        h = probe("ln_1", self.ln_1, x)
        q, k, v = jnp.split(probe("attn/c_attn", self.attn.c_attn, h), 3, axis=-1)
        heads, probs = attend(
            split_heads(q, self.head_dim),
            split_heads(k, self.head_dim),
            split_heads(v, self.head_dim),
            ctx,
            scale=layer["scale"],
            window=layer["window"],
        )
        x = x + probe("attn/c_proj", self.attn.c_proj, merge_heads(heads))
        h = probe("mlp/c_fc", self.mlp.c_fc, probe("ln_2", self.ln_2, x))
        x = x + probe("mlp/c_proj", self.mlp.c_proj, activation(self.act)(h))
        return x, probs
