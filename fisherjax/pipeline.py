"""The seven phases end to end, from one :class:`AnalysisConfig` to an output directory.

Each phase is a function ``phase(ctx, out) -> dict``: it reads the immutable :class:`Context`
(model, tasks, batches, Phase 1 Fisher of every task), writes its files under ``out`` and returns
its section of ``results.json``. :func:`analyze` runs them into a temporary directory next to the
destination and moves it into place only when every phase has succeeded, so a failed run never
leaves a half-written output directory.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from fisherjax import io
from fisherjax.analysis.qkov import CONTRACTIONS as QKOV_CONTRACTIONS
from fisherjax.data import Batch, Task, batches, load_task
from fisherjax.errors import ConfigError, DataError, FisherjaxError
from fisherjax.fisher.collect import collect
from fisherjax.fisher.options import FISHER_TYPES, MODES, STORAGE_DTYPES
from fisherjax.fisher.state import TaskFisher
from fisherjax.models import Model, load_pretrained


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    """Everything ``fisherjax analyze`` can be told.

    ``model`` / ``tasks`` default to the shipped demo model and its two tasks.
    """

    out: Path = Path("fisherjax-out")
    model: Path | None = None
    tasks: tuple[tuple[str, Path], ...] = ()
    batch_size: int = 16
    max_length: int = 256
    max_samples: int | None = None
    fisher_type: str = "empirical"
    mode: str = "welford"
    contribution_dtype: str = "float32"
    diagonal: bool = True
    sparsities: tuple[float, ...] = (0.5, 0.7, 0.9)
    top_k: int = 20
    seed: int = 0
    allow_pickle: bool = False
    save_contributions: bool = False
    contribution_budget_gb: float = 8.0
    spill_dir: Path | None = None
    progress: bool = True
    phases: tuple[str, ...] = ("fisher", "importance", "masks", "natural", "conflicts", "qkov")
    qkov_contraction: str = "auto"

    def __post_init__(self):
        """Reject bad options before anything is loaded or computed (one line each, exit code 2)."""
        checks = [
            (self.batch_size >= 1, f"batch size must be ≥ 1 (--batch-size), got {self.batch_size}"),
            (self.max_length >= 2, f"max length must be ≥ 2 tokens (--max-length), got {self.max_length}"),
            (self.max_samples is None or self.max_samples >= 1, f"max samples must be ≥ 1 (--max-samples), got {self.max_samples}"),
            (self.fisher_type in FISHER_TYPES, f"fisher type must be one of {FISHER_TYPES}, got {self.fisher_type!r}"),
            (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (self.contribution_dtype in STORAGE_DTYPES, f"contribution dtype must be one of {tuple(STORAGE_DTYPES)}, got {self.contribution_dtype!r}"),
            (self.top_k >= 0, f"top-k must be ≥ 0 (--top-k), got {self.top_k}"),
            (self.contribution_budget_gb > 0, f"contribution budget must be > 0 GB (--contribution-budget-gb), got {self.contribution_budget_gb}"),
            (self.spill_dir is None or not Path(self.spill_dir).exists() or Path(self.spill_dir).is_dir(),
             f"{self.spill_dir}: --spill-dir exists and is not a directory"),
        ]
        checks += [(0.0 <= s <= 1.0, f"sparsity must be in [0, 1] (--sparsity), got {s}") for s in self.sparsities]
        checks.append((self.qkov_contraction in QKOV_CONTRACTIONS,
                       f"qkov contraction must be one of {QKOV_CONTRACTIONS} (--qkov-contraction), got {self.qkov_contraction!r}"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class Context:
    """What every phase reads: the run's config, model, tasks, their batches and Phase 1 Fisher."""

    config: AnalysisConfig
    model: Model
    tasks: dict[str, Task]
    batches: dict[str, list[Batch]]
    fishers: dict[str, TaskFisher]


