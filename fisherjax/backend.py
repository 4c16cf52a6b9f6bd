"""The one place that decides between the CPU and accelerator code paths.

Several kernels have two shapes: one for a GPU or TPU (a few wide, batched operations), one for
XLA:CPU (small pieces that stay in cache, read host memory in place, run on several threads).
Every such choice asks this module, so a reader finds all of them here and a test can see them
side by side:

==================================  ==========================  ==============================
choice                              CPU                         GPU / TPU
==================================  ==========================  ==============================
:func:`sample_loop`                 loop over (sample, layer)   one ``vmap``
:func:`qkov_contraction`            ``"looped"``                ``"batched"``
:func:`pallas_interpret`            interpret mode              Triton (GPU) / interpret (TPU)
:func:`map_groups`                  ``lax.map`` over groups     one batched ``einsum``
:func:`reads_in_place`              aligned host arrays         never (device memory)
:func:`start_host_copy`             ``copy_to_host_async``      into pinned host memory
:func:`vocabulary_sums_by_dot`      a GEMV                      the fused reduction
:func:`settings_per_pass`           one                         all that fit the budget
:func:`rows_per_pass`               at most a run's batch       all that fit the budget
:func:`scored_positions_per_chunk`  128 positions               1024 positions
:func:`with_compiler_flags`         elemental fusion emitters   (XLA:CPU flag only)
:func:`looped_compiler_options`     MLIR fusion emitters        (XLA:CPU option only)
:func:`working_budget_bytes`        the default, less if tight  a share of the free memory
:func:`host_work_budget`            a share of the host's       the default
:func:`buffers_on_host`             freed memory reused         (device memory: unchanged)
==================================  ==========================  ==============================

The reasons, with their measurements, are in ``docs/DECISIONS.md`` and
``benchmarks/RESULTS.md``. Host work in numpy goes to every core through :func:`on_host_cores`.
The host-memory helpers live here too: XLA:CPU uses a C-contiguous
numpy array in place (``jax.device_put(x, may_alias=True)``) only when its data starts on a
:data:`HOST_ALIGNMENT` boundary, which numpy's allocator does not promise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from fisherjax.host_memory import available_bytes as host_available_bytes

HOST_ALIGNMENT = 64
"""Byte alignment of the per-sample host arrays that XLA:CPU reads without copying."""


FUSION_EMITTERS = "xla_cpu_use_fusion_emitters"
"""The XLA:CPU option that picks the MLIR fusion emitters (true) or the elemental ones (false)."""

CPU_COMPILER_FLAGS = (f"--{FUSION_EMITTERS}=false",)
"""XLA:CPU flags the command line runs with: XLA:CPU's elemental emitters for fusions instead of
its MLIR fusion emitters. They compile the same programs in about half the backend time and run
them as fast (GPT-2-small Phase 1 step and scores within noise); a run on a small model is mostly
compilation. Measurements in ``benchmarks/RESULTS.md``, the choice in ``docs/DECISIONS.md``."""


def flag_names(xla_flags: str) -> set[str]:
    """The options an ``XLA_FLAGS`` value sets (``--name`` of each ``--name=value``)."""
    return {f.split("=", 1)[0] for f in xla_flags.split()}


def looped_compiler_options(xla_flags: str) -> dict[str, bool] | None:
    """XLA options of the computations that walk a contraction in cache-sized pieces (the looped
    QK-OV kernel), for their ``jax.jit(..., compiler_options=...)``: XLA:CPU's MLIR fusion
    emitters, whatever :data:`CPU_COMPILER_FLAGS` sets for the process — with the elemental
    emitters the looped kernel's pieces run much slower, where the other programs measured run as
    fast or faster (``benchmarks/RESULTS.md``, thirty-ninth session). None where ``xla_flags``
    already sets the option: a user's own setting wins, as in :func:`with_compiler_flags` (the
    tests set it, for compile time). Other backends ignore the option."""
    return None if f"--{FUSION_EMITTERS}" in flag_names(xla_flags) else {FUSION_EMITTERS: True}


LOOPED_COMPILER_OPTIONS = looped_compiler_options(os.environ.get("XLA_FLAGS", ""))
""":func:`looped_compiler_options` of ``XLA_FLAGS`` as fisherjax is imported: before the command
line adds :data:`CPU_COMPILER_FLAGS`, so its own flag does not count as the user's."""


def with_compiler_flags(xla_flags: str, flags: Sequence[str] = CPU_COMPILER_FLAGS) -> str:
    """``xla_flags`` (an ``XLA_FLAGS`` value) with each of ``flags`` appended unless it already
    sets that option: a user's own setting wins."""
    given = flag_names(xla_flags)
    return " ".join([*xla_flags.split(), *(f for f in flags if f.split("=", 1)[0] not in given)])


