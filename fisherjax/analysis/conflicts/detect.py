"""Phase 5 end to end: which sample of task A pulls against which sample of task B, where, and
is it more than noise.

:func:`detect` runs named steps, each a function of this module:

1. :func:`_read_sources` — the tasks (and an optional reference split) as :class:`~.sources.Stream` values;
2. :func:`_whitening` — the Fisher that whitens (:mod:`fisherjax.fisher.pool`) and its damping;
3. :func:`_grams` — the A × B Gram and the within-task reference Grams (:mod:`.gram`);
4. :func:`_pvalues` — p-values of every pair against the reference (:mod:`.null`); per group,
   :func:`~.group_tests.group_tests` tests every (group, pair) and keeps those that can be
   discoveries;
5. :func:`_significance` — q-values (Benjamini–Hochberg / –Yekutieli over all tests) and the
   conflicts: ``q ≤ alpha`` and effect size ``> min_effect_size``;
6. :func:`_report` — top pairs, clusters, hotspots and recommendations (:mod:`.findings`) in a
   :class:`ConflictReport`.

The maths of each step is stated once, in its module; the settings are a
:class:`~.options.ConflictOptions`. What a reader sees (``conflicts.json``, the figure, the
Markdown) is :mod:`fisherjax.report.conflicts`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Float

from fisherjax.analysis.conflicts.findings import ConflictCluster, ConflictPair, clusters, recommendations, top_pairs
from fisherjax.analysis.conflicts.gram import (
    Gram, chunk_count, chunk_size_for, damping, effect_sizes, gram_matrix, inverse_sqrt, sliced_grams, slices_fit, split_sides,
)
from fisherjax.analysis.conflicts.group_tests import (
    HOT_NULL_VALUES, GroupTests, ReferenceStream, TooManyKept, distinct_positions, group_tests,
)
from fisherjax.analysis.conflicts.null import conflict_pvalues
from fisherjax.analysis.conflicts.options import ConflictOptions
from fisherjax.analysis.conflicts.sources import GroupIndex, Grouping, Source, Stream, as_stream, check_same_parameters, grouping_for
from fisherjax.errors import ConfigError, DataError
from fisherjax.fisher.pool import pool_fisher, pool_weights
from fisherjax.layout import ATTENTION_BLOCKS, ModelLayout
from fisherjax.progressbar import progress_bar
from fisherjax.settings import with_overrides
from fisherjax.sharding import check_mesh
from fisherjax.stats import fdr_qvalues

__all__ = [
    "GROUP_GRAM_BYTES", "GROUP_TEST_CORE_SECONDS", "GROUP_TEST_CORE_SECONDS_INDEPENDENT", "GROUP_TEST_FIXED_BYTES",
    "GROUP_TEST_STEP_BYTES", "HOT_NULL_BYTES", "KEPT_SHARE", "KEPT_TEST_BYTES", "NULL_TAIL_BYTES",
    "ConflictReport", "detect", "group_scope_bytes", "group_test_core_seconds", "group_test_values", "head_map", "max_kept_tests",
]

_STATIC = dict(static=True)


class _FrozenMapping(Mapping):
    """A read-only mapping equal and hashed by content (JSON-like values), so a report's
    ``settings`` and ``recommendations`` can be static pytree metadata."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping):
        self._data = dict(data)

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __eq__(self, other) -> bool:
        return isinstance(other, Mapping) and self._data == dict(other)

    def __hash__(self) -> int:
        return hash(json.dumps(self._data, sort_keys=True, default=repr))

    def __repr__(self) -> str:
        return repr(self._data)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ConflictReport:
    """Everything :func:`detect` found for tasks A and B.

    Arrays are ``[n_a, n_b]`` over pairs (rows = A's samples in ``sample_ids_a`` order):
    ``cosines``, ``effect_sizes``, ``pvalues``, ``qvalues``, ``significant``. With
    ``scope="groups"`` the tests are per (group, pair) and ``group_tests`` keeps those with
    ``p ≤ alpha`` (:class:`~.group_tests.GroupTests`: every discovery, with its p- and q-value;
    the others have ``q > alpha``); the pair arrays then hold the smallest p- and q-value over
    a pair's kept groups — NaN where it has none (every group above ``alpha``, or untested) — and
    a pair is significant when any of its groups is. ``gram`` keeps the dot products (per group
    too, when computed); ``null_cosines`` the distinct within-task reference cosines per side
    (``{"a": [...], "b": [...]}`` or ``{"reference": [...]}``), and ``hot_null_cosines`` the same
    on the hottest group (the largest ``hotspots``; per-group scope with a discovery only; at most
    :data:`~.group_tests.HOT_NULL_VALUES` of them, evenly spread, where the references streamed
    into their nulls).
    ``hotspots [G]``: net conflict of each group over what was found,
    ``−Σ contribution_g`` over significant pairs (or significant group-pairs); positive = the
    group pulls them apart. ``settings``: what produced it (the options as applied: reference
    ``"external split"``, ``fisher_pool`` ``"given"`` for an explicit Fisher, the damping ``eps``
    used, ``scope`` ``"overall"`` with a ``scope_note`` where the per-group tests passed
    ``max_kept_tests``); ``options``: the :class:`~.options.ConflictOptions`.

    A pytree: arrays, the Gram, pairs and clusters are leaves (or subtrees); task names,
    ``settings``, ``recommendations`` and ``options`` are static metadata.
    """

    task_a: str = dataclasses.field(metadata=_STATIC)
    task_b: str = dataclasses.field(metadata=_STATIC)
    sample_ids_a: np.ndarray
    sample_ids_b: np.ndarray
    cosines: np.ndarray
    effect_sizes: np.ndarray
    pvalues: np.ndarray
    qvalues: np.ndarray
    significant: np.ndarray
    gram: Gram
    null_cosines: Mapping[str, np.ndarray]
    hotspots: np.ndarray | None
    top_pairs: tuple[ConflictPair, ...]
    clusters: tuple[ConflictCluster, ...]
    recommendations: Mapping[str, Any] = dataclasses.field(metadata=_STATIC)
    settings: Mapping[str, Any] = dataclasses.field(metadata=_STATIC)
    group_tests: GroupTests | None = None
    hot_null_cosines: Mapping[str, np.ndarray] | None = None
    options: ConflictOptions | None = dataclasses.field(default=None, metadata=_STATIC)

    @property
    def groups(self) -> GroupIndex:
        return self.gram.groups

    @property
    def n_significant(self) -> int:
        return int(self.significant.sum())


