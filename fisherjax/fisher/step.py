"""The jitted Phase 1 step: one batch in, the updated accumulation state and per-sample values out.

Per batch the step runs the decoder forward once (``jax.vjp`` with respect to the zero taps of
every site), pulls back the loss cotangent(s) to get each site's output gradient ``δ``, and turns
``(input, δ)`` pairs into per-sample contributions ``C_i = g_i² / T_i`` reduced to groups
(:mod:`fisherjax.fisher.sites`, :mod:`fisherjax.fisher.groups`). No weight-gradient GEMM and no
``vmap`` over samples is needed; full per-sample gradients are formed only for the parameters
whose gradients are kept, and for the full diagonal one piece of a parameter at a time
(:mod:`fisherjax.fisher.diagonal`).

Fisher variants (``fisher_type``): ``"empirical"`` (data labels); ``"true"`` (labels drawn from
the model at every predicted position, ``C_i`` averaged over ``true_samples`` draws, sample
``i``'s draws from ``fold_in(key, sample_id_i)``, so they do not depend on batching, micro-batching
or the mesh);
``"per_token"`` (``C_i = Σ_t ‖∇ℓ_{i,t}‖² / T_i``, one pullback per position). Kept signed
gradients ``g_i`` are always those of the data labels.

What is static about a run is a :class:`StepPlan` (hashable, part of the jit cache key);
:func:`compiled_step` keeps one compiled step per (model signature, plan, mesh), so repeated
collections with the same shapes compile nothing. On a mesh (:mod:`fisherjax.sharding`) every device runs
the same step on its share of the samples and the accumulation states are combined inside the
step with collectives (:func:`sharded_step_function`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fisherjax import backend
from fisherjax.data import IGNORE, num_active_tokens, predicted_labels
from fisherjax.fisher.accumulate import (
    SumState,
    combine,
    device_start,
    ema_init,
    ema_update,
    sample_sum,
    sum_init,
    welford_init,
    welford_update,
)
from fisherjax.fisher.diagonal import diagonal_update, materialised_walk, square_sums
from fisherjax.fisher.groups import group_sizes, marginals_of, reduce_groups
from fisherjax.fisher.options import STORAGE_DTYPES, CollectOptions, factored_paths, kept_paths
from fisherjax.settings import with_overrides
from fisherjax.fisher.sites import discover_sites, grad_walks, layer_site, per_sample_grads_from_sites, squared_marginals_from_sites
from fisherjax.grads import backward_bytes, token_nll
from fisherjax.sharding import DATA, MODEL, by_sample, data_size, param_shardings, replicated


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Static choices of one collection run (hashable, part of the jit cache key)."""

    materialise: tuple[str, ...]  # paths whose full per-sample gradients are formed
    keep: tuple[str, ...]  # paths whose g_i (and, unless derived, C_i) are returned
    factors: tuple[str, ...]  # kept dense kernels returned as their sites' (a, δ) instead of g_i
    diagonal: bool
    diagonal_variance: bool
    fisher_type: str
    true_samples: int
    mode: str
    ghost: str
    storage: str
    remat: bool
    sample_loop: bool  # per-sample site work as a loop over pieces (CPU) or one vmap


def make_plan(layout, options: CollectOptions) -> StepPlan:
    """The :class:`StepPlan` of ``options`` for a model's layout."""
    keep = kept_paths(layout, options.keep_sample_grads)
    factors = factored_paths(layout, keep, options.sample_grads_factors)
    empirical = options.fisher_type == "empirical"
    return StepPlan(
        # the empirical diagonal is walked piece by piece (fisher.diagonal), never materialised;
        # nor are the kernels kept as factors (their group Fisher comes from the sites' marginals)
        materialise=tuple(layout.paths()) if options.diagonal and not empirical else tuple(p for p in keep if p not in factors),
        keep=keep,
        factors=factors,
        diagonal=options.diagonal,
        diagonal_variance=options.diagonal and options.diagonal_variance,
        fisher_type=options.fisher_type,
        true_samples=options.true_samples,
        mode=options.mode,
        ghost=options.ghost,
        storage=options.sample_grads_dtype,
        remat=options.remat,
        sample_loop=backend.sample_loop() if options.sample_loop is None else options.sample_loop,
    )


