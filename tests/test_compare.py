"""The Fisher method comparison against a dense empirical Fisher built in numpy float64 from
``jax.vmap(jax.grad)`` per-sample gradients (:func:`fisherjax.grads.per_sample_grads`, the
definition), and the ``curvature`` phase of ``fisherjax analyze``."""

from __future__ import annotations

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from conftest import padded_batch, tiny_config

from fisherjax.curvature import compare
from fisherjax.curvature.compare import MethodResult
from fisherjax.data import IGNORE, Batch
from fisherjax.grads import per_sample_grads
from fisherjax.layout import unflatten
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


def _curvature_context(checkpoint, **options):
    """What ``analyze --phases fisher,curvature`` on the ``add`` task reads in the curvature phase
    (it reads no Phase 1 Fisher): the config, model, tasks and batches."""
    from fisherjax import pipeline

    config = pipeline.AnalysisConfig(model=checkpoint / "model", tasks=(("add", checkpoint / "add.jsonl"),), progress=False, **options)
    model, tasks = pipeline.load_inputs(config)
    return pipeline.Context(config, model, tasks, pipeline.task_batches(model, tasks, config), {})


def test_analyze_skips_the_comparison_above_the_limit(cli_checkpoint, tmp_path, monkeypatch):
    """Models above the limit are skipped unless --curvature is given, and so is a comparison that
    would not fit the free memory, with the reason and what to pass; the full section is checked
    on the demo by tests/test_cli.py, which runs every phase. The command line runs where it decides
    (the parameter limit, --curvature); the memory rule's reasons are read from the phase itself."""
    import dataclasses

    from fisherjax import pipeline
    from fisherjax.cli import main

    args = ["analyze", "--model", str(cli_checkpoint / "model"), "--task", f"add={cli_checkpoint / 'add.jsonl'}",
            "--no-progress", "--no-compilation-cache", "--phases", "fisher,curvature", "--max-samples", "6"]
    monkeypatch.setattr(pipeline, "CURVATURE_AUTO_PARAMETERS", 10)
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    skipped = json.loads((tmp_path / "b" / "results.json").read_text())["method_comparison"]
    assert "--curvature" in skipped["skipped"]
    assert "Skipped:" in (tmp_path / "b" / "report.md").read_text()
    # below the parameter limit, but its 6 per-sample gradients (fewer than k = 10: the Gram route, exact) would take
    # more than half the free memory
    monkeypatch.setattr(pipeline, "CURVATURE_AUTO_PARAMETERS", 10**12)
    ctx = _curvature_context(cli_checkpoint, max_samples=6)
    forced = dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, curvature=True))
    need = pipeline.compare.peak_bytes(ctx.model, 10, n=6, sample_grads_dtype="bfloat16")
    monkeypatch.setattr(pipeline.backend, "available_memory_bytes", lambda: int(1.5 * need))
    reason = pipeline.phase_curvature(ctx, tmp_path).json["skipped"]
    assert reason.startswith("its 6 per-sample gradients (") and "--curvature to run it anyway (in column slices" in reason, reason
    # the Lanczos route's reasons (more samples than twice its steps take it; this checkpoint has 12, so it is forced here)
    gram_rule = pipeline.compare.from_gram
    monkeypatch.setattr(pipeline.compare, "from_gram", lambda *args, **kwargs: False)
    need = pipeline.compare.peak_bytes(ctx.model, 10, n=6, sample_grads_dtype="bfloat16")
    monkeypatch.setattr(pipeline.backend, "available_memory_bytes", lambda: int(1.5 * need))
    reason = pipeline.phase_curvature(ctx, tmp_path).json["skipped"]
    assert re.search(r"Lanczos basis \(30 vectors of [\d,]+ parameters, [\d.]+ GB; with K-FAC's factors and model-sized vectors, "
                     r"[\d.]+ GB\) would take more than 50% of the memory still free \([\d.]+ GB\); pass --curvature to run it anyway, "
                     r"or a smaller --curvature-k", reason), reason
    # more than all of it: --curvature would not help, and is not offered
    monkeypatch.setattr(pipeline.backend, "available_memory_bytes", lambda: 1000)
    reason = pipeline.phase_curvature(ctx, tmp_path).json["skipped"]
    assert reason.endswith("would take more than the memory still free (0.0 GB); pass a smaller --curvature-k"), reason
    calls = []

    def fake(model, batches, **kwargs):  # the comparison itself is checked above; here: --curvature makes it run
        calls.append((sum(int((np.asarray(b.sample_ids) >= 0).sum()) for b in batches), kwargs["k"]))
        raise RuntimeError("ran")

    monkeypatch.setattr(pipeline.compare, "compare_methods", fake)
    # --curvature asks for it whatever share of the free memory it takes, but not for more than is free
    with pytest.warns(UserWarning, match="method comparison skipped"):
        reason = pipeline.phase_curvature(forced, tmp_path).json["skipped"]
    assert "more than the memory still free (0.0 GB), even with --curvature; pass a smaller --curvature-k" in reason, reason
    assert not calls
    monkeypatch.setattr(pipeline.backend, "available_memory_bytes", lambda: 10**9)  # enough for it
    with pytest.raises(RuntimeError, match="ran"):
        main([*args, "--out", str(tmp_path / "c"), "--curvature", "--curvature-samples", "5", "--curvature-k", "3"])
    assert calls == [(5, 3)]
    assert not (tmp_path / "c").exists()  # a failed run leaves no output directory
    monkeypatch.setattr(pipeline.compare, "from_gram", gram_rule)
    # the Gram route (5 samples, k = 3) with less free memory than its gradients whole: a default run
    # skips it and offers --curvature, which runs it in column slices within all the free memory
    model = ctx.model
    whole = pipeline.compare.peak_bytes(model, 3, n=5, sample_grads_dtype="bfloat16")
    least = pipeline.compare.least_bytes(model, 3, n=5, sample_grads_dtype="bfloat16")
    free = (whole + least) // 2
    monkeypatch.setattr(pipeline.backend, "available_memory_bytes", lambda: free)
    small = _curvature_context(cli_checkpoint, max_samples=5, curvature_samples=5, curvature_k=3)
    reason = pipeline.phase_curvature(small, tmp_path).json["skipped"]
    assert "pass --curvature to run it anyway (in column slices of the gradients), or a smaller --curvature-samples" in reason, reason
    memory = []

    def recording(model, batches, **kwargs):
        memory.append(kwargs["memory_bytes"])
        return fake(model, batches, **kwargs)

    monkeypatch.setattr(pipeline.compare, "compare_methods", recording)
    with pytest.raises(RuntimeError, match="ran"):
        pipeline.phase_curvature(dataclasses.replace(small, config=dataclasses.replace(small.config, curvature=True)), tmp_path)
    assert memory == [free] and pipeline.compare.gram_slices(model, 5, "bfloat16", free) is not None


