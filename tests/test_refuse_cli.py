"""Bad command lines, task names and output locations: exit code 2, one line naming the option or
path, and nothing written or deleted next to --out — the run never reaches the collection; and
runs that meet a full disk or run out of memory on the way end the same way."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from refusals import assert_refused, run_cli, snapshot


@pytest.fixture
def where(tmp_path):
    """``(parent, out)``: an empty folder around the output directory, and the output path."""
    parent = tmp_path / "work"
    parent.mkdir()
    (parent / "thesis.tex").write_text("mine")
    return parent, parent / "out"


def _analyze(root, out, *extra, tasks=None):
    tasks = tasks if tasks is not None else [f"add={root / 'add.jsonl'}", f"words={root / 'words.txt'}"]
    argv = ["analyze", "--model", root / "model", "--out", out, "--no-progress", "--phases", "fisher"]
    for t in tasks:
        argv += ["--task", t]
    return argv + list(extra)


@pytest.mark.parametrize(
    "name, names",
    [
        ("../../escaped", r"task name '\.\./\.\./escaped' \(--task\) is not allowed"),
        (".", r"task name '\.' \(--task\)"),
        ("..", r"task name '\.\.' \(--task\)"),
        ("a|b", r"task name 'a\|b' \(--task\)"),
        ("a/b", r"task name 'a/b' \(--task\)"),
        (".hidden", r"task name '\.hidden' \(--task\)"),
        ("tab\tname", r"task name 'tab\\tname' \(--task\)"),
        ("x" * 129, r"task name 'x+' \(--task\)"),
    ],
)
def test_task_names_that_would_become_unsafe_paths_are_refused(cli_checkpoint, where, name, names):
    parent, out = where
    assert_refused(_analyze(cli_checkpoint, out, tasks=[f"{name}={cli_checkpoint / 'add.jsonl'}"]), parent=parent, names=names)


def test_repeated_task_names_are_refused(cli_checkpoint, where):
    parent, out = where
    file = cli_checkpoint / "add.jsonl"
    assert_refused(_analyze(cli_checkpoint, out, tasks=[f"a={file}", f"a={file}"]), parent=parent, names=r"unique \(--task\), repeated: a")


@pytest.mark.parametrize(
    "options, names",
    [
        (["--batch-size", "0"], r"batch size must be ≥ 1 \(--batch-size\)"),
        (["--max-length", "1"], r"max length must be ≥ 2 tokens \(--max-length\)"),
        (["--max-samples", "0"], r"max samples must be ≥ 1 \(--max-samples\)"),
        (["--sparsity", "1.5"], r"sparsity must be in \[0, 1\] \(--sparsity\)"),
        (["--sparsity", "-0.1"], r"sparsity must be in \[0, 1\] \(--sparsity\)"),
        (["--top-k", "-1"], r"top-k must be ≥ 0 \(--top-k\)"),
        (["--sample-grads-budget-gb", "0"], r"must be > 0 GB \(--sample-grads-budget-gb\)"),
        (["--sample-grads-budget-gb", "-3"], r"must be > 0 GB \(--sample-grads-budget-gb\)"),
        (["--seed", str(2**64)], r"seed must be an integer in \[0, 2\^63\) \(--seed\)"),
        (["--seed", "-1"], r"seed must be an integer in \[0, 2\^63\) \(--seed\)"),
        (["--phases", "fisher,bogus"], r"unknown phase\(s\) \['bogus'\] \(--phases\)"),
        (["--batch-size", "two"], r"--batch-size: invalid int value: 'two'"),
        (["--fisher-type", "exact"], r"--fisher-type: invalid choice: 'exact'"),
        (["--qkov-contraction", "tiled"], r"--qkov-contraction: invalid choice: 'tiled'"),
    ],
)
def test_bad_options_are_refused(cli_checkpoint, where, options, names):
    parent, out = where
    assert_refused(_analyze(cli_checkpoint, out, *options), parent=parent, names=names)


def test_argparse_usage_errors_are_one_line_too(cli_checkpoint, where):
    """argparse prints its usage before the message; fisherjax's parser keeps to one line."""
    parent, out = where
    assert_refused(["analyze", "--no-such-flag"], parent=parent, names=r"unrecognized arguments: --no-such-flag")
    assert_refused(["analyze", "--model", cli_checkpoint / "model", "--out", out], parent=parent, names=r"--model needs at least one --task")
    assert_refused(_analyze(cli_checkpoint, out, tasks=["add"]), parent=parent, names=r"--task expects NAME=FILE, got 'add'")


