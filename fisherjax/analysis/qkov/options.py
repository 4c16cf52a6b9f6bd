"""The settings of a QK-OV heatmap: :class:`ScoreOptions` (the maths) and :class:`KernelOptions`
(how it is computed), each checked once, in ``__post_init__``.

Entry points take ``score=ScoreOptions | None, kernel=KernelOptions | None, **overrides``; each
keyword override goes to the class that has the field (:func:`resolve`), so
``heatmap(a, b, layout, variant="signed", contraction="looped")`` needs neither object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from fisherjax import backend
from fisherjax.analysis.qkov._operands import PRECISIONS
from fisherjax.fisher.pool import FISHER_POOLS
from fisherjax.settings import Options, check, check_choice, split_overrides, with_overrides

VARIANTS = ("unsigned", "signed", "symmetric", "natural")
"""The variants computed from the two tasks alone (their gradients and diagonal Fisher ``Î``)."""
CURVATURE_VARIANTS = ("kfac",)
"""The variants whose curvature is passed in (``heatmap(..., kfac=...)``) instead of taken from
the tasks' diagonal Fisher; ``ScoreOptions.variant`` is one of ``VARIANTS + CURVATURE_VARIANTS``."""
SIGNED_VARIANTS = ("signed", "kfac")
"""The variants whose scores have a sign (negative: the tasks pull a head's parameters in opposite
directions); their strongest entries are the most negative ones."""
AGGREGATES = ("mean", "sum")
NORMALIZE_GJ = ("none", "per_token_mean", "per_token_sum")
CONTRACTIONS = ("auto", "batched", "looped", "pallas")


@dataclasses.dataclass(frozen=True)
class ScoreOptions(Options):
    """What the score is (the package docstring gives each formula).

    Attributes:
      eps: ``ε > 0``, the floor of the ridge (``Î_k + λ ≥ ε``) and the threshold below which a
        Fisher entry counts as numerically dead in the diagnostics.
      ridge_lambda: absolute ridge floor ``λ_min``.
      ridge_lambda_rel: relative ridge, times the slice's median Fisher:
        ``λ = max(λ_min, λ_rel · median(Î_slice), ε)`` (``"kfac"``: times the mean of the K-FAC
        block's diagonal, ``mean(diag A) · mean(diag G)``).
      aggregate: ``"mean"`` (divide by the slice size) or ``"sum"``.
      normalize_gj: the factor ``s_j`` of task B's sample ``j``: ``"none"`` (1: ``g_j`` as stored,
        token sums), ``"per_token_mean"`` (``1/T_j``) or ``"per_token_sum"`` (``1/Σ_{j'∈B} T_{j'}``).
      fisher_pool: whose Fisher ``Î`` is (:mod:`fisherjax.fisher.pool`): ``"A"``, ``"B"``,
        ``"pooled"`` (``(Î_A + Î_B)/2``) or ``"pooled_by_count"``; ``"A"`` for ``"kfac"``,
        whose curvature is the factors passed as ``kfac=``.
      variant: ``"unsigned"``, ``"signed"``, ``"symmetric"``, ``"natural"`` or ``"kfac"`` (task A's
        damped K-FAC block ``(A ⊗ G + λI)⁻¹`` between the signed gradients, passed as ``kfac=``;
        :mod:`~fisherjax.analysis.qkov.kronecker`).
      include_bias: q/k/v biases belong to their head's slice.
      min_fisher_samples: fewest samples a Fisher may rest on.
    """

    eps: float = 1e-10
    ridge_lambda: float = 1e-8
    ridge_lambda_rel: float = 1e-6
    aggregate: str = "mean"
    normalize_gj: str = "none"
    fisher_pool: str = "A"
    variant: str = "unsigned"
    include_bias: bool = True
    min_fisher_samples: int = 8

    def __post_init__(self):
        for name, allowed in (
            ("aggregate", AGGREGATES),
            ("normalize_gj", NORMALIZE_GJ),
            ("fisher_pool", FISHER_POOLS),
            ("variant", VARIANTS + CURVATURE_VARIANTS),
        ):
            check_choice("qkov", name, getattr(self, name), allowed)
        check(self.eps > 0, f"qkov eps must be > 0 (it keeps the denominator Î + λ positive), got {self.eps}")
        check(self.ridge_lambda >= 0 and self.ridge_lambda_rel >= 0,
              f"qkov ridges must be ≥ 0, got ridge_lambda={self.ridge_lambda}, ridge_lambda_rel={self.ridge_lambda_rel}")
        check(self.min_fisher_samples >= 1, f"qkov min_fisher_samples must be ≥ 1, got {self.min_fisher_samples}")



