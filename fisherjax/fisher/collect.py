"""Phase 1 driver: batches of a task → :class:`~fisherjax.fisher.state.TaskFisher`.

Per batch, one jitted step runs the decoder forward once (``jax.vjp`` with respect to the zero
taps of every site), pulls back the loss cotangent(s) to get each site's output gradient ``δ``,
and turns ``(input, δ)`` pairs into per-sample contributions ``C_i = g_i² / T_i`` reduced to
groups (:mod:`fisherjax.fisher.sites`, :mod:`fisherjax.fisher.groups`). No weight-gradient GEMM
and no ``vmap`` over samples is needed; full per-sample gradients are formed only for the
parameters whose contributions were asked for, and for the full diagonal one piece of a
parameter at a time (:mod:`fisherjax.fisher.diagonal`).

Fisher variants (``fisher_type``):

* ``"empirical"``: labels from the data (default);
* ``"true"``: labels drawn from the model's own predictive distribution at every predicted
  position, ``C_i`` averaged over ``true_samples`` draws (PRNG ``key``);
* ``"per_token"``: ``C_i = Σ_t ‖∇ℓ_{i,t}‖² / T_i`` — square each token's gradient, then average
  (one backward pass per position: for small models).

Signed per-sample gradients ``g_i`` are always those of the data labels.

The Python loop walks batches only. Accumulation is pure state (Welford or EMA) updated inside the
jitted step; with ``checkpoint_dir`` the state is saved with orbax every ``checkpoint_every``
batches, and ``resume=True`` continues from the last save with bitwise-identical results on CPU.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fisherjax.data import IGNORE, Batch
from fisherjax.errors import ConfigError, DataError, FisherjaxError, NumericalError
from fisherjax.fisher.accumulate import (
    EMAState,
    WelfordState,
    ema_init,
    ema_update,
    ema_value,
    welford_init,
    welford_update,
)
from fisherjax.fisher.diagonal import diagonal_update, materialised_walk
from fisherjax.fisher.groups import group_sizes, marginals_of, reduce_groups
from fisherjax.fisher.sites import (
    default_sample_loop,
    discover_sites,
    grad_walks,
    per_sample_grads_from_sites,
    squared_marginals_from_sites,
)
from fisherjax.fisher.state import Contributions, TaskFisher, host_concatenate
from fisherjax.grads import token_nll
from fisherjax.layout import Role
from fisherjax.models.model import check_token_ids

FISHER_TYPES = ("empirical", "true", "per_token")
MODES = ("welford", "ema")
STORAGE_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


def attention_paths(layout) -> list[str]:
    """Default parameters whose contributions are kept: attention Q/K/V/O kernels and q/k/v biases."""
    roles = (Role.Q, Role.K, Role.V, Role.O, Role.QKV)
    return [p for p in layout.paths() if layout.specs[p].role in roles]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static choices of one collection run (hashable, part of the jit cache key)."""

    materialise: tuple[str, ...]  # paths whose full per-sample gradients are formed
    keep: tuple[str, ...]  # paths whose C_i and g_i are returned
    diagonal: bool
    fisher_type: str
    true_samples: int
    mode: str
    ghost: str
    storage: str
    remat: bool
    sample_loop: bool  # per-sample site work as a loop over pieces (CPU) or one vmap


def _site_names(model) -> list[str]:
    shapes = model.tap_shapes(1, 2)
    return [k for k in shapes if k != "layers"] + [f"layers/{k}" for k in shapes["layers"]]


def _dlogits(logits, labels):
    """``∂(Σ_{i,t} −log p)/∂logits`` for the given labels (zero where the label is ignored)."""
    return jax.grad(lambda z: token_nll(z, labels).sum())(logits)


def _sample_labels(key, logits, labels):
    """Labels drawn from the model's predictive distribution at the positions that are predicted."""
    draws = jax.random.categorical(key, jax.lax.stop_gradient(logits[:, :-1]).astype(jnp.float32), axis=-1)
    shifted = jnp.where(labels[:, 1:] != IGNORE, draws, IGNORE)
    return jnp.concatenate([jnp.full_like(labels[:, :1], IGNORE), shifted], axis=1)