def detect(
    task_a: Source,
    task_b: Source,
    *,
    layout: ModelLayout | None = None,
    options: ConflictOptions | None = None,
    fisher: Mapping[str, Any] | None = None,
    reference_split: Source | None = None,
    names: tuple[str, str] | None = None,
    progress: bool = False,
    mesh: Mesh | None = None,
    **overrides,
) -> ConflictReport:
    """Find the sample pairs of tasks A and B whose whitened gradients conflict.

    Scores: :mod:`~fisherjax.analysis.conflicts.gram`; null hypothesis and tests:
    :mod:`~fisherjax.analysis.conflicts.null`; settings: :class:`~.options.ConflictOptions`
    (``options``, and/or its fields as keyword ``overrides``:
    ``detect(a, b, layout=layout, scope="groups", null="row")``).

    Args:
      task_a, task_b: per-sample gradients (:data:`~.sources.Source`), e.g. TaskFisher values
        with kept per-sample gradients, or GroupedGrads from :mod:`.projection`.
      layout: the model's layout, for per-head groups (without it, one group per leaf).
      options: a :class:`~.options.ConflictOptions` (default: its defaults), updated by
        ``overrides``.
      fisher: an explicit ``{path: param-shaped}`` Fisher to whiten with, overriding
        ``fisher_pool`` (needed for streamed sources, which store none).
      reference_split: a source holding a held-out reference split of task A (same parameters,
        disjoint samples), used instead of the within-task reference sides.
      names: task names for the report (default: from the sources).
      progress: show a progress bar over the Gram chunk pairs.
      mesh: a :class:`jax.sharding.Mesh` with axes ``("data",)`` or ``("data", "model")``
        (:func:`fisherjax.sharding.check_mesh`). Every Gram — A × B and the references A × A,
        B × B, A × split — has its rows split over ``"data"`` in contiguous blocks and its columns
        broadcast (stored tasks a parameter slice at a time, each gradient read once; others in
        chunks); the Fisher and damping are computed once on the host as without a mesh
        and the whitening factors replicated, so the Grams differ only by float32 rounding. The
        Grams (``[n_a, n_b]``, per group ``[G, n_a, n_b]``) are the summaries and are gathered;
        p-values, FDR and findings run on the host as always. ``chunk_size`` and
        ``memory_budget_bytes`` are per device. Callable (streamed) sources work chunk by chunk:
        each of their chunks is zero-padded and split. A ``"model"`` axis replicates the work.
        None (default): one device, as always.

    Raises:
      DataError: a task with fewer than two samples (or too few for the reference), different
        parameter sets, a zero gradient, a missing Fisher. NumericalError: NaN/inf gradients.
      ConfigError: a bad option value or unknown option name.
    """
    mesh = check_mesh(mesh)
    options = _options(options, overrides)
    a, b, external = _read_sources(task_a, task_b, reference_split, names)
    grouping = a.grouping or grouping_for(a.shapes, layout)
    inv_sqrt, eps_used, whitened = _whitening(options, fisher, a, b)
    cross, references, streamed = _grams(a, b, external, grouping, inv_sqrt, options, progress, mesh)
    null_cosines = _null_cosines(references)
    scope, note = options.scope, None
    if scope == "groups":
        try:
            nulls = {side: stream.null.finish() for side, stream in streamed.items()}
            significance = _group_significance(cross, group_tests(cross, references, options, nulls))
        except TooManyKept as too_many:
            scope, note = "overall", f"tested on the whole gradient, not per group: {too_many}"
    if scope == "overall":
        significance = _significance(cross, _pvalues(cross.cosines, references, options), options)
    whitened_with = None if not whitened or a.grouping is not None else "given" if fisher is not None else options.fisher_pool
    settings = dict(
        scope=scope, reference="external split" if external is not None else options.reference,
        null=options.null, tail=options.tail if options.null == "pooled" else None, whiten=whitened,
        fisher_pool=whitened_with, eps=eps_used, alpha=options.alpha, fdr_method=options.fdr_method,
        min_effect_size=options.min_effect_size, **({"scope_note": note} if note else {}),
    )
    return _report(a.name, b.name, cross, references, streamed, significance, null_cosines, settings, options)


