"""Phase 6 (QK-OV interference) against a brute-force float64 numpy evaluation of the original
system's formulas that slices the raw parameter arrays with its own index arithmetic (GPT-2's
[Q|K|V] columns, NeoX's per-head interleave, GQA's kv head h // (H/H_kv)), plus the invariants of
the score on real models: head additivity, scale, ablations, symmetry, ridge robustness; the
statistics; results as pytrees; and kernels that trace and compile once."""

from __future__ import annotations

import dataclasses
import json

import chex
import jax
import numpy as np
import pytest

from conftest import FAMILIES, compilations, padded_batch

import fisherjax
from fisherjax.analysis import qkov
from fisherjax.analysis.qkov import _batched, _looped, _operands, _prepare, _scores, _tiles
from fisherjax.report import qkov as report_qkov
from fisherjax.data import IGNORE, Batch
from fisherjax.errors import ConfigError, DataError, NumericalError
from fisherjax.fisher.state import SampleGrads
from fisherjax.grads import per_sample_grads
from fisherjax.layout import ModelLayout, flatten, unflatten

N_A, N_B = 6, 4
MIN = dict(min_fisher_samples=3)
# Every way of evaluating a slice's contraction, each cut into several pieces (the default piece
# size would hold these tiny models' whole slices), looped both on one thread and as concurrent
# (block, layer range) computations: the scores may differ only by rounding. 1000 floats: pieces
# of 2-4 stacked q/k/v rows and 4 o rows; 64: one row each. The Pallas kernel runs in interpret
# mode here, with its samples padded to 16 and rows cut into 2 programs (split-K) of 4- or
# 8-float tiles (head_dim 8 and 12, hidden 32).
COMPUTE_IDS = {
    "batched-split4": dict(contraction="batched", split_k=4),
    "looped-pieces": dict(contraction="looped", piece_floats=1000, workers=1),
    "looped-concurrent": dict(contraction="looped", piece_floats=64, workers=3),
    "pallas-split2": dict(contraction="pallas", split_k=2),
}
COMPUTE = list(COMPUTE_IDS.values())

# Raw parameter names per family: q/k/v kernel (fused or not), q/k/v bias (None: no bias), o kernel.
_GPT2 = ("layers/attn/c_attn/kernel", "layers/attn/c_attn/bias", "layers/attn/c_proj/kernel")
_NEOX = ("layers/attention/query_key_value/kernel", "layers/attention/query_key_value/bias", "layers/attention/dense/kernel")


def _raw_names(kind: str, block: str) -> tuple[str, str | None]:
    """(kernel path, bias path or None) of a block in the raw parameters."""
    if kind == "gpt2":
        return (_GPT2[2], None) if block == "o" else (_GPT2[0], _GPT2[1])
    if kind == "gpt_neox":
        return (_NEOX[2], None) if block == "o" else (_NEOX[0], _NEOX[1])
    name = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}[block]
    bias = f"layers/self_attn/{name}/bias" if kind == "qwen2" and block != "o" else None
    return f"layers/self_attn/{name}/kernel", bias


def _columns(kind: str, block: str, heads, H: int, Hkv: int, hd: int) -> np.ndarray:
    """Output columns of the raw q/k/v (or fused) parameter for the given *query* heads."""
    heads = np.atleast_1d(heads)
    kv_of = heads // (H // Hkv)
    e = np.arange(hd)
    if kind == "gpt2":  # [Q | K | V], each head-major
        offset = {"q": 0, "k": H * hd, "v": H * hd + Hkv * hd}[block]
        owner = heads if block == "q" else kv_of
        return np.concatenate([offset + g * hd + e for g in owner])
    if kind == "gpt_neox":  # [head, (q, k, v), head_dim]
        return np.concatenate([h * 3 * hd + "qkv".index(block) * hd + e for h in heads])
    owner = heads if block == "q" else kv_of
    return np.concatenate([g * hd + e for g in owner])


