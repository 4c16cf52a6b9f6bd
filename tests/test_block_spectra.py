"""Per-head block spectra of the empirical Fisher against independent float64 references: the dense
slice Fisher ``(1/n) Σ_i g_i g_iᵀ / T_i`` diagonalised with ``numpy.linalg.eigh``, its slices cut from
Hugging Face's tensors with their own index arithmetic (GPT-2's Conv1D ``[Q|K|V]`` columns, NeoX's
per-head interleaved rows, Llama's rows per (kv) head), from fisherjax's kept gradients and from
torch.func's; the Gram identities (trace = slice sum of the diagonal Fisher, rank ≤ n); the
memory-bounded plan; a layout with ``D ≤ n``; and the user errors."""

from __future__ import annotations

import dataclasses

import jax
import ml_dtypes
import numpy as np
import pytest

from conftest import FAST_FAMILIES, padded_batch

import fisherjax
from fisherjax.curvature import blocks
from fisherjax.data import IGNORE, Batch
from fisherjax.errors import ConfigError, DataError
from fisherjax.fisher.options import attention_paths
from fisherjax.fisher.state import SampleGrads
from fisherjax.layout import FAMILY_RULES, ModelLayout
from torch_reference import our_location, torch_per_sample_grads

BLOCKS = "qkvo"
TOP_K = 8  # more than the samples: the tail is zero padding


# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


def _hf_slice(kind: str, grads: dict, block: str, layer: int, head: int, dims, include_bias=True) -> np.ndarray:
    """``[n, D]`` per-sample values of one head's slice, cut from Hugging Face tensors ``{name: [n, *hf_shape]}``."""
    H, K, hd = dims
    e = np.arange(hd)
    n = next(iter(grads.values())).shape[0]
    if kind == "gpt2":  # Conv1D [in, out]; c_attn columns [Q | K | V], each head-major
        pre = f"transformer.h.{layer}.attn."
        if block == "o":
            return grads[pre + "c_proj.weight"][:, head * hd + e, :].reshape(n, -1)
        cols = BLOCKS.index(block) * H * hd + head * hd + e
        parts = [grads[pre + "c_attn.weight"][:, :, cols], grads[pre + "c_attn.bias"][:, cols] if include_bias else None]
    elif kind == "gpt_neox":  # Linear [out, in]; query_key_value rows [head, (q, k, v), head_dim]
        pre = f"gpt_neox.layers.{layer}.attention."
        if block == "o":
            return grads[pre + "dense.weight"][:, :, head * hd + e].reshape(n, -1)
        rows = head * 3 * hd + BLOCKS.index(block) * hd + e
        parts = [grads[pre + "query_key_value.weight"][:, rows, :], grads[pre + "query_key_value.bias"][:, rows] if include_bias else None]
    else:  # Llama family, Linear [out, in]; k/v rows per kv head
        pre = f"model.layers.{layer}.self_attn."
        if block == "o":
            return grads[pre + "o_proj.weight"][:, :, head * hd + e].reshape(n, -1)
        rows = head * hd + e
        bias = grads.get(pre + f"{block}_proj.bias")
        parts = [grads[pre + f"{block}_proj.weight"][:, rows, :], bias[:, rows] if include_bias and bias is not None else None]
    return np.concatenate([p.reshape(n, -1) for p in parts if p is not None], axis=1)