def test_an_out_that_fisherjax_did_not_write_is_never_replaced(cli_checkpoint, where):
    parent, out = where
    out.mkdir()
    (out / "results.json").write_text("{}")  # looks like an output, but fisherjax did not write this folder
    (out / "thesis.tex").write_text("mine")
    assert_refused(_analyze(cli_checkpoint, out), parent=parent, names=rf"{out}: --out is a non-empty directory that fisherjax did not write")
    a_file = parent / "thesis.tex"
    assert_refused(_analyze(cli_checkpoint, a_file), parent=parent, names=r"thesis.tex: --out exists and is not a directory")
    assert_refused(_analyze(cli_checkpoint, a_file / "out"), parent=parent, names=r"--out is inside .*thesis.tex, which is not a directory")
    link = parent / "link"
    link.symlink_to(out)
    assert_refused(_analyze(cli_checkpoint, link), parent=parent, names=r"link: --out exists and is not a directory")


def test_overwrite_replaces_only_when_asked_and_marks_the_output(cli_checkpoint, where):
    parent, out = where
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(_analyze(cli_checkpoint, out, "--overwrite"))
    assert code == 0, err
    assert not (out / "notes.txt").exists() and json.loads((out / "fisherjax-output.json").read_text())["fisherjax"]
    code, _, err = run_cli(_analyze(cli_checkpoint, out))  # its own output: replaced without --overwrite
    assert code == 0, err
    assert (parent / "thesis.tex").read_text() == "mine"
    assert sorted(p.name for p in parent.iterdir()) == ["out", "thesis.tex"]  # no staging or old copies left


def test_a_full_or_read_only_output_location_is_found_before_phase_1(cli_checkpoint, where, monkeypatch):
    from fisherjax import outdir

    parent, out = where
    real = os.statvfs

    def fake(free_blocks=None, flags=0):
        def statvfs(path):
            s = real(path)
            return os.statvfs_result((s.f_bsize, s.f_frsize, s.f_blocks, s.f_bfree,
                                      s.f_bavail if free_blocks is None else free_blocks, s.f_files, s.f_ffree,
                                      s.f_favail, s.f_flag | flags, s.f_namemax))
        return statvfs

    monkeypatch.setattr(outdir.os, "statvfs", fake(free_blocks=1))
    assert_refused(_analyze(cli_checkpoint, out), parent=parent, names=r"--out has .* GB free on .*this run needs about")
    assert_refused(_analyze(cli_checkpoint, out, "--spill-dir", parent / "spill"), parent=parent, names=r"--out has .* GB free")
    monkeypatch.setattr(outdir.os, "statvfs", fake(flags=os.ST_RDONLY))
    assert_refused(_analyze(cli_checkpoint, out), parent=parent, names=r"--out is on a read-only filesystem")


def test_spill_dir_problems_are_refused_and_a_spill_leaves_nothing_behind(cli_checkpoint, where):
    parent, out = where
    (parent / "a_file").write_text("")
    assert_refused(_analyze(cli_checkpoint, out, "--sample-grads-budget-gb", "1e-6", "--spill-dir", parent / "a_file"), parent=parent,
                   names=r"a_file: --spill-dir exists and is not a directory")
    assert_refused(_analyze(cli_checkpoint, out, "--sample-grads-budget-gb", "1e-6", "--spill-dir", parent / "a_file" / "sub"), parent=parent,
                   names=r"--spill-dir is inside .*a_file, which is not a directory")
    spill = parent / "spill"
    spill.mkdir()
    (spill / "keep.npy").write_text("mine")
    code, _, err = run_cli(_analyze(cli_checkpoint, out, "--sample-grads-budget-gb", "1e-6", "--spill-dir", spill))
    assert code == 0, err
    assert sorted(p.name for p in spill.iterdir()) == ["keep.npy"]  # the run's own spill folder is gone


