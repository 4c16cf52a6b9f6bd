"""The host's memory allocator: glibc's ``malloc`` settings for XLA:CPU's large short-lived buffers.

On Linux XLA:CPU takes every buffer of a computation from ``malloc``. By default glibc maps each
large block afresh with ``mmap`` and unmaps it when it is freed, and a thread that allocates while
others do gets an arena of its own. A phase that forms hundreds of MB of gradients per step (kept
token factors formed slice by slice for Phase 5, layer by layer for Phase 6) then writes into fresh
pages all the time, and every first touch of 4 KB is a page fault (measured in
``benchmarks/RESULTS.md``, thirty-ninth session).

glibc lets a running process change this with ``mallopt`` (the ``MALLOC_*`` environment variables
of the README's "Speed" section are read at start-up only):

* :func:`use_one_arena` — ``M_ARENA_MAX = 1``: every thread allocates from the main arena. A
  thread keeps the arena it first allocated from, so this is called before XLA starts its threads
  (the command line does it first thing; in a notebook, before the first computation). Alone it
  changes neither speed nor memory; it is what lets :func:`reusing_freed_memory` reach the
  blocks XLA's threads allocate.
* :func:`reusing_freed_memory` — while inside, large blocks come from the heap (``M_MMAP_MAX = 0``)
  and freed memory stays there for the next block (``M_TRIM_THRESHOLD`` at its largest); on
  leaving, glibc's defaults come back and ``malloc_trim(0)`` returns the free pages to the system.
  It is a scope, not a setting for the whole run: through Phase 1, whose kept samples grow while
  its temporaries come and go, the kept memory fragments the heap and the peak grows by more than
  half, with no gain (``docs/DECISIONS.md``, "CPU memory allocator").

Both are no-ops elsewhere (macOS, musl, an unknown C library), with ``FISHERJAX_MALLOC=0``, and
where the user set glibc's allocator through the environment (:data:`USER_SETTINGS`): their
settings win.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
from collections.abc import Iterator

ENVIRONMENT = "FISHERJAX_MALLOC"
"""Set to ``0`` to leave glibc's allocator settings alone."""

USER_SETTINGS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
"""Environment variables through which a user sets glibc's allocator themselves (as do
``glibc.malloc.*`` entries of ``GLIBC_TUNABLES``)."""

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
"""``mallopt`` parameters (glibc's ``malloc.h``)."""
DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD = 65536, 128 * 1024
"""glibc's defaults, restored when :func:`reusing_freed_memory` ends."""
LARGEST_TRIM_THRESHOLD = 2**31 - 1
"""``mallopt`` takes an ``int``: freed memory up to 2 GB stays at the top of the heap."""


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The process's glibc, or None: another C library, switched off (``FISHERJAX_MALLOC=0``), or
    set by the user (:data:`USER_SETTINGS`)."""
    user_set = any(name in os.environ for name in USER_SETTINGS) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
    if os.environ.get(ENVIRONMENT, "1") == "0" or user_set:
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def use_one_arena() -> bool:
    """Every thread allocates from glibc's main arena (``mallopt(M_ARENA_MAX, 1)``); call it before
    the first computation. Whether it was set."""
    libc = glibc()
    return bool(libc is not None and libc.mallopt(M_ARENA_MAX, 1))


def return_free_memory() -> bool:
    """Give the heap's free pages back to the system (``malloc_trim(0)``); whether it could.

    A phase's freed temporaries stay in the heap, between the blocks it kept (Phase 1's kept
    gradients grow among its steps' temporaries), where glibc returns only the free memory at the
    heap's top. The next phase's large blocks are mapped afresh rather than fitted into those
    holes, so the holes add to its peak. ``analyze`` calls this after every phase."""
    libc = glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@contextlib.contextmanager
def reusing_freed_memory() -> Iterator[bool]:
    """Large blocks from the heap and freed memory kept for reuse while inside; glibc's defaults and
    ``malloc_trim(0)`` after. Yields whether the settings were changed. Not reentrant: a scope
    inside another restores the defaults as it ends (``analyze`` runs one phase in it at a time)."""
    libc = glibc()
    changed = bool(libc is not None and libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, LARGEST_TRIM_THRESHOLD))
    try:
        yield changed
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)