# Slow: the comparison in column slices and groups of parameters is checked against the held one by
# test_the_comparison_without_its_gradients_whole and test_the_grouped_stage_equals_the_held_one, and
# the command line's memory (all the free memory with --curvature) by the test above.
@pytest.mark.slow
def test_the_command_line_runs_the_comparison_in_column_slices(cli_checkpoint, tmp_path, monkeypatch):
    """``--curvature`` with less free memory than the Gram route's gradients whole: the run
    compares the methods in column slices of them, then by groups of parameters, and says so."""
    from fisherjax import pipeline
    from fisherjax.cli import main
    from fisherjax.models import load_pretrained

    model = load_pretrained(cli_checkpoint / "model")
    whole = pipeline.compare.peak_bytes(model, 3, n=5, sample_grads_dtype="bfloat16")
    least = pipeline.compare.least_bytes(model, 3, n=5, sample_grads_dtype="bfloat16")
    monkeypatch.setattr(pipeline.backend, "available_memory_bytes", lambda: (whole + least) // 2)
    assert main(["analyze", "--model", str(cli_checkpoint / "model"), "--task", f"add={cli_checkpoint / 'add.jsonl'}", "--no-progress",
                 "--no-compilation-cache", "--phases", "fisher,curvature", "--max-samples", "5", "--curvature-samples", "5",
                 "--curvature-k", "3", "--out", str(tmp_path / "u"), "--curvature"]) == 0
    section = json.loads((tmp_path / "u" / "results.json").read_text())["method_comparison"]
    assert "skipped" not in section and "formed before K-FAC in" in json.dumps(section), section
    assert re.search(r"then by \d+ groups? of parameters", json.dumps(section)), section
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
    lanczos_route = compare.compare_methods(model, _batches(), k=3, steps=5, probes=1, count=2)
    assert "in 5 products" in lanczos_route.methods["lanczos"].notes
    top = lanczos_route.methods["lanczos"].top[0]
    assert 0.5 * eigen.values[0] <= top <= eigen.values[0] * (1 + 1e-5)  # its accuracy: tests/test_lanczos.py


def test_more_eigenvalues_than_samples_come_from_the_gram(compared):
    """``k`` above the rank bound ``n``: the top ``k`` of ``F`` are the Gram's ``n`` and ``k − n``
    zeros, exact, with no Fisher-vector products (a quick run on a few samples took Lanczos's
    products and basis, slower and larger than a run on many); the zeros' Rayleigh ratios are
    undefined (NaN), as for an eigenvalue 0 on either route."""
    model, _, x = compared
    n = len(x)
    assert compare.from_gram(x.shape[1], n + 1, n)
    many = compare.compare_methods(model, _batches(), k=n + 3, probes=1, count=2)
    lanczos = many.methods["lanczos"]
    assert "Gram of the per-sample gradients (one gradient pass, no products)" in lanczos.notes
    assert lanczos.notes.endswith(f"so λ_min = 0 and the last 3 of the top {n + 3} are 0")
    exact = np.linalg.eigvalsh(np.asarray(x, np.float64) @ np.asarray(x, np.float64).T)[::-1]
    np.testing.assert_allclose(lanczos.top[:n], exact, rtol=1e-4)
    assert np.all(lanczos.top[n:] == 0) and len(lanczos.top) == n + 3
    assert len(many.lanczos_residuals) == n + 3 and np.all(many.lanczos_residuals[n:] == 0)
    for method in ("diagonal", "kfac"):
        ratios = many.methods[method].rayleigh
        assert len(ratios) == n + 3 and np.all(np.isfinite(ratios[:n])) and np.all(np.isnan(ratios[n:]))


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
    # float32 rounding, so they agree in size, not in digits. They never understate it; the computed
    # one also carries the rounding of G̃ v in float32, a few ε₃₂ λ₁ (on an AVX2 CPU 1.2e-3 where
    # the float64 residual was 3.0e-4, with ε₃₂ λ₁ = 3.3e-4)
    v = np.asarray(eigen.vectors, np.float64)
    exact = np.linalg.norm(g.astype(np.float64).T @ (g.astype(np.float64) @ v) - v * eigen.values, axis=0)
    rounding = 8 * np.finfo(np.float32).eps * eigen.values[0]
    assert np.all(eigen.residuals < 3 * exact + rounding) and np.all(eigen.residuals > exact / 3), (eigen.residuals, exact)


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
    for j in range(2):  # every leaf raveled, and a group of leaves alone
        expected = np.asarray(lowrank.transposed_times(whole, jnp.asarray(coefficients[:, j], jnp.float32)))
        combined = lowrank.combined_gradient(model, model.params, batches, coefficients[:, j])
        np.testing.assert_allclose(np.asarray(ravel_pytree(unflatten(combined))[0]), expected, rtol=1e-4,
                                   atol=1e-5 * np.abs(coefficients[:, j]).max())
        group = [leaves[1][0], leaves[-2][0]]
        part = lowrank.combined_gradient(model, model.params, batches, coefficients[:, j], group)
        assert sorted(part) == sorted(group)
        for path, start, stop in (leaves[1], leaves[-2]):
            np.testing.assert_allclose(np.asarray(part[path]).reshape(-1), expected[start:stop], rtol=1e-4,
                                       atol=1e-5 * np.abs(coefficients[:, j]).max())


def _same_approximations(ours, held):
    """The diagonal's and K-FAC's rows of two comparisons agree to float32 rounding: spectrum, slice
    tops, Rayleigh quotients, probe errors and condition numbers."""
    for name in ("diagonal", "kfac"):
        mine, theirs = ours.methods[name], held.methods[name]
        np.testing.assert_allclose(mine.top, theirs.top, rtol=1e-5)
        np.testing.assert_allclose(mine.blocks_top, theirs.blocks_top, rtol=1e-5)
        np.testing.assert_allclose(mine.rayleigh, theirs.rayleigh, rtol=1e-4)
        assert mine.probe_error == pytest.approx(theirs.probe_error, rel=1e-4)
        assert mine.condition == pytest.approx(theirs.condition, rel=1e-5)


# The least memory (a sample a pass, the most groups) by default; "roomy" (one group, four samples a
# pass: the column slices and the grouped passes of the least case, with wider passes) is slow.
@pytest.mark.parametrize("case", ["least", pytest.param("roomy", marks=pytest.mark.slow)])
def test_the_comparison_without_its_gradients_whole(compared, case):
    """With too little memory for ``G̃`` beside K-FAC the comparison forms the Gram first, over column
    slices of ``G̃``, then K-FAC's stage by groups of parameters — its factors, the probes' exact
    products and the eigenvectors by gradient passes restricted to each group: the same spectra,
    approximations' errors and Rayleigh quotients as with ``G̃`` held, in one group or in many."""
    model, result, x = compared
    rows, size = sum(len(b.sample_ids) for b in _batches()), model.num_params
    assert compare.gram_slices(model, rows, "float32", None) is None
    assert compare.gram_slices(model, rows, "float32", compare.peak_bytes(model, 6, n=rows)) is None  # held whole
    tokens, sample_tokens = compare.pass_tokens(_batches())
    assert (tokens, sample_tokens) == (6 * 9, 9)
    assert (compare.peak_bytes(model, 6, n=rows, tokens=tokens) - compare.peak_bytes(model, 6, n=rows)
            == compare.working_bytes(model, tokens) == 4 * compare.WORKING_LOGITS * model.config.vocab_size * tokens)
    least = compare.least_bytes(model, 6, n=rows, sample_tokens=sample_tokens)  # a sample at a time, the most groups
    roomy = compare.rest_bytes(model, 4 * sample_tokens)  # K-FAC and the vectors whole beside 4 samples' passes
    assert least < roomy < compare.peak_bytes(model, 6, n=rows)
    rows_least, many = compare.stage_plan(model, least, 6, sample_tokens)
    rows_roomy, few = compare.stage_plan(model, roomy, 6, sample_tokens)
    assert (rows_least, rows_roomy) == (1, 4) and len(few) == 1 and len(many) > 2
    memory, per_pass, parts = {"least": (least, "1 sample at a time", many), "roomy": (roomy, "4 samples at a time", few)}[case]
    slices = compare.gram_slices(model, rows, "float32", memory, tokens, sample_tokens)
    assert slices is not None and slices[0][0] == 0 and slices[-1][1] == size
    sliced = compare.compare_methods(model, _batches(), k=6, probes=2, count=4, memory_bytes=memory)
    notes = sliced.methods["lanczos"].notes
    assert f"formed before K-FAC in {len(slices)} column slice" in notes and per_pass in notes
    assert f"by {len(parts)} group{'s' * (len(parts) > 1)} of parameters" in notes
    np.testing.assert_allclose(sliced.methods["lanczos"].top, result.methods["lanczos"].top, rtol=1e-5)
    assert np.all(sliced.lanczos_residuals <= 1e-4 * sliced.methods["lanczos"].top[0])
    _same_approximations(sliced, result)
    assert sliced.recommended == result.recommended and sliced.blocks == result.blocks


def test_too_little_memory_for_the_slices_is_refused(compared):
    """Below ``least_bytes`` — K-FAC's stage does not fit even by its smallest groups, or the
    gradients would take more than MAX_GRAM_SLICES slices (a gradient pass each) — the comparison is
    refused with what to do, before any pass."""
    from fisherjax.errors import ConfigError

    model, _, _ = compared
    rest = compare.stream_bytes(model)
    with pytest.raises(ConfigError, match=r"K-FAC stage takes at least [\d.]+ GB .*, more than its [\d.]+ GB: give it more memory"):
        compare.gram_slices(model, 12, "float32", rest - 1)
    with pytest.raises(ConfigError, match=r"need \d+ column slices in [\d.]+ GB, more than 32: give it more memory or fewer samples"):
        compare.gram_slices(model, 10_000, "float32", rest)
    with pytest.raises(ConfigError, match="give it more memory"):
        compare.compare_methods(model, _batches(), k=6, probes=1, count=2, memory_bytes=rest - 1)


def test_parameter_groups_cover_every_leaf_once_with_its_factors():
    """Units: each factored kernel with its bias and every factor on it (GPT-2's fused QKV: three),
    every other leaf alone, each leaf once, their bytes the larger of the factor pass and the
    products; packed in order into as few groups as fit a budget, refused where one unit does not."""
    from fisherjax.curvature import groups, kfac
    from fisherjax.errors import ConfigError
    from fisherjax.layout import flatten, leaf_paths

    for family in ("gpt2", "llama"):
        model = Model.init(tiny_config(family, num_layers=2), seed=0)
        units = groups.units(model)
        paths = [p for u in units for p in u.paths]
        assert sorted(paths) == sorted(leaf_paths(model.params)) and len(set(paths)) == len(paths)
        sites = kfac.factor_sites(model)
        assert sorted(k for u in units for k in u.keys) == sorted(s.key for s in sites)
        sizes = {p: x.size for p, x in flatten(model.params).items()}
        for u in units:
            mine = [s for s in sites if s.key in u.keys]
            assert all(s.kernel == u.paths[0] and (s.bias is None or s.bias in u.paths) for s in mine)
            factors = 4 * kfac.factor_floats(model, u.keys) if u.keys else 0
            assert (u.factor_bytes, u.leaf_bytes, u.layers) == (factors, 4 * sum(sizes[p] for p in u.paths), 2 if u.keys else None)
            assert u.bytes == max(groups.FACTOR_PASS_COPIES * factors, factors + groups.GROUP_COPIES * u.leaf_bytes)
            if u.keys:  # a layer at a time: half the factors held
                half = u.by_ranges(2)
                assert half.ranges == ((0, 1), (1, 2)) and half.held_factor_bytes == math.ceil(factors / 2) and half.bytes <= u.bytes
        if family == "gpt2":
            fused = next(u for u in units if u.paths[0].endswith("c_attn/kernel"))
            assert [k.rsplit("#", 1)[1] for k in fused.keys] == ["q", "k", "v"] and fused.paths[1].endswith("c_attn/bias")
        (whole,) = groups.parameter_groups(model, None)
        assert whole.paths == tuple(paths) and whole.keys == tuple(k for u in units for k in u.keys) and not whole.ranges
        assert whole.factor_bytes == sum(u.factor_bytes for u in units) and whole.leaf_bytes == sum(u.leaf_bytes for u in units)
        least = groups.least_group_bytes(model)
        packed = groups.parameter_groups(model, least)
        assert [p for g in packed for p in g.paths] == paths and all(g.bytes <= least for g in packed) and 1 < len(packed) < len(units)
        ranged = [g for g in packed if g.ranges]
        whole_units = {u.paths: u for u in units}
        assert ranged and all(g.keys == whole_units[g.paths].keys and g.bytes < whole_units[g.paths].bytes for g in ranged)
        with pytest.raises(ConfigError, match=r"K-FAC factors and vectors of .* take [\d.]+ GB at least, more than the [\d.]+ GB left"):
            groups.parameter_groups(model, least - 1)


def test_a_groups_part_of_a_probe_and_its_factors_are_the_wholes():
    """A probe drawn leaf by leaf: a group's part is the whole probe's leaves; K-FAC of some factors
    alone equals those factors of the whole K-FAC; an unknown factor is refused."""
    from fisherjax.curvature import groups, kfac
    from fisherjax.errors import ConfigError

    model = Model.init(tiny_config("llama", num_layers=2), seed=0)
    key = jax.random.key(4)
    whole = groups.probe(key, model.params)
    part = groups.probe(key, model.params, ["layers/mlp/down_proj/kernel", "embed/embedding"])
    assert sorted(part) == ["embed/embedding", "layers/mlp/down_proj/kernel"]
    for p, x in part.items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(whole[p]))
    assert float(np.std(np.concatenate([np.asarray(x).ravel() for x in whole.values()]))) == pytest.approx(1.0, abs=0.05)
    full = kfac.kfac_factors(model, model.params, _batches())
    keys = ("layers/self_attn/k_proj/kernel", "layers/mlp/up_proj/kernel")
    some = kfac.kfac_factors(model, model.params, _batches(), keys=keys)
    assert sorted(some.factors) == sorted(keys) and (some.n_samples, some.n_tokens) == (full.n_samples, full.n_tokens)
    for k in keys:
        for attr in ("inputs", "outputs"):
            np.testing.assert_allclose(np.asarray(getattr(some.factors[k], attr)), np.asarray(getattr(full.factors[k], attr)),
                                       rtol=1e-6, atol=1e-9)
    with pytest.raises(ConfigError, match="are not factors of the model"):
        kfac.kfac_factors(model, model.params, _batches(), keys=("layers/mlp/nothing",))


