"""The decoder shared by every family: embeddings → scanned blocks → final norm → unembedding.

Layers are stacked: every block parameter carries a leading ``layer`` axis and the forward pass
is one ``jax.lax.scan``, so compile time does not grow with depth and analyses can einsum over
layers. Parameter paths are ``embed/embedding``, ``pos_embed/embedding`` (GPT-2), ``layers/...``
(family names, stacked), ``final_norm/...`` and ``lm_head/kernel`` (untied heads).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from fisherjax.config import DecoderConfig
from fisherjax.errors import ConfigError
from fisherjax.models.common import (
    DISCOVER,
    Dense,
    Embed,
    LayerNorm,
    Probe,
    RMSNorm,
    TiedUnembed,
    attention_context,
    positions_from_mask,
)
from fisherjax.models.gpt2 import GPT2Block
from fisherjax.models.gpt_neox import NeoXBlock
from fisherjax.models.llama import LlamaBlock

BLOCKS = {"gpt2": GPT2Block, "llama": LlamaBlock, "gpt_neox": NeoXBlock}


class DecoderOutput(NamedTuple):
    """What a forward pass returns.

    ``attentions``: ``[layer, batch, heads, seq, seq]`` when asked for, else None.
    ``recorded``: per site, the input its per-sample gradient needs (only with taps).
    ``taps``: the zero taps created in discovery mode (only with ``taps=DISCOVER``).
    ``stream``: ``[layer, batch, seq, d]``, every block's input, when asked for, else None.
    ``hidden``: ``[batch, seq, d]``, the final norm's output (what the unembedding multiplies).
    ``logits`` is None for a pass with ``unembed=False``.
    """

    logits: Float[Array, "batch seq vocab"] | None
    attentions: Float[Array, "layer batch heads seq seq"] | None = None
    recorded: dict | None = None
    taps: dict | None = None
    stream: Float[Array, "layer batch seq d"] | None = None
    hidden: Float[Array, "batch seq d"] | None = None


class Decoder(nnx.Module):
    """A causal language model of any supported family, with layer-stacked blocks."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        if cfg.family not in BLOCKS:
            raise ConfigError(f"no Flax decoder for family {cfg.family!r}")
        self.config = cfg
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        if cfg.rope is None:
            self.pos_embed = Embed(cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs)

        @nnx.vmap(in_axes=0, out_axes=0)
        def stacked_blocks(key):
            return BLOCKS[cfg.family](cfg, nnx.Rngs(params=key))

        self.layers = stacked_blocks(jax.random.split(rngs.params(), cfg.num_layers))
        norm = LayerNorm if cfg.family in ("gpt2", "gpt_neox") else RMSNorm
        self.final_norm = norm(cfg.hidden_size, eps=cfg.norm_eps)
        if cfg.tie_word_embeddings:
            self.lm_head = TiedUnembed(self.embed)
        else:
            self.lm_head = Dense(cfg.hidden_size, cfg.vocab_size, use_bias=False, rngs=rngs)

    def __call__(
        self,
        input_ids: Int[Array, "batch seq"],
        attention_mask: Int[Array, "batch seq"],
        *,
        taps: dict | str | None = None,
        return_attention: bool = False,
        return_stream: bool = False,
        remat: bool = False,
        unembed: bool = True,
    ) -> DecoderOutput:
        """Logits of every position; padding never leaks into real positions.

        Args:
          input_ids, attention_mask: ``[batch, seq]``; either padding side works.
          taps: None for a plain pass; a dict of zero arrays per site (``layers/...`` entries
            stacked over layers) to differentiate through; or ``DISCOVER`` to create them.
          return_attention: also return attention probabilities of every layer.
          return_stream: also return every block's input (what :meth:`logits_from` resumes from).
          remat: recompute each block in the backward pass instead of storing its activations.
          unembed: False stops at the final norm (``hidden``), for scores that unembed only the
            predicted positions (:func:`fisherjax.grads.hidden_scores`).
        """
        probe = Probe(taps if taps is DISCOVER or taps is None else _top_level(taps))
        positions, ctx, per_layer = self._context(attention_mask)
        x = probe("embed", self.embed, input_ids)
        if self.config.rope is None:
            x = x + probe("pos_embed", self.pos_embed, positions)
        layer_taps = None if taps is None or taps is DISCOVER else taps.get("layers")
        graphdef, layer_params = nnx.split(self.layers)

        def block(carry, xs):
            params, layer, tap = xs
            inputs = carry
            layer_probe = probe.layer(tap) if taps is not None else Probe(None)
            carry, probs = nnx.merge(graphdef, params)(carry, ctx, layer, layer_probe)
            ys = (
                probs if return_attention else None,
                layer_probe.recorded or None,
                layer_probe.created or None,
                inputs if return_stream else None,
            )
            return carry, ys

        if remat:
            block = jax.checkpoint(block)
        x, (attentions, layer_recorded, layer_created, stream) = jax.lax.scan(
            block, x, (layer_params, per_layer, layer_taps)
        )
        x = probe("final_norm", self.final_norm, x)
        logits = probe("lm_head", self.lm_head, x) if unembed else None
        recorded = taps_created = None
        if taps is not None:
            recorded = {**probe.recorded, "layers": layer_recorded}
        if taps is DISCOVER:
            taps_created = {**probe.created, "layers": layer_created}
        return DecoderOutput(logits, attentions, recorded, taps_created, stream, x)

    def _context(self, attention_mask):
        """``(positions, attention context, per-layer scalars)`` of a batch, shared by every pass."""
        cfg = self.config
        positions = positions_from_mask(attention_mask)
        rope_tables = None
        if cfg.rope is not None:
            inv_freq, rope_scale = cfg.rope.inverse_frequencies()
            rope_tables = (jnp.asarray(inv_freq), rope_scale)
        per_layer = {
            "scale": jnp.asarray(cfg.attention_scales, jnp.float32),
            "window": jnp.asarray(cfg.sliding_windows, jnp.int32),
        }
        return positions, attention_context(attention_mask, positions, rope_tables), per_layer

    def unembed(self, h: Float[Array, "... d"]) -> Float[Array, "... vocab"]:
        """Logits of final-norm outputs ``h`` (any leading axes)."""
        return self.lm_head(h)

    def hidden_from(
        self, x: Float[Array, "batch seq d"], attention_mask: Int[Array, "batch seq"], start
    ) -> Float[Array, "batch seq d"]:
        """The final norm's output after blocks ``start … layer − 1`` on ``x``, the input of block
        ``start`` (a traced index may be given: the blocks run in a ``fori_loop`` from it). Equal
        to the full pass's ``hidden`` when ``x = x_start`` of :meth:`__call__`'s ``stream``; with
        other parameters from ``start`` on, the pass of those parameters whose first ``start``
        blocks are unchanged (what a single-head ablation needs)."""
        _, ctx, per_layer = self._context(attention_mask)
        graphdef, layer_params = nnx.split(self.layers)

        def block(layer, carry):
            params = jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, layer, keepdims=False), layer_params)
            scalars = {k: v[layer] for k, v in per_layer.items()}
            return nnx.merge(graphdef, params)(carry, ctx, scalars, Probe(None))[0]

        return self.final_norm(jax.lax.fori_loop(start, self.config.num_layers, block, x))

    def logits_from(
        self, x: Float[Array, "batch seq d"], attention_mask: Int[Array, "batch seq"], start
    ) -> Float[Array, "batch seq vocab"]:
        """:meth:`hidden_from`, unembedded."""
        return self.unembed(self.hidden_from(x, attention_mask, start))


def _top_level(taps: dict) -> dict:
    return {k: v for k, v in taps.items() if k != "layers"}
