"""What the QK-OV entry points return, as pytrees of arrays with hashable metadata.

Every type here is a frozen dataclass registered with ``jax.tree_util.register_dataclass``:
arrays are leaves (``jax.tree.map`` reaches them, ``jax.jit`` takes the value); options, names,
dropped sample ids, block names and counts are static metadata.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jaxtyping import Bool, Float, Int

from fisherjax.analysis.qkov.options import ScoreOptions
from fisherjax.layout import ATTENTION_BLOCKS
from fisherjax.sharding import to_host

_STATIC = dict(static=True)  # dataclass field metadata: pytree metadata, not a leaf


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class SliceDiagnostics:
    """Numerical health of the Fisher per slice, each ``[block, layer, head]`` (K/V rows describe
    the kv head that query head ``h`` reads): min / median / max of ``Î`` over the slice, the share
    of its entries below ``ε``, and the ridge ``λ`` actually applied."""

    fisher_min: Float[np.ndarray, "block layer heads"]
    fisher_median: Float[np.ndarray, "block layer heads"]
    fisher_max: Float[np.ndarray, "block layer heads"]
    share_below_eps: Float[np.ndarray, "block layer heads"]
    ridge: Float[np.ndarray, "block layer heads"]

    def as_dict(self) -> dict[str, np.ndarray]:
        """``{name: [block, layer, head]}`` in field order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class ShardedScores:
    """Scores a heatmap on a mesh left on its devices (``gather_scores=False``).

    ``padded``: ``[block, layer, n_pad, n_b, head]`` float32 ``jax.Array`` with task A's rows split
    over ``"data"`` in contiguous blocks (``n_pad`` a multiple of the ``"data"`` size; rows
    ``≥ n_a`` are zero padding); ``n_a``: the real rows (static). Behaves as the scores
    ``[block, layer, n_a, n_b, head]`` where that costs nothing (:attr:`shape`); ``np.asarray``
    (and indexing) gathers them to the host, which is asking for the full scores.
    :func:`~fisherjax.analysis.qkov.top_conflicts` and
    :func:`~fisherjax.analysis.qkov.bootstrap_layer_head_avg` reduce them on the devices instead.
    """

    padded: Float[jax.Array, "block layer n_pad n_b heads"]
    n_a: int = dataclasses.field(metadata=_STATIC)

    @property
    def shape(self) -> tuple[int, ...]:
        block, layers, _, n_b, heads = self.padded.shape
        return (block, layers, self.n_a, n_b, heads)

    @property
    def ndim(self) -> int:
        return 5

    @property
    def dtype(self):
        return self.padded.dtype

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        gathered = to_host(self.padded)[:, :, : self.n_a]
        return gathered if dtype is None else gathered.astype(dtype)

    def __getitem__(self, index):
        return np.asarray(self)[index]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class QKOVResult:
    """The interference of task B on task A per (block, layer, sample pair, head).

    Attributes:
      scores: ``[block, layer, n_a, n_b, head]`` float32, blocks in ``blocks`` order; K/V entries
        of query head ``h`` are those of kv head ``kv_head_of[h]``. A :class:`ShardedScores`
        when a heatmap on a mesh kept them on the devices (``gather_scores=False``).
      layer_head_avg: ``[block, layer, head]`` mean of ``scores`` over all sample pairs.
      sample_ids_a, sample_ids_b: ``[n_a]``, ``[n_b]`` true sample ids of the rows / columns.
      kv_head_of: ``[head]`` the kv head each query head reads.
      slice_sizes: ``[block]`` parameters per slice (the divisor of ``aggregate="mean"``).
      diagnostics: :class:`SliceDiagnostics` of the Fisher used.
      options: the :class:`~fisherjax.analysis.qkov.ScoreOptions` of the score (static).
      task_a, task_b: task names; dropped_a, dropped_b: sample ids dropped for ``T_i = 0``;
      blocks: the block names (all static).
    """

    scores: Float[np.ndarray, "block layer n_a n_b heads"] | ShardedScores
    layer_head_avg: Float[np.ndarray, "block layer heads"]
    sample_ids_a: Int[np.ndarray, " n_a"]
    sample_ids_b: Int[np.ndarray, " n_b"]
    kv_head_of: Int[np.ndarray, " heads"]
    slice_sizes: Int[np.ndarray, " block"]
    diagnostics: SliceDiagnostics
    options: ScoreOptions = dataclasses.field(metadata=_STATIC)
    task_a: str = dataclasses.field(default="A", metadata=_STATIC)
    task_b: str = dataclasses.field(default="B", metadata=_STATIC)
    dropped_a: tuple[int, ...] = dataclasses.field(default=(), metadata=_STATIC)
    dropped_b: tuple[int, ...] = dataclasses.field(default=(), metadata=_STATIC)
    blocks: tuple[str, ...] = dataclasses.field(default=ATTENTION_BLOCKS, metadata=_STATIC)

    def block(self, name: str) -> Float[np.ndarray, "layer n_a n_b heads"]:
        """Scores of one block."""
        return self.scores[self.blocks.index(name)]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class PermutationResult:
    """A-vs-B against A-vs-A' per cell ``[block, layer, head]``.

    ``observed``: mean score over A×B minus mean over A×A'; ``pvalues``: one-sided permutation
    p-values (B's interference exceeds A''s); ``qvalues``: Benjamini–Hochberg over all distinct
    cells (K/V once per kv head, then gathered to query heads); ``significant``: ``q ≤ alpha``.
    """

    observed: Float[np.ndarray, "block layer heads"]
    pvalues: Float[np.ndarray, "block layer heads"]
    qvalues: Float[np.ndarray, "block layer heads"]
    significant: Bool[np.ndarray, "block layer heads"]
    n_permutations: int = dataclasses.field(metadata=_STATIC)
    alpha: float = dataclasses.field(metadata=_STATIC)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class BootstrapInterval:
    """Percentile bootstrap interval of ``layer_head_avg``, each ``[block, layer, head]``."""

    low: Float[np.ndarray, "block layer heads"]
    high: Float[np.ndarray, "block layer heads"]
    level: float = dataclasses.field(metadata=_STATIC)
    n_bootstrap: int = dataclasses.field(metadata=_STATIC)