def site_names(model) -> list[str]:
    """The model's site names (``embed``, ``layers/attn/c_attn``, ...), in forward order."""
    shapes = model.tap_shapes(1, 2)
    return [k for k in shapes if k != "layers"] + [f"layers/{k}" for k in shapes["layers"]]


def data_cotangent(logits, labels):
    """``∂(Σ_{i,t} −log p)/∂logits`` for the given labels (zero where the label is ignored)."""
    return jax.grad(lambda z: token_nll(z, labels).sum())(logits)


def sample_labels(key, logits, labels):
    """Labels drawn from the model's predictive distribution ``softmax(logits)`` at the positions
    the data predicts (``IGNORE`` elsewhere), aligned like ``labels``."""
    draws = jax.random.categorical(key, jax.lax.stop_gradient(logits[:, :-1]).astype(jnp.float32), axis=-1)
    shifted = jnp.where(labels[:, 1:] != IGNORE, draws, IGNORE)
    return jnp.concatenate([jnp.full_like(labels[:, :1], IGNORE), shifted], axis=1)


def sample_labels_per_row(keys, logits, labels):
    """:func:`sample_labels` with one key per row (``keys [batch]``): each sample's draws depend on
    its own key only, not on the rows beside it."""
    return jax.vmap(lambda k, z, y: sample_labels(k, z[None], y[None])[0])(keys, logits, labels)


def initial_state(model, plan: StepPlan, ema_decay: float = 0.99) -> dict:
    """The empty accumulation state: ``{"groups": Welford | EMA, "diagonal": Sum | Welford}``."""
    layout = model.layout
    group_like = {p: {k: np.zeros(v.shape, np.float32) for k, v in group_sizes(layout, p).items()} for p in layout.paths()}
    state = {"groups": welford_init(group_like) if plan.mode == "welford" else ema_init(group_like, ema_decay)}
    if plan.diagonal:
        like = {p: np.zeros(layout.specs[p].shape, np.float32) for p in layout.paths()}
        state["diagonal"] = welford_init(like) if plan.diagonal_variance else sum_init(like)
    return state


