"""The host memory a run may take: ``MemAvailable``, or a memory cgroup's headroom where it is less
(a Slurm job, a container), read from machines built in a folder (cgroup v1 and v2, a job's limit
above its step, a container's own subtree mounted at the root) and from this machine's kernel."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fisherjax import host_memory
from fisherjax.errors import ConfigError
from fisherjax.pipeline import HOST_MEMORY_SHARE, Phase1Memory, check_host_memory

GB = 10**9
V1_UNLIMITED = 9223372036854771712  # what a v1 kernel writes for no limit


def machine(root: Path, *, available_gb: float = 64.0, groups: str = "", mounts: str = "") -> Path:
    """A ``/proc`` under ``root`` with ``meminfo``, ``self/cgroup`` and ``self/mountinfo``."""
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal:       999999999 kB\nMemFree:  1 kB\nMemAvailable:   {int(available_gb * GB / 1024)} kB\n")
    (proc / "self" / "cgroup").write_text(groups)
    (proc / "self" / "mountinfo").write_text(mounts)
    return proc


def cgroup(folder: Path, files: dict[str, object]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        (folder / name).write_text(f"{value}\n")


def mount_line(point: Path, kind: str, root: str = "/", options: str = "rw") -> str:
    escaped = str(point).replace(" ", "\\040")
    return f"35 31 0:32 {root} {escaped} rw,nosuid,nodev,noexec,relatime shared:9 - {kind} {kind} {options}\n"


def test_without_a_cgroup_it_is_meminfo(tmp_path):
    proc = machine(tmp_path, available_gb=12.5)
    assert host_memory.meminfo_available(proc) == int(12.5 * GB / 1024) * 1024
    assert host_memory.cgroup_headroom(proc) is None and not host_memory.limited_by_cgroup(proc)
    assert host_memory.available_bytes(proc) == host_memory.meminfo_available(proc)
    assert host_memory.available_bytes(tmp_path / "nothing") is None  # neither known


def test_a_slurm_job_on_cgroup_v2_is_bounded_by_its_job_above_the_step(tmp_path):
    cgroups = tmp_path / "sys fs" / "cgroup"  # a mount point with a space, as mountinfo escapes it
    groups = "0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0\n"
    proc = machine(tmp_path, available_gb=500, groups=groups, mounts=mount_line(Path("/"), "ext4") + mount_line(cgroups, "cgroup2"))
    job = cgroups / "system.slice" / "slurmstepd.scope" / "job_7"
    cgroup(job, {"memory.max": 16 * GB, "memory.current": 10 * GB, "memory.stat": "anon 1\ninactive_file 1000000000\nactive_file 5"})
    for below in ("step_0", "step_0/user", "step_0/user/task_0"):
        cgroup(job / below, {"memory.max": "max", "memory.current": 9 * GB})
    cgroup(cgroups, {"memory.current": 400 * GB})  # the root: no memory.max
    where = host_memory.memory_hierarchy(proc)
    assert where == (2, job / "step_0" / "user" / "task_0", cgroups)
    assert host_memory.cgroup_headroom(proc) == 16 * GB - 10 * GB + GB  # page cache the kernel reclaims first counts as room
    assert host_memory.available_bytes(proc) == 7 * GB and host_memory.limited_by_cgroup(proc)
    cgroup(job / "step_0", {"memory.max": 8 * GB, "memory.current": 6 * GB})  # a tighter limit lower down wins
    assert host_memory.available_bytes(proc) == 2 * GB
    cgroup(job / "step_0", {"memory.max": 8 * GB, "memory.current": 9 * GB})  # over its limit: no room, not less
    assert host_memory.available_bytes(proc) == 0


def test_a_container_on_cgroup_v1_sees_its_own_subtree_at_the_mount(tmp_path):
    memory = tmp_path / "cgroup" / "memory"
    mounts = (mount_line(tmp_path / "cgroup" / "cpu", "cgroup", "/docker/abc", "rw,cpu")
              + mount_line(memory, "cgroup", "/docker/abc", "rw,memory"))
    groups = "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n"  # hybrid: the v1 memory controller limits
    proc = machine(tmp_path, available_gb=30, groups=groups, mounts=mounts + mount_line(tmp_path / "unified", "cgroup2"))
    cgroup(memory, {"memory.limit_in_bytes": 4 * GB, "memory.usage_in_bytes": 3 * GB,
                    "memory.stat": "inactive_file 7\ntotal_inactive_file 500000000\n"})
    assert host_memory.memory_hierarchy(proc) == (1, memory, memory)
    assert host_memory.available_bytes(proc) == GB + GB // 2 and host_memory.limited_by_cgroup(proc)
    cgroup(memory, {"memory.limit_in_bytes": V1_UNLIMITED})  # no limit: MemAvailable
    assert host_memory.cgroup_headroom(proc) is None and host_memory.available_bytes(proc) == host_memory.meminfo_available(proc)


def test_a_cgroup_namespace_shows_the_root_and_unreadable_files_fall_back_to_meminfo(tmp_path):
    cgroups = tmp_path / "cg"
    proc = machine(tmp_path, available_gb=3, groups="0::/\n", mounts=mount_line(cgroups, "cgroup2", "/../.."))
    assert host_memory.memory_hierarchy(proc) == (2, cgroups, cgroups)
    assert host_memory.available_bytes(proc) == host_memory.meminfo_available(proc)  # no files there
    cgroup(cgroups, {"memory.max": 10 * GB, "memory.current": 2 * GB})
    assert host_memory.available_bytes(proc) == host_memory.meminfo_available(proc) < 8 * GB  # MemAvailable is less
    assert not host_memory.limited_by_cgroup(proc)


def test_this_machine_reads_no_more_than_meminfo():
    free = host_memory.available_bytes()
    assert free is None or 0 <= free <= (host_memory.meminfo_available() or free)


def writable_v1_memory() -> Path | None:
    """This machine's cgroup v1 memory hierarchy where this process may make a group in it."""
    where = host_memory.memory_hierarchy()
    if where is None or where.version != 1 or not os.access(where.mount, os.W_OK):
        return None
    return where.mount


