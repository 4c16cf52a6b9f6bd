"""Per-sample losses and gradients.

For sample ``i`` with labels ``y`` (``-100`` ignored, Hugging Face's one-token shift):
``L_i = Σ_t −log p(y_{t+1} | x_≤t, θ)``, ``T_i`` = number of predicted tokens,
``g_i = ∇_θ L_i`` (token sum, signed). A label counts only when the position that predicts it is
a real token (:func:`fisherjax.data.predicted_labels`, applied by every function here that takes
an attention mask), so a hand-built left-padded batch gives the same numbers as a right-padded one.

:func:`per_sample_grads` is the direct definition, ``jax.vmap(jax.grad(L_i))``, processed in
chunks of samples (``jax.lax.map`` with ``batch_size``) so a batch never holds more per-sample
gradients than its memory budget allows. Phase 1 uses a faster route for the same numbers
(:mod:`fisherjax.fisher.sites`); this one is the definition it is tested against and the way to
get full per-sample gradients of arbitrary parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PyTree

from fisherjax import backend
from fisherjax.data import IGNORE, Batch, num_active_tokens, predicted_labels
from fisherjax.layout import flatten, unflatten
from fisherjax.models.model import model_jit


class PerSample(NamedTuple):
    """Per-sample results with a leading sample axis ``n``."""

    grads: PyTree  # params-shaped (or the selected subset), each leaf [n, *shape]
    losses: Float[Array, " n"]
    tokens: Int[Array, " n"]


def token_nll(logits: Float[Array, "batch seq vocab"], labels: Int[Array, "batch seq"]) -> Float[Array, "batch seq_1"]:
    """``−log p(labels[t+1] | ≤ t)`` per position, 0 where the label is ``-100``; ``[batch, seq − 1]``.

    The targets are shifted rather than the logits, so the ``[batch, seq, vocab]`` array is never
    sliced or copied; the gradient is :func:`_position_nll`'s fused ``softmax − one_hot``.
    """
    targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], axis=1)
    return _position_nll(logits, targets)[:, :-1]


@jax.custom_vjp
def _position_nll(logits: Float[Array, "b t v"], targets: Int[Array, "b t"]) -> Float[Array, "b t"]:
    """``logsumexp(logits_t) − logits_t[target_t]`` per position, 0 where the target is ``-100``.

    A custom VJP because autodiff of ``log_softmax`` + ``take_along_axis`` writes a zero
    ``[b, t, v]`` array, scatters the one-hot into it and keeps ``log p`` as a second copy of the
    logits; ``∂/∂logits = (softmax − one_hot(target)) · ct`` is one elementwise pass instead.
    """
    return _position_nll_fwd(logits, targets)[0]


def logsumexp(x: Float[Array, "... vocab"]) -> Float[Array, "..."]:
    """``log Σ_v exp(x_v)`` over the last axis, shifted by the (finite) maximum. Where
    :func:`fisherjax.backend.vocabulary_sums_by_dot` says so, the exponentials are summed by a
    float32 matrix-vector product instead of ``jax.nn.logsumexp``'s fused reduction (same value up
    to float32 summation order)."""
    if not backend.vocabulary_sums_by_dot():
        return jax.nn.logsumexp(x, axis=-1)
    top = jax.lax.stop_gradient(x.max(axis=-1, keepdims=True))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    total = jnp.einsum("...v,v->...", jnp.exp(x - top), jnp.ones(x.shape[-1], x.dtype), precision=jax.lax.Precision.HIGHEST)
    return top[..., 0] + jnp.log(total)


def _position_nll_fwd(logits, targets):
    x = logits.astype(jnp.float32)
    lse = logsumexp(x)
    valid = targets != IGNORE
    picked = jnp.take_along_axis(x, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, lse - picked, 0.0), (logits, lse, targets)


def _position_nll_bwd(residuals, cotangent):
    logits, lse, targets = residuals
    weight = jnp.where(targets != IGNORE, cotangent, 0.0)[..., None]
    one_hot = targets[..., None] == jnp.arange(logits.shape[-1])
    softmax = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    return ((softmax - one_hot) * weight).astype(logits.dtype), None


_position_nll.defvjp(_position_nll_fwd, _position_nll_bwd)


def is_argmax(logits: Float[Array, "... vocab"], targets: Int[Array, "..."]) -> Bool[Array, "..."]:
    """``argmax_v logits[..., v] == targets`` (the first index wins a tie, as in ``jnp.argmax``),
    without the argmax: no index beats the target's logit, by being larger or equal and earlier.
    Two plain reductions over the vocabulary instead of XLA's slower index-carrying one."""
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)
    vocab = jnp.arange(logits.shape[-1])
    beaten = (logits > picked) | ((logits == picked) & (vocab < targets[..., None]))
    return ~beaten.any(axis=-1)


