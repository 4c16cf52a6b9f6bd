"""The seven phases end to end, from one :class:`AnalysisConfig` to an output directory.

Each phase is a function ``phase(ctx, out) -> Section``: it reads the immutable :class:`Context`
(model, tasks, batches, Phase 1 Fisher of every task), computes with the analysis modules,
writes its arrays under ``out`` (``group_fisher.npz``, the orbax Fisher states, ``qkov.npz``,
``conflicts.json``) and hands its results to :mod:`fisherjax.report`, which turns them into a
:class:`~fisherjax.report.Section` (``results.json`` section, figures, Markdown). Phases run in
phase order whatever order ``--phases`` names them in. :func:`analyze` writes everything into a
temporary directory next to the destination and moves it into place only when every phase has
succeeded, so a failed run never leaves a half-written output directory.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from fisherjax import backend, io, report
from fisherjax.analysis import conflicts, experiments, masks, qkov
from fisherjax.data import Batch, Task, batches, load_task
from fisherjax.errors import ConfigError, DataError
from fisherjax.fisher.collect import collect
from fisherjax.fisher.options import CollectOptions
from fisherjax.fisher.state import TaskFisher
from fisherjax.models import Model, load_pretrained
from fisherjax.report import conflicts as conflicts_report
from fisherjax.report import fisher as fisher_report
from fisherjax.report import importance as importance_report
from fisherjax.report import masks as masks_report
from fisherjax.report import natural as natural_report
from fisherjax.report import qkov as qkov_report
from fisherjax.settings import check


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    """Everything ``fisherjax analyze`` can be told; the command line's defaults are these.

    ``model`` / ``tasks`` default to the shipped demo model and its two tasks. The Phase 1 options
    are checked by :meth:`collect_options` (:class:`~fisherjax.fisher.options.CollectOptions`) and
    the QK-OV kernel by :class:`~fisherjax.analysis.qkov.KernelOptions`, once, when the config is
    made; the fields below only their own ranges.
    """

    out: Path = Path("fisherjax-out")
    model: Path | None = None
    tasks: tuple[tuple[str, Path], ...] = ()
    batch_size: int = 16
    max_length: int = 256
    max_samples: int | None = None
    fisher_type: str = "empirical"
    mode: str = "welford"
    sample_grads_dtype: str = "float32"
    diagonal: bool = True
    sparsities: tuple[float, ...] = (0.5, 0.7, 0.9)
    top_k: int = 20
    seed: int = 0
    allow_pickle: bool = False
    save_sample_grads: bool = False
    sample_grads_budget_gb: float = 8.0
    spill_dir: Path | None = None
    progress: bool = True
    phases: tuple[str, ...] = ("fisher", "importance", "masks", "conflicts", "qkov", "natural")
    qkov_contraction: str = "auto"

    def __post_init__(self):
        """Reject bad options before anything is loaded or computed (one line each, exit code 2)."""
        check(self.batch_size >= 1, f"batch size must be ≥ 1 (--batch-size), got {self.batch_size}")
        check(self.max_length >= 2, f"max length must be ≥ 2 tokens (--max-length), got {self.max_length}")
        check(self.max_samples is None or self.max_samples >= 1, f"max samples must be ≥ 1 (--max-samples), got {self.max_samples}")
        check(self.top_k >= 0, f"top-k must be ≥ 0 (--top-k), got {self.top_k}")
        check(self.sample_grads_budget_gb > 0,
              f"sample-gradient budget must be > 0 GB (--sample-grads-budget-gb), got {self.sample_grads_budget_gb}")
        check(self.spill_dir is None or not Path(self.spill_dir).exists() or Path(self.spill_dir).is_dir(),
              f"{self.spill_dir}: --spill-dir exists and is not a directory")
        for s in self.sparsities:
            check(0.0 <= s <= 1.0, f"sparsity must be in [0, 1] (--sparsity), got {s}")
        unknown = [p for p in self.phases if p not in PHASES]
        check(not unknown, f"unknown phase(s) {unknown} (--phases); available: {', '.join(PHASES)}")
        self.collect_options()
        self.kernel_options()

    def collect_options(self) -> CollectOptions:
        """The Phase 1 options of this run (every task keeps its attention gradients)."""
        return CollectOptions(
            mode=self.mode,
            fisher_type=self.fisher_type,
            keep_sample_grads=True,
            sample_grads_dtype=self.sample_grads_dtype,
            sample_grads_budget_bytes=self.sample_grads_budget_gb * 1e9,
            diagonal=self.diagonal,
        )

    def kernel_options(self):
        """The QK-OV kernel options of this run."""
        return qkov.KernelOptions(contraction=self.qkov_contraction)

    def phase_order(self) -> tuple[str, ...]:
        """The phases to run, Phase 1 first and the rest in phase order."""
        return tuple(p for p in PHASES if p == "fisher" or p in self.phases)


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


# ---- phases: compute, write arrays, hand the results to the report ----------------------------


def phase_fisher(ctx: Context, out: Path) -> report.Section:
    """Phase 1: ``group_fisher.npz`` (keys ``task|param_path|group_type``) and the orbax states."""
    arrays = {}
    for name, fisher in ctx.fishers.items():
        arrays.update(fisher.flat_groups())
        state = fisher if ctx.config.save_sample_grads else dataclasses.replace(fisher, sample_grads=None)
        io.save_task_fisher(state, out / "fisher_state" / name)
    np.savez(out / "group_fisher.npz", **arrays)
    return fisher_report.section(ctx.fishers)


def phase_importance(ctx: Context, out: Path) -> report.Section:
    """Phase 2: group and head importance per task (with bootstrap intervals of the heads), and
    how the tasks' rankings compare."""
    return importance_report.section(ctx.fishers, ctx.model.layout, k=ctx.config.top_k, seed=ctx.config.seed)


