"""Kept gradients as token factors: reads form exactly the gradients asked for; a collection keeping
factors (batches of different lengths, spilled, checkpointed, saved) gives the gradients and the
Fisher a collection keeping gradients gives; the pair phases read them unchanged; ``analyze``
chooses them where they are smaller."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import random_task, tiny_config
from fisherjax import ConfigError, Model, io
from fisherjax.analysis import conflicts, qkov
from fisherjax.curvature import blocks
from fisherjax.data import batches
from fisherjax.fisher.collect import collect
from fisherjax.fisher.factored import FactoredGrads, factors_are_smaller, read_on_device, smaller_as_factors
from fisherjax.fisher.options import attention_paths
from fisherjax.pipeline import AnalysisConfig


def _random_factors(seed=0, n=5, layers=3, seq=7, d_in=4, d_out=6):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, layers, seq, d_in)).astype(np.float32)
    d = rng.standard_normal((n, layers, seq, d_out)).astype(np.float32)
    return FactoredGrads(a, d), np.einsum("nltr,nltc->nlrc", a.astype(np.float64), d.astype(np.float64))


def test_reads_form_exactly_the_gradients_asked_for():
    g, dense = _random_factors()
    assert g.shape == dense.shape and g.ndim == 4 and len(g) == 5 and g.dtype == np.float32
    assert g.stored_nbytes == 4 * 5 * 3 * 7 * (4 + 6) and g.nbytes == 4 * dense.size
    samples, layers = np.array([4, 0, 2]), np.array([2, 1])
    keys = [
        (), 3, -1, slice(1, 4), (slice(None), 1), (slice(1, 3), slice(0, 2)), samples, (samples[:, None], layers[None, :]),
        (samples, 1), (Ellipsis, slice(1, 3), slice(None)), (Ellipsis, 2), (Ellipsis, 1, slice(2, 5)), (0, Ellipsis, -1),
        (slice(None), layers, Ellipsis, slice(0, 2), slice(None)), (Ellipsis, np.array([0, 3]), slice(None)), (1, 2, 3, 4),
    ]
    for key in keys:
        np.testing.assert_allclose(g[key], dense[key], rtol=1e-5, atol=1e-5, err_msg=repr(key))
        assert g[key].shape == dense[key].shape, key
        on_device = g.on_device(key)  # formed on the device, where the pair phases read it
        assert isinstance(on_device, jax.Array) and on_device.dtype == np.float32 and on_device.shape == dense[key].shape, key
        np.testing.assert_allclose(np.asarray(on_device), dense[key], rtol=1e-5, atol=1e-5, err_msg=repr(key))
    read = g[1]
    with pytest.raises(ValueError, match="read-only"):  # a read is the device's result, not a buffer to write in
        read[0] = 0.0
    assert np.array(g).flags.writeable and not np.asarray(g).flags.writeable  # numpy's copy=True gets a copy
    np.testing.assert_allclose(np.asarray(g), dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.take_rows(samples)[:, 1], dense[samples, 1], rtol=1e-5, atol=1e-5)
    assert isinstance(g.take_rows(slice(1, 3)), FactoredGrads)
    leaves, tree = jax.tree.flatten(g)
    assert len(leaves) == 2 and isinstance(jax.tree.unflatten(tree, leaves), FactoredGrads)
    with pytest.raises(IndexError, match="not both"):
        g[samples, :, np.array([0, 1])]
    with pytest.raises(IndexError, match="too many"):
        g[0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="different samples or positions"):
        FactoredGrads(np.zeros((2, 3, 4)), np.zeros((2, 4, 4)))


def test_a_placed_read_forms_where_it_is_placed_with_zero_padding():
    """What a mesh read asks for (tests/test_sharded_analysis.py places it over four devices): the
    factors go where ``place`` puts them, and ``pad_to`` appends zero gradients."""
    g, dense = _random_factors()
    placed = []

    def place(x):
        placed.append((x.shape, x.dtype))
        return jax.device_put(x)

    samples, layers = np.array([4, 0, 2]), np.array([2, 1])
    for key, want, pieces in (((samples[:, None], layers[None, :]), dense[samples][:, layers], 6 * 2), (slice(1, 3), dense[1:3], 6 * 3),
                              (samples, dense[samples], 6 * 3)):
        placed.clear()
        got = np.asarray(read_on_device(g, key, place=place, pad_to=6))
        assert placed == [((pieces, 7, 4), np.float32), ((pieces, 7, 6), np.float32)], key  # the factors travelled, padded
        assert got.shape == (6,) + want.shape[1:], key
        np.testing.assert_allclose(got[: len(want)], want, rtol=1e-5, atol=1e-5, err_msg=repr(key))
        assert not got[len(want):].any(), key
        # an array is read, padded and placed the same way
        placed.clear()
        got = np.asarray(read_on_device(dense.astype(np.float32), key, place=place, pad_to=6))
        assert placed == [((6,) + want.shape[1:], np.float32)], key
        np.testing.assert_array_equal(got[: len(want)], want.astype(np.float32))
        assert not got[len(want):].any(), key
    with pytest.raises(IndexError, match="sample axis"):
        g.on_device((1, 2), pad_to=4)
    with pytest.raises(ValueError):
        g.on_device(samples, pad_to=2)


def test_taken_columns_form_only_the_taken_part():
    """``take(positions, axis)`` along ``d_in`` or ``d_out`` (a group of heads, QK-OV's tiles) is
    ``np.take`` of the gradients at every read, shares the factor arrays, composes, and moves only
    the taken columns of the factors."""
    g, dense = _random_factors()
    rows, cols = np.array([3, 0]), np.array([5, 1, 2])
    taken = g.take(cols, -1).take(rows, -2)
    want = np.take(np.take(dense, cols, -1), rows, -2)
    assert taken.shape == want.shape and taken.inputs is g.inputs and taken.deltas is g.deltas
    samples, layers = np.array([4, 0, 2]), np.array([2, 1])
    for key in ((), (samples[:, None], layers[None, :]), slice(1, 4), (samples, 1), (Ellipsis, 1, slice(0, 2))):
        np.testing.assert_allclose(taken[key], want[key], rtol=1e-5, atol=1e-5, err_msg=repr(key))
    np.testing.assert_allclose(g.take(np.array([4, 2]), -1).take(np.array([1]), -1)[:], dense[..., [2]], rtol=1e-5, atol=1e-5)
    placed = []
    read_on_device(taken, slice(0, 2), place=lambda x: placed.append(x.shape) or jax.device_put(x))
    assert placed == [(6, 7, 2), (6, 7, 3)]  # 2 samples × 3 layers of the taken columns only
    np.testing.assert_allclose(taken.take_rows(samples)[:, 1], want[samples, 1], rtol=1e-5, atol=1e-5)
    leaves, tree = jax.tree.flatten(taken)
    np.testing.assert_allclose(jax.tree.unflatten(tree, leaves)[0], want[0], rtol=1e-5, atol=1e-5)
    weights = np.array([0.5, 2.0, 1.0, 0.25, 3.0])
    np.testing.assert_allclose(taken.weighted_square_mean(weights), np.mean(weights[:, None, None, None] * want ** 2, axis=0),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="kernel axis"):
        g.take(cols, 0)


@pytest.mark.parametrize("factor_bytes", [256e6, 900])  # every sample in one group, or two per group (the last padded)
def test_weighted_square_mean_sums_the_formed_squares(factor_bytes, monkeypatch):
    from fisherjax.fisher import factored

    monkeypatch.setattr(factored, "FACTOR_BYTES", factor_bytes)  # a sample's factors: 3 · 7 · 10 · 2 = 420 bytes
    g, _ = _random_factors()
    g = FactoredGrads(g.inputs.astype(jax.numpy.bfloat16), g.deltas.astype(jax.numpy.bfloat16))  # as analyze keeps them
    dense = np.einsum("nltr,nltc->nlrc", g.inputs.astype(np.float64), g.deltas.astype(np.float64))
    weights = np.array([0.5, 2.0, 1.0, 0.25, 3.0])
    for rows in (None, np.array([4, 1, 3]), np.array([2])):
        picked = np.arange(5) if rows is None else rows
        expected = np.mean(weights[picked, None, None, None] * dense[picked] ** 2, axis=0)
        got = g.weighted_square_mean(weights, rows)
        assert got.dtype == np.float32 and got.shape == dense.shape[1:]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=repr(rows))


def test_factors_where_they_are_smaller():
    assert factors_are_smaller(128, 768, 2304) and factors_are_smaller(128, 768, 768)  # GPT-2 small: a quarter, a third
    assert factors_are_smaller(192, 768, 768) and not factors_are_smaller(193, 768, 768)  # at most half: d_in·d_out/(2(d_in+d_out))
    assert not factors_are_smaller(128, 256, 768)  # a d = 256 QKV at 128 positions: two thirds, not worth re-forming
    layout = Model.init(tiny_config("gpt2"), seed=0).layout  # d = 32: kernels [32, 96] (at most 12) and [32, 32] (8)
    kept = attention_paths(layout)
    assert smaller_as_factors(layout, kept, 8) == ("layers/attn/c_attn/kernel", "layers/attn/c_proj/kernel")
    assert smaller_as_factors(layout, kept, 10) == ("layers/attn/c_attn/kernel",)
    assert smaller_as_factors(layout, kept, 13) == ()
    config = AnalysisConfig()
    assert config.sample_grads_form == "auto"
    assert config.collect_options(layout, 10).sample_grads_factors == ("layers/attn/c_attn/kernel",)
    assert config.collect_options().sample_grads_factors is False  # no lengths known: gradients
    assert AnalysisConfig(fisher_type="true").collect_options(layout, 8).sample_grads_factors is False
    assert AnalysisConfig(sample_grads_form="gradients").collect_options(layout, 8).sample_grads_factors is False
    assert AnalysisConfig(sample_grads_form="factors").collect_options(layout, 500).sample_grads_factors is True
    with pytest.raises(ConfigError, match="--sample-grads-form factors needs --fisher-type empirical"):
        AnalysisConfig(sample_grads_form="factors", fisher_type="true")
    with pytest.raises(ConfigError, match="sample_grads_form"):
        AnalysisConfig(sample_grads_form="both")
    with pytest.raises(ConfigError, match="empirical"):
        collect(Model.init(tiny_config("gpt2"), seed=0), [], task="t", keep_sample_grads=True, sample_grads_factors=True,
                fisher_type="per_token")
    with pytest.raises(ConfigError, match="not kept dense kernels"):
        collect(Model.init(tiny_config("gpt2"), seed=0), [], task="t", keep_sample_grads=True,
                sample_grads_factors=("layers/attn/c_attn/bias",))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def collected(request, tmp_path_factory):
    """Per family: the model, its batches (three lengths) and Fisher kept as gradients and as factors
    in float32; for GPT-2 also spilled, from a checkpoint, and as bfloat16 factors (how factors are
    stored, spilled and resumed does not depend on the layout: Llama's q/k/v/o with grouped-query
    k/v are checked in memory)."""
    model = Model.init(tiny_config(request.param), seed=0)
    task = random_task("t", 14, seed=3, min_len=3, max_len=30, prompt=1)
    data = list(batches(task, 4, buckets=(8, 16, 32)))
    assert len({b.input_ids.shape[1] for b in data}) > 1  # chunks of different positions are joined
    common = dict(task="t", keep_sample_grads=True, diagonal=True, progress=False)
    tmp = tmp_path_factory.mktemp(f"factors-{request.param}")
    out = {"grads": collect(model, data, **common), "factors": collect(model, data, sample_grads_factors=True, **common)}
    if request.param == "gpt2":
        out["spilled"] = collect(model, data, sample_grads_factors=True, sample_grads_budget_bytes=1e3, spill_dir=tmp / "spill", **common)
        out["bf16"] = collect(model, data, sample_grads_factors=True, sample_grads_dtype="bfloat16", **common)
        collect(model, data[:2], sample_grads_factors=True, checkpoint_dir=tmp / "ckpt", checkpoint_every=1, **common)
        out["resumed"] = collect(model, data, sample_grads_factors=True, checkpoint_dir=tmp / "ckpt", checkpoint_every=1, resume=True,
                                 **common)
    return model, out


def _rel(x, y):
    return float(np.linalg.norm(np.asarray(x, np.float64) - np.asarray(y, np.float64)) / np.linalg.norm(np.asarray(y, np.float64)))


def test_collected_factors_give_the_gradients_and_the_fisher(collected, tmp_path):
    model, out = collected
    reference = out["grads"]
    for name in (name for name in ("factors", "spilled", "resumed", "bf16") if name in out):
        fisher = out[name]
        tolerance = 1e-2 if name == "bf16" else 1e-5
        kept = fisher.sample_grads
        np.testing.assert_array_equal(kept.sample_ids, reference.sample_grads.sample_ids)
        for p, g in reference.sample_grads.grads.items():
            assert isinstance(kept.grads[p], FactoredGrads) == (model.layout.spec(p).kind == "kernel"), (name, p)
            assert _rel(kept.grads[p], g) < tolerance, (name, p)
        # norm-weighted over each parameter (GPT-2's key biases get rounding noise, not gradient)
        for p in reference.group_fisher:
            flat = lambda groups: np.concatenate([np.ravel(v) for _, v in sorted(groups.items())])  # noqa: E731
            assert _rel(flat(fisher.group_fisher[p]), flat(reference.group_fisher[p])) < 1e-5, (name, p)
            assert _rel(fisher.diagonal[p], reference.diagonal[p]) < 1e-5, (name, p)
    factored = out["factors"].sample_grads
    saved = io.load_task_fisher(io.save_task_fisher(out["factors"], tmp_path / "state"))  # saved as kept, never formed
    for p, g in factored.grads.items():
        assert type(saved.sample_grads.grads[p]) is type(g)
        np.testing.assert_array_equal(np.asarray(saved.sample_grads.grads[p]), np.asarray(g))
    selected = factored.select(np.array([3, 0]))
    for p, g in factored.grads.items():
        np.testing.assert_allclose(np.asarray(selected.grads[p]), np.asarray(g)[[3, 0]], rtol=1e-6)


def test_pair_phases_read_factors_as_gradients(collected):
    model, out = collected
    halves = {name: (out[name].sample_grads.select(np.arange(6)), out[name].sample_grads.select(np.arange(6, 14)))
              for name in ("grads", "factors", "bf16") if name in out}
    for contraction in ("looped", "batched"):
        scores = {name: qkov.heatmap(a, b, model.layout, contraction=contraction, min_fisher_samples=4).scores
                  for name, (a, b) in halves.items()}
        assert _rel(scores["factors"], scores["grads"]) < 1e-5, contraction
        assert "bf16" not in scores or _rel(scores["bf16"], scores["grads"]) < 1e-2, contraction
    spectra = {name: blocks.block_spectra(out[name], model.layout, top_k=3) for name in ("grads", "factors")}
    np.testing.assert_allclose(spectra["factors"].top, spectra["grads"].top, rtol=1e-4, atol=1e-6 * np.nanmax(spectra["grads"].top))
    a, b = halves["grads"]
    fisher = a.fisher()
    reports = {name: conflicts.detect(a, b, layout=model.layout, fisher=fisher) for name, (a, b) in halves.items()}
    np.testing.assert_allclose(reports["factors"].cosines, reports["grads"].cosines, atol=1e-5)
    if "bf16" in reports:
        np.testing.assert_allclose(reports["bf16"].cosines, reports["grads"].cosines, atol=1e-2)


@pytest.mark.parametrize("collected", ["gpt2"], indirect=True)  # bfloat16 factors: GPT-2's fixture keeps them
def test_qkov_of_a_task_takes_phase_1s_diagonal_over_the_same_samples(collected):
    """A TaskFisher's heatmap weighs by Phase 1's own diagonal when it is the mean over exactly the
    kept samples (no pass over them to form it again): the same scores as the kept samples' mean up
    to their storage's rounding; the kept samples' mean otherwise (a held-out split of rows, a
    diagonal of other samples)."""
    import dataclasses

    from fisherjax.analysis.qkov._prepare import stored_diagonal

    model, out = collected
    layout, options = model.layout, dict(min_fisher_samples=4)
    reference = qkov.heatmap(out["grads"].sample_grads, out["grads"].sample_grads, layout, **options)
    for name, tolerance in (("grads", 1e-5), ("factors", 1e-5), ("bf16", 1e-2)):
        assert _rel(qkov.heatmap(out[name], out[name], layout, **options).scores, reference.scores) < tolerance, name
    bf16 = out["bf16"]
    from_diagonal = qkov.heatmap(bf16, bf16, layout, **options)
    paths = list(bf16.sample_grads.grads)
    assert stored_diagonal(bf16, bf16.sample_grads, paths, None) is not None
    assert stored_diagonal(bf16, bf16.sample_grads, paths, np.arange(6)) is None  # a split takes its own rows' mean
    assert stored_diagonal(bf16.sample_grads, bf16.sample_grads, paths, None) is None
    other = bf16.sample_grads.select(np.arange(6))
    assert stored_diagonal(bf16, other, paths, None) is None  # a diagonal of other samples
    doubled = dataclasses.replace(bf16, diagonal={p: 2 * np.asarray(v) for p, v in bf16.diagonal.items()})
    np.testing.assert_allclose(qkov.heatmap(doubled, bf16, layout, **options).diagnostics.fisher_median,
                               2 * from_diagonal.diagnostics.fisher_median, rtol=1e-6)


def test_analyze_collects_a_tested_fit_half_first_and_phase_6_takes_its_fisher_from_phase_1(tmp_path):
    """``analyze`` orders a task that Phase 6 tests so that the held-out test's fit half comes
    first, and Phase 1 records that half's Fisher: the split is the one the test draws (by sample
    id, whatever the order), the record equals the kept samples' mean over the fit half (float32:
    to rounding), the test takes its weights and mean row from it (a doubled record doubles the
    row); nothing is reordered where nothing is
    tested. The record is saved with the rest of the Fisher. With a Fisher pooled over both tasks
    Phase 6 gives the heatmaps and skips the test with the reason (it once stopped the run)."""
    import dataclasses

    from fisherjax import work
    from fisherjax.analysis.qkov._prepare import prepare, stored_diagonal
    from fisherjax.pipeline import Context, collect_all, fit_half_ids, fit_prefix, qkov_ways, task_batches

    model = Model.init(tiny_config("gpt2"), seed=0)
    tasks = {"a": random_task("a", 21, seed=5, min_len=3, max_len=20, prompt=1), "b": random_task("b", 18, seed=6, min_len=3, max_len=20)}
    config = AnalysisConfig(batch_size=4, sample_grads_dtype="float32", sample_grads_form="gradients", progress=False, seed=3)
    ordered = task_batches(model, tasks, config)
    plain = {name: list(batches(task, 4)) for name, task in tasks.items()}
    assert [fit_prefix(plain[name], config, 2) for name in tasks] == [None, None]  # file order: the fit half is not first
    prefixes = [fit_prefix(ordered[name], config, 2) for name in tasks]
    assert prefixes == [3, 3]  # 11 and 9 samples of the fit halves
    fishers, _ = collect_all(model, ordered, config)
    paths = attention_paths(model.layout)
    score = qkov.ScoreOptions(min_fisher_samples=config.score_options().min_fisher_samples)
    for name, fisher in fishers.items():
        fit, _ = qkov.heldout_rows(fisher, work.HELDOUT, config.seed)
        kept = fisher.sample_grads
        fit_ids = np.sort(kept.sample_ids[fit])
        in_file_order = np.concatenate([b.sample_ids for b in plain[name]])
        in_file_order = in_file_order[in_file_order >= 0]  # every sample has a predicted token here
        same, _ = qkov.heldout_positions(in_file_order, work.HELDOUT, config.seed)
        np.testing.assert_array_equal(np.sort(in_file_order[same]), fit_ids)  # one split, either order
        np.testing.assert_array_equal(np.sort(fisher.partial_diagonal.sample_ids), fit_ids)
        assert sorted(fisher.partial_diagonal.mean) == paths
        recorded = stored_diagonal(fisher, kept, paths, fit)
        mean = kept.fisher(paths, rows=fit)
        for p in paths:
            assert _rel(recorded[p], mean[p]) < 1e-5, (name, p)
        row = prepare(fisher, fishers["b" if name == "a" else "a"], model.layout, score, a_rows=fit, mean=True).a.grads
        doubled = dataclasses.replace(fisher, partial_diagonal=fisher.partial_diagonal._replace(
            mean={p: 2 * v for p, v in fisher.partial_diagonal.mean.items()}))
        twice = prepare(doubled, fishers["b" if name == "a" else "a"], model.layout, score, a_rows=fit, mean=True).a.grads
        for p in paths:
            np.testing.assert_array_equal(row[p][0], fisher.partial_diagonal.mean[p])
            np.testing.assert_array_equal(twice[p][0], 2 * fisher.partial_diagonal.mean[p])
    saved = io.load_task_fisher(io.save_task_fisher(fishers["a"], tmp_path / "state")).partial_diagonal
    np.testing.assert_array_equal(saved.sample_ids, fishers["a"].partial_diagonal.sample_ids)
    for p in paths:
        np.testing.assert_array_equal(saved.mean[p], fishers["a"].partial_diagonal.mean[p])
    pooled = dataclasses.replace(config, qkov_fisher_pool="pooled")  # the heatmaps, but no test: its null weighs by A's own Fisher
    assert fit_half_ids(ordered["a"], pooled, 2) is None
    for heatmap, test, _ in qkov_ways(Context(pooled, model, tasks, ordered, fishers), "a", "b", {}):
        assert np.all(np.isfinite(heatmap.scores)) and "does not take --qkov-fisher-pool pooled" in test
    untested = dataclasses.replace(config, phases=("fisher", "conflicts"))
    for name, task in tasks.items():
        np.testing.assert_array_equal(np.concatenate([b.sample_ids for b in task_batches(model, tasks, untested)[name]]),
                                      np.concatenate([b.sample_ids for b in plain[name]]))


def test_analyze_keeps_factors_when_asked_and_its_results_do_not_change(cli_checkpoint, tmp_path):
    """``--sample-grads-form factors`` against ``gradients`` on the same run (float32 storage): the
    same QK-OV scores and conflict cosines; results.json and the report say how the gradients were
    kept, and ``--save-sample-grads`` saves the factors."""
    import json

    from refusals import run_cli

    results = {}
    for form in ("gradients", "factors"):
        out = tmp_path / form
        code, _, err = run_cli(["analyze", "--model", cli_checkpoint / "model", "--task", f"add={cli_checkpoint / 'add.jsonl'}",
                                "--task", f"words={cli_checkpoint / 'words.txt'}", "--out", out, "--no-progress", "--no-diagonal",
                                "--phases", "fisher,conflicts,qkov", "--sample-grads-form", form, "--sample-grads-dtype", "float32",
                                "--save-sample-grads"])
        assert code == 0, err
        results[form] = json.loads((out / "results.json").read_text())
    kept = results["factors"]["fisher"]["add"]["kept"]
    as_gradients = results["gradients"]["fisher"]["add"]["kept"]
    assert len(kept["as_factors"]) == 4 and as_gradients["as_factors"] == []  # q, k, v and o kernels
    assert kept["bytes_as_gradients"] == as_gradients["bytes"] == as_gradients["bytes_as_gradients"] != kept["bytes"]
    assert "4 kernels as token factors" in (tmp_path / "factors" / "report.md").read_text()
    saved = io.load_task_fisher(tmp_path / "factors" / "fisher_state" / "add").sample_grads
    assert sum(isinstance(g, FactoredGrads) for g in saved.grads.values()) == 4
    # The pair phases' work counts each read of a kept sample's factors as forming its gradients
    # once: 2·T·d_in·d_out per layer and kernel of ONE sample (it once counted all of the task's).
    from fisherjax.work import qkov_pair_reads, qkov_tested

    kept = {name: io.load_task_fisher(tmp_path / "factors" / "fisher_state" / name).sample_grads for name in ("add", "words")}
    sizes = {name: len(grads) for name, grads in kept.items()}
    reform = {name: sum(2 * g.inputs.shape[1] * g.inputs.shape[2] * g.inputs.shape[3] * g.deltas.shape[3]  # [n, L, T, d]
                        for g in grads.grads.values() if isinstance(g, FactoredGrads)) for name, grads in kept.items()}
    extra = {phase: (results["factors"]["phases"][phase]["work_tflop"] - results["gradients"]["phases"][phase]["work_tflop"]) * 1e12
             for phase in ("conflicts", "qkov")}
    assert extra["conflicts"] == pytest.approx(sum(sizes[t] * reform[t] for t in kept), rel=1e-6)
    import math

    from fisherjax.models.model import Model
    from fisherjax.plan import read_config
    from fisherjax.work import conflict_pair_flops

    layout = Model.abstract(read_config(model_dir=cli_checkpoint / "model")).layout
    features = sum(math.prod(layout.spec(p).shape) for p in attention_paths(layout))  # one sample's kept parameters
    grams = conflict_pair_flops(sizes["add"], sizes["words"], features, (sizes["add"], sizes["words"]))
    assert results["gradients"]["phases"]["conflicts"]["work_tflop"] * 1e12 == pytest.approx(grams, rel=1e-9)
    # Phase 6 computes the pair both ways at once (qkov.both_ways): each task's samples formed once,
    # its fit half once more for that half's Fisher, and (--no-diagonal) all of it for its own Fisher
    assert qkov.formed_once(sizes["add"], sizes["words"], layout)
    reads = [(a, b, qkov_pair_reads(sizes[a], sizes[b], 8, diagonal=False, formed_once=True)) for a, b in (("add", "words"), ("words", "add"))]
    fit = {a: sizes[a] - round(sizes[a] / 2) if qkov_tested(sizes[a], 8) else 0 for a in sizes}  # 6 and 5 < 8: untested here
    assert [r for _, _, r in reads] == [(2 * sizes[a] + fit[a], 0) for a, _, _ in reads]
    assert extra["qkov"] == pytest.approx(sum(r_a * reform[a] + r_b * reform[b] for a, b, (r_a, r_b) in reads), rel=1e-6)
    scores = {form: np.load(tmp_path / form / "qkov.npz") for form in results}
    for key in scores["gradients"].files:
        reference = scores["gradients"][key]
        if reference.dtype.kind == "f" and np.any(reference):
            assert _rel(scores["factors"][key], reference) < 1e-5, key
        else:
            np.testing.assert_array_equal(scores["factors"][key], reference, err_msg=key)
    pairs = {form: results[form]["conflicts"]["pairs"]["add|words"] for form in results}
    assert [p["sample_a"] for p in pairs["factors"]["top_pairs"]] == [p["sample_a"] for p in pairs["gradients"]["top_pairs"]]
    np.testing.assert_allclose([p["cosine"] for p in pairs["factors"]["top_pairs"]], [p["cosine"] for p in pairs["gradients"]["top_pairs"]],
                               atol=1e-5)