def completion_scores(
    logits: Float[Array, "batch seq vocab"], labels: Int[Array, "batch seq"]
) -> tuple[Bool[Array, " batch"], Float[Array, " batch"], Int[Array, " batch"], Int[Array, " batch"]]:
    """Teacher-forced scores of every sample's completion (labels ≠ -100, one-token shift).

    ``exact_i = ∀t ∈ completion: argmax_v logits[i, t, v] = labels[i, t+1]`` — equal to greedy
    decoding of the completion, since each greedy step then conditions on the true prefix;
    ``nll_i = Σ_t −log p(labels[i, t+1] | ≤ t)``; ``correct_i`` = matching tokens; ``tokens_i`` = ``T_i``.
    Rows without completion tokens have ``exact = False``.
    """
    targets = labels[:, 1:]
    valid = targets != IGNORE
    hit = is_argmax(logits[:, :-1], jnp.where(valid, targets, 0)) & valid
    tokens = valid.sum(-1)
    exact = (hit.sum(-1) == tokens) & (tokens > 0)
    return exact, token_nll(logits, labels).sum(-1), hit.sum(-1), tokens


def hidden_scores(
    unembed, hidden: Float[Array, "batch seq d"], labels: Int[Array, "batch seq"], *, chunk: int | None = None,
    matches: bool = True,
) -> tuple[Bool[Array, " batch"], Float[Array, " batch"], Int[Array, " batch"], Int[Array, " batch"]]:
    """:func:`completion_scores` of ``logits = unembed(hidden)``, unembedding only the predicted
    positions, ``chunk`` at a time (default :func:`fisherjax.backend.scored_positions_per_chunk`).

    The positions ``t`` with a label at ``t + 1`` are gathered in order into ``⌈P / chunk⌉``
    tiles (``P`` of them; a ``fori_loop`` with that traced trip count), each tile's ``[chunk,
    vocab]`` logits reduced to its tokens' ``−log p`` and exact-match flags, and these summed back
    per sample. Padding and prompt positions are never unembedded and the ``[batch, seq, vocab]``
    logits never exist. ``unembed`` maps ``[chunk, d]`` to ``[chunk, vocab]``; forward only (the
    loop's dynamic trip count has no reverse-mode rule: differentiate :func:`sample_losses`).
    ``matches=False`` skips the exact-match comparisons (``exact`` and ``correct`` are then 0), for
    callers that read only the losses.
    """
    batch, seq = labels.shape
    chunk = chunk or backend.scored_positions_per_chunk()
    targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], axis=1).reshape(-1)
    valid = targets != IGNORE
    count = valid.sum()
    positions = batch * seq
    padded = -(-positions // chunk) * chunk
    order = jnp.argsort(~valid, stable=True)  # scored positions first, in order
    order = jnp.concatenate([order, jnp.zeros(padded - positions, order.dtype)])
    flat = hidden.reshape(positions, -1)

    def tile(c, carry):
        nll, hit = carry
        rows = jax.lax.dynamic_slice_in_dim(order, c * chunk, chunk)
        logits = unembed(flat[rows]).astype(jnp.float32)
        picked = jnp.where(valid[rows], targets[rows], 0)
        loss = _position_nll(logits[None], jnp.where(valid[rows], picked, IGNORE)[None])[0]
        nll = jax.lax.dynamic_update_slice_in_dim(nll, loss, c * chunk, 0)
        if matches:
            hit = jax.lax.dynamic_update_slice_in_dim(hit, is_argmax(logits, picked), c * chunk, 0)
        return nll, hit

    nll, hit = jax.lax.fori_loop(0, (count + chunk - 1) // chunk, tile, (jnp.zeros(padded), jnp.zeros(padded, bool)))
    scored = jnp.arange(padded) < count
    sample = order // seq
    nll = jax.ops.segment_sum(jnp.where(scored, nll, 0.0), sample, batch)
    correct = jax.ops.segment_sum((scored & hit).astype(jnp.int32), sample, batch)
    tokens = valid.reshape(batch, seq).sum(-1)
    return (correct == tokens) & (tokens > 0), nll, correct, tokens


def forward_scores(
    model, params, input_ids, attention_mask, labels, *, matches: bool = True
) -> tuple[Bool[Array, " batch"], Float[Array, " batch"], Int[Array, " batch"], Int[Array, " batch"]]:
    """``(exact_i, L_i, correct_i, T_i)`` of a batch (:func:`completion_scores`, only the labels
    :func:`~fisherjax.data.predicted_labels` keeps) from one forward pass that unembeds only the
    predicted positions (:func:`hidden_scores`, whose ``matches`` this passes on); forward only."""
    labels = predicted_labels(labels, attention_mask)
    hidden = model.hidden(params, input_ids, attention_mask)
    return hidden_scores(lambda h: model.unembed(params, h), hidden, labels, matches=matches)


SCORING_BUDGET_BYTES = 1e9
"""What forward-only scoring passes (the head-pruning experiment's, the single-head ablation's) may
hold on a CPU, and at least on an accelerator (:func:`fisherjax.backend.working_budget_bytes`):
one mask of a hundred rows of GPT-2 small at 128 positions (:func:`scoring_bytes`)."""


def scoring_bytes(config, rows: int, seq: int) -> int:
    """Device memory of one :func:`forward_scores` pass over ``[rows, seq]``, an estimate:
    ``4 · rows · seq · (8·d_model + 2·d_ff + 2·heads·seq)`` (one layer's activations, attention
    scores and probabilities) plus ``8 · chunk · vocab`` (one tile of float32 logits and their
    reductions, ``chunk`` = :func:`fisherjax.backend.scored_positions_per_chunk`): the ``[rows,
    seq, vocab]`` logits never exist, so the vocabulary counts once a pass, not once a row."""
    per_row = 4 * seq * (8 * config.hidden_size + 2 * config.intermediate_size + 2 * config.num_heads * seq)
    return rows * per_row + 8 * backend.scored_positions_per_chunk() * config.vocab_size


BACKWARD_BUDGET_BYTES = 2e9
"""What a batched backward pass outside Phase 1 (the head-mask gradients) may hold by
:func:`backward_bytes`: this on a CPU, at least this on an accelerator
(:func:`fisherjax.backend.working_budget_bytes`). Not more on a CPU, where a pass's GEMMs use every
core at a few rows and more rows only hold more memory (as for Phase 1's step,
:data:`fisherjax.fisher.step.STEP_BUDGET_BYTES`)."""


def backward_bytes(config, rows: int, seq: int) -> int:
    """Device memory of a batched backward pass over ``[rows, seq]``, an estimate: ``4 · rows ·
    seq · (layers · (12·d_model + 3·d_ff) + 2·vocab)`` (the activations every layer keeps for the
    pullback, and the float32 ``[seq, vocab]`` logits with their gradient)."""
    per_position = config.num_layers * (12 * config.hidden_size + 3 * config.intermediate_size) + 2 * config.vocab_size
    return 4 * rows * seq * per_position


def sample_losses(model, params, input_ids, attention_mask, labels) -> tuple[Float[Array, " batch"], Int[Array, " batch"]]:
    """Token-sum loss ``L_i`` and active-token count ``T_i`` of every sample of a batch (only the
    labels :func:`~fisherjax.data.predicted_labels` keeps)."""
    labels = predicted_labels(labels, attention_mask)
    logits = model.apply(params, input_ids, attention_mask)
    return token_nll(logits, labels).sum(-1), num_active_tokens(labels)


def _split(params: PyTree, paths: Sequence[str] | None):
    flat = flatten(params)
    if paths is None:
        return flat, {}
    missing = [p for p in paths if p not in flat]
    if missing:
        raise KeyError(f"not parameters of this model: {missing}")
    chosen = {p: flat[p] for p in paths}
    return chosen, {p: v for p, v in flat.items() if p not in chosen}


def chunk_size_for(budget_bytes: float, bytes_per_sample: float, batch: int) -> int:
    """Largest chunk of samples whose per-sample arrays fit the budget (at least 1, at most batch)."""
    return int(max(1, min(batch, budget_bytes // max(bytes_per_sample, 1))))


def per_sample_grads(
    model,
    params: PyTree,
    batch: Batch,
    *,
    paths: Sequence[str] | None = None,
    chunk_size: int | None = None,
    memory_budget_bytes: float = 2e9,
) -> PerSample:
    """``jax.vmap(jax.grad(L_i))`` over a batch, chunked.

    Args:
      model: a :class:`~fisherjax.models.Model`.
      params: its parameters.
      batch: a :class:`~fisherjax.data.Batch` (filler rows give zero gradients).
      paths: restrict to these flat parameter paths (default: all parameters).
      chunk_size: samples per vmapped chunk; by default the most that fit ``memory_budget_bytes``.

    Returns:
      :class:`PerSample` with ``grads`` as a flat ``{path: [n, *shape]}`` dict when ``paths`` is
      given, else a params-shaped pytree.
    """
    chosen, rest = _split(params, paths)
    n = batch.input_ids.shape[0]
    if chunk_size is None:
        per_sample_bytes = sum(4 * np.prod(np.shape(v)) for v in chosen.values())
        chunk_size = chunk_size_for(memory_budget_bytes, per_sample_bytes, n)
    grads, losses, tokens = _per_sample_grads(model, chosen, rest, batch.input_ids, batch.attention_mask, batch.labels, chunk_size)
    return PerSample(grads if paths is not None else unflatten(grads), losses, tokens)


@model_jit(static_argnums=(0, 6))
def _per_sample_grads(model, chosen, rest, input_ids, attention_mask, labels, chunk_size):
    def loss(selected, ids, mask, lab):
        full = unflatten({**rest, **selected})
        losses, tokens = sample_losses(model, full, ids[None], mask[None], lab[None])
        return losses[0], tokens[0]

    def one(xs):
        ids, mask, lab = xs
        (value, tokens), g = jax.value_and_grad(loss, has_aux=True)(chosen, ids, mask, lab)
        return g, value, tokens

    return jax.lax.map(one, (input_ids, attention_mask, labels), batch_size=chunk_size)


class SiteGrads(NamedTuple):
    """Per-site inputs and output gradients of one batched backward pass.

    ``inputs[site]``: what the site records (dense input ``a``, normalised input ``x̂``, or token
    ids); ``deltas[site]``: ``δ = ∂(Σ_i L_i)/∂(site output)``, which for sample ``i`` equals
    ``∂L_i/∂(output of sample i)`` because samples do not interact. Layer sites (under
    ``"layers"``) carry a leading layer axis: ``[layer, batch, seq, width]``.
    """

    inputs: dict
    deltas: dict
    losses: Float[Array, " batch"]
    tokens: Int[Array, " batch"]


def site_grads(model, params: PyTree, input_ids, attention_mask, labels, *, remat: bool = False) -> SiteGrads:
    """One forward and backward pass that differentiates the zero taps instead of the weights.

    The per-sample gradient of a dense kernel is then ``g_i = Σ_t a_{i,t} δ_{i,t}ᵀ`` (and of its
    bias ``Σ_t δ_{i,t}``), computable without ``vmap`` over samples or a weight-gradient GEMM.
    """
    batch, seq = input_ids.shape
    labels = predicted_labels(labels, attention_mask)
    taps = model.zero_taps(batch, seq)

    def total_loss(taps):
        out = model.forward(params, input_ids, attention_mask, taps=taps, remat=remat)
        nll = token_nll(out.logits, labels)
        return nll.sum(), (out.recorded, nll.sum(-1))

    deltas, (inputs, losses) = jax.grad(total_loss, has_aux=True)(taps)
    return SiteGrads(inputs, deltas, losses, num_active_tokens(labels))
