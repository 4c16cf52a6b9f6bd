"""Phase 1 driver: variants, bookkeeping, bad input and resumable collection."""

from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_task, tiny_config
from fisherjax import ConfigError, DataError, FisherjaxError, Model, NumericalError
from fisherjax.data import IGNORE, Batch, batches
from fisherjax.backend import HOST_ALIGNMENT
from fisherjax.fisher.collect import collect, group_intervals
from fisherjax.fisher.step import sample_labels
from fisherjax.fisher.groups import groups_of_elementwise
from fisherjax.grads import per_sample_grads, sample_losses, token_nll
from fisherjax.layout import flatten, unflatten


@pytest.fixture(scope="module")
def model():
    return Model.init(tiny_config("llama"), seed=0)


@pytest.fixture(scope="module")
def task():
    return random_task("rand", 12, seed=1, prompt=2)


def _reference_groups(model, contributions_per_sample: dict) -> dict:
    """Mean over samples of C, reduced to groups (the rule functions are checked against an
    independent numpy derivation in test_fisher_reference)."""
    return {p: groups_of_elementwise(model.layout, p, c.mean(0)) for p, c in contributions_per_sample.items()}


def _vmap_contributions(model, task, batch_size=4, labels_fn=None):
    out = []
    for b in batches(task, batch_size):
        if labels_fn is not None:
            b = b._replace(labels=labels_fn(b))
        ps = per_sample_grads(model, model.params, b)
        t = np.asarray(ps.tokens)
        keep = (b.sample_ids >= 0) & (t > 0)
        out.append({p: np.square(np.asarray(v, np.float64)[keep]) / t[keep].reshape((-1,) + (1,) * (v.ndim - 1))
                    for p, v in flatten(ps.grads).items()})
    return {p: np.concatenate([o[p] for o in out]) for p in out[0]}


def _assert_groups_close(ours, ref, rtol=1e-4):
    scale = max(float(np.max(v)) for groups in ref.values() for v in groups.values())
    for path, groups in ref.items():
        for g, v in groups.items():
            np.testing.assert_allclose(ours[path][g], v, rtol=rtol, atol=1e-6 * scale, err_msg=f"{path} {g}")


def test_welford_statistics_from_per_sample_groups(model, task):
    fisher = collect(model, batches(task, 4), task="rand", progress=False)
    assert fisher.n_samples == 12 and fisher.n_skipped == 0
    for path, groups in fisher.per_sample_groups.items():
        for g, values in groups.items():
            np.testing.assert_allclose(fisher.group_fisher[path][g], values.mean(0), rtol=1e-5, atol=1e-12)
            np.testing.assert_allclose(fisher.welford.m2[path][g] / 11, values.var(0, ddof=1), rtol=1e-3, atol=1e-14)
    lo, hi = group_intervals(fisher, method="bootstrap", n_bootstrap=200)
    lo_n, hi_n = group_intervals(fisher, method="normal")
    q = fisher.group_fisher["layers/self_attn/q_proj/kernel"]["head"]
    assert np.all(lo["layers/self_attn/q_proj/kernel"]["head"] <= q) and np.all(q <= hi["layers/self_attn/q_proj/kernel"]["head"])
    assert np.all(lo_n["layers/self_attn/q_proj/kernel"]["head"] < hi_n["layers/self_attn/q_proj/kernel"]["head"])


def test_sample_order_changes_fisher_by_rounding_only(model, task):
    a = collect(model, batches(task, 4), task="rand", progress=False)
    b = collect(model, batches(task.subset(list(np.random.default_rng(5).permutation(12))), 4), task="rand", progress=False)
    for path, groups in a.group_fisher.items():
        for g, v in groups.items():
            assert np.max(np.abs(b.group_fisher[path][g] - v) / np.maximum(np.abs(v), 1e-30)) <= 1e-5