def load_inputs(config: AnalysisConfig) -> tuple[Model, dict[str, Task]]:
    """The model and tasks named by the config (the demo ones by default)."""
    if config.model is None:
        from fisherjax import demo

        model_dir = demo.checkpoint_dir()
        task_files = tuple(demo.task_files().items()) if not config.tasks else config.tasks
    else:
        model_dir, task_files = Path(config.model), config.tasks
    if not task_files:
        raise DataError("no tasks given: pass --task NAME=FILE (at least one)")
    names = [n for n, _ in task_files]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"task names must be unique, repeated: {', '.join(duplicates)}")
    model = load_pretrained(model_dir, allow_pickle=config.allow_pickle)
    if model.tokenizer is None:
        raise DataError(f"{model_dir}: the checkpoint has no tokenizer files, so text tasks cannot be encoded")
    tasks = {}
    for name, file in task_files:
        task = load_task(file, model.tokenizer, name=name, max_length=config.max_length)
        if config.max_samples is not None:
            task = dataclasses.replace(task, examples=task.examples[: config.max_samples])
        tasks[name] = task
    return model, tasks


def model_info(model: Model) -> dict:
    """Architecture summary (also printed by ``fisherjax info``)."""
    cfg = model.config
    by_role: dict[str, int] = {}
    for spec in model.layout.specs.values():
        by_role[spec.role.value] = by_role.get(spec.role.value, 0) + int(np.prod(spec.shape))
    return {
        "source": model.source,
        "model_type": cfg.model_type,
        "family": cfg.family,
        "layers": cfg.num_layers,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "tied_embeddings": cfg.tie_word_embeddings,
        "rope": None if cfg.rope is None else {"theta": cfg.rope.theta, "type": cfg.rope.rope_type, "rotary_dim": cfg.rope.rotary_dim},
        "parameters": model.num_params,
        "parameters_by_role": by_role,
    }


# ---- phases ------------------------------------------------------------------------------------


def phase_fisher(ctx: Context, out: Path) -> dict:
    """Phase 1 outputs: ``group_fisher.npz`` (keys ``task|param_path|group_type``) and the orbax state."""
    arrays, section = {}, {}
    for name, fisher in ctx.fishers.items():
        arrays.update(fisher.flat_groups())
        state = fisher if ctx.config.save_contributions else dataclasses.replace(fisher, sample_grads=None)
        io.save_task_fisher(state, out / "fisher_state" / name)
        section[name] = {
            "samples": fisher.n_samples,
            "skipped_samples": fisher.n_skipped,
            "tokens": fisher.n_tokens,
            "loss_per_token": fisher.loss_per_token,
            "fisher_type": fisher.fisher_type,
            "mode": fisher.mode,
            "total_fisher": float(sum(float(np.sum(v)) for groups in fisher.group_fisher.values() for v in groups.values())),
        }
    np.savez(out / "group_fisher.npz", **arrays)
    return section


def _top_heads_lines(section: dict, k: int = 5) -> list[str]:
    lines = ["| task | layer | head | kv head | share of model Fisher |", "|---|---|---|---|---|"]
    for name, task in section["tasks"].items():
        for row in task["heads"]["top"][:k]:
            lines.append(f"| {name} | {row['layer']} | {row['head']} | {row['kv_head']} | {row['share']:.3f} |")
    return lines


def phase_importance(ctx: Context, out: Path) -> dict:
    """Phase 2: group and head importance per task, and how the tasks' rankings compare."""
    from fisherjax.analysis import importance
    from fisherjax.report import save_figure

    layout = ctx.model.layout
    section = importance.summarize(ctx.fishers, layout, k=ctx.config.top_k)
    heads = {name: importance.head_importance(f, layout) for name, f in ctx.fishers.items()}
    figure = save_figure(importance.plot_head_importance(heads), out, "importance_heads")
    lines = ["## Phase 2 — Importance", "", f"![head importance]({figure})", "", "Most important heads (combined Q/K/V/O Fisher):", ""]
    lines += _top_heads_lines(section)
    for pair, c in section["comparisons"].items():
        lines += ["", f"Rank correlation of group importance, {pair.replace('|', ' vs ')}: Spearman "
                  f"{c['spearman']:.3f} over {c['n_groups']} groups (attention heads only: {c['attention_spearman']:.3f})."]
    section["report"] = lines
    section["figures"] = [figure]
    return section


