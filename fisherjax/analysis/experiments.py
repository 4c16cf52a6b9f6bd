"""Experiments that run the model on masked parameters: what Fisher-guided pruning costs a task.

:func:`head_pruning_experiment` compares, per task, the loss after pruning the heads a task's
Fisher ranks lowest with the loss after pruning as many random heads; every mask of a batch is
evaluated in one jitted ``lax.map``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from fisherjax.analysis.masks import apply_mask, keep_matrix, mask_tree, structured_mask
from fisherjax.data import num_active_tokens
from fisherjax.errors import ConfigError, DataError
from fisherjax.fisher.state import TaskFisher
from fisherjax.grads import sample_losses


@functools.partial(jax.jit, static_argnums=(0, 1))
def _masked_loss_sums(model, unit: str, params, head_keeps, input_ids, attention_mask, labels):
    """Token-sum loss of a batch under each of ``head_keeps`` ``[m, L, units]`` (``lax.map``, one mask at a time)."""
    def one(keep):
        masked = apply_mask(params, mask_tree(model.layout, unit, {unit: keep}))
        losses, _ = sample_losses(model, masked, input_ids, attention_mask, labels)
        return losses.sum()

    return jax.lax.map(one, head_keeps)


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
) -> dict:
    """Each task's loss before pruning, after Fisher-guided pruning and after random pruning.

    For every task ``t`` with a Fisher, the mask :func:`structured_mask` ``(fishers[t], s, unit,
    scope)`` prunes ``k`` heads; ``n_random`` random masks prune the same number of heads (the same
    number per layer with ``scope="layer"``), drawn once (``numpy`` generator ``seed``) and shared by
    all tasks. Losses are token means over all of the task's batches,
    ``Σ_i L_i / Σ_i T_i`` (:func:`fisherjax.grads.sample_losses`); every mask of a batch is
    evaluated in one jitted ``lax.map``.

    Args:
      model: a :class:`~fisherjax.models.Model`; params: its parameters.
      task_batches: ``{task: [Batch, ...]}`` evaluation batches (ideally held out from the Fisher's).
      fishers: ``{task: TaskFisher}``; every task here needs batches.
      sparsity: fraction of units to prune; n_random: random masks; seed: their generator seed.
      unit: ``head`` or ``kv_head``; scope: ``global`` or ``layer``; criterion: ``fisher`` or
        ``saliency`` (:func:`structured_mask`).

    Returns:
      JSON-ready dict: ``n_units``, ``n_pruned``, and per task ``loss_before``, ``loss_fisher``,
      ``loss_random_mean``, ``loss_random_sd`` (ddof 1), ``loss_random``, ``fraction_random_worse``
      (random masks that hurt more than the Fisher mask), ``pruned`` ``[[layer, head], ...]``; and
      ``cross[mask_task][eval_task]``, each task's loss under every task's Fisher mask.
    """
    if unit not in ("head", "kv_head"):
        raise ConfigError(f"the head-pruning experiment prunes 'head' or 'kv_head' units, got {unit!r}")
    if n_random < 2:
        raise ConfigError(f"n_random must be at least 2 for a standard deviation, got {n_random}")
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
    keeps = np.concatenate(
        [np.ones((1, *shape), bool), np.stack([fisher_masks[t].keep[unit] for t in names]), random_keep]
    )
    tasks, cross = {}, {t: {} for t in names}
    for task in names:
        sums = np.zeros(len(keeps))
        tokens = 0
        for batch in task_batches[task]:
            sums += np.asarray(
                _masked_loss_sums(model, unit, params, jnp.asarray(keeps), batch.input_ids, batch.attention_mask, batch.labels),
                np.float64,
            )
            tokens += int(num_active_tokens(batch.labels, batch.attention_mask).sum())
        if tokens == 0:
            raise DataError(f"task {task!r} has no predicted tokens in its evaluation batches")
        losses = sums / tokens
        before, by_fisher, by_random = losses[0], losses[1 : 1 + len(names)], losses[1 + len(names) :]
        for mask_task, loss in zip(names, by_fisher, strict=True):
            cross[mask_task][task] = float(loss)
        own = float(by_fisher[names.index(task)])
        tasks[task] = {
            "loss_before": float(before),
            "loss_fisher": own,
            "loss_random_mean": float(by_random.mean()),
            "loss_random_sd": float(by_random.std(ddof=1)),
            "loss_random": by_random.tolist(),
            "fraction_random_worse": float((by_random > own).mean()),
            "pruned": np.argwhere(~fisher_masks[task].keep[unit]).tolist(),
            "n_tokens": tokens,
        }
    return {
        "unit": unit,
        "scope": scope,
        "criterion": criterion,
        "sparsity": float(sparsity),
        "n_random": n_random,
        "seed": seed,
        "n_units": int(np.prod(shape)),
        "n_pruned": fisher_masks[names[0]].n_pruned,
        "tasks": tasks,
        "cross": cross,
    }
