"""Behavioural categories of attention heads: every score, the thresholds, and the labels.

:func:`categorise` runs the model on two probes (:mod:`fisherjax.heads.probes`) and keeps, per
(layer, query head), the scores of :mod:`fisherjax.heads.patterns` and
:mod:`fisherjax.heads.copying` in :class:`HeadScores`. Which probe gives which score:

* random contents (:func:`~fisherjax.heads.probes.random_probe`, or the user's ``batches``):
  previous_token, current_token, first_position, positional;
* random tokens repeated once (:func:`~fisherjax.heads.probes.induction_probe`, or the user's
  ``induction_batches``): duplicate and induction — the second copy is where a token has an
  earlier occurrence, so these scores have rows to measure;
* the weights: copying.

:func:`label` turns scores into one of :data:`CATEGORIES` with stated :class:`Thresholds`: the
specific behaviours are induction (induction score), previous_token (previous-token score) and
same_token (duplicate score); a head above exactly one threshold gets that label, above two or
more "mixed"; a head above none is "positional" when its positional score reaches the threshold
(its pattern does not follow content), else "content".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fisherjax.errors import ConfigError
from fisherjax.heads.copying import copying_scores
from fisherjax.heads.patterns import mean_over_samples, positional_sample_scores, sample_scores
from fisherjax.heads.probes import bos_token, induction_probe, random_probe
from fisherjax.models import check_token_ids
from fisherjax.models.model import model_jit

CATEGORIES = ("induction", "previous_token", "same_token", "positional", "content", "mixed")

SPECIFIC = {"induction": "induction", "previous_token": "previous_token", "same_token": "duplicate"}
"""The specific categories and the score (a :class:`HeadScores` field) that decides each."""


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Score thresholds (a score ≥ its threshold counts), on the ``"targets"`` normalisation.

    * induction, previous_token, duplicate = 0.4: at least 40% of a row's attention on the target
      position(s), averaged over the rows that have one — the cut ARENA's TransformerLens
      exercises use for their attention-pattern detectors (e.g. mean attention to the current
      token > 0.4). Two patterns with disjoint targets can both pass only for a head that splits
      its mass about evenly between them ("mixed"), while uniform attention scores a few percent
      on the default 65-token probes.
    * positional = 0.9: a head whose rows move, on average, by at most 10% of their mass (total
      variation) when the content at fixed positions changes is position-determined.
    * copying = None: the copying score is reported, not used for labels. Set a value to require
      ``copying ≥ copying`` as an AND-condition for the induction label (Olsson et al.'s
      induction heads both match prefixes and copy); the weight-only score ignores what MLPs and
      other heads do with the output, so it is not a default requirement.
    """

    induction: float = 0.4
    previous_token: float = 0.4
    duplicate: float = 0.4
    positional: float = 0.9
    copying: float | None = None


class HeadScores(NamedTuple):
    """Every score, each a float array ``[layer, head]`` (NaN where no probe sample had a row).

    previous_token, duplicate, current_token (attention to itself), induction, first_position:
    :mod:`~fisherjax.heads.patterns` with ``normalize="targets"``; positional: 1 − mean total
    variation across contents; copying: :mod:`~fisherjax.heads.copying`;
    previous_token_tl, duplicate_tl, induction_tl: the same patterns with ``normalize="all"``,
    TransformerLens' ``detect_head`` ("mul") values, for comparison with published numbers.
    """

    previous_token: np.ndarray
    duplicate: np.ndarray
    current_token: np.ndarray
    induction: np.ndarray
    first_position: np.ndarray
    positional: np.ndarray
    copying: np.ndarray
    previous_token_tl: np.ndarray
    duplicate_tl: np.ndarray
    induction_tl: np.ndarray


class HeadCategories(NamedTuple):
    """Scores, labels ``[layer, head]`` (str, one of :data:`CATEGORIES`), the thresholds that gave
    them, the kv head each query head reads (``[head]``, ``layout.kv_head_of``) and ``n_probe``,
    the number of probe samples (both probes together) the scores were measured on."""

    scores: HeadScores
    labels: np.ndarray
    thresholds: Thresholds
    kv_head: np.ndarray
    n_probe: int


def label(scores: HeadScores, thresholds: Thresholds = Thresholds()) -> np.ndarray:
    """Category ``[layer, head]`` of every head (see the module docstring). NaN passes no threshold."""
    t = thresholds
    values = {name: np.asarray(getattr(scores, field), np.float64) for name, field in SPECIFIC.items()}
    above = {name: values[name] >= getattr(t, field) for name, field in SPECIFIC.items()}
    if t.copying is not None:
        above["induction"] = above["induction"] & (np.asarray(scores.copying, np.float64) >= t.copying)
    count = sum(a.astype(int) for a in above.values())
    fallback = np.where(np.asarray(scores.positional, np.float64) >= t.positional, "positional", "content")
    out = fallback.astype(f"<U{max(map(len, CATEGORIES))}")
    for name, a in above.items():
        out = np.where(a, name, out)
    return np.where(count >= 2, "mixed", out)


def relabel(cats: HeadCategories, thresholds: Thresholds) -> HeadCategories:
    """The same scores labelled with other thresholds."""
    return cats._replace(labels=label(cats.scores, thresholds), thresholds=thresholds)


def category_of(cats: HeadCategories, layer: int, head: int) -> str:
    """The label of one (layer, query head)."""
    return str(cats.labels[layer, head])


