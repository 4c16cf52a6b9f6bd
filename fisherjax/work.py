"""The matrix-product work of each phase of ``fisherjax analyze``: FLOPs (2 per multiply-add) from
the model's parameter shapes and the phase's samples and lengths, with each count's formula in its
docstring. These are floors — norms, activations, softmax, ghost norms and host-side work are not
counted — used by ``fisherjax plan`` (:mod:`fisherjax.plan`) to estimate a run and by ``analyze``
to report each phase's achieved rate against them (``results.json["phases"]``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from fisherjax.analysis import qkov
from fisherjax.curvature import compare, lanczos
from fisherjax.layout import ModelLayout


@dataclasses.dataclass(frozen=True)
class ForwardFlops:
    """Matrix-product FLOPs (2 per multiply-add) of one forward pass of a ``seq_len``-token sequence:

        layers      = 2 · T · Σ_k d_in · d_out        (the blocks' dense kernels k, every layer)
        attention   = 4 · T² · heads · head_dim · L   (scores q·k and the mix p·v over every key:
                                                       a causal mask skips no work)
        unembedding = 2 · T · d · vocab

    Norms, activations, softmax and the embedding lookup are elementwise and left out.
    """

    layers: float
    attention: float
    unembedding: float
    total: float = dataclasses.field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "total", self.layers + self.attention + self.unembedding)


def forward_flops(layout: ModelLayout, seq_len: int) -> ForwardFlops:
    """:class:`ForwardFlops` of ``layout``'s model at ``seq_len`` tokens, from its parameter shapes
    (an untied ``lm_head`` or the tied embedding gives ``d · vocab``)."""
    kernels = sum(math.prod(spec.shape) for path, spec in layout.specs.items() if spec.layered and path.endswith("/kernel"))
    head = layout.specs.get("lm_head/kernel") or layout.specs["embed/embedding"]
    attention = 4.0 * seq_len * seq_len * layout.num_heads * layout.head_dim * layout.num_layers
    return ForwardFlops(2.0 * seq_len * kernels, attention, 2.0 * seq_len * math.prod(head.shape))


COLLECT_FORWARDS = 3
"""Forward passes' matrix products a sample costs in Phase 1, at least: the forward, the pullback
to every layer's input, and the per-sample weight-gradient products of the full diagonal (ghost
norms' ``T²`` terms and elementwise work are not counted)."""

PRODUCT_GRADIENTS = 2
"""Batched gradients one Fisher-vector product costs, at most (a jvp and a vjp; issue 20's
bound is 2.5, measured 1.64 on a CPU: RESULTS.md)."""


def collect_flops(forward: ForwardFlops, samples: int, tasks: int) -> float:
    """Phase 1's work: ``COLLECT_FORWARDS · F · n · tasks`` (:data:`COLLECT_FORWARDS`)."""
    return float(COLLECT_FORWARDS * forward.total * samples * tasks)


def heads_flops(forward: ForwardFlops, layout: ModelLayout, tasks: int, samples: int, ablated: int,
                layers: Sequence[int] | None = None) -> float:
    """The ``heads`` phase's work on ``samples`` samples of each task (``--head-samples``): the
    head-mask gradients (a forward and the pullback, ``2F``), the plain pass whose block inputs the
    ablation resumes from (``F``, only when a head is ablated), and ``ablated`` single-head
    settings (``--ablation-heads``, at most every head), each resuming at its head's layer ``l``
    of ``L`` — ``(L − l) / L`` of the blocks — and unembedding:

        tasks · samples · [2F + (F if ablated) + Σ_h ((L − l_h)/L · (layers + attention) + unembedding)]

    ``layers``: each ablated head's layer, where known (``analyze`` reports the phase's work once it
    has chosen them); None counts half the blocks each, the mean for heads spread evenly over the
    layers — heads of the first layers cost up to all of them. The category probes (two batches of
    16 short sequences) are left out."""
    if layers is None:
        ablated = min(ablated, layout.num_layers * layout.num_heads)
        resumed = ablated / 2
    else:
        ablated = len(layers)
        resumed = float(np.sum(layout.num_layers - np.asarray(layers, np.float64))) / layout.num_layers
    settings = resumed * (forward.layers + forward.attention) + ablated * forward.unembedding
    return float(tasks * samples * ((2 + (ablated > 0)) * forward.total + settings))


def masks_flops(forward: ForwardFlops, tasks: int, samples: int, masks: int) -> float:
    """The masks phase's head-pruning experiment: ``tasks · samples · masks · F`` — each task's
    subsample (``--pruning-samples``) under every mask (each task's Fisher mask, the random masks and
    the behavioural categories' masks; the unpruned loss is Phase 1's)."""
    return float(tasks * samples * masks * forward.total)


def curvature_flops(forward: ForwardFlops, samples: int, parameters: int, k: int, probes: int = 4, slices: int = 0,
                    groups: int = 1, factor_passes: int | None = None) -> float:
    """The method comparison's work on ``samples`` samples of a model with ``parameters``
    parameters: the diagonal's Phase 1 pass and K-FAC's factors (a gradient's work each,
    ``3F`` a sample), then the top ``k`` from the Gram route with its gradients whole (one more
    gradient pass, the ``n × n`` Gram ``2n²D``, and each probe's exact product from two reads of
    the gradients, ``4nD``), or formed in ``slices ≥ 1`` column slices of them and not held (a
    gradient pass per slice; then per probe one JVP of the whole probe, ``PRODUCT_GRADIENTS / 2``
    gradients, and in each of K-FAC's ``groups`` a gradient pass per eigenvector and per probe,
    with ``factor_passes`` K-FAC passes in all, default one a group), or from Lanczos (``steps`` Fisher-vector products, and one per
    probe); an exact product is :data:`PRODUCT_GRADIENTS` gradients:

        Gram:          9F·n + 2n²·D + probes · 4n·D
        Gram, sliced:  (3 + 3·slices + 3·factor_passes + 3·groups·(k + probes) + probes · 3 · PRODUCT_GRADIENTS/2)F·n + 2n²·D
        Lanczos:       6F·n + (steps + probes) · 3 · PRODUCT_GRADIENTS · F·n
    """
    gradient = 3 * forward.total * samples
    gram = 2.0 * samples * samples * parameters
    if compare.from_gram(parameters, k, samples) and slices:
        factor_passes = groups if factor_passes is None else factor_passes
        passes = 1 + slices + factor_passes + groups * (k + probes) + probes * PRODUCT_GRADIENTS / 2
        return float(passes * gradient + gram)
    if compare.from_gram(parameters, k, samples):
        return float(3 * gradient + gram + probes * 4.0 * samples * parameters)
    return float(2 * gradient + (lanczos.default_steps(parameters, k) + probes) * PRODUCT_GRADIENTS * gradient)


HELDOUT = 0.5
"""The held-out fraction of task A in Phase 6's permutation test (:func:`fisherjax.pipeline.phase_qkov`)."""


def conflict_pair_flops(n_a: int, n_b: int, features: int, within: Sequence[int]) -> float:
    """One task pair's Phase 5 GEMMs: the A × B Gram and a within-task Gram of each size in
    ``within`` (``(n_a, n_b)`` for ``reference="both"``), each ``2 · n_x · n_y · F`` (``F`` features
    per sample: the kept gradients, whose groups partition them,
    :mod:`fisherjax.analysis.conflicts.gram`):

        2F · (n_a · n_b + Σ_r n_r²)
    """
    return 2.0 * features * (n_a * n_b + sum(n * n for n in within))


def qkov_tested(n: int, needed: int) -> bool:
    """Whether Phase 6 tests a task of ``n`` kept samples: its held-out split
    (:func:`fisherjax.analysis.qkov.heldout_rows` at :data:`HELDOUT`) has both halves, and the fit
    half's Fisher rests on at least ``needed`` samples."""
    held = int(round(HELDOUT * n))
    return 0 < held < n and n - held >= needed


def qkov_pair_flops(n_a: int, n_b: int, layout: ModelLayout, include_bias: bool, min_samples: int) -> float:
    """One ordered pair's Phase 6 GEMMs: the heatmap and the permutation test's two score rows (the
    mean row of A's fit half ``f``, :func:`fisherjax.analysis.qkov.permutation_test`, against B and against
    the held-out half ``h``):

        flops(n_a, n_b) + flops(1, n_b) + flops(1, h)

    with :func:`fisherjax.analysis.qkov.flops`, ``h = round(HELDOUT · n_a)``, ``f = n_a − h``; nothing
    below ``min_samples`` (the test alone when ``f`` is), as ``analyze`` skips them."""
    if n_a < min_samples:
        return 0.0
    held = int(round(HELDOUT * n_a))
    work = qkov.flops(n_a, n_b, layout, include_bias)
    if n_a - held >= min_samples:
        work += qkov.flops(1, n_b, layout, include_bias) + qkov.flops(1, held, layout, include_bias)
    return work


def qkov_pair_reads(n_a: int, n_b: int, min_samples: int, diagonal: bool = True, formed_once: bool = False,
                    partner_reads: Callable[[int, int], int] = lambda n_x, n_y: 1, fit_diagonal: bool | None = None
                    ) -> tuple[float, float]:
    """Samples of A and of B one ordered pair of Phase 6 reads from the kept-gradient storage. A's
    samples are read once for the Fisher of those kept samples — in the heatmap only without Phase
    1's full ``diagonal`` (with it, the heatmap weighs by that diagonal), in the permutation test's
    fit half ``f`` only without Phase 1's record of that half's diagonal (``fit_diagonal``; None:
    as ``diagonal``, which is what ``analyze`` does, collecting the fit half first:
    :func:`fisherjax.pipeline.task_batches`). That Fisher is also the test's mean row
    (:func:`fisherjax.analysis.qkov.permutation_test`) in the variants whose row is the Fisher, the
    default; the signed and symmetric ones read ``f`` for their row: not counted. Then:

    * ``formed_once`` (:func:`fisherjax.analysis.qkov.formed_once`: the pair's two directions
      computed together by :func:`~fisherjax.analysis.qkov.both_ways`, which forms each sample
      once for all six score arrays; this ordered pair counts A's):

          A: n_a + (n_a without the diagonal) + (f without the fit half's)        B: 0

    * else the heatmap (``n_a × n_b``) reads its rows once and its partner ``r(n_a, n_b)`` times
      (``partner_reads``, :func:`fisherjax.analysis.qkov.partner_reads`: once when the partner
      fits one tile, else once per chunk of rows; 1 by default, the least), and the test's two
      score rows (:func:`qkov_pair_flops`: the mean row against B and against the held-out half
      ``h`` of A) read their partners once:

          A: n_a + (n_a without the diagonal) + (f without the fit half's) + h        B: n_b · (r(n_a, n_b) + 1)

    the terms in ``f`` and ``h`` only where the test runs (``f ≥ min_samples``).
    """
    if n_a < min_samples:
        return 0.0, 0.0
    held = int(round(HELDOUT * n_a))
    fit = n_a - held
    tested = fit >= min_samples
    own = (1 if diagonal else 2) * n_a
    fit_read = 0 if (diagonal if fit_diagonal is None else fit_diagonal) else fit
    if formed_once:
        return float(own + (fit_read if tested else 0)), 0.0
    if not tested:
        return float(own), float(n_b * partner_reads(n_a, n_b))
    return float(own + fit_read + held), float(n_b * (partner_reads(n_a, n_b) + 1))


def reform_flops(factored: Iterable[tuple[tuple[int, ...], int]]) -> float:
    """FLOPs of forming one sample's gradients of the kernels kept as token factors, each time a
    phase reads them, from each kernel's ``(shape [*lead, d_in, d_out], T)`` (``T`` its stored
    positions): ``Σ lead · 2 · T · d_in · d_out`` (0 when none is factored)."""
    return float(sum(math.prod(shape[:-2]) * 2 * seq * math.prod(shape[-2:]) for shape, seq in factored))


def batches_flops(layout: ModelLayout, batches: Iterable, per_sample) -> float:
    """``Σ_b rows_b · per_sample(F(T_b))`` over batches as they run (filler rows are computed too):
    ``per_sample`` maps one sample's :class:`ForwardFlops` at the batch's length ``T_b`` to its FLOPs."""
    total = 0.0
    for batch in batches:
        rows, length = np.shape(batch.input_ids)
        total += rows * per_sample(forward_flops(layout, int(length)))
    return total


__all__ = [
    "COLLECT_FORWARDS", "PRODUCT_GRADIENTS", "ForwardFlops", "batches_flops", "collect_flops", "curvature_flops", "forward_flops",
    "heads_flops", "masks_flops",
]