def step_function(model, plan: StepPlan) -> Callable:
    """The pure per-batch step ``step(params, state, ids, mask, labels, sample_ids, key)
    -> (state, packed_groups, kept, packed_scalars)`` (jit it, or use :func:`compiled_step`).

    The true Fisher draws sample ``i``'s labels with ``fold_in(key, sample_ids[i])``.
    ``packed_groups`` ``[batch, Σ groups]`` and ``packed_scalars`` ``[batch, 2 +
    parameters]`` (loss, ``T_i``, finite flags) are one array each, because a transfer per leaf
    would cost more than the step; ``kept`` is ``{"grads": {path: [batch, ...]}}`` (plus
    ``"contributions"`` unless they are derived from the gradients, and for the kernels kept as
    factors ``"inputs"`` / ``"deltas"`` ``{path: [batch, (layer,) seq, d_in | d_out]}``).
    """
    layout = model.layout
    sites = discover_sites(layout, site_names(model))
    paths = layout.paths()
    mat = plan.materialise
    site_of = {site.params.get("kernel"): site for site in sites if site.kind in ("dense", "unembed") and not site.tied}

    def sample_first(tree, path):
        """The recording of ``path``'s site with samples first: ``[batch, (layer,) seq, d]``."""
        site = site_of[path]
        x = layer_site(tree, site.name)
        return jnp.moveaxis(x, 1, 0) if site.layered else x

    def squares_and_marginals(recorded, deltas, seq):
        loop = plan.sample_loop
        grads = per_sample_grads_from_sites(layout, sites, recorded, deltas, paths=mat, loop=loop) if mat else {}
        squares = {p: jnp.square(g) for p, g in grads.items()}
        marginals = squared_marginals_from_sites(layout, sites, recorded, deltas, seq=seq, ghost=plan.ghost, skip=mat, loop=loop)
        return grads, squares, marginals

    def diagonal_step(diagonal, recorded, deltas, grads, contributions, inv_t, valid):
        """The full diagonal's state after this batch (see :mod:`fisherjax.fisher.diagonal`)."""
        if plan.fisher_type != "empirical":  # C_i averages squares over draws or positions: materialised above
            if plan.diagonal_variance:
                return welford_update(diagonal, contributions, valid)
            total = {p: t + sample_sum(valid.astype(t.dtype), jnp.where(valid.reshape((-1,) + (1,) * t.ndim), contributions[p], 0.0))
                     for p, t in diagonal.total.items()}
            return SumState(diagonal.count + valid.astype(diagonal.count.dtype).sum(), total)
        walks = grad_walks(layout, sites, recorded, deltas, loop=plan.sample_loop)
        walks.update({p: materialised_walk(grads[p]) for p in plan.keep if p in grads})
        if plan.diagonal_variance:
            return diagonal_update(diagonal, walks, inv_t, valid)
        weights = jnp.where(valid, inv_t, 0.0)
        return SumState(diagonal.count + valid.astype(diagonal.count.dtype).sum(),
                        square_sums(diagonal.total, walks, weights, loop=plan.sample_loop))

    def step(params, state, ids, mask, labels, sample_ids, key):
        batch, seq = ids.shape
        # the labels that count, once: T_i, losses, the data cotangent, the true Fisher's draws and
        # the per-token pullbacks all see them (a target predicted from padding never counts)
        labels = predicted_labels(labels, mask)
        taps = model.zero_taps(batch, seq)

        def forward(taps):
            out = model.forward(params, ids, mask, taps=taps, remat=plan.remat)
            return out.logits, out.recorded

        logits, pullback, recorded = jax.vjp(forward, taps, has_aux=True)
        tokens = num_active_tokens(labels)
        losses = token_nll(logits, labels).sum(-1)
        cotangent = data_cotangent(logits, labels)
        deltas = pullback(cotangent)[0]

        if plan.fisher_type == "empirical":
            grads, squares, marginals = squares_and_marginals(recorded, deltas, seq)
        else:
            if plan.fisher_type == "true":
                row_keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i), plan.true_samples))(sample_ids)
                keys = jnp.swapaxes(row_keys, 0, 1)  # [draws, batch]
                cotangent_of = lambda k: data_cotangent(logits, sample_labels_per_row(k, logits, labels))  # noqa: E731
                xs, scale = keys, 1.0 / plan.true_samples
            else:  # per_token: the cotangent of one position's loss at a time
                cotangent_of = lambda t: jnp.where((jnp.arange(seq) == t)[None, :, None], cotangent, 0.0)  # noqa: E731
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
        if plan.diagonal:
            state = {**state, "diagonal": diagonal_step(state["diagonal"], recorded, deltas, grads, contributions, inv_t, valid)}
        storage = STORAGE_DTYPES[plan.storage]
        kept = {"grads": {p: grads[p].astype(storage) for p in plan.keep if p not in plan.factors}}
        if plan.factors:
            kept["inputs"], kept["deltas"] = ({p: sample_first(tree, p).astype(storage) for p in plan.factors}
                                              for tree in (recorded, deltas))
        if plan.fisher_type != "empirical":  # otherwise C = g²/T is derived from the grads on the host
            kept["contributions"] = {p: contributions[p].astype(storage) for p in plan.keep}
        packed_groups = jnp.concatenate([v.reshape(batch, -1).astype(jnp.float32) for v in jax.tree.leaves(groups)], axis=1)
        packed_scalars = jnp.concatenate([losses[:, None], tokens[:, None].astype(jnp.float32), finite.astype(jnp.float32)], axis=1)
        return state, packed_groups, kept, packed_scalars

    return step