def phase_masks(ctx: Context, out: Path) -> dict:
    """Phases 3 and 4: pruning masks at each sparsity, their overlap between tasks, merge advice,
    and each task's loss after pruning half of the heads by Fisher versus at random."""
    from fisherjax.analysis import masks, overlap
    from fisherjax.report import save_figure

    layout, config = ctx.model.layout, ctx.config
    with_diagonal = all(f.diagonal for f in ctx.fishers.values())
    param_masks = {name: masks.unstructured_masks(f, layout, config.sparsities) for name, f in ctx.fishers.items()} if with_diagonal else None
    section = {"masks": masks.summarize(ctx.fishers, layout, sparsities=config.sparsities, parameter_masks=param_masks)}
    head_masks = {name: [masks.structured_mask(f, layout, s, unit="head") for s in config.sparsities] for name, f in ctx.fishers.items()}
    section["overlap"] = {"head": overlap.summarize(head_masks, layout)}
    figures = []
    lines = ["## Phases 3–4 — Pruning masks and their overlap", ""]
    if param_masks is not None:
        section["overlap"]["parameter"] = overlap.summarize(param_masks, layout)
    for level, summary in section["overlap"].items():
        for pair, overlaps in summary["pairs"].items():
            lines.append(f"**{pair.replace('|', ' vs ')}, {level} masks**")
            lines.append("")
            for o in overlaps:
                lines.append(f"- sparsity {o['sparsity']:g}: Jaccard {o['jaccard']:.3f} — {o['advice']['text']}")
            lines.append("")
    if len(ctx.fishers) >= 2:
        names = list(ctx.fishers)
        pair_overlaps = [
            overlap.mask_overlap(a, b, layout, names=(names[0], names[1]))
            for a, b in zip(head_masks[names[0]], head_masks[names[1]], strict=True)
        ]
        figures.append(save_figure(overlap.plot_overlap(pair_overlaps), out, "overlap_heads"))
        lines += [f"![head-mask overlap]({figures[-1]})", ""]
    experiment = masks.head_pruning_experiment(
        ctx.model, ctx.model.params, ctx.batches, ctx.fishers, sparsity=0.5, n_random=10, seed=config.seed, scope="layer"
    )
    section["head_pruning"] = experiment
    lines += ["Loss per token after pruning half of each layer's heads (Fisher-guided vs 10 random draws):", "",
              "| task | before | Fisher mask | random mean ± sd |", "|---|---|---|---|"]
    for name, r in experiment["tasks"].items():
        lines.append(f"| {name} | {r['loss_before']:.4f} | {r['loss_fisher']:.4f} | {r['loss_random_mean']:.4f} ± {r['loss_random_sd']:.4f} |")
    section["report"] = lines
    section["figures"] = figures
    return section


def phase_natural(ctx: Context, out: Path) -> dict:
    """Phase 7: per-parameter Fisher statistics behind scale_by_fisher / EWC, and merge weights."""
    from fisherjax.analysis import natural

    section = natural.summarize(ctx.fishers, ctx.model.layout)
    lines = ["## Phase 7 — Fisher-scaled updates and merging", ""]
    for name, t in section["tasks"].items():
        lines.append(f"- {name}: median per-parameter Fisher {t['quantiles']['50']:.3g}, "
                     f"{100 * t['fraction_below_eps']:.1f} % of parameters below ε = {t['eps']:g}")
    section["report"] = lines
    return section


