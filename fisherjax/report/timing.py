"""What the run cost, as a reader sees it: wall time, peak memory and XLA compilations of each
stretch (loading, Phase 1's collection per task, each phase, the figures), and the total."""

from __future__ import annotations

from collections.abc import Mapping

from fisherjax.report.base import Section
from fisherjax.telemetry import Stretch

LABELS = {
    "load": "load model and tasks",
    "memory check": "Phase 1 — memory check (compiles its largest step)",
    "collect": "Phase 1 — collect",
    "fisher": "Phase 1 — save states",
    "importance": "Phase 2 — importance",
    "masks": "Phases 3–4 — masks",
    "conflicts": "Phase 5 — conflicts",
    "qkov": "Phase 6 — QK-OV",
    "natural": "Phase 7 — natural",
    "report": "report (figures)",
}
"""How each stretch's name reads in report.md."""


def summary(stretches: Mapping[str, Stretch], tasks: Mapping[str, Stretch], total: Stretch,
            work: Mapping[str, float] | None = None) -> dict:
    """The ``results.json["phases"]`` section: each stretch's entry (:meth:`Stretch.as_json`),
    Phase 1's collection also per task (``collect.tasks``), and the whole run (``total``). A
    stretch with ``work`` (its matrix-product FLOPs, :mod:`fisherjax.work`) also gets ``work_tflop``
    and ``achieved_tflops`` (that work over its seconds)."""
    data = {name: stretch.as_json() for name, stretch in stretches.items()}
    for name, flops in (work or {}).items():
        if name in data:
            data[name]["work_tflop"] = flops / 1e12
            data[name]["achieved_tflops"] = flops / max(stretches[name].seconds, 1e-9) / 1e12
    if "collect" in data and tasks:
        data["collect"]["tasks"] = {name: stretch.as_json() for name, stretch in tasks.items()}
    data["total"] = total.as_json()
    return data


LONGEST = 3
"""Stretches named, longest first, with what sets their cost under the table (``levers``)."""


def section(stretches: Mapping[str, Stretch], tasks: Mapping[str, Stretch], total: Stretch,
            work: Mapping[str, float] | None = None, levers: Mapping[str, str] | None = None) -> Section:
    """The "Where the time went" table: a row per stretch (per task under Phase 1's collection),
    and the total. A device column appears where the backend reports device memory; a peak that
    is the process's so far, not the stretch's own, is marked ≤. With ``work`` (FLOPs by stretch),
    a column of the TFLOP/s each of those stretches achieved against its count. With ``levers``
    (``{stretch: what sets its cost}``, the options a user turns), a line naming the
    :data:`LONGEST` longest of those stretches and their levers: what to change for a faster run."""
    data = summary(stretches, tasks, total, work)
    device = any(s.device_peak_bytes is not None for s in (*stretches.values(), total))
    rated = {name: data[name]["achieved_tflops"] for name in (work or {}) if name in data}
    header = ("| stretch | seconds |" + (" TFLOP/s |" if rated else "") + " peak RSS GB |" + (" device peak GB |" if device else "")
              + " compilations | compile s | cache hits |")
    lines = [header, "|" + "---|" * header.count(" |")]
    rows = []
    for name, stretch in stretches.items():
        rows.append((LABELS.get(name, name), stretch, rated.get(name)))
        if name == "collect":
            rows += [(f"  {task}", s, None) for task, s in tasks.items()]
    rows.append(("**total**", total, None))
    for label, s, rate in rows:
        cells = [label, f"{s.seconds:.1f}"] + ([f"{rate:.3g}" if rate is not None else "—"] if rated else [])
        cells.append(_peak(s.peak_rss_bytes, s.rss_scope))
        if device:
            cells.append(_peak(s.device_peak_bytes, s.device_scope))
        cells += [str(s.compilations), f"{s.compile_seconds:.1f}", str(s.cache_hits)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Compilations are XLA compilations; executables loaded from the persistent compilation cache are "
                  "cache hits (their loading counts in compile s). Peaks are the stretch's own unless marked ≤ "
                  "(the process's peak so far)."]
    costly = sorted((name for name in stretches if name in (levers or {})), key=lambda name: -stretches[name].seconds)[:LONGEST]
    if costly:
        lines += ["", "The longest stretches, and what sets their cost:", ""]
        lines += [f"- {LABELS.get(name, name)} ({stretches[name].seconds:.1f} s): {levers[name]}" for name in costly]
    if rated:
        lines += ["", "TFLOP/s: the stretch's matrix products as `fisherjax plan` counts them (`fisherjax.work`: a floor, "
                      "without norms, activations, softmax or host work — Phase 5's tests are host work) over its seconds. "
                      "Phase 1 and the pair phases run on every device and the heads and masks phases on one: per device, "
                      "the figure `fisherjax plan --tflops` takes for a larger run on the same machine."]
    return Section("phases", "Where the time went", data, lines)


def _peak(n: int | None, scope: str | None) -> str:
    if n is None:
        return "—"
    return f"{'≤ ' if scope != 'stretch' else ''}{n / 1e9:.2f}"


__all__ = ["LABELS", "LONGEST", "section", "summary"]