def sharded_step_function(model, plan: StepPlan, mesh) -> Callable:
    """:func:`step_function` over a mesh: samples split over ``"data"``, one state for all.

    ``jax.shard_map`` over the ``"data"`` axis (a ``"model"`` axis stays with the compiler, which
    gathers parameters sharded over it): each device runs the single-device step on its rows,
    starting from :func:`~fisherjax.fisher.accumulate.device_start` (empty, or for sums the
    running sums on device 0 only, so no second copy of a model-sized diagonal is made), and the
    partial states are combined in the global sample order with collectives and merged into the
    running state (:func:`~fisherjax.fisher.accumulate.combine`). The state, parameters and key are
    replicated over ``"data"``; per-sample outputs stay split over it, in the single-device order.
    The batch's rows must be a multiple of the ``"data"`` size (:func:`fisherjax.data.micro_batches` pads).
    """
    local = step_function(model, plan)
    P = jax.sharding.PartitionSpec

    def step(params, state, ids, mask, labels, sample_ids, key):
        carries = jax.lax.axis_index(DATA) == 0
        begun = {k: device_start(v, carries) for k, v in state.items()}
        part, groups, kept, scalars = local(params, begun, ids, mask, labels, sample_ids, key)
        return {k: combine(state[k], part[k], DATA) for k in state}, groups, kept, scalars

    rows = P(DATA)
    return jax.shard_map(
        step, mesh=mesh, axis_names={DATA},
        in_specs=(P(), P(), rows, rows, rows, rows, P()),
        out_specs=(P(), rows, rows, rows),
        check_vma=False,  # the loops of the local step start from constants; the state out is a psum
    )


def compiled_step(model, plan: StepPlan, mesh=None):
    """``jax.jit`` of :func:`step_function` (or, on a mesh, :func:`sharded_step_function`) with
    the state donated, built once per (model signature, plan, mesh): repeated collections — of
    one model, or of models loaded again from the same checkpoint — reuse its traces and
    compilations. The step is built from the model's :attr:`~fisherjax.models.model.Model.static`
    stand-in, so the cache holds no weights."""
    return _compiled_step(model.static, plan, mesh)


@functools.lru_cache(maxsize=32)
def _compiled_step(model, plan: StepPlan, mesh):
    """:func:`compiled_step` of a static model (``functools.lru_cache``)."""
    if mesh is None:
        return jax.jit(step_function(model, plan), donate_argnums=(1,))
    # per-sample outputs split over "data" only (not also over "model"): whole rows per device
    state, rows = state_shardings(model, plan, mesh), by_sample(mesh)
    params = param_shardings(model.params, mesh)
    return jax.jit(sharded_step_function(model, plan, mesh), donate_argnums=(1,),
                   in_shardings=(params, state, rows, rows, rows, rows, replicated(mesh)),
                   out_shardings=(state, rows, rows, rows))


def state_shardings(model, plan: StepPlan, mesh):
    """Where the accumulation state lives on a mesh: the full diagonal's parameter-shaped leaves
    split over ``"model"`` like the parameters (:func:`fisherjax.sharding.param_spec`: as large as
    the model, it must not be whole on every device of a model group), everything else (counts,
    group values) replicated."""
    shapes = jax.eval_shape(lambda: initial_state(model, plan))

    def where(key, tree):
        return param_shardings(tree, mesh) if key == "diagonal" else jax.tree.map(lambda _: replicated(mesh), tree)

    return {key: where(key, tree) for key, tree in shapes.items()}


