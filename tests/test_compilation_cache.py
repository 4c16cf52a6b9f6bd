"""The persistent compilation cache: where it goes, the switches that turn it off, and a directory
that cannot be written (fisherjax.compilation_cache, ``fisherjax analyze --compilation-cache``).

No test here turns the command line's cache on in the pytest process (JAX's cache is
process-wide): the run that writes one is a subprocess, and conftest keeps
``FISHERJAX_COMPILATION_CACHE=0`` for the rest. The test run's own shared cache (conftest) is
switched off around the tests that check the command line leaves JAX's cache off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest
from conftest import TEST_JAX_CACHE
from refusals import assert_refused, run_cli

from jax.experimental.compilation_cache import compilation_cache as jax_cache

from fisherjax import compilation_cache

torch = pytest.importorskip("torch")  # cli_checkpoint is built with transformers' PyTorch classes


def _argv(root: Path, out: Path, *extra) -> list:
    return ["analyze", "--model", root / "model", "--task", f"add={root / 'add.jsonl'}", "--out", out, "--no-progress",
            "--batch-size", "8", "--phases", "fisher", *extra]


@pytest.fixture
def no_test_cache():
    """JAX's cache off in this process for one test (the run's shared cache back afterwards)."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes", "jax_compilation_cache_max_size")
    before = {name: getattr(jax.config, name) for name in names}
    assert before["jax_compilation_cache_dir"] == TEST_JAX_CACHE
    compilation_cache.disable()
    yield
    for name, value in before.items():  # exactly as before: the workers share one cache layout
        jax.config.update(name, value)
    jax_cache.reset_cache()


def test_where_the_cache_goes_and_the_switches():
    env = {"HOME": "/home/u"}
    assert compilation_cache.default_dir({}) == Path.home() / ".cache" / "fisherjax" / "jax-cache"
    assert compilation_cache.default_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/fisherjax/jax-cache")
    assert compilation_cache.default_dir({"XDG_CACHE_HOME": "relative"}) == Path.home() / ".cache" / "fisherjax" / "jax-cache"
    assert compilation_cache.requested_dir(None, False, {"XDG_CACHE_HOME": "/c"}) == Path("/c/fisherjax/jax-cache")
    assert compilation_cache.requested_dir(Path("/d"), False, {"FISHERJAX_COMPILATION_CACHE": "0"}) == Path("/d")
    assert compilation_cache.requested_dir(Path("/d"), True, env) is None  # --no-compilation-cache wins
    for off in ("0", "false", "OFF", "no"):
        assert compilation_cache.requested_dir(None, False, {"FISHERJAX_COMPILATION_CACHE": off}) is None
    for on in ("1", "true", "yes", ""):
        assert compilation_cache.requested_dir(None, False, {"FISHERJAX_COMPILATION_CACHE": on, "XDG_CACHE_HOME": "/c"}) is not None


def test_the_command_line_writes_the_cache_and_a_second_run_loads_it(cli_checkpoint, tmp_path):
    """A subprocess (JAX's cache is process-wide): two runs, the executables dropped in between."""
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import sys, jax
        from fisherjax.cli import main
        argv = {[str(a) for a in _argv(cli_checkpoint, tmp_path / "OUT", "--compilation-cache", cache)]}
        for run in ("cold", "warm"):
            assert main([a.replace("OUT", run) for a in argv]) == 0
            jax.clear_caches()
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "FISHERJAX_COMPILATION_CACHE": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg"),
           "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp")}
    env.pop("MPLCONFIGDIR", None)
    (tmp_path / "home").mkdir()
    (tmp_path / "tmp").mkdir()
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert any(cache.glob("*-cache")), sorted(p.name for p in cache.iterdir())
    assert not (tmp_path / "xdg" / "fisherjax").exists()  # --compilation-cache DIR: nothing in the default place
    # matplotlib's font list and config folder went to a temporary folder, removed at exit, not under HOME
    assert not any((tmp_path / "home").iterdir()) and not list((tmp_path / "tmp").glob("fisherjax-matplotlib-*"))
    cold, warm = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("cold", "warm"))
    assert cold["environment"]["compilation_cache"] == str(cache)
    assert cold["phases"]["total"]["compilations"] > 0 and cold["phases"]["total"]["cache_hits"] == 0
    assert warm["phases"]["total"]["cache_hits"] > 0
    assert warm["phases"]["total"]["compilations"] < cold["phases"]["total"]["compilations"]
    assert warm["fisher"] == cold["fisher"]


@pytest.mark.parametrize("switch", ["--no-compilation-cache", "FISHERJAX_COMPILATION_CACHE=0"])
def test_switched_off_nothing_is_written(cli_checkpoint, tmp_path, monkeypatch, switch, no_test_cache):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    name, _, value = switch.partition("=")
    monkeypatch.setenv("FISHERJAX_COMPILATION_CACHE", value or "1")
    extra = [name] if not value else []
    code, _, err = run_cli(_argv(cli_checkpoint, tmp_path / "out", *extra))
    assert code == 0, err
    assert not (tmp_path / "xdg" / "fisherjax").exists()
    assert compilation_cache.current() is None


def test_an_unwritable_cache_directory_warns_once_and_the_run_goes_on(cli_checkpoint, tmp_path, no_test_cache):
    (tmp_path / "a_file").write_text("")
    cache = tmp_path / "a_file" / "cache"
    code, _, err = run_cli(_argv(cli_checkpoint, tmp_path / "out", "--compilation-cache", cache))
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"fisherjax: warning: compilation cache off: {cache} cannot be written (Not a directory)"], err
    assert (tmp_path / "out" / "results.json").exists() and compilation_cache.current() is None
    code, _, err = run_cli(_argv(cli_checkpoint, tmp_path / "out2", "--compilation-cache", cache))
    assert code == 0 and "warning" not in err  # once


def test_a_bad_environment_value_is_refused(cli_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERJAX_COMPILATION_CACHE", "maybe")
    assert_refused(_argv(cli_checkpoint, tmp_path / "out"), parent=tmp_path, names=r"FISHERJAX_COMPILATION_CACHE must be 0 or 1, got 'maybe'")


def test_an_entry_left_by_a_killed_run_is_removed_and_the_cache_written_again(tmp_path):
    """An executable without its access-time file (a process killed between JAX's two writes) made
    every later write of JAX's size-limited cache fail with a warning; enable() removes it first."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "jit_step-dead-cache").write_bytes(b"part of an executable")
    (cache / "jit_kept-1234-cache").write_bytes(b"an entry")
    (cache / "jit_kept-1234-atime").write_bytes((1).to_bytes(8, "little"))
    script = textwrap.dedent(f"""
        import warnings
        warnings.simplefilter("error")  # JAX reports a failed cache write as a warning
        import jax, jax.numpy as jnp
        from fisherjax import compilation_cache
        compilation_cache.enable({str(cache)!r})
        print(float(jax.jit(lambda x: jnp.sin(x) * 2)(1.0)))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""})
    assert done.returncode == 0, done.stderr
    names = {p.name for p in cache.iterdir()}
    assert "jit_step-dead-cache" not in names and {"jit_kept-1234-cache", "jit_kept-1234-atime"} <= names
    written = [n for n in names if n.startswith("jit__lambda") or n.startswith("jit_<lambda>")]
    assert any(n.endswith("-cache") for n in written) and any(n.endswith("-atime") for n in written), names
    assert compilation_cache.remove_unmanageable(cache) == []
