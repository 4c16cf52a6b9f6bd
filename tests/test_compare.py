"""The Fisher method comparison against a dense empirical Fisher built in numpy float64 from
``jax.vmap(jax.grad)`` per-sample gradients (:func:`fisherjax.grads.per_sample_grads`, the
definition), and the ``curvature`` phase of ``fisherjax analyze``."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import padded_batch, tiny_config

from fisherjax.curvature import compare
from fisherjax.curvature.compare import MethodResult
from fisherjax.data import IGNORE, Batch
from fisherjax.grads import per_sample_grads
from fisherjax.models import Model
from fisherjax.telemetry import measure


def _batches():
    out = []
    for seed in range(2):
        ids, mask = padded_batch(np.random.default_rng(seed), [9, 5, 8, 3, 9, 7], 9, "right")
        labels = np.where(mask == 1, ids, IGNORE).astype(np.int32)
        labels[1, :2] = IGNORE  # a prompt
        out.append(Batch(ids, mask, labels, np.arange(6) + 6 * seed))
    return out


@pytest.fixture(scope="module")
def compared():
    model = Model.init(tiny_config("gpt2", num_layers=1, intermediate_size=16), seed=3)
    batches = _batches()
    result = compare.compare_methods(model, batches, k=6, probes=2, count=4)
    # the dense F: rows g_i / √(n T_i) of every parameter in ravel_pytree order (float64)
    rows, tokens = [], []
    for b in batches:
        ps = per_sample_grads(model, model.params, b)
        leaves = jax.tree.leaves(ps.grads)
        rows.append(np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves], axis=1))
        tokens.append(np.asarray(ps.tokens))
    g, t = np.concatenate(rows), np.concatenate(tokens)
    g, t = g[t > 0], t[t > 0]
    x = g / np.sqrt(len(t) * t)[:, None]
    return model, result, x


def test_whole_model_spectra_equal_the_dense_fisher(compared):
    model, result, x = compared
    n, d = x.shape
    assert result.n_samples == n and result.n_parameters == d == model.num_params
    exact = np.linalg.eigvalsh(x @ x.T)[::-1][:6]  # the non-zero spectrum of F = XᵀX
    np.testing.assert_allclose(result.methods["lanczos"].top, exact, rtol=1e-4)
    diag = np.square(x).sum(0)
    np.testing.assert_allclose(result.methods["diagonal"].top, np.sort(diag)[::-1][:6], rtol=1e-4)
    assert result.damping == pytest.approx(1e-3 * diag.mean(), rel=1e-4)
    d_cond = (diag.max() + result.damping) / (diag.min() + result.damping)
    assert result.methods["diagonal"].condition == pytest.approx(d_cond, rel=1e-3)
    assert result.methods["lanczos"].condition == pytest.approx((exact[0] + result.damping) / result.damping, rel=1e-3)


def test_blocks_and_approximations(compared):
    model, result, x = compared
    blocks_top = result.methods["block_spectra"].blocks_top
    assert len(result.blocks) == 4 and np.all(np.diff(blocks_top) <= 0)
    # each compared slice's λ_max is eigh of the dense slice block, and Î's slice maximum the diagonal method's
    start, offset = {}, 0  # where each leaf starts in ravel_pytree order
    for key, leaf in jax.tree_util.tree_leaves_with_path(model.params):
        start["/".join(k.key for k in key)] = offset
        offset += int(np.prod(leaf.shape))
    kernel = "layers/attn/c_attn/kernel"
    bias = "layers/attn/c_attn/bias"
    d_model, hd = 32, 8
    for j, (block, layer, head) in enumerate(result.blocks):
        assert block in ("q", "k", "v") or block == "o"
        if block == "o":
            base = start["layers/attn/c_proj/kernel"]
            rows = np.arange(head * hd, (head + 1) * hd)
            cols = (rows[:, None] * d_model + np.arange(d_model)[None, :]).reshape(-1)
            index = base + cols
        else:
            column = "qkv".index(block) * d_model + head * hd + np.arange(hd)  # GPT-2's [Q|K|V] columns
            kernel_cols = (np.arange(d_model)[:, None] * 3 * d_model + column[None, :]).reshape(-1)
            index = np.concatenate([start[kernel] + kernel_cols, start[bias] + column])
        s = x[:, index]
        assert blocks_top[j] == pytest.approx(np.linalg.eigvalsh(s @ s.T)[-1], rel=1e-4)
        assert result.methods["diagonal"].blocks_top[j] == pytest.approx(np.square(s).sum(0).max(), rel=1e-4)
    # Rayleigh quotients of an approximation never exceed its own largest eigenvalue / λ_j, and are positive
    for name in ("diagonal", "kfac"):
        m = result.methods[name]
        assert np.all(m.rayleigh > 0) and np.all(m.rayleigh * result.methods["lanczos"].top <= m.top[0] * (1 + 1e-4))
        assert 0 < m.probe_error < 10
    assert result.recommended in ("diagonal", "kfac")
    for m in result.methods.values():
        assert m.stretch.seconds > 0


def _row(top, error):
    return MethodResult(np.asarray(top, float), None, 1.0, error, None, measure(lambda: None)[1])


def test_recommendation_rule():
    methods = {"diagonal": _row([1.0], 0.9), "lanczos": _row([2.0], 0.0), "block_spectra": _row([1.0], None)}
    assert compare.recommend({**methods, "kfac": _row([1.5], 0.5)})[0] == "kfac"
    assert compare.recommend({**methods, "kfac": _row([1.5], 0.8)})[0] == "diagonal"  # not 0.75× better
    assert compare.recommend({**methods, "kfac": _row([0.5], 0.1)})[0] == "diagonal"  # top eigenvalue 0.25× Lanczos's


def test_the_comparison_runs_by_the_parameter_and_memory_rule():
    from fisherjax.pipeline import CURVATURE_AUTO_PARAMETERS, curvature_skip

    small, large = CURVATURE_AUTO_PARAMETERS, CURVATURE_AUTO_PARAMETERS + 1
    assert curvature_skip(large, 1.0, 100.0, forced=False) == "parameters"
    assert curvature_skip(large, 1.0, 100.0, forced=True) is None
    assert curvature_skip(small, 50.0, 100.0, forced=False) is None  # half of what is free
    assert curvature_skip(small, 51.0, 100.0, forced=False) == "share"
    assert curvature_skip(small, 51.0, 100.0, forced=True) is None  # --curvature: all of it
    assert curvature_skip(small, 101.0, 100.0, forced=False) == "memory"  # --curvature would not help either
    assert curvature_skip(large, 101.0, 100.0, forced=True) == "memory"
    assert curvature_skip(small, 10.0**15, None, forced=False) is None  # free memory not known
    # the Gram route in column slices needs only `least`: --curvature runs it, a default run does not
    assert curvature_skip(small, 80.0, 100.0, forced=False, least=20.0) == "share"
    assert curvature_skip(small, 150.0, 100.0, forced=False, least=20.0) == "share"
    assert curvature_skip(small, 150.0, 100.0, forced=True, least=20.0) is None
    assert curvature_skip(large, 150.0, 100.0, forced=True, least=101.0) == "memory"
    assert curvature_skip(small, 150.0, 100.0, forced=False, least=101.0) == "memory"


def test_analyze_skips_the_comparison_above_the_limit(cli_checkpoint, tmp_path, monkeypatch):
    """Models above the limit are skipped unless --curvature is given; the full section is checked on
    the demo by tests/test_cli.py, which runs every phase."""
    from fisherjax import pipeline
    from fisherjax.cli import main
    from fisherjax.models import load_pretrained

    args = ["analyze", "--model", str(cli_checkpoint / "model"), "--task", f"add={cli_checkpoint / 'add.jsonl'}",
            "--no-progress", "--no-compilation-cache", "--phases", "fisher,curvature", "--max-samples", "6"]
    monkeypatch.setattr(pipeline, "CURVATURE_AUTO_PARAMETERS", 10)
    real = pipeline.compare.compare_methods
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    skipped = json.loads((tmp_path / "b" / "results.json").read_text())["method_comparison"]
    assert "--curvature" in skipped["skipped"]
    assert "Skipped:" in (tmp_path / "b" / "report.md").read_text()
    # below the parameter limit, but its Lanczos basis (6 samples < k = 10: no Gram route) would take more than half the free memory
    monkeypatch.setattr(pipeline, "CURVATURE_AUTO_PARAMETERS", 10**12)
    need = pipeline.compare.peak_bytes(load_pretrained(cli_checkpoint / "model"), 10, n=6, sample_grads_dtype="bfloat16")
    monkeypatch.setattr(pipeline.backend, "available_memory_bytes", lambda: int(1.5 * need))
    assert main([*args, "--out", str(tmp_path / "m")]) == 0
    reason = json.loads((tmp_path / "m" / "results.json").read_text())["method_comparison"]["skipped"]
    assert re.search(r"Lanczos basis \(30 vectors of [\d,]+ parameters, [\d.]+ GB; with K-FAC's factors and model-sized vectors, "
                     r"[\d.]+ GB\) would take more than 50% of the memory still free \([\d.]+ GB\); pass --curvature to run it anyway, "
                     r"or a smaller --curvature-k", reason), reason
    # more than all of it: --curvature would not help, and is not offered
    monkeypatch.setattr(pipeline.backend, "available_memory_bytes", lambda: 1000)
    assert main([*args, "--out", str(tmp_path / "n")]) == 0
    reason = json.loads((tmp_path / "n" / "results.json").read_text())["method_comparison"]["skipped"]
    assert reason.endswith("would take more than the memory still free (0.0 GB); pass a smaller --curvature-k"), reason
    calls = []

    def fake(model, batches, **kwargs):  # the comparison itself is checked above; here: --curvature makes it run
        calls.append((sum(int((np.asarray(b.sample_ids) >= 0).sum()) for b in batches), kwargs["k"]))
        raise RuntimeError("ran")

    monkeypatch.setattr(pipeline.compare, "compare_methods", fake)
    # --curvature asks for it whatever share of the free memory it takes, but not for more than is free
    with pytest.warns(UserWarning, match="method comparison skipped"):
        assert main([*args, "--out", str(tmp_path / "d"), "--curvature"]) == 0
    reason = json.loads((tmp_path / "d" / "results.json").read_text())["method_comparison"]["skipped"]
    assert "more than the memory still free (0.0 GB), even with --curvature; pass a smaller --curvature-k" in reason, reason
    assert not calls
    monkeypatch.setattr(pipeline.backend, "available_memory_bytes", lambda: 10**9)  # enough for it
    with pytest.raises(RuntimeError, match="ran"):
        main([*args, "--out", str(tmp_path / "c"), "--curvature", "--curvature-samples", "5", "--curvature-k", "3"])
    assert calls == [(5, 3)]
    assert not (tmp_path / "c").exists()  # a failed run leaves no output directory
    # the Gram route (5 samples ≥ k = 3) with less free memory than its gradients whole: a default run
    # skips it and offers --curvature, which runs it in column slices within all the free memory
    model = load_pretrained(cli_checkpoint / "model")
    whole = pipeline.compare.peak_bytes(model, 3, n=5, sample_grads_dtype="bfloat16")
    least = pipeline.compare.least_bytes(model, 3, n=5, sample_grads_dtype="bfloat16")
    free = (whole + least) // 2
    monkeypatch.setattr(pipeline.backend, "available_memory_bytes", lambda: free)
    small = [*args[:-2], "--max-samples", "5", "--curvature-samples", "5", "--curvature-k", "3"]
    assert main([*small, "--out", str(tmp_path / "s")]) == 0
    reason = json.loads((tmp_path / "s" / "results.json").read_text())["method_comparison"]["skipped"]
    assert "pass --curvature to run it anyway (in column slices of the gradients), or a smaller --curvature-samples" in reason, reason
    memory = []
    def recording(model, batches, **kwargs):
        memory.append(kwargs["memory_bytes"])
        return fake(model, batches, **kwargs)

    monkeypatch.setattr(pipeline.compare, "compare_methods", recording)
    with pytest.raises(RuntimeError, match="ran"):
        main([*small, "--out", str(tmp_path / "t"), "--curvature"])
    assert memory == [free] and pipeline.compare.gram_slices(model, 5, "bfloat16", free) is not None
    monkeypatch.setattr(pipeline.compare, "compare_methods", real)  # and the comparison itself, in those slices
    assert main([*small, "--out", str(tmp_path / "u"), "--curvature"]) == 0
    section = json.loads((tmp_path / "u" / "results.json").read_text())["method_comparison"]
    assert "skipped" not in section and "formed before K-FAC in" in json.dumps(section), section
    assert "Lanczos top-k: exact top-3 of F from the 5 × 5 Gram of the per-sample gradients, formed before K-FAC in" in (
        (tmp_path / "u" / "report.md").read_text())


def test_bad_curvature_options_are_refused(capsys):
    from fisherjax.cli import main

    assert main(["analyze", "--curvature-samples", "1", "--out", "/nonexistent/never"]) == 2
    assert "--curvature-samples" in capsys.readouterr().err


def test_few_samples_take_the_exact_gram_route(compared):
    """With no more samples than Lanczos steps the top of F comes from the n × n Gram of the
    per-sample gradients: the pairs satisfy F v = λ v against the dense F, the vectors are
    orthonormal, and the report says which route it took."""
    from fisherjax.curvature import lowrank

    model, result, x = compared
    assert "Gram of the per-sample gradients" in result.methods["lanczos"].notes
    eigen = lowrank.empirical_eigen(model, model.params, _batches(), 6)
    dense = x.T @ x
    v = np.asarray(eigen.vectors, np.float64)
    np.testing.assert_allclose(eigen.values, np.linalg.eigvalsh(x @ x.T)[::-1][:6], rtol=1e-4)
    np.testing.assert_allclose(dense @ v, v * eigen.values, atol=1e-4 * eigen.values[0])
    np.testing.assert_allclose(v.T @ v, np.eye(6), atol=1e-4)
    assert eigen.steps == len(x) and np.all(eigen.residuals <= 1e-4 * eigen.values[0])
    with pytest.raises(ValueError, match="k must lie"):
        lowrank.empirical_eigen(model, model.params, _batches(), len(x) + 1)
    # more than twice as many samples as steps: Lanczos's products (Ritz values approach the top from below)
    assert compare.from_gram(x.shape[1], 3, 12, steps=6) and not compare.from_gram(x.shape[1], 3, 12, steps=5)
    assert not compare.from_gram(x.shape[1], 13, 12)  # k above the rank bound
    lanczos_route = compare.compare_methods(model, _batches(), k=3, steps=5, probes=1, count=2)
    assert "in 5 products" in lanczos_route.methods["lanczos"].notes
    top = lanczos_route.methods["lanczos"].top[0]
    assert 0.5 * eigen.values[0] <= top <= eigen.values[0] * (1 + 1e-5)  # its accuracy: tests/test_lanczos.py


def test_the_gram_route_stores_what_the_run_stores(compared):
    """``G̃`` is kept in bfloat16 where the run keeps bfloat16 gradients, else in float32 (a float16
    ``G̃`` would flush small entries): a run with float16 kept gradients gets the comparison (it
    raised a ValueError), and the memory estimate counts the bytes the route allocates."""
    from fisherjax.fisher.options import CollectOptions

    model, result, _ = compared
    assert compare.gram_dtype("bfloat16") == jnp.bfloat16
    assert compare.gram_dtype("float16") == compare.gram_dtype("float32") == jnp.float32
    size = 124_439_808
    assert compare.basis_bytes(size, 10, n=32, sample_grads_dtype="bfloat16") == 32 * size * 2
    assert compare.basis_bytes(size, 10, n=32, sample_grads_dtype="float16") == compare.basis_bytes(size, 10, n=32) == 32 * size * 4
    half = compare.compare_methods(model, _batches(), k=6, probes=2, count=4, options=CollectOptions(sample_grads_dtype="float16"))
    np.testing.assert_allclose(half.methods["lanczos"].top, result.methods["lanczos"].top, rtol=1e-5)


def test_gram_sums_column_slices(monkeypatch):
    """The Gram is summed over column slices of G̃ (whole slices and a remainder): its eigenpairs
    equal numpy's of the dense F = G̃ᵀ G̃, with honest residuals."""
    from fisherjax.curvature import lowrank

    monkeypatch.setattr(lowrank, "GRAM_COLUMNS", 1000)
    g = np.random.default_rng(3).normal(size=(5, 2537)).astype(np.float32)  # 2 slices + 537 columns
    eigen = lowrank.gram_eigen(jnp.asarray(g), 3)
    values, vectors = np.linalg.eigh(g.astype(np.float64).T @ g)
    np.testing.assert_allclose(eigen.values, values[::-1][:3], rtol=1e-5)
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(eigen.vectors) * vectors[:, ::-1][:, :3], axis=0)), 1.0, atol=1e-4)
    assert np.all(eigen.residuals <= 1e-4 * eigen.values[0]) and np.all(eigen.residuals > 0)
    # the residuals are those of the float32 vectors returned, ‖F v − λ v‖ (float64 here): both are
    # float32 rounding, so they agree in size, not in digits
    v = np.asarray(eigen.vectors, np.float64)
    exact = np.linalg.norm(g.astype(np.float64).T @ (g.astype(np.float64) @ v) - v * eigen.values, axis=0)
    assert np.all(eigen.residuals < 3 * exact) and np.all(eigen.residuals > exact / 3), (eigen.residuals, exact)


