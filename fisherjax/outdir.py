"""What ``fisherjax analyze`` may write, and where: nothing outside its output directory, and an
existing directory replaced only when fisherjax wrote it.

* Task names become file names (``fisher_state/<task>/``, spill folders, figure names, the
  ``task|param|group`` keys of ``group_fisher.npz``), so they are checked first:
  :data:`TASK_NAME` (``[A-Za-z0-9_-][A-Za-z0-9_.-]*``), unique.
* An output directory carries :data:`MARKER`, a small JSON file naming the fisherjax version and
  the run's config. :func:`check_destination` accepts a new path, an empty directory, or a
  directory with the marker; anything else needs ``--overwrite`` (or another directory).
* Before Phase 1, :func:`check_writable` checks that the output's filesystem (and a spill
  directory's) is writable and has room for an estimate of what will be written, so a full or
  read-only disk is found in a second, not after the collection.
* The run is written into a staging directory next to the destination (:func:`staging`), moved
  into place only when every phase succeeded, and removed on every exit path Python sees
  (exceptions, Ctrl-C, SIGTERM through the CLI). A staging directory left by a killed process (a
  marker inside names its process) is removed by the next run on the same destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from fisherjax.errors import ConfigError, DataError, disk_errno, disk_error

TASK_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
"""A task name: letters, digits, ``_`` and ``-``, then also ``.`` (no path separators, no ``..``,
no ``|``), so it is safe as a file name and as part of a ``task|param|group`` key."""

MARKER = "fisherjax-output.json"
"""The file that says "fisherjax wrote this directory" (version and config of the run)."""

_STAGING = ".fisherjax-staging"  # marker inside a staging directory: the pid of its process


def check_task_name(name: str, *, option: str = "--task") -> str:
    """``name`` if it is a valid task name (:data:`TASK_NAME`), else a :class:`DataError` naming it."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name) or len(name) > 128:
        raise DataError(
            f"task name {name!r} ({option}) is not allowed: use letters, digits, '_', '-' and '.', not starting with "
            "'.' (it names files under the output directory)"
        )
    return name


def check_task_names(names: Iterable[str], *, option: str = "--task") -> None:
    """Every name valid (:func:`check_task_name`) and no name twice."""
    names = list(names)
    for name in names:
        check_task_name(name, option=option)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"task names must be unique ({option}), repeated: {', '.join(repeated)}")


def is_fisherjax_output(directory: Path) -> bool:
    """Whether ``directory`` holds :data:`MARKER` written by fisherjax (a JSON object naming it)."""
    try:
        content = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and "fisherjax" in content


