"""K-FAC against independent references: factors from activations and output gradients recorded
with PyTorch hooks on Hugging Face's models (numpy float64), a single token's exact Fisher from
torch.func, dense Kronecker products and solves in numpy, EK-FAC's scales as the diagonal of the
dense Fisher in the Kronecker eigenbasis, and kfac-jax's own Kronecker factors."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FAST_FAMILIES, padded_batch

torch = pytest.importorskip("torch")

import fisherjax  # noqa: E402
from fisherjax.curvature import kfac as K  # noqa: E402
from fisherjax.curvature.factors import KFAC, KroneckerFactor  # noqa: E402
from fisherjax.data import IGNORE, Batch, predicted_labels  # noqa: E402
from fisherjax.errors import ConfigError, DataError  # noqa: E402
from fisherjax.fisher.step import sample_labels_per_row  # noqa: E402
from fisherjax.layout import flatten  # noqa: E402
from torch_reference import our_location, torch_per_sample_grads  # noqa: E402

SEQ = 10


def _batch(seed, lengths, prompt_row=None, filler=()):
    """Right-padded batch; row ``prompt_row`` has a 3-token prompt; ``filler`` rows are fillers."""
    ids, mask = padded_batch(np.random.default_rng(seed), list(lengths), SEQ, "right")
    labels = np.where(mask == 1, ids, IGNORE).astype(np.int32)
    if prompt_row is not None:
        labels[prompt_row, :3] = IGNORE
    sample_ids = np.arange(len(lengths)) + 10 * seed
    sample_ids[list(filler)] = -1
    return Batch(ids, mask, labels, sample_ids)


BATCHES = (
    _batch(0, (10, 6, 3, 10, 1), prompt_row=1),  # row 4: one token, predicts nothing (T = 0)
    _batch(1, (7, 10, 0, 4, 9), prompt_row=4, filler=(2,)),
)


@pytest.fixture(scope="module")
def family(hf_checkpoint):
    """Per family: (our model, the torch model), built once."""
    cache = {}

    def make(kind):
        if kind not in cache:
            directory, torch_model = hf_checkpoint(kind)
            cache[kind] = (fisherjax.load_pretrained(directory), torch_model)
        return cache[kind]

    return make


# ---- the independent reference: hooks on the HF model --------------------------------------------


def _dense_modules(torch_model):
    from transformers.pytorch_utils import Conv1D

    return {name: m for name, m in torch_model.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D)) and re.search(r"\.(h|layers)\.\d+\.", name)}


def torch_recordings(torch_model, ids, labels):
    """``{module: (a [b, t, d_in], δ [b, t, d_out])}`` float64 of every dense module in the
    layers: forward hooks record the input, tensor hooks on the output its gradient under the
    token-sum loss ``Σ_i Σ_t −log p(labels[t+1])`` (no attention mask: right padding)."""
    records, handles = {}, []
    for name, module in _dense_modules(torch_model).items():
        def hook(mod, inputs, output, name=name):
            records[name] = [inputs[0].detach()]
            output.register_hook(lambda g: records[name].append(g.detach()))

        handles.append(module.register_forward_hook(hook))
    try:
        logits = torch_model(torch.tensor(ids, dtype=torch.long)).logits[:, :-1]
        target = torch.tensor(labels[:, 1:], dtype=torch.long)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        (-(logp * (target != IGNORE)).sum()).backward()
    finally:
        for h in handles:
            h.remove()
        torch_model.zero_grad(set_to_none=True)
    return {name: (a.numpy().astype(np.float64), d.numpy().astype(np.float64)) for name, (a, d) in records.items()}


def reference_weights(batch):
    """Counted positions (real tokens up to the last that predicts a label), ``1/(R_i)`` and
    ``1/T_i`` per position, from the labels with plain numpy (rows with no label weigh 0)."""
    mask = batch.attention_mask.astype(bool)
    labels = np.where(mask & np.roll(mask, 1, axis=1), batch.labels, IGNORE)
    labels[:, 0] = IGNORE
    predicting = np.zeros_like(mask)
    predicting[:, :-1] = labels[:, 1:] != IGNORE
    tokens = predicting.sum(1)
    valid = (tokens > 0) & (batch.sample_ids >= 0)
    counted = np.zeros_like(mask)
    for i in np.flatnonzero(valid):
        counted[i, : np.flatnonzero(predicting[i]).max() + 1] = mask[i, : np.flatnonzero(predicting[i]).max() + 1]
    r = counted.sum(1)
    u = np.where(counted, 1.0 / np.maximum(r, 1)[:, None], 0.0)
    w = np.where(counted, 1.0 / np.maximum(tokens, 1)[:, None], 0.0)
    return u, w, counted, int(valid.sum())


def block_columns(kind, width, heads, head_dim):
    """Output columns of q, k, v in a fused HF projection, by HF's own layout: GPT-2 ``[Q | K | V]``,
    GPT-NeoX ``[head, (q, k, v), head_dim]``."""
    if kind == "gpt2":
        d = width // 3
        return {b: np.arange(i * d, (i + 1) * d) for i, b in enumerate("qkv")}
    index = np.arange(width).reshape(heads, 3, head_dim)
    return {b: index[:, i].reshape(-1) for i, b in enumerate("qkv")}


def reference_factors(kind, torch_model, batches, cfg, labels_of=None):
    """``{our factor key: [layer] list of (A, G)}`` in float64 from torch hooks; ``labels_of(batch)``
    replaces the data labels by lists of drawn labels (``G`` averaged over them)."""
    sums: dict = {}
    n = 0
    for batch in batches:
        u, w, counted, valid = reference_weights(batch)
        n += valid
        draws = labels_of(batch) if labels_of else [batch.labels]
        recs = [torch_recordings(torch_model, batch.input_ids, lab) for lab in draws]
        for name, (a, _) in recs[0].items():
            module = _dense_modules(torch_model)[name]
            path, layer, _ = our_location(kind, name + ".weight")
            if module.bias is not None:
                a = np.concatenate([a, np.ones_like(a[..., :1])], -1)
            grams = [np.einsum("bto,bt,btp->op", rec[name][1], w, rec[name][1]) for rec in recs]
            for rec in recs:  # positions that are not counted carry no gradient
                assert np.abs(rec[name][1][~counted]).max() <= 1e-6 * np.abs(rec[name][1]).max(), name
            g = np.mean(grams, 0)
            a_sum = np.einsum("bti,bt,btj->ij", a, u, a)
            width = g.shape[-1]
            if "c_attn" in name or "query_key_value" in name:
                cols = block_columns(kind, width, cfg.num_heads, cfg.head_dim)
                parts = {f"{path}#{b}": g[np.ix_(c, c)] for b, c in cols.items()}
            else:
                parts = {path: g}
            for key, g_part in parts.items():
                old = sums.setdefault(key, {}).get(layer, (0.0, 0.0))
                sums[key][layer] = (old[0] + a_sum, old[1] + g_part)
    return {key: {layer: (a / n, g / n) for layer, (a, g) in per.items()} for key, per in sums.items()}, n


def _check_against(kfac, ref, label):
    errors = []
    assert set(kfac.factors) == set(ref), (set(kfac.factors) ^ set(ref))
    for key, per_layer in ref.items():
        f = kfac.factors[key]
        for layer, (a, g) in per_layer.items():
            for ours, expected, what in ((f.inputs[layer], a, "A"), (f.outputs[layer], g, "G")):
                err = float(np.abs(np.asarray(ours, np.float64) - expected).max() / np.abs(expected).max())
                errors.append(err)
                assert err <= 2e-5, f"{label} {key} layer {layer} {what}: max error / max {err:.2e}"
    return max(errors)


@pytest.mark.parametrize("kind", FAST_FAMILIES)
def test_factors_equal_torch_hooks(kind, family):
    """Empirical factors over two batches (prompts, padding, a row with T = 0, a filler row)
    equal ``A = (1/n) Σ_i (1/R_i) Σ_t ā āᵀ`` and ``G = (1/n) Σ_i (1/T_i) Σ_t δ δᵀ`` from torch
    hooks, and δ is zero at every position that is not counted."""
    model, torch_model = family(kind)
    kfac = K.kfac_factors(model, model.params, BATCHES)
    ref, n = reference_factors(kind, torch_model, BATCHES, model.config)
    assert kfac.n_samples == n == 8 and kfac.fisher_type == "empirical"
    tokens = sum(int(((b.labels[:, 1:] != IGNORE).sum(1) * (b.sample_ids >= 0)).sum()) for b in BATCHES)
    assert kfac.n_tokens == tokens
    _check_against(kfac, ref, kind)
    # what the method comparison's memory rule counts for them (fisherjax.curvature.compare.peak_bytes)
    assert K.factor_floats(model) == sum(f.inputs.size + f.outputs.size for f in kfac.factors.values())


@pytest.mark.parametrize("kind", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_true_fisher_factors_equal_torch_hooks_on_the_drawn_labels(kind, family):
    """The true Fisher's ``G`` averages the draws Phase 1 makes (``split(fold_in(key, id), S)``
    per sample) — reproduced here and fed to the torch reference; ``A`` does not change."""
    model, torch_model = family(kind)
    key, draws = jax.random.key(7), 2

    apply = jax.jit(model.apply)

    def labels_of(batch):
        logits = apply(model.params, batch.input_ids, batch.attention_mask)
        labels = predicted_labels(jnp.asarray(batch.labels), jnp.asarray(batch.attention_mask))
        keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i), draws))(jnp.asarray(batch.sample_ids))
        return [np.asarray(sample_labels_per_row(keys[:, s], logits, labels)) for s in range(draws)]

    kfac = K.kfac_factors(model, model.params, BATCHES, fisher_type="true", key=key, true_samples=draws)
    ref, _ = reference_factors(kind, torch_model, BATCHES, model.config, labels_of)
    assert kfac.fisher_type == "true"
    _check_against(kfac, ref, f"{kind} true")
    with pytest.raises(ConfigError, match="PRNG key"):
        K.kfac_factors(model, model.params, BATCHES, fisher_type="true")


def _single_token_batch():
    """One sample, two tokens (position 0 predicts token 1), padded to the test's batch shape."""
    ids = np.zeros((5, SEQ), np.int32)
    mask = np.zeros((5, SEQ), np.int32)
    ids[0, :2], mask[0, :2] = (17, 42), 1
    labels = np.where(mask == 1, ids, IGNORE).astype(np.int32)
    return Batch(ids, mask, labels, np.array([3, -1, -1, -1, -1]))


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox", "llama"])
def test_one_token_kronecker_is_the_exact_fisher(kind, family):
    """One sample with one predicted token: ``A ⊗ G = g gᵀ / T`` (torch.func per-sample gradients)
    for every dense layer and fused block, bias row included."""
    model, torch_model = family(kind)
    batch = _single_token_batch()
    kfac = K.kfac_factors(model, model.params, [batch])
    assert (kfac.n_samples, kfac.n_tokens) == (1, 1)
    grads = torch_per_sample_grads(torch_model, batch.input_ids[:1], batch.labels[:1])
    modules = _dense_modules(torch_model)
    checked = 0
    for name, module in modules.items():
        path, layer, transposed = our_location(kind, name + ".weight")
        g = grads[name + ".weight"][0]
        g = g.T if transposed else g  # ours: [d_in, d_out]
        if module.bias is not None:
            g = np.concatenate([g, grads[name + ".bias"][0][None]], 0)
        parts = {path: g}
        if "c_attn" in name or "query_key_value" in name:
            cols = block_columns(kind, g.shape[1], model.config.num_heads, model.config.head_dim)
            parts = {f"{path}#{b}": g[:, c] for b, c in cols.items()}
        for key, gb in parts.items():
            f = kfac.factors[key]
            a, g_out = (np.asarray(x[layer], np.float64) for x in (f.inputs, f.outputs))
            if gb.size <= 1600:
                dense, exact = np.kron(a, g_out), np.outer(gb.reshape(-1), gb.reshape(-1))  # row-major vec
            else:  # the same operators on random probes X: A X G = ḡ ⟨ḡ, X⟩
                probes = np.random.default_rng(checked).normal(size=(3, *gb.shape))
                dense, exact = a @ probes @ g_out, gb * np.einsum("io,kio->k", gb, probes)[:, None, None]
            np.testing.assert_allclose(dense, exact, rtol=1e-4, atol=1e-5 * np.abs(exact).max(), err_msg=f"{kind} {key} {layer}")
            checked += 1
    assert checked >= 8
    filler = Batch(batch.input_ids, np.zeros_like(batch.attention_mask), batch.labels, np.full(5, -1))
    with pytest.raises(DataError, match="no sample"):
        K.kfac_factors(model, model.params, [filler])