CPU_BUDGET_BYTES = 2e9
"""A tile's memory on a CPU when the options give none (:meth:`KernelOptions.budget_bytes`)."""


@dataclasses.dataclass(frozen=True)
class KernelOptions(Options):
    """How the score is computed; these change the scores only by rounding.

    Attributes:
      precision: GEMM precision, ``"highest"`` (true float32), ``"high"`` or ``"default"`` (a GPU
        may use TF32).
      split_k: the batched and Pallas kernels cut each slice's contraction into up to this many
        pieces that run as independent GEMMs, so that ``layer · heads`` small GEMMs fill a GPU.
      contraction: how each slice's contraction is evaluated: ``"batched"`` (whole head-major
        operands, one batched split-K GEMM), ``"looped"`` (the contraction walked in cache-sized
        pieces, each weighted and multiplied in one loop step, stored leaves read in place: what a
        CPU needs), ``"pallas"`` (each head's strided slice read inside the GEMM, one pass over the
        inputs; a Triton kernel, interpreted off a GPU), or ``"auto"``
        (:func:`fisherjax.backend.qkov_contraction`).
      piece_floats: floats per side of one piece of the looped contraction.
      workers: concurrent computations of the looped contraction (its tiles' layer ranges, or each
        block's where a tile has fewer layers); ``None``: :func:`fisherjax.backend.available_cores`.
      memory_budget_bytes: bound on the arrays one tile puts on the device
        (:func:`~fisherjax.analysis.qkov.tile_plan`); ``None``: :data:`CPU_BUDGET_BYTES` on a CPU,
        half the free memory of an accelerator (:func:`fisherjax.backend.working_budget_bytes`).
    """

    precision: str = "highest"
    split_k: int = 32
    contraction: str = "auto"
    piece_floats: int = 2**19
    workers: int | None = None
    memory_budget_bytes: float | None = None

    def __post_init__(self):
        check_choice("qkov", "precision", self.precision, tuple(PRECISIONS))
        check_choice("qkov", "contraction", self.contraction, CONTRACTIONS)
        check(self.split_k >= 1 and self.piece_floats >= 1,
              f"qkov split_k and piece_floats must be ≥ 1, got {self.split_k} and {self.piece_floats}")
        check(self.workers is None or self.workers >= 1,
              f"qkov workers must be ≥ 1 or None (the cores available), got {self.workers}")
        check(self.memory_budget_bytes is None or self.memory_budget_bytes > 0,
              f"qkov memory_budget_bytes must be > 0 (or None: by the backend), got {self.memory_budget_bytes}")

    def budget_bytes(self) -> float:
        """:attr:`memory_budget_bytes`, or where it is None the backend's
        (:func:`fisherjax.backend.working_budget_bytes` of :data:`CPU_BUDGET_BYTES`)."""
        return backend.working_budget_bytes(CPU_BUDGET_BYTES) if self.memory_budget_bytes is None else float(self.memory_budget_bytes)



def resolve(score: ScoreOptions | None, kernel: KernelOptions | None, overrides: Mapping) -> tuple[ScoreOptions, KernelOptions]:
    """``(score, kernel)`` (defaults where None) with each keyword override applied to the class
    that has the field; a name neither has is a :class:`~fisherjax.errors.ConfigError`."""
    score_changes, kernel_changes = split_overrides(overrides, ScoreOptions, KernelOptions)
    return with_overrides(score or ScoreOptions(), score_changes), with_overrides(kernel or KernelOptions(), kernel_changes)