def test_ema_mode_is_the_bias_corrected_moving_average(model, task):
    fisher = collect(model, batches(task, 4), task="rand", mode="ema", ema_decay=0.8, progress=False)
    values = fisher.per_sample_groups["layers/mlp/down_proj/kernel"]["neuron"]
    v = np.zeros(values.shape[1:])
    for x in values:
        v = 0.8 * v + 0.2 * x
    np.testing.assert_allclose(fisher.group_fisher["layers/mlp/down_proj/kernel"]["neuron"], v / (1 - 0.8**12), rtol=1e-4)


def test_per_token_fisher_equals_squared_token_gradients(model):
    task = random_task("small", 3, seed=2, max_len=7)
    fisher = collect(model, batches(task, 4), task="small", fisher_type="per_token", progress=False)
    batch = next(batches(task, 4))

    def token_losses(params, ids, mask, labels):
        return token_nll(model.apply(params, ids[None], mask[None]), labels[None])[0]

    jac = jax.jit(jax.vmap(jax.jacrev(token_losses), in_axes=(None, 0, 0, 0)))(model.params, batch.input_ids, batch.attention_mask, batch.labels)
    tokens = (batch.labels[:, 1:] != IGNORE).sum(-1)[:3].astype(np.float64)
    per_sample = {p: (np.square(np.asarray(g, np.float64)[:3]).sum(1)) / tokens.reshape((-1,) + (1,) * (g.ndim - 2)) for p, g in flatten(jac).items()}
    _assert_groups_close(fisher.group_fisher, _reference_groups(model, per_sample))


def test_sampled_labels_follow_the_model_distribution(model):
    """The true Fisher's labels are draws from softmax(logits) at the predicted positions only."""
    batch = next(batches(random_task("small", 2, seed=3, prompt=3), 2))
    logits = model.apply(model.params, batch.input_ids, batch.attention_mask)
    draws = np.asarray(jax.vmap(lambda k: sample_labels(k, logits, batch.labels))(jax.random.split(jax.random.key(11), 4000)))
    predicted = batch.labels != IGNORE
    assert np.all(draws[:, ~predicted] == IGNORE) and np.all(draws[:, predicted] >= 0)
    row, col = np.argwhere(predicted)[0]  # the first predicted position, drawn from position col - 1's logits
    z = np.asarray(logits[row, col - 1], np.float64)
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    counts = np.bincount(draws[:, row, col], minlength=probs.size)
    common = probs * len(draws) >= 5  # the chi-square approximation's rule of thumb; the rest pooled
    rest = [probs[~common].sum()] if (~common).any() else []
    expected = np.r_[probs[common], rest] * len(draws)
    observed = np.r_[counts[common], [counts[~common].sum()] if rest else []]
    from scipy import stats

    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_true_fisher_is_the_expectation_over_model_labels(model):
    """With one predicted token per sample the true Fisher is exactly ``Σ_y p(y) g(y)²``
    (enumerating the vocabulary); many draws must agree with it within Monte-Carlo error."""
    task = random_task("one", 3, seed=5, min_len=5, max_len=7, prompt=100)  # every token a prompt ...
    task = type(task)("one", tuple(type(e)(e.tokens, len(e.tokens) - 1, e.sample_id) for e in task.examples))  # ... but the last
    draws = 256
    fisher = collect(model, batches(task, 4), task="one", fisher_type="true", true_samples=draws, key=jax.random.key(3), progress=False)
    batch = next(batches(task, 4))
    logits = np.asarray(model.apply(model.params, batch.input_ids, batch.attention_mask), np.float64)
    vocab = model.config.vocab_size
    totals, probs = [], []
    for row in range(3):
        col = int(np.flatnonzero(batch.labels[row] != IGNORE)[0])
        p = np.exp(logits[row, col - 1] - logits[row, col - 1].max())
        probs.append(p / p.sum())
        labels = np.full((vocab, batch.labels.shape[1]), IGNORE, np.int32)
        labels[:, col] = np.arange(vocab)
        every = Batch(np.repeat(batch.input_ids[row : row + 1], vocab, 0), np.repeat(batch.attention_mask[row : row + 1], vocab, 0), labels, np.arange(vocab))
        grads = per_sample_grads(model, model.params, every).grads
        totals.append(sum(np.square(np.asarray(g, np.float64)).reshape(vocab, -1).sum(1) for g in flatten(grads).values()))
    # total Fisher (every group of every parameter): exact mean and the standard error of `draws` draws per sample
    means = np.array([p @ t for p, t in zip(probs, totals)])
    variances = np.array([p @ (t - m) ** 2 for p, t, m in zip(probs, totals, means)])
    exact, stderr = means.mean(), np.sqrt(variances.sum() / draws) / 3
    ours = sum(float(np.sum(v)) for path, groups in fisher.group_fisher.items() for g, v in groups.items()
               if g in ("head", "head_q", "head_k", "head_v", "channel", "row", "element"))
    assert abs(ours - exact) <= 4.5 * stderr, (ours, exact, stderr)
    empirical = collect(model, batches(task, 4), task="one", progress=False)
    assert not np.allclose(empirical.group_fisher["embed/embedding"]["row"], fisher.group_fisher["embed/embedding"]["row"])


