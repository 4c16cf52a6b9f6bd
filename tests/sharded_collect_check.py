"""Run by tests/test_sharded_collect.py in a subprocess with 4 forced host devices:
``python3 sharded_collect_check.py OUT.json CASE...`` where a CASE is ``DIR:OPTIONS`` (a
checkpoint directory and a comma-separated list of collect settings: ``ema``, ``variance``,
``true``). Collects the same batches on one device and on meshes (4,) and (2, 2) and writes the
norm-weighted relative differences of every result, and what the compiled sharded step shows."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"  # and the run's flags
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import random_task  # noqa: E402

from fisherjax.data import batches  # noqa: E402
from fisherjax.fisher.collect import collect  # noqa: E402
from fisherjax.fisher.step import lower_step  # noqa: E402
from fisherjax.models import Model, load_pretrained  # noqa: E402
from fisherjax.sharding import make_mesh  # noqa: E402


def rel(a, b) -> float:
    """``‖a − b‖ / ‖b‖`` over the whole pytree (float64)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    num = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)) for x, y in zip(la, lb))
    den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in lb)
    return (num / max(den, 1e-300)) ** 0.5


def compare(out, ref) -> dict:
    found = {
        "groups": rel(out.group_fisher, ref.group_fisher),
        "per_sample_groups": rel(out.per_sample_groups, ref.per_sample_groups),
        "diagonal": rel(out.diagonal, ref.diagonal),
        "grads": rel(out.sample_grads.grads, ref.sample_grads.grads),
        "same_ids": bool(np.array_equal(out.sample_ids, ref.sample_ids)
                         and np.array_equal(out.sample_grads.sample_ids, ref.sample_grads.sample_ids)),
        "same_counts": bool(out.n_samples == ref.n_samples and out.n_tokens == ref.n_tokens),
    }
    if ref.welford is not None:
        found["welford_m2"] = rel(out.welford.m2, ref.welford.m2)
        found["same_counts"] &= float(out.welford.count) == float(ref.welford.count)
    if ref.ema is not None:
        found["ema"] = rel(out.ema.value, ref.ema.value)
        found["same_counts"] &= float(out.ema.count) == float(ref.ema.count)
    if ref.diagonal_variance is not None:
        found["diagonal_variance"] = rel(out.diagonal_variance, ref.diagonal_variance)
    if ref.sample_grads.stored_contributions is not None:
        found["contributions"] = rel(out.sample_grads.stored_contributions, ref.sample_grads.stored_contributions)
    return found


def observe(model, mesh) -> dict:
    """The compiled sharded step: its devices, the rows each device's program sees, its collectives."""
    compiled = lower_step(model, 8, 16, mesh=mesh, keep_sample_grads=True).compile()
    ids_sharding = compiled.input_shardings[0][2]
    text = compiled.as_text()
    return {
        "devices": len(ids_sharding.device_set),
        "rows_per_device": ids_sharding.shard_shape((8, 16))[0],
        "all_reduce": "all-reduce" in text,
    }


def command_line_and_plan(directory: str, checkpoint: str) -> dict:
    """``fisherjax analyze`` on every device (the default) and with ``--devices 1`` (Phase 1 only,
    the demo), and ``fisherjax.plan`` on this 4-device machine: the sharded step compiled on its
    recommended mesh, compared with the memory analysis of the same lowered step."""
    from fisherjax import plan as planning
    from fisherjax.cli import main as cli
    from fisherjax.sharding import make_mesh as mesh_of

    found = {}
    for name, extra in (("four", []), ("one", ["--devices", "1"])):
        code = cli(["analyze", "--out", f"{directory}/{name}", "--no-progress", "--phases", "fisher", "--max-samples", "12",
                    "--no-compilation-cache", *extra])
        assert code == 0, code
        found[f"devices_{name}"] = json.load(open(f"{directory}/{name}/results.json"))["machine"]["devices"]
    groups = [dict(np.load(f"{directory}/{name}/group_fisher.npz")) for name in ("four", "one")]
    found["cli_groups"] = rel(groups[0], groups[1])

    config = planning.read_config(checkpoint)
    plan = planning.plan(config, samples=8, seq_len=16, devices=4, device_memory_gb=1)
    data, m = plan.mesh
    options = dataclasses.replace(plan.options)
    compiled = lower_step(Model.abstract(config), plan.micro_batch * data, 16, options, mesh=mesh_of(data, m)).compile()
    analysis = compiled.memory_analysis()
    found["plan_sharded"] = plan.sharded_step
    found["plan_matches"] = plan.step.temp_bytes == analysis.temp_size_in_bytes and plan.step.argument_bytes == analysis.argument_size_in_bytes
    return found


def main(out_path: str, cases: list[str]) -> None:
    results = {}
    if cases and cases[0].startswith("--cli="):
        directory, _, checkpoint = cases.pop(0).removeprefix("--cli=").partition(",")
        results["command line"] = command_line_and_plan(directory, checkpoint)
    for case in cases:
        directory, _, settings = case.rpartition(":")
        settings = set(filter(None, settings.split(",")))
        model = load_pretrained(directory)
        # 11 samples in batches of 6: rows padded to 8 on 4 devices, and a filler row in the last batch
        task = random_task("t", 11, seed=len(results), min_len=6, max_len=12, prompt=2)
        vocab = model.config.vocab_size  # the demo's characters are fewer than the tiny checkpoints' tokens
        task = type(task)(task.name, tuple(dataclasses.replace(e, tokens=tuple(3 + (t - 3) % (vocab - 3) for t in e.tokens))
                                           for e in task.examples))
        data = list(batches(task, 6))
        options = dict(task="t", keep_sample_grads=True, diagonal=True, progress=False,
                       mode="ema" if "ema" in settings else "welford", diagonal_variance="variance" in settings)
        if "true" in settings:
            options.update(fisher_type="true", true_samples=2, key=jax.random.key(4))
        if "factors" in settings:  # kept kernels as token factors: sharded by sample like gradients
            options.update(sample_grads_factors=True)
        reference = collect(model, data, **options)
        found = {}
        for shape in ((2, 2),) if "only22" in settings else ((4,), (2, 2)):
            mesh = make_mesh(*shape)
            found[str(shape)] = compare(collect(model, data, mesh=mesh, **options), reference)
            if len(results) == ("command line" in results) and shape == (4,):  # the first case, one mesh
                found[str(shape)].update(observe(model, mesh))
        results[case] = found
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