# ---- products ----------------------------------------------------------------------------------


def _random_kfac(model, seed=0) -> KFAC:
    """Random PSD factors with the shapes of the model's K-FAC (no data needed)."""
    rng = np.random.default_rng(seed)
    factors = {}
    layers = model.config.num_layers

    def psd(d):
        x = rng.normal(size=(layers, d, d + 2))
        return (x @ np.swapaxes(x, -1, -2) / d).astype(np.float32)

    for fs in K.factor_sites(model):
        d_in, d_out = model.layout.specs[fs.kernel].shape[-2:]
        width = len(fs.columns) if fs.columns is not None else d_out
        factors[fs.key] = KroneckerFactor(psd(d_in + (fs.bias is not None)), psd(width), fs.kernel, fs.bias, fs.block)
    return KFAC(factors, 1, 1)


def _dense_reference(kind, model, kfac, v, solve_damping=None, scales=None, keys=None):
    """Per leaf, numpy float64: ``kron(A, G) vec(W̄)`` or ``solve(kron(A, G) + λI, vec(W̄))``
    (``scales``: EK-FAC's ``U diag(S + λ) Uᵀ`` instead), with the fused blocks split by HF's index
    arithmetic (:func:`block_columns`)."""
    flat = {p: np.asarray(x, np.float64) for p, x in flatten(v).items()}
    out = {p: np.zeros_like(x) for p, x in flat.items()}
    cfg = model.config
    for key, f in kfac.factors.items():
        if keys is not None and key not in keys:
            continue
        w = flat[f.kernel]
        cols = slice(None) if f.block is None else block_columns(kind, w.shape[-1], cfg.num_heads, cfg.head_dim)[f.block]
        for layer in range(w.shape[0]):
            wb = w[layer][:, cols]
            if f.bias is not None:
                wb = np.concatenate([wb, flat[f.bias][layer][cols][None]], 0)
            a, g = np.asarray(f.inputs[layer], np.float64), np.asarray(f.outputs[layer], np.float64)
            m = np.kron(a, g)
            if scales is not None:
                u = np.kron(np.asarray(scales[key].input_vectors[layer], np.float64), np.asarray(scales[key].output_vectors[layer], np.float64))
                m = u @ np.diag(np.asarray(scales[key].scales[layer], np.float64).reshape(-1)) @ u.T
            if solve_damping is None:
                r = m @ wb.reshape(-1)
            else:
                r = np.linalg.solve(m + solve_damping * np.eye(len(m)), wb.reshape(-1))
            r = r.reshape(wb.shape)
            if f.bias is not None:
                out[f.bias][layer][cols] = r[-1]
                r = r[:-1]
            out[f.kernel][layer][:, cols] = r
    return out