def test_samples_without_predicted_tokens_are_skipped_and_counted(model):
    task = random_task("t", 5, seed=4)
    examples = list(task.examples)
    examples[2] = type(examples[2])(examples[2].tokens, len(examples[2].tokens), examples[2].sample_id)
    task = type(task)("t", tuple(examples))
    with pytest.warns(UserWarning, match=r"1 sample\(s\) with no predicted tokens.*\[2\]"):
        fisher = collect(model, batches(task, 8), task="t", keep_sample_grads=True, progress=False)
    assert fisher.n_samples == 4 and fisher.n_skipped == 1
    assert 2 not in fisher.sample_ids and 2 not in fisher.sample_grads.sample_ids
    for groups in fisher.group_fisher.values():
        for v in groups.values():
            assert np.all(np.isfinite(v))


def test_nan_in_params_names_the_sample_and_parameter(model, task):
    params = flatten(jax.tree.map(np.array, model.params))
    batch = next(batches(task, 4))
    token = int(batch.input_ids[1, 0])  # only sample 1 starts with this token in this batch
    assert token not in batch.input_ids[[0, 2, 3]]
    params["embed/embedding"][token, 0] = np.nan
    with pytest.raises(NumericalError, match=r"sample 1 has NaN or inf in its loss"):
        collect(model, [batch], task="rand", params=unflatten(params), progress=False)


def test_bad_input_errors(model, task):
    with pytest.raises(DataError, match="no samples"):
        collect(model, [], task="empty", progress=False)
    bad = next(batches(task, 4))
    bad.input_ids[0, 0] = model.config.vocab_size + 3
    with pytest.raises(DataError, match=f"token id {model.config.vocab_size + 3}"):
        collect(model, [bad], task="rand", progress=False)
    with pytest.raises(ConfigError, match="does not have"):
        collect(model, batches(task, 4), task="rand", keep_sample_grads=["nope/kernel"], progress=False)


