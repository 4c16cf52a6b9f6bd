"""A task pair's Phase 6 both ways from one formation of each task's samples: :func:`both_ways`.

For tasks A and B, ``analyze`` reads six score arrays — the heatmaps A ← B and B ← A, and per
direction the held-out permutation test's mean row of the fit half (:func:`~._prepare.mean_row`)
against the partner and against the held-out half — and :func:`~fisherjax.analysis.qkov.heatmap`
and :func:`~fisherjax.analysis.qkov.heldout_permutation_test` read each task's stored samples once
per array that holds them. Where the samples are kept as token factors
(:class:`~fisherjax.fisher.factored.FactoredGrads`) each read forms their gradients again, and
forming was most of the phase's work. :func:`both_ways` computes the same arrays in one tile loop
(:func:`~._scores.shared_scores`) that forms each sample once; where that pass does
not fit the kernel's memory budget, even a group of heads at a time, or its sums do not fit the
host's memory, it makes those calls one after the other, so the numbers are the same either way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from fisherjax import backend
from fisherjax.analysis.qkov._prepare import prepare, task_samples, with_partner
from fisherjax.analysis.qkov._scores import all_scores, shared_scores
from fisherjax.analysis.qkov._operands import block_kinds
from fisherjax.analysis.qkov._tiles import Request, shared_parts, shared_scores_bytes, tile_limits
from fisherjax.analysis.qkov.interference import heatmap, result_from_scores
from fisherjax.analysis.qkov.options import CURVATURE_VARIANTS, KernelOptions, ScoreOptions, resolve
from fisherjax.analysis.qkov.results import PermutationResult, QKOVResult
from fisherjax.analysis.qkov.stats import check_partners, heldout_permutation_test, heldout_rows, permutation_options, permutation_of_means
from fisherjax.errors import ConfigError
from fisherjax.fisher.state import SampleGrads, TaskFisher
from fisherjax.layout import ModelLayout


class Way(NamedTuple):
    """One direction of :func:`both_ways`: task B's interference on task A."""

    heatmap: QKOVResult
    """:func:`~fisherjax.analysis.qkov.heatmap` ``(A, B)``."""
    test: PermutationResult | None
    """:func:`~fisherjax.analysis.qkov.heldout_permutation_test` ``(A, B)``, where asked for."""
    shared: bool = False
    """Whether it came from the pass that forms each stored sample once for both directions
    (:func:`formed_once`), not from the separate calls."""