GROUP_GRAM_BYTES = 4
"""Host bytes per (group, pair) value of the per-group scope's Grams: float32 group dot products
— the A × B Gram's for every group, the within-task Grams' for the groups held at once
(:func:`group_scope_bytes`)."""

HOT_NULL_BYTES = 8
"""Host bytes per within-task cosine a streamed reference keeps for the figure
(:data:`~.group_tests.HOT_NULL_VALUES` of each group, float64)."""

KEPT_TEST_BYTES = 48
"""Host bytes per test the per-group scope keeps (``p ≤ alpha``: :class:`~.group_tests.GroupTests`)
at its peak: index, cosine, p- and q-value, significance, and the q-values' sort order. Measured
41–46 when every test of 256 + 256 and 384 + 384 samples over GPT-2 small's 576 groups is kept
(``benchmarks/conflict_tests.py --shift 1``, RESULTS.md, twenty-seventh session)."""

KEPT_SHARE = 0.1
"""The share of the ``G · n_a · n_b`` tests :func:`group_scope_bytes` counts as kept by default:
twice the ``alpha = 0.05`` that tasks which do not conflict keep (measured 0.038–0.044). Tasks that
conflict more keep more, up to all; ``--conflict-scope auto`` bounds what a pair may keep
(``ConflictOptions.max_kept_tests``, :func:`max_kept_tests`) and tests a pair past it on the whole
gradient."""

