"""Head importance from head-mask gradients (Michel, Levy & Neubig 2019, "Are Sixteen Heads
Really Better than One?").

A gate ``ξ[layer, head]`` multiplies each query head's output before the output projection;
``ξ = 1`` is the model. Head ``h`` adds ``Σ_j o_{t,h,j} W_O[h, j, :]`` to position ``t``'s output,
so gating it scales the O kernel's rows of head ``h`` (the bias is untouched) and, per sample,

    ∂ℓ_i/∂ξ_h = ⟨∂ℓ_i/∂W_O^h, W_O^h⟩ = (1/T_i) Σ_t Σ_j a_{t,h,j} (W_O^h δ_t)_j

with ``a_t [heads, head_dim]`` the O projection's input (the attention output, head-split),
``δ_t [d_out]`` the gradient of the token-sum loss ``L_i`` with respect to its output, and
``ℓ_i = L_i / T_i`` the sample's mean loss per predicted token
(:func:`fisherjax.grads.sample_losses`). ``a`` and ``δ`` come from the model's sites, the same
single batched backward pass Phase 1 uses (:func:`fisherjax.grads.site_grads`): no per-sample
parameter gradient is formed, and one einsum covers every layer and head.

The importance of a head is ``I_h = (1/n) Σ_i |∂ℓ_i/∂ξ_h|`` over the samples with ``T_i > 0``
(filler rows, ``sample_id < 0``, excluded); the signed mean is kept beside it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from fisherjax import backend
from fisherjax.data import Batch, micro_batches
from fisherjax.errors import ConfigError, DataError
from fisherjax.grads import BACKWARD_BUDGET_BYTES, backward_bytes, site_grads
from fisherjax.layout import ModelLayout, Role, flatten
from fisherjax.models.model import model_jit

LAYERS_SITE = "layers/"
"""Prefix of the site names (and parameter paths) inside the decoder's stacked layers."""


class HeadMaskImportance(NamedTuple):
    """Head-mask gradient statistics over a task's samples.

    ``mean_abs [layer, head]``: ``I_h = (1/n) Σ_i |∂ℓ_i/∂ξ_h|``; ``mean [layer, head]``: the signed
    ``(1/n) Σ_i ∂ℓ_i/∂ξ_h``; ``n_samples``: ``n``; ``sample_ids [n]``: the samples counted, in
    the order seen.
    """

    mean_abs: np.ndarray
    mean: np.ndarray
    n_samples: int
    sample_ids: np.ndarray


class GateSums(NamedTuple):
    """Running sums of :func:`head_mask_importance` (a pytree; ``count`` samples so far)."""

    count: np.ndarray
    abs_sum: np.ndarray
    sum: np.ndarray


def o_kernel_path(layout: ModelLayout) -> str:
    """The O projection's kernel path: one layer-stacked leaf (``layers/.../kernel``).

    Its site name is the path without ``/kernel``; every decoder of :mod:`fisherjax.models` has
    exactly one such leaf (GPT-2 ``attn/c_proj``, Llama ``self_attn/o_proj``, NeoX
    ``attention/dense``).
    """
    paths = layout.paths(Role.O, "kernel")
    if len(paths) != 1 or not layout.specs[paths[0]].layered or not paths[0].startswith(LAYERS_SITE):
        raise ConfigError(f"head gates need one layer-stacked output-projection kernel under {LAYERS_SITE!r}, got {paths}")
    return paths[0]


@model_jit(static_argnums=0)
def head_mask_grads(
    model, params, input_ids: Int[Array, "batch seq"], attention_mask: Int[Array, "batch seq"], labels: Int[Array, "batch seq"]
) -> tuple[Float[Array, "batch layer head"], Int[Array, " batch"]]:
    """Per-sample ``∂ℓ_i/∂ξ[layer, head]`` at ``ξ = 1`` (0 where ``T_i = 0``) and ``T_i``.

    One jitted forward and backward pass of the batch (see the module docstring); ``model`` is
    static.
    """
    layout = model.layout
    path = o_kernel_path(layout)
    site = path[len(LAYERS_SITE) : -len("/kernel")]
    recorded = site_grads(model, params, input_ids, attention_mask, labels)
    a = layout.input_heads(path, recorded.inputs["layers"][site])  # [layer, batch, seq, heads, head_dim]
    delta = recorded.deltas["layers"][site]  # [layer, batch, seq, d_out]
    w = layout.view(path, flatten(params)[path])  # [layer, heads, head_dim, d_out]
    total = jnp.einsum("lbthj,lhjd,lbtd->blh", a, w, delta)
    tokens = recorded.tokens
    inv_t = jnp.where(tokens > 0, 1.0 / jnp.maximum(tokens, 1), 0.0)
    return total * inv_t[:, None, None], tokens


def head_mask_importance(model, params, batches: Iterable[Batch], *, memory_budget_bytes: float | None = None) -> HeadMaskImportance:
    """Head-mask importance ``I_h = E_i |∂ℓ_i/∂ξ_h|`` of a task (Michel et al. 2019).

    Args:
      model: a :class:`~fisherjax.models.Model`.
      params: its parameters.
      batches: :class:`~fisherjax.data.Batch` es of the task (e.g. :func:`fisherjax.data.batches`);
        one jitted backward pass each, compiled once per shape, or several where a batch's pass
        would hold more than ``memory_budget_bytes`` (:func:`fisherjax.grads.backward_bytes`;
        default :func:`fisherjax.backend.working_budget_bytes` of
        :data:`fisherjax.grads.BACKWARD_BUDGET_BYTES`): the batch is then cut into even
        micro-batches (:func:`fisherjax.data.micro_batches`).

    Returns:
      :class:`HeadMaskImportance` over the samples with predicted tokens (sums kept in float64).
    """
    layout = model.layout
    budget = backend.working_budget_bytes(BACKWARD_BUDGET_BYTES) if memory_budget_bytes is None else memory_budget_bytes
    shape = (layout.num_layers, layout.num_heads)
    sums = GateSums(np.zeros((), np.int64), np.zeros(shape), np.zeros(shape))
    seen = []
    for whole in batches:
        rows = max(1, int(budget // backward_bytes(model.config, 1, whole.input_ids.shape[1])))
        for batch in micro_batches(whole, rows):
            grads, tokens = head_mask_grads(model, params, batch.input_ids, batch.attention_mask, batch.labels)
            valid = (np.asarray(batch.sample_ids) >= 0) & (np.asarray(tokens) > 0)
            kept = np.asarray(grads, np.float64)[valid]
            sums = jax.tree.map(np.add, sums, GateSums(valid.sum(), np.abs(kept).sum(0), kept.sum(0)))
            seen.append(np.asarray(batch.sample_ids)[valid])
    n = int(sums.count)
    if n == 0:
        raise DataError("no sample with predicted tokens: head-mask importance needs at least one")
    return HeadMaskImportance(sums.abs_sum / n, sums.sum / n, n, np.concatenate(seen))


def rank_correlation(a, b) -> float:
    """Spearman rank correlation of two ``[layer, head]`` arrays over all their cells.

    ``scipy.stats.spearmanr`` of the flattened arrays (average ranks for ties). NaN when either
    side is constant (no ranking to compare) or has fewer than two cells.
    """
    x, y = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    if x.shape != y.shape:
        raise ValueError(f"rank_correlation needs equal shapes, got {np.shape(a)} and {np.shape(b)}")
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    from scipy import stats  # here, not at import: scipy.stats takes most of a second to import

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(x, y)[0])