def _block_columns(kind: str, block: str, H: int, Hkv: int, hd: int) -> np.ndarray:
    """All output columns of a q/k/v block (each kv head once)."""
    if kind == "gpt_neox":
        return _columns(kind, block, np.arange(H), H, Hkv, hd)
    heads = np.arange(H) if block == "q" else np.arange(Hkv) * (H // Hkv)
    return _columns(kind, block, heads, H, Hkv, hd)


def _raw_slice(store, kind, block, layer, h, dims, include_bias=True, whole=False) -> np.ndarray:
    """``[n, S]`` per-sample values of one head's slice (or the whole block) at one layer."""
    H, Hkv, hd = dims
    kernel, bias = _raw_names(kind, block)
    W = np.asarray(store[kernel], np.float64)[:, layer]
    n = W.shape[0]
    if block == "o":
        rows = np.arange(W.shape[1]) if whole else h * hd + np.arange(hd)
        return W[:, rows, :].reshape(n, -1)
    cols = _block_columns(kind, block, H, Hkv, hd) if whole else _columns(kind, block, h, H, Hkv, hd)
    parts = [W[:, :, cols].reshape(n, -1)]
    if include_bias and bias is not None:
        parts.append(np.asarray(store[bias], np.float64)[:, layer][:, cols])
    return np.concatenate(parts, axis=1)


def _reference(A, B, kind, dims, layers, *, variant="unsigned", aggregate="mean", normalize_gj="none",
               fisher_pool="A", ridge_lambda=1e-8, ridge_lambda_rel=1e-6, eps=1e-10, include_bias=True,
               whole=False) -> np.ndarray:
    """Brute force ``[block, layer, n_a, n_b, head]`` (``whole``: one unsliced block per layer, head axis 1)
    of the original system's formulas: ``g_j`` normalised first (``s_j g_j`` with ``s_j`` = 1, ``1/T_j``
    or ``1/Σ_B T``), ``C_j = (s_j g_j)² / T_j``; ``Î`` of A, of B, ``(Î_A + Î_B)/2`` (pooled) or the
    mean over both tasks' samples (pooled_by_count); ``λ = max(λ_min, λ_rel·median(Î), ε)``."""
    H = dims[0]
    heads = 1 if whole else H
    tokens_b = np.asarray(B.tokens, np.float64)
    s = {"none": np.ones_like(tokens_b), "per_token_mean": 1.0 / tokens_b,
         "per_token_sum": np.full_like(tokens_b, 1.0 / tokens_b.sum())}[normalize_gj][:, None]
    out = np.zeros((4, layers, len(A), len(B), heads))
    for b, block in enumerate("qkvo"):
        for layer in range(layers):
            for h in range(heads):
                def cut(store):
                    return _raw_slice(store, kind, block, layer, h, dims, include_bias, whole)

                Ca, Cb = cut(A.contributions), cut(B.contributions)
                pool = {"A": Ca.mean(0), "B": Cb.mean(0), "pooled": (Ca.mean(0) + Cb.mean(0)) / 2,
                        "pooled_by_count": np.concatenate([Ca, Cb]).mean(0)}
                F = pool[fisher_pool]
                lam = max(ridge_lambda, ridge_lambda_rel * np.median(F), eps)
                gb = s * cut(B.grads)  # the seed normalises g_j before every variant
                cb = gb**2 / tokens_b[:, None]
                if variant == "unsigned":
                    M = (Ca / (F + lam)) @ np.abs(gb).T
                elif variant == "natural":
                    M = (Ca / (F + lam)) @ (np.abs(gb) / np.sqrt(F + lam)).T
                elif variant == "signed":
                    M = (cut(A.grads) / (F + lam)) @ gb.T
                else:
                    M = (np.sqrt(Ca) / (F + lam)) @ np.sqrt(cb).T
                if aggregate == "mean":
                    M = M / Ca.shape[1]
                out[b, layer, :, :, h] = M
    return out


def _close(actual, expected, rtol=2e-4):
    expected = np.asarray(expected)
    atol = 1e-6 * max(float(np.abs(expected).max()), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def _attention_paths(layout):
    return sorted({p for b, k in layout.attention_blocks() for p in layout.block_sources(b, k)})


def _batch(n=N_A + N_B, seq=8, seed=0):
    rng = np.random.default_rng(seed)
    ids, mask = padded_batch(rng, list(rng.integers(3, seq + 1, size=n)), seq, "right")
    labels = np.where(mask == 1, ids, IGNORE).astype(np.int32)
    return Batch(ids, mask, labels, np.arange(100, 100 + n))


def _contributions(model, params, batch) -> SampleGrads:
    ps = per_sample_grads(model, params, batch, paths=_attention_paths(model.layout))
    grads = {p: np.asarray(v) for p, v in ps.grads.items()}
    return SampleGrads.from_grads(grads, np.asarray(ps.tokens), batch.sample_ids)


def _split(c: SampleGrads):
    return c.select(np.arange(N_A)), c.select(np.arange(N_A, len(c)))


def _dims(layout):
    return layout.num_heads, layout.num_kv_heads, layout.head_dim


@pytest.fixture(scope="module")
def family(hf_checkpoint):
    """``family(kind) -> (model, batch, A, B)`` with real per-sample gradients, built once."""
    cache = {}

    def make(kind):
        if kind not in cache:
            directory, _ = hf_checkpoint(kind)
            model = fisherjax.load_pretrained(directory)
            batch = _batch()
            cache[kind] = (model, batch, *_split(_contributions(model, model.params, batch)))
        return cache[kind]

    return make


# ---------------------------------------------------------------------------------------------
# Brute force, every family
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind",
    # Mistral shares Llama's layout (separate q/k/v, GQA, no bias): slow only to keep the default run short.
    [pytest.param(k, marks=pytest.mark.slow) if k == "mistral" else k for k in FAMILIES],
)
@pytest.mark.parametrize("compute", COMPUTE, ids=list(COMPUTE_IDS))
def test_heatmap_matches_bruteforce(family, kind, compute):
    model, _, A, B = family(kind)
    layout = model.layout
    H, Hkv, _ = dims = _dims(layout)
    result = qkov.heatmap(A, B, layout, **MIN, **compute)
    chex.assert_shape(result.scores, (4, layout.num_layers, N_A, N_B, H))
    _close(result.scores, _reference(A, B, kind, dims, layout.num_layers))
    _close(result.layer_head_avg, result.scores.mean(axis=(2, 3)))
    np.testing.assert_array_equal(result.kv_head_of, np.arange(H) // (H // Hkv))
    np.testing.assert_array_equal(result.sample_ids_a, np.arange(100, 100 + N_A))
    np.testing.assert_array_equal(result.sample_ids_b, np.arange(100 + N_A, 100 + N_A + N_B))
    chex.assert_tree_all_finite(result.scores)


@pytest.mark.parametrize(
    "kind, opts",
    [
        ("llama", dict(variant="signed")),
        ("llama", dict(variant="symmetric", fisher_pool="pooled")),
        ("llama", dict(variant="natural", normalize_gj="per_token_mean")),
        ("qwen2", dict(variant="unsigned", aggregate="sum", fisher_pool="B")),
        ("qwen2", dict(variant="signed", normalize_gj="per_token_mean", ridge_lambda_rel=0.5)),
        ("qwen2", dict(variant="unsigned", include_bias=False, normalize_gj="per_token_sum")),
        ("gpt_neox", dict(variant="natural", fisher_pool="pooled", ridge_lambda=1e-4, ridge_lambda_rel=0.0)),
        ("gpt2", dict(variant="symmetric", aggregate="sum")),
    ],
)
@pytest.mark.parametrize("compute", COMPUTE, ids=list(COMPUTE_IDS))
def test_options_match_bruteforce(family, kind, opts, compute):
    model, _, A, B = family(kind)
    result = qkov.heatmap(A, B, model.layout, **MIN, **opts, **compute)
    _close(result.scores, _reference(A, B, kind, _dims(model.layout), model.layout.num_layers, **opts))


# The original system's conventions (see the qkov package docstring). They act outside the kernels
# (on the Fisher, the ridge and the finished sums), so the default kernel checks them.
SEED = dict(ridge_lambda=1e-8, ridge_lambda_rel=1e-6, eps=1e-10)


@pytest.mark.parametrize(
    "kind, opts",
    [
        ("gpt_neox", dict(variant="unsigned", normalize_gj="per_token_sum")),
        ("qwen2", dict(variant="signed", normalize_gj="per_token_sum", fisher_pool="pooled")),
        ("gpt2", dict(variant="symmetric", normalize_gj="per_token_mean")),
        ("llama", dict(variant="symmetric", normalize_gj="per_token_sum", aggregate="sum")),
        ("llama", dict(variant="natural", fisher_pool="pooled_by_count")),
        ("gpt2", dict(variant="unsigned", fisher_pool="pooled_by_count", normalize_gj="per_token_sum")),
        ("qwen2", dict()),  # the defaults: the seed's ridge
    ],
)
def test_seed_conventions_match_bruteforce(family, kind, opts):
    model, _, A, B = family(kind)
    result = qkov.heatmap(A, B, model.layout, **MIN, **opts)
    _close(result.scores, _reference(A, B, kind, _dims(model.layout), model.layout.num_layers, **{**SEED, **opts}))


def test_defaults_are_the_seeds():
    options = qkov.ScoreOptions()
    assert (options.ridge_lambda, options.ridge_lambda_rel, options.eps) == (1e-8, 1e-6, 1e-10)
    assert (options.fisher_pool, options.normalize_gj, options.variant, options.aggregate) == ("A", "none", "unsigned", "mean")


def test_pooled_weighs_the_tasks_equally_and_pooled_by_count_by_their_samples(family):
    """Repeating B's samples leaves ``Î = (Î_A + Î_B)/2`` and so the "pooled" scores unchanged (each
    copy's column equals the original's); the count-weighted pool moves towards B and changes them."""
    model, _, A, B = family("llama")
    twice = B.select(np.r_[np.arange(len(B)), np.arange(len(B))])
    for pool, unchanged in (("pooled", True), ("pooled_by_count", False)):
        once = qkov.heatmap(A, B, model.layout, fisher_pool=pool, **MIN).scores
        repeated = qkov.heatmap(A, twice, model.layout, fisher_pool=pool, **MIN).scores
        np.testing.assert_array_equal(repeated[..., :N_B, :], repeated[..., N_B:, :])
        if unchanged:
            _close(repeated[..., :N_B, :], once, rtol=1e-6)
        else:
            assert not np.allclose(repeated[..., :N_B, :], once, rtol=1e-3)


def test_per_token_sum_is_token_invariant_per_task(family):
    """``s_j = 1/Σ_B T``: the same factor for every sample of B, so per_token_sum scores are the
    "none" scores over B's total tokens; the symmetric variant follows normalize_gj too."""
    model, _, A, B = family("gpt2")
    total = float(np.sum(B.tokens))
    for variant in ("unsigned", "symmetric"):
        plain = qkov.heatmap(A, B, model.layout, variant=variant, **MIN).scores
        summed = qkov.heatmap(A, B, model.layout, variant=variant, normalize_gj="per_token_sum", **MIN).scores
        _close(summed, plain / total, rtol=1e-5)


def _per_layer(layout, c: SampleGrads):
    """The same model with one leaf per layer (a hand-built layout), and its contributions."""
    specs, grads = {}, {}
    for path, spec in layout.specs.items():
        if not spec.layered:
            specs[path] = spec
            continue
        for layer in range(layout.num_layers):
            name = path.replace("layers/", f"layers_{layer}/", 1)
            specs[name] = dataclasses.replace(spec, path=name, shape=spec.shape[1:], layered=False, layer=layer)
            if path in c.grads:
                grads[name] = np.ascontiguousarray(c.grads[path][:, layer])
    per_layer = ModelLayout(specs, layout.num_layers, layout.num_heads, layout.num_kv_heads, layout.head_dim)
    return per_layer, SampleGrads.from_grads(grads, c.tokens, c.sample_ids)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("variant", qkov.VARIANTS)
def test_derived_contributions_and_per_layer_leaves_give_the_same_scores(family, kind, variant):
    """The empirical Fisher stores only ``g`` (``C = g²/T`` formed on the device), and a hand-built
    layout may have one leaf per layer (stacked on the device): both must give the stored-C scores."""
    model, _, A, B = family(kind)
    options = dict(MIN, variant=variant, fisher_pool="pooled")
    expected = qkov.heatmap(A, B, model.layout, **options).scores

    def derived(c):
        return SampleGrads(c.sample_ids, c.tokens, c.grads)

    assert derived(A).derived
    _close(qkov.heatmap(derived(A), derived(B), model.layout, **options).scores, expected, rtol=1e-5)
    (layout, A1), (_, B1) = _per_layer(model.layout, A), _per_layer(model.layout, B)
    # a budget of one layer per tile makes the per-layer leaves go through several layer chunks
    attention_floats = sum(int(np.prod(layout.spec(p).shape)) for p in _attention_paths(layout) if layout.spec(p).layer == 0)
    small = 3 * 4 * (len(A) + len(B) + 1) * attention_floats
    _close(qkov.heatmap(A1, B1, layout, memory_budget_bytes=small, **options).scores, expected, rtol=1e-5)


def _misaligned(c: SampleGrads) -> SampleGrads:
    """The same contributions in arrays that start 4 bytes past a 64-byte boundary (the CPU
    backend must copy them rather than read them in place)."""

    def shift(x):
        raw = np.empty(x.nbytes + 128, np.uint8)
        start = -raw.ctypes.data % 64 + 4
        out = raw[start : start + x.nbytes].view(x.dtype).reshape(x.shape)
        out[...] = x
        return out

    return SampleGrads(
        c.sample_ids, c.tokens, {p: shift(v) for p, v in c.grads.items()},
        None if c.derived else {p: shift(v) for p, v in c.stored_contributions.items()},
    )


@pytest.mark.parametrize("compute", COMPUTE, ids=list(COMPUTE_IDS))
def test_sample_pair_and_tiling_agree_with_heatmap(family, compute):
    model, _, A, B = family("llama")  # GQA: head 3 reads kv head 1
    layout = model.layout
    full = qkov.heatmap(A, B, layout, **MIN)
    pair = qkov.sample_pair(A, B, layout, 102, 107, 1, 3, **MIN, **compute)
    _close(np.array([pair[b] for b in "qkvo"]), full.scores[:, 1, 2, 1, 3])
    floats_per_layer = sum(np.prod(np.shape(v)[2:]) for v in A.contributions.values())
    budget = 4 * 3 * floats_per_layer * 4  # room for a handful of samples of one layer
    assert qkov.tile_plan(N_A, N_B, layout.num_layers, floats_per_layer, budget)[2] == 1
    # B is one chunk, read once per layer chunk, when that still leaves room for 32 of A (GPT-2
    # small's 2.36 M floats a layer, 1 GB, one copy: 104 samples and the weights fit); else both are cut
    assert qkov.tile_plan(64, 64, 12, 2_360_000, 1e9, copies=1) == (40, 64, 1)
    assert qkov.tile_plan(64, 90, 12, 2_360_000, 1e9, copies=1) == (52, 52, 1)
    # misaligned inputs are copied tile by tile, so the budget applies to looped contraction too
    tiled = qkov.heatmap(_misaligned(A), _misaligned(B), layout, memory_budget_bytes=budget, **MIN, **compute)
    _close(tiled.scores, full.scores, rtol=1e-5)


def test_a_looped_tile_never_exceeds_its_cap_whatever_the_budget(family, monkeypatch):
    """The looped kernel walks a tile in cache-sized pieces, so its tiles are planned within
    min(budget, LOOPED_TILE_BYTES); the batched kernel's within the budget; the scores agree."""
    model, _, A, B = family("gpt2")
    planned = []
    original = _tiles.tile_plan
    monkeypatch.setattr(_tiles, "tile_plan", lambda *args, **kw: planned.append(args[4]) or original(*args, **kw))
    monkeypatch.setattr(_tiles, "LOOPED_TILE_BYTES", 5e4)
    a, b = _misaligned(A), _misaligned(B)  # copied tile by tile, so the plan decides what is held
    looped = qkov.heatmap(a, b, model.layout, contraction="looped", memory_budget_bytes=4e9, **MIN)
    batched = qkov.heatmap(a, b, model.layout, contraction="batched", memory_budget_bytes=4e9, **MIN)
    assert set(planned[:-1]) == {5e4} and planned[-1] == 4e9  # the looped kernel's whole tile, then each part's
    _close(looped.scores, batched.scores, rtol=1e-5)


def test_a_tiles_default_budget_is_the_backends(monkeypatch):
    """Unset, a tile's budget is 2 GB on a CPU and half an accelerator's free memory (at least
    2 GB): a 2 GB tile would hold one sample of a 7B model's attention per layer, and every tile
    would form task B's token factors again. A budget given is kept as it is."""
    from fisherjax import backend

    options = qkov.KernelOptions()
    assert options.memory_budget_bytes is None and options.budget_bytes() == 2e9  # this CPU
    assert qkov.KernelOptions(memory_budget_bytes=5e8).budget_bytes() == 5e8
    monkeypatch.setattr(backend, "is_cpu", lambda: False)
    for free, budget in ((70e9, 35e9), (1e9, 2e9), (None, 2e9)):
        monkeypatch.setattr(backend, "available_memory_bytes", lambda free=free: free)
        assert options.budget_bytes() == budget
    assert qkov.KernelOptions(memory_budget_bytes=5e8).budget_bytes() == 5e8
    with pytest.raises(ConfigError, match="memory_budget_bytes"):
        qkov.KernelOptions(memory_budget_bytes=0)


def test_stored_leaves_are_read_in_place_on_cpu(family):
    """Aligned, contiguous layer-stacked leaves (what ``collect`` and ``select`` produce) are used by
    the CPU kernel without a copy; misaligned ones are copied, with the same scores."""
    model, _, A, B = family("gpt2")
    layout = model.layout
    kinds = _operands.block_kinds(layout, True)
    sources = _operands.leaf_sources(layout, kinds)
    assert _tiles.in_place(A.grads, layout, sources) and _tiles.in_place(B.contributions, layout, sources)
    leaves = _tiles.device_leaves(A.grads, layout, sources, np.arange(len(A)), np.arange(layout.num_layers))
    for key, leaf in leaves.items():
        assert leaf.unsafe_buffer_pointer() == A.grads[key].ctypes.data
    assert not _tiles.in_place(_misaligned(A).grads, layout, sources)
    in_place = qkov.heatmap(A, B, layout, **MIN, contraction="looped").scores
    copied = qkov.heatmap(_misaligned(A), _misaligned(B), layout, **MIN, contraction="looped").scores
    np.testing.assert_array_equal(in_place, copied)


def test_bfloat16_leaves_are_tiled_with_the_scores_of_their_float32_values(family):
    """bfloat16 storage (analyze's default) is not read in place — its float32 conversion would be a
    copy of every sample — but tiled by the memory budget, with the scores of the same values
    stored as float32 and read in place."""
    import jax.numpy as jnp

    from fisherjax.backend import host_concatenate

    model, _, A, B = family("gpt2")
    layout = model.layout
    sources = _operands.leaf_sources(layout, _operands.block_kinds(layout, True))

    def stored(c: SampleGrads, dtype) -> SampleGrads:
        return SampleGrads(c.sample_ids, c.tokens, {p: host_concatenate([np.asarray(v).astype(jnp.bfloat16).astype(dtype)])
                                                    for p, v in c.grads.items()}, None)

    half_a, half_b, wide_a, wide_b = stored(A, jnp.bfloat16), stored(B, jnp.bfloat16), stored(A, np.float32), stored(B, np.float32)
    assert not _tiles.in_place(half_a.grads, layout, sources) and _tiles.in_place(wide_a.grads, layout, sources)
    floats_per_layer = sum(np.prod(np.shape(v)[2:]) for v in A.grads.values())
    budget = 4 * 3 * floats_per_layer * 4
    tiled = qkov.heatmap(half_a, half_b, layout, memory_budget_bytes=budget, **MIN, contraction="looped").scores
    in_place = qkov.heatmap(wide_a, wide_b, layout, **MIN, contraction="looped").scores
    _close(tiled, in_place, rtol=1e-5)
    # The looped kernel reads each tile's bfloat16 leaves widened once (not piece by piece in its
    # loop, a slow scalar conversion on XLA:CPU); float32 leaves are passed on as they are.
    leaves = _tiles.device_leaves(half_a.grads, layout, sources, np.arange(4), np.arange(layout.num_layers))
    widened, _ = _tiles.float32_leaves(leaves, None, None, "abs")
    assert all(v.dtype == jnp.float32 for v in widened.values()) and all(v.dtype == jnp.bfloat16 for v in leaves.values())
    wide = _tiles.device_leaves(wide_a.grads, layout, sources, np.arange(4), np.arange(layout.num_layers))
    assert all(_tiles.float32_leaves(wide, None, None, "abs")[0][k] is v for k, v in wide.items())


@pytest.mark.parametrize("n_layers, workers", [(7, 3), (2, 5), (4, 4), (5, 1)])
def test_layer_ranges_cover_every_layer_once_and_reassemble_in_order(n_layers, workers):
    ranges = _looped.layer_ranges(n_layers, workers)
    assert len(ranges) == min(n_layers, workers)
    np.testing.assert_array_equal(np.concatenate([np.arange(f, f + c) for f, c in ranges]), np.arange(n_layers))
    assert max(c for _, c in ranges) - min(c for _, c in ranges) <= 1
    kinds = (("k", "kernel"), ("o", "kernel"), ("q", "bias"), ("q", "kernel"))
    calls = []

    def work(block_kinds, first, count):  # each block's value records the layer it was computed for
        calls.append((block_kinds, first, count))
        return {b: np.arange(first, first + count)[:, None] * 10 + "qkvo".index(b) for b, _ in block_kinds}

    out = _looped.in_parallel(work, kinds, n_layers, workers, cost={"q": 4, "k": 1, "o": 2}.get)
    for block in "qko":
        np.testing.assert_array_equal(out[block][:, 0], np.arange(n_layers) * 10 + "qkvo".index(block))
    if workers > 1 and n_layers >= workers:  # one computation per range, every block in it
        assert sorted((p, f) for p, f, _ in calls) == sorted((kinds, f) for f, _ in ranges)
    elif workers > 1:  # fewer layers than workers: one per block and range, each given only its block's kinds
        assert sorted((p, f) for p, f, _ in calls) == sorted((tuple(x for x in kinds if x[0] == b), f) for b in "qko" for f, _ in ranges)


# ---------------------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "gpt_neox"])
def test_head_additivity(family, kind):
    """Σ_h per-head sums = unsliced block sum; K/V under GQA: H/H_kv times the unsliced score."""
    model, _, A, B = family(kind)
    layout = model.layout
    H, Hkv, _ = dims = _dims(layout)
    fixed = dict(aggregate="sum", ridge_lambda=1e-6, ridge_lambda_rel=0.0)
    result = qkov.heatmap(A, B, layout, **MIN, **fixed)
    whole = _reference(A, B, kind, dims, layout.num_layers, whole=True, **fixed)[..., 0]  # [4, L, nA, nB]
    summed = result.scores.sum(-1)
    groups = H // Hkv
    for b, block in enumerate("qkvo"):
        factor = groups if block in "kv" else 1
        _close(summed[b], factor * whole[b])


def test_scale_invariance(family):
    """Losses × a: unsigned × a, signed / symmetric / natural unchanged — when the ridge scales."""
    model, _, A, B = family("llama")
    a = 3.0

    def scaled(c):
        return SampleGrads.from_grads({p: a * g for p, g in c.grads.items()}, c.tokens, c.sample_ids)

    A2, B2 = scaled(A), scaled(B)
    relative = dict(ridge_lambda=0.0, ridge_lambda_rel=1e-2)
    for variant, factor in (("unsigned", a), ("signed", 1.0), ("symmetric", 1.0), ("natural", 1.0)):
        base = qkov.heatmap(A, B, model.layout, variant=variant, **MIN, **relative).scores
        big = qkov.heatmap(A2, B2, model.layout, variant=variant, **MIN, **relative).scores
        _close(big, factor * base, rtol=1e-4)
    # A binding absolute floor does not scale: M ≈ C|g|/λ_min then grows like a³, not a.
    floor = dict(ridge_lambda=1e3, ridge_lambda_rel=0.0)
    base = qkov.heatmap(A, B, model.layout, **MIN, **floor).scores
    big = qkov.heatmap(A2, B2, model.layout, **MIN, **floor).scores
    ratio = big.sum() / base.sum()
    assert a < ratio <= a**3 * (1 + 1e-4)
    assert ratio > 0.9 * a**3


def test_symmetric_variant_is_symmetric(family):
    model, _, A, _ = family("qwen2")
    result = qkov.heatmap(A, A, model.layout, variant="symmetric", **MIN)
    _close(result.scores, np.swapaxes(result.scores, 2, 3), rtol=1e-5)


def test_ridge_bounds_near_zero_fisher(family):
    """A slice with (near-)zero Fisher stays finite and bounded by C|g|/λ."""
    model, _, A, B = family("llama")
    H, Hkv, hd = _dims(model.layout)
    kernel, _ = _raw_names("llama", "q")
    cols = _columns("llama", "q", 2, H, Hkv, hd)

    def shrink(c, factor):
        grads = {p: np.array(g) for p, g in c.grads.items()}
        grads[kernel][:, 0][..., cols] *= factor
        return SampleGrads.from_grads(grads, c.tokens, c.sample_ids)

    tiny_A = shrink(A, 1e-18)  # Î ~ 1e-36 on that slice: far below any ridge
    lam = 1e-6
    result = qkov.heatmap(tiny_A, B, model.layout, ridge_lambda=lam, ridge_lambda_rel=0.0, aggregate="sum", **MIN)
    chex.assert_tree_all_finite(result.scores)
    Ca = _raw_slice(tiny_A.contributions, "llama", "q", 0, 2, (H, Hkv, hd))
    Gb = _raw_slice(B.grads, "llama", "q", 0, 2, (H, Hkv, hd))
    bound = Ca @ np.abs(Gb).T / lam
    assert np.all(result.scores[0, 0, :, :, 2] <= bound * (1 + 1e-4) + 1e-30)
    assert result.diagnostics.share_below_eps[0, 0, 2] == 1.0
    assert result.diagnostics.ridge[0, 0, 2] == pytest.approx(lam)
    # An exactly zero slice with both ridges off: ε keeps the denominator positive.
    zero_A = shrink(A, 0.0)
    result = qkov.heatmap(zero_A, B, model.layout, ridge_lambda=0.0, ridge_lambda_rel=0.0, **MIN)
    chex.assert_tree_all_finite(result.scores)
    assert np.all(result.scores[0, 0, :, :, 2] == 0.0)
    assert result.diagnostics.ridge[0, 0, 2] == pytest.approx(1e-10)


# ---------------------------------------------------------------------------------------------
# Ablations on the real model: zero weights, recompute per-sample gradients, rerun
# ---------------------------------------------------------------------------------------------


def _ablated(model, edit):
    flat = {p: np.array(v) for p, v in flatten(model.params).items()}
    edit(flat)
    return unflatten(flat)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_zeroing_o_head_collapses_its_q_not_its_o(family, kind):
    model, batch, _, _ = family(kind)
    H, Hkv, hd = _dims(model.layout)
    layer, head = 1, 2
    o_kernel, _ = _raw_names(kind, "o")

    def edit(flat):
        flat[o_kernel][layer, head * hd : (head + 1) * hd, :] = 0.0

    A, B = _split(_contributions(model, _ablated(model, edit), batch))
    s = qkov.heatmap(A, B, model.layout, **MIN).scores
    collapsed = ("q", "k", "v") if H == Hkv else ("q",)
    for block in collapsed:
        assert np.all(s["qkvo".index(block), layer, :, :, head] == 0.0), block
    # The O slice's gradient Σ_t δ_t z_hᵀ does not depend on W_O[h]: its scores stay.
    assert np.all(s[3, layer, :, :, head] > 0.0)
    assert np.all(s[0, layer, :, :, (head + 1) % H] > 0.0)
    if H != Hkv:  # the kv head is also read by another query head: K/V do not collapse
        assert np.all(s[1, layer, :, :, head] > 0.0)


def test_zeroing_kv_head_values_silences_every_head_that_reads_it(family):
    """GQA map against the model itself: V_g = 0 (weights and bias) ⇒ O, Q, K scores of every
    query head reading g are exactly zero; other heads' O scores stay."""
    base, batch, _, _ = family("qwen2")
    config = base.config.replace(num_kv_heads=2)  # 4 query heads, 2 kv heads, q/k/v biases
    model = fisherjax.Model.init(config, seed=1)
    rng = np.random.default_rng(1)
    H, Hkv, hd = _dims(model.layout)
    layer, g = 0, 1
    kernel, bias = _raw_names("qwen2", "v")

    def edit(flat):
        for path in flat:
            if path.endswith("bias"):
                flat[path] += 0.05 * rng.standard_normal(flat[path].shape).astype(np.float32)
        cols = g * hd + np.arange(hd)
        flat[kernel][layer][:, cols] = 0.0
        flat[bias][layer][cols] = 0.0

    A, B = _split(_contributions(model, _ablated(model, edit), batch))
    s = qkov.heatmap(A, B, model.layout, **MIN).scores
    readers = np.flatnonzero(np.arange(H) // (H // Hkv) == g)
    others = np.setdiff1d(np.arange(H), readers)
    for block in ("o", "q", "k"):
        assert np.all(s["qkvo".index(block), layer][..., readers] == 0.0), block
    assert np.all(s[3, layer][..., others] > 0.0)
    assert np.all(s[2, layer][..., readers] > 0.0)  # V itself still gets gradients
    assert np.all(s[3, 1 - layer] > 0.0)  # the other layer is untouched


# ---------------------------------------------------------------------------------------------
# Inputs, errors and outputs
# ---------------------------------------------------------------------------------------------


def test_inactive_samples_dropped_with_warning(family):
    model, _, A, B = family("gpt2")
    extra = SampleGrads(
        np.r_[A.sample_ids, 999],
        np.r_[A.tokens, 0],
        {p: np.concatenate([v, 1e3 * np.ones_like(v[:1])]) for p, v in A.grads.items()},
        {p: np.concatenate([v, 1e6 * np.ones_like(v[:1])]) for p, v in A.contributions.items()},
    )
    with pytest.warns(UserWarning, match="T_i = 0"):
        result = qkov.heatmap(extra, B, model.layout, **MIN)
    assert result.dropped_a == (999,)
    _close(result.scores, qkov.heatmap(A, B, model.layout, **MIN).scores, rtol=1e-6)
    # A split read in place drops the inactive row as the copied split does (stored contributions:
    # the Fisher of the rows is a mean of C_i, not of g_i²/T_i).
    for seed in (1, 2):
        fit, held = qkov.heldout_split(extra, 0.4, seed=seed)
        with pytest.warns(UserWarning, match="T_i = 0"):
            copied = qkov.permutation_test(fit, B, held, model.layout, n_permutations=50, **MIN)
        with pytest.warns(UserWarning, match="T_i = 0"):
            in_place = qkov.heldout_permutation_test(extra, B, model.layout, fraction=0.4, split_seed=seed, n_permutations=50, **MIN)
        _close(in_place.observed, copied.observed, rtol=1e-6)
        np.testing.assert_array_equal(in_place.pvalues, copied.pvalues)


def test_empty_task_b_gives_zeros(family):
    model, _, A, B = family("llama")
    with pytest.warns(UserWarning, match="no samples"):
        result = qkov.heatmap(A, B.select(np.arange(0)), model.layout, **MIN)
    assert result.scores.shape[3] == 0
    assert np.all(result.layer_head_avg == 0.0) and np.isfinite(result.layer_head_avg).all()
    assert qkov.top_conflicts(result) == ()
    json.dumps(report_qkov.summary(result))


def test_bad_inputs_raise(family):
    model, _, A, B = family("qwen2")
    with pytest.raises(DataError, match="min_fisher_samples"):
        qkov.heatmap(A.select(np.arange(2)), B, model.layout)
    with pytest.raises(ConfigError, match="variant"):
        qkov.heatmap(A, B, model.layout, variant="bogus")
    with pytest.raises(ConfigError, match="unknown option"):
        qkov.heatmap(A, B, model.layout, ridge=1.0)
    with pytest.raises(ConfigError, match="workers"):
        qkov.heatmap(A, B, model.layout, workers=0)
    no_bias = SampleGrads(
        A.sample_ids, A.tokens,
        {p: v for p, v in A.grads.items() if not p.endswith("bias")},
        {p: v for p, v in A.contributions.items() if not p.endswith("bias")},
    )
    with pytest.raises(DataError, match="include_bias=False"):
        qkov.heatmap(no_bias, B, model.layout, **MIN)
    kept = qkov.heatmap(no_bias, B, model.layout, include_bias=False, **MIN)
    _close(kept.scores, qkov.heatmap(A, B, model.layout, include_bias=False, **MIN).scores, rtol=1e-6)
    nan_b = SampleGrads(B.sample_ids, B.tokens, {p: np.full_like(v, np.nan) for p, v in B.grads.items()}, B.stored_contributions)
    with pytest.raises(NumericalError):
        qkov.heatmap(A, nan_b, model.layout, **MIN)


def test_top_conflicts_summary_and_figures(family, tmp_path):
    model, _, A, B = family("llama")
    result = qkov.heatmap(A, B, model.layout, **MIN)
    top = qkov.top_conflicts(result, k=7)
    assert len(top) == 7
    assert [c["score"] for c in top] == sorted((c["score"] for c in top), reverse=True)
    assert top[0]["score"] == pytest.approx(float(result.scores.max()))
    for c in top:
        i = int(np.flatnonzero(result.sample_ids_a == c["sample_a"])[0])
        j = int(np.flatnonzero(result.sample_ids_b == c["sample_b"])[0])
        assert result.scores["qkvo".index(c["block"]), c["layer"], i, j, c["head"]] == pytest.approx(c["score"])
        assert c["kv_head"] == c["head"] // 2
    keys = {(c["block"], c["layer"], c["sample_a"], c["sample_b"], c["kv_head"]) for c in top if c["block"] in "kv"}
    assert len(keys) == sum(c["block"] in "kv" for c in top)  # each kv head once
    summary = json.loads(json.dumps(report_qkov.summary(result, top_k=7)))
    assert summary["top_conflicts"] == json.loads(json.dumps(top))
    assert summary["top_conflicts"][0]["sample_a"] in range(100, 100 + N_A)
    assert np.array(summary["blocks"]["v"]["layer_head_avg"]).shape == (2, 4)
    assert set(summary["blocks"]["q"]["diagnostics"]) == {"fisher_min", "fisher_median", "fisher_max", "share_below_eps", "ridge"}
    qkov.save_npz(result, tmp_path / "qkov.npz")
    with np.load(tmp_path / "qkov.npz") as saved:
        np.testing.assert_array_equal(saved["scores"], result.scores)
    assert qkov.scores_bytes(N_A, N_B, model.layout) == result.scores.nbytes  # what fisherjax plan says they take
    figures = report_qkov.figures(result)
    assert sorted(figures) == ["k", "o", "q", "v"]
    assert figures["v"].axes[0].get_xlabel() == "kv head" and len(figures["v"].axes[0].get_xticks()) == 2  # 2 kv heads
    for fig in figures.values():
        fig.savefig(tmp_path / "f.png")
    summary["permutation_test"] = {"skipped": "too few samples"}
    lines = report_qkov.markdown("A", "B", summary)
    assert lines[0].startswith("**B → A** (6 × 4 samples): permutation test skipped")
    assert sum(line.startswith("| ") for line in lines) == 1 + 5  # the header and the top 5
    assert "{figure:qkov_B_on_A_v}" in "\n".join(lines)
    assert report_qkov.markdown("A", "B", {"skipped": "A is empty"}) == ["**B → A**: skipped: A is empty.", ""]


@pytest.mark.parametrize("chunk", [1, 1 << 30])  # one (block, layer) slab at a time, or every score at once
def test_top_conflicts_ranked_a_chunk_at_a_time_are_the_brute_force_ranking(family, monkeypatch, chunk):
    """top_conflicts ranks the scores a chunk of slabs at a time and keeps each chunk's k best: the
    same entries, in the same order, as sorting every candidate score; ties go to the lower position."""
    from fisherjax.analysis.qkov import interference

    model, _, A, B = family("llama")
    result = qkov.heatmap(A, B, model.layout, **MIN)
    scores = np.array(result.scores)
    scores[1, 0, 2, 1, 0] = scores[0, 1, 0, 0, 3] = scores.max() + 1.0  # a tie at the top: the lower position first
    result = dataclasses.replace(result, scores=scores)
    monkeypatch.setattr(interference, "TOP_CHUNK_VALUES", chunk)
    top = qkov.top_conflicts(result, k=9)
    kv = np.asarray(result.kv_head_of)
    first = np.r_[True, kv[1:] != kv[:-1]]
    entries = [(float(scores[b, layer, i, j, h]), (b, layer, i, j, h)) for b, layer, i, j, h in np.ndindex(scores.shape)
               if "qkvo"[b] in "qo" or first[h]]
    expected = sorted(entries, key=lambda e: (-e[0], e[1]))[:9]
    got = [(c["score"], ("qkvo".index(c["block"]), c["layer"], int(np.flatnonzero(result.sample_ids_a == c["sample_a"])[0]),
                         int(np.flatnonzero(result.sample_ids_b == c["sample_b"])[0]), c["head"])) for c in top]
    assert got == expected


def test_flops_counts_every_attention_parameter(family):
    model, _, _, _ = family("qwen2")
    n_params = sum(np.prod(np.shape(v)) for p, v in flatten(model.params).items() if p in _attention_paths(model.layout))
    assert qkov.flops(3, 5, model.layout) == 2 * 3 * 5 * n_params


def test_results_are_pytrees(family):
    """Arrays are leaves (jax.tree.map reaches them, jax.jit takes the result); options, names and
    dropped ids are static metadata."""
    model, _, A, B = family("gpt2")
    result = qkov.heatmap(A, B, model.layout, **MIN)
    assert len(jax.tree.leaves(result)) == 6 + 5  # scores, avg, two id arrays, kv map, sizes + 5 diagnostics
    doubled = jax.tree.map(lambda x: 2 * x, result)
    assert isinstance(doubled, qkov.QKOVResult) and doubled.options == result.options and doubled.task_b == result.task_b
    np.testing.assert_array_equal(doubled.scores, 2 * result.scores)
    np.testing.assert_array_equal(doubled.diagnostics.ridge, 2 * result.diagnostics.ridge)
    averaged = jax.jit(lambda r: r.scores.mean(axis=(2, 3)) - r.layer_head_avg)(result)
    np.testing.assert_allclose(averaged, 0.0, atol=1e-6 * float(np.abs(result.layer_head_avg).max()))
    interval = qkov.bootstrap_layer_head_avg(result, n_bootstrap=10)
    assert len(jax.tree.leaves(interval)) == 2 and jax.jit(lambda i: i.high - i.low)(interval).shape == result.layer_head_avg.shape


def test_kernels_trace_once_and_a_second_heatmap_compiles_nothing(family):
    model, _, A, B = family("gpt2")
    layout = model.layout
    prep = _prepare.prepare(A, B, layout, qkov.ScoreOptions(**MIN))
    sources = _operands.leaf_sources(layout, prep.kinds)
    layers = np.arange(layout.num_layers)
    weights = {k: jax.numpy.asarray(w) for k, w in prep.weights.items()}

    def leaves(c, factor):
        return {k: factor * v for k, v in _tiles.device_leaves(c.grads, layout, sources, np.arange(len(c)), layers).items()}

    ones_a, ones_b = jax.numpy.ones(len(A)), jax.numpy.ones(len(B))
    common = dict(layout=layout, kinds=prep.kinds)
    looped = jax.jit(chex.assert_max_traces(_looped.leaf_sums, n=1), static_argnames=_looped.LEAF_SUMS_STATIC)
    chex.clear_trace_counter()
    # two traces of the operand, one per side (they differ in shape and transform), then none
    operand = jax.jit(chex.assert_max_traces(_batched.leaf_operand, n=2), static_argnames=("layout", "kinds", "transform", "split_k"))
    products = jax.jit(chex.assert_max_traces(_batched.products, n=1), static_argnames=("precision",))
    for factor in (1.0, 2.0):  # same shapes, other values
        looped(leaves(A, factor), ones_a, weights, leaves(B, factor), ones_b, 0, transform_a="square", transform_b="abs",
               piece_floats=1000, precision="highest", n_layers=layout.num_layers, **common)
        a = operand(leaves(A, factor), ones_a, weights, transform="square", split_k=4, **common)
        b = operand(leaves(B, factor), ones_b, None, transform="abs", split_k=4, **common)
        products(a, b, precision="highest")
    reversed_a, reversed_b = A.select(np.arange(len(A))[::-1]), B.select(np.arange(len(B))[::-1])
    for contraction in ("looped", "batched"):
        first = qkov.heatmap(A, B, layout, contraction=contraction, **MIN)
        with compilations() as compiled:  # same shapes, other values (the samples in reverse order)
            again = qkov.heatmap(reversed_a, reversed_b, layout, contraction=contraction, **MIN)
        assert compiled.count == 0, contraction
        _close(again.scores, first.scores[:, :, ::-1, ::-1], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def _synthetic(layout, n, seed, boost=None):
    """Random per-sample gradients shaped like the layout's attention parameters."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 2.0, size=n)
    grads = {}
    for path in _attention_paths(layout):
        shape = layout.spec(path).shape
        grads[path] = (rng.standard_normal((n, *shape)) * scale.reshape((-1,) + (1,) * len(shape))).astype(np.float32)
    if boost is not None:
        path, layer, cols, factor = boost
        grads[path][:, layer][..., cols] *= factor
    tokens = rng.integers(3, 9, size=n)
    return SampleGrads.from_grads(grads, tokens, np.arange(seed * 1000, seed * 1000 + n))


def test_permutation_test_finds_planted_head_and_controls_the_rest(family):
    model, _, _, _ = family("llama")
    layout = model.layout
    H, Hkv, hd = _dims(layout)
    A, A_held = _synthetic(layout, 20, 1), _synthetic(layout, 12, 2)
    kernel, _ = _raw_names("llama", "q")
    B = _synthetic(layout, 12, 3, boost=(kernel, 1, _columns("llama", "q", 2, H, Hkv, hd), 4.0))
    test = qkov.permutation_test(A, B, A_held, layout, n_permutations=500, **MIN)
    chex.assert_shape(test.pvalues, (4, 2, H))
    # The statistic against the brute force: mean over A×B minus mean over A×A', Î from A alone.
    dims = (H, Hkv, hd)
    expected = (_reference(A, B, "llama", dims, layout.num_layers).mean(axis=(2, 3))
                - _reference(A, A_held, "llama", dims, layout.num_layers).mean(axis=(2, 3)))
    _close(test.observed, expected)
    assert test.significant[0, 1, 2] and test.observed[0, 1, 2] > 0
    others = np.ones_like(test.significant)
    others[0, 1, 2] = False
    assert test.significant[others].sum() <= 2
    # q-values are BH over distinct cells (K/V once per kv head), recomputed here with scipy.
    from scipy.stats import false_discovery_control

    distinct = np.concatenate([test.pvalues[0].ravel(), test.pvalues[1][:, ::2].ravel(),
                               test.pvalues[2][:, ::2].ravel(), test.pvalues[3].ravel()])
    q = false_discovery_control(distinct)
    np.testing.assert_allclose(np.sort(q), np.sort(np.concatenate([test.qvalues[0].ravel(), test.qvalues[1][:, ::2].ravel(),
                                                                   test.qvalues[2][:, ::2].ravel(), test.qvalues[3].ravel()])))
    split = qkov.heldout_split(A, 0.25, seed=0)
    assert len(split[0]) == 15 and len(split[1]) == 5
    assert not set(split[0].sample_ids) & set(split[1].sample_ids)
    # The split read in place (no copy of A) gives the test of the copied split, number for number.
    copied = qkov.permutation_test(split[0], B, split[1], layout, n_permutations=200, seed=4, **MIN)
    in_place = qkov.heldout_permutation_test(A, B, layout, fraction=0.25, split_seed=0, n_permutations=200, seed=4, **MIN)
    np.testing.assert_array_equal(in_place.observed, copied.observed)
    np.testing.assert_array_equal(in_place.pvalues, copied.pvalues)
    fit, held = qkov.heldout_rows(A, 0.25, seed=0)
    np.testing.assert_array_equal(A.sample_ids[fit], split[0].sample_ids)
    np.testing.assert_array_equal(A.sample_ids[held], split[1].sample_ids)


def test_bootstrap_matches_a_loop_over_replicates(family):
    model, _, A, B = family("gpt2")
    result = qkov.heatmap(A, B, model.layout, **MIN)
    n_boot = 40
    interval = qkov.bootstrap_layer_head_avg(result, n_bootstrap=n_boot, seed=5, chunk=7)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(6)
    ia = rng_a.integers(0, N_A, size=(n_boot, N_A))
    ib = rng_b.integers(0, N_B, size=(n_boot, N_B))
    reps = np.stack([result.scores[:, :, ia[r]][:, :, :, ib[r]].mean(axis=(2, 3)) for r in range(n_boot)])
    np.testing.assert_allclose(interval.low, np.quantile(reps, 0.025, axis=0), rtol=1e-5)
    np.testing.assert_allclose(interval.high, np.quantile(reps, 0.975, axis=0), rtol=1e-5)
    assert np.all(interval.low <= interval.high)



# Every way a mean row is made: the Fisher itself (unsigned, natural), and each transform of a
# stored array (signed: g, symmetric: |g|·√(1/T) derived, √C stored) or of formed token factors.
@pytest.mark.parametrize("variant, store", [
    ("unsigned", "derived"), ("natural", "stored"), ("signed", "stored"), ("signed", "factored"),
    ("symmetric", "derived"), ("symmetric", "stored"), ("symmetric", "factored"),
])
def test_the_mean_row_scores_are_the_column_means(family, variant, store):
    """A permutation test reads its scores' column means ``m_j = mean_i M_ij`` only, and a score is
    linear in task A's factor, so the test scores one row, the mean of that factor over A's
    samples (the fit half's rows, read in place): its scores are the heatmap's column means, for
    every variant and however A's gradients are kept (contributions derived from them, stored
    beside them, kernels as token factors)."""
    model, _, A, B = family("gpt2")
    layout = model.layout
    if store == "derived":
        A = SampleGrads(A.sample_ids, A.tokens, A.grads)
    elif store == "factored":
        A = _factored(SampleGrads(A.sample_ids, A.tokens, A.grads), seed=1)
    assert A.derived == (store != "stored")
    score = qkov.ScoreOptions(variant=variant, **MIN)
    rows = np.array([0, 2, 3, 5])
    whole = qkov.heatmap(A.select(rows), B, layout, score=score, contraction="batched")
    prep = _prepare.prepare(A, B, layout, score, a_rows=rows, mean=True)
    assert prep.mean_row and len(prep.a) == 1
    np.testing.assert_array_equal(prep.weights["q/kernel"], _prepare.prepare(A.select(rows), B, layout, score).weights["q/kernel"])
    for contraction in ("batched", "looped"):
        got = _scores.all_scores(prep, layout, score, qkov.KernelOptions(contraction=contraction))[:, :, 0]
        _close(got, whole.scores.mean(axis=2), rtol=1e-5)


def _factored(c: SampleGrads, seq: int = 5, seed: int = 0) -> SampleGrads:
    """``c`` with its attention kernels kept as random token factors (formed on each read)."""
    from fisherjax.fisher.factored import FactoredGrads

    rng = np.random.default_rng(seed)
    grads = dict(c.grads)
    for path, g in c.grads.items():
        if path.endswith("kernel"):
            *lead, d_in, d_out = g.shape
            grads[path] = FactoredGrads(rng.standard_normal((*lead, seq, d_in)).astype(np.float32),
                                        rng.standard_normal((*lead, seq, d_out)).astype(np.float32) * 0.1)
    return SampleGrads(c.sample_ids, c.tokens, grads)


# Llama's looped case is slow: its batched case covers the grouped kv heads in the shared pass, and
# GPT-2's looped case the looped contraction.
@pytest.mark.parametrize("kind, compute", [
    ("gpt2", dict(contraction="looped", piece_floats=64, workers=2)),
    pytest.param("llama", dict(contraction="looped", piece_floats=64, workers=2), marks=pytest.mark.slow),
    ("gpt2", dict(contraction="batched", split_k=4)),
    ("llama", dict(contraction="batched", split_k=4)),
], ids=["looped-gpt2", "looped-llama", "batched-gpt2", "batched-llama"])
def test_both_ways_are_the_separate_calls_from_one_formation(family, kind, compute, monkeypatch):
    """:func:`qkov.both_ways`: both heatmaps and both held-out permutation tests of a task pair, the
    numbers of the four separate calls, while each kept sample's token factors are formed once per
    layer chunk (the separate calls form them once per score array that reads them, and there are
    six); with a memory budget too small for that pass, the separate calls themselves."""
    from fisherjax.fisher.factored import FactoredGrads

    model, _, A, B = family(kind)
    layout = model.layout
    A, B = _factored(A, seed=1), _factored(B, seed=2)
    options = dict(min_fisher_samples=2, **compute)
    formed = []
    on_device = FactoredGrads.on_device

    def counted(self, key=(), place=None, pad_to=None):
        value = on_device(self, key, place, pad_to)
        formed.append(value.size / (self.inputs.shape[-1] * self.deltas.shape[-1]))  # samples × layers formed (a share for a group of heads)
        narrow.append(self.shape[-2:] != (self.inputs.shape[-1], self.deltas.shape[-1]))
        return value

    monkeypatch.setattr(FactoredGrads, "on_device", counted)
    kernels = sum(isinstance(g, FactoredGrads) for g in A.grads.values())
    # A budget that holds one kv head of the largest part's layer for both tasks' samples and the
    # tests' two mean rows, not the whole layer: the shared pass goes part by part, a group of heads
    # at a time.
    copies = {"looped": 1, "batched": 3}[compute["contraction"]]
    largest = max(sum(np.prod(layout.spec(p).shape[1:]) for p in {layout.block_sources(b, k)[0] for b, k in group})
                  for group in _tiles.leaf_groups(layout, tuple(layout.attention_blocks())))
    grouped = 4 * (copies * (len(A) + len(B) + 2) + 4) * largest / layout.num_kv_heads
    narrow = []
    for budget, shared in ((2e9, True), (grouped, True), (1e4, False)):
        formed.clear(), narrow.clear()
        ways = list(qkov.both_ways(A, B, layout, n_permutations=300, seed=3, split_seed=1, memory_budget_bytes=budget, **options))
        assert all(way.shared == shared for way in ways)
        if shared:  # each sample formed once: as many (sample, layer) pieces as kernels (groups of heads form a share of a piece)
            assert sum(formed) == pytest.approx(kernels * (len(A) + len(B)) * layout.num_layers), budget
            assert any(narrow) == (budget == grouped)
        else:
            assert sum(formed) > 3 * kernels * (len(A) + len(B)) * layout.num_layers
        for (a, b), way in zip(((A, B), (B, A)), ways):
            alone = qkov.heatmap(a, b, layout, **options)
            _close(way.heatmap.scores, alone.scores, rtol=1e-5)
            _close(way.heatmap.layer_head_avg, alone.layer_head_avg, rtol=1e-5)
            np.testing.assert_array_equal(way.heatmap.diagnostics.ridge, alone.diagnostics.ridge)
            test = qkov.heldout_permutation_test(a, b, layout, fraction=0.5, split_seed=1, n_permutations=300, seed=3, **options)
            _close(way.test.observed, test.observed, rtol=1e-5)
            np.testing.assert_array_equal(way.test.pvalues, test.pvalues)
    # qkov.formed_once foretells the route. The pass holds both heatmaps' float32 sums and, for each
    # test, its mean row's against its partners (B and the held-out half): past the host's share of
    # that, direction by direction, whatever the tile budget.
    kernel = qkov.KernelOptions(memory_budget_bytes=2e9, **compute)
    assert qkov.formed_once(len(A), len(B), layout, kernel=kernel)
    assert not qkov.formed_once(len(A), len(B), layout, kernel=qkov.KernelOptions(memory_budget_bytes=1e4, **compute))
    cell = layout.num_layers * layout.num_heads * len(qkov.BLOCKS)
    partners = len(B) + round(len(A) / 2) + len(A) + round(len(B) / 2)
    sums = (2 * 4 * len(A) * len(B) + 4 * partners) * cell
    assert qkov.formed_once(len(A), len(B), layout, host_bytes=sums / _tiles.SHARED_HOST_SHARE, kernel=kernel)
    assert not qkov.formed_once(len(A), len(B), layout, host_bytes=(sums - 1) / _tiles.SHARED_HOST_SHARE, kernel=kernel)
    formed.clear()
    ways = list(qkov.both_ways(A, B, layout, n_permutations=50, split_seed=1, host_bytes=(sums - 1) / _tiles.SHARED_HOST_SHARE,
                               memory_budget_bytes=2e9, **options))
    assert not any(way.shared for way in ways)
    assert sum(formed) > 3 * kernels * (len(A) + len(B)) * layout.num_layers
    # A direction without its test, and the curvature variant refused.
    ways = list(qkov.both_ways(A, B, layout, test=(False, True), n_permutations=50, **options))
    assert ways[0].test is None and ways[1].test is not None
    with pytest.raises(ConfigError, match="kfac"):
        next(qkov.both_ways(A, B, layout, variant="kfac", **options))


# The looped contraction read from the host is slow for Llama and NeoX, and NeoX's staged looped case
# too: their layouts' groups of heads are counted by the batched contraction (and Llama's by the
# staged looped one), the looped contraction from the host by GPT-2, and staged by GPT-2 (a fused
# QKV part, as NeoX's) and Llama.
DEFAULT_LOOPED_READS = {("gpt2", False), ("gpt2", True), ("llama", True)}


@pytest.mark.parametrize("kind, contraction, staged", [
    pytest.param(kind, contraction, staged, id=f"{'staged' if staged else 'host'}-{contraction}-{kind}",
                 marks=[pytest.mark.slow] if contraction == "looped" and (kind, staged) not in DEFAULT_LOOPED_READS else [])
    for kind in ("gpt2", "llama", "gpt_neox") for contraction in ("looped", "batched") for staged in (False, True)])
def test_partner_reads_count_the_formations_of_task_b(family, kind, contraction, staged, monkeypatch):
    """:func:`qkov.partner_reads` says how often a score array forms its partner's kept token
    factors (the work ``analyze`` and ``fisherjax plan`` count): once when task B fits one tile,
    else once per chunk of A in each part that shares no leaf (GPT-2 and NeoX: QKV, O; Llama: q, k,
    v, o), the parts weighted by their parameters; where a part's layer does not hold B whole, its
    heads are cut into groups (GPT-2 and NeoX's fused QKV, Llama's grouped kv heads with their
    query heads) and each read forms only its group's columns — counted here in FLOPs on a
    heatmap's actual formations, and the scores are the whole tile's. ``staged`` (an
    accelerator's way, :func:`fisherjax.backend.stages_reads`): a cut part's layer of both tasks'
    stored samples goes to the device once and every group takes its columns there."""
    from fisherjax import backend
    from fisherjax.fisher.factored import FactoredGrads

    model, _, A, B = family(kind)
    layout = model.layout
    A, B = _factored(A, seed=1), _factored(B, seed=2)
    formed, narrow, moved = [], [], []
    on_device, staged_read = FactoredGrads.on_device, FactoredGrads.staged

    def counted(self, key=(), place=None, pad_to=None):
        value = on_device(self, key, place, pad_to)
        if len(self) == len(B):  # B's stored samples, or their staged copy (A has more)
            formed.append(np.prod(value.shape))  # samples × layers × d_in × d_out of B formed
            narrow.append(self.shape[-2:] != (self.inputs.shape[-1], self.deltas.shape[-1]))  # a group of heads
        return value

    def counted_staged(self, key=(), place=None):
        value = staged_read(self, key, place)
        moved.append(value.inputs.shape[:2])  # samples × layers staged
        return value

    monkeypatch.setattr(FactoredGrads, "on_device", counted)
    monkeypatch.setattr(FactoredGrads, "staged", counted_staged)
    monkeypatch.setattr(backend, "stages_reads", lambda: staged)
    assert len(A) != len(B)
    kernels = [p for p in _attention_paths(layout) if p.endswith("kernel")]
    per_sample = sum(np.prod(layout.spec(p).shape) for p in kernels)  # one sample's kernels, all layers
    per_sample_layer = 4 * per_sample // layout.num_layers  # bytes, kernels only: no biases below
    copies = {"looped": 1, "batched": 3}[contraction]  # float32 copies a tile holds per sample and layer
    options = dict(min_fisher_samples=3, include_bias=False)
    whole = qkov.heatmap(A, B, layout, **options)
    stores = qkov.stored_sample_layer_bytes((A.grads, B.grads), layout) if staged else None
    reads, cut, staging = set(), set(), set()
    # B whole in one tile; in each part's; in groups of heads (each part's; staged where that does
    # not read B more often); in chunks even at one kv head.
    for share in (1e9, 9, 5, 3, 2.5, 2, 1, 0.4):
        budget = share * copies * per_sample_layer
        compute = dict(contraction=contraction, memory_budget_bytes=budget)
        formed.clear(), narrow.clear(), moved.clear()
        tiled = qkov.heatmap(A, B, layout, **options, **compute)
        expected = qkov.partner_reads(len(A), len(B), layout, False, qkov.KernelOptions(**compute), sample_layer_bytes=stores)
        assert sum(formed) == pytest.approx(expected * len(B) * per_sample, rel=1e-9), budget
        _close(tiled.scores, whole.scores, rtol=1e-5)
        _close(tiled.layer_head_avg, whole.layer_head_avg, rtol=1e-5)
        reads.add(expected), cut.add(any(narrow)), staging.add(bool(moved))
        # staged: each stored sample of a layer moved once for all the groups of heads of its part
        assert all(rows in (len(A), len(B)) and layers == 1 for rows, layers in moved), moved
    assert 1 in reads and max(reads) > 1 and cut == {False, True} and staging == {False, staged}
