"""Curvature beyond the diagonal (the empirical Fisher ``F = (1/n) Σ_i g_i g_iᵀ / T_i`` whose
diagonal is Phase 1's ``Î``, the Monte-Carlo true Fisher and the GGN):

* :mod:`.products` — matrix-free ``F v`` on the whole model or restricted to leaves, a layer, an
  attention block or one head (:func:`fisher_operator`, :func:`fisher_vector_product`);
* :mod:`.lanczos` — top-k eigenpairs (:func:`lanczos`), :func:`hutchinson_trace`,
  :func:`spectral_density` (stochastic Lanczos quadrature);
* :mod:`.lowrank` — the exact eigenpairs of the empirical Fisher of few samples from their
  ``n × n`` Gram (:func:`empirical_eigen`);
* :mod:`.factors`, :mod:`.kfac` — K-FAC from the site recordings, its products, exact damped
  inverse and EK-FAC (:func:`kfac_factors`, :func:`decompose`, ...);
* :mod:`.blocks` — the exact spectrum of every attention head's slice from kept gradients
  (:func:`block_spectra`);
* :mod:`.compare` — the four side by side on the same samples (:func:`compare_methods`), and
  :mod:`.groups` — its K-FAC stage by groups of parameters where the per-sample gradients are not
  held.

Phase 7's ``scale_by_kfac`` and the K-FAC EWC penalty live in :mod:`fisherjax.analysis.natural`,
QK-OV's ``variant="kfac"`` in :mod:`fisherjax.analysis.qkov`.
"""

from fisherjax.curvature import blocks, compare, factors, groups, kfac, lanczos, lowrank, products
from fisherjax.curvature.blocks import BlockSpectra, block_spectra, largest_blocks, slice_spectrum
from fisherjax.curvature.compare import MethodComparison, compare_methods
from fisherjax.curvature.factors import KFAC, HeadFactors, KroneckerFactor
from fisherjax.curvature.kfac import (
    attention_factors,
    decompose,
    kfac_factors,
    kfac_inverse_product,
    kfac_vector_product,
    refit_eigenvalues,
)
from fisherjax.curvature.lanczos import Eigen, hutchinson_trace, spectral_density
from fisherjax.curvature.lanczos import lanczos as lanczos_top_k
from fisherjax.curvature.lowrank import empirical_eigen
from fisherjax.curvature.products import (
    FisherOperator,
    Restriction,
    fisher_operator,
    fisher_vector_product,
    restrict_block,
    restrict_head,
    restrict_layer,
    restrict_paths,
    restrict_union,
)

__all__ = [
    "KFAC", "BlockSpectra", "Eigen", "FisherOperator", "HeadFactors", "KroneckerFactor", "MethodComparison", "Restriction",
    "attention_factors", "block_spectra", "blocks", "compare", "compare_methods", "decompose", "empirical_eigen", "factors",
    "fisher_operator", "fisher_vector_product", "groups", "hutchinson_trace", "kfac", "kfac_factors", "kfac_inverse_product", "kfac_vector_product",
    "lanczos", "lanczos_top_k", "largest_blocks", "lowrank", "products", "refit_eigenvalues", "restrict_block", "restrict_head",
    "restrict_layer", "restrict_paths", "restrict_union", "slice_spectrum", "spectral_density",
]
