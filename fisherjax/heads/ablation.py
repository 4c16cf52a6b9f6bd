"""Single-head ablation: a task's loss and exact-match accuracy with one head's output zeroed.

Zeroing head ``h`` of layer ``l`` sets its gate ``ξ[l, h] = 0`` (see
:mod:`fisherjax.heads.importance`): the rows of the O kernel that head ``h`` feeds,
``W_O[l, h, :, :]`` in the layout's ``(o, kernel)`` view, are zeroed and the output bias kept.
For every single head, and for the baseline (nothing zeroed), on the task's samples ``i``:

    loss per token = Σ_i L_i / Σ_i T_i
    accuracy       = (1/n) Σ_i exact_i,   exact_i = ∀t: argmax_v logits[i, t, v] = labels[i, t+1]

over the predicted positions ``t`` (teacher-forced; a sample without predicted tokens is not
exact) — :func:`fisherjax.grads.completion_scores`, computed as :func:`fisherjax.demo.evaluate`
does, unembedding only the predicted positions (:func:`fisherjax.grads.hidden_scores`).

A head zeroed in layer ``l`` changes nothing before block ``l``, so one plain pass records every
block's input (:meth:`~fisherjax.models.Model.residual_stream`) and each setting runs only blocks
``l …`` and the unembedding (:meth:`~fisherjax.models.Model.hidden_from`): about half the blocks
of a full pass on average. The settings of a batch run as one jitted ``lax.map`` over chunks of
``heads_per_pass`` settings (vmapped), ordered by layer, each chunk from its first layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from fisherjax import backend
from fisherjax.data import Batch, predicted_labels
from fisherjax.errors import DataError
from fisherjax.grads import SCORING_BUDGET_BYTES, chunk_size_for, hidden_scores, scoring_bytes
from fisherjax.heads.importance import o_kernel_path
from fisherjax.layout import ModelLayout, flatten, unflatten
from fisherjax.models.model import model_jit


class HeadAblation(NamedTuple):
    """A task's scores with each single head's output zeroed.

    ``loss [layer, head]``, ``accuracy [layer, head]``: loss per token and exact-match accuracy
    with that head zeroed; ``baseline_loss``, ``baseline_accuracy``: with none zeroed;
    ``n_samples``: samples scored (filler rows excluded).
    """

    baseline_loss: float
    baseline_accuracy: float
    loss: np.ndarray
    accuracy: np.ndarray
    n_samples: int


def single_head_gates(layout: ModelLayout, heads: np.ndarray | None = None) -> np.ndarray:
    """``[1 + k, layer, head]`` gates: all ones (the baseline), then one setting per chosen head
    with that head zeroed, in row-major (layer, head) order; ``heads`` ``[layer, head]`` bool picks
    the ``k`` heads (default all ``layer·head``)."""
    shape = (layout.num_layers, layout.num_heads)
    chosen = np.ones(shape, bool) if heads is None else np.asarray(heads, bool)
    if chosen.shape != shape:
        raise ValueError(f"heads to ablate have shape {chosen.shape}, the model has {shape}")
    n = layout.num_layers * layout.num_heads
    ablated = (1.0 - np.eye(n, dtype=np.float32).reshape(n, *shape))[chosen.ravel()]
    return np.concatenate([np.ones((1, *shape), np.float32), ablated])


def gate_heads(layout: ModelLayout, params, gate: Float[Array, "layer head"]):
    """``params`` with each head's O-kernel rows multiplied by ``gate[layer, head]`` (bias kept)."""
    flat = flatten(params)
    path = o_kernel_path(layout)
    view = layout.view(path, flat[path])  # [layer, heads, head_dim, d_out]
    return unflatten({**flat, path: layout.unview(path, {"o": view * gate[:, :, None, None].astype(view.dtype)})})


