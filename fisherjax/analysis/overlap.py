"""Phase 4: mask overlap — do two tasks keep the same parameters?

For the *kept* sets ``A`` and ``B`` of two tasks' masks (:mod:`fisherjax.analysis.masks`) the
Jaccard overlap is ``J = |A ∩ B| / |A ∪ B|``; the shared region is ``A ∩ B``, the A-only region
``A \\ B``, the B-only region ``B \\ A``. Two empty sets are identical, so ``J(∅, ∅) = 1`` (as
``1 − scipy.spatial.distance.jaccard`` of two all-false vectors; the union size is reported beside
it and the figure marks such layers). Overlap is measured over whichever elements the masks decide:

* ``level="unit"`` — heads, kv heads, neurons or channels (``Mask.keep``, ``[L, units]``): the
  decision itself, each unit counted once;
* ``level="parameter"`` — parameters of the params-shaped trees (``Mask.tree``); a head counts
  with its size. Needed for unstructured masks, and for masks of different units.

Per layer the same counts are taken within each layer (``-1`` = parameters outside the layer
stack). :func:`merge_advice` turns ``J`` into advice with the original system's thresholds:
``J > 0.7`` high, ``0.4 ≤ J ≤ 0.7`` moderate, ``J < 0.4`` low.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np

from fisherjax.analysis.masks import Mask
from fisherjax.settings import STATIC
from fisherjax.errors import ConfigError, DataError
from fisherjax.layout import ModelLayout, flatten, layer_name

LEVELS = ("auto", "unit", "parameter")
HIGH, LOW = 0.7, 0.4


def jaccard(a, b) -> float:
    """``|A ∩ B| / |A ∪ B|`` of two boolean arrays of one shape; 1.0 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise DataError(f"masks of shapes {a.shape} and {b.shape} cannot be compared")
    return float(_jaccard_of_counts(int((a & b).sum()), int((a | b).sum())))


def _jaccard_of_counts(shared, union):
    """``shared / union``, 1 where the union is empty (two empty masks agree)."""
    return np.divide(shared, union, out=np.ones(np.shape(union)), where=np.asarray(union) > 0)[()]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MergeAdvice:
    """``level`` is ``high`` / ``moderate`` / ``low``; ``text`` states the advice with its numbers."""

    level: str = dataclasses.field(metadata=STATIC)
    jaccard: float = dataclasses.field(metadata=STATIC)
    text: str = dataclasses.field(metadata=STATIC)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskOverlap:
    """Overlap of two tasks' kept sets, overall and per layer.

    Attributes:
      task_a, task_b: names; level: ``unit`` or ``parameter``; unit: the masks' unit.
      jaccard: ``|A∩B| / |A∪B|``; shared, only_a, only_b, neither, total: element counts.
      layers: ``[n]`` layer ids (``-1`` = outside the layer stack); layer_jaccard, layer_shared,
        layer_only_a, layer_only_b, layer_total: ``[n]`` per layer.
      sparsity: the masks' target sparsity (None when they differ).
      advice: :func:`merge_advice` of this overlap.
    """

    task_a: str = dataclasses.field(metadata=STATIC)
    task_b: str = dataclasses.field(metadata=STATIC)
    level: str = dataclasses.field(metadata=STATIC)
    unit: str = dataclasses.field(metadata=STATIC)
    jaccard: float = dataclasses.field(metadata=STATIC)
    shared: int = dataclasses.field(metadata=STATIC)
    only_a: int = dataclasses.field(metadata=STATIC)
    only_b: int = dataclasses.field(metadata=STATIC)
    neither: int = dataclasses.field(metadata=STATIC)
    total: int = dataclasses.field(metadata=STATIC)
    layers: np.ndarray
    layer_jaccard: np.ndarray
    layer_shared: np.ndarray
    layer_only_a: np.ndarray
    layer_only_b: np.ndarray
    layer_total: np.ndarray
    sparsity: float | None = dataclasses.field(metadata=STATIC)
    advice: MergeAdvice