def test_contribution_storage_budget_and_spill(model, task, tmp_path):
    full = collect(model, batches(task, 4), task="rand", keep_sample_grads=True, progress=False)
    assert full.sample_grads.paths == sorted(full.sample_grads.paths) or full.sample_grads.paths
    half = collect(model, batches(task, 4), task="rand", keep_sample_grads=True, sample_grads_dtype="bfloat16", progress=False)
    for kept in (full, half):  # aligned, so the CPU backend reads them in place (qkov)
        assert all(np.asarray(g).ctypes.data % HOST_ALIGNMENT == 0 and g.flags.c_contiguous for g in kept.sample_grads.grads.values())
    q = "layers/self_attn/q_proj/kernel"
    assert half.sample_grads.grads[q].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half.sample_grads.grads[q], np.float32), full.sample_grads.grads[q], rtol=1e-2, atol=1e-6)
    with pytest.raises(FisherjaxError, match="spill_dir"):
        collect(model, batches(task, 4), task="rand", keep_sample_grads=True, sample_grads_budget_bytes=1e3, progress=False)
    with pytest.raises(ValueError, match="sample_grads_budget_bytes must be > 0"):
        collect(model, batches(task, 4), task="rand", keep_sample_grads=True, sample_grads_budget_bytes=0, progress=False)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(FisherjaxError, match="cannot create it"):
        collect(model, batches(task, 4), task="rand", keep_sample_grads=True, sample_grads_budget_bytes=1e3,
                spill_dir=tmp_path / "a_file" / "spill", progress=False)
    spilled = collect(model, batches(task, 4), task="rand", keep_sample_grads=True, sample_grads_budget_bytes=1e3,
                      spill_dir=tmp_path / "spill", progress=False)
    assert isinstance(spilled.sample_grads.grads[q], np.memmap)
    np.testing.assert_array_equal(np.asarray(spilled.sample_grads.grads[q]), full.sample_grads.grads[q])
    np.testing.assert_array_equal(spilled.sample_grads.sample_ids, np.arange(12))
    # .npy has no bfloat16: spilled bfloat16 gradients come back memory-mapped with their dtype and bits
    spilled_half = collect(model, batches(task, 4), task="rand", keep_sample_grads=True, sample_grads_dtype="bfloat16",
                           sample_grads_budget_bytes=1e3, spill_dir=tmp_path / "spill-half", progress=False)
    g = spilled_half.sample_grads.grads[q]
    assert isinstance(g.base, np.memmap) or isinstance(g, np.memmap)
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g).view(np.uint16), np.asarray(half.sample_grads.grads[q]).view(np.uint16))
    np.testing.assert_array_equal(spilled_half.sample_grads.contributions[q], half.sample_grads.contributions[q])



@pytest.mark.parametrize("options", [
    dict(sample_grads_factors=True),
    dict(sample_grads_dtype="bfloat16"),
    dict(fisher_type="true"),  # C_i kept beside g_i
])
def test_kept_bytes_are_what_collection_keeps_and_too_many_are_refused_first(model, task, options):
    """:func:`kept_bytes` equals the bytes of the arrays a collection keeps (one bucket, so their
    join adds no padding), and a budget below it is refused before the first step: the message
    says how much, how many fit, and the way out; a budget of exactly it passes."""
    from fisherjax.fisher.collect import kept_bytes
    from fisherjax.fisher.options import CollectOptions

    chosen = list(batches(task, 4, buckets=(16,)))
    collected = CollectOptions(keep_sample_grads=True, **options)
    need, rows = kept_bytes(model, chosen, collected)
    kept = collect(model, chosen, task="rand", options=collected, key=jax.random.key(0), progress=False).sample_grads
    arrays = [*kept.grads.values(), *(kept.stored_contributions or {}).values()]
    held = sum(a.inputs.nbytes + a.deltas.nbytes if hasattr(a, "deltas") else np.asarray(a).nbytes for a in arrays)
    assert need == held and rows.tolist() == [4, 4, 4]

    with pytest.raises(ConfigError, match=r"task 'rand': its 12 samples' kept .* would take .* about 9 of them; .*--spill-dir"):
        collect(model, chosen, task="rand", options=collected.replace(sample_grads_budget_bytes=need * 0.75), progress=False,
                key=jax.random.key(0))  # the late refusal is a FisherjaxError "after N samples": this one comes first
    collect(model, chosen, task="rand", options=collected.replace(sample_grads_budget_bytes=need), key=jax.random.key(0), progress=False)


