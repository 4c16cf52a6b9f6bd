"""Measuring a stretch of a run: wall time, peak memory and XLA compilations.

``value, stretch = telemetry.measure(fn, *args)`` runs ``fn`` and returns its value with a
:class:`Stretch`, an immutable record of what the call cost (``with telemetry.running() as m:
... stretch = m.stop()`` measures a stretch that is not one call):

* ``seconds``: wall time.
* ``peak_rss_bytes``: the process's peak resident memory *during the call*, sampled from
  ``/proc/self/statm`` every :data:`SAMPLE_SECONDS` by a thread that runs while a stretch is open
  (and at its start and end). The kernel's own high-water mark is left alone: resetting it
  (``/proc/self/clear_refs``) would make ``/usr/bin/time`` and ``getrusage`` report a wrong peak
  for the whole process afterwards, a silent wrong number for anyone measuring fisherjax from
  outside. A spike shorter than the sampling period can be missed. Where ``/proc`` is not
  available the value is ``getrusage``'s lifetime maximum and ``rss_scope`` says ``"process"``
  instead of ``"stretch"``.
* ``device_peak_bytes``: the largest ``peak_bytes_in_use`` over the local devices
  (``device.memory_stats()``; None where the backend does not report it, as XLA:CPU). The device
  peak cannot be reset: when it grew during the stretch it is the stretch's own
  (``device_scope="stretch"``), otherwise it is the process's peak so far, an upper bound
  (``"process"``).
* ``compilations``, ``compile_seconds``, ``cache_hits``, ``trace_seconds``: XLA compilations
  (``jax.monitoring``'s ``/jax/core/compile/backend_compile_duration`` events, less the
  executables loaded from the persistent compilation cache, which are counted in
  ``cache_hits``), the seconds of that compile step (cache loads included), and the seconds
  spent tracing Python into jaxprs and lowering them to MLIR, which no cache saves. ``compiled``
  lists the compiled functions' names with their counts, to find shapes compiled twice.

Stretches nest (the ``collect`` stretch of ``analyze`` holds one per task): every sample counts
in every open stretch. Compilations are counted for the whole process, so work on other threads during a stretch counts
in it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jax

T = TypeVar("T")

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
"""One per XLA executable obtained, compiled or loaded from the persistent cache (jax/_src/dispatch.py)."""
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
"""One per executable loaded from the persistent compilation cache (jax/_src/compiler.py)."""
TRACE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")
"""Tracing a function into a jaxpr, and lowering the jaxpr to an MLIR module (jax/_src/dispatch.py)."""

_PROC_STATM = Path("/proc/self/statm")
SAMPLE_SECONDS = 0.005
"""How often the resident size is read while a stretch is open."""
GB = 1e9


@dataclasses.dataclass(frozen=True)
class Stretch:
    """What one stretch of a run cost (see the module docstring for each field's meaning)."""

    seconds: float
    peak_rss_bytes: int | None
    rss_scope: str
    device_peak_bytes: int | None
    device_scope: str | None
    compilations: int
    cache_hits: int
    compile_seconds: float
    trace_seconds: float
    compiled: tuple[tuple[str, int], ...] = ()

    def as_json(self) -> dict:
        """The ``results.json`` entry: seconds, peaks in GB (10⁹ bytes), compilation counts; a
        peak that is not the stretch's own says so (``"rss_scope"`` / ``"device_scope"``)."""
        entry = {
            "seconds": round(self.seconds, 2),
            "peak_rss_gb": _gb(self.peak_rss_bytes),
            "device_peak_gb": _gb(self.device_peak_bytes),
            "compilations": self.compilations,
            "compile_seconds": round(self.compile_seconds, 2),
            "cache_hits": self.cache_hits,
            "trace_seconds": round(self.trace_seconds, 2),
        }
        if self.rss_scope != "stretch":
            entry["rss_scope"] = self.rss_scope
        if self.device_peak_bytes is not None and self.device_scope != "stretch":
            entry["device_scope"] = self.device_scope
        return entry


def total(stretches: Sequence[Stretch]) -> Stretch:
    """One :class:`Stretch` for several apart (a method measured in pieces between others): the
    seconds and compilations summed, the largest peaks with the widest of their scopes, the
    compiled names' counts summed."""
    def peak(values, scopes):
        known = [(v, s) for v, s in zip(values, scopes) if v is not None]
        if not known:
            return None, scopes[0]
        return max(v for v, _ in known), ("process" if any(s == "process" for _, s in known) else known[0][1])

    rss, rss_scope = peak([s.peak_rss_bytes for s in stretches], [s.rss_scope for s in stretches])
    device, device_scope = peak([s.device_peak_bytes for s in stretches], [s.device_scope for s in stretches])
    compiled = collections.Counter()
    for s in stretches:
        compiled.update(dict(s.compiled))
    return Stretch(sum(s.seconds for s in stretches), rss, rss_scope, device, device_scope,
                   sum(s.compilations for s in stretches), sum(s.cache_hits for s in stretches),
                   sum(s.compile_seconds for s in stretches), sum(s.trace_seconds for s in stretches), _most_first(compiled))


def _most_first(counts) -> tuple[tuple[str, int], ...]:
    """``Stretch.compiled``: the names by count, most first, ties by name."""
    return tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def measure(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, Stretch]:
    """``(fn(*args, **kwargs), the Stretch of that call)``; an exception passes through unmeasured."""
    with running() as meter:
        value = fn(*args, **kwargs)
        return value, meter.stop()


@contextlib.contextmanager
def running() -> Iterator[Meter]:
    """A :class:`Meter` started now, for a stretch that is not one call: ``meter.stop()`` inside
    the block gives its :class:`Stretch`; leaving the block without it (an exception) drops it."""
    meter = Meter.start()
    try:
        yield meter
    finally:
        if not meter.stopped:
            meter.abandon()


def open_stretches() -> int:
    """How many stretches are being measured now; jax.monitoring listeners are registered only
    while there is one."""
    return len(Meter._open)


def _gb(n: int | None) -> float | None:
    return None if n is None else round(n / GB, 3)


# ---- host memory -------------------------------------------------------------------------------


def resident_bytes() -> int | None:
    """The resident size of this process now, in bytes, or None where ``/proc`` does not give it."""
    try:
        return int(_PROC_STATM.read_text().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


class _Sampler:
    """A daemon thread that reads the resident size every :data:`SAMPLE_SECONDS` and raises the
    peak of every open meter; it runs only while a stretch is open."""

    def __init__(self, meters: list):
        self.meters = meters
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, name="fisherjax-telemetry", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.done.wait(SAMPLE_SECONDS):
            rss = resident_bytes()
            if rss is None:
                return
            for meter in list(self.meters):
                meter.observe(rss)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def _lifetime_max_rss() -> int:
    """``getrusage``'s maximum resident size of the process's whole life, in bytes (macOS reports
    bytes, Linux kilobytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


# ---- device memory -----------------------------------------------------------------------------


def _device_peak() -> int | None:
    """The largest ``peak_bytes_in_use`` over the local devices, None where no device reports it."""
    peaks = []
    for device in jax.local_devices():
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


# ---- compilations ------------------------------------------------------------------------------


class _Tally:
    """Running totals of jax.monitoring's compilation events while at least one stretch is open."""

    def __init__(self):
        self.lock = threading.Lock()
        self.compiles = 0
        self.compile_seconds = 0.0
        self.cache_hits = 0
        self.trace_seconds = 0.0
        self.names: collections.Counter[str] = collections.Counter()

    def on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            with self.lock:
                self.compiles += 1
                self.compile_seconds += duration
                self.names[str(kwargs.get("fun_name", "?"))] += 1
        elif event in TRACE_EVENTS:
            with self.lock:
                self.trace_seconds += duration

    def on_event(self, event: str, **kwargs) -> None:
        if event == CACHE_HIT_EVENT:
            with self.lock:
                self.cache_hits += 1

    def snapshot(self) -> tuple[int, float, int, float, collections.Counter]:
        with self.lock:
            return self.compiles, self.compile_seconds, self.cache_hits, self.trace_seconds, collections.Counter(self.names)


class Meter:
    """One open stretch (made by :func:`running`). The open stretches form a stack (they nest);
    the listeners and the memory sampler run while it is not empty, so nothing lingers in a
    notebook."""

    _open: list[Meter] = []
    _tally: _Tally | None = None
    _sampler: _Sampler | None = None
    _lock = threading.Lock()

    def __init__(self):
        self.started = time.perf_counter()
        self.peak_rss: int | None = resident_bytes()
        self.device_start: int | None = None
        self.tally_start = None
        self.stopped = False

    def observe(self, rss: int) -> None:
        """Raise this stretch's peak to ``rss`` bytes."""
        self.peak_rss = rss if self.peak_rss is None else max(self.peak_rss, rss)

    @classmethod
    def start(cls) -> Meter:
        meter = cls()
        with cls._lock:
            if not cls._open:
                cls._tally = _Tally()
                jax.monitoring.register_event_duration_secs_listener(cls._tally.on_duration)
                jax.monitoring.register_event_listener(cls._tally.on_event)
            meter.device_start = _device_peak()
            meter.tally_start = cls._tally.snapshot()
            cls._open.append(meter)
            if cls._sampler is None and meter.peak_rss is not None:
                cls._sampler = _Sampler(cls._open)
        return meter

    def stop(self) -> Stretch:
        """End the stretch and return what it cost (once)."""
        if self.stopped:
            raise RuntimeError("this stretch has already been stopped")
        seconds = time.perf_counter() - self.started
        with self._lock:
            tally = self._tally.snapshot()
            rss = resident_bytes()
            if rss is not None and self.peak_rss is not None:
                peak_rss, rss_scope = max(self.peak_rss, rss), "stretch"
            else:
                peak_rss, rss_scope = _lifetime_max_rss(), "process"
            device_end = _device_peak()
            sampler = self._close()
        if sampler is not None:
            sampler.stop()
        compiles, compile_seconds, hits, trace_seconds, names = (now - then for now, then in zip(tally, self.tally_start))
        if device_end is None:
            device_scope = None
        else:
            device_scope = "stretch" if self.device_start is None or device_end > self.device_start else "process"
        return Stretch(
            seconds=seconds,
            peak_rss_bytes=peak_rss,
            rss_scope=rss_scope,
            device_peak_bytes=device_end,
            device_scope=device_scope,
            compilations=compiles - hits,
            cache_hits=hits,
            compile_seconds=compile_seconds,
            trace_seconds=trace_seconds,
            compiled=_most_first(names),
        )

    def abandon(self) -> None:
        """End the stretch without a record."""
        with self._lock:
            sampler = self._close()
        if sampler is not None:
            sampler.stop()

    def _close(self) -> _Sampler | None:
        """Leave the stack (called with the lock held); the last one out removes the listeners and
        returns the sampler for the caller to stop outside the lock."""
        self.stopped = True
        self._open.remove(self)
        if self._open:
            return None
        jax.monitoring.unregister_event_duration_listener(self._tally.on_duration)
        jax.monitoring.unregister_event_listener(self._tally.on_event)
        Meter._tally = None
        sampler, Meter._sampler = Meter._sampler, None
        return sampler


__all__ = ["Meter", "Stretch", "measure", "open_stretches", "running", "total"]
