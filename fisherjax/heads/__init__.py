"""Behavioural head categories (induction, previous-token, same-token, positional, content, mixed):

* :mod:`.patterns` — scores of attention probabilities against target patterns
  (:func:`pattern_scores`, :func:`positional_scores`), either padding side;
* :mod:`.probes` — seeded probe batches from the model's own vocabulary
  (:func:`random_probe`, :func:`induction_probe`);
* :mod:`.copying` — the copying score of each head's OV circuit, from the weights
  (:func:`copying_scores`);
* :mod:`.categories` — :func:`categorise`: every score, stated :class:`Thresholds`, the labels,
  each query head's kv head, and their JSON form;
* :mod:`.importance` — head-mask importance ``E|∂ℓ/∂ξ_h|`` (:func:`head_mask_importance`) and
  :func:`rank_correlation`;
* :mod:`.ablation` — each task's loss and accuracy with one head's output zeroed
  (:func:`ablate_heads`).
"""

from fisherjax.heads import ablation, categories, copying, importance, patterns, probes
from fisherjax.heads.ablation import HeadAblation, ablate_heads
from fisherjax.heads.categories import (
    CATEGORIES,
    HeadCategories,
    HeadScores,
    Thresholds,
    categorise,
    category_of,
    from_json,
    heads_in,
    label,
    relabel,
    to_json,
)
from fisherjax.heads.copying import copying_scores, copying_tokens
from fisherjax.heads.importance import HeadMaskImportance, head_mask_importance, rank_correlation
from fisherjax.heads.patterns import (
    PatternScores,
    TargetPatterns,
    mean_over_samples,
    pattern_scores,
    positional_sample_scores,
    positional_scores,
    sample_scores,
    target_patterns,
)
from fisherjax.heads.probes import induction_probe, ordinary_tokens, random_probe

__all__ = [
    "CATEGORIES",
    "HeadAblation",
    "HeadMaskImportance",
    "ablate_heads",
    "ablation",
    "head_mask_importance",
    "importance",
    "rank_correlation",
    "HeadCategories",
    "HeadScores",
    "PatternScores",
    "TargetPatterns",
    "Thresholds",
    "categories",
    "categorise",
    "category_of",
    "copying",
    "copying_scores",
    "copying_tokens",
    "from_json",
    "heads_in",
    "induction_probe",
    "label",
    "mean_over_samples",
    "ordinary_tokens",
    "pattern_scores",
    "patterns",
    "positional_sample_scores",
    "positional_scores",
    "probes",
    "random_probe",
    "relabel",
    "sample_scores",
    "target_patterns",
    "to_json",
]