def test_the_spill_directory_is_asked_for_what_phase_1_will_keep(model, task):
    """``analyze``'s disk check asks ``--spill-dir`` for the bytes Phase 1 keeps, in the form it
    keeps them: gradients, or token factors (which at 16 positions of this tiny model are larger
    than the gradients; on GPT-2 small at 128 positions a quarter of them), not always for every
    kept kernel's full gradient."""
    from fisherjax.fisher.collect import kept_bytes
    from fisherjax.fisher.options import attention_paths
    from fisherjax.pipeline import AnalysisConfig, estimate_output_bytes, longest, task_batches

    gradients = len(task) * sum(np.prod(model.layout.spec(p).shape) for p in attention_paths(model.layout)) * 2  # bfloat16
    for form in ("gradients", "factors"):
        config = AnalysisConfig(sample_grads_form=form, batch_size=4)
        chosen = task_batches(model, {"a": task, "b": task}, config)
        kept = kept_bytes(model, chosen["a"], config.collect_options(model.layout, longest(chosen)))[0]
        assert estimate_output_bytes(model, chosen, config)[1] == pytest.approx(1.2 * 2 * kept)
        assert (kept == gradients) if form == "gradients" else (kept > gradients)

def test_the_diagonal_over_the_first_batches_is_recorded_on_the_way(model, task, tmp_path):
    """``prefix_batches``: the full diagonal's mean over the first batches' samples, read from the
    running state, equals a collection of those batches alone — in the sum and the Welford state,
    for every path or a few, for all the batches, and from a run resumed exactly there; a run
    resumed after them records none, and a run without the diagonal refuses it."""
    from fisherjax.fisher.options import attention_paths

    data = list(batches(task, 4))
    assert len(data) == 3
    paths = attention_paths(model.layout)
    for variance, k, chosen in ((False, 1, None), (False, 2, paths), (False, 3, None), (True, 2, paths)):
        common = dict(task="rand", diagonal=True, diagonal_variance=variance, progress=False)
        reference = collect(model, data[:k], **common)
        partial = collect(model, data, prefix_batches=k, prefix_paths=chosen, **common).partial_diagonal
        np.testing.assert_array_equal(partial.sample_ids, reference.sample_ids)
        assert sorted(partial.mean) == sorted(chosen or reference.diagonal)
        for p, value in partial.mean.items():
            assert value.dtype == np.float32
            np.testing.assert_allclose(value, reference.diagonal[p], rtol=2e-6, atol=1e-12 * np.abs(reference.diagonal[p]).max())
    common = dict(task="rand", diagonal=True, progress=False, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1)
    collect(model, data[:2], **common)
    resumed = collect(model, data, resume=True, prefix_batches=2, **common)
    reference = collect(model, data[:2], task="rand", diagonal=True, progress=False)
    for p, value in resumed.partial_diagonal.mean.items():
        np.testing.assert_allclose(value, reference.diagonal[p], rtol=2e-6, atol=1e-12 * np.abs(reference.diagonal[p]).max())
    assert collect(model, data, resume=True, prefix_batches=1, **common).partial_diagonal is None
    assert collect(model, data, task="rand", diagonal=True, progress=False).partial_diagonal is None
    with pytest.raises(ConfigError, match="prefix_batches=2 .* diagonal=True"):
        collect(model, data, task="rand", diagonal=False, prefix_batches=2, progress=False)