def use_compiler_flags(environ=os.environ) -> None:
    """Put :data:`CPU_COMPILER_FLAGS` into ``XLA_FLAGS``. XLA reads the variable once, when the
    first backend starts: the command line calls this before it computes anything; in a notebook,
    set ``XLA_FLAGS`` before the first computation instead."""
    environ["XLA_FLAGS"] = with_compiler_flags(environ.get("XLA_FLAGS", ""))


def platform() -> str:
    """The default backend's platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
    return jax.default_backend()


def is_cpu() -> bool:
    return platform() == "cpu"


def is_gpu() -> bool:
    return platform() == "gpu"


def sample_loop() -> bool:
    """Per-sample work from the sites as a loop over (sample, layer) pieces (CPU) or one vmap.

    XLA:CPU runs one batched ``dot_general`` over ``[layer, batch]`` well below the speed of the
    same GEMMs issued one piece at a time and writes each intermediate to memory; a loop keeps
    every piece in cache. Accelerators want the one big kernel.
    """
    return is_cpu()


def vocabulary_sums_by_dot() -> bool:
    """Whether a log-sum-exp over the vocabulary sums its exponentials with a matrix product
    (:func:`fisherjax.grads.logsumexp`): on a CPU, where XLA's reduction with the exponential fused
    into it runs at about half the speed of the elementwise exponential and a GEMV; elsewhere the
    fused reduction, which never writes the exponentials."""
    return is_cpu()


def scored_positions_per_chunk() -> int:
    """Positions a forward-only score unembeds at a time (:func:`fisherjax.grads.hidden_scores`):
    128 on a CPU, where a ``[128, vocab]`` logits tile and its reductions beat one
    ``[batch, seq, vocab]`` pass over every position; 1024 elsewhere, where GEMMs want more rows
    and the tile still bounds the logits' memory."""
    return 128 if is_cpu() else 1024


def settings_per_pass(fits: int) -> int:
    """Model settings (e.g. single-head ablations) a forward pass vmaps together, given how many
    ``fits`` the memory budget: one on a CPU, where the batch's GEMMs already use every core and a
    setting that runs alone starts at its own layer (:func:`fisherjax.heads.ablate_heads`), all
    that fit on an accelerator, whose GEMMs want more rows than one batch gives."""
    return 1 if is_cpu() else max(int(fits), 1)


def rows_per_pass(fits: int, batch_rows: int) -> int:
    """Samples a forward-only pass takes at once (the head-pruning experiment's), given how many
    ``fits`` the memory budget: on a CPU at most ``batch_rows`` (a batch of the run's, whose GEMMs
    already use every core: larger passes ran slower there), all that fit on an accelerator."""
    return max(1, min(int(fits), int(batch_rows))) if is_cpu() else max(int(fits), 1)


def qkov_contraction(choice: str = "auto") -> str:
    """The QK-OV kernel that ``choice`` selects: ``"auto"`` is ``"looped"`` on a CPU and
    ``"batched"`` elsewhere; any other choice is returned as it is."""
    if choice != "auto":
        return choice
    return "looped" if is_cpu() else "batched"


def pallas_interpret() -> bool:
    """Whether a Pallas kernel runs in interpret mode: everywhere but a GPU (it is written for
    Pallas' Triton backend)."""
    return not is_gpu()


def map_groups() -> bool:
    """Per-group dot products as a ``lax.map`` over contiguous group slices (CPU) rather than one
    einsum batched over groups, which made XLA:CPU transpose whole feature tensors."""
    return is_cpu()


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def on_host_cores(work: Callable[[Any], None], pieces: Iterable) -> None:
    """``work(piece)`` for every piece, on :func:`available_cores` threads (the
    standard library's ``ThreadPoolExecutor``): numpy's sorts, searches and arithmetic release the
    GIL, so the pieces run side by side, each writing its own part of a shared output. An error
    in a piece is raised here."""
    pieces = list(pieces)
    workers = min(available_cores(), len(pieces))
    if workers <= 1:
        for piece in pieces:
            work(piece)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(work, pieces):
            pass


def start_host_copy(tree):
    """Start copying a pytree of device arrays to host memory, without waiting; returns the pytree
    to read them from (``np.asarray`` of each leaf then waits only for its own copy).

    On a CPU the arrays already live in host memory and ``copy_to_host_async`` readies their numpy
    views. On an accelerator the leaves are put into page-locked host memory (JAX's memory kind
    ``"pinned_host"``, same sharding): a DMA the runtime streams at the bus's speed, many times the
    pageable copy behind ``np.asarray`` of a device array (``benchmarks/host_copy.py``, RESULTS.md).
    A backend without that memory kind keeps the pageable copy.
    """
    leaves = jax.tree.leaves(tree)
    if not is_cpu() and leaves:
        try:
            return jax.tree.map(lambda x: jax.device_put(x, x.sharding.with_memory_kind(PINNED_HOST)), tree)
        except (ValueError, NotImplementedError, jax.errors.JaxRuntimeError):
            pass
    for leaf in leaves:
        leaf.copy_to_host_async()
    return tree