def _small_model(kind):
    """A small model of our own (the dense Kronecker matrices stay a few hundred wide)."""
    from conftest import tiny_config

    from fisherjax.config import RopeConfig
    from fisherjax.models.model import Model

    heads = dict(num_heads=2, num_kv_heads=1 if kind == "llama" else 2)
    return Model.init(tiny_config(kind, hidden_size=16, intermediate_size=24, head_dim=8, rope=RopeConfig(10000.0, 8) if kind != "gpt2" else None, **heads), seed=1)


@pytest.mark.parametrize("kind", ["gpt2", pytest.param("gpt_neox", marks=pytest.mark.slow), pytest.param("llama", marks=pytest.mark.slow)])
def test_products_equal_dense_kronecker(kind):  # the products are layout-blind given factors; NeoX's factors: test_factors_equal_torch_hooks
    """``kfac_vector_product`` = ``kron(A, G) vec(W̄)`` and ``kfac_inverse_product`` =
    ``solve(kron(A, G) + λI, vec(W̄))`` per covered leaf (fused blocks, biases, GQA widths);
    uncovered leaves: zeros / ``v / λ`` / ``v / (diag + λ)``."""
    model = _small_model(kind)
    kfac = _random_kfac(model)
    rng = np.random.default_rng(1)
    v = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), model.params)
    diag = jax.tree.map(lambda x: rng.uniform(0.5, 2.0, size=x.shape).astype(np.float32), model.params)
    lam = 0.3
    covered = {f.kernel for f in kfac.factors.values()} | {f.bias for f in kfac.factors.values() if f.bias}
    flat_v, flat_d = flatten(v), flatten(diag)

    product = flatten(K.kfac_vector_product(kfac, model.layout, v))
    with_diag = flatten(K.kfac_vector_product(kfac, model.layout, v, diagonal=diag))
    ref = _dense_reference(kind, model, kfac, v)
    eigen = K.decompose(kfac)
    inverse = flatten(K.kfac_inverse_product(eigen, model.layout, v, lam))
    inverse_d = flatten(K.kfac_inverse_product(eigen, model.layout, flat_v, lam, diagonal=diag))
    ref_inv = _dense_reference(kind, model, kfac, v, solve_damping=lam)
    assert set(product) == set(flat_v) == set(inverse_d)
    for p in flat_v:
        if p in covered:
            for ours, expected in ((product[p], ref[p]), (with_diag[p], ref[p])):
                np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max(), err_msg=p)
            for ours in (inverse[p], inverse_d[p]):
                np.testing.assert_allclose(ours, ref_inv[p], rtol=1e-3, atol=1e-5 * np.abs(ref_inv[p]).max(), err_msg=p)
        else:
            np.testing.assert_array_equal(product[p], 0.0)
            np.testing.assert_allclose(with_diag[p], flat_d[p] * flat_v[p], rtol=1e-6)
            np.testing.assert_allclose(inverse[p], flat_v[p] / lam, rtol=1e-6)
            np.testing.assert_allclose(inverse_d[p], flat_v[p] / (flat_d[p] + lam), rtol=1e-6)
    with pytest.raises(ConfigError, match="damping"):
        K.kfac_inverse_product(eigen, model.layout, v, 0.0)