NULL_TAIL_BYTES = 16
"""Host bytes per reference value and per unit of ``alpha`` of a side's pooled null kept down to
``alpha`` (:func:`~.null.pooled_null`: float64 values in a buffer twice their number)."""

GROUP_TEST_FIXED_BYTES = 1.1e9
"""Host bytes of the per-group scope that stop growing with the samples: a step's float64 arrays
(:data:`~.group_tests.GROUP_CHUNK_VALUES`), the pooled null's pieces (:data:`~.null.CHUNK_VALUES`),
the threads' arenas and the Gram kernels — 0.9–1.1 GB above the rest at 128–512 samples a task
(RESULTS.md, twenty-seventh session). Below that, :data:`GROUP_TEST_STEP_BYTES` per tested value."""

GROUP_TEST_STEP_BYTES = 40
"""Host bytes per tested value while the steps and pieces are not full (a few float64 arrays of
every value): small tests hold :data:`GROUP_TEST_FIXED_BYTES` only once they have ~30 M values."""


GROUP_TEST_CORE_SECONDS = 2.2e-8
"""Host core-seconds :func:`detect`'s per-group scope spends per tested (group, pair) value and per
doubling of its ``G · n_a · n_b`` A × B tests (they sort and search: :func:`group_test_core_seconds`),
from its Grams to its report: seconds × the cores they run on (``backend.on_host_cores``), measured
0.005–0.009 core-µs at 256–1000 samples per task on GPT-2 small's 576 groups for tasks that do not
conflict, 0.019–0.021 for tasks that conflict in every test (``benchmarks/conflict_tests.py [--shift
1]``, RESULTS.md, twenty-seventh and thirty-fourth sessions); the largest is kept."""

GROUP_TEST_CORE_SECONDS_INDEPENDENT = 9e-9
"""The same rate for tasks that do not conflict (about ``alpha`` of the tests kept): the largest
measured at 256–1000 samples per task in the thirty-fourth session (0.0089 core-µs at 256)."""


def group_test_values(n_a: int, n_b: int, groups: int) -> int:
    """Tested (group, pair) values of :func:`detect`'s per-group scope for ``n_a`` × ``n_b``
    samples over ``groups`` groups, with both tasks as references: the A × B Gram's and the A × A
    and B × B reference Grams', ``G · (n_a·n_b + n_a² + n_b²)``."""
    return groups * (n_a * n_b + n_a * n_a + n_b * n_b)


def group_test_core_seconds(n_a: int, n_b: int, groups: int, conflicting: bool = True) -> float:
    """Host core-seconds of :func:`detect`'s per-group tests, about
    ``rate · values · log2(G · n_a · n_b)`` (:func:`group_test_values`), ``rate``
    :data:`GROUP_TEST_CORE_SECONDS` where every test conflicts (the most: every test is kept),
    :data:`GROUP_TEST_CORE_SECONDS_INDEPENDENT` where the tasks do not (``conflicting=False``);
    they run on every core, so a host with ``c`` cores takes about this over ``c``. ``groups=1``:
    the whole gradient's tests."""
    rate = GROUP_TEST_CORE_SECONDS if conflicting else GROUP_TEST_CORE_SECONDS_INDEPENDENT
    return rate * group_test_values(n_a, n_b, groups) * math.log2(max(groups * n_a * n_b, 2))