def test_bfloat16_gradients_give_the_pairs_of_their_rounded_values(compared, monkeypatch):
    """A bfloat16 ``G̃`` (how ``fisherjax analyze`` stores it) is read a float32 column slice at a
    time: its Gram eigenpairs and products equal float64 numpy's of the rounded rows, and its
    eigenvalues stay within 1e-2 of the float32 route's (rounding averages out in the Gram)."""
    from fisherjax.curvature import lowrank

    monkeypatch.setattr(lowrank, "GRAM_COLUMNS", 1000)
    model, _, x = compared
    g32 = lowrank.scaled_gradients(model, model.params, _batches())
    g16 = lowrank.scaled_gradients(model, model.params, _batches(), dtype=jnp.bfloat16)
    assert g16.dtype == lowrank.BFLOAT16_BITS and g16.shape == g32.shape and g16.nbytes * 2 == g32.nbytes
    rounded = np.asarray(lowrank.decoded(g16), np.float64)
    np.testing.assert_array_equal(rounded, np.asarray(g32.astype(jnp.bfloat16), np.float64))
    eigen = lowrank.gram_eigen(g16, 4)
    values, vectors = np.linalg.eigh(rounded @ rounded.T)
    np.testing.assert_allclose(eigen.values, values[::-1][:4], rtol=1e-5)
    v = np.asarray(eigen.vectors, np.float64)
    np.testing.assert_allclose(rounded.T @ (rounded @ v), v * eigen.values, atol=1e-4 * eigen.values[0])
    probe = np.random.default_rng(0).normal(size=(g16.shape[1], 2)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(lowrank.product(g16, jnp.asarray(probe))), rounded.T @ (rounded @ probe), rtol=1e-4,
                               atol=1e-5 * np.abs(rounded.T @ (rounded @ probe)).max())
    np.testing.assert_allclose(eigen.values, lowrank.gram_eigen(g32, 4).values, rtol=1e-2)


