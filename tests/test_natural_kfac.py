"""Phase 7 with K-FAC: scale_by_kfac against a dense numpy solve, the K-FAC EWC regulariser against
jax.grad of its penalty (and the penalty against a dense quadratic form), and the factor refresh's
schedule and moving average."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import padded_batch, tiny_config

from fisherjax.analysis.natural import ScaleByKFACState, ewc_kfac_penalty, ewc_kfac_regulariser, scale_by_kfac
from fisherjax.curvature.kfac import decompose, kfac_factors, kfac_inverse_product
from fisherjax.data import IGNORE, Batch
from fisherjax.errors import ConfigError
from fisherjax.layout import flatten
from fisherjax.models.model import Model

SEQ = 8


def _batch(seed, lengths=(8, 5, 7, 3)):
    ids, mask = padded_batch(np.random.default_rng(seed), list(lengths), SEQ, "right")
    labels = np.where(mask == 1, ids, IGNORE).astype(np.int32)
    return Batch(ids, mask, labels, np.arange(len(lengths)) + 100 * seed)


@pytest.fixture(scope="module")
def small():
    """A small GPT-2 (fused QKV, biases, tied embedding) and its empirical K-FAC on one batch."""
    model = Model.init(tiny_config("gpt2", hidden_size=16, intermediate_size=24, num_heads=2, num_kv_heads=2, head_dim=8), seed=3)
    return model, kfac_factors(model, model.params, [_batch(0)])


def _random_tree(params, seed, low=None):
    rng = np.random.default_rng(seed)
    if low is None:
        return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    return jax.tree.map(lambda x: rng.uniform(low, 2 * low, size=x.shape).astype(np.float32), params)


def _blocks(kfac, flat, width_of_block):
    """``{factor key: (A, G, W̄ per layer)}`` in float64: the kernel's block columns (GPT-2's
    ``[Q | K | V]``) with the bias as last row."""
    out = {}
    for key, f in kfac.factors.items():
        w = np.asarray(flat[f.kernel], np.float64)
        cols = slice(None) if f.block is None else slice("qkv".index(f.block) * width_of_block, ("qkv".index(f.block) + 1) * width_of_block)
        wb = w[..., cols]
        if f.bias is not None:
            wb = np.concatenate([wb, np.asarray(flat[f.bias], np.float64)[..., cols][:, None]], 1)
        out[key] = (np.asarray(f.inputs, np.float64), np.asarray(f.outputs, np.float64), wb, f, cols)
    return out


def test_scale_by_kfac_equals_dense_solve(small):
    """``(A ⊗ G + λI)⁻¹ g`` per covered kernel (numpy solve of the Kronecker matrix, row-major
    vec), ``g / (F + λ)`` elsewhere; jitted."""
    model, kfac = small
    lam = 1e-2
    g = _random_tree(model.params, 1)
    diagonal = _random_tree(model.params, 2, low=0.5)
    tx = scale_by_kfac(kfac, lam, diagonal=diagonal, layout=model.layout)
    state = tx.init(model.params)
    updates, state = jax.jit(tx.update)(g, state, model.params)
    assert int(state.count) == 1
    ours, flat_g, flat_d = flatten(updates), flatten(g), flatten(diagonal)
    covered = set()
    d = model.config.hidden_size
    for key, (a, gg, wb, f, cols) in _blocks(kfac, flat_g, d).items():
        for layer in range(wb.shape[0]):
            m = np.kron(a[layer], gg[layer]) + lam * np.eye(wb[layer].size)
            x = np.linalg.solve(m, wb[layer].reshape(-1)).reshape(wb[layer].shape)
            if f.bias is not None:
                np.testing.assert_allclose(ours[f.bias][layer][cols], x[-1], rtol=2e-3, atol=1e-4 * np.abs(x).max(), err_msg=key)
                x = x[:-1]
            np.testing.assert_allclose(ours[f.kernel][layer][:, cols], x, rtol=2e-3, atol=1e-4 * np.abs(x).max(), err_msg=key)
        covered |= {f.kernel, f.bias}
    for p in set(flat_g) - covered:
        np.testing.assert_allclose(ours[p], flat_g[p] / (flat_d[p] + lam), rtol=1e-6, err_msg=p)
    assert len(covered) == 8  # c_attn, attn c_proj, c_fc, mlp c_proj: kernel and bias
    with pytest.raises(ConfigError, match="damping"):
        scale_by_kfac(kfac, 0.0)


def test_ewc_kfac_regulariser_is_the_gradient_of_its_penalty(small):
    """The regulariser adds ``λ ∇Ω``; ``Ω`` equals ``λ/2 Σ vec(Δ̄)ᵀ kron(A, G) vec(Δ̄) + λ/2 Σ F Δ²``
    (numpy) on the uncovered leaves."""
    model, kfac = small
    lam = 0.7
    params = model.params
    anchor = jax.tree.map(lambda p, n: p - 0.05 * n, params, _random_tree(params, 4))
    diagonal = _random_tree(params, 5, low=0.1)
    for diag in (None, diagonal):
        penalty = lambda p: ewc_kfac_penalty(p, anchor, kfac, lam, diag, layout=model.layout)  # noqa: E731
        expected = jax.grad(penalty)(params)
        tx = ewc_kfac_regulariser(anchor, kfac, lam, diag, layout=model.layout)
        zero = jax.tree.map(jnp.zeros_like, params)
        got, _ = jax.jit(tx.update)(zero, tx.init(params), params)
        for p, e in flatten(expected).items():
            np.testing.assert_allclose(flatten(got)[p], e, rtol=1e-4, atol=1e-6 * max(1e-30, float(np.abs(e).max())), err_msg=p)

        delta = {p: np.asarray(x, np.float64) - np.asarray(flatten(anchor)[p], np.float64) for p, x in flatten(params).items()}
        total, covered = 0.0, set()
        for key, (a, g, wb, f, cols) in _blocks(kfac, delta, model.config.hidden_size).items():
            total += sum(wb[layer].reshape(-1) @ np.kron(a[layer], g[layer]) @ wb[layer].reshape(-1) for layer in range(wb.shape[0]))
            covered |= {f.kernel, f.bias}
        if diag is not None:
            total += sum(float((np.asarray(flatten(diag)[p], np.float64) * delta[p] ** 2).sum()) for p in set(delta) - covered)
        np.testing.assert_allclose(float(penalty(params)), 0.5 * lam * total, rtol=1e-4)
    with pytest.raises(ConfigError, match="needs params"):
        ewc_kfac_regulariser(anchor, kfac, lam, layout=model.layout).update(params, optax.EmptyState())


def test_refresh_on_schedule_as_a_moving_average(small):
    """``refresh_every=2``: the factors change at steps 2 and 4 only, to ``decay · old + (1 − decay)
    · K-FAC of that step's batch at that step's params``, and the eigendecomposition the update is
    preconditioned in is recomputed from them; a batch without tokens leaves them as they were."""
    model, kfac = small
    decay, lam = 0.6, 1e-2
    tx = scale_by_kfac(kfac, lam, model=model, refresh_every=2, decay=decay)
    update = jax.jit(tx.update)
    state = tx.init(model.params)
    assert isinstance(state, ScaleByKFACState)
    g = _random_tree(model.params, 6)
    moved = jax.tree.map(lambda p, n: p + 0.01 * n, model.params, _random_tree(model.params, 7))
    expected = {k: (np.asarray(f.inputs), np.asarray(f.outputs)) for k, f in kfac.factors.items()}
    for step, params in enumerate([model.params, model.params, moved, moved], start=1):
        batch = _batch(step)
        out, state = update(g, state, params, batch=batch)
        if step % 2 == 0:
            fresh = kfac_factors(model, params, [batch])
            expected = {k: (decay * a + (1 - decay) * np.asarray(fresh.factors[k].inputs), decay * gg + (1 - decay) * np.asarray(fresh.factors[k].outputs))
                        for k, (a, gg) in expected.items()}
        for k, (a, gg) in expected.items():
            np.testing.assert_allclose(state.factors[k][0], a, rtol=1e-5, atol=1e-7 * np.abs(a).max(), err_msg=f"step {step} {k}")
            np.testing.assert_allclose(state.factors[k][1], gg, rtol=1e-5, atol=1e-7 * np.abs(gg).max(), err_msg=f"step {step} {k}")
            e = state.eigen.factors[k]
            rebuilt = np.einsum("lij,lj,lkj->lik", e.input_vectors, e.input_values, e.input_vectors)
            np.testing.assert_allclose(rebuilt, a, atol=1e-5 * np.abs(a).max(), err_msg=f"step {step} {k}")
        current = type(kfac)({k: type(f)(jnp.asarray(expected[k][0]), jnp.asarray(expected[k][1]), f.kernel, f.bias, f.block)
                              for k, f in kfac.factors.items()}, kfac.n_samples, kfac.n_tokens)
        reference = flatten(kfac_inverse_product(decompose(current), model.layout, g, lam))
        for p, x in flatten(out).items():
            np.testing.assert_allclose(x, reference[p], rtol=2e-3, atol=1e-4 * np.abs(reference[p]).max(), err_msg=f"step {step} {p}")
    empty = Batch(*(np.zeros_like(x) for x in _batch(5)[:3]), np.full(4, -1))
    before = state.factors
    _, state = update(g, state, moved, batch=_batch(5))  # step 5: no refresh
    _, state = update(g, state, moved, batch=empty)  # step 6: a refresh with no token
    for k, (a, gg) in before.items():
        np.testing.assert_array_equal(state.factors[k][0], a)
    with pytest.raises(ConfigError, match="batch="):
        tx.update(g, state, model.params)
    with pytest.raises(ConfigError, match="model="):
        scale_by_kfac(kfac, lam, refresh_every=2)
