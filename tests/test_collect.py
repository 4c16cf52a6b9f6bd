"""Phase 1 driver: variants, bookkeeping, bad input and resumable collection."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_task, tiny_config
from fisherjax import DataError, FisherjaxError, Model, NumericalError
from fisherjax.data import IGNORE, batches
from fisherjax.fisher.collect import _sample_labels, collect, group_intervals
from fisherjax.fisher.state import HOST_ALIGNMENT
from fisherjax.fisher.groups import groups_of_elementwise
from fisherjax.grads import per_sample_grads, token_nll
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


def test_true_fisher_uses_labels_sampled_from_the_model(model):
    task = random_task("small", 4, seed=3)
    key = jax.random.key(7)
    fisher = collect(model, batches(task, 4), task="small", fisher_type="true", true_samples=2, key=key, progress=False)
    batch = next(batches(task, 4))
    logits = model.apply(model.params, batch.input_ids, batch.attention_mask)
    draws = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, 0), 0), 2)  # batch 0, micro-batch 0
    per_draw = [_vmap_contributions(model, task, labels_fn=lambda b, k=k: np.asarray(_sample_labels(k, logits, b.labels))) for k in draws]
    mean = {p: (per_draw[0][p] + per_draw[1][p]) / 2 for p in per_draw[0]}
    _assert_groups_close(fisher.group_fisher, _reference_groups(model, mean))
    empirical = collect(model, batches(task, 4), task="small", progress=False)
    assert not np.allclose(empirical.group_fisher["embed/embedding"]["row"], fisher.group_fisher["embed/embedding"]["row"])


def test_samples_without_predicted_tokens_are_skipped_and_counted(model):
    task = random_task("t", 5, seed=4)
    examples = list(task.examples)
    examples[2] = type(examples[2])(examples[2].tokens, len(examples[2].tokens), examples[2].sample_id)
    task = type(task)("t", tuple(examples))
    with pytest.warns(UserWarning, match=r"1 sample\(s\) with no predicted tokens.*\[2\]"):
        fisher = collect(model, batches(task, 8), task="t", contributions=True, progress=False)
    assert fisher.n_samples == 4 and fisher.n_skipped == 1
    assert 2 not in fisher.sample_ids and 2 not in fisher.contributions.sample_ids
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
    with pytest.raises(KeyError, match="unknown parameters"):
        collect(model, batches(task, 4), task="rand", contributions=["nope/kernel"], progress=False)


def test_contribution_storage_budget_and_spill(model, task, tmp_path):
    full = collect(model, batches(task, 4), task="rand", contributions=True, progress=False)
    assert full.contributions.paths == sorted(full.contributions.paths) or full.contributions.paths
    half = collect(model, batches(task, 4), task="rand", contributions=True, contribution_dtype="bfloat16", progress=False)
    for kept in (full, half):  # aligned, so the CPU backend reads them in place (qkov)
        assert all(np.asarray(g).ctypes.data % HOST_ALIGNMENT == 0 and g.flags.c_contiguous for g in kept.contributions.grads.values())
    q = "layers/self_attn/q_proj/kernel"
    assert half.contributions.grads[q].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half.contributions.grads[q], np.float32), full.contributions.grads[q], rtol=1e-2, atol=1e-6)
    with pytest.raises(FisherjaxError, match="spill_dir"):
        collect(model, batches(task, 4), task="rand", contributions=True, contribution_budget_bytes=1e3, progress=False)
    with pytest.raises(ValueError, match="contribution_budget_bytes must be > 0"):
        collect(model, batches(task, 4), task="rand", contributions=True, contribution_budget_bytes=0, progress=False)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(FisherjaxError, match="cannot create it"):
        collect(model, batches(task, 4), task="rand", contributions=True, contribution_budget_bytes=1e3,
                spill_dir=tmp_path / "a_file" / "spill", progress=False)
    spilled = collect(model, batches(task, 4), task="rand", contributions=True, contribution_budget_bytes=1e3,
                      spill_dir=tmp_path / "spill", progress=False)
    assert isinstance(spilled.contributions.grads[q], np.memmap)
    np.testing.assert_array_equal(np.asarray(spilled.contributions.grads[q]), full.contributions.grads[q])
    np.testing.assert_array_equal(spilled.contributions.sample_ids, np.arange(12))


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

    fisher = collect(model, feed(), task="r", contributions=True, checkpoint_dir=out + "/ckpt",
                     checkpoint_every=2, resume=(mode == "resume"), progress=False)
    arrays = {{"w|" + k: v for k, v in flatten(fisher.welford.m2).items()}}
    arrays.update({{"g|" + k: v for k, v in flatten(fisher.group_fisher).items()}})
    arrays.update({{"c|" + k: np.asarray(v) for k, v in fisher.contributions.grads.items()}})
    arrays["ids"] = fisher.sample_ids
    np.savez(out + "/result.npz", **arrays)
    """
)


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
    from fisherjax.fisher.collect import _make_plan, micro_batch_size

    plan = _make_plan(model.layout, True, True, "empirical", 1, "welford", "auto", "float32", False)
    assert micro_batch_size(model, plan, 8, 16, 1e6) < 8
    whole = collect(model, batches(task, 8), task="rand", contributions=True, diagonal=True, progress=False)
    split = collect(model, batches(task, 8), task="rand", contributions=True, diagonal=True, progress=False, memory_budget_bytes=1e6)
    np.testing.assert_array_equal(whole.contributions.sample_ids, split.contributions.sample_ids)
    _assert_groups_close(split.group_fisher, whole.group_fisher, rtol=1e-5)
    q = "layers/self_attn/q_proj/kernel"
    np.testing.assert_allclose(split.contributions.grads[q], whole.contributions.grads[q], rtol=1e-4, atol=1e-7)


def test_derived_contributions_are_not_computed_to_build_or_select(monkeypatch):
    """The empirical Fisher's ``C = g²/T`` is derived on access; building, validating and selecting
    a :class:`Contributions` must not compute it (it did, for every parameter, on every build)."""
    from fisherjax.fisher.state import Contributions, DerivedContributions

    def refuse(self, path):
        raise AssertionError(f"contributions of {path!r} computed")

    monkeypatch.setattr(DerivedContributions, "__getitem__", refuse)
    grads = {"a/kernel": np.ones((4, 3, 2), np.float32), "b/bias": np.ones((4, 5), np.float32)}
    c = Contributions(np.arange(4), np.array([1, 2, 0, 3]), None, grads)
    assert c.derived and len(c.select(np.array([0, 3]))) == 2
    with pytest.raises(ValueError, match="has 3 samples"):
        Contributions(np.arange(4), np.arange(4), None, {"a/kernel": np.ones((3, 2), np.float32)})