RESUME_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import random_task, tiny_config
    from fisherjax import Model
    from fisherjax.data import batches
    from fisherjax.fisher.collect import collect
    from fisherjax.layout import flatten

    mode, out = sys.argv[1], sys.argv[2]
    model = Model.init(tiny_config("gpt2"), seed=3)
    data = list(batches(random_task("r", 22, seed=9), 3))

    def feed():
        for i, b in enumerate(data):
            if mode == "crash" and i == 5:
                os.kill(os.getpid(), signal.SIGKILL)  # die mid-run, after the save at batch 4
            yield b

    fisher = collect(model, feed(), task="r", keep_sample_grads=True, checkpoint_dir=out + "/ckpt",
                     checkpoint_every=2, resume=(mode == "resume"), progress=False)
    arrays = {{"w|" + k: v for k, v in flatten(fisher.welford.m2).items()}}
    arrays.update({{"g|" + k: v for k, v in flatten(fisher.group_fisher).items()}})
    arrays.update({{"c|" + k: np.asarray(v) for k, v in fisher.sample_grads.grads.items()}})
    arrays["ids"] = fisher.sample_ids
    np.savez(out + "/result.npz", **arrays)
    """
)


@pytest.mark.slow  # three subprocesses; resume from the orbax progress is checked in-process by tests/test_experiments.py
def test_killed_collection_resumes_to_identical_numbers(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def run(mode, out):
        Path(out).mkdir(exist_ok=True)
        return subprocess.run([sys.executable, str(script), mode, str(out)], env=env, capture_output=True, text=True, timeout=300)

    crashed = run("crash", tmp_path / "a")
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    assert not (tmp_path / "a" / "result.npz").exists()
    resumed = run("resume", tmp_path / "a")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = run("straight", tmp_path / "b")
    assert straight.returncode == 0, straight.stderr[-2000:]
    a, b = np.load(tmp_path / "a" / "result.npz"), np.load(tmp_path / "b" / "result.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert len(a["ids"]) == 22


def test_memory_budget_splits_batches_into_micro_batches(model, task):
    from fisherjax.fisher.options import CollectOptions
    from fisherjax.fisher.step import make_plan, micro_batch_size

    plan = make_plan(model.layout, CollectOptions(keep_sample_grads=True, diagonal=True))
    assert micro_batch_size(model, plan, 8, 16, 1e6) < 8
    whole = collect(model, batches(task, 8), task="rand", keep_sample_grads=True, diagonal=True, progress=False)
    split = collect(model, batches(task, 8), task="rand", keep_sample_grads=True, diagonal=True, progress=False, memory_budget_bytes=1e6)
    np.testing.assert_array_equal(whole.sample_grads.sample_ids, split.sample_grads.sample_ids)
    _assert_groups_close(split.group_fisher, whole.group_fisher, rtol=1e-5)
    q = "layers/self_attn/q_proj/kernel"
    np.testing.assert_allclose(split.sample_grads.grads[q], whole.sample_grads.grads[q], rtol=1e-4, atol=1e-7)


def test_an_accelerator_takes_the_largest_micro_batch_whose_compiled_step_fits(model, task, monkeypatch):
    """On an accelerator the micro-batch is not the CPU's 4 GB estimate (which holds a 1.5B model
    at T = 512 to one sample a step) but the largest candidate whose compiled step, with the
    previous step's outputs and without the resident parameters, fits 90 % of the free memory."""
    from fisherjax import backend
    from fisherjax.fisher.collect import step_shapes
    from fisherjax.fisher.options import CollectOptions
    from fisherjax.fisher.step import DEVICE_STEP_SHARE, fitting_micro_batch, micro_batch, step_memory

    options = CollectOptions(keep_sample_grads=True, diagonal=True)

    def need(rows):
        step = step_memory(model, rows, 16, options)
        return step.total_bytes + step.output_bytes - step.alias_bytes - model.parameter_bytes

    assert need(1) < need(2) < need(4) < need(8)
    between = (need(2) + need(4)) / 2 / DEVICE_STEP_SHARE
    assert fitting_micro_batch(model.static, options, 8, 16, None, between) == 2
    assert fitting_micro_batch(model.static, options, 8, 16, None, 1e15) == 8
    assert fitting_micro_batch(model.static, options, 6, 16, None, 1e15) == 6  # the batch's own rows are a candidate
    assert fitting_micro_batch(model.static, options, 8, 16, None, 1.0) == 1

    data = list(batches(task, 8, buckets=(16,)))
    cpu = collect(model, data, task="rand", options=options, progress=False)
    monkeypatch.setattr(backend, "is_cpu", lambda: False)
    monkeypatch.setattr(backend, "available_memory_bytes", lambda: between)
    assert micro_batch(model, options, 8, 16) == 2 and step_shapes(model, data, options) == {(2, 16)}
    assert micro_batch(model, CollectOptions(keep_sample_grads=True, diagonal=True, memory_budget_bytes=1e15), 8, 16) == 8
    split = collect(model, data, task="rand", options=options, progress=False)
    _assert_groups_close(split.group_fisher, cpu.group_fisher, rtol=1e-5)
    np.testing.assert_array_equal(split.sample_grads.sample_ids, cpu.sample_grads.sample_ids)


