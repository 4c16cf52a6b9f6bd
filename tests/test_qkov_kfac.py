"""QK-OV ``variant="kfac"`` against an independent float64 numpy evaluation: every slice's
``M_ij = s_j · g_iᵀ (A ⊗ G + λI)⁻¹ g_j`` by a dense ``numpy.linalg.solve`` of ``np.kron(A, G) + λI``,
the slice cut out of the raw stored gradients with its own index arithmetic (GPT-2's [Q|K|V]
columns, separate q/k/v projections, GQA's kv heads, the bias as the last input row), on tiny
GPT-2 (fused QKV, biases), Llama (GQA, head_dim ≠ hidden/heads, no biases) and Qwen2-like (Llama
with one kv head and q/k/v biases) models with random SPD, ill-conditioned or singular factors;
the identity ``A = G = I``; sum vs mean; ``normalize_gj``; tiling; diagnostics; the refusals."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import padded_batch, tiny_config

from fisherjax import Model
from fisherjax.analysis import qkov
from fisherjax.curvature.factors import HeadFactors
from fisherjax.data import IGNORE, Batch
from fisherjax.errors import ConfigError, DataError
from fisherjax.fisher.state import SampleGrads
from fisherjax.grads import per_sample_grads
from fisherjax.report import qkov as report_qkov

N_A, N_B = 5, 4
MODELS = {  # tiny_config(family, **changes) of each model the tests use
    "gpt2": ("gpt2", {}),
    "llama": ("llama", dict(head_dim=12)),  # 4 heads reading 2 kv heads, no biases
    "qwen2": ("llama", dict(num_kv_heads=1, qkv_bias=True)),  # one kv head, q/k/v biases
}
BLOCKS = ("q", "k", "v", "o")
# The raw stored paths: (q/k/v kernel, q/k/v bias or None, o kernel), fused for GPT-2.
GPT2 = ("layers/attn/c_attn/kernel", "layers/attn/c_attn/bias", "layers/attn/c_proj/kernel")
PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}


def raw_names(kind: str, block: str) -> tuple[str, str | None]:
    """(kernel path, bias path or None) of a block among the stored gradients."""
    if kind == "gpt2":
        return (GPT2[2], None) if block == "o" else (GPT2[0], GPT2[1])
    bias = f"layers/self_attn/{PROJ[block]}/bias" if MODELS[kind][1].get("qkv_bias") and block != "o" else None
    return f"layers/self_attn/{PROJ[block]}/kernel", bias


def columns(kind: str, block: str, owner: int, H: int, Hkv: int, hd: int) -> np.ndarray:
    """Output columns of head ``owner`` (a query head for q, a kv head for k/v) of a q/k/v block."""
    e = np.arange(hd)
    if kind == "gpt2":  # [Q | K | V], each head-major
        return {"q": 0, "k": H * hd, "v": H * hd + Hkv * hd}[block] + owner * hd + e
    return owner * hd + e


def slice_matrix(store, kind, block, layer, owner, dims, with_bias) -> np.ndarray:
    """``[n, R, C]`` float64 per-sample slice: q/k/v ``W[:, cols]`` (+ the bias as the last row),
    o the rows ``W_O[owner·hd : (owner+1)·hd, :]``."""
    H, Hkv, hd = dims
    kernel, bias = raw_names(kind, block)
    W = np.asarray(store[kernel], np.float64)[:, layer]
    if block == "o":
        return W[:, owner * hd + np.arange(hd), :]
    cols = columns(kind, block, owner, H, Hkv, hd)
    g = W[:, :, cols]
    if with_bias and bias is not None:
        g = np.concatenate([g, np.asarray(store[bias], np.float64)[:, layer][:, None, cols]], axis=1)
    return g


def partner_factor(B, normalize_gj):
    tokens = np.asarray(B.tokens, np.float64)
    return {"none": np.ones_like(tokens), "per_token_mean": 1.0 / tokens,
            "per_token_sum": np.full_like(tokens, 1.0 / tokens.sum())}[normalize_gj]


def reference(A, B, factors, kind, layout, *, aggregate="mean", normalize_gj="none", include_bias=True,
              ridge_lambda=1e-8, ridge_lambda_rel=1e-6, eps=1e-10) -> np.ndarray:
    """Brute force ``[block, layer, n_a, n_b, query head]``: per slice a dense float64 solve of
    ``(kron(A, G) + λI) x = vec(g_j)`` with ``λ = max(λ_min, λ_rel · mean(diag kron(A, G)), ε)``."""
    H, Hkv, hd = dims = layout.num_heads, layout.num_kv_heads, layout.head_dim
    has_bias = raw_names(kind, "q")[1] is not None and include_bias
    s = partner_factor(B, normalize_gj)
    out = np.zeros((4, layout.num_layers, len(A), len(B), H))
    for b, block in enumerate(BLOCKS):
        f = factors[block]
        inputs, outputs = np.asarray(f.inputs, np.float64), np.asarray(f.outputs, np.float64)
        owners = Hkv if block in ("k", "v") else H
        for layer in range(layout.num_layers):
            for owner in range(owners):
                if block == "o":
                    a_f, g_f = inputs[layer, owner], outputs[layer]
                else:
                    a_f, g_f = inputs[layer], outputs[layer, owner]
                    if f.has_bias and not has_bias:
                        a_f = a_f[:-1, :-1]
                F = np.kron(a_f, g_f)
                lam = max(ridge_lambda, ridge_lambda_rel * np.mean(np.diag(F)), eps)
                ga = slice_matrix(A.grads, kind, block, layer, owner, dims, has_bias).reshape(len(A), -1)
                gb = slice_matrix(B.grads, kind, block, layer, owner, dims, has_bias).reshape(len(B), -1)
                M = ga @ np.linalg.solve(F + lam * np.eye(len(F)), (s[:, None] * gb).T)
                if aggregate == "mean":
                    M = M / F.shape[0]
                heads = np.flatnonzero(np.arange(H) // (H // Hkv) == owner) if block in ("k", "v") else [owner]
                out[b, layer][..., heads] = M[..., None]
    return out


def relative_error(actual, expected) -> float:
    """``max |actual − expected| / max |expected|`` per block, the worst block."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected)
    return max(float(np.abs(actual[b] - expected[b]).max() / np.abs(expected[b]).max()) for b in range(len(expected)))


