"""Statistics of the score: :func:`heldout_split`, :func:`permutation_test` (does A-vs-B
interference on a (block, layer, head) exceed A-vs-A', a held-out split of A?) and
:func:`heldout_permutation_test` (the same on a split read in place), with
Benjamini–Hochberg q-values over all distinct cells, and :func:`bootstrap_layer_head_avg`
(percentile intervals under resampling of both tasks' samples)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fisherjax.analysis.qkov import _scores
from fisherjax.analysis.qkov._prepare import prepare, task_samples, with_partner
from fisherjax.analysis.qkov._scores import all_scores
from fisherjax.analysis.qkov.options import CURVATURE_VARIANTS, KernelOptions, ScoreOptions, resolve
from fisherjax.analysis.qkov.results import BootstrapInterval, PermutationResult, QKOVResult, ShardedScores
from fisherjax.errors import ConfigError, DataError
from fisherjax.fisher.state import SampleGrads, TaskFisher
from fisherjax.layout import ATTENTION_BLOCKS, ModelLayout
from fisherjax.sharding import check_mesh, to_host
from fisherjax.stats import bootstrap_indices, fdr_qvalues, percentile_interval, permutation_pvalue


def heldout_rows(task: TaskFisher | SampleGrads, fraction: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(fit, held)`` of a random split of a task's stored samples, ``held`` holding
    ``fraction`` of them (each sorted): the split of :func:`heldout_split` and
    :func:`heldout_permutation_test` (:func:`heldout_positions` of their sample ids)."""
    samples, name = task_samples(task, "A")
    return heldout_positions(samples.sample_ids, fraction, seed, name)


