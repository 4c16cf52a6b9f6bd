"""The pytrees K-FAC is made of: :class:`KroneckerFactor` (one dense site), :class:`KFAC` (a model)
and :class:`HeadFactors` (one attention block's factors restricted to its heads).

Convention (``fisherjax.curvature.kfac`` computes them): the empirical Fisher consistent with
Phase 1's diagonal is ``F = (1/n) Σ_i g_i g_iᵀ / T_i`` with ``g_i = Σ_t a_{i,t} δ_{i,t}ᵀ`` for a
dense kernel. K-FAC ("expand": positions are treated as independent examples) keeps the
``t = s`` terms and weights position ``t`` of sample ``i`` by ``w_{i,t} = 1 / (n T_i)``
(``Σ w = 1``), so both factors are expectations under the same weights:

    A = Σ_{i,t} w_{i,t} ā_{i,t} ā_{i,t}ᵀ        G = Σ_{i,t} w_{i,t} δ_{i,t} δ_{i,t}ᵀ        F ≈ A ⊗ G

with ``ā = [a, 1]`` when the site has a bias (the bias is the kernel's last input row).
Padding and the positions after a sample's last predicted one have ``δ = 0`` and are not
counted. A prompt's positions predict no label but have ``δ ≠ 0`` (later positions attend to
them), so they count: ``A`` averages ``ā āᵀ`` over sample ``i``'s ``R_i`` real positions up to its
last predicting one (weights ``1/(n R_i)``), ``G`` sums ``δ δᵀ`` over them with ``1/(n T_i)``. Without
a prompt ``R_i = T_i`` and both use the weights above. With one sample of one token, ``A ⊗ G`` is
that layer's exact Fisher.

For a kernel ``W [d_in, d_out]`` (Flax layout), ``(A ⊗ G) vec(W)`` is ``A W G``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
from jaxtyping import Array, Float

from fisherjax.settings import STATIC


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KroneckerFactor:
    """One dense site's (or one block of a fused QKV site's) factors.

    Attributes:
      inputs: ``A`` ``[(layer,) d_in(+1), d_in(+1)]`` (the last row/column is the bias coordinate
        when ``bias`` is set).
      outputs: ``G`` ``[(layer,) d_out, d_out]`` (a fused QKV site: the block's own output
        columns only).
      kernel: the kernel's flat parameter path; bias: the bias path, or None.
      block: ``"q"``, ``"k"`` or ``"v"`` for one block of a fused QKV kernel, else None.
    """

    inputs: Float[Array, "... i i"]
    outputs: Float[Array, "... o o"]
    kernel: str = dataclasses.field(metadata=STATIC)
    bias: str | None = dataclasses.field(default=None, metadata=STATIC)
    block: str | None = dataclasses.field(default=None, metadata=STATIC)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KFAC:
    """K-FAC of a model: ``factors`` keyed by kernel path (``"path#q"`` for a fused QKV block).

    ``fisher_type``: ``"empirical"`` (data labels) or ``"true"`` (labels drawn from the model);
    ``n_samples`` / ``n_tokens``: the samples (with ``T_i > 0``) and tokens they average.
    Parameters without a factor (norms, embeddings, the unembedding) are not covered: K-FAC
    users fall back to the diagonal there.
    """

    factors: Mapping[str, KroneckerFactor]
    n_samples: int = dataclasses.field(metadata=STATIC)
    n_tokens: int = dataclasses.field(metadata=STATIC)
    fisher_type: str = dataclasses.field(default="empirical", metadata=STATIC)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HeadFactors:
    """One attention block's K-FAC restricted to each head's slice: ``F̃_{ℓ,h} = A_{ℓ,h} ⊗ G_{ℓ,h}``.

    q/k/v (heads on the kernel's output axis): ``inputs`` ``[layer, d_in(+1), d_in(+1)]`` shared
    by the heads, ``outputs`` ``[layer, heads_of_block, head_dim, head_dim]`` (the head's
    sub-block of G). o (heads on the input axis): ``inputs`` ``[layer, heads, head_dim,
    head_dim]`` (the head's sub-block of A; O has no per-head bias), ``outputs``
    ``[layer, d_out, d_out]`` shared. A slice's gradient is the head view of the kernel (with the
    bias as the last input row when ``has_bias``).
    """

    inputs: Array
    outputs: Array
    block: str = dataclasses.field(metadata=STATIC)
    has_bias: bool = dataclasses.field(default=False, metadata=STATIC)