def _row_counts(keep_a: np.ndarray, keep_b: np.ndarray, row_layers: np.ndarray) -> np.ndarray:
    """``[rows, 5]`` int64: layer id, shared, A-only, B-only and neither counts of each row.

    A mask is cut into rows that each lie in one layer (a layer-stacked leaf: one row per layer),
    so per-layer totals need no per-element layer index.
    """
    a = keep_a.reshape(len(row_layers), -1)
    b = keep_b.reshape(len(row_layers), -1)
    shared = np.count_nonzero(a & b, axis=1)
    in_a, in_b = np.count_nonzero(a, axis=1), np.count_nonzero(b, axis=1)
    neither = a.shape[1] - in_a - in_b + shared
    return np.stack([row_layers, shared, in_a - shared, in_b - shared, neither], axis=1).astype(np.int64)


def _unit_elements(mask: Mask) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (keep [L, units], row layer ids [L])}`` of a structured mask's unit decisions."""
    return {name: (np.asarray(keep, bool), np.arange(np.shape(keep)[0])) for name, keep in mask.keep.items()}


def _parameter_elements(tree, layout: ModelLayout) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{path: (keep, row layer ids)}`` of a params-shaped bool tree: a layer-stacked leaf has one
    row per layer, any other leaf one row in its layer (``-1`` outside the stack)."""
    out = {}
    for path, keep in flatten(tree).items():
        keep = np.asarray(keep, bool)
        out[path] = (keep, layout.layer_rows(path, keep)[1])
    return out


def _tree_of(mask) -> object:
    return mask.tree if isinstance(mask, Mask) else mask


def mask_overlap(
    a: Mask | Mapping,
    b: Mask | Mapping,
    layout: ModelLayout | None = None,
    *,
    level: str = "auto",
    names: tuple[str, str] | None = None,
) -> MaskOverlap:
    """Jaccard overlap, shared / A-only / B-only counts, overall and per layer (module docstring).

    Args:
      a, b: two :class:`~fisherjax.analysis.masks.Mask` values, or params-shaped bool trees.
      layout: the model's layout (needed for ``level="parameter"``: it knows each leaf's layer).
      level: ``unit``, ``parameter`` or ``auto`` (``unit`` when both are structured masks of one
        unit, else ``parameter``).
      names: task names (default: the masks' tasks, or ``A`` / ``B``).

    Raises:
      DataError: the masks cover different units, parameters or shapes.
    """
    if level not in LEVELS:
        raise ConfigError(f"overlap level must be one of {LEVELS}, got {level!r}")
    both_masks = isinstance(a, Mask) and isinstance(b, Mask)
    same_unit = both_masks and a.unit == b.unit and a.unit != "parameter"
    if level == "auto":
        level = "unit" if same_unit else "parameter"
    if level == "unit" and not same_unit:
        raise DataError("unit-level overlap needs two structured masks of the same unit; use level='parameter'")
    if names is None:
        names = (getattr(a, "task", None) or "A", getattr(b, "task", None) or "B")
    if level == "unit":
        elements_a, elements_b = _unit_elements(a), _unit_elements(b)
    else:
        if layout is None:
            raise ConfigError("parameter-level overlap needs the model's layout (each leaf's layer)")
        elements_a, elements_b = _parameter_elements(_tree_of(a), layout), _parameter_elements(_tree_of(b), layout)
    if set(elements_a) != set(elements_b):
        raise DataError(
            f"masks of {names[0]!r} and {names[1]!r} cover different elements: "
            f"only in {names[0]!r} {sorted(set(elements_a) - set(elements_b))}, only in {names[1]!r} {sorted(set(elements_b) - set(elements_a))}"
        )
    bad = [k for k in elements_a if elements_a[k][0].shape != elements_b[k][0].shape]
    if bad:
        raise DataError(f"masks of {names[0]!r} and {names[1]!r} have different shapes for {bad}")
    keys = sorted(elements_a)
    counts = np.concatenate([_row_counts(elements_a[k][0], elements_b[k][0], elements_a[k][1]) for k in keys])
    layers, position = np.unique(counts[:, 0], return_inverse=True)
    layer_shared, layer_only_a, layer_only_b, layer_neither = (
        np.bincount(position, weights=counts[:, c], minlength=len(layers)).astype(np.int64) for c in range(1, 5)
    )
    layer_union = layer_shared + layer_only_a + layer_only_b
    layer_jaccard = _jaccard_of_counts(layer_shared, layer_union)
    shared, only_a, only_b, neither = (int(counts[:, c].sum()) for c in range(1, 5))
    sparsity = a.target_sparsity if both_masks and a.target_sparsity == b.target_sparsity else None
    unit = a.unit if same_unit else "parameter"
    j = float(_jaccard_of_counts(shared, shared + only_a + only_b))
    fields = dict(
        task_a=names[0],
        task_b=names[1],
        level=level,
        unit=unit if level == "unit" else "parameter",
        jaccard=j,
        shared=shared,
        only_a=only_a,
        only_b=only_b,
        neither=neither,
        total=shared + only_a + only_b + neither,
        layers=layers,
        layer_jaccard=layer_jaccard,
        layer_shared=layer_shared,
        layer_only_a=layer_only_a,
        layer_only_b=layer_only_b,
        layer_total=layer_union + layer_neither,
        sparsity=sparsity,
    )
    return MaskOverlap(**fields, advice=merge_advice(fields))


def merge_advice(overlap: MaskOverlap | Mapping) -> MergeAdvice:
    """Advice from the Jaccard overlap of the kept sets: ``> 0.7`` high, ``0.4–0.7`` moderate, ``< 0.4`` low.

    The text names the numbers behind it: J, the shared / A-only / B-only counts, the layers with
    the highest and lowest overlap (only layers where either task keeps something, and only when
    they differ), and the layers where neither keeps anything. When neither task keeps anything at
    all the level is ``"none"``: there is nothing to compare.
    """
    o = overlap if isinstance(overlap, Mapping) else dataclasses.asdict(overlap)
    j, a, b = o["jaccard"], o["task_a"], o["task_b"]
    what = f"{o['unit']}s" if o["level"] == "unit" else "parameters"
    union = o["shared"] + o["only_a"] + o["only_b"]
    if union == 0:
        return MergeAdvice("none", float(j), f"Neither {a} nor {b} keeps any of the {o['total']} {what}: nothing to compare.")
    numbers = (
        f"Jaccard overlap of the kept {what} is {j:.2f} ({o['shared']} shared, {o['only_a']} only {a}, "
        f"{o['only_b']} only {b}, of {union} kept by either and {o['total']} in all)"
    )
    layers, layer_j = np.asarray(o["layers"]), np.asarray(o["layer_jaccard"])
    if "layer_shared" in o:
        kept = (np.asarray(o["layer_shared"]) + np.asarray(o["layer_only_a"]) + np.asarray(o["layer_only_b"])) > 0
    else:
        kept = np.ones(len(layers), bool)
    if kept.sum() > 1 and np.ptp(layer_j[kept]) > 0:
        candidates = np.flatnonzero(kept)
        hi, lo = candidates[np.argmax(layer_j[kept])], candidates[np.argmin(layer_j[kept])]
        numbers += f"; by layer from {layer_j[lo]:.2f} ({layer_name(layers[lo])}) to {layer_j[hi]:.2f} ({layer_name(layers[hi])})"
    if not kept.all():
        numbers += f"; nothing kept by either task in {', '.join(layer_name(x) for x in layers[~kept])}"
    if j > HIGH:
        level = "high"
        advice = (
            f"{a} and {b} rely largely on the same {what}. Fine-tunes for the two tasks would compete for them: "
            "prefer joint training, or a Fisher-weighted merge followed by a check of both tasks; plain averaging is risky."
        )
    elif j >= LOW:
        level = "moderate"
        advice = (
            f"{a} and {b} share part of their important {what}. Merging is possible with care: use Fisher-weighted "
            "merging (each task keeps weight on its own parameters) and watch the layers with the highest overlap."
        )
    else:
        level = "low"
        advice = (
            f"{a} and {b} rely mostly on different {what}. A merge should interfere little; "
            "task-specific updates confined to each task's kept set could be combined."
        )
    return MergeAdvice(level, float(j), f"{numbers}. {advice}")