def available_memory_bytes() -> int | None:
    """Memory the default device can still allocate: on an accelerator its allocator's limit
    minus what is in use (``Device.memory_stats``), on a CPU the host memory this process may
    still take (:func:`fisherjax.host_memory.available_bytes`: ``MemAvailable``, or less under
    a cgroup's limit; where the CPU backend's arrays live); None where neither is known."""
    if not is_cpu():
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    return host_available_bytes()


DEVICE_WORKING_SHARE = 0.5
"""Share of an accelerator's free memory a phase's working pieces (a pair phase's tiles, a
forward-only pass) may take by default (:func:`working_budget_bytes`); the rest is left to XLA's
temporaries and the arrays of the run."""

HOST_WORK_SHARE = 0.25
"""Share of the host memory available when a pair phase starts that its working arrays may take
on a CPU, where they are host memory (:func:`host_work_budget`)."""


def host_work_budget(default: float, available: float | None = None) -> float:
    """The memory a pair phase's working arrays (QK-OV's tiles, Phase 5's parameter slices) may
    take: on a CPU, ``default`` or :data:`HOST_WORK_SHARE` of the host memory ``available``
    (None: now, :func:`host_available_bytes`, under a memory cgroup's limit too), whichever is
    less: a run whose kept gradients fill most of a job's memory works in smaller pieces instead
    of being killed; on an accelerator ``default`` (device memory, not the host's)."""
    if not is_cpu():
        return float(default)
    free = host_available_bytes() if available is None else available
    return float(default) if free is None or not np.isfinite(free) else min(float(default), HOST_WORK_SHARE * free)


def working_budget_bytes(cpu_bytes: float) -> float:
    """The memory a piece of work may take when its options give none — a QK-OV tile, a
    forward-only pass of the head-pruning experiment or of the single-head ablation: on a CPU
    ``cpu_bytes`` (a bound: the looped kernel walks its tile in cache-sized pieces and a forward
    pass takes one mask and a batch of rows there, so more buys nothing and holds host memory)
    or less where the host has little left (:func:`host_work_budget`), and on an accelerator
    :data:`DEVICE_WORKING_SHARE` of its free memory (:func:`available_memory_bytes`), at least
    ``cpu_bytes``. A 2 GB tile holds one sample of a 7B model's attention gradients per layer, so
    every tile would form task B's kept token factors again, and 1 GB holds less than one masked
    copy of its attention parameters: the accelerator's memory is what keeps a piece's samples
    and masks many."""
    if is_cpu():
        return host_work_budget(cpu_bytes)
    free = available_memory_bytes()
    return float(cpu_bytes) if free is None else max(float(cpu_bytes), DEVICE_WORKING_SHARE * free)


def stages_reads() -> bool:
    """Whether host data a phase reads several times is kept on the device between the reads: on
    an accelerator, where every read crosses the bus (and, for spilled stores, the disk); not on a
    CPU, whose device is the host, where a staged copy would only take more memory."""
    return not is_cpu()


def buffers_on_host() -> bool:
    """Whether XLA's buffers are host memory from ``malloc``, so that the pair phases run inside
    :func:`fisherjax.allocator.reusing_freed_memory` (on a CPU; an accelerator's buffers are its
    own memory)."""
    return is_cpu()


PINNED_HOST = "pinned_host"
"""JAX's memory kind of page-locked host memory, which accelerators copy to by DMA."""


# ---- host memory that XLA:CPU reads in place --------------------------------------------------


def host_empty(shape: Sequence[int], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a :data:`HOST_ALIGNMENT` boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + HOST_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % HOST_ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def host_concatenate(parts: Sequence[np.ndarray]) -> np.ndarray:
    """``np.concatenate(parts, axis=0)`` into a :func:`host_empty` array."""
    out = host_empty((sum(len(x) for x in parts), *parts[0].shape[1:]), np.result_type(*parts))
    return np.concatenate(parts, axis=0, out=out)


def host_take(x: np.ndarray, index) -> np.ndarray:
    """``x[index]`` along the first axis (an int array or a slice) into a :func:`host_empty` array."""
    rows = np.arange(len(x))[index]
    return np.take(x, rows, axis=0, out=host_empty((len(rows), *x.shape[1:]), x.dtype))


def is_aligned(x) -> bool:
    """A C-contiguous numpy array whose data starts on a :data:`HOST_ALIGNMENT` boundary."""
    return isinstance(x, np.ndarray) and x.flags.c_contiguous and x.ctypes.data % HOST_ALIGNMENT == 0


def reads_in_place(x) -> bool:
    """Whether the default backend can use host array ``x`` without copying it: a CPU backend and
    an :func:`is_aligned` array."""
    return is_cpu() and is_aligned(x)
