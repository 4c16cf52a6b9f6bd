"""The per-group scope's tests: every (group, pair) cosine against the same group's within-task
cosines, a few groups at a time, with FDR over all ``G · n_a · n_b`` tests — and only the tests
that can be discoveries kept.

A per-group test of ``n_a × n_b`` pairs over ``G`` groups has ``G · n_a · n_b`` p-values: 576 M for
GPT-2 small's attention heads at 1000 samples a task, 4 G for a 7B model's. Holding them, their
q-values and the pooled null whole (``G · n²`` values a side) took about 24 bytes per tested value
(RESULTS.md, twenty-fourth session): 41.5 GB for GPT-2 small at 1000 + 1000, 295 GB for Llama-7B.
Discoveries need much less. Under Benjamini–Hochberg (or –Yekutieli) at level ``alpha`` a test
with ``p > alpha`` has ``q > alpha``, so :func:`group_tests`

1. forms the pooled null of each reference side a few groups at a time, keeping only its values
   low enough to resolve p-values up to ``alpha`` (:func:`~.null.pooled_null` with ``resolve``);
2. tests the cross-task cosines a few groups at a time and keeps the tests with ``p ≤ alpha``
   (:class:`GroupTests`), counting every test;
3. takes q-values over those of all the tests (:func:`fisherjax.stats.fdr_qvalues` with ``tests``
   and ``bound``).

Every p-value ``≤ alpha``, every q-value ``≤ alpha`` and every discovery equal the whole
procedure's, to the bit (``tests/test_conflicts.py``). A test above ``alpha`` is only known to be
there; its p-value is not resolved.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np

from fisherjax.analysis.conflicts.gram import Gram, effect_sizes, tested_cosines
from fisherjax.analysis.conflicts.null import CHUNK_VALUES, NullBuilder, PooledNull, conflict_pvalues, pooled_null, pooled_pvalues
from fisherjax.analysis.conflicts.options import ConflictOptions
from fisherjax.stats import fdr_qvalues

__all__ = [
    "GROUP_CHUNK_VALUES", "HOT_NULL_VALUES", "KEPT_CHUNK", "GroupTests", "ReferenceStream", "TooManyKept", "distinct_positions",
    "group_tests", "kept_blocks",
]

_STATIC = dict(static=True)

GROUP_CHUNK_VALUES = 8 * CHUNK_VALUES
"""Tested (group, pair) values per step of :func:`group_tests` (whole groups, at least one): the
step's float64 cosines, p-values and each side's p-values are arrays of this many values."""

KEPT_CHUNK = 1 << 22
"""Kept tests per block where their coordinates are needed (:meth:`GroupTests.blocks`): three int64
arrays and a few float64 ones of this many values, not of every kept test — all of them, when the
two tasks conflict everywhere."""


HOT_NULL_VALUES = 2048
"""Within-task cosines a streamed reference keeps of each group for the figure
(:class:`ReferenceStream`): all of a group's distinct ones up to this many (64 samples a task
have 2016), else this many spread evenly over them."""


class TooManyKept(Exception):
    """More tests with ``p ≤ alpha`` than ``ConflictOptions.max_kept_tests``; says how many, of what."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupTests:
    """The per-group tests that can be discoveries: every tested (group, pair) with ``p ≤ alpha``.

    ``index [K]``: flat positions in ``[G, n_a, n_b]`` (``shape``), ascending; ``cosines [K]``:
    the group cosines tested; ``pvalues [K]``; ``qvalues [K]`` (Benjamini–Hochberg or –Yekutieli
    over all ``tested`` tests; NaN where above ``alpha``); ``significant [K]`` (``q ≤ alpha`` and
    effect size ``> min_effect_size``). Every
    other one of the ``tested`` tests has ``p > alpha``, so ``q > alpha``: not significant. A
    pytree: the arrays are leaves, ``shape`` and ``tested`` static metadata.
    """

    index: np.ndarray
    cosines: np.ndarray
    pvalues: np.ndarray
    qvalues: np.ndarray
    significant: np.ndarray
    shape: tuple[int, int, int] = dataclasses.field(metadata=_STATIC)
    tested: int = dataclasses.field(metadata=_STATIC)

    @property
    def n_significant(self) -> int:
        return int(np.count_nonzero(self.significant))

    def blocks(self, which: np.ndarray | None = None):
        """:func:`kept_blocks` of these tests."""
        return kept_blocks(self.index, self.shape, which)

    def at_pairs(self, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(q [G, P], significant [G, P])`` of every group at the pairs ``(i[p], j[p])``: NaN and
        False where a test was not kept (``p > alpha``) or not tested."""
        groups, n_a, n_b = self.shape
        flat = np.arange(groups)[:, None] * (n_a * n_b) + (np.asarray(i) * n_b + np.asarray(j))[None]
        if not len(self.index):
            return np.full(flat.shape, np.nan), np.zeros(flat.shape, bool)
        at = np.minimum(np.searchsorted(self.index, flat), len(self.index) - 1)
        found = self.index[at] == flat
        return np.where(found, self.qvalues[at], np.nan), found & self.significant[at]

    def significant_map(self, group: int) -> np.ndarray:
        """``[n_a, n_b]``: which pairs are significant on ``group``."""
        _, n_a, n_b = self.shape
        lo, hi = np.searchsorted(self.index, [group * n_a * n_b, (group + 1) * n_a * n_b])
        out = np.zeros(n_a * n_b, bool)
        out[self.index[lo:hi][self.significant[lo:hi]] - group * n_a * n_b] = True
        return out.reshape(n_a, n_b)

    def per_pair(self, values: np.ndarray, which: np.ndarray | None = None, initial: float = np.nan,
                 reduce: np.ufunc = np.fmin) -> np.ndarray:
        """``[n_a, n_b]``: ``reduce`` over groups of ``values [K]`` (one per kept test; ``which``
        only), at ``initial`` where a pair has none — e.g. a pair's smallest p-value over its groups."""
        _, n_a, n_b = self.shape
        out = np.full(n_a * n_b, initial, np.float64)
        for rows, _, i, j in self.blocks(which):
            reduce.at(out, i * n_b + j, values[rows])
        return out.reshape(n_a, n_b)


def kept_blocks(index: np.ndarray, shape: tuple[int, int, int], which: np.ndarray | None = None):
    """``(rows, group, i, j)`` of the kept tests at flat positions ``index`` of ``shape`` (``which``:
    a mask over them, or all), a block of :data:`KEPT_CHUNK` at a time: ``rows`` their positions
    among the kept tests."""
    for start in range(0, len(index), KEPT_CHUNK):
        rows = np.arange(start, min(start + KEPT_CHUNK, len(index)))
        if which is not None:
            rows = rows[which[rows]]
        yield (rows, *np.unravel_index(index[rows], shape))


def distinct_positions(n: int, r: int, square: bool, most: int | None = None) -> np.ndarray:
    """Flat positions in ``[n, r]`` of a reference's distinct cosines (a square, within-task side's
    upper triangle; all of a split's), row by row — at most ``most`` of them, evenly spread."""
    positions = np.flatnonzero(np.triu(np.ones((n, r), bool), 1)) if square else np.arange(n * r)
    if most is not None and len(positions) > most:
        positions = positions[np.linspace(0, len(positions) - 1, most).round().astype(np.int64)]
    return positions


class ReferenceStream:
    """One reference side of the per-group tests, fed group by group as its Gram's slices are read
    (a :data:`~.gram.GroupSink` for :func:`~.gram.sliced_grams`), so its ``[G, n, r]`` group dot
    products are never held: each group's tested cosines (:func:`~.gram.tested_cosines`) go into its
    pooled null (:class:`~.null.NullBuilder`, kept down to ``alpha``) and :data:`HOT_NULL_VALUES`
    of its distinct ones are kept for the figure (``sample [G, ≤ HOT_NULL_VALUES]``, float64)."""

    def __init__(self, shape: tuple[int, int, int], side: str, options: ConflictOptions):
        groups, n, r = shape
        self.null = NullBuilder(shape, exclude_self=side != "reference", resolve=options.alpha, tail_size=_tail_size(options))
        self.positions = distinct_positions(n, r, side != "reference", HOT_NULL_VALUES)
        self.sample = np.full((groups, len(self.positions)), np.nan)

    def __call__(self, groups: np.ndarray, dots: np.ndarray, sq_norms_x: np.ndarray, sq_norms_y: np.ndarray) -> None:
        cosines = tested_cosines(dots, sq_norms_x, sq_norms_y)
        self.sample[groups] = cosines.reshape(len(groups), -1)[:, self.positions]
        self.null.add(groups, cosines)


def _tail_size(options: ConflictOptions) -> int | None:
    """The Pareto tail's size the pooled null keeps room for (:func:`~.null.pooled_null`)."""
    return 250 if options.tail == "gpd" else None


def group_tests(cross: Gram, references: Mapping[str, Gram], options: ConflictOptions,
                nulls: Mapping[str, PooledNull] | None = None) -> GroupTests:
    """The per-group tests of ``cross``'s group cosines (:meth:`~.gram.Gram.tested_group_cosines`)
    against each reference Gram's (``"a"``: A × A, ``"b"``: B × B, ``"reference"``: A × split), the
    larger p-value where both sides are used, with ``options``' null, tail, ``alpha``, FDR method
    and minimum effect size (module docstring for what is kept). ``nulls``: each side's pooled
    null already built (:class:`ReferenceStream`), whose Gram then needs no group dot products.

    Holds the A × B Grams it is given, each side's pooled null down to ``alpha`` (about ``alpha``
    of its ``G · n²`` values, float64), :data:`GROUP_CHUNK_VALUES` values of a step and the kept
    tests (``alpha`` of the tests when none is a conflict, all of them when every one is).

    Raises:
      TooManyKept: more than ``options.max_kept_tests`` tests with ``p ≤ alpha``.
    """
    groups, n_a, n_b = cross.group_dots.shape
    alpha = options.alpha
    nulls = dict(nulls or {})
    if options.null == "pooled":
        for side, ref in references.items():
            if side not in nulls:
                nulls[side] = pooled_null(ref.tested_group_cosines, ref.group_dots.shape, exclude_self=side != "reference",
                                          resolve=alpha, tail_size=_tail_size(options))
    step = max(1, GROUP_CHUNK_VALUES // max(n_a * n_b, 1))
    kept_index, kept_p, tested, kept = [], [], 0, 0
    for first in range(0, groups, step):
        block = slice(first, first + step)
        scores = cross.tested_group_cosines(block)
        p = None
        for side, ref in references.items():
            test = np.swapaxes(scores, -1, -2) if side == "b" else scores
            if side in nulls:
                pooled, width = nulls[side], ref.group_sq_norms_a.shape[1]
                per_row = [x.reshape(-1, width)[block] for x in (pooled.center, pooled.scale, pooled.usable)]
                side_p = pooled_pvalues(test, *per_row, pooled)
            else:
                side_p = conflict_pvalues(test, ref.tested_group_cosines(block), exclude_self=side != "reference",
                                          null=options.null, tail=options.tail)
            side_p = np.swapaxes(side_p, -1, -2) if side == "b" else side_p
            p = side_p if p is None else np.fmax(p, side_p, out=p)  # valid under either null: the larger
            del side_p
        tested += p.size - int(np.count_nonzero(np.isnan(p)))
        small = np.flatnonzero(p <= alpha)  # NaN (untested) and +inf (above alpha, not resolved): not kept
        kept_index.append(small + first * n_a * n_b)
        kept_p.append(p.reshape(-1)[small])
        kept += len(small)
        del scores, p
        if options.max_kept_tests is not None and kept > options.max_kept_tests:
            done = min(first + step, groups)
            raise TooManyKept(f"{kept} of the {tested} (group, pair) tests of the first {done} of {groups} groups have p ≤ {alpha}, "
                              f"more than the {options.max_kept_tests} the per-group tests may keep in the memory available")
    index = np.concatenate(kept_index)
    del kept_index
    pvalues = np.concatenate(kept_p)
    del kept_p
    qvalues = fdr_qvalues(pvalues, options.fdr_method, tests=tested, bound=alpha)
    cosines, significant = np.empty(len(index)), np.empty(len(index), bool)
    for rows, g, i, j in kept_blocks(index, (groups, n_a, n_b)):
        cosines[rows] = cross.group_dots[g, i, j] / np.sqrt(cross.group_sq_norms_a[g, i].astype(np.float64) * cross.group_sq_norms_b[g, j])
        significant[rows] = (qvalues[rows] <= alpha) & (effect_sizes(cosines[rows]) > options.min_effect_size)
    return GroupTests(index, cosines, pvalues, qvalues, significant, (groups, n_a, n_b), tested)
