"""Curvature beyond the diagonal: Fisher-vector products, Lanczos, K-FAC, block spectra and the
method comparison (issue 20). Submodules: ``factors``, ``products``, ``lanczos``, ``kfac``,
``blocks``, ``compare``."""
