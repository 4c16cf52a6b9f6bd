"""Every choice :mod:`fisherjax.backend` makes, taken as on an accelerator, gives the CPU's numbers.

No GPU runs in CI, so the accelerator's paths (one ``vmap`` over samples, the batched QK-OV kernel,
one einsum over groups, vmapped ablations and masks, logits tiles of 1024 positions, host copies
through pinned memory, …) are run here on the CPU: the whole analysis of a random checkpoint once
as the CPU runs it and once with ``backend.is_cpu`` answering False, every number of results.json
and of the arrays compared. Most choices have a faster test of their own; this one checks them
together, as a GPU run takes them (a per-sample gradient handed to the wrong sample by the
``vmap`` path alone fails it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fisherjax import backend
from fisherjax.cli import main

NOT_RESULTS = {"created", "machine", "environment", "config", "seconds", "phases"}
"""Top-level entries of results.json that describe the run, not its results."""

COSTS = {"seconds", "peak_rss_gb", "device_peak_gb", "compilations", "compile_seconds", "cache_hits", "trace_seconds",
         "lanczos_residuals", "rows_per_batch", "masks_per_pass", "rows_evaluated", "masks_evaluated"}
"""Entries anywhere in results.json that are what a pass cost or how it was cut, which differ by
design (the Lanczos residuals are float32 round-off)."""


def numbers_and_words(tree, left_out, path=""):
    """``{path: leaf}`` of a results.json tree without the entries named in ``left_out``."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() if key not in left_out
                for k, v in numbers_and_words(sub, left_out, f"{path}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in numbers_and_words(sub, left_out, f"{path}[{i}]").items()}
    return {path: tree}


def same_results(cpu_dir, other_dir, how_it_ran=frozenset()):
    """results.json's numbers and words (without :data:`COSTS` and ``how_it_ran``) within 1e-3
    relative, and group_fisher.npz and qkov.npz entrywise within 1e-3 or 1e-6 of an array's
    largest entry; the CPU run takes one mask a pass, the other all of them."""
    def results(run):
        tree = json.loads((run / "results.json").read_text())
        return tree, numbers_and_words({k: v for k, v in tree.items() if k not in NOT_RESULTS}, COSTS | how_it_ran)

    (cpu_tree, cpu), (acc_tree, acc) = results(cpu_dir), results(other_dir)
    masks = len(acc_tree["masks"]["head_pruning"]["tasks"]["add"]["loss_random"]) + 2  # the random masks and both Fisher masks at least
    assert cpu_tree["masks"]["head_pruning"]["masks_per_pass"] == 1 and acc_tree["masks"]["head_pruning"]["masks_per_pass"] >= masks
    assert cpu.keys() == acc.keys() and len(cpu) > 1000
    numbers = [p for p, v in cpu.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert [p for p in cpu if p not in numbers and cpu[p] != acc[p]] == []  # words, flags and missing values alike
    x, y = ([run[p] for p in numbers] for run in (cpu, acc))
    apart = [p for p, a, b in zip(numbers, x, y, strict=True) if not np.isclose(b, a, rtol=1e-3, atol=1e-8)]
    assert apart == [], apart
    for name in ("group_fisher.npz", "qkov.npz"):
        with np.load(cpu_dir / name) as a, np.load(other_dir / name) as b:
            assert a.files == b.files
            for key in a.files:
                if a[key].dtype.kind != "f":
                    np.testing.assert_array_equal(b[key], a[key], err_msg=f"{name}: {key}")
                elif a[key].size:
                    scale = float(np.nanmax(np.abs(a[key])))
                    np.testing.assert_allclose(b[key], a[key], rtol=1e-3, atol=1e-6 * scale, err_msg=f"{name}: {key}")


def analyze_args(checkpoint) -> list[str]:
    return ["analyze", "--model", str(checkpoint / "model"), "--task", f"add={checkpoint / 'add.jsonl'}",
            "--task", f"words={checkpoint / 'words.txt'}", "--sample-grads-dtype", "float32", "--no-progress"]


def test_the_accelerator_choices_give_the_cpu_numbers(cli_checkpoint, tmp_path, monkeypatch):
    args = analyze_args(cli_checkpoint)
    assert main([*args, "--out", str(tmp_path / "cpu")]) == 0
    with monkeypatch.context() as accelerator:
        accelerator.setattr(backend, "is_cpu", lambda: False)
        assert main([*args, "--out", str(tmp_path / "accelerator")]) == 0
    same_results(tmp_path / "cpu", tmp_path / "accelerator")


AS_ON_AN_ACCELERATOR = ("import sys; from fisherjax import backend; backend.is_cpu = lambda: False; "
                        "from fisherjax.cli import main; sys.exit(main(sys.argv[1:]))")
"""A command line that runs ``fisherjax`` with every backend choice as on an accelerator."""


@pytest.mark.slow
def test_the_accelerator_choices_on_two_devices_give_one_cpu_devices_numbers(cli_checkpoint, tmp_path):
    """As above, with each batch split over two forced host devices (``--devices 2``, a process of
    its own) against one device's CPU choices."""
    args = analyze_args(cli_checkpoint)
    assert main([*args, "--out", str(tmp_path / "cpu")]) == 0
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, "-c", AS_ON_AN_ACCELERATOR, *args, "--devices", "2", "--out", str(tmp_path / "sharded")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    same_results(tmp_path / "cpu", tmp_path / "sharded", how_it_ran={"both_directions_in_one_pass"})