def test_attention_factors_are_head_sub_blocks(family):
    """q/k/v: the shared ``A`` and each head's diagonal block of the block's ``G`` (GQA: kv heads);
    o: each head's block of ``A`` (no bias coordinate) and the shared ``G``."""
    for kind in ("gpt2", "gpt_neox", "llama"):
        model, _ = family(kind)
        kfac = _random_kfac(model, seed=3)
        heads = K.attention_factors(kfac, model.layout)
        cfg, hd = model.config, model.config.head_dim
        assert set(heads) == {"q", "k", "v", "o"}
        for block in "qkv":
            key = next(k for k in kfac.factors if re.search(rf"(#{block}$|/{block}_proj/kernel$)", k))
            f = kfac.factors[key]
            n = cfg.num_heads if block == "q" else cfg.num_kv_heads
            expected = np.stack([np.asarray(f.outputs)[:, h * hd:(h + 1) * hd, h * hd:(h + 1) * hd] for h in range(n)], 1)
            np.testing.assert_array_equal(heads[block].outputs, expected)
            np.testing.assert_array_equal(heads[block].inputs, f.inputs)
            assert heads[block].has_bias == (f.bias is not None)
        o = kfac.factors[model.layout.block_sources("o", "kernel")[0]]
        expected = np.stack([np.asarray(o.inputs)[:, h * hd:(h + 1) * hd, h * hd:(h + 1) * hd] for h in range(cfg.num_heads)], 1)
        np.testing.assert_array_equal(heads["o"].inputs, expected)
        np.testing.assert_array_equal(heads["o"].outputs, o.outputs)
        assert not heads["o"].has_bias