@model_jit(static_argnums=(0, 8))
def _ablation_sums(model, params, input_ids, attention_mask, labels, sample_ids, gates, starts, heads_per_pass):
    """``[1 + settings, 3]``: Σ L_i, Σ T_i and Σ exact_i over the batch's real rows, for the plain
    pass and then per gate setting. ``gates`` ``[chunks, heads_per_pass, layer, head]`` are ordered by
    layer; chunk ``c`` starts from block ``starts[c]`` (its first setting's layer), whose input comes
    from the plain pass: a head zeroed in layer ``l`` changes nothing before block ``l``."""
    labels = predicted_labels(labels, attention_mask)
    real = sample_ids >= 0

    def sums(p, hidden):
        exact, nll, _, tokens = hidden_scores(lambda h: model.unembed(p, h), hidden, labels)
        return jnp.stack([jnp.where(real, x, 0).sum().astype(jnp.float32) for x in (nll, tokens, exact)])

    stream, hidden = model.residual_stream(params, input_ids, attention_mask, unembed=False)

    def chunk(settings):
        gate, start = settings
        x = jax.lax.dynamic_index_in_dim(stream, start, keepdims=False)

        def setting(g):
            gated = gate_heads(model.layout, params, g)
            return sums(gated, model.hidden_from(gated, x, attention_mask, start))

        return jax.vmap(setting)(gate)

    ablated = jax.lax.map(chunk, (gates, starts)).reshape(-1, 3)
    return jnp.concatenate([sums(params, hidden)[None], ablated])


def _chunked_settings(gates: np.ndarray, layers: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """``gates`` ``[k, layer, head]`` (ordered by zeroed layer) as ``[chunks, chunk, layer, head]``,
    the last chunk padded with all-ones settings (their sums are dropped), and each chunk's first
    layer ``[chunks]``."""
    k = len(gates)
    chunks = max(-(-k // chunk), 1)
    padded = np.ones((chunks * chunk, *gates.shape[1:]), np.float32)
    padded[:k] = gates
    first = np.zeros(chunks, np.int32)
    first[: -(-k // chunk)] = layers[::chunk]
    return padded.reshape(chunks, chunk, *gates.shape[1:]), first


def ablate_heads(
    model, params, batches: Iterable[Batch], *, heads: np.ndarray | None = None, heads_per_pass: int | None = None,
    memory_budget_bytes: float | None = None,
) -> HeadAblation:
    """Loss per token and exact-match accuracy of a task with every single head zeroed in turn.

    Args:
      model: a :class:`~fisherjax.models.Model`.
      params: its parameters.
      batches: :class:`~fisherjax.data.Batch` es of the task; one jit per batch shape.
      heads: ``[layer, head]`` bool, the heads to ablate (default all; each costs one forward pass
        of every batch); the others get NaN.
      heads_per_pass: gate settings evaluated at once, each holding one forward pass of the batch;
        by default :func:`fisherjax.backend.settings_per_pass` of as many as fit
        ``memory_budget_bytes`` (each a :func:`~fisherjax.grads.scoring_bytes` pass of the batch;
        None: :func:`fisherjax.backend.working_budget_bytes` of
        :data:`~fisherjax.grads.SCORING_BUDGET_BYTES`, half the free memory of an accelerator): one
        on a CPU.

    Returns:
      :class:`HeadAblation` (sums kept in float64 across batches).
    """
    layout = model.layout
    gates = single_head_gates(layout, heads)
    layers = np.nonzero(gates[1:].min(axis=2) < 1)[1]  # each setting's zeroed layer, ascending (row-major order)
    cfg = model.config
    totals = np.zeros((gates.shape[0], 3))
    rows = 0
    budget = backend.working_budget_bytes(SCORING_BUDGET_BYTES) if memory_budget_bytes is None else memory_budget_bytes
    for batch in batches:
        b, seq = np.shape(batch.input_ids)
        per_setting = scoring_bytes(cfg, b, seq)
        chunk = heads_per_pass or backend.settings_per_pass(chunk_size_for(budget, per_setting, max(len(layers), 1)))
        chunked, starts = _chunked_settings(gates[1:], layers, chunk)
        sums = _ablation_sums(model, params, batch.input_ids, batch.attention_mask, batch.labels, batch.sample_ids,
                              chunked, starts, chunk)
        totals += np.asarray(sums, np.float64)[: gates.shape[0]]
        rows += batch.num_real
    nll, tokens, exact = totals.T
    if rows == 0 or tokens[0] == 0:
        raise DataError("no sample with predicted tokens: head ablation needs at least one")
    loss, accuracy = nll / tokens, exact / rows
    shape = (layout.num_layers, layout.num_heads)
    chosen = np.ones(shape, bool) if heads is None else np.asarray(heads, bool)
    per_head = np.full((2, *shape), np.nan)
    per_head[:, chosen] = np.stack([loss[1:], accuracy[1:]])
    return HeadAblation(float(loss[0]), float(accuracy[0]), per_head[0], per_head[1], rows)
