"""The Llama family (Llama, Mistral, Qwen2): RMSNorm, RoPE, grouped-query attention, gated MLP.

Differences between the three are config values, not code: Qwen2 has q/k/v biases, Mistral and
Qwen2 may have sliding windows, Llama may carry ``attention_bias`` / ``mlp_bias`` and llama3 rope
scaling.
"""

from __future__ import annotations

from flax import nnx

from fisherjax.config import DecoderConfig
from fisherjax.models.common import Dense, Probe, RMSNorm, activation, apply_rotary, attend, merge_heads, split_heads


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = Dense(d, cfg.num_heads * hd, use_bias=cfg.qkv_bias, rngs=rngs)
        self.k_proj = Dense(d, cfg.num_kv_heads * hd, use_bias=cfg.qkv_bias, rngs=rngs)
        self.v_proj = Dense(d, cfg.num_kv_heads * hd, use_bias=cfg.qkv_bias, rngs=rngs)
        self.o_proj = Dense(cfg.num_heads * hd, d, use_bias=cfg.o_bias, rngs=rngs)


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Dense(d, f, use_bias=cfg.mlp_bias, rngs=rngs)
        self.up_proj = Dense(d, f, use_bias=cfg.mlp_bias, rngs=rngs)
        self.down_proj = Dense(f, d, use_bias=cfg.mlp_bias, rngs=rngs)


class LlamaBlock(nnx.Module):
    """``x + attn(norm(x))`` then ``x + down(act(gate(norm(x))) * up(norm(x)))``."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = LlamaMLP(cfg, rngs)
        self.head_dim = cfg.head_dim
        self.act = cfg.activation

    def __call__(self, x, ctx, layer, probe: Probe):
        attn, mlp, hd = self.self_attn, self.mlp, self.head_dim
        h = probe("input_layernorm", self.input_layernorm, x)
        q = apply_rotary(split_heads(probe("self_attn/q_proj", attn.q_proj, h), hd), ctx.cos, ctx.sin)
        k = apply_rotary(split_heads(probe("self_attn/k_proj", attn.k_proj, h), hd), ctx.cos, ctx.sin)
        v = split_heads(probe("self_attn/v_proj", attn.v_proj, h), hd)
        heads, probs = attend(q, k, v, ctx, scale=layer["scale"], window=layer["window"])
        x = x + probe("self_attn/o_proj", attn.o_proj, merge_heads(heads))
        h = probe("post_attention_layernorm", self.post_attention_layernorm, x)
        gated = activation(self.act)(probe("mlp/gate_proj", mlp.gate_proj, h)) * probe("mlp/up_proj", mlp.up_proj, h)
        x = x + probe("mlp/down_proj", mlp.down_proj, gated)
        return x, probs