def phase_conflicts(ctx: Context, out: Path) -> dict:
    """Phase 5: sample-level conflicts between every pair of tasks, per attention head.

    Fisher-whitened cosines of all cross-task sample pairs, tested per (block, layer, head)
    group against each task's own within-task cosines (BH FDR); writes ``conflicts.json`` and a
    figure per pair.
    """
    import itertools

    from fisherjax.analysis import conflicts
    from fisherjax.report import save_figure

    layout, section, figures = ctx.model.layout, {"pairs": {}}, []
    lines = ["## Phase 5 — Sample conflicts", ""]
    for name_a, name_b in itertools.combinations(ctx.fishers, 2):
        report = conflicts.detect(
            ctx.fishers[name_a], ctx.fishers[name_b], layout=layout, scope="groups", top_k=ctx.config.top_k, names=(name_a, name_b)
        )
        summary = conflicts.summarize(report)
        section["pairs"][f"{name_a}|{name_b}"] = summary
        figures.append(save_figure(conflicts.plot_conflicts(report), out, f"conflicts_{name_a}_{name_b}"))
        n_sig = int(np.sum(report.group_significant)) if report.group_significant is not None else int(np.sum(report.significant))
        lines += [f"**{name_a} vs {name_b}**: {report.cosines.size} sample pairs, {n_sig} significant (pair, head) "
                  f"conflicts at FDR {report.settings.get('alpha', 0.05)}; median cross-task cosine "
                  f"{float(np.median(report.cosines)):.3f}.", ""]
        for pair in report.top_pairs[:5]:
            lines.append(f"- {name_a} sample {pair.sample_a} vs {name_b} sample {pair.sample_b}: " + _pair_text(pair))
        advice = report.recommendations
        for sample in advice.get("samples", [])[:5]:
            side = name_a if sample.get("task") == "a" else name_b
            lines.append(f"- {sample.get('action', 'review')} {side} sample {sample.get('sample_id')}: "
                         f"in {sample.get('conflicts')} significant conflicts (mean cosine {sample.get('mean_conflict_cosine', float('nan')):.3f})")
        for hot in advice.get("hotspots", []):
            lines.append(f"- hotspot {hot['group']}: {100 * hot['share']:.0f} % of the conflict pull")
        lines += ["", f"![conflicts {name_a} vs {name_b}]({figures[-1]})", ""]
    (out / "conflicts.json").write_text(json.dumps(_jsonable(section), indent=2))
    section["report"] = lines
    section["figures"] = figures
    return section


def _pair_text(pair) -> str:
    groups = ", ".join(f"{label} ({contribution:+.3f})" for label, contribution, *_ in pair.groups[:3])
    return f"cosine {pair.cosine:+.3f}, effect size {pair.effect_size:.3f}, q {pair.qvalue:.3g}; most of it from {groups}"


def _qkov_permutation_summary(result, fa, fb, layout, name_a: str, name_b: str, seed: int, needed: int, options) -> dict:
    """A-vs-B against A-vs-A' (A split in halves) as JSON, or why it was skipped.

    The fit half carries the Fisher, so a task with fewer than ``2 × needed`` samples
    (``min_fisher_samples``) cannot be tested; its heatmap is still reported.
    """
    from fisherjax.analysis import qkov

    fit, heldout = qkov.heldout_split(fa, 0.5, seed=seed)
    if len(fit) < needed:
        return {"skipped": f"{name_a} has {len(fit) + len(heldout)} samples with active tokens; its fit half "
                           f"({len(fit)}) needs at least {needed} for a stable Fisher"}
    test = qkov.permutation_test(fit, fb, heldout, layout, n_permutations=1000, seed=seed, options=options)
    return {
        "null": f"{name_b} samples and held-out {name_a} samples are exchangeable partners of {name_a}'s samples",
        "observed": test.observed.tolist(),
        "pvalues": test.pvalues.tolist(),
        "qvalues": test.qvalues.tolist(),
        "significant_cells": [
            {"block": result.blocks[b], "layer": int(layer), "head": int(h), "q": float(test.qvalues[b, layer, h])}
            for b, layer, h in np.argwhere(test.significant)
        ],
    }


