"""From two tasks to what the tiles need: the samples with active tokens, the pooled Fisher's
head views, the ridge weights ``1/(Î+λ)`` per part, the per-slice diagnostics and task B's
per-sample factor ``s_j`` (``normalize_gj``); for a permutation test, task A as one mean row
(:func:`mean_row`). Computed once per heatmap.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from fisherjax.analysis.qkov._operands import BlockKinds, Side, block_kinds, side_of, slice_key
from fisherjax.analysis.qkov.options import ScoreOptions
from fisherjax.analysis.qkov.results import SliceDiagnostics
from fisherjax.errors import ConfigError, DataError, NumericalError
from fisherjax.fisher.pool import pool_fisher, pool_weights
from fisherjax.fisher.factored import FactoredGrads, stored_dtype
from fisherjax.fisher.state import SampleGrads, TaskFisher, sample_grads_of, weighted_row_mean
from fisherjax.layout import ATTENTION_BLOCKS, ModelLayout


class Prepared(NamedTuple):
    """Everything the tiles need, computed once per heatmap."""

    a: SampleGrads
    b: SampleGrads
    name_a: str
    name_b: str
    dropped_a: tuple[int, ...]
    dropped_b: tuple[int, ...]
    kinds: BlockKinds
    weights: dict[str, np.ndarray]
    """``{block/kind: [layer, *view]}`` float32 ``1/(Î+λ)`` (its 3/2 power for the natural variant)."""
    diagnostics: SliceDiagnostics
    slice_sizes: np.ndarray
    """``[block]`` parameters per slice."""
    scale_b: np.ndarray
    """float32 factor ``s_j`` (``normalize_gj``) of every stored sample of task B, by position in
    ``b`` (0 at positions not in :attr:`b_rows`)."""
    a_rows: np.ndarray | None = None
    """Positions in ``a`` of the samples scored and whose Fisher is used (None: all of them)."""
    b_rows: np.ndarray | None = None
    """Positions in ``b`` of the partner samples (None: all of them)."""
    mean_row: bool = False
    """Whether ``a`` is one row, the mean of task A's factor of the product over its samples
    (:func:`mean_row`), read as it is."""

    @property
    def a_positions(self) -> np.ndarray:
        """Positions in ``a``'s stored arrays of task A's samples, in order."""
        return np.arange(len(self.a)) if self.a_rows is None else self.a_rows

    @property
    def b_positions(self) -> np.ndarray:
        """Positions in ``b``'s stored arrays of task B's samples, in order."""
        return np.arange(len(self.b)) if self.b_rows is None else self.b_rows


def task_samples(task: TaskFisher | SampleGrads, default_name: str) -> tuple[SampleGrads, str]:
    """A task's per-sample arrays and name (a TaskFisher's own name, else ``default_name``)."""
    return sample_grads_of(task, None if isinstance(task, TaskFisher) else default_name)


def active(samples: SampleGrads, name: str, rows: np.ndarray | None = None) -> tuple[SampleGrads, np.ndarray | None, tuple[int, ...]]:
    """Drop samples with ``T_i = 0`` (they carry no contribution), with a warning; returns the
    samples, the positions kept (None: all; with ``rows``, those of ``rows`` kept, and the
    samples are not copied) and the dropped ids."""
    tokens = np.asarray(samples.tokens)
    chosen = np.arange(len(tokens)) if rows is None else np.asarray(rows)
    keep = tokens[chosen] > 0
    if keep.all():
        return samples, rows, ()
    dropped = tuple(int(s) for s in np.asarray(samples.sample_ids)[chosen[~keep]])
    warnings.warn(
        f"qkov: task {name!r} has {len(dropped)} sample(s) with no active tokens (T_i = 0); they carry no "
        f"contribution and are dropped (sample ids {list(dropped[:10])})",
        stacklevel=4,
    )
    if rows is not None:
        return samples, chosen[keep], dropped
    return samples.select(np.flatnonzero(keep)), None, dropped


def required_paths(layout: ModelLayout, kinds: BlockKinds) -> list[str]:
    """The stored parameter paths the parts are read from."""
    return sorted({p for b, k in kinds for p in layout.block_sources(b, k)})


def _check_paths(store: Mapping, needed: Sequence[str], what: str, task: str, include_bias: bool) -> None:
    missing = [p for p in needed if p not in store]
    if missing:
        hint = " (or pass include_bias=False)" if any(p.endswith("bias") for p in missing) and include_bias else ""
        raise DataError(f"qkov: task {task!r} stores no {what} for {missing}; collect them{hint}")


def _views(layout: ModelLayout, flat: Mapping[str, np.ndarray], kinds: BlockKinds) -> dict[str, np.ndarray]:
    """``{block/kind: [layer, *view]}`` head views of unbatched leaves (per-layer leaves stacked)."""
    return {
        slice_key(block, kind): layout.stack_layers(layout.block_sources(block, kind), lambda p, b=block: np.asarray(layout.view(p, flat[p], b)))
        for block, kind in kinds
    }


def _slice_matrix(view: np.ndarray, block: str, kind: str) -> np.ndarray:
    """``[layer, heads, slice]`` of an unbatched Fisher view (head axis moved before the rest)."""
    if kind == "bias":
        return view
    if block == "o":
        return view.reshape(view.shape[0], view.shape[1], -1)
    moved = np.moveaxis(view, -2, 1)  # [L, H, d_in, hd]
    return moved.reshape(moved.shape[0], moved.shape[1], -1)


def _ridge_shape(block: str, kind: str, ridge: np.ndarray) -> np.ndarray:
    """Broadcast a per-(layer, head) ridge ``[L, H]`` against a view of (block, kind)."""
    if kind == "bias":
        return ridge[:, :, None]
    if block == "o":
        return ridge[:, :, None, None]
    return ridge[:, None, :, None]


def _pooled(score: ScoreOptions, n_a: int, n_b: int, names: tuple[str, str]) -> tuple[bool, bool]:
    """Whether task A's and task B's Fisher (of ``n_a`` and ``n_b`` samples) enter ``Î`` (weight
    > 0); each that does must have samples, and together at least ``min_fisher_samples``."""
    weights = pool_weights(score.fisher_pool, n_a, n_b) if n_a + n_b else pool_weights(score.fisher_pool, 1, 1)
    used = (weights[0] > 0, weights[1] > 0)
    members = [(name, n) for use, name, n in zip(used, names, (n_a, n_b)) if use]
    n_pool = sum(n for _, n in members)
    if n_pool < score.min_fisher_samples:
        raise DataError(
            f"qkov: the Fisher of {'+'.join(name for name, _ in members)!r} would rest on {n_pool} sample(s) with active "
            f"tokens; a stable Fisher needs at least min_fisher_samples={score.min_fisher_samples}"
        )
    for name, n in members:
        if not n:
            raise DataError(f"qkov: fisher_pool={score.fisher_pool!r} needs the Fisher of task {name!r}, which has no samples")
    return used


def stored_diagonal(task: TaskFisher | SampleGrads, samples: SampleGrads, paths: Sequence[str], rows: np.ndarray | None
                    ) -> dict[str, np.ndarray] | None:
    """A TaskFisher's own diagonal ``Î`` of ``paths`` (float32) where it is the mean of ``C`` over
    exactly the samples at ``rows`` of ``samples`` (None: all of them) — its full diagonal, or its
    :class:`~fisherjax.fisher.state.PartialDiagonal` (the fit half of a held-out test, recorded by
    Phase 1) — with every path covered; else None. Phase 1 computed it from the exact per-sample
    contributions; the mean over the kept ones is the same up to their storage's rounding
    (bfloat16: about 1e-3 in the scores) and costs a pass over them, which for kept token factors
    forms every gradient of those samples once more."""
    if not isinstance(task, TaskFisher):
        return None
    ids = np.sort(np.asarray(samples.sample_ids) if rows is None else np.asarray(samples.sample_ids)[rows])
    for own, diagonal in ((task.sample_ids, task.diagonal), task.partial_diagonal or (None, None)):
        if (diagonal is not None and all(p in diagonal for p in paths) and own is not None
                and np.array_equal(np.sort(np.asarray(own)), ids)):
            return {p: np.asarray(diagonal[p], np.float32) for p in paths}
    return None


def pooled_fisher(
    a: SampleGrads, b: SampleGrads, layout: ModelLayout, kinds: BlockKinds, score: ScoreOptions, names: tuple[str, str],
    used: tuple[bool, bool], rows: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
    stored: tuple[dict | None, dict | None] = (None, None),
) -> dict[str, np.ndarray]:
    """``Î`` ``{path: full tensor}`` of the parts' paths: each task's float32 mean of ``C`` (over its
    ``rows``, None: all) — its ``stored`` diagonal where given (:func:`stored_diagonal`) — pooled
    by :func:`fisherjax.fisher.pool.pool_fisher` (``fisher_pool``); ``used``: which tasks' Fisher
    enter it (:func:`_pooled`)."""
    use_a, use_b = used
    paths = required_paths(layout, kinds)
    n_a, n_b = (len(x) if r is None else len(r) for x, r in zip((a, b), rows))

    def mean_of(samples, use, row, kept):
        return None if not use else kept if kept is not None else samples.fisher(paths, rows=row)

    fisher = pool_fisher(score.fisher_pool, mean_of(a, use_a, rows[0], stored[0]), n_a, mean_of(b, use_b, rows[1], stored[1]), n_b)
    label = "+".join(name for use, name in zip((use_a, use_b), names) if use)
    for p, value in fisher.items():
        if not np.isfinite(value).all():
            raise NumericalError(f"qkov: the contributions of {label!r} for {p!r} contain NaN or inf")
    return fisher


def partner(task_b: TaskFisher | SampleGrads, default_name: str, rows: np.ndarray | None = None
            ) -> tuple[SampleGrads, np.ndarray | None, str, tuple[int, ...]]:
    """Task B's samples with active tokens (of ``rows``, None: all), the positions kept, its name
    and the dropped ids."""
    b, name_b = task_samples(task_b, default_name)
    b, rows, dropped_b = active(b, name_b, rows)
    return b, rows, name_b, dropped_b


def check_partner(b: SampleGrads, name_b: str, paths: Sequence[str], score: ScoreOptions) -> None:
    """Task B stores what its side of the product reads (``C`` for the symmetric variant, else ``g``)."""
    b_side = "contributions" if score.variant == "symmetric" else "grads"
    _check_paths(getattr(b, b_side), paths, b_side, name_b, score.include_bias)


ROUNDING_HARMS = {
    "signed": "its terms of either sign cancel, which magnifies their rounding (a whole heatmap 1e-2 off float32 storage's on "
              "the demo)",
    "kfac": "where the damping is far below the K-FAC spectrum their rounding can decide the scores",
}
"""What rounding the kept gradients below float32 does to each variant that warns of it (the signed
ones, which keep float32 by default in ``analyze``; measurements: benchmarks/RESULTS.md)."""


def warn_if_rounded(samples: SampleGrads, name: str, paths: Sequence[str], variant: str) -> None:
    """Warn where a task's kept gradients (or token factors) that ``variant`` reads are stored
    below float32 and :data:`ROUNDING_HARMS` says what that does to it: bfloat16 keeps 8 bits, so
    each gradient moves by about 2⁻⁹ of its norm in every direction."""
    if variant not in ROUNDING_HARMS:
        return
    rounded = sorted({str(d) for d in (stored_dtype(samples.grads[p]) for p in paths) if d.itemsize < 4})
    if rounded:
        warnings.warn(f"qkov {variant}: task {name!r} keeps its gradients in {', '.join(rounded)}; {ROUNDING_HARMS[variant]}: keep "
                      "float32 (--sample-grads-dtype float32, CollectOptions(sample_grads_dtype='float32'))", stacklevel=4)


def partner_scale(b: SampleGrads, score: ScoreOptions, rows: np.ndarray | None = None) -> np.ndarray:
    """Float32 factor ``s_j`` of task B's samples (``rows``, None: all), by position in ``b`` (0
    elsewhere), applied to the score in every variant: 1 (``"none"``), ``1/T_j``
    (``"per_token_mean"``) or ``1/Σ_{j'∈B} T_{j'}`` (``"per_token_sum"``)."""
    rows = np.arange(len(b)) if rows is None else np.asarray(rows)
    tokens = np.asarray(b.tokens, np.float64)[rows]
    scale = np.zeros(len(b), np.float32)
    if score.normalize_gj == "per_token_mean":
        scale[rows] = 1.0 / tokens
    elif score.normalize_gj == "per_token_sum":
        scale[rows] = 1.0 / tokens.sum() if len(rows) else 1.0
    else:
        scale[rows] = 1.0
    return scale


def prepare(task_a: TaskFisher | SampleGrads, task_b: TaskFisher | SampleGrads, layout: ModelLayout, score: ScoreOptions,
            a_rows: np.ndarray | None = None, mean: bool = False) -> Prepared:
    """Both tasks' samples with active tokens, checked for what the variant reads, and the Fisher's
    weights, diagnostics and slice sizes. ``a_rows``: score (and take the Fisher of) only these
    positions of task A's stored samples, without copying them (a held-out split). ``mean``: task
    A as its mean row (:func:`mean_row`), for a permutation test."""
    a, name_a = task_samples(task_a, "A")
    a, a_rows, dropped_a = active(a, name_a, a_rows)
    b, b_rows, name_b, dropped_b = partner(task_b, "B")
    kinds = block_kinds(layout, score.include_bias)
    paths = required_paths(layout, kinds)
    a_side = "grads" if score.variant == "signed" else "contributions"
    _check_paths(getattr(a, a_side), paths, a_side, name_a, score.include_bias)
    check_partner(b, name_b, paths, score)
    for samples, name in ((a, name_a), (b, name_b)):  # the signed variant reads g on both sides
        warn_if_rounded(samples, name, paths, score.variant)
    n_a = len(a) if a_rows is None else len(a_rows)
    used = _pooled(score, n_a, len(b), (name_a, name_b))
    for use, samples, name in zip(used, (a, b), (name_a, name_b)):
        if use:
            _check_paths(samples.contributions, paths, "contributions", name, score.include_bias)

    stored = (stored_diagonal(task_a, a, paths, a_rows), stored_diagonal(task_b, b, paths, b_rows))
    pooled = pooled_fisher(a, b, layout, kinds, score, (name_a, name_b), used, (a_rows, None), stored)
    fisher = _views(layout, pooled, kinds)
    weights, stats, sizes = {}, [], []
    power = 1.5 if score.variant == "natural" else 1.0
    kv = layout.kv_head_of
    for block in ATTENTION_BLOCKS:
        parts = [k for bb, k in kinds if bb == block]
        if not parts:
            raise DataError(f"qkov: the layout has no {block} block")
        slices = np.concatenate([_slice_matrix(fisher[slice_key(block, k)], block, k) for k in parts], axis=-1)
        median = np.median(slices, axis=-1)
        ridge = np.maximum(np.maximum(score.ridge_lambda, score.ridge_lambda_rel * median), score.eps).astype(np.float32)
        block_stats = (slices.min(-1), median, slices.max(-1), (slices < score.eps).mean(-1), ridge)
        stats.append([s[:, kv] if block in ("k", "v") else s for s in block_stats])  # K/V: per query head
        sizes.append(int(slices.shape[-1]))
        for kind in parts:
            denominator = fisher[slice_key(block, kind)] + _ridge_shape(block, kind, ridge)
            weights[slice_key(block, kind)] = (denominator ** -power).astype(np.float32)
    diagnostics = SliceDiagnostics(*(np.stack(column).astype(np.float64) for column in zip(*stats)))
    prep = Prepared(a, b, name_a, name_b, dropped_a, dropped_b, kinds, weights, diagnostics, np.array(sizes), partner_scale(b, score),
                    a_rows)
    return mean_row(prep, pooled, layout, score) if mean else prep


MEAN_OF_FISHER = ("unsigned", "natural")
"""The variants whose task-A factor is ``C_i`` itself: the mean row of A's samples is then their
Fisher, already computed for the weights."""


def mean_row(prep: Prepared, fisher: dict[str, np.ndarray], layout: ModelLayout, score: ScoreOptions) -> Prepared:
    """``prep`` with task A replaced by one row, ``ā = mean_i f(stored_i) · scale_i`` over A's
    prepared samples (A's factor of the product, :func:`~._operands.side_of`; the mean of ``C_i``
    — A's own ``fisher``, ``fisher_pool="A"`` — for :data:`MEAN_OF_FISHER`). A score is linear in
    A's factor, so this row's scores are the column means ``mean_i M_ij`` exactly, up to float32
    rounding: a permutation test reads nothing else of its scores, and gets them from two
    ``1 × n_partner`` products instead of ``n_a × n_partner`` ones (:mod:`~.stats`). Where A's
    Fisher is Phase 1's own (:func:`stored_diagonal`: a fit half that Phase 1 collected first) the
    row is that mean of the exact contributions, not of their stored rounding, and reads no sample."""
    if score.fisher_pool != "A":
        raise ConfigError("qkov: the mean row of task A is scored against A's own Fisher, which needs fisher_pool='A'")
    paths = required_paths(layout, prep.kinds)
    if score.variant in MEAN_OF_FISHER:
        mean = {p: fisher[p] for p in paths}
    else:
        side = side_of(prep.a, "a", score.variant)
        rows = prep.a_positions
        mean = {p: x.weighted_mean(side.scale, rows, side.transform) if isinstance(x := side.store[p], FactoredGrads)
                else weighted_row_mean(x, side.scale, rows, side.transform) for p in paths}
    row = SampleGrads(np.array([-1]), np.ones(1, np.int64), {p: m[None] for p, m in mean.items()})
    return prep._replace(a=row, a_rows=None, mean_row=True)


def factor_a(prep: Prepared, variant: str) -> Side:
    """Task A's factor of the product: :func:`~._operands.side_of` its stored samples, or the mean
    row as it is (:func:`mean_row`)."""
    if prep.mean_row:
        return Side(prep.a.grads, "identity", np.ones(1, np.float32))
    return side_of(prep.a, "a", variant)


def with_partner(prep: Prepared, task_b: TaskFisher | SampleGrads, layout: ModelLayout, score: ScoreOptions, default_name: str = "B",
                 b_rows: np.ndarray | None = None) -> Prepared:
    """``prep`` with another task B (its positions ``b_rows``, None: all): valid as long as the
    Fisher is A's alone (``fisher_pool="A"``), so A's Fisher, weights and diagnostics are computed
    once for several partner sets."""
    if score.fisher_pool != "A":
        raise ConfigError("qkov: swapping task B keeps A's Fisher, which needs fisher_pool='A'")
    b, b_rows, name_b, dropped_b = partner(task_b, default_name, b_rows)
    check_partner(b, name_b, required_paths(layout, prep.kinds), score)
    return prep._replace(b=b, name_b=name_b, dropped_b=dropped_b, scale_b=partner_scale(b, score, b_rows), b_rows=b_rows)
