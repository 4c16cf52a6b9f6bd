"""From slice sums to scores: task B's factor ``s_j``, the aggregation over the slice and the GQA
gather of K/V to query heads — ``[block, layer, n_a, n_b, head]``."""

from __future__ import annotations

import numpy as np
from jaxtyping import Float

from fisherjax.analysis.qkov._prepare import Prepared
from fisherjax.analysis.qkov._tiles import raw_scores
from fisherjax.analysis.qkov.options import KernelOptions, ScoreOptions
from fisherjax.errors import NumericalError
from fisherjax.layout import ATTENTION_BLOCKS, ModelLayout


def finish(
    raw: dict[str, np.ndarray], prep: Prepared, layout: ModelLayout, score: ScoreOptions, b_positions: np.ndarray
) -> Float[np.ndarray, "block layer n_a n_b heads"]:
    """``M_ij = s_j · Σ_k a_ik b_jk`` (divided by the slice size for ``aggregate="mean"``), K/V
    gathered to query heads; a non-finite score is a :class:`~fisherjax.errors.NumericalError`."""
    kv = layout.kv_head_of
    stacked = []
    for n, block in enumerate(ATTENTION_BLOCKS):
        value = raw[block] * prep.scale_b[b_positions][None, None, :, None]
        if score.aggregate == "mean":
            value = value / np.float32(prep.slice_sizes[n])
        stacked.append(value[..., kv] if block in ("k", "v") else value)
    scores = np.stack(stacked).astype(np.float32)
    if not np.isfinite(scores).all():
        bad = np.argwhere(~np.isfinite(scores))[0]
        raise NumericalError(
            f"qkov: non-finite score in block {ATTENTION_BLOCKS[bad[0]]}, layer {bad[1]}, head {bad[4]}: the gradients "
            "of one of the tasks contain NaN or inf"
        )
    return scores


def all_scores(
    prep: Prepared, layout: ModelLayout, score: ScoreOptions, kernel: KernelOptions, *, progress: bool = False, desc: str = "QK-OV"
) -> Float[np.ndarray, "block layer n_a n_b heads"]:
    """Scores of every sample pair and layer (:func:`~._tiles.raw_scores`, :func:`finish`)."""
    a_pos, b_pos = np.arange(len(prep.a)), np.arange(len(prep.b))
    raw = raw_scores(prep, layout, score, kernel, a_pos, b_pos, np.arange(layout.num_layers), progress=progress, desc=desc)
    return finish(raw, prep, layout, score, b_pos)
