"""The Fisher method comparison as a reader sees it: ``results.json["method_comparison"]``, a table
of the four methods, the recommendation with its rule, and a figure of their top eigenvalues."""

from __future__ import annotations

import numpy as np

from fisherjax.curvature.compare import METHODS, MethodComparison
from fisherjax.layout import layer_name
from fisherjax.report import categories
from fisherjax.report.base import Section
from fisherjax.report.figures import new_figure

TITLE = "Phase 1 — Fisher method comparison (diagonal, K-FAC, Lanczos, block spectra)"
LABELS = {"diagonal": "diagonal", "kfac": "K-FAC", "lanczos": "Lanczos top-k", "block_spectra": "block spectra"}


def _list(x):
    return None if x is None else np.asarray(x, np.float64).tolist()


def summary(result: MethodComparison, task: str, labels: np.ndarray | None = None, kv_head_of: np.ndarray | None = None) -> dict:
    """The ``results.json["method_comparison"]`` value; with ``labels`` every listed block names
    its head's category (:func:`fisherjax.report.categories.head_category`)."""
    methods = {}
    for name in METHODS:
        m = result.methods[name]
        methods[name] = {
            **m.stretch.as_json(),
            "top_eigenvalues": _list(m.top),
            "blocks_top_eigenvalue": _list(m.blocks_top),
            "condition_number": m.condition,
            "probe_relative_error": m.probe_error,
            "rayleigh_over_ritz": _list(m.rayleigh),
            "notes": m.notes,
        }
    return {
        "task": task,
        "samples": result.n_samples,
        "parameters": result.n_parameters,
        "damping": result.damping,
        "blocks": [{"block": b, "layer": layer, "head": h,
                    **({} if labels is None else {"category": categories.head_category(labels, layer, h, b, kv_head_of)})}
                   for b, layer, h in result.blocks],
        "lanczos_residuals": _list(result.lanczos_residuals),
        "methods": methods,
        "recommended": result.recommended,
        "reason": result.reason,
        "rule": "diagonal unless K-FAC's relative product error on Gaussian probes is below 0.75× the diagonal's and its top "
                "eigenvalue is within 0.5–2× Lanczos's; Lanczos (top of the spectrum) and block spectra (per head) are exact, "
                "not preconditioners",
    }


def _fmt(x) -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.3g}"


def section(result: MethodComparison, task: str, labels: np.ndarray | None = None, kv_head_of: np.ndarray | None = None) -> Section:
    """The comparison's section: a table, the recommendation and a figure of each method's top-k;
    with ``labels`` (``[L, H]`` head categories) the largest slices name their head's category."""
    data = summary(result, task, labels, kv_head_of)
    lines = [
        f"On {result.n_samples} samples of {task} ({result.n_parameters:,} parameters), the empirical Fisher "
        "`F = (1/n) Σ g_i g_iᵀ / T_i` compared with its approximations through exact matrix-free products. "
        f"Condition numbers are of `F̃ + λI` with λ = {result.damping:.3g} (10⁻³ × the mean eigenvalue).",
        "",
        "| method | seconds | peak RSS (GB) | λ₁ | condition | product error | Rayleigh q₁ᵀF̃q₁/λ₁ |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in METHODS:
        m, j = result.methods[name], data["methods"][name]
        rayleigh = None if m.rayleigh is None else float(m.rayleigh[0])
        lines.append(f"| {LABELS[name]} | {j['seconds']:.2f} | {_fmt(j['peak_rss_gb'])} | {_fmt(float(m.top[0]))} | "
                     f"{_fmt(m.condition)} | {_fmt(m.probe_error)} | {_fmt(rayleigh)} |")
    lines += ["", f"{LABELS['lanczos']}: {result.methods['lanczos'].notes}.", "",
              f"**Recommended: {LABELS[result.recommended]}** — {result.reason}.", ""]
    if result.blocks:
        b, layer, h = result.blocks[0]
        named = "" if labels is None else f" ({data['blocks'][0]['category']})"
        lines.append(f"The slice with the largest curvature is {b.upper()} head {h}{named} of {layer_name(layer)} "
                     f"(λ₁ = {_fmt(float(result.methods['block_spectra'].blocks_top[0]))}).")
    lines += ["", "{figure:method_comparison}"]
    return Section("method_comparison", TITLE, data, lines, {"method_comparison": _figure(result)})


def _figure(result: MethodComparison):
    fig = new_figure(figsize=(9, 3.4))
    left, right = fig.subplots(1, 2)
    for name in METHODS:
        top = np.asarray(result.methods[name].top, np.float64)
        shown = top > 0
        left.semilogy(np.arange(1, len(top) + 1)[shown], top[shown], marker="o", ms=3, label=LABELS[name])
        blocks_top = result.methods[name].blocks_top
        if blocks_top is not None and len(blocks_top):
            values = np.asarray(blocks_top, np.float64)
            right.semilogy(np.arange(1, len(values) + 1)[values > 0], values[values > 0], marker="o", ms=3, label=LABELS[name])
    left.set_title("top eigenvalues, whole model", fontsize=9)
    left.set_xlabel("rank", fontsize=8)
    right.set_title("largest eigenvalue of the largest head slices", fontsize=9)
    right.set_xlabel("slice (by exact λ₁)", fontsize=8)
    left.legend(fontsize=7)
    return fig


def skipped(reason: str) -> Section:
    """The section of a run that did not compare the methods, with the reason."""
    return Section("method_comparison", TITLE, {"skipped": reason}, [f"Skipped: {reason}."])
