"""Behavioural scores of attention heads from their attention probabilities.

Input: ``A [layer, batch, heads, q, k]`` (rows sum to one over the real keys ``k ≤ q``) with the
batch's ``input_ids`` and ``attention_mask [batch, seq]`` (left, right or no padding). Every score
compares ``A`` with a boolean *target pattern* ``P[b, q, k]`` built over real tokens only, in
terms of each token's position ``pos`` (the cumulative count of real tokens minus one, as the
models use), so a sample scores the same whichever side it is padded on:

==================  =========================================================================
previous_token      ``pos[k] = pos[q] − 1`` — the real token right before ``q``
duplicate           ``pos[k] < pos[q]`` and ``token[k] = token[q]``
current_token       ``k = q``
induction           ``1 ≤ pos[k] ≤ pos[q]`` and ``token[k'] = token[q]`` where ``k'`` is the real
                    token before ``k`` — the position after an earlier occurrence of the current
                    token (TransformerLens' induction pattern)
first_position      ``pos[k] = 0`` — the first real token (BOS when the sequence has one)
==================  =========================================================================

Two normalisations (``normalize=``):

* ``"targets"`` (default): the per-sample score is the mean, over the sample's real query rows
  that have at least one target, of the row's mass on its targets
  ``m_q = Σ_k A[q, k] P[q, k]``; a head that follows the pattern exactly scores 1 and the
  previous-token score is "mean attention from t to t−1". Samples without a target row (e.g. no
  repeated token for ``duplicate``) have no score (NaN) and are left out of the mean.
* ``"all"``: ``Σ_{q,k} A·P / Σ_{q,k} A`` over the sample's real rows — TransformerLens'
  ``detect_head`` with ``error_measure="mul"``, ``exclude_bos=False``,
  ``exclude_current_token=False``. As there, every sample with a real token counts, a sample
  without targets scoring 0 (``detect_head`` on a list of sequences is the mean of their scores).

The batch score is the mean over the samples that have one (each sample weighs the same). The
positional (content-independence) score is separate, see :func:`positional_scores`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from fisherjax.errors import ConfigError
from fisherjax.models.common import positions_from_mask

NORMALIZATIONS = ("targets", "all")


class TargetPatterns(NamedTuple):
    """The boolean target pattern ``P[batch, q, k]`` of each score (see the module docstring)."""

    previous_token: Bool[Array, "batch seq seq"]
    duplicate: Bool[Array, "batch seq seq"]
    current_token: Bool[Array, "batch seq seq"]
    induction: Bool[Array, "batch seq seq"]
    first_position: Bool[Array, "batch seq seq"]


class PatternScores(NamedTuple):
    """One score per pattern; each field ``[layer, head]`` (or ``[batch, layer, head]`` per sample)."""

    previous_token: Float[Array, "... layer head"]
    duplicate: Float[Array, "... layer head"]
    current_token: Float[Array, "... layer head"]
    induction: Float[Array, "... layer head"]
    first_position: Float[Array, "... layer head"]


def target_patterns(input_ids: Int[Array, "batch seq"], attention_mask: Int[Array, "batch seq"]) -> TargetPatterns:
    """The target patterns of a batch, every one false outside real ``(q, k)`` pairs."""
    real = jnp.asarray(attention_mask).astype(bool)
    ids = jnp.asarray(input_ids)
    pos = positions_from_mask(jnp.asarray(attention_mask))
    both = real[:, :, None] & real[:, None, :]
    pos_q, pos_k = pos[:, :, None], pos[:, None, :]
    same = (ids[:, :, None] == ids[:, None, :]) & both
    previous = both & (pos_k == pos_q - 1)
    # after[q, k]: token[q] equals the token right before k (previous[k, j] & same[q, j] for some j).
    after = jnp.einsum("bkj,bqj->bqk", previous.astype(jnp.int32), same.astype(jnp.int32)) > 0
    return TargetPatterns(
        previous_token=previous,
        duplicate=same & (pos_k < pos_q),
        current_token=both & (pos_k == pos_q),
        induction=after & both & (pos_k <= pos_q),
        first_position=both & (pos_k == 0),
    )


def sample_scores(
    attentions: Float[Array, "layer batch heads seq seq"],
    input_ids: Int[Array, "batch seq"],
    attention_mask: Int[Array, "batch seq"],
    *,
    normalize: str = "targets",
) -> PatternScores:
    """Per-sample scores, each field ``[batch, layer, head]``; NaN where a sample has none.

    ``"targets"``: ``s_b = Σ_{q ∈ R_b} m_q / |R_b|`` with ``m_q = Σ_k A[q,k] P[q,k]`` and ``R_b``
    the real rows with a target (NaN when empty). ``"all"``: ``s_b = Σ_{q real, k} A·P /
    Σ_{q real, k real} A`` (NaN for a sample without real tokens).
    """
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    patterns = jnp.stack(target_patterns(input_ids, attention_mask))  # [pattern, batch, q, k]
    real = jnp.asarray(attention_mask).astype(bool)
    a = attentions.astype(jnp.float32)
    mass = jnp.einsum("lbhqk,pbqk->pblhq", a, patterns.astype(a.dtype))
    if normalize == "targets":
        rows = patterns.any(-1) & real[None]  # [pattern, batch, q]
        count = rows.sum(-1).astype(a.dtype)[:, :, None, None]
        total = jnp.einsum("pblhq,pbq->pblh", mass, rows.astype(a.dtype))
    else:
        keys = (real[:, None, :] & real[:, :, None]).astype(a.dtype)
        count = jnp.einsum("lbhqk,bqk->blh", a, keys)[None]
        total = jnp.einsum("pblhq,bq->pblh", mass, real.astype(a.dtype))
    scores = jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), jnp.nan)
    return PatternScores(*scores)


def pattern_scores(
    attentions: Float[Array, "layer batch heads seq seq"],
    input_ids: Int[Array, "batch seq"],
    attention_mask: Int[Array, "batch seq"],
    *,
    normalize: str = "targets",
) -> PatternScores:
    """Batch scores ``[layer, head]``: the mean of :func:`sample_scores` over the samples that
    have one (NaN if none does)."""
    return mean_over_samples(sample_scores(attentions, input_ids, attention_mask, normalize=normalize))


def mean_over_samples(per_sample):
    """Mean over the leading sample axis of every leaf, ignoring NaN (samples without a score).

    A leaf whose samples all lack a score is NaN. Concatenate the per-sample scores of several
    batches along axis 0 first to combine them.
    """

    def mean(x):
        x = jnp.asarray(x)
        ok = ~jnp.isnan(x)
        n = ok.sum(0)
        return jnp.where(n > 0, jnp.where(ok, x, 0.0).sum(0) / jnp.maximum(n, 1), jnp.nan)

    return jax.tree.map(mean, per_sample)


def positional_sample_scores(
    attentions: Float[Array, "layer batch heads seq seq"], attention_mask: Int[Array, "batch seq"]
) -> Float[Array, "batch layer head"]:
    """Per-sample content dependence ``c_b [batch, layer, head]`` (NaN when a sample has no row).

    Rows and keys are aligned by position ``p = pos[q]``, ``r = pos[k]`` (padding removed), then
    ``Ā[p, :]`` is the mean row over the samples real at ``p`` and
    ``c_b = mean_{p ≥ 1} ½ ‖A_b[p, :] − Ā[p, :]‖₁`` over the positions ``p ≥ 1`` that at least two
    samples reach (the first row is always all on itself, and a lone sample has nothing to differ
    from). The total-variation distance lies in [0, 1].
    """
    mask = jnp.asarray(attention_mask).astype(bool)
    seq = mask.shape[-1]
    pos = positions_from_mask(jnp.asarray(attention_mask))
    at = mask[:, :, None] & (pos[:, :, None] == jnp.arange(seq)[None, None, :])  # [batch, column, position]
    valid = at.any(1)  # [batch, position]
    column = jnp.argmax(at, axis=1)  # [batch, position]: the column holding each position
    a = attentions.astype(jnp.float32)
    a = jnp.take_along_axis(a, column[None, :, None, :, None], axis=3)
    a = jnp.take_along_axis(a, column[None, :, None, None, :], axis=4)  # [layer, batch, heads, p, r]
    keep = valid[:, :, None] & valid[:, None, :] & (jnp.arange(seq)[None, None, :] <= jnp.arange(seq)[None, :, None])
    a = a * keep[None, :, None].astype(a.dtype)
    n_at = valid.sum(0).astype(a.dtype)  # [position]
    mean_row = a.sum(1) / jnp.maximum(n_at, 1.0)[None, None, :, None]  # [layer, heads, p, r]
    tv = 0.5 * jnp.abs(a - mean_row[:, None]).sum(-1)  # [layer, batch, heads, p]
    rows = valid & (jnp.arange(seq) >= 1)[None] & (n_at >= 2)[None]  # [batch, p]
    count = rows.sum(-1).astype(a.dtype)
    total = jnp.einsum("lbhp,bp->blh", tv, rows.astype(a.dtype))
    return jnp.where(count[:, None, None] > 0, total / jnp.maximum(count, 1.0)[:, None, None], jnp.nan)


def positional_scores(
    attentions: Float[Array, "layer batch heads seq seq"], attention_mask: Int[Array, "batch seq"]
) -> Float[Array, "layer head"]:
    """Content independence ``positional = 1 − c [layer, head]`` on a batch of random contents.

    ``c`` is the mean over samples of :func:`positional_sample_scores`: how far, in total
    variation, a sample's attention row moves from the batch's mean row at the same position. A
    pattern fixed by position alone (previous token, first position, uniform) scores 1; a head
    whose rows follow the content scores lower. Meaningful on a batch whose samples share their
    positions (e.g. :func:`fisherjax.heads.probes.random_probe`).
    """
    return 1.0 - mean_over_samples(positional_sample_scores(attentions, attention_mask))