def test_derived_contributions_are_not_computed_to_build_or_select(monkeypatch):
    """The empirical Fisher's ``C = g²/T`` is derived on access; building, validating and selecting
    a :class:`SampleGrads` must not compute it (it did, for every parameter, on every build)."""
    from fisherjax.fisher.state import DerivedContributions, SampleGrads

    def refuse(self, path):
        raise AssertionError(f"contributions of {path!r} computed")

    monkeypatch.setattr(DerivedContributions, "__getitem__", refuse)
    grads = {"a/kernel": np.ones((4, 3, 2), np.float32), "b/bias": np.ones((4, 5), np.float32)}
    c = SampleGrads(np.arange(4), np.array([1, 2, 0, 3]), grads)
    assert c.derived and len(c.select(np.array([0, 3]))) == 2
    with pytest.raises(ValueError, match="has 3 samples"):
        SampleGrads(np.arange(4), np.arange(4), {"a/kernel": np.ones((3, 2), np.float32)})


def test_the_step_traces_once_and_a_second_collection_compiles_nothing(model, task):
    """Batches of one bucket shape reuse one trace of the step, and a repeated collection with
    the same shapes reuses the library's compiled step."""
    import chex

    from conftest import compilations
    from fisherjax.fisher.options import CollectOptions
    from fisherjax.fisher.step import initial_state, make_plan, step_function

    plan = make_plan(model.layout, CollectOptions(keep_sample_grads=True, diagonal=True))
    step = jax.jit(chex.assert_max_traces(step_function(model, plan), n=1))
    state = initial_state(model, plan)
    for index, batch in enumerate(batches(task, 4)):  # 12 samples of ≤ 14 tokens: one bucket, three batches
        state, *_ = step(model.params, state, batch.input_ids, batch.attention_mask, batch.labels, batch.sample_ids,
                         jax.random.key(0))
    options = dict(task="rand", keep_sample_grads=True, diagonal=True, progress=False)
    first = collect(model, batches(task, 4), **options)
    with compilations() as compiled:
        again = collect(model, batches(task, 4), **options)
    assert compiled.count == 0
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, again.group_fisher), jax.tree.map(np.asarray, first.group_fisher))
    # A model loaded again (equal signature, other weights) shares the step and gets its own numbers;
    # the shared step holds no weights, so they go when the model goes.
    other = model.replace(params=jax.tree.map(lambda x: 1.5 * x, model.params))
    assert other.signature == model.signature and other.signature is not model.signature
    with compilations() as compiled:
        scaled = collect(other, batches(task, 4), **options)
    assert compiled.count == 0
    for path, groups in scaled.group_fisher.items():
        for kind, value in groups.items():
            assert not np.allclose(value, first.group_fisher[path][kind], rtol=1e-3), (path, kind)
    batch = next(iter(batches(task, 4)))
    per_sample_grads(model, model.params, batch)
    with compilations() as compiled:  # a function jitted with the model static (fisherjax.models.model_jit)
        grads = per_sample_grads(other, other.params, batch).grads
    assert compiled.count == 0
    reference = jax.grad(lambda p: sample_losses(other, p, *(x[:1] for x in batch[:3]))[0][0])(other.params)
    chex.assert_trees_all_close(jax.tree.map(lambda g: g[0], grads), reference, rtol=1e-3, atol=1e-6)
    leaf = weakref.ref(jax.tree.leaves(other.params)[0])
    del other
    gc.collect()
    assert leaf() is None


