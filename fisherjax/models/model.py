"""Model: a decoder's pure apply function together with its parameters, layout and tokenizer."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
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
    def abstract(cls, config: DecoderConfig) -> Model:
        """A model of ``config`` whose parameters are ``jax.ShapeDtypeStruct`` leaves (float32):
        shapes only, nothing allocated (:func:`abstract_decoder`)."""
        graphdef, params = abstract_decoder(config)
        return cls(config, params, layout_for(config, params), graphdef)

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

    @functools.cached_property
    def signature(self) -> ModelSignature:
        """What traced code sees of this model (:class:`ModelSignature`): a cache key for
        programs that take the parameters as arguments."""
        leaves, treedef = jax.tree.flatten(self.params)
        avals = tuple((tuple(np.shape(x)), np.dtype(x.dtype)) for x in leaves)
        return ModelSignature(self.config, self.graphdef, self.layout, treedef, avals)

    @property
    def static(self) -> Model:
        """This model as a static argument of ``jax.jit`` (:func:`model_jit`): the abstract model
        of its signature (:func:`static_model`), one object per signature (of the 32 last used)
        and holding no weights.
        A model loaded again hits the caches of the functions jitted for the first, and those
        caches keep no weights alive."""
        return static_model(self.signature)

    def tap_shapes(self, batch: int, seq: int) -> dict:
        """Shapes of the zero taps a forward pass with ``taps=`` expects, per site
        (kept per signature and shape: :func:`tap_shapes`)."""
        return tap_shapes(self.signature, batch, seq)

    def zero_taps(self, batch: int, seq: int, dtype=jnp.float32) -> dict:
        return jax.tree.map(lambda s: jnp.zeros(s.shape, dtype), self.tap_shapes(batch, seq))

    def replace(self, **changes) -> Model:
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))

    @property
    def parameter_bytes(self) -> int:
        """Bytes of all parameters (``Σ size × itemsize``; abstract parameters too)."""
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(self.params))


@dataclasses.dataclass(frozen=True)
class ModelSignature:
    """A model without its weights: architecture, module structure, layout, and the parameters'
    tree, shapes and dtypes. Two models with equal signatures trace to the same programs when
    their parameters are arguments, so it keys what is built once per model
    (:func:`tap_shapes`, :func:`fisherjax.fisher.step.compiled_step`) without holding the weights."""

    config: DecoderConfig
    graphdef: Any
    layout: ModelLayout
    treedef: Any
    avals: tuple

    def __hash__(self) -> int:
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        """Hashed once: every call of a :func:`model_jit` function looks its model's signature up."""
        return hash((self.config, self.graphdef, self.layout, self.treedef, self.avals))

    def model(self) -> Model:
        """A :class:`Model` of this signature with ``jax.ShapeDtypeStruct`` parameters."""
        params = jax.tree.unflatten(self.treedef, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in self.avals])
        return Model(self.config, params, self.layout, self.graphdef)


@functools.lru_cache(maxsize=32)
def abstract_decoder(config: DecoderConfig) -> tuple[Any, dict]:
    """``(graphdef, params)`` of a :class:`~fisherjax.models.decoder.Decoder` of ``config``, the
    parameters ``jax.ShapeDtypeStruct`` leaves: Flax's ``nnx.eval_shape`` of its construction,
    traced once per config (``functools.lru_cache``). Callers get the cached tree: copy it before
    changing it."""
    abstract = nnx.eval_shape(lambda: Decoder(config, nnx.Rngs(params=0)))
    return nnx.graphdef(abstract), nnx.to_pure_dict(nnx.state(abstract))


@functools.lru_cache(maxsize=32)
def static_model(signature: ModelSignature) -> Model:
    """The one abstract :class:`Model` of ``signature`` (``functools.lru_cache``): what
    :attr:`Model.static` hands to ``jax.jit``, whose static arguments are hashed by identity."""
    return signature.model()


def model_jit(fun: Callable | None = None, **jit_options) -> Callable:
    """``jax.jit(fun, **jit_options)`` for a ``fun`` whose first argument is a :class:`Model`,
    static in ``jit_options``: every call (and ``.lower``) passes the model's :attr:`Model.static`
    in its place. Traced code reaches the weights only through the parameters it is given;
    reading the static model's ``params`` gives shapes, not numbers. Usable as
    ``@model_jit(static_argnums=0)``."""
    if fun is None:
        return functools.partial(model_jit, **jit_options)
    jitted = jax.jit(fun, **jit_options)

    @functools.wraps(fun)
    def call(model: Model, *args, **kwargs):
        return jitted(model.static, *args, **kwargs)

    call.lower = lambda model, *args, **kwargs: jitted.lower(model.static, *args, **kwargs)
    return call


@functools.lru_cache(maxsize=256)
def tap_shapes(signature: ModelSignature, batch: int, seq: int) -> dict:
    """``{site: jax.ShapeDtypeStruct}``: the zero taps a forward pass of a model of ``signature``
    with ``taps=`` expects, for ``[batch, seq]`` token ids — ``jax.eval_shape`` of that pass, traced
    once per (signature, batch, seq) (``functools.lru_cache``): the Phase 1 step, the K-FAC
    factors and every site listing ask for it, often inside traces of their own."""
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    model = static_model(signature)
    return jax.eval_shape(lambda p, i: model.forward(p, i, taps=DISCOVER), model.params, ids).taps


def check_token_ids(input_ids, vocab_size: int) -> None:
    """Raise :class:`DataError` when concrete token ids fall outside ``[0, vocab_size)``."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        raise DataError(f"token id {int(bad.flat[0])} is outside the model's vocabulary (size {vocab_size})")