@pytest.mark.skipif(writable_v1_memory() is None, reason="needs a writable cgroup v1 memory hierarchy (root in a VM)")
def test_a_process_in_a_limited_cgroup_reads_its_limit_not_the_machine():
    """The kernel's own files: a child in a job group limited to 1 GB (its step group below it
    unlimited, as Slurm makes them) reads at most 1 GB though the machine has more."""
    job = writable_v1_memory() / f"fisherjax-test-{uuid.uuid4().hex[:8]}"
    step = job / "step"
    step.mkdir(parents=True)
    try:
        (job / "memory.limit_in_bytes").write_text(str(GB))
        code = ("import os, sys; open(sys.argv[1], 'w').write(str(os.getpid())); "
                "from fisherjax import host_memory as h; print(h.available_bytes(), h.limited_by_cgroup(), h.meminfo_available())")
        done = subprocess.run([sys.executable, "-c", code, str(step / "cgroup.procs")], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        available, limited, meminfo = done.stdout.split()
        assert limited == "True" and 0 < int(available) <= GB < int(meminfo)
    finally:
        step.rmdir()
        job.rmdir()


def test_phase_1_past_the_hosts_memory_is_refused_with_what_fits():
    kept_heavy = Phase1Memory(kept=30 * GB, samples=600, tasks=2, step=2 * GB, shape=(8, 512))
    with pytest.raises(ConfigError) as refused:
        check_host_memory(kept_heavy, 20 * GB, True, spill=False)
    line = str(refused.value)
    assert "about 32.0 GB (30.0 GB of kept per-sample gradients for 600 samples of 2 task(s)" in line
    assert "2.0 GB for its largest step (8 rows × 512 positions)" in line and "of the 20.0 GB" in line
    assert "under its memory cgroup's limit" in line and "--spill-dir DIR --sample-grads-budget-gb 8)" in line
    with pytest.raises(ConfigError) as uneven:  # the budget a task is rounded down: what it says fits
        check_host_memory(kept_heavy._replace(tasks=3), 20 * GB, True, spill=False)
    budget = float(str(uneven.value).split("--sample-grads-budget-gb ")[1].split(")")[0])
    assert 3 * budget * GB + 2 * GB <= HOST_MEMORY_SHARE * 20 * GB < 3 * (budget + 0.01) * GB + 2 * GB
    fits = int(line.split("--max-samples ")[1].rstrip(")"))
    assert fits * 2 * (30 * GB / 600) + 2 * GB <= HOST_MEMORY_SHARE * 20 * GB < (fits + 1) * 2 * (30 * GB / 600) + 2 * GB
    with pytest.raises(ConfigError, match=r"on this machine \(MemAvailable\); use --sample-grads-budget-gb 8 with --spill-dir"):
        check_host_memory(kept_heavy, 20 * GB, False, spill=True)
    with pytest.raises(ConfigError, match="use a smaller --batch-size"):  # the step alone does not fit
        check_host_memory(Phase1Memory(GB, 10, 1, 30 * GB, (16, 1024)), 20 * GB, False, spill=False)
    check_host_memory(kept_heavy, 40 * GB, True, spill=False)  # fits: nothing said
    check_host_memory(kept_heavy, None, False, spill=False)  # not known: not refused


def test_analyze_under_a_tight_cgroup_stops_before_phase_1_and_writes_nothing(cli_checkpoint, tmp_path, monkeypatch):
    """The whole command line on a machine whose job has 1 MB left under its limit: one line naming
    the limit and what fits, exit code 2, nothing created (not --out, not --spill-dir); with room
    under the limit the same run goes through."""
    from refusals import assert_refused, run_cli

    cgroups, parent = tmp_path / "cg", tmp_path / "work"
    parent.mkdir()
    proc = machine(tmp_path, groups="0::/job\n", mounts=mount_line(cgroups, "cgroup2"))
    cgroup(cgroups / "job", {"memory.max": GB, "memory.current": GB - 10**6})
    monkeypatch.setattr(host_memory, "PROC", proc)
    argv = ["analyze", "--model", cli_checkpoint / "model", "--out", parent / "out", "--no-progress", "--phases", "fisher",
            "--task", f"add={cli_checkpoint / 'add.jsonl'}", "--task", f"words={cli_checkpoint / 'words.txt'}"]
    assert_refused(argv, parent=parent, names=r"^fisherjax: error: host memory: Phase 1 would take about [\d.]+ GB \([\d.]+ GB of kept "
                   r"per-sample gradients for 22 samples of 2 task\(s\).*of the 0\.0 GB this process may still take under its memory "
                   r"cgroup's limit; ")
    assert_refused([*argv, "--spill-dir", parent / "spill"], parent=parent, names="under its memory cgroup's limit")
    cgroup(cgroups / "job", {"memory.current": 0})
    code, _, err = run_cli(argv)
    assert code == 0, err


def test_pair_phases_work_in_smaller_pieces_when_the_host_has_little_left(cli_checkpoint, tmp_path, monkeypatch):
    """Phase 5's parameter slices and Phase 6's tiles take at most a share of the host memory left
    (on a CPU): with 1 MB left, the budgets results.json records shrink to 250 kB, and every
    number is the one a run with room computes."""
    import json

    import numpy as np

    from fisherjax import backend
    from refusals import run_cli

    argv = ["analyze", "--model", cli_checkpoint / "model", "--no-progress", "--phases", "fisher,conflicts,qkov", "--conflict-scope",
            "overall", "--task", f"add={cli_checkpoint / 'add.jsonl'}", "--task", f"words={cli_checkpoint / 'words.txt'}"]
    code, _, err = run_cli([*argv, "--out", tmp_path / "roomy"])
    assert code == 0, err
    monkeypatch.setattr(backend, "host_available_bytes", lambda: 10**6)
    assert backend.host_work_budget(4e9) == 2.5e5 and backend.host_work_budget(4e9, float("inf")) == 4e9
    assert backend.host_work_budget(1e5, 8e6) == 1e5  # never more than the default
    code, _, err = run_cli([*argv, "--out", tmp_path / "tight"])
    assert code == 0, err
    roomy, tight = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("roomy", "tight"))
    assert roomy["qkov"]["pairs"]["add|words"]["kernel"]["memory_budget_bytes"] == 2e9
    assert tight["qkov"]["pairs"]["add|words"]["kernel"]["memory_budget_bytes"] == 2.5e5
    with np.load(tmp_path / "roomy" / "qkov.npz") as r, np.load(tmp_path / "tight" / "qkov.npz") as t:
        assert sorted(r.files) == sorted(t.files)
        for key in r.files:
            if r[key].dtype.kind in "fc":
                np.testing.assert_allclose(t[key], r[key], rtol=1e-5, atol=1e-7, err_msg=key)
            else:
                np.testing.assert_array_equal(t[key], r[key], err_msg=key)
    pair_r, pair_t = (json.loads((tmp_path / run / "conflicts.json").read_text())["pairs"]["add|words"] for run in ("roomy", "tight"))
    assert pair_r["settings"] == pair_t["settings"] and pair_r["settings"]["scope"] == "overall"
    for stat in ("mean", "std", "min", "max"):
        np.testing.assert_allclose(pair_t["cosine"][stat], pair_r["cosine"][stat], rtol=1e-5, atol=1e-7)
    assert [(p["sample_a"], p["sample_b"]) for p in pair_t["top_pairs"]] == [(p["sample_a"], p["sample_b"]) for p in pair_r["top_pairs"]]