def both_ways(
    task_a: TaskFisher | SampleGrads,
    task_b: TaskFisher | SampleGrads,
    layout: ModelLayout,
    *,
    test: Sequence[bool] = (True, True),
    fraction: float = 0.5,
    split_seed: int = 0,
    host_bytes: float | None = None,
    n_permutations: int = 2000,
    alpha: float = 0.05,
    fdr_method: str = "bh",
    seed: int = 0,
    score: ScoreOptions | None = None,
    kernel: KernelOptions | None = None,
    progress: bool = False,
    **overrides,
) -> Iterator[Way]:
    """The heatmap of B on A and of A on B, each with its held-out permutation test where ``test``
    says so (``(A ← B, B ← A)``): the :class:`Way` of A ← B, then that of B ← A.

    The same values as ``heatmap(A, B)``, ``heldout_permutation_test(A, B, fraction=, split_seed=,
    ...)`` and the same with A and B swapped, up to float32 summation order (a p-value can then
    move by ``1 / (n_permutations + 1)`` where the observed statistic lies within that rounding
    of a null value). Every array is
    computed in one pass that forms each stored sample once (:func:`~._scores.shared_scores`)
    when one layer of it, or of a group of heads of each part, fits the kernel's tile budget and
    its sums fit :data:`~._tiles.SHARED_HOST_SHARE` of the host memory available (``host_bytes``;
    None: what the host has available now, :func:`fisherjax.backend.host_available_bytes`): both heatmaps'
    sums, held at once, and the tests' mean rows' (:func:`~._prepare.mean_row`: all a test reads
    of its scores are their column means).
    :func:`formed_once` says which. Otherwise direction by direction, by those calls, holding one
    direction's scores at a time. One device, diagonal variants only (the
    variants :data:`~.options.CURVATURE_VARIANTS` have no permutation test, and a mesh splits
    each array over its devices).
    """
    score, kernel = resolve(score, kernel, overrides)
    if score.variant in CURVATURE_VARIANTS:
        raise ConfigError(f"qkov both_ways reads diagonal variants; use heatmap(..., variant={score.variant!r}, kfac=...)")
    tests = [bool(t) for t in test]
    if any(tests):
        score, kernel = permutation_options(score, kernel, {})
    options = dict(n_permutations=n_permutations, alpha=alpha, fdr_method=fdr_method, seed=seed)
    tasks = (task_a, task_b)
    samples = [task_samples(task, name)[0] for task, name in zip(tasks, "AB")]
    active = [int(np.count_nonzero(np.asarray(s.tokens) > 0)) for s in samples]
    stores = 1 if all(s.derived for s in samples) else 2
    host_bytes = backend.host_available_bytes() if host_bytes is None else host_bytes  # one reading for the choice and the pass
    if not formed_once(*active, layout, test=tests, fraction=fraction, stores_per_task=stores, host_bytes=host_bytes, score=score,
                       kernel=kernel):
        for k in (0, 1):  # direction by direction, each prepared when it runs: one direction's scores at a time
            a, b = tasks[k], tasks[1 - k]
            result = heatmap(a, b, layout, score=score, kernel=kernel, progress=progress)
            found = (heldout_permutation_test(a, b, layout, fraction=fraction, split_seed=split_seed, score=score, kernel=kernel,
                                              progress=progress, **options) if tests[k] else None)
            yield Way(result, found, shared=False)
        return
    requests = []
    for k in (0, 1):
        a, b = tasks[k], tasks[1 - k]
        prep = prepare(a, b, layout, score)
        requests.append(Request(prep, prep.a_positions, prep.b_positions))
        if tests[k]:
            fit, held = heldout_rows(a, fraction, split_seed)
            with_b = prepare(a, b, layout, score, a_rows=fit, mean=True)
            with_held = with_partner(with_b, a, layout, score, default_name=f"{with_b.name_a} (held out)", b_rows=held)
            check_partners(with_b, with_held)
            requests += [Request(p, p.a_positions, p.b_positions) for p in (with_b, with_held)]
    shared = shared_scores(requests, layout, score, kernel, host_bytes=host_bytes, progress=progress,
                           desc=f"QK-OV {requests[0].prep.name_a} ⇄ {requests[0].prep.name_b}")
    arrays = shared if shared is not None else (all_scores(r.prep, layout, score, kernel, progress=progress) for r in requests)

    def means():  # the mean row's scores: the column means m_j = mean_i M_ij (:func:`~._prepare.mean_row`)
        return next(arrays)[:, :, 0].astype(np.float64)

    at = 0
    for k in (0, 1):
        result = result_from_scores(requests[at].prep, next(arrays), layout, score)
        found = permutation_of_means(means(), means(), layout, **options) if tests[k] else None
        at += 3 if tests[k] else 1
        yield Way(result, found, shared=shared is not None)
        del result, found  # the caller's, once it has read them: the next direction is finished without them


def formed_once(
    n_a: int, n_b: int, layout: ModelLayout, *, test: Sequence[bool] = (True, True), fraction: float = 0.5, stores_per_task: int = 1,
    host_bytes: float | None = None, score: ScoreOptions | None = None, kernel: KernelOptions | None = None,
) -> bool:
    """Whether :func:`both_ways` of tasks of ``n_a`` and ``n_b`` samples (with active tokens) forms
    each sample once, i.e. fits one layer of its shared pass — or of one group of heads of each
    part of it — in the tile budget (:meth:`KernelOptions.budget_bytes`;
    :func:`~._tiles.shared_parts`, the rule the pass itself applies): both tasks' samples on the device (``stores_per_task`` stored arrays each:
    one where the contributions derive from the gradients, the empirical Fisher; two where they
    are stored beside them) and each tested fit half's mean row (:func:`~._prepare.mean_row`), a
    weight set per Fisher (each task's, each tested fit half's), and the pass's sums (both
    heatmaps', the mean rows') within
    :data:`~._tiles.SHARED_HOST_SHARE` of ``host_bytes``, the host memory available (None:
    what the host has available now, :func:`fisherjax.backend.host_available_bytes`; where that is not known,
    :data:`~._tiles.SHARED_SCORES_BYTES`)."""
    score, kernel = resolve(score, kernel, {})
    host_bytes = backend.host_available_bytes() if host_bytes is None else host_bytes
    sizes = [(n_a, n_b), (n_b, n_a)]
    for n, partner, tested in zip((n_a, n_b), (n_b, n_a), test):
        if tested:  # the mean row of the fit half against the partner and against the held-out half
            sizes += [(1, partner), (1, int(round(fraction * n)))]
    scores = sum(shared_scores_bytes(x, y, layout) for x, y in sizes)
    tests = sum(bool(t) for t in test)
    return shared_parts(layout, block_kinds(layout, score.include_bias), stores_per_task * (n_a + n_b) + tests, 2 + tests,
                        tile_limits(backend.qkov_contraction(kernel.contraction)).copies, kernel.budget_bytes(), scores,
                        host_bytes) is not None
