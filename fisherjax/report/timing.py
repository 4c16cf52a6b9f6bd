"""What the run cost, as a reader sees it: wall time, peak memory and XLA compilations of each
stretch (loading, Phase 1's collection per task, each phase, the figures), and the total."""

from __future__ import annotations

from collections.abc import Mapping

from fisherjax.report.base import Section
from fisherjax.telemetry import Stretch

LABELS = {
    "load": "load model and tasks",
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


def summary(stretches: Mapping[str, Stretch], tasks: Mapping[str, Stretch], total: Stretch) -> dict:
    """The ``results.json["phases"]`` section: each stretch's entry (:meth:`Stretch.as_json`),
    Phase 1's collection also per task (``collect.tasks``), and the whole run (``total``)."""
    data = {name: stretch.as_json() for name, stretch in stretches.items()}
    if "collect" in data and tasks:
        data["collect"]["tasks"] = {name: stretch.as_json() for name, stretch in tasks.items()}
    data["total"] = total.as_json()
    return data


def section(stretches: Mapping[str, Stretch], tasks: Mapping[str, Stretch], total: Stretch) -> Section:
    """The "Where the time went" table: a row per stretch (per task under Phase 1's collection),
    and the total. A device column appears where the backend reports device memory; a peak that
    is the process's so far, not the stretch's own, is marked ≤."""
    data = summary(stretches, tasks, total)
    device = any(s.device_peak_bytes is not None for s in (*stretches.values(), total))
    header = "| stretch | seconds | peak RSS GB |" + (" device peak GB |" if device else "") + " compilations | compile s | cache hits |"
    lines = [header, "|" + "---|" * header.count(" |")]
    rows = []
    for name, stretch in stretches.items():
        rows.append((LABELS.get(name, name), stretch))
        if name == "collect":
            rows += [(f"  {task}", s) for task, s in tasks.items()]
    rows.append(("**total**", total))
    for label, s in rows:
        cells = [label, f"{s.seconds:.1f}", _peak(s.peak_rss_bytes, s.rss_scope)]
        if device:
            cells.append(_peak(s.device_peak_bytes, s.device_scope))
        cells += [str(s.compilations), f"{s.compile_seconds:.1f}", str(s.cache_hits)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Compilations are XLA compilations; executables loaded from the persistent compilation cache are "
                  "cache hits (their loading counts in compile s). Peaks are the stretch's own unless marked ≤ "
                  "(the process's peak so far)."]
    return Section("phases", "Where the time went", data, lines)


def _peak(n: int | None, scope: str | None) -> str:
    if n is None:
        return "—"
    return f"{'≤ ' if scope != 'stretch' else ''}{n / 1e9:.2f}"


__all__ = ["LABELS", "section", "summary"]
