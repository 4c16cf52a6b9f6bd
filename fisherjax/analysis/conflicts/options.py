"""The settings of conflict detection: :class:`ConflictOptions`, checked once."""

from __future__ import annotations

import dataclasses
import math

from fisherjax.analysis.conflicts.null import NULLS, TAILS, reference_samples_needed
from fisherjax.fisher.pool import FISHER_POOLS
from fisherjax.settings import Options, check, check_choice

__all__ = ["FDR_METHODS", "ORTHOGONAL_EFFECT", "REFERENCES", "SCOPES", "ConflictOptions"]

ORTHOGONAL_EFFECT = math.sqrt(0.5)
"""Effect size of two orthogonal unit vectors (≈ 0.71); larger effects mean a negative cosine."""

SCOPES = ("overall", "groups")
REFERENCES = ("a", "b", "both")
FDR_METHODS = ("bh", "by")


@dataclasses.dataclass(frozen=True)
class ConflictOptions(Options):
    """How :func:`~fisherjax.analysis.conflicts.detect` tests the sample pairs of two tasks.

    Every value is checked here, once; ``detect(a, b, options=..., **overrides)`` takes an
    instance and/or keyword overrides of these fields.

    Attributes:
      scope: ``"overall"`` tests each pair's cosine; ``"groups"`` each pair's cosine *within every
        parameter group* (head, layer) against the same group's within-task cosines, with FDR
        over all ``G · n_a · n_b`` tests — the way to find a conflict confined to one head, which
        whitening dilutes to a ``~1/G`` share of the overall cosine. Needs ``by_group``.
      reference: whose within-task cosines form the null: ``"a"``, ``"b"`` or ``"both"``
        (the larger of the two p-values: a pair is declared only if it is unusual from both
        sides). An external reference split is passed to ``detect`` as ``reference_split``.
      null: ``"pooled"``, ``"normal"`` or ``"row"``; tail: None (purely empirical pooled null) or
        ``"gpd"`` (far tail from a generalized Pareto fit: single-pair power, weaker
        calibration); see :mod:`~fisherjax.analysis.conflicts.null`.
      whiten: whiten with ``1/sqrt(Î + ε)``; None (default): yes for raw gradients, as projected
        for :class:`~.sources.GroupedGrads`.
      fisher_pool: whose Fisher whitens (:mod:`fisherjax.fisher.pool`): ``"A"``, ``"B"``,
        ``"pooled"`` (default, ``(Î_A + Î_B) / 2``) or ``"pooled_by_count"``
        (``(n_A Î_A + n_B Î_B) / (n_A + n_B)``). An explicit ``fisher=`` to ``detect`` overrides it.
      eps, relative_eps: damping ``ε = max(eps, relative_eps · mean Î)``.
      alpha, fdr_method: FDR level and ``"bh"`` (Benjamini–Hochberg; p-values of pairs that share
        a sample are positively dependent, BH's PRDS condition) or ``"by"`` (Benjamini–Yekutieli,
        any dependence).
      min_effect_size: a (group-)pair is a conflict when its q-value is ``≤ alpha`` and its
        effect size ``‖ĝ_A − ĝ_B‖/2`` exceeds this (default ``1/√2`` ≈ 0.71, what orthogonal
        gradients give: the gradients really point apart).
      top_k, top_groups, max_clusters: sizes of the reported lists (pairs, groups per pair or
        cluster, clusters).
      filter_fraction: a sample that conflicts with at least this fraction of the other task is
        recommended for filtering, one with fewer conflicts for down-weighting.
      chunk_size: samples per chunk; a chunk pair is the most that is on the device at once. None:
        as many as ``memory_budget_bytes`` holds (:func:`~.gram.chunk_size_for`).
      memory_budget_bytes: memory of one chunk pair's prepared features when ``chunk_size`` is None.
      by_group: keep per-group scores (``[G, n_a, n_b]`` floats).
      max_kept_tests: per-group scope: the most tests with ``p ≤ alpha`` kept
        (:class:`~.group_tests.GroupTests`, about ``alpha`` of the ``G · n_a · n_b`` tests for
        tasks that do not conflict, all of them for tasks that conflict everywhere); past it the
        pair is tested on the whole gradient and ``settings["scope_note"]`` says why. None: no bound.
    """

    scope: str = "overall"
    reference: str = "both"
    null: str = "pooled"
    tail: str | None = None
    whiten: bool | None = None
    fisher_pool: str = "pooled"
    eps: float = 1e-8
    relative_eps: float = 1e-3
    alpha: float = 0.05
    fdr_method: str = "bh"
    min_effect_size: float = ORTHOGONAL_EFFECT
    top_k: int = 20
    top_groups: int = 3
    max_clusters: int = 20
    filter_fraction: float = 0.25
    chunk_size: int | None = None
    memory_budget_bytes: float = 4e9
    by_group: bool = True
    max_kept_tests: int | None = None

    def __post_init__(self):
        owner = type(self).__name__
        check_choice(owner, "scope", self.scope, SCOPES)
        check_choice(owner, "reference", self.reference, REFERENCES)
        check_choice(owner, "null", self.null, NULLS)
        check_choice(owner, "tail", self.tail, TAILS)
        check_choice(owner, "whiten", self.whiten, (None, True, False))
        check_choice(owner, "fisher_pool", self.fisher_pool, FISHER_POOLS)
        check_choice(owner, "fdr_method", self.fdr_method, FDR_METHODS)
        check_choice(owner, "by_group", self.by_group, (True, False))
        check(self.eps >= 0 and self.relative_eps >= 0, f"{owner} eps and relative_eps must be >= 0, got {self.eps}, {self.relative_eps}")
        check(0 < self.alpha < 1, f"{owner} alpha must lie in (0, 1), got {self.alpha}")
        check(0 <= self.min_effect_size <= 1, f"{owner} min_effect_size must lie in [0, 1], got {self.min_effect_size}")
        check(0 <= self.filter_fraction <= 1, f"{owner} filter_fraction must lie in [0, 1], got {self.filter_fraction}")
        for name in ("top_k", "top_groups", "max_clusters"):
            check(int(getattr(self, name)) == getattr(self, name) and getattr(self, name) >= 0, f"{owner} {name} must be an integer >= 0, got {getattr(self, name)!r}")
        check(self.chunk_size is None or (int(self.chunk_size) == self.chunk_size and self.chunk_size >= 1),
              f"{owner} chunk_size must be a positive integer or None, got {self.chunk_size!r}")
        check(self.memory_budget_bytes > 0, f"{owner} memory_budget_bytes must be > 0, got {self.memory_budget_bytes}")
        check(self.scope != "groups" or self.by_group, f"{owner} scope='groups' needs by_group=True")
        check(self.max_kept_tests is None or (int(self.max_kept_tests) == self.max_kept_tests and self.max_kept_tests >= 0),
              f"{owner} max_kept_tests must be an integer >= 0 or None, got {self.max_kept_tests!r}")

    def samples_needed(self, side: str) -> int:
        """Samples task ``side`` (``"a"`` or ``"b"``) needs: one more than the null's reference
        samples per row (:func:`~.null.reference_samples_needed`) when its own within-task cosines
        are a reference (``reference``), else 1. An external ``reference_split`` is not counted."""
        check_choice(type(self).__name__, "side", side, ("a", "b"))
        return reference_samples_needed(self.null) + 1 if self.reference in (side, "both") else 1
