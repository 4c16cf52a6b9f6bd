"""Phase 1 driver: batches of a task → :class:`~fisherjax.fisher.state.TaskFisher`.

The Python loop walks batches only: each (micro-)batch goes through the jitted step of
:mod:`fisherjax.fisher.step`, which updates the accumulation state (Welford or EMA, pure data)
on the device; its per-sample outputs are copied to the host while the next batch runs and
recorded in a :class:`~fisherjax.fisher.progress.CollectionLog`. With ``checkpoint_dir`` the state
and the log are saved with orbax every ``checkpoint_every`` batches, and ``resume=True``
continues from the last save with bitwise-identical results on CPU.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import numpy as np

from fisherjax.backend import host_empty, start_host_copy
from fisherjax.data import Batch, micro_batch_rows, micro_batches, num_active_tokens
from fisherjax.errors import CheckpointError, ConfigError, DataError, FisherjaxError, NumericalError
from fisherjax.fisher.accumulate import EMAState, WelfordState, ema_value, welford_interval, welford_variance
from fisherjax.fisher.groups import group_sizes
from fisherjax.fisher.options import STORAGE_DTYPES, CollectOptions
from fisherjax.settings import with_overrides
from fisherjax.fisher.progress import (
    CollectionLog,
    DataDigest,
    Fingerprint,
    Spill,
    joined_shape,
    progress_manager,
    put_rows,
    restore_progress,
    save_progress,
)
from fisherjax.fisher.factored import FactoredGrads
from fisherjax.fisher.state import PartialDiagonal, SampleGrads, TaskFisher
from fisherjax.fisher.step import StepPlan, compiled_step, initial_state, kept_values, make_plan, micro_batch, state_shardings
from fisherjax.models.model import check_token_ids
from fisherjax.progressbar import progress_bar
from fisherjax.sharding import check_mesh, data_size, local_rows, place, place_params, process_sum, put_replicated, shard_rows


def collect(
    model,
    batches: Iterable[Batch],
    *,
    task: str,
    options: CollectOptions | None = None,
    params=None,
    key: jax.Array | None = None,
    spill_dir: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    total: int | None = None,
    mesh=None,
    prefix_batches: int | None = None,
    prefix_paths: Sequence[str] | None = None,
    **overrides,
) -> TaskFisher:
    """Collect the diagonal Fisher of one task, reduced to groups.

    Args:
      model: a :class:`~fisherjax.models.Model`; ``params`` default to ``model.params``.
      batches: :class:`~fisherjax.data.Batch` values (e.g. ``fisherjax.data.batches(task, 8)``).
      task: the task's name (first part of every ``group_fisher.npz`` key).
      options: a :class:`~fisherjax.fisher.options.CollectOptions`; keyword ``overrides`` replace
        its fields (``keep_sample_grads=True``, ``diagonal=True``, ``fisher_type="true"``, ...).
      key: PRNG key of the true Fisher's label draws (required for ``fisher_type="true"``).
      spill_dir: where kept per-sample arrays go once they exceed their host-memory budget.
      checkpoint_dir, resume: save the accumulation state with orbax every
        ``options.checkpoint_every`` batches; with ``resume=True`` skip the batches already
        accumulated and continue.
      progress: show a progress bar (batches, with the samples seen and samples/s);
        ``total``: the number of batches when ``batches`` has no length.
      mesh: a :class:`jax.sharding.Mesh` with axes ``("data",)`` or ``("data", "model")``
        (:mod:`fisherjax.sharding`): each micro-batch's samples are split over ``"data"``
        (``memory_budget_bytes`` is then per device), parameters replicated or sharded over
        ``"model"``, and the states combined inside the step (:func:`~.step.sharded_step_function`).
        The results equal those of one device up to float rounding. On a mesh over several
        processes (``jax.distributed``) every process passes the same batches and places only its
        devices' rows; the Fisher, its states and the counts are global, while the per-sample
        arrays (sample ids, kept gradients, per-sample groups) are the process's own share.
      prefix_batches, prefix_paths: also record the full diagonal's mean over the samples of the
        first ``prefix_batches`` batches (all of them, if there are fewer), of ``prefix_paths``
        (None: every path), as ``TaskFisher.partial_diagonal``
        (:class:`~fisherjax.fisher.state.PartialDiagonal`): the accumulated state read once, when
        it holds exactly those batches. A run resumed after them records none.

    Raises:
      DataError: empty task, token ids outside the vocabulary.
      NumericalError: NaN/inf in a loss or gradient (names the sample id and parameter).
      ConfigError: an unknown or out-of-range option.
    """
    options = with_overrides(options or CollectOptions(), overrides)
    if options.fisher_type == "true" and key is None:
        raise ConfigError("fisher_type='true' draws labels from the model: pass a PRNG key (key=jax.random.key(seed))")
    if prefix_batches is not None and (not options.diagonal or prefix_batches < 1):
        raise ConfigError(f"collect: prefix_batches={prefix_batches} records the full diagonal over the first batches; it needs "
                          "diagonal=True and at least one batch")
    mesh = check_mesh(mesh)
    params = model.params if params is None else params
    manager = progress_manager(checkpoint_dir) if checkpoint_dir is not None else None
    fingerprint = Fingerprint.of(task, options, params) if manager is not None else None
    key = key if key is not None else jax.random.key(0)
    if mesh is not None:
        params, key = place_params(params, mesh), put_replicated(key, mesh)
    layout = model.layout
    plan = make_plan(layout, options)
    step = compiled_step(model, plan, mesh)
    devices = data_size(mesh)

    state = initial_state(model, plan, options.ema_decay)
    group_like = state["groups"].mean if plan.mode == "welford" else state["groups"].value
    log = CollectionLog()
    start_batch, saved = 0, None
    data = DataDigest() if manager is not None else None
    if manager is not None and resume:
        restored = restore_progress(manager, state, fingerprint)
        if restored is not None:
            state, log, start_batch, saved = restored
    if mesh is not None:
        state = place(state, state_shardings(model, plan, mesh))
    spill = Spill(Path(spill_dir)) if spill_dir is not None else None
    if spill is None and isinstance(batches, Sequence):  # refused before the first step, not after hours of them
        check_kept_budget(model, batches, options, task=task, mesh=mesh)
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)

    def settle(log: CollectionLog, pending) -> CollectionLog:
        micro, outputs = pending
        if mesh is None:
            groups, kept, scalars = jax.device_get(outputs)
        else:  # this process's rows only (all of them on one host)
            rows, (groups, kept, scalars) = local_rows(outputs)
            micro = Batch(*(x[rows] for x in micro))
        losses, tokens, finite = scalars[:, 0], scalars[:, 1].astype(np.int64), scalars[:, 2:] > 0.5
        _raise_if_nonfinite(finite, micro.sample_ids, layout.paths(), task)
        groups = None if groups is None else _unpack(groups, group_like)
        return log.add(micro, tokens, losses, groups, kept, budget=options.sample_grads_budget_bytes, spill=spill, task=task)

    pending = None  # (micro-batch, outputs) of the last step, still being copied to the host
    dispatched = log.n_seen + log.n_skipped
    prefix_ids, partial, index = [], None, -1
    with progress_bar(progress, total=total, desc=f"Fisher[{task}]", unit="batch") as bar:
        bar.update(start_batch)
        batch_size = None
        for index, batch in enumerate(batches):
            if index == prefix_batches and index >= start_batch:  # the state holds exactly the prefix's batches
                partial = partial_diagonal(state, prefix_ids, prefix_paths)
            if prefix_batches is not None and index < prefix_batches:
                prefix_ids.append(seen_ids(batch))
            batch_size = batch_size or batch.input_ids.shape[0]
            if data is not None:  # only a checkpoint needs to know what it was made from
                data.update(batch)
            if index < start_batch:
                if index == start_batch - 1:
                    _check_resumed_data(saved, data, batch_size, checkpoint_dir, start_batch)
                continue
            check_token_ids(batch.input_ids, model.config.vocab_size)
            chunk = devices * micro_batch(model, options, *batch.input_ids.shape, mesh)
            for micro in micro_batches(batch, chunk, devices):
                inputs = tuple(micro) if mesh is None else tuple(shard_rows(x, mesh) for x in micro)
                state, groups, kept, scalars = step(params, state, *inputs, key)
                # the transfer overlaps the next step's compute
                outputs = start_host_copy((groups if options.keep_per_sample_groups else None, kept if plan.keep else None, scalars))
                if pending is not None:
                    log = settle(log, pending)
                pending = (micro, outputs)
            dispatched += batch.num_real
            if manager is not None and (index + 1) % options.checkpoint_every == 0:
                log, pending = settle(log, pending), None
                save_progress(manager, index + 1, state, log, fingerprint=fingerprint, data=data, batch_size=batch_size)
            bar.update(1)
            bar.set_postfix(samples=dispatched)
        if pending is not None:
            log = settle(log, pending)
        if prefix_batches is not None and start_batch <= index + 1 <= prefix_batches:  # the prefix is every batch
            partial = partial_diagonal(state, prefix_ids, prefix_paths)
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    if data is not None and data.batches < start_batch:
        raise CheckpointError(f"{checkpoint_dir}: the checkpoint holds {start_batch} batches of task {task!r}, but the task now "
                              f"has only {data.batches}; resume with the same data, or use another checkpoint directory")
    if jax.process_count() > 1 and mesh is not None:  # every process's samples count
        totals = process_sum(np.array([log.n_seen, log.n_skipped, log.n_tokens, log.total_loss], np.float64))
        log = dataclasses.replace(log, n_seen=int(totals[0]), n_skipped=int(totals[1]), n_tokens=int(totals[2]), total_loss=float(totals[3]))
    if log.n_seen == 0 and log.n_skipped == 0:
        raise DataError(f"task {task!r} has no samples")
    if log.n_seen == 0:
        raise DataError(f"task {task!r}: all {log.n_skipped} samples have no predicted tokens (labels all -100)")
    if log.n_skipped:
        warnings.warn(
            f"task {task!r}: {log.n_skipped} sample(s) with no predicted tokens were skipped (ids {list(log.skipped_ids[:10])})",
            stacklevel=2,
        )
    kept, log = list(log.kept), dataclasses.replace(log, kept=())
    return dataclasses.replace(_finish(model, task, plan, state, log, kept, spill), partial_diagonal=partial)


def seen_ids(batch: Batch) -> np.ndarray:
    """int64 ids of a batch's samples that enter the Fisher: real rows with ``T_i ≥ 1``."""
    tokens = np.asarray(num_active_tokens(np.asarray(batch.labels), np.asarray(batch.attention_mask)))
    ids = np.asarray(batch.sample_ids, np.int64)
    return ids[(ids >= 0) & (tokens > 0)]