def test_a_killed_run_leaves_no_staging_behind_the_next_run(cli_checkpoint, where):
    """A staging directory whose process is gone (SIGKILL) is removed by the next run on the same
    --out; one of a live process, and anything else next to --out, is left alone."""
    parent, out = where
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = parent / ".out.staging-abc"
    stale.mkdir()
    (stale / ".fisherjax-staging").write_text(str(dead.pid))
    alive = parent / ".out.staging-def"
    alive.mkdir()
    (alive / ".fisherjax-staging").write_text(str(os.getpid()))
    lookalike = parent / ".out.mine"
    lookalike.mkdir()
    code, _, err = run_cli(_analyze(cli_checkpoint, out))
    assert code == 0, err
    assert not stale.exists() and lookalike.exists()
    # our own process's marker counts as stale: the run that wrote it is this one, and it has finished
    assert sorted(p.name for p in parent.iterdir()) == [".out.mine", "out", "thesis.tex"]


DISK_FULL = textwrap.dedent(
    """
    import resource, signal, sys
    from fisherjax.cli import main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    sys.exit(main(sys.argv[2:]))
    """
)


def test_a_disk_that_fills_up_while_writing_is_one_line_and_leaves_nothing(cli_checkpoint, where, tmp_path):
    """Fault injection: every file the process writes may hold at most 8 KB (``ulimit -f``), so
    writing the output fails midway; the run ends with one line, exit 2, and no staging left."""
    parent, out = where
    script = tmp_path / "full.py"
    script.write_text(DISK_FULL)
    before = snapshot(parent)
    argv = [str(a) for a in _analyze(cli_checkpoint, out)]
    run = subprocess.run([sys.executable, str(script), str(8 * 1024), *argv], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, run.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("fisherjax: error:") and "file grew beyond" in lines[0], run.stderr[-3000:]
    assert snapshot(parent) == before
    # results.json's git commit is read without writing the checkout's index (a truncated lock stopped all later git commands)
    assert not (Path(__file__).resolve().parent.parent / ".git" / "index.lock").exists()


OUT_OF_MEMORY = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp
    from fisherjax import pipeline
    from fisherjax.cli import main

    def exhausted(*args, **kwargs):  # XLA's own RESOURCE_EXHAUSTED, from an allocation no machine has (400 TB)
        return jax.jit(lambda: jnp.ones((10**7, 10**7), jnp.float32))().block_until_ready()

    if sys.argv[1] == "collect":
        pipeline.collect_all = exhausted
    else:
        pipeline.PHASES[sys.argv[1]] = exhausted
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.parametrize("stage, names", [("collect", r"in the collect phase: RESOURCE_EXHAUSTED: .*; use a smaller --batch-size"),
                                          ("masks", r"in the masks phase: RESOURCE_EXHAUSTED: .*; use fewer --pruning-samples"),
                                          # its passes go a batch at a time: fewer --head-samples would not help
                                          ("heads", r"in the heads phase: RESOURCE_EXHAUSTED: .*; use a smaller --batch-size")])
def test_a_run_out_of_memory_is_one_line_naming_the_phase_and_what_to_change(cli_checkpoint, where, tmp_path, stage, names):
    """XLA's out-of-memory error in a phase (an accelerator's usual end of a run too large for it)
    is one line naming the phase, the device and what to change; exit 2, nothing left next to
    --out. In a process of its own: glibc's failed 400 TB allocation leaves its heap unable to
    honour later settings (tests/test_allocator.py)."""
    parent, out = where
    script = tmp_path / "exhausted.py"
    script.write_text(OUT_OF_MEMORY)
    before = snapshot(parent)
    argv = [str(a) for a in _analyze(cli_checkpoint, out)]
    argv[argv.index("--phases") + 1] = f"fisher,{stage}" if stage != "collect" else "fisher"
    run = subprocess.run([sys.executable, str(script), stage, *argv], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, run.stderr[-3000:]
    assert len(lines) == 1 and re.match(r"^fisherjax: error: out of memory on cpu " + names, lines[0]), run.stderr[-3000:]
    assert snapshot(parent) == before