def test_the_gram_of_gradients_too_large_to_hold(compared):
    """Without ``G̃`` whole: the Gram summed over column slices of it (slices that cut leaves) equals
    the Gram of the whole ``G̃``, and each eigenvector ``G̃ᵀ c`` formed by one weighted gradient pass
    equals the one read from ``G̃``."""
    from fisherjax.curvature import lowrank

    model, _, x = compared
    batches = _batches()
    size, rows = model.num_params, sum(len(b.sample_ids) for b in batches)
    leaves = lowrank.leaf_columns(model.params)
    assert leaves[0][1] == 0 and leaves[-1][2] == size and all(a[2] == b[1] for a, b in zip(leaves, leaves[1:]))
    slices = lowrank.column_slices(size, rows, rows * 4 * (size // 3 + 7), 4)
    assert len(slices) == 3 and slices[0][0] == 0 and slices[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
    assert not any(lo in {start for _, start, _ in leaves} for lo, _ in slices[1:])  # the cuts fall inside leaves
    assert lowrank.column_slices(size, rows, None, 4) == lowrank.column_slices(size, rows, rows * 4 * size, 4) == ((0, size),)
    whole = lowrank.scaled_gradients(model, model.params, batches)
    part = lowrank.scaled_gradients(model, model.params, batches, columns=slices[1])
    expected = np.asarray(whole)[:, slices[1][0] : slices[1][1]]  # another compiled pass: equal up to rounding
    np.testing.assert_allclose(np.asarray(part), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    gram = lowrank.sliced_gram(model, model.params, batches, slices)
    dense = np.asarray(whole, np.float64)
    np.testing.assert_allclose(gram, dense @ dense.T, rtol=1e-5, atol=1e-7 * np.abs(gram).max())
    values, coefficients = lowrank.gram_pairs(gram, 4)
    np.testing.assert_allclose(values, np.linalg.eigvalsh(x @ x.T)[::-1][:4], rtol=1e-4)
    probe = np.random.default_rng(5).normal(size=size).astype(np.float32)  # G̃ v by one JVP pass, without G̃
    np.testing.assert_allclose(lowrank.gradients_times(model, model.params, batches, probe), dense @ probe, rtol=1e-4,
                               atol=1e-5 * np.abs(dense @ probe).max())
    for j in range(2):
        np.testing.assert_allclose(np.asarray(lowrank.combined_gradient(model, model.params, batches, coefficients[:, j])),
                                   np.asarray(lowrank.transposed_times(whole, jnp.asarray(coefficients[:, j], jnp.float32))),
                                   rtol=1e-4, atol=1e-5 * np.abs(coefficients[:, j]).max())


def test_the_comparison_without_its_gradients_whole(compared):
    """With too little memory for ``G̃`` beside K-FAC the comparison forms the Gram first, over column
    slices of ``G̃``, then each eigenvector by a weighted gradient pass and the probes' exact
    products by Fisher-vector products: the same spectra, approximations' errors and Rayleigh
    quotients as with ``G̃`` held."""
    model, result, x = compared
    rows, size = sum(len(b.sample_ids) for b in _batches()), model.num_params
    assert compare.gram_slices(model, rows, "float32", None) is None
    assert compare.gram_slices(model, rows, "float32", compare.peak_bytes(model, 6, n=rows)) is None  # held whole
    tokens, sample_tokens = compare.pass_tokens(_batches())
    assert (tokens, sample_tokens) == (6 * 9, 9)
    assert (compare.peak_bytes(model, 6, n=rows, tokens=tokens) - compare.peak_bytes(model, 6, n=rows)
            == compare.working_bytes(model, tokens) == 4 * compare.WORKING_LOGITS * model.config.vocab_size * tokens)
    budget = compare.rest_bytes(model, sample_tokens)  # the least K-FAC's stage needs, after the Gram, a sample at a time
    slices = compare.gram_slices(model, rows, "float32", budget, tokens, sample_tokens)
    assert slices is not None and slices[0][0] == 0 and slices[-1][1] == size
    assert compare.least_bytes(model, 6, n=len(x)) <= budget < compare.peak_bytes(model, 6, n=len(x))
    # a sample at a time where only that fits; as many as the memory leaves room for (here 4 of a batch's 6)
    roomier = compare.rest_bytes(model, 4 * sample_tokens)
    assert compare.piece_rows(model, budget, _batches()) == 1 and compare.piece_rows(model, roomier, _batches()) == 4
    assert compare.gram_slices(model, rows, "float32", roomier, tokens, sample_tokens) is not None
    for memory, per_pass in ((budget, "1 sample at a time"), (roomier, "4 samples at a time")):
        sliced = compare.compare_methods(model, _batches(), k=6, probes=2, count=4, memory_bytes=memory)
        assert f"formed before K-FAC in {len(slices)} column slice" in sliced.methods["lanczos"].notes or memory != budget
        assert per_pass in sliced.methods["lanczos"].notes
        np.testing.assert_allclose(sliced.methods["lanczos"].top, result.methods["lanczos"].top, rtol=1e-5)
        assert np.all(sliced.lanczos_residuals <= 1e-4 * sliced.methods["lanczos"].top[0])
        for name in ("diagonal", "kfac"):
            ours, held = sliced.methods[name], result.methods[name]
            np.testing.assert_allclose(ours.top, held.top, rtol=1e-5)
            np.testing.assert_allclose(ours.rayleigh, held.rayleigh, rtol=1e-4)
            assert ours.probe_error == pytest.approx(held.probe_error, rel=1e-4)
            assert ours.condition == pytest.approx(held.condition, rel=1e-5)
        assert sliced.recommended == result.recommended and sliced.blocks == result.blocks


def test_too_little_memory_for_the_slices_is_refused(compared):
    """Below ``least_bytes`` — K-FAC's factors and the model-sized vectors alone do not fit, or the
    gradients would take more than MAX_GRAM_SLICES slices (a gradient pass each) — the comparison is
    refused with what to do, before any pass."""
    from fisherjax.errors import ConfigError

    model, _, _ = compared
    rest = compare.rest_bytes(model)
    with pytest.raises(ConfigError, match=r"factors and model-sized vectors take [\d.]+ GB, more than its [\d.]+ GB: give it more memory"):
        compare.gram_slices(model, 12, "float32", rest - 1)
    with pytest.raises(ConfigError, match=r"need \d+ column slices in [\d.]+ GB, more than 32: give it more memory or fewer samples"):
        compare.gram_slices(model, 10_000, "float32", rest)
    with pytest.raises(ConfigError, match="give it more memory"):
        compare.compare_methods(model, _batches(), k=6, probes=1, count=2, memory_bytes=rest - 1)
