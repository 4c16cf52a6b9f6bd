"""glibc's allocator settings (:mod:`fisherjax.allocator`): inside ``reusing_freed_memory`` a large
block comes from the heap, not from a mapping of its own, and outside it glibc's defaults are
back; the switch and a user's own settings leave glibc alone; the pair phases of ``analyze`` run
inside it on a CPU; after a phase the heap's free pages are given back. Each check runs in a Python process of its own (:func:`in_a_fresh_process`):
glibc's heap is the process's, and earlier tests of a pytest worker (``analyze`` runs inside the
scope) leave free chunks of many MB below live blocks, which serve a probe's block without any
mapping."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fisherjax import allocator

BLOCK = 64 * 2**20  # far above glibc's largest mmap threshold (32 MB)


class MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc ≥ 2.33)."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def mallinfo() -> MallInfo2:
    """glibc's ``mallinfo2()`` (whether or not :mod:`fisherjax.allocator` may change its settings)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2  # a struct returned by value: without it the call writes through a missing pointer
    return libc.mallinfo2()


def mapped_bytes() -> int:
    """Bytes of the blocks glibc has mapped with ``mmap`` (each large block outside the heap)."""
    return mallinfo().hblkhd


def maps_a_large_block() -> bool:
    before = mapped_bytes()
    block = np.ones(BLOCK // 8)
    mapped = mapped_bytes() - before >= BLOCK
    del block
    return mapped


def in_a_fresh_process(check: str, *args) -> None:
    """Run ``check(*args)`` of this module in a new Python process (this process's environment, as
    the :func:`glibc` fixture left it) and fail with its output where it fails."""
    run = subprocess.run([sys.executable, "-c", f"import test_allocator; test_allocator.{check}(*{args!r})"],
                         cwd=Path(__file__).parent, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.fixture
def glibc(monkeypatch):
    """glibc's allocator as fisherjax finds it without switches or user settings; skips elsewhere."""
    for name in (allocator.ENVIRONMENT, *allocator.USER_SETTINGS, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    allocator.glibc.cache_clear()
    if allocator.glibc() is None or not hasattr(allocator.glibc(), "mallinfo2"):
        pytest.skip("glibc ≥ 2.33 only")
    yield
    allocator.glibc.cache_clear()


@pytest.mark.usefixtures("glibc")
def test_large_blocks_come_from_the_heap_inside_the_scope_only():
    in_a_fresh_process("check_large_blocks")


def check_large_blocks() -> None:
    assert maps_a_large_block()  # glibc's default
    with allocator.reusing_freed_memory() as changed:
        assert changed and not maps_a_large_block()
        block = np.ones(BLOCK // 8)
        kept = mallinfo().fordblks  # free bytes in the heap
        del block  # freed memory is kept for the next block, not returned
        held = mallinfo().fordblks
        assert held > kept + BLOCK // 2
    assert maps_a_large_block()  # the defaults are back
    assert mallinfo().fordblks < held - BLOCK // 2  # and malloc_trim gave the freed block back


@pytest.mark.parametrize("setting", [(allocator.ENVIRONMENT, "0"), ("MALLOC_MMAP_MAX_", "65536"),
                                     ("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")])
@pytest.mark.usefixtures("glibc")
def test_the_switch_and_a_users_own_settings_leave_glibc_alone(setting):
    in_a_fresh_process("check_settings_left_alone", setting)


def check_settings_left_alone(setting: tuple[str, str]) -> None:
    os.environ[setting[0]] = setting[1]
    allocator.glibc.cache_clear()
    assert allocator.glibc() is None and not allocator.use_one_arena()
    with allocator.reusing_freed_memory() as changed:
        assert not changed and maps_a_large_block()
    del os.environ[setting[0]]
    os.environ["GLIBC_TUNABLES"] = "glibc.cpu.hwcaps=-AVX512F"  # tunables of something else: not the allocator's
    allocator.glibc.cache_clear()
    assert allocator.glibc() is not None


@pytest.mark.usefixtures("glibc")
def test_the_pair_phases_run_inside_the_scope_on_a_cpu_with_room():
    in_a_fresh_process("check_pair_phases")


def check_pair_phases() -> None:
    from fisherjax import backend, pipeline

    assert backend.buffers_on_host()  # the tests' backend is the CPU
    backend.host_available_bytes = lambda: 2 * pipeline.REUSE_ROOM_BYTES
    seen = {}
    for phase in pipeline.PHASES:
        pipeline.PHASES[phase] = lambda ctx, out, phase=phase: seen.setdefault(phase, maps_a_large_block())
        pipeline.run_phase(phase, None, None)
    assert {phase for phase, mapped in seen.items() if not mapped} == set(pipeline.REUSING_PHASES) == {"conflicts", "qkov"}
    backend.host_available_bytes = lambda: pipeline.REUSE_ROOM_BYTES - 1  # near a memory limit: not kept
    seen.clear()
    pipeline.run_phase("qkov", None, None)
    assert seen == {"qkov": True}
    backend.host_available_bytes = lambda: None  # not known: kept, as before
    seen.clear()
    pipeline.run_phase("qkov", None, None)
    assert seen == {"qkov": False}
    backend.buffers_on_host = lambda: False  # an accelerator's buffers are its own
    seen.clear()
    pipeline.run_phase("qkov", None, None)
    assert seen == {"qkov": True}


@pytest.mark.usefixtures("glibc")
def test_a_phase_gives_the_heaps_free_pages_back():
    in_a_fresh_process("check_free_pages_given_back")


def check_free_pages_given_back() -> None:
    from fisherjax import pipeline
    from fisherjax.telemetry import resident_bytes

    libc = allocator.glibc()
    libc.mallopt(allocator.M_MMAP_MAX, 0)  # the block from the heap, then a live block above it
    hole, above = np.ones(BLOCK // 8), np.ones(2**17)
    libc.mallopt(allocator.M_MMAP_MAX, allocator.DEFAULT_MMAP_MAX)
    del hole  # free, below a live block: glibc keeps its pages
    before = resident_bytes()
    pipeline.PHASES["heads"] = lambda ctx, out: None  # a phase outside the pair phases' scope
    pipeline.run_phase("heads", None, None)
    assert resident_bytes() < before - BLOCK // 2
    del above