_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _step_for(model, plan: _Plan):
    """The jitted step of ``(model, plan)``, built once so repeated collections reuse compilations."""
    steps = _STEPS.setdefault(model, {})
    if plan not in steps:
        steps[plan] = _make_step(model, discover_sites(model.layout, _site_names(model)), plan)
    return steps[plan]


def _make_step(model, sites, plan: _Plan):
    """Build the jitted per-batch step for one collection run."""
    layout = model.layout
    paths = layout.paths()
    mat = plan.materialise

    def squares_and_marginals(recorded, deltas, seq):
        loop = plan.sample_loop
        grads = per_sample_grads_from_sites(layout, sites, recorded, deltas, paths=mat, loop=loop) if mat else {}
        squares = {p: jnp.square(g) for p, g in grads.items()}
        marginals = squared_marginals_from_sites(layout, sites, recorded, deltas, seq=seq, ghost=plan.ghost, skip=mat, loop=loop)
        return grads, squares, marginals

    def step(params, state, ids, mask, labels, sample_ids, key, position):
        batch, seq = ids.shape
        key = jax.random.fold_in(jax.random.fold_in(key, position[0]), position[1])
        taps = model.zero_taps(batch, seq)

        def forward(taps):
            out = model.forward(params, ids, mask, taps=taps, remat=plan.remat)
            return out.logits, out.recorded

        logits, pullback, recorded = jax.vjp(forward, taps, has_aux=True)
        tokens = (labels[:, 1:] != IGNORE).sum(-1)
        losses = token_nll(logits, labels).sum(-1)
        data_cotangent = _dlogits(logits, labels)
        deltas = pullback(data_cotangent)[0]

        if plan.fisher_type == "empirical":
            grads, squares, marginals = squares_and_marginals(recorded, deltas, seq)
        else:
            if plan.fisher_type == "true":
                keys = jax.random.split(key, plan.true_samples)
                cotangent_of = lambda k: _dlogits(logits, _sample_labels(k, logits, labels))  # noqa: E731
                xs, scale = keys, 1.0 / plan.true_samples
            else:  # per_token: the cotangent of one position's loss at a time
                cotangent_of = lambda t: jnp.where((jnp.arange(seq) == t)[None, :, None], data_cotangent, 0.0)  # noqa: E731
                xs, scale = jnp.arange(seq - 1), 1.0

            def accumulate(total, x):
                _, sq, mg = squares_and_marginals(recorded, pullback(cotangent_of(x))[0], seq)
                return jax.tree.map(jnp.add, total, (sq, mg)), None

            zero = jax.eval_shape(lambda: squares_and_marginals(recorded, deltas, seq)[1:])
            zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
            (squares, marginals), _ = jax.lax.scan(accumulate, zero, xs)
            squares, marginals = jax.tree.map(lambda v: v * scale, (squares, marginals))
            grads = per_sample_grads_from_sites(layout, sites, recorded, deltas, paths=plan.keep, loop=plan.sample_loop) if plan.keep else {}

        inv_t = jnp.where(tokens > 0, 1.0 / jnp.maximum(tokens, 1), 0.0).astype(jnp.float32)

        def per_sample(x):
            return x * inv_t.reshape((-1,) + (1,) * (x.ndim - 1))

        contributions = {p: per_sample(v) for p, v in squares.items()}
        groups = {}
        for path in paths:
            if path in contributions:
                col, row = marginals_of(layout.specs[path], contributions[path])
            else:
                col, row = (None if m is None else per_sample(m) for m in marginals[path])
            groups[path] = reduce_groups(layout, path, col, row)

        finite = jnp.stack(
            [jnp.isfinite(losses)]
            + [jnp.stack([jnp.isfinite(v).reshape(batch, -1).all(-1) for v in groups[p].values()]).all(0) for p in paths],
            axis=1,
        )
        valid = (sample_ids >= 0) & (tokens > 0)
        if plan.mode == "welford":
            state = {**state, "groups": welford_update(state["groups"], groups, valid)}
        else:
            state = {**state, "groups": ema_update(state["groups"], groups, valid)}
        if plan.diagonal and plan.fisher_type == "empirical":
            walks = grad_walks(layout, sites, recorded, deltas, loop=plan.sample_loop)
            walks.update({p: materialised_walk(grads[p]) for p in plan.keep})
            state = {**state, "diagonal": diagonal_update(state["diagonal"], walks, inv_t, valid)}
        elif plan.diagonal:  # C_i averages squares over draws or positions: materialised above
            state = {**state, "diagonal": welford_update(state["diagonal"], contributions, valid)}
        storage = STORAGE_DTYPES[plan.storage]
        kept = {"grads": {p: grads[p].astype(storage) for p in plan.keep}}
        if plan.fisher_type != "empirical":  # otherwise C = g²/T is derived from the grads on the host
            kept["contributions"] = {p: contributions[p].astype(storage) for p in plan.keep}
        # One array per batch for the host: a transfer per leaf would cost more than the step.
        packed_groups = jnp.concatenate([v.reshape(batch, -1).astype(jnp.float32) for v in jax.tree.leaves(groups)], axis=1)
        packed_scalars = jnp.concatenate([losses[:, None], tokens[:, None].astype(jnp.float32), finite.astype(jnp.float32)], axis=1)
        return state, packed_groups, kept, packed_scalars

    return jax.jit(step, donate_argnums=(1,))


