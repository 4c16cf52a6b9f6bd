"""Streaming mean/variance over samples as pure ``init`` / ``update`` pairs over pytrees.

Welford state ``(count, mean, m2)`` is updated a whole batch at a time with Chan et al.'s
parallel merge: a batch's own mean and M2 (computed with a masked two-pass, so filler rows and
skipped samples drop out) are merged into the running state in one step. The same merge combines
partial states from several devices or resumed runs, and its result does not depend on sample
order beyond rounding.

Sum state ``(count, total)`` keeps only the running sum of per-sample values, for a mean that
needs no variance (the full diagonal by default): one addition per value instead of Welford's
deviations.

EMA state ``(count, value)`` applies ``v ← d·v + (1 − d)·x`` per sample in order; the bias
corrected estimate is ``v / (1 − d^count)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PyTree

_Z95 = 1.959963984540054


def _acc_dtype():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


class WelfordState(NamedTuple):
    """Running count, mean and sum of squared deviations (M2) of a pytree of values."""

    count: Float[Array, ""]
    mean: PyTree
    m2: PyTree


class EMAState(NamedTuple):
    """Exponential moving average (biased) and the number of samples it has seen."""

    count: Float[Array, ""]
    value: PyTree
    decay: float = 0.99


def welford_init(like: PyTree) -> WelfordState:
    """Empty state shaped like one sample of ``like`` (arrays or ShapeDtypeStructs)."""
    def zeros():
        return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), _acc_dtype()), like)

    return WelfordState(jnp.zeros((), _acc_dtype()), zeros(), zeros())


def welford_merge(a: WelfordState, b: WelfordState) -> WelfordState:
    """Chan's parallel merge: ``n = nₐ + n_b``, ``δ = μ_b − μₐ``, ``μ = μₐ + δ n_b/n``,
    ``M2 = M2ₐ + M2_b + δ² nₐ n_b / n``. Empty sides are exact no-ops."""
    n = a.count + b.count
    safe_n = jnp.maximum(n, 1)

    def mean(ma, mb):
        return ma + (mb - ma) * (b.count / safe_n)

    def m2(ma, mb, qa, qb):
        delta = mb - ma
        return qa + qb + delta * delta * (a.count * b.count / safe_n)

    return WelfordState(n, jax.tree.map(mean, a.mean, b.mean), jax.tree.map(m2, a.mean, b.mean, a.m2, b.m2))


def sample_sum(weights: Float[Array, " n"], x: Float[Array, "n ..."]) -> Float[Array, "..."]:
    """``Σ_i w_i x_i`` over the leading (sample) axis, as a matrix-vector product.

    XLA:CPU reduces over an array's major axis far slower than over a minor one, and a product
    runs at GEMM speed (docs/DECISIONS.md, "Sums over samples"); ``HIGHEST`` keeps
    float32 sums exact on GPUs, whose default matmul precision is TF32.
    """
    return jnp.tensordot(weights.astype(x.dtype), x, axes=1, precision=jax.lax.Precision.HIGHEST)


def welford_batch(values: PyTree, valid: Bool[Array, " n"]) -> WelfordState:
    """The state of one batch: masked mean and M2 over the leading sample axis of ``values``."""
    w = valid.astype(_acc_dtype())
    count = w.sum()
    safe = jnp.maximum(count, 1)

    def stats(x):
        keep = valid.reshape((-1,) + (1,) * (x.ndim - 1))
        x = jnp.where(keep, x.astype(_acc_dtype()), 0.0)  # NaN × 0 would still be NaN
        mu = sample_sum(w, x) / safe
        return mu, sample_sum(w, jnp.square(x - mu))

    pairs = jax.tree.map(stats, values)
    is_pair = lambda p: isinstance(p, tuple)  # noqa: E731
    return WelfordState(
        count,
        jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair),
        jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair),
    )


def welford_update(state: WelfordState, values: PyTree, valid: Bool[Array, " n"]) -> WelfordState:
    """Add a batch of per-sample values (leading axis ``n``; rows with ``valid=False`` ignored)."""
    return welford_merge(state, welford_batch(values, valid))


def welford_variance(state: WelfordState, ddof: int = 1) -> PyTree:
    """Per-element sample variance ``M2 / (n − ddof)`` (0 where fewer than ddof + 1 samples)."""
    denom = state.count - ddof
    return jax.tree.map(lambda q: jnp.where(denom > 0, q / jnp.maximum(denom, 1), 0.0), state.m2)


def welford_stderr(state: WelfordState) -> PyTree:
    """Standard error of the mean, ``sqrt(var / n)``."""
    n = jnp.maximum(state.count, 1)
    return jax.tree.map(lambda v: jnp.sqrt(v / n), welford_variance(state))


def welford_interval(state: WelfordState, z: float = _Z95) -> tuple[PyTree, PyTree]:
    """Normal-approximation interval ``mean ± z·stderr`` (95 % by default)."""
    se = welford_stderr(state)
    lo = jax.tree.map(lambda m, s: m - z * s, state.mean, se)
    hi = jax.tree.map(lambda m, s: m + z * s, state.mean, se)
    return lo, hi


class SumState(NamedTuple):
    """Running count and sum of a pytree of per-sample values (the mean is ``total / count``, taken
    on the host by :func:`fisherjax.collect`)."""

    count: Float[Array, ""]
    total: PyTree


def sum_init(like: PyTree) -> SumState:
    """Empty sums shaped like one sample of ``like`` (arrays or ShapeDtypeStructs)."""
    return SumState(jnp.zeros((), _acc_dtype()), jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), _acc_dtype()), like))


def ema_init(like: PyTree, decay: float = 0.99) -> EMAState:
    if not 0.0 < decay < 1.0:
        raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
    zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), _acc_dtype()), like)
    return EMAState(jnp.zeros((), _acc_dtype()), zeros, decay)


def ema_update(state: EMAState, values: PyTree, valid: Bool[Array, " n"]) -> EMAState:
    """Apply ``v ← d·v + (1 − d)·x_i`` for each valid sample in order, in one vectorised step.

    With ``k`` valid samples after position ``i``, sample ``i`` enters with weight
    ``(1 − d)·d^k`` and the old value is scaled by ``d^m`` (``m`` valid samples in the batch).
    """
    d = state.decay
    w = valid.astype(_acc_dtype())
    later = jnp.cumsum(w[::-1])[::-1] - w  # valid samples after each one
    weights = jnp.where(valid, (1 - d) * d**later, 0.0)
    m = w.sum()

    def step(v, x):
        keep = valid.reshape((-1,) + (1,) * (x.ndim - 1))
        x = jnp.where(keep, x.astype(_acc_dtype()), 0.0)  # NaN × 0 would still be NaN
        return v * d**m + sample_sum(weights, x)

    return EMAState(state.count + m, jax.tree.map(step, state.value, values), d)


def ema_value(state: EMAState) -> PyTree:
    """Bias-corrected EMA ``v / (1 − d^count)`` (zeros before any sample)."""
    correction = 1 - state.decay**state.count
    return jax.tree.map(lambda v: jnp.where(state.count > 0, v / jnp.maximum(correction, 1e-30), 0.0), state.value)


# ---------------------------------------------------------------------------------------------
# Partial states: several devices (or runs) each accumulate their own samples, then combine
# ---------------------------------------------------------------------------------------------

State = WelfordState | SumState | EMAState


def empty_like(state: State) -> State:
    """A state of the same kind and shapes that has seen no sample (an EMA keeps its decay)."""
    def zeros(tree):
        return jax.tree.map(jnp.zeros_like, tree)

    if isinstance(state, EMAState):
        return EMAState(jnp.zeros_like(state.count), zeros(state.value), state.decay)
    return type(state)(*(zeros(x) for x in state))


def merge(a: State, b: State) -> State:
    """The state of ``a``'s samples followed by ``b``'s.

    Welford: Chan's merge (:func:`welford_merge`); sums: added; EMA: ``v = v_a·d^{n_b} + v_b``
    (``b``'s samples come after ``a``'s, so ``a``'s value decays once per sample of ``b``).
    """
    if isinstance(a, WelfordState):
        return welford_merge(a, b)
    if isinstance(a, SumState):
        return SumState(a.count + b.count, jax.tree.map(jnp.add, a.total, b.total))
    d = a.decay
    return EMAState(a.count + b.count, jax.tree.map(lambda va, vb: va * d**b.count + vb, a.value, b.value), d)


def all_reduce(part: State, axis_name: str) -> State:
    """Inside ``shard_map``: the state of every device's samples along ``axis_name``, device 0's
    first, from each device's own partial state (collectives over the axis, no host round trip).

    Welford, over devices ``k``: ``n = Σ n_k``, ``μ = Σ n_k μ_k / n``, ``M2 = Σ (M2_k + n_k (μ_k − μ)²)``
    (Chan's merge of all parts at once). Sums: ``psum``. EMA: ``v = Σ_k d^{a_k} v_k`` with ``a_k``
    the samples on the devices after ``k`` (an ``all_gather`` of the counts), so the result is the
    EMA of the samples in the global order.
    """
    if isinstance(part, SumState):
        return SumState(jax.lax.psum(part.count, axis_name), jax.lax.psum(part.total, axis_name))
    if isinstance(part, WelfordState):
        n = jax.lax.psum(part.count, axis_name)
        share = part.count / jnp.maximum(n, 1)
        mean = jax.lax.psum(jax.tree.map(lambda m: m * share, part.mean), axis_name)
        m2 = jax.lax.psum(jax.tree.map(lambda q, mk, m: q + part.count * jnp.square(mk - m), part.m2, part.mean, mean), axis_name)
        return WelfordState(n, mean, m2)
    counts = jax.lax.all_gather(part.count, axis_name)
    after = counts.sum() - jnp.cumsum(counts)[jax.lax.axis_index(axis_name)]
    scale = part.decay**after
    return EMAState(counts.sum(), jax.lax.psum(jax.tree.map(lambda v: v * scale, part.value), axis_name), part.decay)


def device_start(state: State, carries: Bool[Array, ""]) -> State:
    """What one device of a mesh accumulates its own samples onto, inside ``shard_map``.

    Sums: the running sums on the device that ``carries`` them, zeros on the others, so that
    :func:`combine`'s ``psum`` adds the running sums once and the step needs no second copy of
    them beside the state (the full diagonal is as large as the model). Welford and EMA: empty —
    their parts are merged with the running state, not added to it.
    """
    if isinstance(state, SumState):
        return jax.tree.map(lambda x: jnp.where(carries, x, jnp.zeros_like(x)), state)
    return empty_like(state)


def combine(state: State, local: State, axis_name: str) -> State:
    """The running state after every device's samples, from each device's ``local`` state (begun
    with :func:`device_start`): ``all_reduce(local)``, merged into ``state`` unless it is a sum
    that already holds it."""
    if isinstance(state, SumState):
        return all_reduce(local, axis_name)
    return merge(state, all_reduce(local, axis_name))
