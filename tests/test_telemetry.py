"""Measuring a stretch of a run (fisherjax.telemetry) and the report's "Where the time went"."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fisherjax import backend, telemetry
from fisherjax.pipeline import AnalysisConfig, cost_levers
from fisherjax.report import timing

MB = 1_000_000


def _allocate(n_bytes: int) -> int:
    """Touch ``n_bytes`` of fresh memory (every page written), free it, return a checksum."""
    block = np.ones(n_bytes // 8)
    return int(block[::4096].sum())


def test_a_stretch_sees_its_own_peak_and_not_the_one_before():
    _, big = telemetry.measure(_allocate, 200 * MB)
    _, small = telemetry.measure(_allocate, 1 * MB)
    assert big.seconds > 0 and small.seconds > 0
    if big.rss_scope != "stretch":
        pytest.skip("no /proc/self/statm here: peaks are the process's lifetime maximum")
    # The 200 MB block was resident during the first stretch (on top of what the process held
    # when it started), and gone before the second one began. The margin leaves room for what the
    # process's other threads (XLA, orbax, earlier tests' pools) allocate in between: 10 MB was seen.
    assert big.peak_rss_bytes >= small.peak_rss_bytes + 150 * MB, (big, small)
    entry = big.as_json()
    assert entry["peak_rss_gb"] >= 0.2 and "rss_scope" not in entry
    if backend.is_cpu():
        assert entry["device_peak_gb"] is None  # XLA:CPU reports no device memory


def test_measuring_leaves_the_kernels_peak_alone():
    """``/usr/bin/time`` and ``getrusage`` still see the process's true peak after a measured run."""
    import resource

    _allocate(300 * MB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    telemetry.measure(_allocate, 1 * MB)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >= before


def test_nested_stretches_fold_the_inner_peak_into_the_outer_one():
    def outer():
        _, inner = telemetry.measure(_allocate, 150 * MB)
        return inner

    inner, whole = telemetry.measure(outer)
    if whole.rss_scope != "stretch":
        pytest.skip("no /proc/self/statm here: peaks are the process's lifetime maximum")
    assert whole.peak_rss_bytes >= inner.peak_rss_bytes >= 150 * MB
    assert whole.seconds >= inner.seconds


def test_compilations_are_counted_once_and_listeners_removed_afterwards():
    def fresh(x):  # a function jax has not seen: one compilation in the first stretch only
        return jnp.tanh(x) * 3.0 + 1.0

    f = jax.jit(fresh)
    x = jnp.ones((7, 5))
    _, first = telemetry.measure(lambda: f(x).block_until_ready())
    _, second = telemetry.measure(lambda: f(x).block_until_ready())
    assert first.compilations >= 1 and first.compile_seconds > 0
    assert any("fresh" in name for name, _ in first.compiled), first.compiled
    assert second.compilations == 0 and second.cache_hits == 0
    assert telemetry.open_stretches() == 0  # and so no listener is left registered


def test_a_failing_stretch_leaves_nothing_behind():
    with pytest.raises(ZeroDivisionError):
        telemetry.measure(lambda: 1 / 0)
    assert telemetry.open_stretches() == 0
    with telemetry.running() as meter:
        record = meter.stop()
    assert isinstance(record, telemetry.Stretch) and record.seconds >= 0
    with pytest.raises(RuntimeError):
        meter.stop()


def test_the_record_is_immutable():
    _, stretch = telemetry.measure(lambda: None)
    with pytest.raises(AttributeError):
        stretch.seconds = 1.0


def _stretch(seconds, peak, device=None, device_scope=None, compilations=0):
    return telemetry.Stretch(seconds=seconds, peak_rss_bytes=peak, rss_scope="stretch", device_peak_bytes=device,
                             device_scope=device_scope, compilations=compilations, cache_hits=0, compile_seconds=0.5 * compilations,
                             trace_seconds=0.0)


def test_where_the_time_went_table():
    stretches = {"load": _stretch(1.0, 5e8), "collect": _stretch(4.0, 1.2e9, compilations=3), "report": _stretch(0.5, 1e9)}
    tasks = {"math": _stretch(2.5, 1.1e9, compilations=3), "copy": _stretch(1.5, 1.2e9)}
    section = timing.section(stretches, tasks, _stretch(6.0, 1.2e9, compilations=3))
    assert section.key == "phases" and section.title == "Where the time went"
    assert list(section.json) == ["load", "collect", "report", "total"]
    assert section.json["collect"]["tasks"]["math"]["compilations"] == 3
    assert section.json["total"]["peak_rss_gb"] == 1.2
    table = [line for line in section.lines if line.startswith("|")]
    assert "device" not in table[0]  # a CPU reports no device memory
    assert len(table) == 2 + 3 + 2 + 1  # header, rule, 3 stretches, 2 tasks, total
    assert table[3].startswith("| Phase 1 — collect | 4.0 | 1.20 |") and table[4].startswith("|   math | 2.5 |")
    # With device memory: a peak that is the process's so far, not the stretch's own, is marked.
    gpu = {"load": _stretch(1.0, 5e8, device=2e9, device_scope="stretch"), "report": _stretch(0.5, 5e8, device=2e9, device_scope="process")}
    lines = timing.section(gpu, {}, _stretch(2.0, 5e8, device=2e9, device_scope="stretch")).lines
    assert "device peak GB" in lines[0] and "| ≤ 2.00 |" in lines[3]


def test_the_longest_stretches_name_what_sets_their_cost():
    """Under the table, the three longest stretches an option's value sets, longest first, with
    those options at the run's values; every lever names a stretch that a run has."""
    levers = cost_levers(AnalysisConfig(ablation_heads=8))
    assert set(levers) <= {"collect", *AnalysisConfig().phase_order()}
    stretches = {"load": _stretch(20.0, 5e8), "heads": _stretch(9.0, 1e9), "collect": _stretch(4.0, 1e9), "masks": _stretch(6.0, 1e9),
                 "qkov": _stretch(2.0, 1e9)}
    lines = timing.section(stretches, {}, _stretch(41.0, 1e9), levers=levers).lines
    named = [text for text in lines[lines.index("The longest stretches, and what sets their cost:"):] if text.startswith("- ")]
    assert [text.split(" (")[0] for text in named] == ["- heads", "- Phases 3–4 — masks", "- Phase 1 — collect"]
    assert named[0].startswith("- heads (9.0 s): ") and "--ablation-heads 8" in named[0] and "--pruning-samples 32" in named[1]
    assert not any("what sets their cost" in text for text in timing.section(stretches, {}, _stretch(41.0, 1e9)).lines)