def phase_qkov(ctx: Context, out: Path) -> dict:
    """Phase 6: QK-OV interference of each task on each other task, per block, layer and head.

    For every ordered pair (A, B): the heatmap with Î from A, bootstrap intervals of its
    layer × head averages, and a permutation test of A-vs-B against A-vs-A' (A split in two
    halves, BH FDR across cells). Writes ``qkov.npz`` (keys ``A|B|array``) and one figure per
    block and pair.
    """
    import itertools

    from fisherjax.analysis import qkov
    from fisherjax.report import save_figure

    layout, seed = ctx.model.layout, ctx.config.seed
    arrays, section, figures = {}, {"pairs": {}}, []
    lines = ["## Phase 6 — QK-OV interference", ""]
    options = qkov.QKOVOptions(top_k=ctx.config.top_k, contraction=ctx.config.qkov_contraction)
    needed = options.min_fisher_samples
    for name_a, name_b in itertools.permutations(ctx.fishers, 2):
        fa, fb = ctx.fishers[name_a], ctx.fishers[name_b]
        if len(fa.sample_grads) < needed:  # a quick run on a few samples still gets the other phases
            reason = f"{name_a} has {len(fa.sample_grads)} samples with active tokens; its Fisher needs at least {needed}"
            section["pairs"][f"{name_a}|{name_b}"] = {"skipped": reason}
            lines += [f"**{name_b} → {name_a}**: skipped: {reason}.", ""]
            continue
        result = qkov.heatmap(fa, fb, layout, options=options)
        arrays.update({f"{name_a}|{name_b}|{k}": v for k, v in qkov.to_arrays(result).items()})
        summary = qkov.summarize(result)
        interval = qkov.bootstrap_layer_head_avg(result, n_bootstrap=200, seed=seed)
        summary["bootstrap"] = {"level": interval.level, "low": interval.low.tolist(), "high": interval.high.tolist()}
        summary["permutation_test"] = _qkov_permutation_summary(result, fa, fb, layout, name_a, name_b, seed, needed, options)
        section["pairs"][f"{name_a}|{name_b}"] = summary
        for block, fig in qkov.plot_heatmaps(result).items():
            figures.append(save_figure(fig, out, f"qkov_{name_b}_on_{name_a}_{block}"))
        top = summary["top_conflicts"][:5] if "top_conflicts" in summary else []
        test = summary["permutation_test"]
        verdict = (f"permutation test skipped: {test['skipped']}." if "skipped" in test else
                   f"{len(test['significant_cells'])} (block, layer, head) cells interfere more than {name_a}'s own "
                   "held-out half (BH q ≤ 0.05).")
        lines += [f"**{name_b} → {name_a}** ({len(result.sample_ids_a)} × {len(result.sample_ids_b)} samples): {verdict}", ""]
        if top:
            lines += ["| block | layer | head | kv head | sample A | sample B | score |", "|---|---|---|---|---|---|---|"]
            lines += [f"| {t['block']} | {t['layer']} | {t['head']} | {t['kv_head']} | {t['sample_a']} | {t['sample_b']} | {t['score']:.4g} |" for t in top]
            lines.append("")
        lines += [f"![{name_b} → {name_a} {b}]({f})" for f, b in zip(figures[-4:], result.blocks)] + [""]
    np.savez(out / "qkov.npz", **arrays)
    section["report"] = lines
    section["figures"] = figures
    return section


PHASES: dict[str, Callable[[Context, Path], dict]] = {
    "fisher": phase_fisher,
    "importance": phase_importance,
    "masks": phase_masks,
    "natural": phase_natural,
    "conflicts": phase_conflicts,
    "qkov": phase_qkov,
}
"""Phase name → phase function, in the order they run."""