def phase_masks(ctx: Context, out: Path) -> report.Section:
    """Phases 3 and 4: pruning masks at each sparsity, their overlap between tasks, merge advice,
    and each task's loss after pruning half of each layer's heads by Fisher versus at random."""
    layout, config = ctx.model.layout, ctx.config
    with_diagonal = all(f.diagonal for f in ctx.fishers.values())
    parameter_masks = {n: masks.unstructured_masks(f, layout, config.sparsities) for n, f in ctx.fishers.items()} if with_diagonal else None
    head_masks = {n: [masks.structured_mask(f, layout, s, unit="head") for s in config.sparsities] for n, f in ctx.fishers.items()}
    experiment = experiments.head_pruning_experiment(
        ctx.model, ctx.model.params, ctx.batches, ctx.fishers, sparsity=0.5, n_random=10, seed=config.seed, scope="layer"
    )
    return masks_report.section(
        ctx.fishers, layout, sparsities=config.sparsities, head_masks=head_masks, parameter_masks=parameter_masks, experiment=experiment
    )


def phase_conflicts(ctx: Context, out: Path) -> report.Section:
    """Phase 5: sample-level conflicts between every pair of tasks, per attention head.

    Fisher-whitened cosines of all cross-task sample pairs, tested per (block, layer, head) group
    against each task's own within-task cosines (BH FDR); writes ``conflicts.json``.
    """
    layout, config = ctx.model.layout, ctx.config
    reports = {}
    for name_a, name_b in itertools.combinations(ctx.fishers, 2):
        reports[name_a, name_b] = conflicts.detect(
            ctx.fishers[name_a], ctx.fishers[name_b], layout=layout, scope="groups", top_k=config.top_k, names=(name_a, name_b),
            progress=config.progress,
        )
    section = conflicts_report.section(reports)
    (out / "conflicts.json").write_text(json.dumps(report.jsonable(section.json), indent=2))
    return section


