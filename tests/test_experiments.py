"""The head-pruning experiment on a fixed subsample: reproducible, its cost independent of the
task's size, the loss before pruning from Phase 1's per-sample losses, several masks per pass
giving the numbers of one mask at a time; and the per-sample losses a TaskFisher keeps for it,
through save/load and resume."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from conftest import compilations, random_task, tiny_config
from fisherjax import Model, backend
from fisherjax.analysis import experiments, masks
from fisherjax.data import batches, task_from_tokens
from fisherjax.errors import ConfigError
from fisherjax.fisher.collect import collect
from fisherjax.fisher.groups import group_sizes, groups_of_elementwise
from fisherjax.fisher.state import TaskFisher
from fisherjax.grads import sample_losses
from fisherjax.report import masks as masks_report

from refusals import assert_refused


@pytest.fixture(scope="module")
def model():
    return Model.init(tiny_config("llama"), seed=0)


def random_fisher(layout, name: str, seed: int) -> TaskFisher:
    """A hand-built TaskFisher (random group values, no per-sample losses)."""
    rng = np.random.default_rng(seed)
    groups = {p: groups_of_elementwise(layout, p, rng.gamma(0.5, 1.0, size=s.shape)) for p, s in layout.specs.items()}
    return TaskFisher(name, groups, {p: group_sizes(layout, p) for p in groups}, n_samples=8)


def with_silent_samples(task, silent=(1, 4)):
    """The task with the samples at positions ``silent`` made all prompt (no predicted token)."""
    tokens = [list(e.tokens) for e in task.examples]
    return task_from_tokens(task.name, tokens, prompt_lens=[len(t) if i in silent else 0 for i, t in enumerate(tokens)])


@jax.jit(static_argnums=0)
def _losses(model, params, ids, mask, labels):
    return sample_losses(model, params, ids, mask, labels)


def reference_loss(model, params, task, sample_ids) -> float:
    """``Σ_{i∈S} L_i / Σ_{i∈S} T_i`` of the samples ``S`` batched afresh from the task, with
    :func:`fisherjax.grads.sample_losses` (independent of the experiment's gathering)."""
    total, count = 0.0, 0
    for b in batches(task.subset(sample_ids), 4):
        losses, tokens = _losses(model, params, b.input_ids, b.attention_mask, b.labels)
        real = b.sample_ids >= 0
        total += float(np.asarray(losses, np.float64)[real].sum())
        count += int(np.asarray(tokens)[real].sum())
    return total / count


def masked_params(model, keep):
    return masks.apply_mask(model.params, masks.mask_tree(model.layout, "head", {"head": np.asarray(keep)}))


def test_subsample_is_reproducible_and_its_cost_independent_of_n(model, monkeypatch):
    """At 4 samples per task, 8 and 40 samples cost the same passes of the same shapes (nothing
    new compiles for 40); the subsample repeats with the seed, holds only samples with a predicted
    token, and is the whole task when it has fewer eligible samples."""
    layout = model.layout
    fishers = {"a": random_fisher(layout, "a", 0), "b": random_fisher(layout, "b", 1)}
    calls = []
    original = experiments.masked_loss_sums

    def recording(model, params, keeps, ids, mask, labels, **kwargs):
        calls.append((np.shape(keeps), np.shape(ids), kwargs["masks_per_pass"]))
        return original(model, params, keeps, ids, mask, labels, **kwargs)

    monkeypatch.setattr(experiments, "masked_loss_sums", recording)

    def run(n, seed=0):
        tasks = {"a": with_silent_samples(random_task("a", n, seed=2)), "b": with_silent_samples(random_task("b", n, seed=3))}
        task_batches = {t: list(batches(task, 8)) for t, task in tasks.items()}
        calls.clear()
        result = experiments.head_pruning_experiment(model, model.params, task_batches, fishers, n_random=3, seed=seed, samples=4)
        return result, list(calls)

    small, small_calls = run(8)
    with compilations() as compiled:
        large, large_calls = run(40)
    assert compiled.count == 0
    assert large_calls == small_calls and len(large_calls) == 2  # one [4, 16] batch per task, all masks in it
    assert large["rows_per_batch"] == small["rows_per_batch"] == 4
    for name in ("a", "b"):
        r = large["tasks"][name]
        assert r["n_samples"] == 4 and r["n_eligible"] == 38 and r["loss_before_from"] == "evaluated"
        assert not {1, 4} & set(r["sample_ids"]) and r["sample_ids"] == sorted(r["sample_ids"])
    again, _ = run(40)
    assert again == large
    other, _ = run(40, seed=1)
    assert [other["tasks"][t]["sample_ids"] for t in "ab"] != [large["tasks"][t]["sample_ids"] for t in "ab"]
    tiny = with_silent_samples(random_task("a", 5, seed=2))  # 3 eligible samples, fewer than 4
    result = experiments.head_pruning_experiment(model, model.params, {"a": list(batches(tiny, 2))}, {"a": fishers["a"]}, n_random=3, samples=4)
    assert result["tasks"]["a"]["sample_ids"] == [0, 2, 3] and result["tasks"]["a"]["n_eligible"] == 3
    with pytest.raises(ConfigError, match="samples per task"):
        experiments.head_pruning_experiment(model, model.params, {"a": list(batches(tiny, 2))}, {"a": fishers["a"]}, samples=0)


@pytest.fixture(scope="module")
def collected(model):
    """Two tasks (12 samples; two of a's without a predicted token, a's batches padded on the left)
    and their Phase 1 Fisher."""
    tasks = {"a": with_silent_samples(random_task("a", 12, seed=5)), "b": random_task("b", 12, seed=6, prompt=3)}
    task_batches = {t: list(batches(task, 4, side="left" if t == "a" else "right")) for t, task in tasks.items()}
    with pytest.warns(UserWarning, match="no predicted tokens"):
        fisher_a = collect(model, task_batches["a"], task="a", progress=False)
    fishers = {"a": fisher_a, "b": collect(model, task_batches["b"], task="b", progress=False)}
    return tasks, task_batches, fishers


def test_loss_before_from_phase_one_equals_the_unmasked_evaluation(model, collected):
    tasks, task_batches, fishers = collected
    result = experiments.head_pruning_experiment(model, model.params, task_batches, fishers, n_random=3, seed=0, samples=5)
    evaluated = experiments.head_pruning_experiment(
        model, model.params, task_batches, {t: dataclasses.replace(f, losses=None) for t, f in fishers.items()}, n_random=3, seed=0, samples=5
    )
    for name, r in result["tasks"].items():
        assert r["loss_before_from"] == "phase 1" and r["n_samples"] == 5
        expected = reference_loss(model, model.params, tasks[name], r["sample_ids"])
        np.testing.assert_allclose(r["loss_before"], expected, rtol=1e-5)
        e = evaluated["tasks"][name]
        assert e["loss_before_from"] == "evaluated" and e["sample_ids"] == r["sample_ids"]
        np.testing.assert_allclose(e["loss_before"], expected, rtol=1e-5)
        for key in ("loss_fisher", "loss_random"):
            np.testing.assert_allclose(e[key], r[key], rtol=1e-6)
    # held-out batches (sample ids the Fisher never saw): the unmasked model is evaluated
    held_out = {t: [b._replace(sample_ids=np.where(b.sample_ids >= 0, b.sample_ids + 100, -1)) for b in bs] for t, bs in task_batches.items()}
    crossed = experiments.head_pruning_experiment(model, model.params, held_out, fishers, n_random=3, seed=0, samples=5)
    for name, r in crossed["tasks"].items():
        assert r["loss_before_from"] == "evaluated"
        ids = [i - 100 for i in r["sample_ids"]]
        np.testing.assert_allclose(r["loss_before"], reference_loss(model, model.params, tasks[name], ids), rtol=1e-5)


def test_batched_masks_give_the_losses_of_one_mask_at_a_time(model, collected, monkeypatch):
    """``masked_loss_sums`` with 1, 3 (a remainder) or all 7 masks per pass against a plain loop of
    ``sample_losses`` on ``apply_mask``-ed parameters; and the experiment's Fisher-mask losses
    against the same reference, at any memory budget and in a CPU's or an accelerator's pass shape."""
    tasks, task_batches, fishers = collected
    rng = np.random.default_rng(0)
    keeps = rng.random((7, 2, 4)) > 0.4
    b = task_batches["b"][0]
    reference = [float(np.asarray(_losses(model, masked_params(model, k), b.input_ids, b.attention_mask, b.labels)[0]).sum()) for k in keeps]
    for per_pass in (1, 3, 7):
        sums = experiments.masked_loss_sums(model, model.params, keeps, b.input_ids, b.attention_mask, b.labels, masks_per_pass=per_pass)
        np.testing.assert_allclose(np.asarray(sums), reference, rtol=1e-5)
    result = experiments.head_pruning_experiment(model, model.params, task_batches, fishers, n_random=3, seed=0, samples=5)
    assert result["masks_per_pass"] == 1 and result["rows_per_batch"] == 3  # a CPU: one mask, 5 rows in batches of ≤ 4
    with monkeypatch.context() as accelerator:
        accelerator.setattr(backend, "is_cpu", lambda: False)
        wide = experiments.head_pruning_experiment(model, model.params, task_batches, fishers, n_random=3, seed=0, samples=5)
    assert wide["masks_per_pass"] == 5 and wide["rows_per_batch"] == 5  # 2 Fisher masks + 3 random ones, every row
    tight = experiments.head_pruning_experiment(model, model.params, task_batches, fishers, n_random=3, seed=0, samples=5,
                                                memory_budget_bytes=1.0)
    assert tight["masks_per_pass"] == 1 and tight["rows_per_batch"] == 1
    for name, r in result["tasks"].items():
        keep = np.ones((2, 4), bool)
        for layer, head in r["pruned"]:
            keep[layer, head] = False
        np.testing.assert_allclose(r["loss_fisher"], reference_loss(model, masked_params(model, keep), tasks[name], r["sample_ids"]), rtol=1e-5)
        for key in ("loss_before", "loss_fisher", "loss_random"):
            np.testing.assert_allclose(tight["tasks"][name][key], r[key], rtol=1e-5)
            np.testing.assert_allclose(wide["tasks"][name][key], r[key], rtol=1e-5)
    report = masks_report.section(fishers, model.layout, sparsities=(0.5,), parameter_masks=None, experiment=result,
                                  head_masks={t: [masks.structured_mask(f, model.layout, 0.5)] for t, f in fishers.items()})
    assert "a: 5 of 10 samples; b: 5 of 12 samples" in report.json["head_pruning"]["subsample"]
    assert any("| a | 5 of 10 |" in line for line in report.lines)


def test_task_fisher_keeps_per_sample_losses_through_save_load_and_resume(model, collected, tmp_path):
    from fisherjax import io

    tasks, task_batches, fishers = collected
    fisher = fishers["a"]
    assert fisher.losses.dtype == np.float64 and fisher.tokens.dtype == np.int64
    assert fisher.losses.shape == fisher.tokens.shape == fisher.sample_ids.shape == (10,)
    np.testing.assert_allclose(fisher.losses.sum(), fisher.total_loss, rtol=1e-12)
    assert fisher.tokens.sum() == fisher.n_tokens and (fisher.tokens > 0).all()
    io.save_task_fisher(fisher, tmp_path / "saved")
    loaded = io.load_task_fisher(tmp_path / "saved")
    for field in ("sample_ids", "losses", "tokens"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(fisher, field), err_msg=field)
    io.save_task_fisher(dataclasses.replace(fisher, losses=None, tokens=None), tmp_path / "older")  # as an older fisherjax wrote it
    older = io.load_task_fisher(tmp_path / "older")
    assert older.losses is None and older.tokens is None and older.n_samples == fisher.n_samples
    # resume: the first run saves after batches 2 (of 3); the second restores them and adds the last
    common = dict(task="b", progress=False, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2)
    straight = collect(model, task_batches["b"], task="b", progress=False)
    collect(model, task_batches["b"][:2], **common)
    resumed = collect(model, task_batches["b"], resume=True, **common)
    for field in ("sample_ids", "losses", "tokens"):
        np.testing.assert_array_equal(getattr(resumed, field), getattr(straight, field), err_msg=field)


def test_pruning_samples_zero_is_refused(cli_checkpoint, tmp_path):
    parent = tmp_path / "work"
    parent.mkdir()
    argv = ["analyze", "--model", cli_checkpoint / "model", "--task", f"add={cli_checkpoint / 'add.jsonl'}", "--out", parent / "out",
            "--no-progress", "--phases", "fisher,masks", "--pruning-samples", "0"]
    assert_refused(argv, parent=parent, names=r"pruning samples must be ≥ 1 \(--pruning-samples\), got 0")


def test_gathered_rows_are_the_samples_right_padded_to_the_trimmed_length():
    """Rows chosen from left- and right-padded batches of 32 positions come out as the same samples
    batched afresh at 16 positions (real tokens first), with filler rows after them."""
    from fisherjax.data import make_batch

    task = with_silent_samples(random_task("t", 10, seed=4, max_len=10))
    for side in ("left", "right"):
        source = list(batches(task, 4, buckets=(32,), side=side))
        rows = experiments.eligible_rows(source)
        assert rows.sample_ids.tolist() == [0, 2, 3, 5, 6, 7, 8, 9]
        chosen = rows.take(np.array([1, 2, 6]))
        gathered = experiments.gather_rows(source, chosen, 2, 16)
        expected = make_batch([task.examples[i] for i in (2, 3, 8)], 4, 16)
        for field in ("input_ids", "attention_mask", "labels", "sample_ids"):
            np.testing.assert_array_equal(np.concatenate([getattr(b, field) for b in gathered]), getattr(expected, field), err_msg=field)


def test_an_accelerator_sizes_the_scoring_passes_by_its_free_memory(model, collected, monkeypatch):
    """Without a memory budget, the head-pruning experiment's and the single-head ablation's passes
    may take half an accelerator's free memory (``backend.working_budget_bytes``), and
    ``SCORING_BUDGET_BYTES`` (or less, on a host short of memory) on a CPU."""
    from fisherjax.grads import SCORING_BUDGET_BYTES
    from fisherjax.heads import ablation

    tasks, task_batches, fishers = collected
    budgets = []
    shape, chunk = experiments.pass_shape, ablation.chunk_size_for
    monkeypatch.setattr(experiments, "pass_shape", lambda *args: budgets.append(args[5]) or shape(*args))
    monkeypatch.setattr(ablation, "chunk_size_for", lambda budget, *args: budgets.append(budget) or chunk(budget, *args))

    def run():
        experiments.head_pruning_experiment(model, model.params, task_batches, fishers, n_random=3, samples=5)
        ablation.ablate_heads(model, model.params, task_batches["b"][:1])

    run()
    on_cpu = backend.working_budget_bytes(SCORING_BUDGET_BYTES)
    assert 0 < on_cpu <= SCORING_BUDGET_BYTES
    monkeypatch.setattr(backend, "is_cpu", lambda: False)
    monkeypatch.setattr(backend, "available_memory_bytes", lambda: 64e9)
    run()
    assert budgets == [on_cpu, on_cpu, 32e9, 32e9]