def test_spectrum_helpers_equal_dense_eigenvalues(family):
    """``eigenvalues`` are those of every ``kron(A, G)`` (numpy ``eigvalsh``), and ``kronecker_top``
    and ``kronecker_extremes`` their top and ends from ``factor_values``; ``slice_top`` is
    ``λ_max`` of the head slice's ``kron(A_S, G_hh)`` (q/k/v, bias row on or off) or
    ``kron(A_hh, G)`` (o), sliced here with plain index arithmetic; ``factors_of`` rebuilds A, G."""
    for kind in ("gpt2", "llama"):
        model, _ = family(kind)
        kfac = _random_kfac(model, seed=4)
        eigen = K.decompose(kfac)
        rebuilt = K.factors_of(eigen)
        for key, f in kfac.factors.items():
            np.testing.assert_allclose(rebuilt.factors[key].inputs, f.inputs, atol=1e-5 * np.abs(f.inputs).max())
        values = np.asarray(K.eigenvalues(eigen))
        assert values.size == sum(f.inputs.shape[-1] * f.outputs.shape[-1] * f.inputs.shape[0] for f in kfac.factors.values())
        start = 0
        for f in kfac.factors.values():
            size = f.inputs.shape[-1] * f.outputs.shape[-1]
            if size <= 1600:
                dense = np.linalg.eigvalsh(np.kron(np.asarray(f.inputs[1], np.float64), np.asarray(f.outputs[1], np.float64)))
                np.testing.assert_allclose(np.sort(values[start + size: start + 2 * size]), dense, rtol=1e-4, atol=1e-6 * dense.max())
            start += size * f.inputs.shape[0]
        # the spectrum from the factors' eigenvalues alone (no eigenvectors, no [parameters] array of products)
        spectra = K.factor_values(kfac)
        assert set(spectra) == set(kfac.factors)
        for key, (s_a, s_g) in spectra.items():
            np.testing.assert_allclose(s_a, eigen.factors[key].input_values, rtol=1e-4, atol=1e-6 * s_a.max())
            np.testing.assert_allclose(s_g, eigen.factors[key].output_values, rtol=1e-4, atol=1e-6 * s_g.max())
        np.testing.assert_allclose(K.kronecker_top(spectra, 7), np.sort(values)[::-1][:7], rtol=1e-4)
        assert K.kronecker_top(spectra, values.size + 5).size == values.size
        np.testing.assert_allclose(K.kronecker_extremes(spectra), (values.min(), values.max()), rtol=1e-4, atol=1e-6 * values.max())
        cfg, hd = model.config, model.config.head_dim
        q_key = next(k for k in kfac.factors if re.search(r"(#q$|/q_proj/kernel$)", k))
        k_key = next(k for k in kfac.factors if re.search(r"(#k$|/k_proj/kernel$)", k))
        o = kfac.factors[model.layout.block_sources("o", "kernel")[0]]
        cases = [(("q", 1, 3), q_key, True), (("k", 0, cfg.num_kv_heads - 1), k_key, False), (("o", 1, 2), None, True)]
        for (block, layer, head), key, bias in cases:
            if block == "o":
                a = np.asarray(o.inputs[layer], np.float64)[head * hd:(head + 1) * hd, head * hd:(head + 1) * hd]
                g = np.asarray(o.outputs[layer], np.float64)
            else:
                f = kfac.factors[key]
                a = np.asarray(f.inputs[layer], np.float64)
                a = a if bias or f.bias is None else a[:-1, :-1]
                g = np.asarray(f.outputs[layer], np.float64)[head * hd:(head + 1) * hd, head * hd:(head + 1) * hd]
            expected = np.linalg.eigvalsh(np.kron(a, g))[-1]
            np.testing.assert_allclose(K.slice_top(eigen, model.layout, (block, layer, head), include_bias=bias), expected, rtol=1e-4)
            # from the factors themselves (what the method comparison passes), without the rebuild
            np.testing.assert_allclose(K.slice_tops(kfac, model.layout, [(block, layer, head)], include_bias=bias), [expected], rtol=1e-4)