# Slow: the default run covers the grouped stage's numbers on GPT-2 with many groups, one sample a
# pass (test_the_comparison_without_its_gradients_whole) and the groups themselves, a layer range
# at a time too (test_parameter_groups_cover_every_leaf_once_with_its_factors); this checks the
# numbers of layer ranges (GPT-2's fused QKV) and of Llama's separate q/k/v/o with grouped-query k/v.
@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_grouped_stage_equals_the_held_one(family, monkeypatch):
    """K-FAC's stage in groups — GPT-2's fused QKV and Llama's separate q/k/v/o with grouped-query
    k/v — with the largest units' factors a layer at a time, kept on the host between the vector
    passes: K-FAC's spectrum, slice tops, probe errors and Rayleigh quotients as with everything held."""
    from fisherjax.curvature import groups

    model = Model.init(tiny_config(family, num_layers=2, intermediate_size=16), seed=1)
    held = compare.compare_methods(model, _batches(), k=4, probes=2, count=6)
    parts = groups.parameter_groups(model, groups.least_group_bytes(model))
    assert len(parts) > 3 and any(g.ranges for g in parts)
    _, sample_tokens = compare.pass_tokens(_batches())
    least = compare.least_bytes(model, 4, n=12, sample_tokens=sample_tokens)
    monkeypatch.setattr(compare, "stage_plan", lambda *args: (1, parts))
    grouped = compare.compare_methods(model, _batches(), k=4, probes=2, count=6, memory_bytes=least)
    assert f"by {len(parts)} groups of parameters" in grouped.methods["lanczos"].notes and grouped.blocks == held.blocks
    kernels = {model.layout.block_sources(b, "kernel")[0] for b, _, _ in grouped.blocks}
    assert len({i for i, g in enumerate(parts) for p in g.paths if p in kernels}) > 1  # the compared slices' factors in several groups
    if family == "gpt2":  # the compared q/k/v slices' factors went a layer at a time
        assert any(g.ranges and p in kernels for g in parts for p in g.paths)
    _same_approximations(grouped, held)


def test_stretches_measured_apart_add_up():
    from fisherjax.telemetry import Stretch, total

    a = Stretch(1.5, 100, "stretch", None, None, 2, 1, 0.5, 0.25, (("f", 2),))
    b = Stretch(2.0, 300, "process", 7, "stretch", 1, 0, 0.25, 0.5, (("f", 1), ("g", 1)))
    t = total([a, b])
    assert (t.seconds, t.peak_rss_bytes, t.rss_scope, t.device_peak_bytes, t.device_scope) == (3.5, 300, "process", 7, "stretch")
    assert (t.compilations, t.cache_hits, t.compile_seconds, t.trace_seconds, t.compiled) == (3, 1, 0.75, 0.75, (("f", 3), ("g", 1)))
