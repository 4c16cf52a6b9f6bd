"""Host memory this process may still take: the kernel's ``MemAvailable`` or, inside a memory
cgroup with a limit (a Slurm job, a container, a Kubernetes pod), the headroom under that limit
where it is smaller.

A process in a cgroup sees the whole machine in ``/proc/meminfo``: a job given 16 GB on a 512 GB
node reads 500 GB available, and a run that sized its work by that reading is killed by the
kernel's OOM killer without a word. So :func:`available_bytes` reads the limit of every memory
cgroup from this process's own up to the root of its hierarchy (a Slurm step sits below the
job that holds the limit) and takes the least headroom:

    headroom = limit − usage + inactive file pages

where the inactive file pages (``memory.stat``) are page cache the kernel reclaims before it
kills anything. Both layouts are read: cgroup v2 (``memory.max``, ``memory.current``,
``inactive_file``) and v1 (``memory.limit_in_bytes``, ``memory.usage_in_bytes``,
``total_inactive_file``); a hybrid machine's v1 memory controller is the one that limits. Where a
file cannot be read the reading falls back to ``MemAvailable``; where neither is known, None.

Paths come from ``/proc/self/cgroup`` (the cgroup of each hierarchy) and
``/proc/self/mountinfo`` (where each hierarchy is mounted, and which of its directories the mount
shows: a container without a cgroup namespace mounts its own subtree at the root). ``proc`` (by
default :data:`PROC`) is the root those two files and ``meminfo`` are read under, so a test can
build a machine.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

PROC = Path("/proc")
"""The process filesystem the readings come from."""

UNLIMITED = 1 << 62
"""A v1 limit at or above this is no limit: the kernel writes 2⁶³ − 1 rounded down to a page."""


class Hierarchy(NamedTuple):
    """Where this process's memory cgroup is: ``version`` (1 or 2), ``directory`` (its folder in
    the mounted hierarchy) and ``mount`` (the mount point: the top this process can read)."""

    version: int
    directory: Path
    mount: Path


def available_bytes(proc: str | Path | None = None) -> int | None:
    """Host memory still available to this process: the least of ``MemAvailable`` and the
    headroom of every limited memory cgroup above it (:func:`cgroup_headroom`); None where
    neither is known."""
    known = [b for b in (meminfo_available(proc), cgroup_headroom(proc)) if b is not None]
    return min(known) if known else None


def limited_by_cgroup(proc: str | Path | None = None) -> bool:
    """Whether :func:`available_bytes` is a memory cgroup's headroom rather than ``MemAvailable``."""
    room, free = cgroup_headroom(proc), meminfo_available(proc)
    return room is not None and (free is None or room <= free)


def meminfo_available(proc: str | Path | None = None) -> int | None:
    """``MemAvailable`` of ``proc/meminfo`` in bytes, or None where it cannot be read."""
    try:
        text = Path(PROC if proc is None else proc, "meminfo").read_text()
    except OSError:
        return None
    found = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None


def cgroup_headroom(proc: str | Path | None = None) -> int | None:
    """The least ``limit − usage + inactive file pages`` over this process's memory cgroup and
    its ancestors up to the mount (:func:`memory_hierarchy`), in bytes; None where no level
    has a limit or none can be read."""
    where = memory_hierarchy(PROC if proc is None else proc)
    if where is None:
        return None
    names = (("memory.max", "memory.current", "inactive_file") if where.version == 2
             else ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))
    least = None
    for level in (where.directory, *where.directory.parents):
        room = level_headroom(level, *names)
        if room is not None:
            least = room if least is None else min(least, room)
        if level == where.mount:
            break
    return least


def level_headroom(directory: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    """One cgroup's ``limit − usage + inactive`` (at least 0), or None where it has no limit
    (``max``, or a v1 limit of :data:`UNLIMITED` or more) or its files cannot be read."""
    try:
        limit = (directory / limit_file).read_text().strip()
        usage = int((directory / usage_file).read_text().strip())
    except (OSError, ValueError):
        return None
    if limit == "max" or not limit.isdigit() or int(limit) >= UNLIMITED:
        return None
    inactive = 0
    try:
        found = re.search(rf"^{inactive_key} (\d+)$", (directory / "memory.stat").read_text(), re.MULTILINE)
        inactive = int(found.group(1)) if found else 0
    except OSError:
        pass
    return max(int(limit) - usage + inactive, 0)


def memory_hierarchy(proc: str | Path | None = None) -> Hierarchy | None:
    """This process's memory cgroup: the v1 hierarchy with the ``memory`` controller where one is
    mounted, else the v2 (unified) hierarchy; None where neither can be found."""
    proc = Path(PROC if proc is None else proc)
    try:
        groups = (proc / "self" / "cgroup").read_text().splitlines()
        mounts = (proc / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return None
    paths = {}
    for line in groups:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if "memory" in parts[1].split(","):
            paths[1] = parts[2]
        elif parts[0] == "0" and parts[1] == "":
            paths[2] = parts[2]
    for version in (1, 2):
        if version not in paths:
            continue
        for line in mounts:
            mount = cgroup_mount(line, version)
            if mount is not None:
                root, point = mount
                return Hierarchy(version, directory_of(paths[version], root, point), point)
    return None


def cgroup_mount(line: str, version: int) -> tuple[str, Path] | None:
    """``(root, mount point)`` of a ``mountinfo`` line that mounts the v1 memory hierarchy
    (``version`` 1) or the v2 one (2); None for any other line. Fields: id, parent, device, root,
    mount point, options, optional fields, ``-``, filesystem type, source, super options."""
    fields = line.split()
    if "-" not in fields:
        return None
    sep = fields.index("-")
    if len(fields) < sep + 4 or sep < 5:
        return None
    kind, options = fields[sep + 1], fields[sep + 3].split(",")
    if (version == 2 and kind != "cgroup2") or (version == 1 and (kind != "cgroup" or "memory" not in options)):
        return None
    return unescaped(fields[3]), Path(unescaped(fields[4]))


def unescaped(field: str) -> str:
    """A ``mountinfo`` path with its octal escapes (``\\040`` for a space) written out."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def directory_of(path: str, root: str, point: Path) -> Path:
    """The folder of cgroup ``path`` under a mount of the hierarchy's ``root`` at ``point``: the
    part of ``path`` below ``root``; the mount point itself where ``path`` is not below it (a
    cgroup namespace shows ``/`` for a cgroup whose mount root is its own folder)."""
    root = root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        return point
    rest = path[len(root):].strip("/")
    return point / rest if rest else point