def heads_in(cats: HeadCategories, category: str) -> np.ndarray:
    """``bool [layer, head]``: the heads labelled ``category``."""
    if category not in CATEGORIES:
        raise ConfigError(f"unknown head category {category!r} (known: {', '.join(CATEGORIES)})")
    return cats.labels == category


def to_json(cats: HeadCategories) -> dict:
    """A JSON-ready dict: every score as nested lists (NaN → null), labels, thresholds, kv heads."""
    scores = {name: _nested(value) for name, value in cats.scores._asdict().items()}
    return {
        "categories": list(CATEGORIES),
        "scores": scores,
        "labels": np.asarray(cats.labels).tolist(),
        "thresholds": dataclasses.asdict(cats.thresholds),
        "kv_head": [int(k) for k in cats.kv_head],
        "n_probe": int(cats.n_probe),
    }


def from_json(data: dict) -> HeadCategories:
    """Inverse of :func:`to_json`."""
    scores = HeadScores(**{f: np.array(data["scores"][f], dtype=np.float64) for f in HeadScores._fields})
    return HeadCategories(
        scores=scores,
        labels=np.array(data["labels"], dtype=str),
        thresholds=Thresholds(**data["thresholds"]),
        kv_head=np.array(data["kv_head"], dtype=np.int64),
        n_probe=int(data["n_probe"]),
    )


def categorise(
    model,
    params=None,
    *,
    batches=None,
    induction_batches=None,
    thresholds: Thresholds = Thresholds(),
    n_probe: int = 16,
    length: int = 32,
    n_tokens: int = 256,
    seed: int = 0,
    tokens=None,
) -> HeadCategories:
    """Score and label every (layer, query head) of ``model``.

    Args:
      model, params: the model (``params`` default to ``model.params``).
      batches: a :class:`~fisherjax.data.Batch` or a sequence of them (anything with
        ``input_ids`` and ``attention_mask``) to use instead of the random probe — previous-token,
        current-token, first-position and positional scores; positional compares samples within
        each batch, position by position.
      induction_batches: the same, instead of the repeated-sequence probe — duplicate and
        induction scores.
      thresholds: :class:`Thresholds` for the labels.
      n_probe, length: ``n_probe`` sequences per probe: ``length`` tokens repeated once, and
        ``2·length`` random tokens (plus BOS), shortened to the model's positions.
      n_tokens: probe tokens of the copying score.
      seed: seeds both probes and the copying tokens.
      tokens: the token ids the default probes draw from (:func:`~fisherjax.heads.probes.probe_tokens`;
        default every ordinary token). A toy model trained on a narrow alphabet — the shipped demo
        copies lowercase letters — is probed on its own alphabet, where its mechanisms run.
    """
    params = model.params if params is None else params
    repeated = _as_batches(induction_batches) or [induction_probe(model, n=n_probe, length=length, seed=seed, tokens=tokens)]
    # Both default probes get one width (2·length + BOS, or what fits), so they share one compilation.
    width = repeated[0].input_ids.shape[1] - (bos_token(model) is not None) if induction_batches is None else 2 * length
    plain = _as_batches(batches) or [random_probe(model, n=n_probe, length=width, seed=seed, tokens=tokens)]
    on_plain = _per_sample(model, params, plain)
    on_repeated = _per_sample(model, params, repeated)
    targets, tl, content = (mean_over_samples(s) for s in on_plain)
    rep_targets, rep_tl, _ = (mean_over_samples(s) for s in on_repeated)
    scores = HeadScores(
        previous_token=targets.previous_token,
        duplicate=rep_targets.duplicate,
        current_token=targets.current_token,
        induction=rep_targets.induction,
        first_position=targets.first_position,
        positional=1.0 - content,
        copying=copying_scores(model, params, n_tokens=n_tokens, seed=seed),
        previous_token_tl=tl.previous_token,
        duplicate_tl=rep_tl.duplicate,
        induction_tl=rep_tl.induction,
    )
    scores = HeadScores(*(np.asarray(s, np.float64) for s in scores))
    n = sum(int(np.asarray(b.attention_mask).any(-1).sum()) for b in (*plain, *repeated))
    return HeadCategories(scores, label(scores, thresholds), thresholds, np.asarray(model.layout.kv_head_of), n)


def _as_batches(batches) -> list:
    if batches is None:
        return []
    if hasattr(batches, "input_ids"):
        return [batches]
    out = list(batches) if isinstance(batches, Iterable) else None
    if not out or not all(hasattr(b, "input_ids") and hasattr(b, "attention_mask") for b in out):
        raise ConfigError("head probe batches must be a Batch or a non-empty sequence of Batches")
    return out


def _per_sample(model, params, batches):
    """Per-sample ("targets" scores, "all" scores, content dependence), batches concatenated."""
    parts = []
    for batch in batches:
        ids, mask = np.asarray(batch.input_ids), np.asarray(batch.attention_mask)
        check_token_ids(ids, model.config.vocab_size)
        parts.append(_batch_scores(model, params, ids, mask))
    return jax.tree.map(lambda *x: jnp.concatenate(x, axis=0), *parts)


@model_jit(static_argnums=0)
def _batch_scores(model, params, input_ids, attention_mask):
    attentions = model.forward(params, input_ids, attention_mask, return_attention=True, unembed=False).attentions
    return (
        sample_scores(attentions, input_ids, attention_mask, normalize="targets"),
        sample_scores(attentions, input_ids, attention_mask, normalize="all"),
        positional_sample_scores(attentions, attention_mask),
    )


def _nested(value) -> list:
    return [[None if math.isnan(v) else float(v) for v in row] for row in np.asarray(value, np.float64)]