def _dense_spectrum(g: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Eigenvalues (descending) of ``F = (1/n) Σ_i g_i g_iᵀ / T_i`` (``D × D``, float64, LAPACK's
``syevd`` through ``numpy.linalg.eigvalsh``)."""
    fisher = np.einsum("id,ie->de", g / tokens[:, None], g) / len(g)
    return np.linalg.eigvalsh(fisher)[::-1]


def _summaries(lam: np.ndarray, dimension: int, n: int, rank_tol=1e-5, relative_damping=1e-3) -> dict:
    """The documented summaries of one slice from its dense spectrum ``lam`` (all ``D`` eigenvalues)."""
    lam = np.maximum(lam, 0.0)
    nonzero = lam[lam > rank_tol * lam[0]]
    p = nonzero / nonzero.sum()
    ridge = relative_damping * lam.sum() / dimension
    lambda_min = 0.0 if dimension > n else lam[dimension - 1]
    return dict(trace=lam.sum(), rank=len(nonzero), effective_rank=np.exp(-np.sum(p * np.log(p))), lambda_min=lambda_min,
                damping=ridge, condition=(lam[0] + ridge) / (lambda_min + ridge))


def _in_hf_space(kind: str, flat: dict, hf_names) -> dict:
    """fisherjax's flat arrays ``{path: [n, layer, ...]}`` as HF tensors (``our_location``, not the layout)."""
    out = {}
    for name in hf_names:
        path, layer, transposed = our_location(kind, name)
        if path in flat:
            value = flat[path][:, layer]
            out[name] = np.swapaxes(value, -1, -2) if transposed else value
    return out


def _from_hf_space(kind: str, hf: dict, paths, layers: int) -> dict:
    """HF tensors ``{name: [n, *hf_shape]}`` as fisherjax's layer-stacked ``{path: [n, layer, ...]}``
    (float32) for ``paths`` (``our_location``, not the layout)."""
    per_layer: dict = {}
    for name, value in hf.items():
        path, layer, transposed = our_location(kind, name)
        if path in paths:
            per_layer.setdefault(path, {})[layer] = np.swapaxes(value, -1, -2) if transposed else value
    return {p: np.stack([v[layer] for layer in range(layers)], axis=1).astype(np.float32) for p, v in per_layer.items()}


def _batch(seed=0, lengths=(10, 6, 3, 10, 8, 7), seq=10):
    ids, mask = padded_batch(np.random.default_rng(seed), list(lengths), seq, "right")
    labels = np.where(mask == 1, ids, IGNORE).astype(np.int32)
    labels[1, :3] = IGNORE  # a prompt whose tokens are not predicted
    return Batch(ids, mask, labels, np.arange(100, 100 + len(lengths)))


@pytest.fixture(scope="module")
def family(hf_checkpoint):
    """``family(kind) -> (model, batch, tokens T_i, torch.func gradients {hf_name: [n, ...]} rounded
    to float32, the same as SampleGrads in fisherjax's flat paths)``, built once per family."""
    cache = {}

    def make(kind):
        if kind not in cache:
            directory, torch_model = hf_checkpoint(kind)
            model = fisherjax.load_pretrained(directory)
            batch = _batch()
            tokens = (batch.labels[:, 1:] != IGNORE).sum(-1).astype(np.float64)
            ref = torch_per_sample_grads(torch_model, batch.input_ids, batch.labels)
            ref = {name: g.astype(np.float32).astype(np.float64) for name, g in ref.items()}
            grads = _from_hf_space(kind, ref, attention_paths(model.layout), model.layout.num_layers)
            cache[kind] = (model, batch, tokens, ref, SampleGrads(batch.sample_ids, tokens.astype(np.int64), grads))
        return cache[kind]

    return make


@pytest.fixture(scope="module")
def collected(family):
    """``collected(kind) -> TaskFisher`` of ``fisherjax.collect(..., keep_sample_grads=True)`` on the
    family's batch, built once per family."""
    cache = {}

    def make(kind):
        if kind not in cache:
            model, batch = family(kind)[:2]
            cache[kind] = fisherjax.collect(model, [batch], task="t", keep_sample_grads=True, progress=False)
        return cache[kind]

    return make


def _slices(layout):
    dims = (layout.num_heads, layout.num_kv_heads, layout.head_dim)
    for b, block in enumerate(BLOCKS):
        for layer in range(layout.num_layers):
            for head in range(layout.heads_of(block)):
                yield b, block, layer, head, dims


def _check_against_dense(kind, spectra, layout, hf_grads, hf_diagonal, tokens, rtol=1e-5):
    """Every (block, layer, head): eigenvalues within ``rtol`` of the dense slice Fisher's (those
    above 1e-6·λ_max), zero padding beyond ``n``, the summaries' definitions, and trace = the
    slice's sum of the diagonal Fisher ``hf_diagonal``."""
    n = len(tokens)
    assert spectra.n_samples == n and spectra.top.shape == (4, layout.num_layers, layout.num_heads, TOP_K)
    worst, checked = 0.0, 0
    for b, block, layer, head, dims in _slices(layout):
        g = _hf_slice(kind, hf_grads, block, layer, head, dims)
        assert g.shape[1] == spectra.dimension[b], (block, g.shape)
        lam = _dense_spectrum(g, tokens)
        assert np.all(np.abs(lam[n:]) <= 1e-9 * lam[0])  # rank ≤ n < D
        top = spectra.top[b, layer, head]
        big = lam[:n] > 1e-6 * lam[0]
        worst = max(worst, float(np.max(np.abs(top[:n][big] - lam[:n][big]) / lam[:n][big])))
        np.testing.assert_array_equal(top[n:], 0.0)  # zero-padded beyond n
        for name, value in _summaries(lam, g.shape[1], n).items():
            np.testing.assert_allclose(getattr(spectra, name)[b, layer, head], value, rtol=rtol, err_msg=f"{block} {layer} {head} {name}")
        trace = _hf_slice(kind, hf_diagonal, block, layer, head, dims).sum()
        np.testing.assert_allclose(spectra.trace[b, layer, head], trace, rtol=1e-5, err_msg=f"{block} {layer} {head} trace")
        checked += 1
    assert worst <= rtol, f"{kind}: eigenvalues off by {worst:.2e} (relative)"
    assert checked == layout.num_layers * (2 * layout.num_heads + 2 * layout.num_kv_heads)
    present = np.broadcast_to(spectra.present, spectra.rank.shape)
    assert np.all(spectra.rank[present] <= n) and np.all(spectra.rank[~present] == -1)
    assert np.all(spectra.condition[present] >= 1) and np.all(np.isnan(spectra.condition[~present]))
    assert np.all(np.isnan(spectra.top[~present]))
    assert np.all(spectra.lambda_min[present] == 0)  # D > n


# ---------------------------------------------------------------------------------------------
# Every head of every block, every family
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FAST_FAMILIES)
def test_block_route_equals_dense_eigh(kind, family):
    """For every (block, layer, head) of every family the Gram route's eigenvalues equal ``eigh`` of
    the dense ``D × D`` slice Fisher built in float64 from torch.func's per-sample gradients of the
    Hugging Face model, sliced in HF's tensors with their own index arithmetic (≤ 1e-5 relative on
    eigenvalues above 1e-6·λ_max); the summaries equal their definitions and the trace is the
    slice's sum of ``SampleGrads.fisher()``."""
    model, _, tokens, ref, samples = family(kind)
    spectra = blocks.block_spectra(samples, model.layout, top_k=TOP_K)
    n = len(tokens)
    diagonal = _in_hf_space(kind, {p: np.asarray(v, np.float64)[None] for p, v in samples.fisher().items()}, ref)
    _check_against_dense(kind, spectra, model.layout, ref, diagonal, tokens)
    np.testing.assert_array_equal(spectra.sample_ids, np.arange(100, 100 + n))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_collected_task(kind, family, collected):
    """A TaskFisher from ``collect(..., keep_sample_grads=True)``: exact against the dense spectra of
    its own kept gradients (mapped to HF's tensors), and against torch.func's to the gradients'
    own agreement (float32 on both sides)."""
    model, _, tokens, ref, _ = family(kind)
    fisher = collected(kind)
    kept = fisher.sample_grads
    np.testing.assert_array_equal(np.asarray(kept.tokens, np.float64), tokens)
    spectra = blocks.block_spectra(fisher, model.layout, top_k=TOP_K)
    ours = _in_hf_space(kind, {p: np.asarray(v, np.float64) for p, v in kept.grads.items()}, ref)
    diagonal = _in_hf_space(kind, {p: np.asarray(v, np.float64)[None] for p, v in kept.fisher().items()}, ref)
    _check_against_dense(kind, spectra, model.layout, ours, diagonal, tokens)
    n = len(tokens)
    for b, block, layer, head, dims in _slices(model.layout):
        lam = _dense_spectrum(_hf_slice(kind, ref, block, layer, head, dims), tokens)[:n]
        np.testing.assert_allclose(spectra.top[b, layer, head, :n], lam, rtol=1e-3, atol=1e-5 * lam[0], err_msg=f"{block} {layer} {head}")