def result_of(prep, scores, avg, kv_head_of, score: ScoreOptions) -> QKOVResult:
    """The :class:`QKOVResult` of a heatmap's prepared tasks (either kernel's ``Prepared``: the
    tasks, their names and dropped ids, slice sizes and diagnostics), its scores and their pair mean."""
    return QKOVResult(
        scores=scores,
        layer_head_avg=avg.astype(np.float32),
        sample_ids_a=np.asarray(prep.a.sample_ids),
        sample_ids_b=np.asarray(prep.b.sample_ids),
        kv_head_of=np.asarray(kv_head_of),
        slice_sizes=prep.slice_sizes,
        diagnostics=prep.diagnostics,
        options=score,
        task_a=prep.name_a,
        task_b=prep.name_b,
        dropped_a=prep.dropped_a,
        dropped_b=prep.dropped_b,
    )


def to_arrays(result: QKOVResult) -> dict[str, np.ndarray]:
    """The arrays of ``qkov.npz``: scores, layer_head_avg, block names, sample ids, kv map, slice
    sizes and the diagnostics (``fisher_min``, ``fisher_median``, ``fisher_max``,
    ``share_below_eps``, ``ridge``)."""
    return {
        "scores": np.asarray(result.scores),
        "layer_head_avg": np.asarray(result.layer_head_avg),
        "blocks": np.array(result.blocks),
        "sample_ids_a": np.asarray(result.sample_ids_a),
        "sample_ids_b": np.asarray(result.sample_ids_b),
        "kv_head_of": np.asarray(result.kv_head_of),
        "slice_sizes": np.asarray(result.slice_sizes),
        **{name: np.asarray(value) for name, value in result.diagnostics.as_dict().items()},
    }


def save_npz(result: QKOVResult, path) -> None:
    """Write :func:`to_arrays` to ``path`` (``numpy.savez_compressed``)."""
    np.savez_compressed(path, **to_arrays(result))