# ---- EK-FAC -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_ekfac_scales_are_the_fisher_diagonal_in_the_eigenbasis(kind, family):
    """After the refit, ``S = diag(Uᵀ F U)`` with ``U = kron(U_A, U_G)`` and the dense
    ``F = (1/n) Σ_i g_i g_iᵀ / T_i`` from torch.func; the inverse product then uses ``S + λ``."""
    model, torch_model = family(kind)
    batch = BATCHES[0]
    eigen = K.decompose(K.kfac_factors(model, model.params, [batch]))
    refit = K.refit_eigenvalues(model, model.params, [batch], eigen)
    assert refit.refit and not eigen.refit
    valid = reference_weights(batch)[3]
    tokens = (batch.labels[:, 1:] != IGNORE).sum(1)
    rows = np.flatnonzero(tokens > 0)
    grads = torch_per_sample_grads(torch_model, batch.input_ids[rows], batch.labels[rows])
    modules = _dense_modules(torch_model)
    checked = 0
    for name, module in modules.items():
        path, layer, transposed = our_location(kind, name + ".weight")
        if layer != 0:
            continue
        g = grads[name + ".weight"]
        g = np.swapaxes(g, -1, -2) if transposed else g
        if module.bias is not None:
            g = np.concatenate([g, grads[name + ".bias"][:, None]], 1)
        parts = {path: g}
        if "c_attn" in name or "query_key_value" in name:
            cols = block_columns(kind, g.shape[-1], model.config.num_heads, model.config.head_dim)
            parts = {f"{path}#{b}": g[..., c] for b, c in cols.items()}
        for key, gb in parts.items():
            if gb[0].size > 1600:  # the MLP kernels: dense F and U would be ~4000 wide
                continue
            checked += 1
            vecs = gb.reshape(len(rows), -1)
            fisher = (vecs.T / tokens[rows]) @ vecs / valid
            e = refit.factors[key]
            u = np.kron(np.asarray(e.input_vectors[layer], np.float64), np.asarray(e.output_vectors[layer], np.float64))
            expected = np.diag(u.T @ fisher @ u).reshape(gb.shape[1:])
            np.testing.assert_allclose(e.scales[layer], expected, rtol=1e-3, atol=1e-5 * expected.max(), err_msg=key)
            np.testing.assert_array_equal(e.input_vectors, eigen.factors[key].input_vectors)
    assert checked >= 4
    rng = np.random.default_rng(2)
    v = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), model.params)
    small = {k for k, e in refit.factors.items() if e.scales[0].size <= 1600}
    kfac = KFAC({k: KroneckerFactor(jnp.zeros_like(e.input_vectors), jnp.zeros_like(e.output_vectors), e.kernel, e.bias, e.block)
                 for k, e in refit.factors.items()}, 1, 1)
    ours = flatten(K.kfac_inverse_product(refit, model.layout, v, 1e-2))
    ref = _dense_reference(kind, model, kfac, v, solve_damping=1e-2, scales=refit.factors, keys=small)
    for p in {refit.factors[k].kernel for k in small}:
        np.testing.assert_allclose(ours[p], ref[p], rtol=1e-3, atol=1e-4 * np.abs(ref[p]).max(), err_msg=p)