def heldout_positions(sample_ids: np.ndarray, fraction: float = 0.5, seed: int = 0, name: str = "A") -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(fit, held)`` in ``sample_ids`` of a random split, ``held`` holding
    ``round(fraction · n)`` of the ``n`` samples (each sorted): ``numpy.random.default_rng(seed)``
    permutes the samples taken in the order of their ids, so the split depends on which samples a
    task has, not on the order they are stored in (``analyze`` collects a tested task's fit half
    first, and knows that half before Phase 1 from the ids alone)."""
    ids = np.asarray(sample_ids)
    n = len(ids)
    n_held = int(round(fraction * n))
    if not 0 < n_held < n:
        raise DataError(f"qkov: cannot hold out {fraction:.0%} of the {n} samples of task {name!r}")
    order = np.argsort(ids, kind="stable")[np.random.default_rng(seed).permutation(n)]
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def heldout_split(task: TaskFisher | SampleGrads, fraction: float = 0.5, seed: int = 0) -> tuple[SampleGrads, SampleGrads]:
    """Split a task's samples at random into ``(A, A')`` with ``A'`` holding ``fraction`` of them
    (copies; :func:`heldout_permutation_test` tests the same split without copying)."""
    samples, _ = task_samples(task, "A")
    fit, held = heldout_rows(task, fraction, seed)
    return samples.select(fit), samples.select(held)


def permutation_test(
    task_a: TaskFisher | SampleGrads,
    task_b: TaskFisher | SampleGrads,
    task_a_heldout: TaskFisher | SampleGrads,
    layout: ModelLayout,
    *,
    n_permutations: int = 2000,
    alpha: float = 0.05,
    fdr_method: str = "bh",
    seed: int = 0,
    score: ScoreOptions | None = None,
    kernel: KernelOptions | None = None,
    progress: bool = False,
    mesh: Mesh | None = None,
    **overrides,
) -> PermutationResult:
    """Does task B interfere with task A on a (block, layer, head) more than A's own held-out samples?

    Statistic per cell: ``mean_{i∈A, j∈B} M_ij − mean_{i∈A, j∈A'} M_ij`` with ``Î`` from A
    (``fisher_pool="A"``; ``s_j`` of each partner set from its own samples). Null: the B and A'
    samples are exchangeable as partners of A's samples; the column means ``m_j = mean_i M_ij`` of
    the pooled ``B ∪ A'`` are relabelled at random ``n_permutations`` times (all permutations at
    once, one matrix product), and ``p = (1 + #{null ≥ observed}) / (1 + n_permutations)``
    (:func:`fisherjax.stats.permutation_pvalue`). q-values by :func:`fisherjax.stats.fdr_qvalues`
    (scipy's Benjamini–Hochberg, or BY) over distinct cells (K/V once per kv head).

    ``progress``: a progress bar over the tiles of each of the two score computations.

    The column means are the scores of one row, the mean of A's factor of the product over its
    samples (a score is linear in it: :func:`~._prepare.mean_row`), against B and against A': two
    ``1 × n`` products, the same numbers as the means of the ``n_a × n`` scores up to float32
    rounding, which can move a p-value by ``1 / (n_permutations + 1)`` where the observed statistic
    lies that close to a null value.

    ``mesh``: as for :func:`~fisherjax.analysis.qkov.heatmap` (the mean row split over
    ``"data"``, the partner set broadcast, a ``"model"`` axis replicating the work); the column
    means ``[block, layer, n_b + n_held, head]`` are gathered. The permutations run on the host as
    without a mesh.
    """
    score, kernel = permutation_options(score, kernel, overrides)
    with_b = prepare(task_a, task_b, layout, score, mean=True)
    with_held = with_partner(with_b, task_a_heldout, layout, score, default_name=f"{with_b.name_a} (held out)")
    return _permutation(with_b, with_held, layout, score, kernel, n_permutations=n_permutations, alpha=alpha, fdr_method=fdr_method,
                        seed=seed, progress=progress, mesh=mesh)


def heldout_permutation_test(
    task_a: TaskFisher | SampleGrads,
    task_b: TaskFisher | SampleGrads,
    layout: ModelLayout,
    *,
    fraction: float = 0.5,
    split_seed: int = 0,
    n_permutations: int = 2000,
    alpha: float = 0.05,
    fdr_method: str = "bh",
    seed: int = 0,
    score: ScoreOptions | None = None,
    kernel: KernelOptions | None = None,
    progress: bool = False,
    mesh: Mesh | None = None,
    **overrides,
) -> PermutationResult:
    """:func:`permutation_test` of ``A``'s fit part against ``B`` and ``A``'s held-out part
    ``A'`` (:func:`heldout_rows` with ``fraction``, ``split_seed``), reading both parts in place in
    ``task_a``'s stored gradients: the same numbers as ``permutation_test(*heldout_split(...))``
    without the copy of task A that split makes (all of a spilled task's gradients, in memory)."""
    score, kernel = permutation_options(score, kernel, overrides)
    fit, held = heldout_rows(task_a, fraction, split_seed)
    with_b = prepare(task_a, task_b, layout, score, a_rows=fit, mean=True)
    with_held = with_partner(with_b, task_a, layout, score, default_name=f"{with_b.name_a} (held out)", b_rows=held)
    return _permutation(with_b, with_held, layout, score, kernel, n_permutations=n_permutations, alpha=alpha, fdr_method=fdr_method,
                        seed=seed, progress=progress, mesh=mesh)


def permutation_options(score, kernel, overrides) -> tuple[ScoreOptions, KernelOptions]:
    """The options of a permutation test (:func:`~.options.resolve`), refusing what its null does
    not take: a curvature variant, a Fisher other than A's."""
    score, kernel = resolve(score, kernel, overrides)
    if score.variant in CURVATURE_VARIANTS:
        raise ConfigError(f"qkov permutation_test does not support variant={score.variant!r} yet: its null rests on the diagonal "
                          "Fisher of A; use heatmap(..., variant='kfac', kfac=...) for the scores")
    if score.fisher_pool != "A":
        raise ConfigError("qkov permutation_test compares B with A' against A's own Fisher: use fisher_pool='A'")
    return score, kernel


def _permutation(with_b, with_held, layout, score, kernel, *, n_permutations, alpha, fdr_method, seed, progress, mesh) -> PermutationResult:
    """The test of :func:`permutation_test` on task A's mean row (:func:`~._prepare.mean_row`)
    prepared against B and against A' (Î is A's alone, so a column's scores do not depend on the
    other columns: A's Fisher once, then one score row per partner set)."""
    mesh = check_mesh(mesh)
    check_partners(with_b, with_held)

    def means_over_a(prep):  # [block, layer, n_partner, head] float64: m_j = mean_i M_ij, the mean row's scores
        desc = f"QK-OV {prep.name_b} → {prep.name_a}"
        if mesh is None:
            return all_scores(prep, layout, score, kernel, progress=progress, desc=desc)[:, :, 0].astype(np.float64)
        sums = _scores.column_sums(_scores.sharded_scores(prep, layout, score, kernel, mesh, progress=progress, desc=desc))
        return to_host(sums).astype(np.float64)  # the mean row and zero padding

    return permutation_of_means(means_over_a(with_b), means_over_a(with_held), layout, n_permutations=n_permutations, alpha=alpha,
                         fdr_method=fdr_method, seed=seed)


def check_partners(with_b, with_held) -> None:
    """The permutation test's partner sets, B and A', both have samples."""
    if not len(with_b.b_positions) or not len(with_held.b_positions):
        raise DataError("qkov permutation_test needs samples in both task B and the held-out split A'")


def permutation_of_means(means_b: np.ndarray, means_held: np.ndarray, layout: ModelLayout, *, n_permutations: int, alpha: float,
                         fdr_method: str, seed: int) -> PermutationResult:
    """:func:`permutation_test` from the column means ``m_j = mean_{i∈A} M_ij`` ``[block, layer,
    n_partner, head]`` (float64) of A against B (``means_b``) and against A' (``means_held``)."""
    n_b, n_held = means_b.shape[2], means_held.shape[2]
    column_means = np.concatenate([means_b, means_held], axis=2)  # [block, layer, n_b + n_held, head]
    is_b = np.r_[np.ones(n_b, bool), np.zeros(n_held, bool)]

    def contrast(labels):  # [..., n] bool -> weights giving mean over B minus mean over A'
        return labels / labels.sum(-1, keepdims=True) - ~labels / (~labels).sum(-1, keepdims=True)

    observed = np.einsum("j,kljh->klh", contrast(is_b), column_means)
    shuffled = np.random.default_rng(seed).permuted(np.tile(is_b, (n_permutations, 1)), axis=1)
    null = np.einsum("pj,kljh->pklh", contrast(shuffled), column_means)
    pvalues = permutation_pvalue(observed, null, alternative="greater")
    qvalues = _qvalues_distinct(pvalues, layout, fdr_method)
    return PermutationResult(observed, pvalues, qvalues, qvalues <= alpha, n_permutations, alpha)


def _qvalues_distinct(pvalues: np.ndarray, layout: ModelLayout, method: str) -> np.ndarray:
    """FDR over distinct cells: Q/O per query head, K/V per kv head (their query heads share one test)."""
    kv = np.asarray(layout.kv_head_of)
    first = np.array([np.flatnonzero(kv == g)[0] for g in range(layout.num_kv_heads)])
    parts = [pvalues[n][:, first] if block in ("k", "v") else pvalues[n] for n, block in enumerate(ATTENTION_BLOCKS)]
    sizes = [p.size for p in parts]
    q_flat = fdr_qvalues(np.concatenate([p.ravel() for p in parts]), method=method)
    out, start = [], 0
    for n, block in enumerate(ATTENTION_BLOCKS):
        q = q_flat[start : start + sizes[n]].reshape(parts[n].shape)
        start += sizes[n]
        out.append(q[:, kv] if block in ("k", "v") else q)
    return np.stack(out)


def bootstrap_layer_head_avg(
    result: QKOVResult, *, n_bootstrap: int = 1000, level: float = 0.95, seed: int = 0, chunk: int = 64
) -> BootstrapInterval:
    """Percentile intervals of the mean score per cell under resampling of samples of *both* tasks.

    Replicate ``r`` draws samples of A and of B with replacement (counts ``u_r [n_a]``, ``v_r [n_b]``)
    and takes ``Σ_ij u_ri v_rj M_ij / (n_a n_b)`` — two contractions, no loop over pairs; replicates
    go in chunks of ``chunk`` to bound memory. The sum over B is float32 GEMMs on the scores as they
    lie (``[n_b, heads]`` per block, layer and row of A): a float64 contraction would have numpy
    copy all the scores to float64 for every chunk — twice their size, 34 GB for Llama-7B at
    1000 × 1000 samples. Indices from :func:`fisherjax.stats.bootstrap_indices`, intervals from
    :func:`fisherjax.stats.percentile_interval`.

    Scores left on a mesh (:class:`~.results.ShardedScores`) are contracted on the devices
    (float32; the sum over A's rows across devices), and only the replicates are gathered.
    """
    sharded = isinstance(result.scores, ShardedScores)
    scores = result.scores if sharded else np.asarray(result.scores)
    n_a, n_b = scores.shape[2], scores.shape[3]
    if n_a == 0 or n_b == 0:
        zeros = np.zeros(np.shape(result.layer_head_avg), np.float64)
        return BootstrapInterval(zeros, zeros, level, n_bootstrap)
    u = _counts(bootstrap_indices(n_a, n_bootstrap, seed), n_a) / n_a
    v = _counts(bootstrap_indices(n_b, n_bootstrap, seed + 1), n_b) / n_b
    replicates = np.empty((n_bootstrap,) + np.shape(result.layer_head_avg))
    for r0 in range(0, n_bootstrap, chunk):
        if sharded:
            u_rows = np.zeros((len(u[r0 : r0 + chunk]), scores.padded.shape[2]), np.float32)  # zero weight on the padding
            u_rows[:, :n_a] = u[r0 : r0 + chunk]
            v_rows = jnp.asarray(v[r0 : r0 + chunk], jnp.float32)
            replicates[r0 : r0 + chunk] = to_host(_scores.bootstrap_sums(u_rows, v_rows, scores.padded))
        else:  # B's weights into every (block, layer, row)'s [n_b, heads] in place: one small GEMM each, the scores never copied
            over_b = np.matmul(v[r0 : r0 + chunk].astype(np.float32), scores)  # [block, layer, n_a, r, heads]
            replicates[r0 : r0 + chunk] = np.einsum("ri,klirh->rklh", u[r0 : r0 + chunk], over_b, optimize=True)
    low, high = percentile_interval(replicates, level)
    return BootstrapInterval(low, high, level, n_bootstrap)


def _counts(indices: np.ndarray, n: int) -> np.ndarray:
    """``[replicates, n]`` resampling indices → how often each sample was drawn."""
    rows = np.repeat(np.arange(indices.shape[0]), indices.shape[1])
    return np.bincount(rows * n + indices.ravel(), minlength=indices.shape[0] * n).reshape(indices.shape[0], n).astype(np.float64)
