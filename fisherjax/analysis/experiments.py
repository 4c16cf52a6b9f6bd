"""Experiments that run the model on masked parameters: what Fisher-guided pruning costs a task.

:func:`head_pruning_experiment` compares, per task, the loss after pruning the heads a task's
Fisher ranks lowest with the loss after pruning as many random heads. It evaluates a fixed
subsample of each task (:func:`choose_subsample`, :func:`gather_rows`), so its cost does not grow
with the task, takes the loss before pruning from Phase 1's per-sample losses when the Fisher has
them, and evaluates several masks per forward pass (:func:`masked_loss_sums`).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import numpy as np
from jaxtyping import PyTree

from fisherjax import backend
from fisherjax.analysis.masks import apply_mask, keep_matrix, mask_tree, structured_mask
from fisherjax.data import IGNORE, Batch, bucket_length, even_rows, num_active_tokens
from fisherjax.errors import ConfigError, DataError
from fisherjax.fisher.options import attention_paths
from fisherjax.fisher.state import TaskFisher
from fisherjax.grads import SCORING_BUDGET_BYTES, forward_scores, scoring_bytes
from fisherjax.layout import flatten
from fisherjax.models.model import model_jit

DEFAULT_SAMPLES = 32
"""Samples per task the head-pruning experiment evaluates by default."""


# ---- the subsample ------------------------------------------------------------------------------


class Rows(NamedTuple):
    """Rows of a task's batches: ``batch[k]`` (index into the batch list), ``row[k]``, and the
    row's ``sample_ids[k]``, ``tokens[k]`` (``T_i``) and ``span[k]`` (positions from its first to
    its last real token)."""

    batch: np.ndarray
    row: np.ndarray
    sample_ids: np.ndarray
    tokens: np.ndarray
    span: np.ndarray

    def take(self, index) -> Rows:
        return Rows(*(x[index] for x in self))


def eligible_rows(task_batches: Sequence[Batch]) -> Rows:
    """Every real row (``sample_id ≥ 0``) with ``T_i ≥ 1`` predicted token, in batch order.

    ``T_i`` is :func:`~fisherjax.data.num_active_tokens` with the attention mask (the labels that
    count); the span is ``last − first + 1`` over the row's ``attention_mask`` ones.
    """
    parts = []
    for index, b in enumerate(task_batches):
        real = np.asarray(b.attention_mask) != 0
        tokens = np.asarray(num_active_tokens(np.asarray(b.labels), np.asarray(b.attention_mask)), np.int64)
        keep = np.flatnonzero((np.asarray(b.sample_ids) >= 0) & (tokens > 0))
        width = real.shape[1]
        first = real.argmax(1)
        last = width - 1 - real[:, ::-1].argmax(1)
        parts.append(Rows(np.full(len(keep), index, np.int64), keep, np.asarray(b.sample_ids, np.int64)[keep], tokens[keep],
                          (last - first + 1)[keep].astype(np.int64)))
    if not parts:
        return Rows(*(np.zeros(0, np.int64) for _ in Rows._fields))
    return Rows(*(np.concatenate(xs) for xs in zip(*parts, strict=True)))


def choose_subsample(rows: Rows, size: int | None, *, seed: int, task: str) -> Rows:
    """``size`` of ``rows`` drawn without replacement, kept in batch order (all of them when there
    are no more than ``size``, or ``size`` is None).

    The draw is ``numpy.random.default_rng([seed, crc32(task)]).choice(n, size)`` over the rows
    taken in the order of their sample ids: the same seed, task name and samples give the same
    subsample, whatever order the batches hold them in (``analyze`` may collect a task's Phase 6
    fit half first), and a task's subsample does not depend on the other tasks.
    """
    n = len(rows.sample_ids)
    if size is None or n <= size:
        return rows
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    by_id = np.argsort(rows.sample_ids, kind="stable")
    return rows.take(np.sort(by_id[rng.choice(n, size, replace=False)]))


def gather_rows(task_batches: Sequence[Batch], rows: Rows, rows_per_batch: int, seq_len: int) -> list[Batch]:
    """The chosen rows as ``⌈k / rows_per_batch⌉`` batches of ``[rows_per_batch, seq_len]``.

    Each row is copied from its batch with its real tokens moved to the front (columns ``first …
    first + seq_len − 1`` of the source, ``seq_len ≥`` its span): positions come from the attention
    mask, so a row's losses and ``T_i`` do not change. The last batch is padded with filler rows
    (``sample_id −1``, no real token, labels ``IGNORE``).
    """
    k = len(rows.sample_ids)
    if np.any(rows.span > seq_len):
        raise ValueError(f"a chosen row spans {int(rows.span.max())} positions, more than the {seq_len} of the gathered batches")
    n = -(-k // rows_per_batch) * rows_per_batch
    ids = np.zeros((n, seq_len), np.int32)
    mask = np.zeros((n, seq_len), np.int32)
    labels = np.full((n, seq_len), IGNORE, np.int32)
    sample_ids = np.full((n,), -1, np.int64)
    sample_ids[:k] = rows.sample_ids
    for index in np.unique(rows.batch):  # a loop over source batches; rows are gathered at once
        at = np.flatnonzero(rows.batch == index)
        source = task_batches[int(index)]
        real = np.asarray(source.attention_mask)[rows.row[at]] != 0
        width = real.shape[1]
        columns = real.argmax(1)[:, None] + np.arange(seq_len)[None, :]
        inside = columns < width
        columns = np.minimum(columns, width - 1)
        for out, array, fill in ((ids, source.input_ids, 0), (mask, source.attention_mask, 0), (labels, source.labels, IGNORE)):
            out[at] = np.where(inside, np.take_along_axis(np.asarray(array)[rows.row[at]], columns, 1), fill)
    return [Batch(ids[s : s + rows_per_batch], mask[s : s + rows_per_batch], labels[s : s + rows_per_batch], sample_ids[s : s + rows_per_batch])
            for s in range(0, n, rows_per_batch)]


def phase1_loss(fisher: TaskFisher, rows: Rows) -> float | None:
    """``Σ_{i∈S} L_i / Σ_{i∈S} T_i`` over the rows' samples ``S`` from Phase 1's per-sample
    ``fisher.losses`` / ``fisher.tokens``; None when the Fisher has no per-sample losses, lacks one
    of the samples, or counts other tokens for one (it was collected on other data)."""
    if fisher.losses is None or fisher.tokens is None or fisher.sample_ids is None or not len(fisher.sample_ids):
        return None
    ids = np.asarray(fisher.sample_ids)
    order = np.argsort(ids, kind="stable")
    at = order[np.minimum(np.searchsorted(ids[order], rows.sample_ids), len(ids) - 1)]
    tokens = np.asarray(fisher.tokens)[at]
    if not (np.array_equal(ids[at], rows.sample_ids) and np.array_equal(tokens, rows.tokens)):
        return None
    return float(np.asarray(fisher.losses, np.float64)[at].sum() / tokens.sum())


# ---- many masks per pass --------------------------------------------------------------------------


def pass_shape(model, params, n_samples: int, n_masks: int, seq: int, budget_bytes: float, batch_rows: int) -> tuple[int, int]:
    """``(rows_per_batch, masks_per_pass)`` for evaluating ``n_masks`` masks on ``n_samples``
    samples of ``seq`` positions within ``budget_bytes``.

    A pass holds ``masks_per_pass × (scoring_bytes(rows_per_batch, seq) + A)`` bytes
    (:func:`~fisherjax.grads.scoring_bytes`), ``A`` the bytes of one masked copy of the attention
    parameters. Rows: as many as fit the budget at one mask per pass, on a CPU at most
    ``batch_rows`` (:func:`fisherjax.backend.rows_per_pass`), the samples then split evenly in as
    few batches (:func:`fisherjax.data.even_rows`); masks: :func:`fisherjax.backend.settings_per_pass` of as
    many as then fit (at least 1, at most ``n_masks``).
    """
    config = model.config
    flat = flatten(params)
    attention = sum(int(np.size(flat[p])) * np.dtype(flat[p].dtype).itemsize for p in attention_paths(model.layout))
    fixed = scoring_bytes(config, 0, seq) + attention
    per_row = scoring_bytes(config, 1, seq) - scoring_bytes(config, 0, seq)
    fit = backend.rows_per_pass(max(1, int((budget_bytes - fixed) // per_row)), batch_rows)
    rows = even_rows(n_samples, fit)
    return rows, backend.settings_per_pass(min(n_masks, budget_bytes // (rows * per_row + fixed)))


@model_jit(static_argnames=("model", "unit", "masks_per_pass"))
def masked_loss_sums(model, params, head_keeps, input_ids, attention_mask, labels, *, unit: str = "head", masks_per_pass: int = 1):
    """``S_m = Σ_i L_i(θ ⊙ M(keep_m))`` for every mask ``m``: token-sum losses of a batch summed
    over its samples, under each head decision ``head_keeps`` ``[m, L, units]`` → ``[m]`` float32.

    ``M`` is :func:`~fisherjax.analysis.masks.mask_tree` and ``L_i`` is
    :func:`~fisherjax.grads.sample_losses`'s loss, computed by :func:`~fisherjax.grads.forward_scores`
    (only the predicted positions unembedded); ``masks_per_pass`` masks are evaluated in one
    ``jax.vmap`` (``lax.map`` with ``batch_size``), so a pass holds that many masked copies of the
    attention parameters and ``masks_per_pass × batch`` rows of activations.
    """
    def one(keep):
        masked = apply_mask(params, mask_tree(model.layout, unit, {unit: keep}))
        return forward_scores(model, masked, input_ids, attention_mask, labels, matches=False)[1].sum()

    return jax.lax.map(one, head_keeps, batch_size=min(masks_per_pass, head_keeps.shape[0]))


# ---- the experiment -------------------------------------------------------------------------------


def head_pruning_experiment(
    model,
    params: PyTree,
    task_batches: Mapping[str, Sequence],
    fishers: Mapping[str, TaskFisher],
    sparsity: float = 0.5,
    n_random: int = 10,
    seed: int = 0,
    *,
    unit: str = "head",
    scope: str = "global",
    criterion: str = "fisher",
    samples: int | None = DEFAULT_SAMPLES,
    memory_budget_bytes: float | None = None,
    extra_masks: Mapping[str, np.ndarray] | None = None,
) -> dict:
    """Each task's loss before pruning, after Fisher-guided pruning and after random pruning, on a
    fixed subsample of the task.

    Masks: for every task ``t`` with a Fisher, :func:`structured_mask` ``(fishers[t], s, unit,
    scope)`` prunes ``k`` heads; ``n_random`` random masks prune the same number of heads (the same
    number per layer with ``scope="layer"``), drawn once (``numpy`` generator ``seed``) and shared
    by all tasks.

    Subsample: among the task's samples with ``T_i ≥ 1`` predicted token, ``samples`` drawn without
    replacement from ``seed`` and the task's name (all of them when the task has fewer;
    :func:`choose_subsample`), gathered from the task's batches into batches of one fixed shape
    (:func:`gather_rows`: ``rows_per_batch`` rows, filler rows added; the length is the bucket
    (:func:`~fisherjax.data.bucket_length`) of the longest chosen sample). The number of forward
    passes and their shapes depend on ``samples`` and the sample lengths, not on the task's size.

    Losses are token means over the subsample ``S``: ``loss(M) = Σ_{i∈S} L_i(θ ⊙ M) / Σ_{i∈S}
    T_i`` (:func:`masked_loss_sums`, ``masks_per_pass`` masks per pass). ``loss_before`` is
    ``Σ_{i∈S} L_i / Σ_{i∈S} T_i`` from Phase 1's per-sample losses (``TaskFisher.losses``), when
    the Fisher holds every sample of ``S`` with the same ``T_i`` (``loss_before_from: "phase 1"``);
    otherwise the unmasked model is evaluated too (``"evaluated"``).

    Args:
      model: a :class:`~fisherjax.models.Model`; params: its parameters.
      task_batches: ``{task: [Batch, ...]}`` evaluation batches (ideally held out from the Fisher's).
      fishers: ``{task: TaskFisher}``; every task here needs batches.
      sparsity: fraction of units to prune; n_random: random masks; seed: their generator seed and
        the subsample's.
      unit: ``head`` or ``kv_head``; scope: ``global`` or ``layer``; criterion: ``fisher`` or
        ``saliency`` (:func:`structured_mask`).
      samples: samples evaluated per task (≥ 1), or None for all of them.
      extra_masks: ``{name: keep [L, units]}`` more head decisions evaluated on the same subsample
        in the same passes — e.g. masks by behavioural category
        (:func:`~fisherjax.analysis.masks.category_mask`'s ``keep``); each task's ``loss_extra``
        maps their names to its loss.
      memory_budget_bytes: device memory a pass may use (:func:`pass_shape`); None:
        :func:`fisherjax.backend.working_budget_bytes` of
        :data:`~fisherjax.grads.SCORING_BUDGET_BYTES`, half the free memory of an accelerator. On a
        CPU a pass takes one mask and at most a batch of ``task_batches``' rows whatever the
        budget, since more bought no time there and took the run's peak memory (RESULTS.md).

    Returns:
      JSON-ready dict: ``n_units``, ``n_pruned``, ``samples``, ``rows_per_batch``,
      ``masks_per_pass``, and per task ``loss_before``, ``loss_before_from``, ``loss_fisher``,
      ``loss_random_mean``, ``loss_random_sd`` (ddof 1), ``loss_random``, ``fraction_random_worse``
      (random masks that hurt more than the Fisher mask), ``pruned`` ``[[layer, head], ...]``,
      ``n_samples`` (samples evaluated), ``n_eligible`` (samples with a predicted token),
      ``sample_ids`` (the subsample), ``n_tokens``, ``loss_extra`` (with ``extra_masks``), and the
      passes' shape: ``length`` (positions of the gathered batches), ``rows_evaluated`` (their rows,
      filler included) and ``masks_evaluated`` (masks run on them, the unpruned model included when
      evaluated); and
      ``cross[mask_task][eval_task]``, each
      task's loss under every task's Fisher mask.
    """
    if unit not in ("head", "kv_head"):
        raise ConfigError(f"the head-pruning experiment prunes 'head' or 'kv_head' units, got {unit!r}")
    if n_random < 2:
        raise ConfigError(f"n_random must be at least 2 for a standard deviation, got {n_random}")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1):
        raise ConfigError(f"the head-pruning experiment's samples per task must be an integer ≥ 1 or None, got {samples!r}")
    missing = [t for t in fishers if t not in task_batches or not len(task_batches[t])]
    if missing:
        raise DataError(f"no evaluation batches for tasks {missing}")
    names = list(fishers)
    fisher_masks = {
        t: structured_mask(fishers[t], model.layout, sparsity, unit=unit, scope=scope, criterion=criterion, params=params) for t in names
    }
    shape = fisher_masks[names[0]].keep[unit].shape
    rng = np.random.default_rng(seed)
    random_keep = keep_matrix(rng.random((n_random, *shape)), sparsity, scope, "random scores")
    extra = dict(extra_masks or {})
    for name, keep in extra.items():
        if np.shape(keep) != shape:
            raise ConfigError(f"extra mask {name!r} has shape {np.shape(keep)}, the {unit} decisions are {shape}")
    pruning = np.concatenate([np.stack([fisher_masks[t].keep[unit] for t in names]), random_keep,
                              np.stack([np.asarray(k, bool) for k in extra.values()]) if extra else np.zeros((0, *shape), bool)])

    eligible, chosen, before, seq = {}, {}, {}, {}
    for task in names:
        eligible[task] = eligible_rows(task_batches[task])
        if not len(eligible[task].sample_ids):
            raise DataError(f"task {task!r} has no predicted tokens in its evaluation batches")
        chosen[task] = choose_subsample(eligible[task], samples, seed=seed, task=task)
        before[task] = phase1_loss(fishers[task], chosen[task])
        widest = max(np.shape(b.input_ids)[1] for b in task_batches[task])
        seq[task] = min(bucket_length(int(chosen[task].span.max())), widest)
    n_masks = len(pruning) + any(b is None for b in before.values())
    budget = backend.working_budget_bytes(SCORING_BUDGET_BYTES) if memory_budget_bytes is None else memory_budget_bytes
    rows_per_batch, masks_per_pass = pass_shape(
        model, params, max(len(c.sample_ids) for c in chosen.values()), n_masks, max(seq.values()), budget,
        max(np.shape(b.input_ids)[0] for t in names for b in task_batches[t]),
    )

    tasks, cross = {}, {t: {} for t in names}
    for task in names:
        keeps = pruning if before[task] is not None else np.concatenate([np.ones((1, *shape), bool), pruning])
        sums = np.zeros(len(keeps))
        for batch in gather_rows(task_batches[task], chosen[task], rows_per_batch, seq[task]):
            sums += np.asarray(
                masked_loss_sums(model, params, keeps, batch.input_ids, batch.attention_mask, batch.labels, unit=unit,
                                 masks_per_pass=masks_per_pass),
                np.float64,
            )
        tokens = int(chosen[task].tokens.sum())
        losses = sums / tokens
        if before[task] is None:
            before[task], losses = float(losses[0]), losses[1:]
            source = "evaluated"
        else:
            source = "phase 1"
        by_fisher, by_random = losses[: len(names)], losses[len(names) : len(names) + n_random]
        by_extra = losses[len(names) + n_random :]
        for mask_task, loss in zip(names, by_fisher, strict=True):
            cross[mask_task][task] = float(loss)
        own = float(by_fisher[names.index(task)])
        tasks[task] = {
            "loss_before": before[task],
            "loss_before_from": source,
            "loss_fisher": own,
            "loss_random_mean": float(by_random.mean()),
            "loss_random_sd": float(by_random.std(ddof=1)),
            "loss_random": by_random.tolist(),
            "fraction_random_worse": float((by_random > own).mean()),
            "pruned": np.argwhere(~fisher_masks[task].keep[unit]).tolist(),
            "n_samples": len(chosen[task].sample_ids),
            "n_eligible": len(eligible[task].sample_ids),
            "sample_ids": chosen[task].sample_ids.tolist(),
            "n_tokens": tokens,
            "length": int(seq[task]),
            "rows_evaluated": -(-len(chosen[task].sample_ids) // rows_per_batch) * rows_per_batch,
            "masks_evaluated": len(keeps),
        }
        if extra:
            tasks[task]["loss_extra"] = {name: float(loss) for name, loss in zip(extra, by_extra, strict=True)}
    return {
        "unit": unit,
        "scope": scope,
        "criterion": criterion,
        "sparsity": float(sparsity),
        "n_random": n_random,
        "seed": seed,
        "samples": None if samples is None else int(samples),
        "rows_per_batch": rows_per_batch,
        "masks_per_pass": masks_per_pass,
        "n_units": int(np.prod(shape)),
        "n_pruned": fisher_masks[names[0]].n_pruned,
        "tasks": tasks,
        "cross": cross,
    }