# ---- kfac-jax --------------------------------------------------------------------------------------


def _kfac_jax_compatible(monkeypatch):
    """kfac-jax 0.0.8 unpacks ``Primitive.get_bind_params`` as ``(subfuns, params)``; since JAX
    0.7 it returns the params alone, so its ``tag_graph_matcher.eval_jaxpr_eqn`` raises
    ``ValueError: too many values to unpack``. This test-only shim (undone after the test) accepts
    both; nothing of kfac-jax's curvature code is replaced."""
    kfac_jax = pytest.importorskip("kfac_jax")
    from jax.extend import source_info_util
    from kfac_jax._src import tag_graph_matcher

    def eval_jaxpr_eqn(eqn, in_values):
        bound = eqn.primitive.get_bind_params(eqn.params)
        subfuns, params = bound if isinstance(bound, tuple) else ([], bound)
        with source_info_util.user_context(eqn.source_info.traceback):
            out = eqn.primitive.bind(*subfuns, *in_values, **params)
        return out if isinstance(out, list) else [out]

    monkeypatch.setattr(tag_graph_matcher, "eval_jaxpr_eqn", eval_jaxpr_eqn)
    return kfac_jax


def test_factors_equal_kfac_jax(monkeypatch):
    """Two dense layers with a softmax cross-entropy registered with kfac-jax: its
    ``BlockDiagonalCurvature`` state after one ``fisher_empirical`` update (EMA weights 0, 1) has
    the same ``A`` as :func:`factors_from_recordings` with weights ``1/B`` on the same ``a, δ``,
    and ``G_kfac_jax = G_ours / B``: kfac-jax divides the per-example loss gradients by ``√B``
    before its ``1/B``-normalised statistics (``block_diagonal.py``), ours are those of
    ``F = (1/B) Σ_b g_b g_bᵀ``."""
    kfac_jax = _kfac_jax_compatible(monkeypatch)
    rng = np.random.default_rng(0)
    b, d0, d1, c = 8, 5, 6, 4
    x = jnp.asarray(rng.normal(size=(b, d0)), jnp.float32)
    y = jnp.asarray(rng.integers(0, c, size=b))
    params = {"w1": jnp.asarray(rng.normal(size=(d0, d1)) * 0.5, jnp.float32), "b1": jnp.full((d1,), 0.1),
              "w2": jnp.asarray(rng.normal(size=(d1, c)) * 0.5, jnp.float32), "b2": jnp.full((c,), -0.1)}

    def forward(params, x):
        h1 = x @ params["w1"] + params["b1"]
        a1 = jnp.tanh(h1)
        return h1, a1, a1 @ params["w2"] + params["b2"]

    def loss(params, batch):
        x, y = batch
        h1 = kfac_jax.register_dense(x @ params["w1"] + params["b1"], x, params["w1"], params["b1"])
        a1 = jnp.tanh(h1)
        logits = kfac_jax.register_dense(a1 @ params["w2"] + params["b2"], a1, params["w2"], params["b2"])
        kfac_jax.register_softmax_cross_entropy_loss(logits, y)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    estimator = kfac_jax.BlockDiagonalCurvature(loss)
    state = estimator.init(jax.random.key(0), (params, (x, y)), None, None)
    state = estimator.update_curvature_matrix_estimate(
        state, ema_old=0.0, ema_new=1.0, identity_weight=0.0, batch_size=b, rng=jax.random.key(1),
        func_args=(params, (x, y)), estimation_mode="fisher_empirical")

    # a and δ of each layer: gradients of the summed per-example losses −log p(y_b) (one position each)
    h1, a1, logits = forward(params, x)

    def nll(z):
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], 1))

    delta2 = jax.grad(nll)(logits)
    delta1 = jax.grad(lambda h: nll(jnp.tanh(h) @ params["w2"] + params["b2"]))(h1)
    weights = jnp.full((b, 1), 1.0 / b)
    for block_state, a, delta in zip(state.blocks_states, (x, a1), (delta1, delta2)):
        ours_a, ours_g = K.factors_from_recordings(a[:, None], delta[:, None], weights, bias=True)
        theirs_a, theirs_g = (np.asarray(f.value) for f in block_state.factors)
        np.testing.assert_allclose(theirs_a, ours_a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(theirs_g, ours_g / b, rtol=1e-5, atol=1e-7)


def test_wide_factors_multiply_only_the_blocks_above_the_diagonal():
    """``weighted_gram`` cuts a factor wider than two blocks and mirrors the blocks below the
    diagonal: equal to the plain weighted product (float64 numpy) for uneven block edges too."""
    from fisherjax.curvature.kfac import SYMMETRIC_BLOCK, weighted_gram

    for d in (SYMMETRIC_BLOCK - 1, 2 * SYMMETRIC_BLOCK + 5, 9 * SYMMETRIC_BLOCK):
        x = np.random.default_rng(d).standard_normal((2, 3, 4, d)).astype(np.float32)
        w = np.random.default_rng(1).uniform(size=(3, 4)).astype(np.float32)
        expected = np.einsum("lbti,bt,lbtj->lij", x.astype(np.float64), w.astype(np.float64), x.astype(np.float64))
        found = np.asarray(weighted_gram(jnp.asarray(x), jnp.asarray(w)), np.float64)
        assert found.shape == (2, d, d)
        np.testing.assert_allclose(found, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_factor_precision_is_an_option_of_the_factor_sums():
    """``kfac_factors(precision=...)`` reaches every factor GEMM (the wide, blocked ones too): on a
    CPU every precision it takes computes in float32, so the factors are the same; TF32, which
    XLA:CPU lacks, and an unknown name are refused with the option named."""
    from fisherjax.curvature.kfac import FACTOR_PRECISIONS, weighted_gram

    model = _small_model("gpt2")
    batch = _batch(3, [7, 9, 5])
    reference = K.kfac_factors(model, model.params, [batch])
    for precision in FACTOR_PRECISIONS:
        if precision == "tensorfloat32":
            with pytest.raises(ConfigError, match="'tensorfloat32' needs a GPU"):
                K.kfac_factors(model, model.params, [batch], precision=precision)
            continue
        factors = K.kfac_factors(model, model.params, [batch], precision=precision)
        for key, f in reference.factors.items():
            np.testing.assert_allclose(factors.factors[key].inputs, f.inputs, rtol=1e-6, atol=1e-7, err_msg=f"{precision} {key}")
            np.testing.assert_allclose(factors.factors[key].outputs, f.outputs, rtol=1e-6, atol=1e-7, err_msg=f"{precision} {key}")
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 800)).astype(np.float32)  # cut into blocks
    w = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(weighted_gram(jnp.asarray(x), jnp.asarray(w), "bfloat16_3x"), weighted_gram(jnp.asarray(x), jnp.asarray(w)),
                               rtol=1e-6, atol=1e-5)
    with pytest.raises(ConfigError, match="kfac precision must be one of"):
        K.kfac_factors(model, model.params, [batch], precision="fp8")