def spd(rng, shape, k, scale=True) -> np.ndarray:
    """Random SPD ``[*shape, k, k]`` float32 with eigenvalues in ``[0.5, 2] · c`` (``c`` random per
    matrix in ``[0.1, 10]``, so ridges differ per slice)."""
    q, _ = np.linalg.qr(rng.normal(size=shape + (k, k)))
    s = rng.uniform(0.5, 2.0, size=shape + (k,))
    if scale:
        s = s * 10.0 ** rng.uniform(-1, 1, size=shape + (1,))
    return ((q * s[..., None, :]) @ np.swapaxes(q, -1, -2)).astype(np.float32)


def low_rank(rng, shape, k) -> np.ndarray:
    """Singular PSD ``[*shape, k, k]`` float32: ``X Xᵀ / r`` of ``r = max(2, k // 3)`` random vectors."""
    rank = max(2, k // 3)
    x = rng.normal(size=shape + (k, rank))
    return (x @ np.swapaxes(x, -1, -2) / rank).astype(np.float32)


def seven_decades(rng, shape, k) -> np.ndarray:
    """SPD ``[*shape, k, k]`` float32 with eigenvalues ``logspace(-6, 1)``: condition number 1e7."""
    q, _ = np.linalg.qr(rng.normal(size=shape + (k, k)))
    s = np.logspace(-6, 1, k) * np.ones(shape + (1,))
    return ((q * s[..., None, :]) @ np.swapaxes(q, -1, -2)).astype(np.float32)


def make_factors(layout, seed=0, bias=True, make=spd) -> dict[str, HeadFactors]:
    """``{block: HeadFactors}`` of the layout's shapes (a bias coordinate on q/k/v when ``bias``)."""
    rng = np.random.default_rng(seed)
    L, H, hd = layout.num_layers, layout.num_heads, layout.head_dim
    out = {}
    for block in BLOCKS:
        kernel = layout.spec(layout.block_sources(block, "kernel")[0])
        if block == "o":
            out[block] = HeadFactors(make(rng, (L, H), hd), make(rng, (L,), kernel.shape[-1]), block="o")
        else:
            d = kernel.shape[-2] + bias
            out[block] = HeadFactors(make(rng, (L,), d), make(rng, (L, layout.heads_of(block)), hd), block=block, has_bias=bias)
    return out


def identity_factors(layout, bias) -> dict[str, HeadFactors]:
    L, H, hd = layout.num_layers, layout.num_heads, layout.head_dim
    out = {}
    for block in BLOCKS:
        kernel = layout.spec(layout.block_sources(block, "kernel")[0])
        if block == "o":
            out[block] = HeadFactors(np.broadcast_to(np.eye(hd, dtype=np.float32), (L, H, hd, hd)),
                                     np.broadcast_to(np.eye(kernel.shape[-1], dtype=np.float32), (L,) + (kernel.shape[-1],) * 2), block="o")
        else:
            d = kernel.shape[-2] + bias
            out[block] = HeadFactors(np.broadcast_to(np.eye(d, dtype=np.float32), (L, d, d)),
                                     np.broadcast_to(np.eye(hd, dtype=np.float32), (L, layout.heads_of(block), hd, hd)),
                                     block=block, has_bias=bias)
    return out


@pytest.fixture(scope="module")
def family():
    """``family(kind) -> (layout, A, B)`` with real per-sample gradients of the attention
    parameters of a randomly initialised tiny model (``fisherjax.grads.per_sample_grads``), built once."""
    cache = {}

    def make(kind):
        if kind not in cache:
            name, changes = MODELS[kind]
            model = Model.init(tiny_config(name, **changes), seed=1)
            rng = np.random.default_rng(1)
            n, seq = N_A + N_B, 8
            ids, mask = padded_batch(rng, list(rng.integers(3, seq + 1, size=n)), seq, "right")
            batch = Batch(ids, mask, np.where(mask == 1, ids, IGNORE).astype(np.int32), np.arange(100, 100 + n))
            layout = model.layout
            paths = sorted({p for b, k in layout.attention_blocks() for p in layout.block_sources(b, k)})
            ps = per_sample_grads(model, model.params, batch, paths=paths)
            c = SampleGrads.from_grads({p: np.asarray(v) for p, v in ps.grads.items()}, np.asarray(ps.tokens), batch.sample_ids)
            cache[kind] = (layout, c.select(np.arange(N_A)), c.select(np.arange(N_A, n)))
        return cache[kind]

    return make


# ---------------------------------------------------------------------------------------------
# Against the dense solve
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, opts, bias",
    [
        ("gpt2", dict(), True),
        ("llama", dict(), False),
        # One kv head and biases on separate q/k/v projections; slow only to keep the default run short.
        pytest.param("qwen2", dict(normalize_gj="per_token_mean", ridge_lambda_rel=0.3), True, marks=pytest.mark.slow),
        # factors with a bias coordinate on slices without one: A restricted to the kernel rows
        ("gpt2", dict(include_bias=False, aggregate="sum", normalize_gj="per_token_sum"), True),
        ("llama", dict(ridge_lambda=0.5, ridge_lambda_rel=0.0), True),
    ],
)
def test_matches_dense_solve(family, kind, opts, bias):
    layout, A, B = family(kind)
    factors = make_factors(layout, bias=bias)
    result = qkov.heatmap(A, B, layout, variant="kfac", kfac=factors, **opts)
    expected = reference(A, B, factors, kind, layout, **opts)
    assert result.scores.shape == expected.shape == (4, layout.num_layers, N_A, N_B, layout.num_heads)
    assert relative_error(result.scores, expected) <= 1e-4
    np.testing.assert_allclose(result.layer_head_avg, np.asarray(result.scores).mean(axis=(2, 3)), rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(result.kv_head_of, np.arange(layout.num_heads) // (layout.num_heads // layout.num_kv_heads))
    np.testing.assert_array_equal(result.sample_ids_b, np.arange(100 + N_A, 100 + N_A + N_B))
    assert (np.asarray(result.scores) < 0).any()  # a signed score


@pytest.mark.parametrize(
    "kind, make, opts",
    [
        # Rank-deficient factors (X Xᵀ of fewer vectors than rows; eigenvalues clipped at 0, so the
        # float32 rounding of the zero ones must stay below the ridge).
        ("llama", low_rank, dict(ridge_lambda_rel=1e-2)),
        # Ill-conditioned factors at the default ridge: a float32 eigh is off by 5-9 % here (the
        # eigendecomposition is float64).
        ("gpt2", seven_decades, dict()),
    ],
)
def test_ill_conditioned_factors(family, kind, make, opts):
    layout, A, B = family(kind)
    factors = make_factors(layout, seed=3, bias=kind == "gpt2", make=make)
    result = qkov.heatmap(A, B, layout, variant="kfac", kfac=factors, **opts)
    assert relative_error(result.scores, reference(A, B, factors, kind, layout, **opts)) <= 1e-4
    if make is low_rank:
        assert (np.asarray(result.diagnostics.share_below_eps) > 0).all()  # singular blocks: zero eigenvalues


def test_shared_factors_and_tiles(family):
    """q/k/v of GPT-2's fused site sharing one ``A`` (one jax array, as a fused site's factors do)
    match the dense solve; a budget small enough for several layer, A and B tiles (here 2 × 3 × 2)
    gives the one-tile scores."""
    layout, A, B = family("gpt2")
    factors = make_factors(layout, seed=1)
    shared = jax.numpy.asarray(factors["q"].inputs)
    factors = {b: HeadFactors(shared, jax.numpy.asarray(f.outputs), block=b, has_bias=True) if b != "o" else f
               for b, f in factors.items()}
    whole = qkov.heatmap(A, B, layout, variant="kfac", kfac=factors).scores
    assert relative_error(whole, reference(A, B, factors, "gpt2", layout)) <= 1e-4
    tiled = qkov.heatmap(A, B, layout, variant="kfac", kfac=factors, memory_budget_bytes=4e5).scores
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-6 * np.abs(whole).max())


# ---------------------------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_identity_factors_give_the_signed_dot_product(family, kind):
    """``A = I, G = I``: ``M_ij = g_i · g_j / (1 + λ) / D`` with ``λ = max(1e-8, 1e-6 · 1, 1e-10)``."""
    layout, A, B = family(kind)
    has_bias = kind == "gpt2"
    result = qkov.heatmap(A, B, layout, variant="kfac", kfac=identity_factors(layout, has_bias))
    H, Hkv, hd = dims = layout.num_heads, layout.num_kv_heads, layout.head_dim
    expected = np.zeros(np.shape(result.scores))
    for b, block in enumerate(BLOCKS):
        for layer in range(layout.num_layers):
            for h in range(H):
                owner = h // (H // Hkv) if block in ("k", "v") else h
                ga = slice_matrix(A.grads, kind, block, layer, owner, dims, has_bias).reshape(N_A, -1)
                gb = slice_matrix(B.grads, kind, block, layer, owner, dims, has_bias).reshape(N_B, -1)
                expected[b, layer, ..., h] = ga @ gb.T / (1 + 1e-6) / ga.shape[1]
    assert relative_error(result.scores, expected) <= 1e-5
    np.testing.assert_allclose(result.diagnostics.ridge, 1e-6, rtol=1e-6)
    np.testing.assert_allclose(result.diagnostics.fisher_min, 1.0, rtol=1e-5)
    np.testing.assert_allclose(result.diagnostics.fisher_max, 1.0, rtol=1e-5)


def test_sum_is_mean_times_slice_size_and_normalize_gj(family):
    layout, A, B = family("gpt2")
    factors = make_factors(layout, seed=2)
    mean = qkov.heatmap(A, B, layout, variant="kfac", kfac=factors)
    total = qkov.heatmap(A, B, layout, variant="kfac", kfac=factors, aggregate="sum")
    d_in, hd, d_out = 32, layout.head_dim, 32
    np.testing.assert_array_equal(mean.slice_sizes, [(d_in + 1) * hd] * 3 + [hd * d_out])
    np.testing.assert_allclose(total.scores, np.asarray(mean.scores) * mean.slice_sizes[:, None, None, None, None], rtol=1e-6)
    per_token = qkov.heatmap(A, B, layout, variant="kfac", kfac=factors, normalize_gj="per_token_mean")
    np.testing.assert_allclose(per_token.scores, np.asarray(mean.scores) / np.asarray(B.tokens)[None, None, None, :, None], rtol=1e-6)


def test_diagnostics_are_the_blocks_spectrum(family):
    """``ridge`` is ``max(λ_min, λ_rel · mean(diag A) · mean(diag G), ε)`` and min / max the
    extreme eigenvalues of ``A ⊗ G`` (numpy's ``eigvalsh``, float64), K/V per query head."""
    layout, A, B = family("llama")
    factors = make_factors(layout, seed=4, bias=False)
    result = qkov.heatmap(A, B, layout, variant="kfac", kfac=factors, ridge_lambda_rel=0.01)
    H, Hkv = layout.num_heads, layout.num_kv_heads
    d = result.diagnostics
    for b, block in enumerate(BLOCKS):
        inputs, outputs = np.asarray(factors[block].inputs, np.float64), np.asarray(factors[block].outputs, np.float64)
        for layer in range(layout.num_layers):
            for h in range(H):
                owner = h // (H // Hkv) if block in ("k", "v") else h
                a_f, g_f = (inputs[layer, owner], outputs[layer]) if block == "o" else (inputs[layer], outputs[layer, owner])
                eig = np.outer(np.linalg.eigvalsh(a_f), np.linalg.eigvalsh(g_f))
                np.testing.assert_allclose(d.ridge[b, layer, h], 0.01 * np.mean(np.diag(a_f)) * np.mean(np.diag(g_f)), rtol=1e-5)
                np.testing.assert_allclose([d.fisher_min[b, layer, h], d.fisher_median[b, layer, h], d.fisher_max[b, layer, h]],
                                           [eig.min(), np.median(eig), eig.max()], rtol=1e-4)
                assert d.share_below_eps[b, layer, h] == 0


def test_sample_pair_and_downstream(family):
    """sample_pair gives the heatmap's entry; top_conflicts ranks the most negative first; the
    report's summary, npz arrays and the pytree work on the result as on any other variant."""
    layout, A, B = family("llama")
    factors = make_factors(layout, seed=5, bias=False)
    result = qkov.heatmap(A, B, layout, variant="kfac", kfac=factors)
    pair = qkov.sample_pair(A, B, layout, int(A.sample_ids[2]), int(B.sample_ids[1]), 1, 3, variant="kfac", kfac=factors)
    for b, block in enumerate(BLOCKS):
        np.testing.assert_allclose(pair[block], result.scores[b, 1, 2, 1, 3], rtol=1e-5, atol=1e-7 * np.abs(result.scores[b]).max())
    top = qkov.top_conflicts(result, 3)
    assert top[0]["score"] == pytest.approx(float(np.min(result.scores)))
    summary = report_qkov.summary(result, top_k=3)
    assert summary["options"]["variant"] == "kfac"
    assert set(qkov.to_arrays(result)) >= {"scores", "ridge", "fisher_median"}
    doubled = jax.tree.map(lambda x: 2 * np.asarray(x), result)
    np.testing.assert_allclose(doubled.scores, 2 * np.asarray(result.scores))


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


def test_refusals(family):
    layout, A, B = family("gpt2")
    factors = make_factors(layout)
    with pytest.raises(ConfigError, match="kfac="):
        qkov.heatmap(A, B, layout, variant="kfac")
    with pytest.raises(ConfigError, match="kfac="):
        qkov.heatmap(A, B, layout, variant="signed", kfac=factors)
    with pytest.raises(ConfigError, match="kfac="):
        qkov.sample_pair(A, B, layout, 100, 105, 0, 0, variant="kfac")
    with pytest.raises(ConfigError, match="fisher_pool"):
        qkov.heatmap(A, B, layout, variant="kfac", kfac=factors, fisher_pool="pooled")
    # a one-device mesh is the single-device path's numbers (four devices: tests/test_sharded_analysis.py)
    one = qkov.heatmap(A, B, layout, variant="kfac", kfac=factors, mesh=jax.make_mesh((1,), ("data",)))
    np.testing.assert_allclose(one.scores, qkov.heatmap(A, B, layout, variant="kfac", kfac=factors).scores, rtol=1e-6, atol=1e-12)
    with pytest.raises(ConfigError, match=r"kfac=.*\['o'\]"):
        qkov.heatmap(A, B, layout, variant="kfac", kfac={b: f for b, f in factors.items() if b != "o"})
    q = factors["q"]
    wrong = {
        "heads": HeadFactors(q.inputs, q.outputs[:, :2], block="q", has_bias=True),
        "input size": HeadFactors(q.inputs[:, :-1, :-1], q.outputs, block="q", has_bias=True),
        "label": HeadFactors(q.inputs, q.outputs, block="k", has_bias=True),
    }
    for name, bad in wrong.items():
        with pytest.raises(ConfigError, match="kfac="):
            qkov.heatmap(A, B, layout, variant="kfac", kfac={**factors, "q": bad})
    with pytest.raises(ConfigError, match="kfac="):
        qkov.heatmap(A, B, layout, variant="kfac", kfac={**factors, "q": (q.inputs, q.outputs)})
    # Factors without a bias coordinate on slices that hold the model's q/k/v biases.
    no_bias = make_factors(layout, bias=False)
    with pytest.raises(ConfigError, match="bias"):
        qkov.heatmap(A, B, layout, variant="kfac", kfac=no_bias)
    kept = qkov.heatmap(A, B, layout, variant="kfac", kfac=no_bias, include_bias=False)
    assert relative_error(kept.scores, reference(A, B, no_bias, "gpt2", layout, include_bias=False)) <= 1e-4
    # A task without the signed gradients of a slice.
    partial = SampleGrads.from_grads({p: g for p, g in B.grads.items() if p != GPT2[2]}, B.tokens, B.sample_ids)
    with pytest.raises(DataError, match="grads"):
        qkov.heatmap(A, partial, layout, variant="kfac", kfac=factors)


def test_the_report_says_where_the_damping_is_far_below_the_spectrum(family):
    """Factors spanning seven decades at the default ridge (``λ = 1e-6 · mean(diag A) · mean(diag
    G)``, the largest eigenvalue 100): every slice is below ``LOW_DAMPING``, and the pair's report
    lines say so, with the count and the smallest ratio; identity factors with ``ridge_lambda_rel =
    1e-3`` (``λ`` = 1e-3 of the largest eigenvalue) get no such line."""
    layout, A, B = family("llama")
    factors = make_factors(layout, seed=6, bias=False, make=seven_decades)
    steep = report_qkov.summary(qkov.heatmap(A, B, layout, variant="kfac", kfac=factors))
    slices = sum(np.size(b["diagnostics"]["ridge"]) for b in steep["blocks"].values())
    smallest = min(float(np.min(np.divide(b["diagnostics"]["ridge"], b["diagnostics"]["fisher_max"]))) for b in steep["blocks"].values())
    line = report_qkov.low_damping("A", steep)
    assert smallest < 1e-6 and line is not None
    assert line.startswith(f"In {slices} of {slices} (block, layer, head) slices") and f"(down to {smallest:.0e})" in line, line
    assert line in report_qkov.markdown("A", "B", steep)
    flat = report_qkov.summary(qkov.heatmap(A, B, layout, variant="kfac", kfac=identity_factors(layout, False), ridge_lambda_rel=1e-3))
    assert report_qkov.low_damping("A", flat) is None
    assert not any("damping" in text for text in report_qkov.markdown("A", "B", flat))


@pytest.mark.parametrize("variant", qkov.SIGNED_VARIANTS)
def test_gradients_kept_below_float32_are_warned_about(family, variant):
    """In every signed variant (``qkov.SIGNED_VARIANTS``, which ``analyze`` stores in float32 by
    default: a new one is tested here too) a task whose kept gradients are bfloat16 gets a warning
    naming it (their rounding can decide the scores of slices damped far below the spectrum; the
    signed terms cancel and magnify it); float32 ones none, and the unsigned variant none."""
    import warnings

    import ml_dtypes

    layout, A, B = family("llama")
    opts = {"kfac": make_factors(layout, seed=7, bias=False)} if variant == "kfac" else {"min_fisher_samples": 1}
    rounded = SampleGrads.from_grads(B.grads, B.tokens, B.sample_ids, dtype=ml_dtypes.bfloat16)
    with pytest.warns(UserWarning, match=rf"qkov {variant}: task 'B' keeps its gradients in bfloat16"):
        qkov.heatmap(A, rounded, layout, variant=variant, **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qkov.heatmap(A, B, layout, variant=variant, **opts)
        qkov.heatmap(A, rounded, layout, variant="unsigned", min_fisher_samples=1)