def test_chunked_plan_and_single_slice_agree(family):
    """A memory budget that forces one layer per chunk and contraction rows cut into pieces gives
    the same spectra; :func:`slice_spectrum` gives one slice's non-zero spectrum."""
    model, _, tokens, ref, samples = family("gpt2")
    layout = model.layout
    whole = blocks.block_spectra(samples, layout, top_k=TOP_K)
    chunked = blocks.block_spectra(samples, layout, top_k=TOP_K, memory_budget_bytes=4e4)
    np.testing.assert_allclose(chunked.top, whole.top, rtol=1e-5, atol=1e-6 * np.nanmax(whole.top))
    np.testing.assert_allclose(chunked.trace, whole.trace, rtol=1e-5)
    dims = (layout.num_heads, layout.num_kv_heads, layout.head_dim)
    single = blocks.slice_spectrum(samples, layout, "v", 1, 2)
    lam = _dense_spectrum(_hf_slice("gpt2", ref, "v", 1, 2, dims), tokens)
    assert len(single) == len(tokens)
    np.testing.assert_allclose(single, lam[: len(single)], rtol=1e-5)


def test_step_plan_bounds_memory():
    """Whole layers while a layer fits (a divisor of the layer count); else one layer and each leaf
    cut along its rows into equal pieces that cover every row once."""
    leaves = (blocks.Leaf("w", ("w",), (("q", "kernel"),), 12, 100), blocks.Leaf("b", ("b",), (("q", "bias"),), 1, 96))
    n, heads = 4, 8
    per_layer = blocks.COPIES * 4 * n * (12 * 100 + 96) + blocks.GRAM_BYTES * heads * n * n
    assert blocks.step_plan(leaves, n, 6, heads, 1e9) == (6, (((0, (0, 12)), (1, (0, 1))),))
    c_l, steps = blocks.step_plan(leaves, n, 6, heads, 4.5 * per_layer)
    assert c_l == 3 and len(steps) == 1  # 4 layers fit, 3 divides 6
    c_l, steps = blocks.step_plan(leaves, n, 6, heads, 0.5 * per_layer)
    assert c_l == 1
    rows = [r for step in steps for i, r in step if i == 0]
    assert rows == [(0, 6), (6, 12)]
    assert [r for step in steps for i, r in step if i == 1] == [(0, 1)]


