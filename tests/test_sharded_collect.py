"""Sharded Phase 1: ``collect(..., mesh=)`` on meshes (4,) and (2, 2) of forced host devices equals
one device (tests/sharded_collect_check.py runs in a subprocess, where the devices exist)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import FAMILIES, random_task
from fisherjax.data import batches, micro_batch_rows, micro_batches
from fisherjax.errors import ConfigError
from fisherjax.fisher.collect import collect

CHECK = Path(__file__).parent / "sharded_collect_check.py"
TOLERANCE = 1e-5  # ‖sharded − single‖ / ‖single‖ over each result's pytree


def _run(tmp_path, cases: list[str]) -> dict:
    out = tmp_path / "sharded.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(CHECK), str(out), *cases], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _check(results: dict, tolerance: float = TOLERANCE) -> None:
    for case, meshes in results.items():
        if case == "command line":
            continue
        assert set(meshes) == ({"(2, 2)"} if "only22" in case else {"(4,)", "(2, 2)"})
        for mesh, found in meshes.items():
            errors = {k: v for k, v in found.items() if isinstance(v, float)}
            assert {"groups", "per_sample_groups", "diagonal", "grads"} <= set(errors)
            assert max(errors.values()) <= tolerance, (case, mesh, errors)
            assert found["same_ids"] and found["same_counts"], (case, mesh, found)


def test_sharded_collect_equals_one_device(tmp_path, hf_checkpoint):
    """Llama-family checkpoint (grouped-query attention), Welford groups, the full diagonal's sums
    and kept gradients, as gradients and as token factors (a Welford diagonal, EMA groups, the
    factors on (4,) and the command line: the slow test below): equal on (4,) and (2, 2); the
    compiled step of (4,) runs on all four devices, each on its own rows, with an all-reduce."""
    directory, _ = hf_checkpoint("llama")
    results = _run(tmp_path, [f"{directory}:", f"{directory}:factors,only22"])
    _check(results)
    found = results[f"{directory}:"]["(4,)"]  # 8 rows over 4 data shards
    assert found["devices"] == 4 and found["rows_per_device"] == 2 and found["all_reduce"], found
    assert "welford_m2" in results[f"{directory}:"]["(4,)"]


@pytest.mark.slow
def test_sharded_collect_equals_one_device_every_family_and_setting(tmp_path, hf_checkpoint):
    """Every family, EMA groups, the true Fisher's draws (one key per sample, so the same on any
    mesh), the shipped demo model, and the command line (``--devices``, ``fisherjax plan``)."""
    from fisherjax import demo

    settings = {"gpt2": "ema,factors", "llama": "true", "mistral": "", "qwen2": "true,variance", "gpt_neox": "ema,variance"}
    cases = [f"{hf_checkpoint(kind)[0]}:{settings[kind]}" for kind in FAMILIES]
    results = _run(tmp_path, [f"--cli={tmp_path},{hf_checkpoint('llama')[0]}", *cases, f"{demo.checkpoint_dir()}:"])
    # the command line: every device by default, --devices 1, the same Phase 1; the plan compiles
    # the sharded step on its mesh and reports exactly that step's memory analysis
    cli = results["command line"]
    assert cli["devices_four"] == 4 and cli["devices_one"] == 1 and cli["cli_groups"] <= TOLERANCE, cli
    assert cli["plan_sharded"] and cli["plan_matches"], cli
    _check({k: v for k, v in results.items() if k in cases})
    # the trained demo model: float32 rounding of other GEMM shapes alone moves its results by
    # ~6e-6 (one device, batches of 2 against 8), and a "model" axis reorders sums once more
    _check({k: v for k, v in results.items() if k not in cases}, tolerance=5e-5)


def test_a_bad_mesh_is_refused(hf_checkpoint):
    from fisherjax.models import load_pretrained

    model = load_pretrained(hf_checkpoint("llama")[0])
    data = list(batches(random_task("t", 2), 2))
    with pytest.raises(ConfigError, match="mesh axes"):
        collect(model, data, task="t", progress=False, mesh=jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",)))
    with pytest.raises(ConfigError, match="jax.sharding.Mesh"):
        collect(model, data, task="t", progress=False, mesh="data")


def test_micro_batches_pad_to_the_data_axis():
    """Rows padded with filler (sample id −1, labels ignored) to a multiple of the device count."""
    batch = next(batches(random_task("t", 5), 5))
    (whole,) = micro_batches(batch, 8, 4)
    assert whole.input_ids.shape[0] == 8 and list(whole.sample_ids) == [0, 1, 2, 3, 4, -1, -1, -1]
    assert (whole.labels[5:] == -100).all() and (whole.attention_mask[5:] == 0).all()
    parts = list(micro_batches(batch, 4, 4))
    assert [list(p.sample_ids) for p in parts] == [[0, 1, 2, 3], [4, -1, -1, -1]]
    assert list(micro_batches(batch, 8, 1))[0] is batch


def test_a_batch_split_by_the_memory_budget_goes_in_even_steps():
    """16 rows at most 9 a step go as 8 + 8, not as 9 and 7 padded to 9 (two rows of filler
    computed for nothing); at most 7 a step, as 6 + 6 + 4 padded to 6 (not 7 + 7 + 2 padded to 7)."""
    batch = next(batches(random_task("t", 16), 16))
    assert [list(p.sample_ids) for p in micro_batches(batch, 9)] == [list(range(8)), list(range(8, 16))]
    assert micro_batch_rows(16, 9) == 8
    parts = list(micro_batches(batch, 7))
    assert [p.input_ids.shape[0] for p in parts] == [6, 6, 6] == [micro_batch_rows(16, 7)] * 3
    assert list(parts[-1].sample_ids) == [12, 13, 14, 15, -1, -1]
    assert [list(p.sample_ids) for p in micro_batches(batch, 16)] == [list(range(16))]
