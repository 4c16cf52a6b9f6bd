"""Model: a decoder's pure apply function together with its parameters, layout and tokenizer."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from fisherjax.config import DecoderConfig
from fisherjax.errors import DataError
from fisherjax.layout import ModelLayout, layout_for
from fisherjax.models.common import DISCOVER
from fisherjax.models.decoder import Decoder, DecoderOutput

Params = dict


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A loaded decoder. ``apply`` and ``forward`` are pure functions of ``params``.

    Attributes:
      config: family-neutral :class:`~fisherjax.config.DecoderConfig`.
      params: nested dict of float arrays (block parameters stacked over layers).
      layout: :class:`~fisherjax.layout.ModelLayout` of ``params``.
      graphdef: the Flax module structure that ``params`` are merged into.
      tokenizer: a Hugging Face tokenizer, or None when the checkpoint has none.
      hf_config: the raw ``config.json`` dict (used by :func:`fisherjax.models.hf.save_pretrained`).
      source: the directory the model came from, if any.
    """

    config: DecoderConfig
    params: Params
    layout: ModelLayout
    graphdef: Any
    tokenizer: Any = None
    hf_config: dict | None = None
    source: str | None = None
    hf_names: dict | None = None

    @classmethod
    def init(cls, config: DecoderConfig, seed: int = 0, *, tokenizer=None, hf_config=None) -> Model:
        """A randomly initialised model (normal(0, 0.02) kernels, unit norms)."""
        graphdef, state = nnx.split(Decoder(config, nnx.Rngs(params=seed)))
        params = nnx.to_pure_dict(state)
        return cls(config, params, layout_for(config, params), graphdef, tokenizer, hf_config)

    def forward(
        self,
        params: Params,
        input_ids: Int[Array, "batch seq"],
        attention_mask: Int[Array, "batch seq"] | None = None,
        *,
        taps: dict | None = None,
        return_attention: bool = False,
        return_stream: bool = False,
        remat: bool = False,
        unembed: bool = True,
    ) -> DecoderOutput:
        """The full forward pass; see :class:`~fisherjax.models.decoder.Decoder`."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        check_token_ids(input_ids, self.config.vocab_size)
        module = nnx.merge(self.graphdef, params)
        return module(input_ids, attention_mask, taps=taps, return_attention=return_attention, return_stream=return_stream, remat=remat, unembed=unembed)

    def apply(
        self,
        params: Params,
        input_ids: Int[Array, "batch seq"],
        attention_mask: Int[Array, "batch seq"] | None = None,
    ) -> Float[Array, "batch seq vocab"]:
        """Logits ``[batch, seq, vocab]``."""
        return self.forward(params, input_ids, attention_mask).logits

    def hidden(self, params: Params, input_ids, attention_mask=None) -> Float[Array, "batch seq d"]:
        """The final norm's output ``[batch, seq, d]``: the forward pass without its unembedding."""
        return self.forward(params, input_ids, attention_mask, unembed=False).hidden

    def unembed(self, params: Params, h: Float[Array, "... d"]) -> Float[Array, "... vocab"]:
        """Logits of final-norm outputs ``h`` (:meth:`~fisherjax.models.decoder.Decoder.unembed`)."""
        return nnx.merge(self.graphdef, params).unembed(h)

    def residual_stream(self, params: Params, input_ids, attention_mask=None, *, unembed: bool = True):
        """``(x [layer, batch, seq, d], out)``: every block's input and, of the same plain pass, the
        logits (or with ``unembed=False`` the final norm's output ``[batch, seq, d]``)."""
        out = self.forward(params, input_ids, attention_mask, return_stream=True, unembed=unembed)
        return out.stream, (out.logits if unembed else out.hidden)

    def hidden_from(self, params: Params, x, attention_mask, start) -> Float[Array, "batch seq d"]:
        """The final norm's output from block ``start`` on, given its input ``x``
        (:meth:`~fisherjax.models.decoder.Decoder.hidden_from`)."""
        return nnx.merge(self.graphdef, params).hidden_from(x, attention_mask, start)

    def logits_from(self, params: Params, x, attention_mask, start) -> Float[Array, "batch seq vocab"]:
        """Logits from block ``start`` on, given its input ``x``
        (:meth:`~fisherjax.models.decoder.Decoder.logits_from`)."""
        return nnx.merge(self.graphdef, params).logits_from(x, attention_mask, start)

    def attentions(self, params: Params, input_ids, attention_mask=None) -> Float[Array, "layer batch heads seq seq"]:
        """Attention probabilities of every layer."""
        return self.forward(params, input_ids, attention_mask, return_attention=True).attentions

    def tap_shapes(self, batch: int, seq: int) -> dict:
        """Shapes of the zero taps a forward pass with ``taps=`` expects, per site."""
        ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
        out = jax.eval_shape(lambda p, i: self.forward(p, i, taps=DISCOVER), self.params, ids)
        return out.taps

    def zero_taps(self, batch: int, seq: int, dtype=jnp.float32) -> dict:
        return jax.tree.map(lambda s: jnp.zeros(s.shape, dtype), self.tap_shapes(batch, seq))

    def replace(self, **changes) -> Model:
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))


def check_token_ids(input_ids, vocab_size: int) -> None:
    """Raise :class:`DataError` when concrete token ids fall outside ``[0, vocab_size)``."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        raise DataError(f"token id {int(bad.flat[0])} is outside the model's vocabulary (size {vocab_size})")