def test_rank_deficient_slices(family):
    """Duplicated samples: the Gram has rank 3 of 6, the tail of ``top`` is zero, and the summaries
    count only the non-zero eigenvalues."""
    model, _, _, _, samples = family("llama")
    samples = samples.select(np.array([0, 1, 2, 0, 1, 2]))
    spectra = blocks.block_spectra(samples, model.layout, top_k=TOP_K)
    present = np.broadcast_to(spectra.present, spectra.rank.shape)
    assert np.all(spectra.rank[present] == 3)
    assert np.all(spectra.top[..., 3:][present] == 0) and np.all(spectra.top[..., :3][present] > 0)
    assert np.all(spectra.effective_rank[present] <= 3 + 1e-9)
    assert len(blocks.slice_spectrum(samples, model.layout, "k", 0, 1)) == 3


def test_largest_blocks(family):
    model, _, _, _, samples = family("llama")
    spectra = blocks.block_spectra(samples, model.layout)
    top = blocks.largest_blocks(spectra, count=5)
    values = [entry.lambda_max for entry in top]
    assert len(top) == 5 and values == sorted(values, reverse=True)
    present = np.broadcast_to(spectra.present, spectra.rank.shape)
    assert values[0] == np.max(spectra.lambda_max[present]) and values[-1] == np.sort(spectra.lambda_max[present])[-5]
    for entry in top:
        assert spectra.lambda_max[BLOCKS.index(entry.block), entry.layer, entry.head] == entry.lambda_max
        assert entry.head < model.layout.heads_of(entry.block)
    assert len(blocks.largest_blocks(spectra, count=1000)) == int(present.sum())  # absent kv heads skipped
    leaves = jax.tree.leaves(spectra)
    assert len(leaves) == 8 and all(isinstance(x, np.ndarray) for x in leaves)
    doubled = jax.tree.map(lambda x: 2 * x, spectra)
    assert doubled.heads == (4, 2, 2, 4) and doubled.damping_rule == spectra.damping_rule


# ---------------------------------------------------------------------------------------------
# A layout with D ≤ n: λ_min of the block is not 0
# ---------------------------------------------------------------------------------------------


