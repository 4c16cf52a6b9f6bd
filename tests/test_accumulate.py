"""Welford and EMA state against float64 numpy."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fisherjax.fisher import accumulate as acc


def _batches(rng, n_batches=5, batch=7):
    for _ in range(n_batches):
        values = {"a": rng.normal(size=(batch, 3, 2)) * 10 + 3, "b": rng.gamma(2.0, size=(batch, 4))}
        valid = rng.random(batch) > 0.3
        yield values, valid


class WelfordTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_mean_and_variance_match_float64_numpy(self):
        rng = np.random.default_rng(0)
        data = list(_batches(rng))
        update = self.variant(acc.welford_update)
        state = acc.welford_init({"a": np.zeros((3, 2)), "b": np.zeros(4)})
        for values, valid in data:
            state = update(state, jax.tree.map(jnp.asarray, values), jnp.asarray(valid))
        kept = {k: np.concatenate([v[k][m] for v, m in data]) for k in ("a", "b")}
        chex.assert_trees_all_close(state.mean, {k: v.mean(0) for k, v in kept.items()}, rtol=1e-5)
        chex.assert_trees_all_close(acc.welford_variance(state), {k: v.var(0, ddof=1) for k, v in kept.items()}, rtol=1e-4)
        assert float(state.count) == sum(m.sum() for _, m in data)

    def test_order_of_samples_changes_result_by_rounding_only(self):
        rng = np.random.default_rng(1)
        values = rng.gamma(0.5, size=(64, 10)) * 1e-3
        order = rng.permutation(64)
        def run(v):
            state = acc.welford_init(np.zeros(10))
            for chunk in np.split(v, 8):
                state = acc.welford_update(state, jnp.asarray(chunk), jnp.ones(8, bool))
            return np.asarray(state.mean)
        a, b = run(values), run(values[order])
        assert np.max(np.abs(a - b) / np.abs(a)) <= 1e-6

    @chex.variants(with_jit=True, without_jit=True)
    def test_merge_of_partial_states_equals_one_pass(self):
        rng = np.random.default_rng(2)
        x = rng.normal(size=(30, 5))
        valid = jnp.ones(30, bool)
        update, merge = self.variant(acc.welford_update), self.variant(acc.welford_merge)
        whole = acc.welford_update(acc.welford_init(np.zeros(5)), jnp.asarray(x), valid)
        left = update(acc.welford_init(np.zeros(5)), jnp.asarray(x[:11]), valid[:11])
        right = update(acc.welford_init(np.zeros(5)), jnp.asarray(x[11:]), valid[11:])
        merged = merge(left, right)
        chex.assert_trees_all_close(merged, whole, rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_empty_batch_is_a_no_op_and_interval_is_finite(self):
        update = self.variant(acc.welford_update)
        state = update(acc.welford_init(np.zeros(2)), jnp.ones((3, 2)), jnp.array([True, False, True]))
        same = update(state, jnp.full((3, 2), jnp.nan), jnp.zeros(3, bool))
        chex.assert_trees_all_close(same.mean, state.mean)
        lo, hi = acc.welford_interval(state)
        assert np.all(np.isfinite(lo)) and np.all(np.asarray(lo) <= np.asarray(hi))

    def test_float64_accumulation_with_x64(self):
        with jax.enable_x64(True):
            state = acc.welford_init(np.zeros(3))
            assert state.mean.dtype == jnp.float64
            state = acc.welford_update(state, jnp.asarray(np.full((4, 3), 1 + 1e-12)), jnp.ones(4, bool))
            assert np.asarray(state.mean)[0] - 1 == np.float64(1e-12) or abs(float(state.mean[0]) - 1 - 1e-12) < 1e-15


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=6), st.integers(0, 10_000))
def test_welford_matches_numpy_for_any_batching(sizes, seed):
    rng = np.random.default_rng(seed)
    chunks = [rng.normal(size=(n, 2)) for n in sizes]
    state = acc.welford_init(np.zeros(2))
    for c in chunks:
        state = acc.welford_update(state, jnp.asarray(c), jnp.ones(len(c), bool))
    allx = np.concatenate(chunks) if chunks else np.zeros((0, 2))
    assert float(state.count) == len(allx)
    if len(allx):
        np.testing.assert_allclose(state.mean, allx.mean(0), rtol=1e-5, atol=1e-6)
    if len(allx) > 1:
        np.testing.assert_allclose(acc.welford_variance(state), allx.var(0, ddof=1), rtol=1e-4, atol=1e-6)


class EMATest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_ema_equals_sequential_loop_with_bias_correction(self):
        rng = np.random.default_rng(3)
        decay = 0.9
        state = acc.ema_init(np.zeros(3), decay)
        update = self.variant(acc.ema_update)
        v, count = np.zeros(3), 0
        for values, valid in _batches(rng, 4, 5):
            values = values["b"][:, :3]
            state = update(state, jnp.asarray(values), jnp.asarray(valid))
            for x, ok in zip(values, valid):
                if ok:
                    v = decay * v + (1 - decay) * x
                    count += 1
        expected = v / (1 - decay**count)
        np.testing.assert_allclose(acc.ema_value(state), expected, rtol=1e-5)
        assert float(state.count) == count

    def test_decay_out_of_range_is_an_error(self):
        with self.assertRaises(ValueError):
            acc.ema_init(np.zeros(1), 1.0)


class DiagonalTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_walked_pieces_merge_like_one_welford_update(self):
        """The full diagonal's accumulator merges a parameter piece by piece (uneven last piece)
        into the same state as one Welford update of the materialised C = g² / T."""
        from fisherjax.fisher.diagonal import diagonal_update, materialised_walk

        rng = np.random.default_rng(4)
        state = acc.welford_init({"w": np.zeros((5, 3))})
        expected = acc.welford_init({"w": np.zeros((5, 3))})
        update = self.variant(lambda s, g, inv, valid: diagonal_update(s, {"w": materialised_walk(g)}, inv, valid, piece_bytes=4 * 4 * 6))
        for _ in range(3):
            g = jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32)
            tokens = rng.integers(1, 6, size=4)
            valid = jnp.asarray(rng.random(4) > 0.2)
            inv = jnp.asarray(1.0 / tokens, jnp.float32)
            state = update(state, g, inv, valid)
            expected = acc.welford_update(expected, {"w": jnp.square(g) * inv[:, None, None]}, valid)
        chex.assert_trees_all_close(state, expected, rtol=1e-5, atol=1e-7)


def _parts_then_all_reduce(init, update, like, values, valid, devices=4):
    """Each of ``devices`` parts (contiguous rows) accumulated from :func:`acc.device_start`, then
    combined with ``init`` by :func:`acc.combine` (``vmap`` with an axis name runs its collectives
    without devices) — what the sharded step does."""
    split = lambda x: x.reshape(devices, -1, *x.shape[1:])  # noqa: E731

    def one(v, m):
        local = update(acc.device_start(init, jax.lax.axis_index("data") == 0), v, m)
        return acc.combine(init, local, "data")

    combined = jax.vmap(one, axis_name="data")(jax.tree.map(split, values), split(valid))
    return jax.tree.map(lambda x: x[0], combined)


def test_parts_combined_across_devices_equal_one_update():
    """Partial states of contiguous sample blocks, combined with collectives in device order and
    merged into a running state, equal one update with every sample (Welford, sums, EMA); empty
    parts (all rows invalid) are exact no-ops."""
    rng = np.random.default_rng(3)
    like = {"a": np.zeros((3, 2)), "b": np.zeros(4)}
    (first, first_valid), (values, valid) = list(_batches(rng, 2, batch=12))
    valid[3:6] = False  # the second device's part is empty
    values, valid = jax.tree.map(jnp.asarray, values), jnp.asarray(valid)
    first, first_valid = jax.tree.map(jnp.asarray, first), jnp.asarray(first_valid)

    def sum_update(state, v, m):
        w = m.astype(state.count.dtype)
        return acc.SumState(state.count + w.sum(), jax.tree.map(lambda t, x: t + acc.sample_sum(w, jnp.where(m.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0)), state.total, v))

    for init, update in (
        (acc.welford_init(like), acc.welford_update),
        (acc.sum_init(like), sum_update),
        (acc.ema_init(like, 0.9), acc.ema_update),
    ):
        running = update(init, first, first_valid)
        expected = update(running, values, valid)
        got = _parts_then_all_reduce(running, update, like, values, valid)
        chex.assert_trees_all_close(jax.tree.map(np.asarray, got), jax.tree.map(np.asarray, expected), rtol=1e-5, atol=1e-6)