def diagonal_mean(diagonal, paths: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """``{path: float32 mean of C_i}`` of the full diagonal's accumulated state (a Welford state's
    mean, or a sum state's ``total / count``, taken in numpy: no eager XLA op per leaf shape),
    read from the device leaf by leaf (``paths``; None: all)."""
    if isinstance(diagonal, WelfordState):
        return {p: np.asarray(v, np.float32) for p, v in diagonal.mean.items() if paths is None or p in paths}
    count = np.float32(max(float(np.asarray(diagonal.count)), 1.0))
    return {p: (np.asarray(v, np.float32) / count).astype(np.float32) for p, v in diagonal.total.items() if paths is None or p in paths}


def partial_diagonal(state: dict, ids: list[np.ndarray], paths: Sequence[str] | None) -> PartialDiagonal:
    """The :class:`~fisherjax.fisher.state.PartialDiagonal` of the samples ``ids`` (per batch) that
    ``state`` has accumulated, copied to the host now (the next step donates the state)."""
    return PartialDiagonal(np.concatenate(ids) if ids else np.zeros(0, np.int64), diagonal_mean(state["diagonal"], paths))


def kept_bytes(model, batches: Sequence[Batch], options: CollectOptions) -> tuple[int, np.ndarray]:
    """``(bytes, rows)``: the host memory Phase 1's kept per-sample arrays take for ``batches``
    (each sample with a predicted token keeps :func:`~.step.kept_values` numbers at its batch's
    length, in the storage dtype), and the samples each batch adds, in order. Exact: what
    :class:`~.progress.CollectionLog` counts against ``sample_grads_budget_bytes`` as they arrive."""
    plan = make_plan(model.layout, options)
    if not plan.keep:
        return 0, np.zeros(0, np.int64)
    width = np.dtype(STORAGE_DTYPES[plan.storage]).itemsize
    rows = np.array([((np.asarray(b.sample_ids) >= 0) & (num_active_tokens(b.labels, b.attention_mask) > 0)).sum() for b in batches],
                    np.int64)
    per_row = np.array([kept_values(model.layout, plan, b.input_ids.shape[1]) * width for b in batches], np.int64)
    return int((rows * per_row).sum()), rows


def step_shapes(model, batches: Sequence[Batch], options: CollectOptions, mesh=None) -> set[tuple[int, int]]:
    """The ``(rows, positions)`` of every step :func:`collect` runs over ``batches`` (on ``mesh``):
    each batch cut into micro-batches of the ``"data"`` size × :func:`~.step.micro_batch` rows,
    each step :func:`~fisherjax.data.micro_batch_rows` wide, as :func:`~fisherjax.data.micro_batches` pads them."""
    devices = data_size(mesh)
    shapes = set()
    for batch in batches:
        rows, seq = batch.input_ids.shape
        shapes.add((micro_batch_rows(rows, devices * micro_batch(model, options, rows, seq, mesh), devices), seq))
    return shapes


def check_kept_budget(model, batches: Sequence[Batch], options: CollectOptions, *, task: str, mesh=None) -> None:
    """Refuse, before any compute, a collection whose kept per-sample arrays (:func:`kept_bytes`;
    this process's share on a mesh over several processes) would exceed
    ``options.sample_grads_budget_bytes`` without a spill directory: naming the size, the samples
    that fit and what to do.

    Raises:
      ConfigError: the budget is too small for the task.
    """
    need, rows = kept_bytes(model, batches, options)
    share = jax.process_count() if mesh is not None else 1
    budget = options.sample_grads_budget_bytes
    if need / share <= budget:
        return
    fit = int(budget // (need / max(int(rows.sum()), 1) / share))
    dtype = " or store them as bfloat16 (--sample-grads-dtype)" if options.sample_grads_dtype == "float32" else ""
    raise ConfigError(
        f"task {task!r}: its {int(rows.sum())} samples' kept per-sample gradients would take {need / share / 1e9:.3g} GB of host "
        f"memory, more than the {budget / 1e9:.3g} GB allowed (--sample-grads-budget-gb, sample_grads_budget_bytes), which "
        f"holds {f'about {fit}' if fit else 'not one'} of them; give a spill directory (--spill-dir, spill_dir=...) to keep them on disk, "
        f"raise the budget, use fewer samples (--max-samples){dtype}"
    )


def _check_resumed_data(saved: dict, data: DataDigest, batch_size: int, checkpoint_dir, start_batch: int) -> None:
    """The batches a resumed run skips must be those the checkpoint accumulated."""
    if saved.get("batch_size") != batch_size:
        raise CheckpointError(f"{checkpoint_dir}: the checkpoint was made with batch size {saved.get('batch_size')}, this run's "
                              f"is {batch_size}; resume with the same batch size, or use another checkpoint directory")
    if saved.get("data") != data.hexdigest():
        raise CheckpointError(f"{checkpoint_dir}: the first {start_batch} batches differ from those the checkpoint holds (other "
                              "samples, tokens or order); resume with the same data, or use another checkpoint directory")


def _unpack(packed: np.ndarray, like) -> dict:
    """Split a ``[batch, total]`` array back into a tree shaped like ``like`` (plus the batch axis)."""
    leaves, treedef = jax.tree.flatten(like)
    sizes = [int(np.prod(np.shape(x))) for x in leaves]
    parts = np.split(packed, np.cumsum(sizes)[:-1], axis=1)
    return jax.tree.unflatten(treedef, [p.reshape(packed.shape[0], *np.shape(x)) for p, x in zip(parts, leaves)])


def _raise_if_nonfinite(finite: np.ndarray, sample_ids: np.ndarray, paths: list[str], task: str) -> None:
    bad_rows = np.flatnonzero(~finite.all(1))
    if len(bad_rows) == 0:
        return
    row = bad_rows[0]
    column = int(np.flatnonzero(~finite[row])[0])
    where = "its loss" if column == 0 else f"the gradient of {paths[column - 1]}"
    raise NumericalError(f"task {task!r}: sample {int(sample_ids[row])} has NaN or inf in {where}")


def _join_consuming(chunks: list[dict]) -> dict:
    """``{kind: {path: rows of every chunk}}`` joined along the sample axis into
    :func:`~fisherjax.backend.host_empty` arrays (shorter chunks zero-padded to
    :func:`~.progress.joined_shape`); each chunk is dropped from ``chunks`` once copied."""
    first = chunks[0]
    out = {kind: {p: host_empty(joined_shape([c[kind][p] for c in chunks]), v.dtype) for p, v in tree.items()}
           for kind, tree in first.items()}
    at = 0
    for i in range(len(chunks)):
        chunk, chunks[i] = chunks[i], None
        rows = 0
        for kind, tree in chunk.items():
            for p, v in tree.items():
                rows = put_rows(out[kind][p], at, v, zero_rest=True)
        at += rows
        del chunk
    return out


def _concat(parts) -> np.ndarray:
    return np.concatenate(parts, axis=0) if parts else np.zeros((0,))


def _finish(model, task: str, plan: StepPlan, state: dict, log: CollectionLog, kept: list, spill) -> TaskFisher:
    """The TaskFisher of a finished collection. ``kept``: the per-batch chunks of kept arrays (the
    only reference to them: they are freed as they are joined, so joining needs one chunk of extra
    memory, not a second copy of everything kept)."""
    layout = model.layout
    host = jax.tree.map(np.asarray, state)
    groups_state = host["groups"]
    if plan.mode == "welford":
        group_fisher, welford, ema = groups_state.mean, WelfordState(*groups_state), None
    else:
        ema = EMAState(groups_state.count, groups_state.value, float(groups_state.decay))
        group_fisher, welford = jax.tree.map(np.asarray, ema_value(ema)), None
    group_fisher = jax.tree.map(lambda v: np.asarray(v, np.float32), group_fisher)
    sample_ids = _concat(log.sample_ids).astype(np.int64)
    tokens = _concat(log.tokens).astype(np.int64)
    losses = None if log.losses is None else _concat(log.losses).astype(np.float64)
    per_sample = jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *log.groups) if log.groups else None
    sample_grads = None
    if plan.keep:
        kinds = {"contributions": None}
        if spill is not None:
            for kind, tree in kept[0].items():
                kinds[kind] = {p: spill.concatenate([k[kind][p] for k in kept], f"{kind}.{p.replace('/', '.')}") for p in tree}
        else:
            kinds.update(_join_consuming(kept))
        grads = dict(kinds["grads"])
        grads.update({p: FactoredGrads(kinds["inputs"][p], kinds["deltas"][p]) for p in plan.factors})
        sample_grads = SampleGrads(sample_ids, tokens, {p: grads[p] for p in plan.keep}, kinds["contributions"])
    diagonal = variance = None
    if plan.diagonal:
        diagonal = diagonal_mean(host["diagonal"])
    if plan.diagonal_variance:
        variance = {p: np.asarray(v, np.float32) for p, v in welford_variance(host["diagonal"]).items()}
    return TaskFisher(
        task=task,
        group_fisher=group_fisher,
        group_sizes={p: group_sizes(layout, p) for p in layout.paths()},
        n_samples=log.n_seen,
        n_skipped=log.n_skipped,
        n_tokens=log.n_tokens,
        total_loss=log.total_loss,
        welford=welford,
        ema=ema,
        diagonal=diagonal,
        diagonal_variance=variance,
        sample_grads=sample_grads,
        per_sample_groups=per_sample,
        sample_ids=sample_ids,
        losses=losses,
        tokens=tokens,
        fisher_type=plan.fisher_type,
        mode=plan.mode,
        skipped_ids=tuple(int(i) for i in log.skipped_ids),
    )


def group_intervals(fisher: TaskFisher, *, method: str = "normal", level: float = 0.95, n_bootstrap: int = 1000, seed: int = 0):
    """Confidence intervals of every group value: ``(lower, upper)`` trees like ``group_fisher``.

    ``normal``: mean ± z·stderr from the Welford state; ``bootstrap``: percentile intervals of
    the mean over resampled samples (needs ``per_sample_groups``).
    """
    from scipy.special import ndtri

    from fisherjax import stats

    if method == "normal":
        if fisher.welford is None:
            raise FisherjaxError("normal intervals need a Welford state (collect with mode='welford')")
        z = float(ndtri(0.5 + level / 2))
        lo, hi = welford_interval(fisher.welford, z=z)
        return jax.tree.map(np.asarray, lo), jax.tree.map(np.asarray, hi)
    if method == "bootstrap":
        if fisher.per_sample_groups is None:
            raise FisherjaxError("bootstrap intervals need per-sample group values (keep_per_sample_groups=True)")
        pairs = jax.tree.map(
            lambda v: stats.bootstrap_mean_interval(v, n_bootstrap=n_bootstrap, level=level, seed=seed),
            fisher.per_sample_groups,
        )
        is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
        return (jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair), jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair))
    raise ConfigError(f"method must be 'normal' or 'bootstrap', got {method!r}")