def _small_task(seed=0, n=7, layers=2, d=3, heads=2, kv_heads=1, hd=1, dtype=np.float32):
    """A synthetic Llama-rule layout with q/k/v biases and ``D = d·hd + hd ≤ n`` and random gradients
    (one sample with ``T_i = 0``)."""
    shapes = {
        "layers/self_attn/q_proj/kernel": (layers, d, heads * hd), "layers/self_attn/q_proj/bias": (layers, heads * hd),
        "layers/self_attn/k_proj/kernel": (layers, d, kv_heads * hd), "layers/self_attn/k_proj/bias": (layers, kv_heads * hd),
        "layers/self_attn/v_proj/kernel": (layers, d, kv_heads * hd), "layers/self_attn/v_proj/bias": (layers, kv_heads * hd),
        "layers/self_attn/o_proj/kernel": (layers, heads * hd, d),
    }
    layout = ModelLayout.from_rules({p: np.zeros(s, np.float32) for p, s in shapes.items()}, FAMILY_RULES["llama"],
                                    num_heads=heads, num_kv_heads=kv_heads, head_dim=hd, layered="layers/")
    rng = np.random.default_rng(seed)
    grads = {p: rng.normal(size=(n, *s)).astype(dtype) for p, s in shapes.items()}
    tokens = rng.integers(1, 9, size=n)
    tokens[3] = 0
    return layout, SampleGrads(np.arange(n), tokens, grads), shapes


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_dimension_below_samples(dtype):
    """``D ≤ n``: rank ``D``, ``λ_min`` the block's smallest eigenvalue, a finite condition number; the
    sample with ``T_i = 0`` is not counted; bfloat16 storage is read as its values."""
    layout, samples, _ = _small_task(dtype=dtype)
    keep = np.asarray(samples.tokens) > 0
    tokens = np.asarray(samples.tokens, np.float64)[keep]
    spectra = blocks.block_spectra(samples, layout, top_k=TOP_K, damping=0.01)
    assert spectra.n_samples == 6 and list(spectra.sample_ids) == [0, 1, 2, 4, 5, 6]
    assert spectra.dimension == (4, 4, 4, 3) and spectra.damping_rule == "0.01 (fixed)"
    for b, block in enumerate(BLOCKS):
        for layer in range(2):
            for head in range(layout.heads_of(block)):
                g = {p: np.asarray(v, np.float64)[keep][:, layer] for p, v in samples.grads.items()}
                pre = f"layers/self_attn/{block}_proj/"
                if block == "o":
                    x = g[pre + "kernel"][:, head, :]  # rows of head `head` (head_dim 1)
                else:
                    x = np.concatenate([g[pre + "kernel"][:, :, head], g[pre + "bias"][:, head, None]], axis=1)
                lam = _dense_spectrum(x, tokens)
                D = x.shape[1]
                np.testing.assert_allclose(spectra.top[b, layer, head, :D], lam, rtol=1e-5)
                assert spectra.rank[b, layer, head] == D
                np.testing.assert_allclose(spectra.lambda_min[b, layer, head], lam[-1], rtol=1e-5)
                np.testing.assert_allclose(spectra.condition[b, layer, head], (lam[0] + 0.01) / (lam[-1] + 0.01), rtol=1e-5)


def test_without_bias_and_errors():
    layout, samples, _ = _small_task()
    with_bias = blocks.block_spectra(samples, layout)
    without = blocks.block_spectra(samples, layout, include_bias=False)
    assert with_bias.dimension == (4, 4, 4, 3) and without.dimension == (3, 3, 3, 3)
    np.testing.assert_array_equal(without.top[3], with_bias.top[3])  # o has no bias either way
    present = np.broadcast_to(without.present, without.trace.shape)
    assert np.all((without.trace < with_bias.trace)[:3][present[:3]])

    no_bias = SampleGrads(samples.sample_ids, samples.tokens, {p: v for p, v in samples.grads.items() if not p.endswith("bias")})
    with pytest.raises(DataError, match="include_bias=False"):
        blocks.block_spectra(no_bias, layout)
    blocks.block_spectra(no_bias, layout, include_bias=False)
    with pytest.raises(DataError, match="no sample with active tokens"):
        blocks.block_spectra(SampleGrads(samples.sample_ids, np.zeros(7, int), samples.grads), layout)
    for bad in (dict(top_k=0), dict(rank_tol=1.0), dict(damping=-1.0), dict(relative_damping=-1e-3)):
        with pytest.raises(ConfigError, match="block spectra"):
            blocks.block_spectra(samples, layout, **bad)
    with pytest.raises(ConfigError, match="heads 0..0"):
        blocks.slice_spectrum(samples, layout, "k", 0, 1)  # one kv head
    with pytest.raises(ConfigError, match="block must be"):
        blocks.slice_spectrum(samples, layout, "x", 0, 0)


def test_refuses_a_true_fisher_task(family, collected):
    model, fisher = family("llama")[0], collected("llama")
    with pytest.raises(DataError, match="pass task.sample_grads"):
        blocks.block_spectra(dataclasses.replace(fisher, fisher_type="true"), model.layout)
    with pytest.raises(DataError, match="keep_sample_grads"):
        blocks.block_spectra(dataclasses.replace(fisher, sample_grads=None), model.layout)