def _make_plan(
    layout, contributions, diagonal, fisher_type, true_samples, mode, ghost, contribution_dtype, remat, sample_loop=None
) -> _Plan:
    keep = tuple(attention_paths(layout) if contributions is True else (contributions or ()))
    unknown = [p for p in keep if p not in layout.specs]
    if unknown:
        raise KeyError(f"contributions asked for unknown parameters: {unknown}")
    return _Plan(
        # the empirical diagonal is walked piece by piece (fisher.diagonal), never materialised
        materialise=tuple(layout.paths()) if diagonal and fisher_type != "empirical" else keep,
        keep=keep,
        diagonal=diagonal,
        fisher_type=fisher_type,
        true_samples=true_samples,
        mode=mode,
        ghost=ghost,
        storage=contribution_dtype,
        remat=remat,
        sample_loop=default_sample_loop() if sample_loop is None else sample_loop,
    )


def lower_step(
    model,
    batch_size: int,
    seq_len: int,
    *,
    contributions: bool | Sequence[str] = False,
    diagonal: bool = False,
    fisher_type: str = "empirical",
    true_samples: int = 1,
    mode: str = "welford",
    ghost: str = "auto",
    contribution_dtype: str = "float32",
    remat: bool = False,
    sample_loop: bool | None = None,
):
    """The lowered per-batch step for abstract inputs, e.g. to read XLA's memory analysis.

    ``model.params`` may be ``jax.ShapeDtypeStruct`` leaves, so a 7B-parameter configuration can
    be checked without allocating weights: ``lower_step(...).compile().memory_analysis()``.
    """
    plan = _make_plan(model.layout, contributions, diagonal, fisher_type, true_samples, mode, ghost, contribution_dtype, remat, sample_loop)
    state = jax.eval_shape(lambda: _initial_state(model, plan, 0.99))
    ints = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    ids = jax.ShapeDtypeStruct((batch_size,), jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
    position = jax.ShapeDtypeStruct((2,), jnp.int32)
    return _step_for(model, plan).lower(model.params, state, ints, ints, ints, ids, jax.random.key(0), position)


def _initial_state(model, plan: _Plan, ema_decay: float) -> dict:
    layout = model.layout
    group_like = {
        p: {k: np.zeros(v.shape, np.float32) for k, v in group_sizes(layout, p).items()} for p in layout.paths()
    }
    state = {"groups": welford_init(group_like) if plan.mode == "welford" else ema_init(group_like, ema_decay)}
    if plan.diagonal:
        state["diagonal"] = welford_init({p: np.zeros(layout.specs[p].shape, np.float32) for p in layout.paths()})
    return state


def collect(
    model,
    batches: Iterable[Batch],
    *,
    task: str,
    params=None,
    mode: str = "welford",
    ema_decay: float = 0.99,
    contributions: bool | Sequence[str] = False,
    contribution_dtype: str = "float32",
    contribution_budget_bytes: float = 8e9,
    spill_dir: str | Path | None = None,
    diagonal: bool = False,
    fisher_type: str = "empirical",
    true_samples: int = 1,
    key: jax.Array | None = None,
    ghost: str = "auto",
    keep_per_sample_groups: bool = True,
    remat: bool = False,
    sample_loop: bool | None = None,
    memory_budget_bytes: float = 4e9,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    progress: bool = True,
    total: int | None = None,
) -> TaskFisher:
    """Collect the diagonal Fisher of one task, reduced to groups.

    Args:
      model: a :class:`~fisherjax.models.Model`; ``params`` default to ``model.params``.
      batches: :class:`~fisherjax.data.Batch` values (e.g. ``fisherjax.data.batches(task, 8)``).
      task: the task's name (first part of every ``group_fisher.npz`` key).
      mode: ``"welford"`` (mean, variance, intervals) or ``"ema"`` (bias-corrected, ``ema_decay``).
      contributions: keep per-sample ``C_i`` and signed ``g_i`` — True for the attention Q/K/V/O
        parameters, or a list of parameter paths.
      contribution_dtype: storage dtype of kept arrays: float32, bfloat16 or float16.
      contribution_budget_bytes: host memory allowed for kept arrays; beyond it, an error — or,
        with ``spill_dir``, the arrays are written to disk and returned memory-mapped.
      diagonal: also accumulate the full diagonal Fisher of every parameter (per-sample
        gradients formed a layer or a block of table rows at a time; for ``"true"`` and
        ``"per_token"`` the whole batch's, as those average squares over several pullbacks).
      fisher_type: ``"empirical"``, ``"true"`` (``true_samples`` draws, PRNG ``key``) or
        ``"per_token"``.
      ghost: ``"auto"`` chooses ghost norms per layer when cheaper, ``"always"`` / ``"never"`` force.
      keep_per_sample_groups: keep per-sample group values (for bootstrap intervals).
      remat: recompute each block in the backward pass (less memory, ~30 % more time).
      sample_loop: compute the per-sample norms and gradients from the sites one (sample, layer)
        piece at a time instead of in one vmap; None: on CPU only (see
        :func:`~fisherjax.fisher.sites.default_sample_loop`). Same numbers either way.
      memory_budget_bytes: device memory one step may use for per-sample arrays (materialised
        gradients and the activations the backward pass keeps); larger batches are processed in
        micro-batches of the size that fits (see :func:`micro_batch_size`).
      checkpoint_dir, checkpoint_every, resume: save the accumulation state with orbax every N
        batches; with ``resume=True`` skip the batches already accumulated and continue.
      progress: show a progress bar with samples/s.

    Raises:
      DataError: empty task, token ids outside the vocabulary.
      NumericalError: NaN/inf in a loss or gradient (names the sample id and parameter).
    """
    from fisherjax import io

    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if contribution_dtype not in STORAGE_DTYPES:
        raise ValueError(f"contribution_dtype must be one of {tuple(STORAGE_DTYPES)}")
    if contribution_budget_bytes <= 0:
        raise ValueError(f"contribution_budget_bytes must be > 0, got {contribution_budget_bytes}")
    if fisher_type == "true" and key is None:
        raise ValueError("fisher_type='true' needs a PRNG key")
    params = model.params if params is None else params
    layout = model.layout
    plan = _make_plan(layout, contributions, diagonal, fisher_type, true_samples, mode, ghost, contribution_dtype, remat, sample_loop)
    keep = plan.keep
    step = _step_for(model, plan)
    key = key if key is not None else jax.random.key(0)

    state = _initial_state(model, plan, ema_decay)
    group_like = state["groups"].mean if mode == "welford" else state["groups"].value
    log = _Log()
    start_batch = 0
    manager = io.progress_manager(checkpoint_dir) if checkpoint_dir is not None else None
    if manager is not None and resume:
        restored = io.restore_progress(manager, state)
        if restored is not None:
            state, log, start_batch = restored
    spill = _Spill(Path(spill_dir)) if spill_dir is not None else None

    bar = _progress_bar(progress, total, task)
    t0, seen_at_start = time.perf_counter(), log.n_seen
    pending = None  # (micro-batch, outputs) of the last step, still being copied to the host

    def settle(log: _Log, pending) -> _Log:
        micro, outputs = pending
        groups, kept, scalars = jax.device_get(outputs)
        losses, tokens, finite = scalars[:, 0], scalars[:, 1].astype(np.int64), scalars[:, 2:] > 0.5
        _raise_if_nonfinite(finite, micro.sample_ids, layout.paths(), task)
        groups = None if groups is None else _unpack(groups, group_like)
        return log.add(micro, tokens, losses, groups, kept, budget=contribution_budget_bytes, spill=spill, task=task)

    for index, batch in enumerate(batches):
        if index < start_batch:
            continue
        check_token_ids(batch.input_ids, model.config.vocab_size)
        chunk = micro_batch_size(model, plan, *batch.input_ids.shape, memory_budget_bytes)
        for part, micro in enumerate(_micro_batches(batch, chunk)):
            state, groups, kept, scalars = step(
                params,
                state,
                micro.input_ids,
                micro.attention_mask,
                micro.labels,
                micro.sample_ids,
                key,
                np.array([index, part], np.int32),
            )
            outputs = (groups if keep_per_sample_groups else None, kept if keep else None, scalars)
            for leaf in jax.tree.leaves(outputs):
                leaf.copy_to_host_async()  # overlaps the transfer with the next step's compute
            if pending is not None:
                log = settle(log, pending)
            pending = (micro, outputs)
        if manager is not None and (index + 1) % checkpoint_every == 0:
            log, pending = settle(log, pending), None
            io.save_progress(manager, index + 1, state, log)
        if bar is not None:
            bar.update(1)
            rate = (log.n_seen - seen_at_start) / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(samples=log.n_seen, samples_per_s=f"{rate:.1f}")
    if pending is not None:
        log = settle(log, pending)
    if bar is not None:
        bar.close()
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    if log.n_seen == 0 and log.n_skipped == 0:
        raise DataError(f"task {task!r} has no samples")
    if log.n_seen == 0:
        raise DataError(f"task {task!r}: all {log.n_skipped} samples have no predicted tokens (labels all -100)")
    if log.n_skipped:
        warnings.warn(
            f"task {task!r}: {log.n_skipped} sample(s) with no predicted tokens were skipped "
            f"(ids {list(log.skipped_ids[:10])})",
            stacklevel=2,
        )
    return _finish(model, task, plan, state, log, spill)


def micro_batch_size(model, plan: _Plan, batch: int, seq: int, budget_bytes: float) -> int:
    """Samples per step so that per-sample arrays fit ``budget_bytes`` (at least 1, at most ``batch``).

    Per sample: the materialised gradients (and their squares, and the stored copies when kept)
    plus the activations a backward pass keeps, estimated as ``4 bytes × layers × seq ×
    (12·d_model + 3·d_ff)`` and the ``[seq, vocab]`` logits with their gradient.
    """
    cfg = model.config
    grads = sum(int(np.prod(model.layout.specs[p].shape)) for p in plan.materialise)
    kept = sum(int(np.prod(model.layout.specs[p].shape)) for p in plan.keep)
    activations = cfg.num_layers * seq * (12 * cfg.hidden_size + 3 * cfg.intermediate_size) + 2 * seq * cfg.vocab_size
    per_sample = 4 * (2 * grads + 2 * kept + activations)
    return int(max(1, min(batch, budget_bytes // max(per_sample, 1))))


def _micro_batches(batch: Batch, size: int):
    """Split a batch into consecutive micro-batches of ``size`` rows (the last padded with filler)."""
    n = batch.input_ids.shape[0]
    if size >= n:
        yield batch
        return
    for start in range(0, n, size):
        rows = np.arange(start, min(start + size, n))
        if np.all(batch.sample_ids[rows] < 0):
            continue
        pad = size - len(rows)
        take = lambda x, fill: np.concatenate([x[rows], np.full((pad, *x.shape[1:]), fill, x.dtype)])  # noqa: E731
        yield Batch(take(batch.input_ids, 0), take(batch.attention_mask, 0), take(batch.labels, IGNORE), take(batch.sample_ids, -1))


# ---- host-side bookkeeping ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Log:
    """Host-side record of the samples seen so far (immutable; ``add`` returns a new one)."""

    n_seen: int = 0
    n_skipped: int = 0
    n_tokens: int = 0
    total_loss: float = 0.0
    skipped_ids: tuple[int, ...] = ()
    sample_ids: tuple[np.ndarray, ...] = ()
    tokens: tuple[np.ndarray, ...] = ()
    groups: tuple[dict, ...] = ()
    kept: tuple[dict, ...] = ()
    kept_bytes: int = 0

    def add(self, batch: Batch, tokens: np.ndarray, losses: np.ndarray, groups, kept, *, budget: float, spill, task: str) -> _Log:
        real = batch.sample_ids >= 0
        active = real & (tokens > 0)
        idx = np.flatnonzero(active)
        skipped = tuple(int(i) for i in batch.sample_ids[real & (tokens == 0)])
        new_groups = self.groups
        if groups is not None:
            new_groups += (jax.tree.map(lambda v: _rows(v, idx), groups),)
        new_kept, kept_bytes = self.kept, self.kept_bytes
        if kept is not None:
            host = jax.tree.map(lambda v: _rows(v, idx), kept)
            kept_bytes += sum(v.nbytes for v in jax.tree.leaves(host))
            if spill is not None:
                host = spill.write(len(self.kept), host)
            elif kept_bytes > budget:
                raise FisherjaxError(
                    f"task {task!r}: kept contributions need more than {budget / 1e9:.1f} GB of host memory "
                    f"after {self.n_seen + len(idx)} samples; pass spill_dir=... to write them to disk, keep "
                    "fewer parameters, or use contribution_dtype='bfloat16'"
                )
            new_kept += (host,)
        return dataclasses.replace(
            self,
            n_seen=self.n_seen + len(idx),
            n_skipped=self.n_skipped + len(skipped),
            n_tokens=self.n_tokens + int(tokens[active].sum()),
            total_loss=self.total_loss + float(np.asarray(losses, np.float64)[active].sum()),
            skipped_ids=self.skipped_ids + skipped,
            sample_ids=self.sample_ids + (batch.sample_ids[idx],),
            tokens=self.tokens + (tokens[idx],),
            groups=new_groups,
            kept=new_kept,
            kept_bytes=kept_bytes,
        )


def _rows(values, idx: np.ndarray) -> np.ndarray:
    """``values[idx]`` on the host, without a copy when every row is kept."""
    values = np.asarray(values)
    return values if len(idx) == values.shape[0] and np.array_equal(idx, np.arange(len(idx))) else values[idx]


def _unpack(packed: np.ndarray, like) -> dict:
    """Split a ``[batch, total]`` array back into a tree shaped like ``like`` (plus the batch axis)."""
    leaves, treedef = jax.tree.flatten(like)
    sizes = [int(np.prod(np.shape(x))) for x in leaves]
    parts = np.split(packed, np.cumsum(sizes)[:-1], axis=1)
    return jax.tree.unflatten(treedef, [p.reshape(packed.shape[0], *np.shape(x)) for p, x in zip(parts, leaves)])


class _Spill:
    """Writes kept per-sample arrays batch by batch as ``.npy`` files and reads them memory-mapped."""

    def __init__(self, directory: Path):
        self.directory = directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"spill_dir {directory}: cannot create it ({err.strerror})") from err

    def write(self, index: int, host: dict) -> dict:
        out = {}
        for kind, tree in host.items():
            out[kind] = {}
            for path, value in tree.items():
                file = self.directory / f"{kind}.{path.replace('/', '.')}.{index:06d}.npy"
                np.save(file, np.asarray(value))
                out[kind][path] = file
        return out

    def concatenate(self, files: Sequence[Path], name: str) -> np.ndarray:
        """One memory-mapped array of all chunks, copied chunk by chunk (bounded memory)."""
        chunks = [np.load(f, mmap_mode="r") for f in files]
        total = sum(c.shape[0] for c in chunks)
        out = np.lib.format.open_memmap(self.directory / f"{name}.npy", mode="w+", dtype=chunks[0].dtype,
                                        shape=(total, *chunks[0].shape[1:]))
        at = 0
        for c in chunks:
            out[at : at + c.shape[0]] = c
            at += c.shape[0]
        out.flush()
        for f in files:
            Path(f).unlink()
        return np.load(self.directory / f"{name}.npy", mmap_mode="r")


def _raise_if_nonfinite(finite: np.ndarray, sample_ids: np.ndarray, paths: list[str], task: str) -> None:
    bad_rows = np.flatnonzero(~finite.all(1))
    if len(bad_rows) == 0:
        return
    row = bad_rows[0]
    column = int(np.flatnonzero(~finite[row])[0])
    where = "its loss" if column == 0 else f"the gradient of {paths[column - 1]}"
    raise NumericalError(f"task {task!r}: sample {int(sample_ids[row])} has NaN or inf in {where}")


def _progress_bar(enabled: bool, total, task: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"Fisher[{task}]", unit="batch", leave=False)


def _concat(parts: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts, axis=0) if parts else np.zeros((0,))


def _finish(model, task: str, plan: _Plan, state: dict, log: _Log, spill) -> TaskFisher:
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
    per_sample = None
    if log.groups:
        per_sample = jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *log.groups)
    contributions = None
    if plan.keep:
        kinds = {"contributions": None}
        for kind in log.kept[0]:
            if spill is not None:
                kinds[kind] = {p: spill.concatenate([k[kind][p] for k in log.kept], f"{kind}.{p.replace('/', '.')}") for p in plan.keep}
            else:
                kinds[kind] = {p: host_concatenate([k[kind][p] for k in log.kept]) for p in plan.keep}
        contributions = Contributions(sample_ids, tokens, kinds["contributions"], kinds["grads"])
    diagonal = {p: np.asarray(v, np.float32) for p, v in host["diagonal"].mean.items()} if plan.diagonal else None
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
        contributions=contributions,
        per_sample_groups=per_sample,
        sample_ids=sample_ids,
        fisher_type=plan.fisher_type,
        mode=plan.mode,
    )


def group_intervals(fisher: TaskFisher, *, method: str = "normal", level: float = 0.95, n_bootstrap: int = 1000, seed: int = 0):
    """Confidence intervals of every group value: ``(lower, upper)`` trees like ``group_fisher``.

    ``normal``: mean ± z·stderr from the Welford state; ``bootstrap``: percentile intervals of
    the mean over resampled samples (needs ``per_sample_groups``).
    """
    from scipy.special import ndtri

    from fisherjax import stats
    from fisherjax.fisher.accumulate import welford_interval

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
    raise ValueError(f"method must be 'normal' or 'bootstrap', got {method!r}")