def group_scope_bytes(n_a: int, n_b: int, groups: int, kept_share: float = KEPT_SHARE, alpha: float = 0.05,
                      open_groups: int | None = None) -> float:
    """Host bytes of :func:`detect`'s per-group scope: the Grams (:data:`GROUP_GRAM_BYTES` per value:
    the A × B Gram's ``G · n_a · n_b``; the within-task Grams' ``open_groups · (n_a² + n_b²)``),
    ``kept_share`` of the ``G · n_a · n_b`` tests kept (:data:`KEPT_TEST_BYTES` each), each side's
    pooled null down to ``alpha`` (:data:`NULL_TAIL_BYTES`) and the steps' arrays
    (:data:`GROUP_TEST_STEP_BYTES` per value, at most :data:`GROUP_TEST_FIXED_BYTES`).
    ``open_groups``: the groups whose within-task dot products are held at once where the
    references stream into their nulls (stored tasks under the pooled null:
    :func:`~.gram.open_groups`), each side then keeping :data:`HOT_NULL_BYTES` per cosine of its
    figure's sample; None: all ``G`` held. The overall scope holds ``[n_a, n_b]`` arrays and the
    group dot products only (float32, for the hotspots)."""
    within = n_a * n_a + n_b * n_b
    if open_groups is None:
        references = GROUP_GRAM_BYTES * groups * within
    else:
        sample = sum(min(HOT_NULL_VALUES, n * (n - 1) // 2) for n in (n_a, n_b))
        references = GROUP_GRAM_BYTES * min(open_groups, groups) * within + HOT_NULL_BYTES * groups * sample
    return (GROUP_GRAM_BYTES * groups * n_a * n_b + references + KEPT_TEST_BYTES * kept_share * groups * n_a * n_b
            + NULL_TAIL_BYTES * alpha * groups * within
            + min(GROUP_TEST_FIXED_BYTES, GROUP_TEST_STEP_BYTES * group_test_values(n_a, n_b, groups)))


def max_kept_tests(n_a: int, n_b: int, groups: int, budget_bytes: float, alpha: float = 0.05, open_groups: int | None = None) -> int:
    """The most tests the per-group scope can keep within ``budget_bytes`` (``ConflictOptions.
    max_kept_tests``): what :func:`group_scope_bytes` leaves beside the Grams, nulls and fixed
    bytes, at :data:`KEPT_TEST_BYTES` each; 0 where those alone take more."""
    return max(0, int((budget_bytes - group_scope_bytes(n_a, n_b, groups, 0.0, alpha, open_groups)) // KEPT_TEST_BYTES))


# ---------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------


def _options(options: ConflictOptions | None, overrides: Mapping) -> ConflictOptions:
    """The options in force: ``options`` (default :class:`~.options.ConflictOptions`) with the
    keyword ``overrides`` applied (checked once, by the options class)."""
    if options is not None and not isinstance(options, ConflictOptions):
        raise ConfigError(f"options must be a ConflictOptions, got {type(options).__name__}")
    if "reference" in overrides and not isinstance(overrides["reference"], str):
        raise ConfigError("pass a reference split of task A as reference_split=, not reference=")
    return with_overrides(options or ConflictOptions(), overrides)


class _Sources(NamedTuple):
    a: Stream
    b: Stream
    external: Stream | None


def _read_sources(task_a: Source, task_b: Source, reference_split: Source | None, names) -> _Sources:
    """Step 1: the tasks as streams, with the same parameters and at least two samples each."""
    names = names or (None, None)
    a, b = as_stream(task_a, names[0], "A"), as_stream(task_b, names[1], "B")
    external = as_stream(reference_split, None, "reference") if reference_split is not None else None
    streams = [a, b] + ([external] if external is not None else [])
    check_same_parameters(streams)
    for s in streams:
        if s.size is not None and s.size < 2:
            raise DataError(f"task {s.name!r} has {s.size} sample(s); conflict detection needs at least two per task")
    return _Sources(a, b, external)


def _whitening(options: ConflictOptions, fisher, a: Stream, b: Stream) -> tuple[dict | None, float | None, bool]:
    """Step 2: ``((Î + ε)^{-1/2} per path or None, ε or None, whitened)``.

    Raw gradients are whitened unless ``whiten=False``, with ``fisher`` or the ``fisher_pool``
    of the two tasks' own Fishers; pre-grouped (projected) gradients are used as they were
    projected, and asking to whiten unwhitened ones is an error.
    """
    if a.grouping is not None:
        if options.whiten and not a.whitened:
            raise ConfigError("these projected gradients were not whitened; project them with a Fisher to whiten")
        return None, None, a.whitened if options.whiten is None else bool(options.whiten)
    if options.whiten is False:
        return None, None, False
    pool = fisher if fisher is not None else _pooled(options.fisher_pool, a, b)
    eps = damping(pool, eps=options.eps, relative_eps=options.relative_eps)
    return inverse_sqrt(pool, eps, a), eps, True


def _pooled(fisher_pool: str, a: Stream, b: Stream) -> dict[str, np.ndarray]:
    """The tasks' own Fishers pooled as ``fisher_pool`` says (:func:`fisherjax.fisher.pool.pool_fisher`)."""
    used = [s for s, w in zip((a, b), pool_weights(fisher_pool, 1, 1)) if w > 0]  # which sides, whatever the counts
    for stream in used:
        if stream.fisher is None:
            raise ConfigError(f"task {stream.name!r} is a stream without a stored Fisher; pass fisher= to whiten")
    fisher_a = a.fisher() if a in used else None
    fisher_b = b.fisher() if b in used else None
    return pool_fisher(fisher_pool, fisher_a, a.size, fisher_b, b.size)


def _grams(
    a: Stream, b: Stream, external: Stream | None, grouping: Grouping, inv_sqrt, options: ConflictOptions, progress: bool,
    mesh: Mesh | None = None,
) -> tuple[Gram, dict[str, Gram], dict[str, ReferenceStream]]:
    """Step 3: the A × B :class:`~.gram.Gram` (per group when ``by_group``), the reference Grams
    ``{side: Gram}`` (``"a"``: A × A, ``"b"``: B × B, or ``"reference"``: A × split), per group in
    the per-group scope, and the references streamed into their pooled nulls ``{side:
    ReferenceStream}``. Stored tasks are read one parameter slice at a time, with or without a mesh
    (:func:`~.gram.sliced_grams`), and under the pooled null each reference's groups go into its
    :class:`~.group_tests.ReferenceStream` as their slices are read (that Gram keeps no group dot
    products); otherwise each task is prepared (whitened, viewed) once when it fits a chunk — on a
    mesh once per role: split over ``"data"`` as rows, replicated as columns
    (:func:`~.gram.split_sides`)."""
    per_group = options.scope == "groups"
    streams = {"a": a, "b": b} | ({"reference": external} if external is not None else {})
    if external is not None:
        pairs = [("a", "reference")]
    else:
        pairs = [(side, side) for side in ("a", "b") if options.reference in (side, "both")]
    sliced = (("a", "b", options.by_group),) + tuple((x, y, per_group) for x, y in pairs)
    budget = options.memory_budget_bytes
    if options.chunk_size is None and slices_fit(streams, sliced, grouping, budget):
        streamed = {}
        if per_group and options.null == "pooled":
            streamed = {y: ReferenceStream((len(grouping.index), streams[x].size, streams[y].size), y, options) for x, y in pairs}
        sinks = (None,) + tuple(streamed.get(y) for _, y in pairs)
        cross, *grams = sliced_grams(streams, sliced, grouping, inv_sqrt, budget, progress, f"conflicts {a.name} × {b.name}", mesh=mesh,
                                     sinks=sinks)
        _check_sizes(cross, a.name, b.name)
        references = {y: gram for (_, y), gram in zip(pairs, grams)}
        if "reference" in references:
            _check_sizes(references["reference"], a.name, "reference")
        return cross, references, streamed
    size = chunk_size_for(options.chunk_size, *(s for s in (a, b, external) if s is not None), budget_bytes=budget)
    rows, columns, row_counts = split_sides(streams, grouping, inv_sqrt, size, mesh)
    counts = {"a": chunk_count(a, size), "b": chunk_count(b, size), "reference": external and chunk_count(external, size)}
    work = [("a", "b")] + pairs
    total = None if any(row_counts[x] is None or counts[y] is None for x, y in work) else sum(row_counts[x] * counts[y] for x, y in work)
    with progress_bar(progress, total=total, desc=f"conflicts {a.name} × {b.name}", unit="chunk pair") as bar:
        cross = gram_matrix(rows["a"], columns["b"], grouping, options.by_group, bar, mesh=mesh)
        _check_sizes(cross, a.name, b.name)
        references = {}
        for x, y in pairs:
            references[y] = gram_matrix(rows[x], columns[y], grouping, per_group, bar, mesh=mesh)
            if y == "reference":
                _check_sizes(references[y], a.name, "reference")
    return cross, references, {}


def _null_cosines(references: Mapping[str, Gram]) -> dict[str, np.ndarray]:
    """The distinct reference cosines of each side (a square side's upper triangle), for the
    figure and the summary."""
    return {side: _distinct(ref.cosines, side) for side, ref in references.items()}


def _distinct(cosines: np.ndarray, side: str) -> np.ndarray:
    """``cosines [n, r]`` without repeats: a within-task side's upper triangle, all of a split's
    (:func:`~.group_tests.distinct_positions`)."""
    return cosines.ravel()[distinct_positions(*cosines.shape, side != "reference")]


def _pvalues(scores, references: Mapping[str, Gram], options: ConflictOptions):
    """Step 4 (overall scope): p-values ``[n_a, n_b]`` of ``scores`` against each reference
    Gram's cosines, the larger where both sides are used."""
    pvalues = None
    for side, ref in references.items():
        test = scores.T if side == "b" else scores
        p = conflict_pvalues(test, ref.cosines, exclude_self=side != "reference", null=options.null, tail=options.tail)
        p = p.T if side == "b" else p
        pvalues = p if pvalues is None else np.fmax(pvalues, p)  # valid under either null: the larger
    return pvalues


class _Significance(NamedTuple):
    effects: np.ndarray
    pvalues: np.ndarray
    qvalues: np.ndarray
    significant: np.ndarray
    pair_scores: np.ndarray
    group_tests: GroupTests | None


def _significance(cross: Gram, pvalues, options: ConflictOptions) -> _Significance:
    """Step 5 (overall scope): q-values over all tests and the conflicts (``q ≤ alpha`` and
    effect size ``> min_effect_size``)."""
    qvalues = fdr_qvalues(pvalues, options.fdr_method)
    effects = effect_sizes(cross.cosines)
    significant = (qvalues <= options.alpha) & (effects > options.min_effect_size)  # NaN (untested): False
    return _Significance(effects, pvalues, qvalues, significant, cross.cosines, None)


def _group_significance(cross: Gram, tests: GroupTests) -> _Significance:
    """Step 5 (per-group scope, the tests already made: :func:`~.group_tests.group_tests`): a
    pair's p- and q-value are the smallest over its kept groups, it is significant when any
    group is, and its conflict strength is its most negative significant group cosine."""
    significant = tests.per_pair(tests.significant, initial=0.0, reduce=np.maximum) > 0
    strength = tests.per_pair(tests.cosines, tests.significant, initial=np.inf, reduce=np.minimum)
    return _Significance(effect_sizes(cross.cosines), tests.per_pair(tests.pvalues), tests.per_pair(tests.qvalues), significant,
                         strength, tests)


def _report(name_a, name_b, gram: Gram, references: Mapping[str, Gram], streamed: Mapping[str, ReferenceStream], sig: _Significance,
            null_cosines, settings, options) -> ConflictReport:
    """Step 6: hotspots, top pairs, clusters and recommendations, in a :class:`ConflictReport`; the
    hottest group's within-task cosines from its reference Gram, or the sample a streamed
    reference kept of them (:data:`~.group_tests.HOT_NULL_VALUES`)."""
    hotspots = hot_nulls = None
    if options.by_group:
        weight = 1.0 / np.sqrt(np.outer(gram.sq_norms_a, gram.sq_norms_b))
        if sig.group_tests is not None:
            hotspots = np.zeros(len(gram.groups))
            for _, g, i, j in sig.group_tests.blocks(sig.group_tests.significant):
                hotspots -= np.bincount(g, weights=gram.group_dots[g, i, j].astype(np.float64) * weight[i, j].astype(np.float32),
                                        minlength=len(gram.groups))
            if sig.group_tests.n_significant:
                hot = int(np.argmax(hotspots))
                hot_nulls = {side: streamed[side].sample[hot] if side in streamed
                             else _distinct(ref.tested_group_cosines(slice(hot, hot + 1))[0], side) for side, ref in references.items()}
        else:
            hotspots = -np.einsum("gij,ij->g", gram.group_dots, (sig.significant * weight).astype(np.float32), dtype=np.float64)
    cosines = gram.cosines
    top = top_pairs(gram, cosines, sig.effects, sig.pvalues, sig.qvalues, sig.significant, sig.group_tests, options.top_k,
                    options.top_groups)
    found = clusters(gram, cosines, sig.significant, sig.group_tests, options.max_clusters, options.top_groups)
    advice = recommendations(gram, sig.pair_scores, sig.significant, hotspots, options.filter_fraction)
    return ConflictReport(
        name_a, name_b, gram.sample_ids_a, gram.sample_ids_b, cosines, sig.effects, sig.pvalues, sig.qvalues,
        sig.significant, gram, null_cosines, hotspots, top, found, _FrozenMapping(advice), _FrozenMapping(settings),
        sig.group_tests, hot_nulls, options,
    )


def _check_sizes(gram: Gram, name_a: str, name_b: str) -> None:
    for name, ids, norms in ((name_a, gram.sample_ids_a, gram.sq_norms_a), (name_b, gram.sample_ids_b, gram.sq_norms_b)):
        if len(ids) < 2:
            raise DataError(f"task {name!r} has {len(ids)} sample(s); conflict detection needs at least two per task")
        if (norms <= 0).any():
            bad = ids[norms <= 0]
            raise DataError(f"task {name!r}: samples {bad[:5].tolist()} have a zero gradient; their cosine is undefined")


# ---------------------------------------------------------------------------------------------
# Per-head view of a report
# ---------------------------------------------------------------------------------------------


def head_map(report: ConflictReport) -> dict[str, Float[np.ndarray, "layers heads_of_block"]]:
    """Mean net conflict per conflict of each (block, layer, head) group, per attention block:
    ``{block: [layers, heads_of(block)]}`` for the blocks present, in q, k, v, o order — k and v
    have the model's ``kv_heads`` columns under grouped-query attention. Empty without per-group
    scores or attention heads.

    With significant pairs: ``hotspots / n_significant``. Without any, a descriptive stand-in:
    ``−mean contribution_g`` over the ``top_pairs`` (the most opposed pairs, none significant).
    """
    groups = report.groups
    heads = groups.is_head
    if report.hotspots is None or not heads.any():
        return {}
    if report.n_significant:
        values = report.hotspots / report.n_significant
    else:
        i = np.array([p.index_a for p in report.top_pairs], int)
        j = np.array([p.index_b for p in report.top_pairs], int)
        g = report.gram
        values = -(g.group_dots[:, i, j] / np.sqrt(g.sq_norms_a[i] * g.sq_norms_b[j])[None]).mean(1) if len(i) else np.zeros(len(groups))
    n_layers = int(groups.layer[heads].max()) + 1
    out = {}
    for block in ATTENTION_BLOCKS:
        mask = heads & (groups.block == block)
        if not mask.any():
            continue
        block_map = np.full((n_layers, int(groups.head[mask].max()) + 1), np.nan)
        block_map[groups.layer[mask], groups.head[mask]] = values[mask]
        out[block] = block_map
    return out