def phase_qkov(ctx: Context, out: Path) -> report.Section:
    """Phase 6: QK-OV interference of each task on each other task, per block, layer and head.

    For every ordered pair (A, B): the heatmap with Î from A, bootstrap intervals of its layer ×
    head averages, and a permutation test of A-vs-B against A-vs-A' (A split in two halves, BH
    FDR across cells). A task whose Fisher would rest on fewer than ``min_fisher_samples``
    samples (or whose fit half would) is skipped with the reason. Writes ``qkov.npz`` (keys
    ``A|B|array``).
    """
    layout, config = ctx.model.layout, ctx.config
    score, kernel = qkov.ScoreOptions(), config.kernel_options()
    needed = score.min_fisher_samples
    arrays, summaries, results = {}, {}, {}
    for name_a, name_b in itertools.permutations(ctx.fishers, 2):
        fa, fb = ctx.fishers[name_a], ctx.fishers[name_b]
        n_a = len(fa.sample_grads)
        if n_a < needed:  # a quick run on a few samples still gets the other phases
            summaries[name_a, name_b] = {"skipped": f"{name_a} has {n_a} samples with active tokens; its Fisher needs at least {needed}"}
            continue
        result = qkov.heatmap(fa, fb, layout, score=score, kernel=kernel, progress=config.progress)
        arrays.update({f"{name_a}|{name_b}|{k}": v for k, v in qkov.to_arrays(result).items()})
        summary = qkov_report.summary(result, top_k=config.top_k)
        summary["kernel"] = dataclasses.asdict(kernel)
        summary["bootstrap"] = qkov_report.bootstrap_summary(qkov.bootstrap_layer_head_avg(result, n_bootstrap=200, seed=config.seed))
        fit, heldout = qkov.heldout_split(fa, 0.5, seed=config.seed)
        if len(fit) < needed:
            summary["permutation_test"] = {"skipped": f"{name_a} has {len(fit) + len(heldout)} samples with active tokens; its fit half "
                                                      f"({len(fit)}) needs at least {needed} for a stable Fisher"}
        else:
            test = qkov.permutation_test(fit, fb, heldout, layout, n_permutations=1000, seed=config.seed, score=score, kernel=kernel,
                                         progress=config.progress)
            summary["permutation_test"] = qkov_report.permutation_summary(test, result)
        summaries[name_a, name_b], results[name_a, name_b] = summary, result
    np.savez(out / "qkov.npz", **arrays)
    return qkov_report.section(summaries, results)


PHASES: dict[str, Callable[[Context, Path], report.Section]] = {
    "fisher": phase_fisher,
    "importance": phase_importance,
    "masks": phase_masks,
    "conflicts": phase_conflicts,
    "qkov": phase_qkov,
    "natural": lambda ctx, out: natural_report.section(ctx.fishers, ctx.model.layout),
}
"""Phase name → phase function, in phase order (1, 2, 3–4, 5, 6, 7)."""


# ---- driver ------------------------------------------------------------------------------------


def collect_all(model: Model, tasks: dict[str, Task], config: AnalysisConfig) -> tuple[dict, dict]:
    """Batches and Phase 1 Fisher (with attention gradients kept) of every task."""
    all_batches = {
        name: list(batches(task, config.batch_size, pad_id=model.config.pad_token_id or 0, vocab_size=model.config.vocab_size))
        for name, task in tasks.items()
    }
    options = config.collect_options()
    fishers = {}
    for name in tasks:
        fishers[name] = collect(
            model,
            all_batches[name],
            task=name,
            options=options,
            spill_dir=None if config.spill_dir is None else Path(config.spill_dir) / name,
            key=jax.random.key(config.seed),
            progress=config.progress,
        )
    return all_batches, fishers


def analyze(config: AnalysisConfig) -> dict:
    """Run the configured phases and write the output directory; returns results.json's content."""
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
        header = {
            "fisherjax": _version(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "jax_backend": backend.platform()},
            "config": dataclasses.asdict(config),
            "model": model_info(model),
            "tasks": {name: {"file": task.source, "samples": len(task)} for name, task in tasks.items()},
        }
        sections = [PHASES[phase](ctx, staging) for phase in config.phase_order()]
        header["seconds"] = round(time.time() - started, 1)
        heading = fisher_report.heading(header["model"], header["created"], header["machine"], header["seconds"])
        results = report.write(staging, header, sections, heading=heading)
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


def parse_task_args(values: Sequence[str]) -> tuple[tuple[str, Path], ...]:
    """``["math=tasks/math.jsonl", ...]`` → ``(("math", Path(...)), ...)``."""
    out = []
    for v in values:
        name, sep, file = v.partition("=")
        if not sep or not name or not file:
            raise DataError(f"--task expects NAME=FILE, got {v!r}")
        out.append((name, Path(file)))
    return tuple(out)


__all__ = ["PHASES", "AnalysisConfig", "Context", "analyze", "collect_all", "load_inputs", "model_info", "parse_task_args"]