# ---- driver ------------------------------------------------------------------------------------


def collect_all(model: Model, tasks: dict[str, Task], config: AnalysisConfig) -> tuple[dict, dict]:
    """Batches and Phase 1 Fisher (with attention contributions) of every task."""
    all_batches = {
        name: list(batches(task, config.batch_size, pad_id=model.config.pad_token_id or 0, vocab_size=model.config.vocab_size))
        for name, task in tasks.items()
    }
    fishers = {}
    for name in tasks:
        fishers[name] = collect(
            model,
            all_batches[name],
            task=name,
            mode=config.mode,
            keep_sample_grads=True,
            sample_grads_dtype=config.contribution_dtype,
            sample_grads_budget_bytes=config.contribution_budget_gb * 1e9,
            spill_dir=None if config.spill_dir is None else Path(config.spill_dir) / name,
            diagonal=config.diagonal,
            fisher_type=config.fisher_type,
            key=jax.random.key(config.seed),
            progress=config.progress,
            total=len(all_batches[name]),
        )
    return all_batches, fishers


def analyze(config: AnalysisConfig) -> dict:
    """Run the configured phases and write the output directory; returns results.json's content."""
    unknown = [p for p in config.phases if p not in PHASES]
    if unknown:
        raise FisherjaxError(f"unknown phase(s) {unknown}; available: {', '.join(PHASES)}")
    started = time.time()
    destination = Path(config.out).absolute()
    _check_destination(destination)
    model, tasks = load_inputs(config)
    all_batches, fishers = collect_all(model, tasks, config)
    ctx = Context(config, model, tasks, all_batches, fishers)

    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        (staging / "figures").mkdir()
        results = {
            "fisherjax": _version(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "jax_backend": jax.default_backend()},
            "config": _jsonable(dataclasses.asdict(config)),
            "model": model_info(model),
            "tasks": {name: {"file": task.source, "samples": len(task)} for name, task in tasks.items()},
        }
        for phase in dict.fromkeys(("fisher", *config.phases)):
            results[phase] = PHASES[phase](ctx, staging)
        results["seconds"] = round(time.time() - started, 1)
        (staging / "results.json").write_text(json.dumps(_jsonable(results), indent=2))
        from fisherjax import report

        report.write_report(results, staging)
        _replace_directory(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return results


def _check_destination(destination: Path) -> None:
    """The output directory may be new, empty, or an earlier fisherjax output (it is replaced whole,
    so anything else — a file, a project folder — is refused rather than deleted)."""
    if not destination.exists():
        return
    if not destination.is_dir():
        raise ConfigError(f"{destination}: --out exists and is not a directory")
    if any(destination.iterdir()) and not (destination / "results.json").is_file():
        raise ConfigError(
            f"{destination}: --out is a non-empty directory that is not a fisherjax output (no results.json); "
            "it would be replaced whole, so choose a new directory"
        )


def _replace_directory(staging: Path, destination: Path) -> None:
    """Move the finished output into place; an older output is removed only after that."""
    old = None
    if destination.exists():
        old = destination.with_name(f".{destination.name}.old-{time.time_ns()}")
        destination.rename(old)
    staging.rename(destination)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _version() -> str:
    from fisherjax import __version__

    return __version__


def _jsonable(value):
    """Convert numpy scalars/arrays, paths and tuples to plain JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def parse_task_args(values: Sequence[str]) -> tuple[tuple[str, Path], ...]:
    """``["math=tasks/math.jsonl", ...]`` → ``(("math", Path(...)), ...)``."""
    out = []
    for v in values:
        name, sep, file = v.partition("=")
        if not sep or not name or not file:
            raise DataError(f"--task expects NAME=FILE, got {v!r}")
        out.append((name, Path(file)))
    return tuple(out)