def check_destination(destination: Path, *, overwrite: bool = False) -> None:
    """The output directory may be new, an empty directory, an earlier fisherjax output
    (:data:`MARKER`), or anything else with ``overwrite``; a path that is not a directory is
    always refused. It is replaced whole, so nothing else is ever deleted without being asked."""
    destination = Path(destination)
    if not destination.exists() and not destination.is_symlink():
        return
    if not destination.is_dir() or destination.is_symlink():
        raise ConfigError(f"{destination}: --out exists and is not a directory; choose a new directory")
    if overwrite or is_fisherjax_output(destination):
        return
    try:
        empty = not any(destination.iterdir())
    except OSError as err:
        raise ConfigError(f"{destination}: --out cannot be read ({err.strerror})") from None
    if not empty:
        raise ConfigError(
            f"{destination}: --out is a non-empty directory that fisherjax did not write (no {MARKER}); it would be "
            "replaced whole, so choose a new directory, or pass --overwrite to replace it"
        )


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def check_writable(path: Path, needed_bytes: float, *, option: str) -> None:
    """Refuse early (a :class:`ConfigError` naming ``option``) when the directory that would hold
    ``path`` (or its nearest existing ancestor) is read-only, not writable by this user, or has
    less than ``needed_bytes`` free. Nothing is written to find out."""
    where = _existing_ancestor(path)
    if not where.is_dir():
        raise ConfigError(f"{path}: {option} is inside {where}, which is not a directory")
    try:
        stats = os.statvfs(where)
    except OSError as err:
        raise ConfigError(f"{path}: {option} cannot be checked ({err.strerror})") from None
    if stats.f_flag & os.ST_RDONLY:
        raise ConfigError(f"{path}: {option} is on a read-only filesystem ({where}); choose a writable location")
    if not os.access(where, os.W_OK | os.X_OK):
        raise ConfigError(f"{path}: {option} is not writable ({where}: permission denied); choose a writable location")
    free = stats.f_bavail * stats.f_frsize
    if free < needed_bytes:
        raise ConfigError(
            f"{path}: {option} has {free / 1e9:.3g} GB free on {where}, this run needs about {needed_bytes / 1e9:.3g} GB; "
            "free some space or choose another location"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(destination: Path) -> list[Path]:
    """Remove staging directories (and half-replaced old outputs) that an earlier run on this
    destination left when it was killed: only fisherjax's own, recognised by their name and the
    marker inside, and only when the process that made them is gone. Returns what was removed."""
    destination = Path(destination).absolute()
    parent = destination.parent
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.glob(f".{destination.name}.*"):
        if not entry.is_dir() or entry.is_symlink():
            continue
        marker = entry / _STAGING
        if marker.is_file():
            try:
                pid = int(marker.read_text().strip())
            except (OSError, ValueError):
                continue
            if pid != os.getpid() and _alive(pid):
                continue
        elif not (entry.name.startswith(f".{destination.name}.old-") and is_fisherjax_output(entry)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def staging(destination: Path) -> Iterator[Path]:
    """A fresh staging directory next to ``destination`` (its missing parents created); on a clean
    exit of the block it replaces ``destination`` (an older output is removed only after the new
    one is in place), on any exception — Ctrl-C included — it is removed, with the parents it
    created. Disk errors while writing become a one-line :class:`~fisherjax.errors.FisherjaxError`."""
    destination = Path(destination).absolute()
    created = []
    for parent in reversed(destination.parents):
        if not parent.exists():
            created.append(parent)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f".{destination.name}.staging-", dir=destination.parent))
        (path / _STAGING).write_text(str(os.getpid()))
    except OSError as err:
        _remove_created(created)
        raise disk_error(err, destination, "--out") if disk_errno(err) else err from None
    try:
        yield path
        (path / _STAGING).unlink()
        _replace_directory(path, destination)
    except BaseException as err:
        remove_settled(path)
        _remove_created(created)
        if disk_errno(err):
            raise disk_error(err, destination, "--out") from None
        raise


def remove_settled(path: Path, *, quiet_seconds: float = 0.3, limit_seconds: float = 5.0) -> None:
    """Remove the tree ``path`` and keep removing it until it has stayed absent ``quiet_seconds``.

    After a failed save, orbax's background threads can still create a ``*.orbax-checkpoint-tmp``
    folder inside it for a moment (seen in 3 runs of 7 of the disk-full test); a single removal
    would leave that behind. Gives up after ``limit_seconds``.
    """
    deadline = time.monotonic() + limit_seconds
    absent_since = None
    while time.monotonic() < deadline:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
            absent_since = None
        elif absent_since is None:
            absent_since = time.monotonic()
        elif time.monotonic() - absent_since >= quiet_seconds:
            return
        time.sleep(0.02)


def _remove_created(created: list[Path]) -> None:
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _replace_directory(staging_path: Path, destination: Path) -> None:
    """Move the finished output into place; an older output is removed only after that."""
    old = None
    if destination.exists():
        old = destination.with_name(f".{destination.name}.old-{time.time_ns()}")
        destination.rename(old)
    staging_path.rename(destination)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_marker(directory: Path, record: Mapping) -> None:
    """Write :data:`MARKER` (``record``: at least ``{"fisherjax": version}``) into ``directory``."""
    (Path(directory) / MARKER).write_text(json.dumps(dict(record), indent=2, default=str))


class NpzWriter:
    """A ``.npz`` file written one array at a time, so that a phase need not hold every array it
    writes until its end: ``numpy.savez``'s format (a zip of ``.npy`` members, stored, zip64), each
    member written by ``numpy.lib.format.write_array``; ``numpy.load`` reads it. A context manager
    that closes the file."""

    def __init__(self, path: Path):
        self._zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def add(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Write ``{name: array}`` as members ``name.npy``."""
        for name, array in arrays.items():
            with self._zip.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._zip.close()
