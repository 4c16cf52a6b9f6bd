"""Two processes on localhost with ``jax.distributed`` (CPU collectives over gloo, two host devices
each, one ("data",) mesh over all four) against one process on one device; and a SIGKILL of both
mid-run followed by a restart that resumes from each process's orbax save
(tests/multihost_collect_check.py runs in the subprocesses)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

CHECK = Path(__file__).parent / "multihost_collect_check.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(mode: str, out: Path, processes: int) -> list[subprocess.Popen]:
    out.mkdir(exist_ok=True)
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return [subprocess.Popen([sys.executable, str(CHECK), mode, str(out), str(processes), str(i), str(port)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(processes)]


def _finish(procs: list[subprocess.Popen], timeout: float = 400) -> None:
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]


def _kill_all_when_one_dies(procs: list[subprocess.Popen], timeout: float = 400) -> None:
    """The first process SIGKILLs itself; the others (maybe blocked in a collective with it) are
    SIGKILLed then: both die mid-run."""
    deadline = time.monotonic() + timeout
    while all(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, "no process died"
        time.sleep(0.2)
    first = next(p for p in procs if p.poll() is not None)
    assert first.returncode == -signal.SIGKILL, first.communicate()[1][-3000:]
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.communicate()


def _results(out: Path, processes: int) -> dict:
    """The global arrays of process 0 (checked equal on every process) and the per-sample arrays of
    every process joined in sample order."""
    parts = [np.load(out / f"result-{i}.npz") for i in range(processes)]
    for part in parts[1:]:
        for key in part.files:
            if key.split("|")[0] in ("groups", "m2", "diagonal", "counts", "least_bytes", "summed", "gathered"):
                np.testing.assert_array_equal(part[key], parts[0][key], err_msg=key)
    ids = np.concatenate([p["ids"] for p in parts])
    order = np.argsort(ids, kind="stable")
    joined = {k: parts[0][k] for k in parts[0].files if not k.startswith("grads|")}
    joined.update({k: np.concatenate([p[k] for p in parts])[order] for k in parts[0].files if k.startswith("grads|")})
    joined["ids"] = ids[order]
    return joined


def _close(a: dict, b: dict, tolerance: float = 1e-5) -> None:
    for prefix in ("groups", "m2", "diagonal", "grads"):
        keys = [k for k in b if k.startswith(prefix + "|")]
        assert keys and sorted(keys) == sorted(k for k in a if k.startswith(prefix + "|"))
        num = sum(float(np.sum((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2)) for k in keys)
        den = sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in keys)
        assert (num / den) ** 0.5 <= tolerance, (prefix, (num / den) ** 0.5)


def test_two_processes_equal_one(tmp_path):
    """Global results identical on both processes and equal to one process on one device; each
    process keeps its own samples' per-sample gradients, together every sample once."""
    _finish(_launch("straight", tmp_path / "single", 1))
    one = _results(tmp_path / "single", 1)
    _finish(_launch("straight", tmp_path / "two", 2))
    two = _results(tmp_path / "two", 2)
    assert list(two["counts"]) == [22, int(one["counts"][1]), 2, 4] and one["counts"][0] == 22
    assert list(two["least_bytes"]) == [5_000_000_000, -1] and list(two["summed"]) == [2 * (2.0**40 + 0.5)]
    assert list(one["least_bytes"]) == [5_000_000_000, 0] and list(one["summed"]) == [2.0**40 + 0.5]
    assert list(two["gathered"]) == [2.0**40 + 0.5] and one["gathered"].shape == two["none"].shape == (0,)
    np.testing.assert_array_equal(two["ids"], one["ids"])
    shares = [np.load(tmp_path / "two" / f"result-{i}.npz")["ids"] for i in range(2)]
    assert all(0 < len(s) < 22 for s in shares) and not set(shares[0]) & set(shares[1])
    _close(two, one)


@pytest.mark.slow
def test_two_processes_resume_after_both_are_killed(tmp_path):
    """SIGKILL of both processes after the save at batch 4, then a restart: each resumes from its
    own save to the numbers of a run that was never killed, bit for bit."""
    _finish(_launch("straight", tmp_path / "two", 2))
    two = _results(tmp_path / "two", 2)
    _kill_all_when_one_dies(_launch("crash", tmp_path / "killed", 2))
    assert not list((tmp_path / "killed").glob("result-*.npz"))
    assert sorted(p.name for p in (tmp_path / "killed" / "ckpt").iterdir()) == ["process-0", "process-1"]
    _finish(_launch("resume", tmp_path / "killed", 2))
    again = _results(tmp_path / "killed", 2)
    for key in two:
        np.testing.assert_array_equal(again[key], two[key], err_msg=key)


def test_process_saves_round_trip_and_keep_the_last_two(tmp_path):
    """A process's own saves: nested arrays (bfloat16 included, by their bits) and JSON back as
    written; a half-written step (its temporary folder) is not a step; two steps kept."""
    import jax.numpy as jnp

    from fisherjax.fisher.process_saves import ProcessSaves

    saves = ProcessSaves(tmp_path / "process-1")
    arrays = {"state": {"groups": {"count": np.float32(3), "mean": {"layers/attn": np.arange(6.0).reshape(2, 3)}}},
              "kept": {"grads": {"q/kernel": np.arange(8, dtype=np.float32).astype(jnp.bfloat16).reshape(2, 4)}},
              "sample_ids": np.array([4, 7])}
    for step in (2, 4, 6):
        saves.save_arrays(step, arrays, {"batches_done": step, "skipped_ids": [1]})
    (tmp_path / "process-1" / ".8.tmp").mkdir()
    assert saves.all_steps() == [4, 6] and saves.latest_step() == 6
    back, meta = saves.restore_arrays(6)
    assert meta == {"batches_done": 6, "skipped_ids": [1]}
    kept = back["kept"]["grads"]["q/kernel"]
    assert kept.dtype == jnp.bfloat16 and np.array_equal(kept.view(np.uint16), arrays["kept"]["grads"]["q/kernel"].view(np.uint16))
    np.testing.assert_array_equal(back["state"]["groups"]["mean"]["layers/attn"], arrays["state"]["groups"]["mean"]["layers/attn"])
    np.testing.assert_array_equal(back["sample_ids"], [4, 7])


@pytest.mark.slow
def test_pair_phases_over_two_processes_equal_one_device(tmp_path):
    """QK-OV heatmap, conflicts.detect and the permutation test on a mesh over both processes'
    devices (task A's rows split across the hosts, the results gathered with process_allgather)
    equal the same phases on one device; so do the heatmap and conflicts of kept token factors
    (formed on each process's devices) and the kfac variant."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    script = Path(__file__).parent / "multihost_pairs_check.py"
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), str(i), str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    _finish(procs)
    import json

    for i in range(2):
        found = json.loads((tmp_path / f"pairs-{i}.json").read_text())
        assert found["devices"] == 4, found
        assert max(found[k] for k in ("scores", "layer_head_avg", "cosines", "observed", "factors_scores", "factors_cosines",
                                      "kfac_scores")) <= 1e-5, found
        assert found["same_conflict_pvalues"] and found["same_permutation_pvalues"], found
