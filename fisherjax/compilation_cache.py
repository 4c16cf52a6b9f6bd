"""JAX's persistent compilation cache, kept for the user in their cache directory.

On a small model a run is mostly fixed costs, and XLA compilation is the largest of them: the
same step, kernels and reductions are compiled again by every run. With the cache, a second run
loads the executables from disk (``$XDG_CACHE_HOME/fisherjax/jax-cache``, by default
``~/.cache/fisherjax/jax-cache``).

``fisherjax analyze`` turns it on unless told not to (``--no-compilation-cache``,
``FISHERJAX_COMPILATION_CACHE=0``) and puts it elsewhere with ``--compilation-cache DIR``; the
Python API never writes outside what it is asked to, so a notebook opts in with
:func:`enable` (``fisherjax.enable_compilation_cache()``).

matplotlib's font list and config folder go beside it (:func:`place_matplotlib_cache`), so a run
writes nowhere else outside its output directory.

The cache is process-wide JAX configuration, not a choice between CPU and accelerator code, so it
lives here rather than in :mod:`fisherjax.backend`. A directory that cannot be written turns the
cache off with one line on stderr, once; the run goes on without it.

JAX caches only compilations that took at least ``jax_persistent_cache_min_compile_time_secs``
(1 s by default). A small model's run is hundreds of compilations of 10–300 ms each, so the
threshold is lowered to :data:`MIN_COMPILE_SECONDS`, and the entry-size threshold is switched off.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from fisherjax.errors import ConfigError

ENVIRONMENT = "FISHERJAX_COMPILATION_CACHE"
"""``0`` (or ``false``, ``off``, ``no``) turns the command line's cache off; ``1`` (``true``,
``on``, ``yes``, or empty) leaves it on."""

MIN_COMPILE_SECONDS = 0.0
"""Compilations faster than this are not cached. JAX's default, 1 s, cached 4 of the demo's 53
compilations, and a second run still spent 5.6 s compiling; 0.1 s cached 20 (1.0 s left), 0 all
53 (0.4 s of loading), in about 1 MB (docs/DECISIONS.md)."""

MAX_BYTES = 2 * 1024**3
"""The cache's size limit: past it JAX removes the least recently used entries (when the
``filelock`` package, which that needs, is installed; otherwise the cache is not limited)."""

_OFF = ("0", "false", "off", "no")
_ON = ("", "1", "true", "on", "yes")
_warned: set[str] = set()


def default_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """``$XDG_CACHE_HOME/fisherjax/jax-cache``, or ``~/.cache/fisherjax/jax-cache`` when the
    variable is unset or not an absolute path (as the XDG base directory specification says)."""
    base = environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "fisherjax" / "jax-cache"


def requested_dir(directory: Path | None, off: bool, environ: Mapping[str, str] = os.environ) -> Path | None:
    """The cache directory the command line asks for, or None for no cache.

    ``--no-compilation-cache`` (``off``) wins, then ``--compilation-cache DIR`` (``directory``),
    then :data:`ENVIRONMENT`, then :func:`default_dir`. An :data:`ENVIRONMENT` value that is not
    a yes or a no is a :class:`~fisherjax.errors.ConfigError`.
    """
    if off:
        return None
    if directory is not None:
        return Path(directory).expanduser()
    value = environ.get(ENVIRONMENT, "").strip().lower()
    if value in _OFF:
        return None
    if value not in _ON:
        raise ConfigError(f"{ENVIRONMENT} must be 0 or 1, got {environ[ENVIRONMENT]!r} "
                          "(--compilation-cache DIR puts the cache elsewhere)")
    return default_dir(environ)


MATPLOTLIB_ENV = "MPLCONFIGDIR"


def place_matplotlib_cache(cache: Path | None, environ: dict = os.environ) -> Path | None:
    """Keep matplotlib's own writes (its font list, its config folder; made at its first import,
    under ``~/.cache/matplotlib`` and ``~/.config/matplotlib`` by default) in fisherjax's cache:
    ``MPLCONFIGDIR`` is set to ``matplotlib`` beside the default compilation cache when that is the
    cache in use, else to a temporary folder removed at exit, so a run writes nothing outside
    ``--out`` and the cache it was allowed. A user's own ``MPLCONFIGDIR``, or matplotlib already
    imported, is left alone (returns None). Call before anything imports matplotlib."""
    if MATPLOTLIB_ENV in environ or "matplotlib" in sys.modules:
        return None
    if cache is not None and Path(cache) == default_dir(environ):
        folder = Path(cache).parent / "matplotlib"
    else:
        import atexit
        import shutil

        folder = Path(tempfile.mkdtemp(prefix="fisherjax-matplotlib-"))
        atexit.register(shutil.rmtree, folder, True)
    environ[MATPLOTLIB_ENV] = str(folder)
    return folder


def enable(path: str | os.PathLike | None = None) -> Path | None:
    """Keep this process's XLA compilations in ``path`` (default :func:`default_dir`) and load
    them from there; returns the directory, or None when it cannot be written (one warning line
    on stderr, once per directory, and the cache stays off).

    Call it before the first computation so every compilation is cached; calling it later, or
    again with another directory, switches the cache for the compilations that follow.
    """
    directory = Path(path).expanduser() if path is not None else default_dir()
    directory = directory.absolute()
    problem = _unwritable(directory)
    if problem is not None:
        if str(directory) not in _warned:
            _warned.add(str(directory))
            print(f"fisherjax: warning: compilation cache off: {directory} {problem}", file=sys.stderr)
        return None
    limited = importlib.util.find_spec("filelock") is not None
    if limited:
        remove_unmanageable(directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES if limited else -1)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax_cache.reset_cache()  # JAX opens its cache once; a later call must switch it
    return directory


def disable() -> None:
    """No persistent compilation cache for the compilations that follow (what :func:`enable` set
    is undone; JAX's own defaults come back)."""
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", -1)
    jax_cache.reset_cache()


def current() -> Path | None:
    """The directory compilations are cached in now, or None."""
    directory = jax.config.jax_compilation_cache_dir
    return Path(directory) if directory and jax.config.jax_enable_compilation_cache else None


def remove_unmanageable(directory: Path) -> list[str]:
    """Remove the entries a size-limited JAX cache can no longer manage, and return their names.

    JAX writes an entry as its executable (``KEY-cache``) and then its last-use time
    (``KEY-atime``); a process killed between the two leaves an executable without a time, or
    only part of one. Before each write JAX's eviction reads the time of every entry, so one such
    entry fails every later write: a warning per compilation, and nothing cached again. Done
    under JAX's own lock file (``.lockfile``, ``filelock``), so no run writing beside this one
    is mid-entry.
    """
    import filelock

    removed = []
    try:
        with filelock.FileLock(directory / ".lockfile", timeout=10):
            for entry in directory.glob("*-cache"):
                key = entry.name.removesuffix("-cache")
                if not (directory / f"{key}-atime").exists():
                    entry.unlink(missing_ok=True)
                    removed.append(key)
    except (OSError, filelock.Timeout):  # the cache stays as it is; JAX will say what fails
        pass
    return removed


def _unwritable(directory: Path) -> str | None:
    """Why ``directory`` cannot hold the cache (it is created if missing), or None when a file can
    be created in it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fisherjax-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return f"cannot be written ({err.strerror or err})"
    return None


__all__ = ["ENVIRONMENT", "MAX_BYTES", "MIN_COMPILE_SECONDS", "current", "default_dir", "disable", "enable", "remove_unmanageable",
           "requested_dir"]
