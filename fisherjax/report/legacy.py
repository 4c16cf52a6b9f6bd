"""INTERIM (removed when pipeline.py moves to report sections): the old report writer.

matplotlib (Agg backend) draws the figures; the report is Markdown with the numbers of
results.json and links to the figures.
"""

from __future__ import annotations

from pathlib import Path

def figure_canvas():
    """A pyplot module with the non-interactive Agg backend selected."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path, name: str) -> str:
    """Save under ``out/figures/name.png``; returns the relative path for the report."""
    path = out / "figures" / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    if fig.canvas.manager is not None:  # a pyplot figure: release it
        figure_canvas().close(fig)
    return f"figures/{name}.png"


def _fmt(x, digits=4):
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def write_report(results: dict, out: Path) -> Path:
    """``report.md``: model, per-task Phase 1 numbers, and each phase's headline and figures."""
    lines = ["# fisherjax report", ""]
    m = results["model"]
    lines += [
        f"Model: `{m['source']}` — {m['model_type']} ({m['family']}), {m['layers']} layers, "
        f"{m['heads']} heads / {m['kv_heads']} kv heads, head_dim {m['head_dim']}, {m['parameters']:,} parameters.",
        f"Created {results['created']} on {results['machine']['platform']} ({results['machine']['jax_backend']}), "
        f"{results.get('seconds', '?')} s.",
        "",
        "## Phase 1 — Fisher information",
        "",
        "| task | samples | skipped | tokens | loss / token | total group Fisher |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["fisher"].items():
        lines.append(
            f"| {name} | {r['samples']} | {r['skipped_samples']} | {r['tokens']} | {_fmt(r['loss_per_token'])} | {_fmt(r['total_fisher'])} |"
        )
    lines.append("")
    for section in results.values():
        if not isinstance(section, dict) or "report" not in section:
            continue
        lines += section["report"]
        lines.append("")
    lines += ["## Files", "", "- `results.json` — every number above", "- `group_fisher.npz` — keys `task|param_path|group_type`",
              "- `fisher_state/<task>/` — orbax checkpoint of each task's Fisher state"]
    for extra in ("qkov.npz", "conflicts.json"):
        if (out / extra).exists():
            lines.append(f"- `{extra}`")
    shown = "\n".join(lines)
    others = [f for f in sorted((out / "figures").glob("*.png")) if f"figures/{f.name}" not in shown]
    if others:
        lines += ["", "## More figures", ""] + [f"![{f.stem}](figures/{f.name})" for f in others]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