def lower_step(model, batch_size: int, seq_len: int, options: CollectOptions | None = None, *, mesh=None, **overrides):
    """The lowered per-batch step for abstract inputs, e.g. to read XLA's memory analysis.

    ``model.params`` may be ``jax.ShapeDtypeStruct`` leaves, so a 7B-parameter configuration can
    be checked without allocating weights: ``lower_step(...).compile().memory_analysis()``.
    ``options`` / ``overrides`` as for :func:`fisherjax.collect`; with ``mesh`` the sharded step
    (``batch_size`` is then the global batch, a multiple of the ``"data"`` size).
    """
    options = with_overrides(options or CollectOptions(), overrides)
    plan = make_plan(model.layout, options)
    state = jax.eval_shape(lambda: initial_state(model, plan, options.ema_decay))
    ints = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    ids = jax.ShapeDtypeStruct((batch_size,), jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
    return compiled_step(model, plan, mesh).lower(model.params, state, ints, ints, ints, ids, jax.random.key(0))


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """XLA's compiled memory analysis of one Phase 1 step, bytes per device.

    ``total_bytes = argument + output + temp + generated_code − alias``: outputs that reuse a
    donated argument's buffer (the accumulation state) are counted once.
    """

    micro_batch: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    generated_code_bytes: int
    total_bytes: int


def step_memory(model, rows: int, seq_len: int, options: CollectOptions | None = None, mesh=None) -> StepMemory:
    """XLA's memory analysis of the step :func:`fisherjax.collect` runs on ``rows`` × ``seq_len``
    inputs (``lower_step(...).compile().memory_analysis()``; on a mesh one device's program, at
    ``rows`` / its ``"data"`` size rows). For a concrete model compiling it costs nothing more:
    the program is the one the collection's first step of that shape would compile, and JAX
    keeps it for that call."""
    analysis = lower_step(model, rows, seq_len, options, mesh=mesh).compile().memory_analysis()
    names = ("argument", "output", "temp", "alias", "generated_code")
    sizes = {name: int(getattr(analysis, f"{name}_size_in_bytes", 0) or 0) for name in names}
    total = sizes["argument"] + sizes["output"] + sizes["temp"] + sizes["generated_code"] - sizes["alias"]
    return StepMemory(rows // data_size(mesh), *(sizes[k] for k in names), total)


def kept_values(layout, plan: StepPlan, seq: int, *, contributions: bool = True) -> int:
    """Numbers one sample's kept arrays hold at ``seq`` positions (what :func:`step_function`
    returns under ``kept``): per kept leaf its parameters, or, for a kernel ``[*lead, d_in, d_out]``
    kept as token factors, ``lead · seq · (d_in + d_out)`` (its inputs and output gradients); and,
    with ``contributions`` unless the Fisher is empirical (where ``C_i = g_i² / T_i`` is derived on
    the host), ``C_i`` of every kept leaf, dense."""
    total = 0
    for path in plan.keep:
        shape = layout.spec(path).shape
        total += math.prod(shape[:-2]) * seq * (shape[-2] + shape[-1]) if path in plan.factors else math.prod(shape)
        total += math.prod(shape) if contributions and plan.fisher_type != "empirical" else 0
    return total


def micro_batch_size(model, plan: StepPlan, batch: int, seq: int, budget_bytes: float) -> int:
    """Samples per step so that per-sample arrays fit ``budget_bytes`` (at least 1, at most ``batch``).

    Per sample: the materialised gradients (and their squares), the kept copies (gradients, or
    ``seq · (d_in + d_out)`` factors per layer) plus what a backward pass keeps
    (:func:`fisherjax.grads.backward_bytes`).
    """
    grads = sum(int(np.prod(model.layout.specs[p].shape)) for p in plan.materialise)
    kept = kept_values(model.layout, plan, seq, contributions=False)  # C_i: the squares 2 · grads counts
    per_sample = 4 * (2 * grads + 2 * kept) + backward_bytes(model.config, 1, seq)
    return int(max(1, min(batch, budget_bytes // max(per_sample, 1))))


STEP_BUDGET_BYTES = 2e9
"""Per-sample arrays a Phase 1 step may hold on a CPU by :func:`micro_batch_size`'s estimate. Not
more: there a step's GEMMs use every core at a few rows already, and larger steps ran no faster
(slower on a 30-layer model) while they held more memory (``benchmarks/RESULTS.md``, forty-sixth
session)."""

DEVICE_STEP_SHARE = 0.9
"""Share of an accelerator's free memory Phase 1's compiled step may fill (:func:`micro_batch`;
``fisherjax plan``'s ``SAFETY`` is this share)."""

MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
"""Candidate micro-batches per device; :func:`largest_fitting` finds the largest that fits."""


def micro_batch(model, options: CollectOptions, rows: int, seq: int, mesh=None) -> int:
    """Samples per device of every step :func:`fisherjax.collect` runs on batches of ``rows`` ×
    ``seq`` (at least 1, at most ``rows`` over the ``"data"`` size).

    With ``options.memory_budget_bytes``, or on a CPU (:data:`STEP_BUDGET_BYTES`), what
    :func:`micro_batch_size`'s estimate of the per-sample arrays lets fit. On an accelerator that
    estimate would hold a 1.5B model at T = 512 to one sample a step, where its compiled step fits
    several: there it is :func:`fitting_micro_batch` at the device's free memory, decided once
    per model, options, shape and mesh in a process (at the free memory of the first call), so
    every task's collection and the run's checks see the same steps."""
    devices = data_size(mesh)
    most = -(-rows // devices)
    budget = options.memory_budget_bytes
    free = None if budget is not None or backend.is_cpu() else backend.available_memory_bytes()
    if free is None:
        return micro_batch_size(model, make_plan(model.layout, options), most, seq, budget or STEP_BUDGET_BYTES)
    key = (model.static, options, most, seq, mesh)
    if key not in _FITTED:
        _FITTED[key] = fitting_micro_batch(model.static, options, most, seq, mesh, free)
    return _FITTED[key]


_FITTED: dict = {}
""":func:`micro_batch`'s accelerator decisions, by (static model, options, rows, positions, mesh)."""


def fitting_micro_batch(model, options: CollectOptions, most: int, seq: int, mesh, free: float) -> int:
    """The largest micro-batch per device, of :data:`MICRO_BATCHES` below ``most`` and ``most``
    itself, whose compiled step fits :data:`DEVICE_STEP_SHARE` of ``free`` bytes (1 if none does:
    that step then fails as out of memory, which a run reports as such): the step's total
    (:class:`StepMemory`) plus its outputs other than the donated state (the previous step's,
    still being copied to the host, are alive beside it), less the parameters, already resident
    (their share of a ``"model"`` axis). Each candidate measured compiles a step
    (:func:`largest_fitting` measures 2 to 4); the chosen one is the program the collection runs."""
    resident = model.parameter_bytes / (dict(mesh.shape).get(MODEL, 1) if mesh is not None else 1)

    def need(per_device: int) -> float:
        step = step_memory(model, per_device * data_size(mesh), seq, options, mesh)
        return step.total_bytes + step.output_bytes - step.alias_bytes - resident

    candidates = sorted({c for c in MICRO_BATCHES if c < most} | {most})
    return largest_fitting(candidates, need, DEVICE_STEP_SHARE * free) or 1


def largest_fitting(candidates: list[int], bytes_at: Callable[[int], float], limit: float) -> int | None:
    """The largest of the ascending ``candidates`` whose ``bytes_at`` is at most ``limit`` (None
    when the first's is not), measuring few of them: each measurement compiles a step.

    A step's memory grows with its micro-batch, close to a line (parameters, plus activations and
    kept gradients per sample). The first two candidates are measured; the line through them
    predicts the largest that fits, which is measured, then its neighbours, upwards while they fit
    or downwards until one does. The answer is always measured to fit, and the next candidate
    measured not to (or there is none): what trying every candidate in order until one does not
    fit finds, where memory grows with the micro-batch, in 2 to 4 compilations while it stays near
    the line, rather than one per candidate (a small model at 64 samples a device compiled 7)."""
    measured: dict[int, float] = {}

    def fits(index: int) -> bool:
        if index not in measured:
            measured[index] = bytes_at(candidates[index])
        return measured[index] <= limit

    if not candidates or not fits(0):
        return None
    if len(candidates) == 1 or not fits(1):
        return candidates[0]
    slope = (measured[1] - measured[0]) / (candidates[1] - candidates[0])
    predicted = [i for i, c in enumerate(candidates) if i >= 1 and measured[0] + slope * (c - candidates[0]) <= limit]
    index = predicted[-1] if predicted else 1
    if fits(index):
        while index + 1 < len(candidates) and fits(index + 1):
            index += 1
    else:
        while not fits(index):
            index -= 1
    return candidates[index]
