"""Whose diagonal Fisher a two-task phase uses: ``fisher_pool``.

Phases 5 (conflicts, whitening ``g / sqrt(Î + ε)``) and 6 (QK-OV, ``C / (Î + λ)``) compare the
samples of a task A with those of a task B against one diagonal Fisher ``Î``. One option names
it, with one meaning in both phases:

====================  ===================================================================
``fisher_pool``       ``Î``
====================  ===================================================================
``"A"``               task A's, ``Î_A = mean_{i∈A} C_i``
``"B"``               task B's
``"pooled"``          ``(Î_A + Î_B) / 2``, the two tasks weighted equally (the original
                      system's definition: repeating B's samples does not change it)
``"pooled_by_count"`` ``(n_A Î_A + n_B Î_B) / (n_A + n_B)``, the Fisher of both tasks'
                      samples together
====================  ===================================================================

The phases differ only in their default (QK-OV: ``"A"``, as the original system; conflicts:
``"pooled"``, symmetric in the two tasks).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

FISHER_POOLS = ("A", "B", "pooled", "pooled_by_count")


def pool_weights(pool: str, n_a: int, n_b: int) -> tuple[float, float]:
    """``(w_A, w_B)`` with ``Î = w_A Î_A + w_B Î_B`` for a ``fisher_pool`` choice."""
    if pool not in FISHER_POOLS:
        raise ValueError(f"fisher_pool must be one of {FISHER_POOLS}, got {pool!r}")
    if pool == "A":
        return 1.0, 0.0
    if pool == "B":
        return 0.0, 1.0
    if pool == "pooled":
        return 0.5, 0.5
    return n_a / (n_a + n_b), n_b / (n_a + n_b)


def pool_fisher(
    pool: str, fisher_a: Mapping[str, np.ndarray] | None, n_a: int, fisher_b: Mapping[str, np.ndarray] | None, n_b: int
) -> dict[str, np.ndarray]:
    """``Î`` of :func:`pool_weights` per parameter, summed in float64 and returned in float32.

    A side whose weight is 0 is not read (it may be None).
    """
    w_a, w_b = pool_weights(pool, n_a, n_b)
    sides = [(w, f) for w, f in ((w_a, fisher_a), (w_b, fisher_b)) if w > 0]
    paths = list(sides[0][1])
    return {p: sum(w * np.asarray(f[p], np.float64) for w, f in sides).astype(np.float32) for p in paths}