def test_task_fisher_is_a_pytree_that_jit_and_tree_map_take(model, task):
    """State is data: every array of a TaskFisher (and its SampleGrads) is a leaf, names and counts
    are static metadata, and jax.jit takes the whole value."""
    fisher = collect(model, batches(task, 4), task="rand", keep_sample_grads=True, diagonal=True, progress=False)
    leaves = jax.tree.leaves(fisher)
    assert all(isinstance(x, np.ndarray) for x in leaves) and len(leaves) > len(fisher.group_fisher)
    doubled = jax.tree.map(lambda x: 2 * x, fisher)
    assert doubled.task == "rand" and doubled.n_samples == fisher.n_samples
    q = "layers/self_attn/q_proj/kernel"
    np.testing.assert_array_equal(doubled.sample_grads.grads[q], 2 * fisher.sample_grads.grads[q])
    assert doubled.sample_grads.derived  # still derives C = g²/T from the (doubled) gradients
    total = jax.jit(lambda f: sum(jnp.sum(v) for groups in f.group_fisher.values() for v in groups.values()))(fisher)
    expected = sum(float(np.sum(v, dtype=np.float64)) for groups in fisher.group_fisher.values() for v in groups.values())
    assert float(total) == pytest.approx(expected, rel=1e-5)
    sliced = jax.jit(lambda c: jax.tree.map(lambda x: x[:3], c))(fisher.sample_grads)
    np.testing.assert_allclose(sliced.grads[q], fisher.sample_grads.grads[q][:3])


def test_resume_refuses_a_checkpoint_of_another_collection(model, task, tmp_path):
    """The checkpoint records what it was made from; resuming with another task name, other data,
    another batch size, other options or other weights names the difference instead of returning
    the other collection's Fisher."""
    from fisherjax import CheckpointError

    directory = tmp_path / "ckpt"
    common = dict(checkpoint_dir=directory, checkpoint_every=1, progress=False)
    first = collect(model, batches(task, 4), task="rand", **common)
    again = collect(model, batches(task, 4), task="rand", resume=True, **common)  # the same run resumes
    np.testing.assert_array_equal(again.group_fisher["embed/embedding"]["row"], first.group_fisher["embed/embedding"]["row"])
    other = random_task("rand", 12, seed=99, prompt=2)
    params = jax.tree.map(lambda x: x * 1.01, model.params)
    cases = [
        (dict(batches=batches(task, 4), task="other"), "task 'rand' there, 'other' here"),
        (dict(batches=batches(other, 4), task="rand"), "the first 3 batches differ"),
        (dict(batches=batches(task, 3), task="rand"), "batch size 4, this run's is 3"),
        (dict(batches=batches(task, 4), task="rand", diagonal=True), "option diagonal=False there, True here"),
        (dict(batches=batches(task, 4), task="rand", params=params), "different model parameters"),
        (dict(batches=list(batches(task, 4))[:1], task="rand"), "the task now has only 1"),
    ]
    for kwargs, message in cases:
        with pytest.raises(CheckpointError, match=re.escape(message)):
            collect(model, kwargs.pop("batches"), resume=True, **common, **kwargs)


def test_accelerator_host_copy_through_pinned_memory_gives_the_same_numbers(model, task, monkeypatch):
    """On an accelerator the step's outputs reach the host through page-locked memory
    (``backend.start_host_copy``); XLA:CPU has that memory kind too, so the path runs here."""
    from fisherjax import backend

    ref = collect(model, batches(task, 4), task="rand", keep_sample_grads=True, progress=False)
    monkeypatch.setattr(backend, "is_cpu", lambda: False)
    started = backend.start_host_copy({"x": jnp.arange(3.0)})
    assert started["x"].sharding.memory_kind == backend.PINNED_HOST
    np.testing.assert_array_equal(np.asarray(started["x"]), np.arange(3.0))
    pinned = collect(model, batches(task, 4), task="rand", keep_sample_grads=True, progress=False)
    np.testing.assert_array_equal(pinned.sample_ids, ref.sample_ids)
    for path, g in ref.sample_grads.grads.items():
        np.testing.assert_allclose(np.asarray(pinned.sample_grads.grads[path]), g, rtol=1e-5, atol=1e-7)
    for path, groups in ref.group_fisher.items():
        for kind, values in groups.items():
            np.testing.assert_allclose(pinned.group_fisher[path][kind], values, rtol=1e-5, atol=1e-9)
