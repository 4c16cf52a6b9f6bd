"""The seven phases end to end, from one :class:`AnalysisConfig` to an output directory.

Each phase is a function ``phase(ctx, out) -> Section``: it reads the immutable :class:`Context`
(model, tasks, batches, Phase 1 Fisher of every task), computes with the analysis modules,
writes its arrays under ``out`` (``group_fisher.npz``, the orbax Fisher states, ``qkov.npz``,
``conflicts.json``, ``heads.json``) and hands its results to :mod:`fisherjax.report`, which turns them into a
:class:`~fisherjax.report.Section` (``results.json`` section, figures, Markdown). Phases run in
phase order whatever order ``--phases`` names them in. :func:`analyze` writes everything into a
temporary directory next to the destination and moves it into place only when every phase has
succeeded, so a failed run never leaves a half-written output directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import itertools
import json
import math
import os
import platform
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from fisherjax import allocator, backend, compilation_cache, heads, host_memory, io, outdir, report, sharding, telemetry, work
from fisherjax.analysis import conflicts, experiments, importance, masks, qkov
from fisherjax.curvature import compare, kfac, lanczos
from fisherjax.data import DEFAULT_BUCKETS, Batch, MissingTokenizer, Task, batches, check_targets, load_task, run_buckets
from fisherjax.errors import ConfigError, DataError, disk_errno, disk_error, one_line, out_of_memory
from fisherjax.fisher.collect import check_kept_budget, collect, kept_bytes, seen_ids, step_shapes
from fisherjax.fisher.step import step_memory
from fisherjax.fisher.groups import group_sizes
from fisherjax.fisher.factored import FactoredGrads, smaller_as_factors
from fisherjax.fisher.options import SAMPLE_GRADS_FORMS, CollectOptions, attention_paths
from fisherjax.fisher.shares import join_shares
from fisherjax.fisher.state import TaskFisher
from fisherjax.models import Model, load_pretrained
from fisherjax.report import conflicts as conflicts_report
from fisherjax.report import curvature as curvature_report
from fisherjax.report import fisher as fisher_report
from fisherjax.report import heads as heads_report
from fisherjax.report import importance as importance_report
from fisherjax.report import masks as masks_report
from fisherjax.report import natural as natural_report
from fisherjax.report import qkov as qkov_report
from fisherjax.report import timing as timing_report
from fisherjax.settings import check, check_choice


def default_storage(variant: str) -> str:
    """The kept gradients' storage dtype where ``--sample-grads-dtype`` is not given: bfloat16 for
    the unsigned variants (within 1e-2 of float32 storage), float32 for the signed ones
    (:data:`~fisherjax.analysis.qkov.SIGNED_VARIANTS`). A signed score sums ``g_i · g_j`` terms of
    either sign, so bfloat16's relative rounding of each comes back multiplied by the cancellation:
    with kept token factors the signed math → copy heatmap of the demo moved by 1.1e-2 as a whole
    (forty-third session). With a curvature (``kfac``) it is worse: the damping can sit far below
    the factors' spectrum, and the rounding puts components into task A's directions of near-zero
    curvature that ``1/λ`` then magnifies, up to 124 times a slice's norm (forty-second session)."""
    return "float32" if variant in qkov.SIGNED_VARIANTS else "bfloat16"


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
    sample_grads_dtype: str | None = None  # None: default_storage(qkov_variant), resolved when the config is made
    sample_grads_form: str = "auto"
    diagonal: bool = True
    diagonal_variance: bool = False
    sparsities: tuple[float, ...] = (0.5, 0.7, 0.9)
    top_k: int = 20
    seed: int = 0
    allow_pickle: bool = False
    tokenizer: Path | None = None
    save_sample_grads: bool = False
    sample_grads_budget_gb: float = 8.0
    spill_dir: Path | None = None
    progress: bool = True
    phases: tuple[str, ...] = ("fisher", "curvature", "heads", "importance", "masks", "conflicts", "qkov", "natural")
    qkov_contraction: str = "auto"
    qkov_variant: str = qkov.ScoreOptions.variant
    qkov_fisher_pool: str = qkov.ScoreOptions.fisher_pool
    qkov_normalize_gj: str = qkov.ScoreOptions.normalize_gj
    qkov_aggregate: str = qkov.ScoreOptions.aggregate
    qkov_ridge_rel: float = qkov.ScoreOptions.ridge_lambda_rel
    conflict_scope: str = "auto"
    conflict_alpha: float = conflicts.ConflictOptions.alpha
    pruning_samples: int = experiments.DEFAULT_SAMPLES
    overwrite: bool = False
    truncate: bool = False
    devices: int | None = None
    curvature: bool = False
    curvature_samples: int = 32
    curvature_k: int = 10
    head_samples: int = 32
    probe_tokens: str | None = None
    head_thresholds: tuple[tuple[str, float], ...] = ()
    probe_length: int | None = None
    ablation_heads: int = 16
    checkpoint_dir: Path | None = None
    resume: bool = False
    checkpoint_every: int = CollectOptions.checkpoint_every
    mask_units: tuple[str, ...] = ("head", "kv_head", "neuron")
    mask_scope: str = "global"

    def __post_init__(self):
        """Reject bad options before anything is loaded or computed (one line each, exit code 2);
        an unset ``sample_grads_dtype`` becomes :func:`default_storage` of the QK-OV variant."""
        if self.sample_grads_dtype is None:
            object.__setattr__(self, "sample_grads_dtype", default_storage(self.qkov_variant))
        check(self.batch_size >= 1, f"batch size must be ≥ 1 (--batch-size), got {self.batch_size}")
        check(self.max_length >= 2, f"max length must be ≥ 2 tokens (--max-length), got {self.max_length}")
        check(self.max_samples is None or self.max_samples >= 1, f"max samples must be ≥ 1 (--max-samples), got {self.max_samples}")
        check(self.devices is None or self.devices >= 1, f"devices must be ≥ 1 (--devices), got {self.devices}")
        check(self.top_k >= 0, f"top-k must be ≥ 0 (--top-k), got {self.top_k}")
        check(self.curvature_samples >= 2, f"curvature samples must be ≥ 2 (--curvature-samples), got {self.curvature_samples}")
        check(self.curvature_k >= 1, f"curvature k must be ≥ 1 (--curvature-k), got {self.curvature_k}")
        check(self.head_samples >= 1, f"head samples must be ≥ 1 (--head-samples), got {self.head_samples}")
        check(self.ablation_heads >= 0, f"ablation heads must be ≥ 0 (--ablation-heads), got {self.ablation_heads}")
        known = [f.name for f in dataclasses.fields(heads.Thresholds)]
        for name, value in self.head_thresholds:
            check(name in known, f"unknown head threshold {name!r} (--head-threshold NAME=VALUE); known: {', '.join(known)}")
            check(0.0 <= value <= 1.0, f"head threshold {name} must be in [0, 1] (--head-threshold), got {value}")
        check(self.probe_length is None or self.probe_length >= 2, f"probe length must be ≥ 2 (--probe-length), got {self.probe_length}")
        check(self.probe_tokens is None or len(set(self.probe_tokens)) >= 2,
              f"probe tokens must be a text of at least 2 distinct characters (--probe-tokens), got {self.probe_tokens!r}")
        check(self.pruning_samples >= 1, f"pruning samples must be ≥ 1 (--pruning-samples), got {self.pruning_samples}")
        check(0 <= self.seed < 2**63, f"seed must be an integer in [0, 2^63) (--seed), got {self.seed}")
        outdir.check_task_names([name for name, _ in self.tasks])
        check_choice("analysis", "sample_grads_form (--sample-grads-form)", self.sample_grads_form, SAMPLE_GRADS_FORMS)
        check(self.sample_grads_form != "factors" or self.fisher_type == "empirical",
              f"--sample-grads-form factors needs --fisher-type empirical (the {self.fisher_type} Fisher keeps its own per-sample "
              "contributions); use --sample-grads-form gradients or auto")
        check(self.sample_grads_budget_gb > 0,
              f"sample-gradient budget must be > 0 GB (--sample-grads-budget-gb), got {self.sample_grads_budget_gb}")
        check(self.spill_dir is None or not Path(self.spill_dir).exists() or Path(self.spill_dir).is_dir(),
              f"{self.spill_dir}: --spill-dir exists and is not a directory")
        for s in self.sparsities:
            check(0.0 <= s <= 1.0, f"sparsity must be in [0, 1] (--sparsity), got {s}")
        unknown = [p for p in self.phases if p not in PHASES]
        check(not unknown, f"unknown phase(s) {unknown} (--phases); available: {', '.join(PHASES)}")
        check(self.conflict_scope in CONFLICT_SCOPES,
              f"conflict scope must be one of {', '.join(CONFLICT_SCOPES)} (--conflict-scope), got {self.conflict_scope!r}")
        check(0 < self.conflict_alpha < 1, f"conflict alpha must lie in (0, 1) (--conflict-alpha), got {self.conflict_alpha}")
        check(self.qkov_ridge_rel >= 0, f"QK-OV relative ridge must be ≥ 0 (--qkov-ridge-rel), got {self.qkov_ridge_rel}")
        check(self.qkov_variant not in qkov.CURVATURE_VARIANTS or self.qkov_fisher_pool == "A",
              f"--qkov-variant {self.qkov_variant} takes its curvature from task A's own K-FAC factors; --qkov-fisher-pool "
              f"{self.qkov_fisher_pool} has no meaning there: leave it A")
        self.check_checkpointing()
        for unit in self.mask_units:
            check(unit in masks.STRUCTURED_UNITS,
                  f"mask unit must be one of {', '.join(masks.STRUCTURED_UNITS)} (--mask-unit), got {unit!r}")
        check(len(set(self.mask_units)) == len(self.mask_units), f"mask units repeat (--mask-unit): {', '.join(self.mask_units)}")
        check(self.mask_scope in masks.SCOPES, f"mask scope must be one of {', '.join(masks.SCOPES)} (--mask-scope), got {self.mask_scope!r}")
        self.collect_options()
        self.kernel_options()
        self.score_options()

    def check_checkpointing(self) -> None:
        """Phase 1's saves (``--checkpoint-dir``, ``--resume``, ``--checkpoint-every``): the folder lies
        outside ``--out`` (which a run replaces as a whole) and no spill directory is asked for (its
        spilled gradients are removed at the end of every run, so a save could not name them)."""
        check(self.checkpoint_every >= 1, f"checkpoint every must be ≥ 1 batch (--checkpoint-every), got {self.checkpoint_every}")
        check(not self.resume or self.checkpoint_dir is not None,
              "--resume needs --checkpoint-dir DIR, the folder where the earlier run saved Phase 1's progress")
        if self.checkpoint_dir is None:
            return
        where = Path(self.checkpoint_dir).absolute()
        check(not where.exists() or where.is_dir(), f"{self.checkpoint_dir}: --checkpoint-dir exists and is not a directory")
        out = Path(self.out).absolute()
        check(not where.is_relative_to(out) and not out.is_relative_to(where),
              f"{self.checkpoint_dir}: --checkpoint-dir must lie outside --out ({self.out}) and not contain it: each run replaces "
              "--out as a whole")
        check(self.spill_dir is None,
              "--checkpoint-dir cannot be combined with --spill-dir: spilled gradients are removed at the end of each run, so a "
              "resumed run could not read them; raise --sample-grads-budget-gb instead, or leave out --checkpoint-dir")

    def task_checkpoint_dir(self, name: str) -> Path | None:
        """Where Phase 1's progress of task ``name`` is saved: ``checkpoint_dir/<name>``, absolute (None without one)."""
        return None if self.checkpoint_dir is None else Path(self.checkpoint_dir).absolute() / name

    def collect_options(self, layout=None, seq: int | None = None) -> CollectOptions:
        """The Phase 1 options of this run (every task keeps its attention gradients). How they
        are kept (``sample_grads_form``): ``"gradients"``; ``"factors"``, every attention kernel
        as its token factors (:mod:`fisherjax.fisher.factored`); ``"auto"``, as factors the
        attention kernels whose factors at ``seq`` positions (the run's longest batch, with the
        model's ``layout``) take at most half of their gradients, for the empirical Fisher
        (:func:`~fisherjax.fisher.factored.factors_are_smaller`)."""
        if self.sample_grads_form == "factors":
            factors = True
        elif self.sample_grads_form == "auto" and self.fisher_type == "empirical" and layout is not None and seq is not None:
            factors = smaller_as_factors(layout, attention_paths(layout), seq)
        else:
            factors = False
        return CollectOptions(
            mode=self.mode,
            fisher_type=self.fisher_type,
            keep_sample_grads=True,
            sample_grads_factors=factors,
            sample_grads_dtype=self.sample_grads_dtype,
            sample_grads_budget_bytes=self.sample_grads_budget_gb * 1e9,
            diagonal=self.diagonal,
            diagonal_variance=self.diagonal_variance,
            checkpoint_every=self.checkpoint_every,
        )

    def kernel_options(self):
        """The QK-OV kernel options of this run."""
        return qkov.KernelOptions(contraction=self.qkov_contraction)

    def score_options(self):
        """The QK-OV score options of this run (Phase 6's maths)."""
        return qkov.ScoreOptions(variant=self.qkov_variant, fisher_pool=self.qkov_fisher_pool, normalize_gj=self.qkov_normalize_gj,
                                 aggregate=self.qkov_aggregate, ridge_lambda_rel=self.qkov_ridge_rel)

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
    mesh: Mesh | None = None
    heads: heads.HeadCategories | None = None

    @property
    def labels(self) -> np.ndarray | None:
        """``[L, H]`` behavioural category of every head, when the ``heads`` phase runs."""
        return None if self.heads is None else np.asarray(self.heads.labels)


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
    model = load_pretrained(model_dir, allow_pickle=config.allow_pickle, tokenizer=config.tokenizer)
    tasks = {}
    for name, file in task_files:
        try:  # a checkpoint without a tokenizer runs pre-tokenised tasks ('input_ids' per line)
            task = load_task(file, model.tokenizer, name=name, max_length=config.max_length,
                             max_positions=model.config.max_position_embeddings, truncate=config.truncate,
                             vocab_size=model.config.vocab_size)
        except MissingTokenizer as err:
            raise DataError(f"{model_dir}: the checkpoint has no tokenizer files, so text tasks cannot be encoded ({err.where} is "
                            "text); give its tokenizer with --tokenizer DIR, or pre-tokenised 'input_ids' per line") from None
        if config.max_samples is not None:
            task = dataclasses.replace(task, examples=task.examples[: config.max_samples])
        check_targets(task, config.max_length)
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
        if ctx.heads is not None:  # the original system's ``…/q_proj/kernel|induction_heads`` keys
            by_category = importance.category_group_fisher(fisher, ctx.model.layout, ctx.labels)
            arrays.update({f"{name}|{p}|{g}": v for p, groups in by_category.items() for g, v in groups.items()})
    np.savez(out / "group_fisher.npz", **arrays)
    return fisher_report.section(ctx.fishers)


def longest(task_batches: dict[str, list[Batch]]) -> int:
    """The positions of the longest batch of any task (0 with none)."""
    return max((b.input_ids.shape[1] for bs in task_batches.values() for b in bs), default=0)


def first_batches(ctx: Context, name: str, n: int) -> list[Batch]:
    """Batches of the first ``n`` samples of a task, cut like Phase 1's and padded to the lengths
    its batches have: the share of the phases that run on a fixed few samples, the method
    comparison and the ``heads`` phase. They compile no other shape (the comparison calls Phase 1's
    step too), where padding a few samples to their own lengths would compile the phase's programs,
    and the step, once more."""
    model, task = ctx.model, ctx.tasks[name]
    task = dataclasses.replace(task, examples=task.examples[:n])
    lengths = sorted({b.input_ids.shape[1] for bs in ctx.batches.values() for b in bs}) or DEFAULT_BUCKETS
    return list(batches(task, ctx.config.batch_size, buckets=lengths, pad_id=model.config.pad_token_id or 0,
                        vocab_size=model.config.vocab_size))


CURVATURE_MEMORY_SHARE = 0.5
"""The method comparison runs by default only when its peak (the Lanczos basis or the per-sample
gradients of its Gram route, K-FAC's factors and a few model-sized vectors: ``compare.peak_bytes``)
takes at most this share of the memory still free after Phase 1
(``backend.available_memory_bytes``): a GPT-2-small basis of 30 float32 vectors is 15 GB, which
with Phase 1's kept gradients ran a 24 GB CPU machine out of memory. ``--curvature`` lifts the
share to all of the free memory, not beyond."""

CURVATURE_AUTO_PARAMETERS = 200_000_000
"""Models up to this many parameters get the method comparison by default; larger ones with
``--curvature`` (its Lanczos vectors are model-sized, several dozen of them)."""


def curvature_skip(parameters: int, need: float, free: float | None, forced: bool, least: float | None = None) -> str | None:
    """Why Phase 1's method comparison does not run, or None when it runs: ``"parameters"`` — the
    model has more than :data:`CURVATURE_AUTO_PARAMETERS` and ``forced`` (``--curvature``) is off;
    ``"memory"`` — even its ``least`` bytes (``compare.least_bytes``: ``G̃`` in column slices;
    default ``need``) are more than the ``free`` bytes; ``"share"`` — not forced, its peak ``need``
    with ``G̃`` whole (``compare.peak_bytes``) is more than :data:`CURVATURE_MEMORY_SHARE` of them,
    and ``--curvature`` would run it. ``free`` None: not known, it runs. A default run holds
    ``G̃`` whole, where the comparison costs one gradient pass; ``--curvature`` allows the sliced
    route, a gradient pass per slice and, in each of K-FAC's groups of parameters, a pass per
    eigenvector and per probe."""
    least = need if least is None else least
    if parameters > CURVATURE_AUTO_PARAMETERS and not forced:
        return "parameters"
    if free is None or (need if not forced else least) <= (1.0 if forced else CURVATURE_MEMORY_SHARE) * free:
        return None
    return "memory" if least > free else "share"


def phase_curvature(ctx: Context, out: Path) -> report.Section:
    """Phase 1's method comparison (:func:`fisherjax.curvature.compare.compare_methods`) on the
    first ``curvature_samples`` samples of the first task, on one device: within
    :data:`CURVATURE_MEMORY_SHARE` of the free memory with its gradients whole, or with
    ``--curvature`` within all of it, in column slices of them where they do not fit
    (:func:`curvature_skip`)."""
    config, model = ctx.config, ctx.model
    name = next(iter(ctx.tasks))
    chosen = first_batches(ctx, name, config.curvature_samples)
    k, n, dtype = config.curvature_k, sum(b.num_real for b in chosen), config.sample_grads_dtype
    if curvature_skip(model.num_params, 0.0, None, config.curvature) == "parameters":  # before the rule compiles a pass
        return curvature_report.skipped(f"the model has {model.num_params:,} parameters, more than {CURVATURE_AUTO_PARAMETERS:,}; "
                                        "pass --curvature to compare the Fisher methods anyway")
    tokens, sample_tokens = compare.pass_tokens(chosen)
    free = backend.available_memory_bytes()
    surely = compare.peak_bytes(model, k, n=n, sample_grads_dtype=dtype, tokens=tokens, seq_len=sample_tokens, bound=True)
    why = curvature_skip(model.num_params, surely, free, config.curvature)  # runs at the bound: no pass compiled to measure it
    if why is not None:
        need = compare.peak_bytes(model, k, n=n, sample_grads_dtype=dtype, tokens=tokens, seq_len=sample_tokens)
        least = compare.least_bytes(model, k, n=n, sample_grads_dtype=dtype, tokens=tokens, sample_tokens=sample_tokens)
        why = curvature_skip(model.num_params, need, free, config.curvature, least)
    if why is not None:
        largest = compare.basis_bytes(model.num_params, k, n=n, sample_grads_dtype=dtype)
        gram = compare.from_gram(model.num_params, k, n)
        what = (f"its {n} per-sample gradients ({model.num_params:,} parameters each, {largest / 1e9:.1f} GB" if gram
                else f"its Lanczos basis ({lanczos.default_steps(model.num_params, k)} vectors of {model.num_params:,} parameters, "
                     f"{largest / 1e9:.1f} GB")
        what += f"; with K-FAC's factors and model-sized vectors, {need / 1e9:.1f} GB)"
        smaller = "--curvature-samples" if gram else "--curvature-k"
        if why == "share":
            return curvature_report.skipped(
                f"{what} would take more than {CURVATURE_MEMORY_SHARE:.0%} of the memory still free ({free / 1e9:.1f} GB); "
                f"pass --curvature to run it anyway{' (in column slices of the gradients)' if need > free else ''}, "
                f"or a smaller {smaller}")
        sliced = f" (at least {least / 1e9:.1f} GB with them formed in column slices)" if gram else ""
        reason = (f"{what} would take more than the memory still free ({free / 1e9:.1f} GB){sliced}"
                  f"{', even with --curvature' if config.curvature else ''}; pass a smaller {smaller}")
        if config.curvature:
            warnings.warn(f"method comparison skipped: {reason}", stacklevel=1)
        return curvature_report.skipped(reason)
    allowed = None if free is None else (free if config.curvature else CURVATURE_MEMORY_SHARE * free)
    result = compare.compare_methods(model, chosen, k=config.curvature_k, seed=config.seed, progress=config.progress,
                                     options=config.collect_options(model.layout, longest(ctx.batches)),  # Phase 1's compiled step
                                     memory_bytes=allowed)
    return curvature_report.section(result, name, ctx.labels, model.layout.kv_head_of)


def categorise_heads(model: Model, config: AnalysisConfig) -> heads.HeadCategories:
    """:func:`fisherjax.heads.categorise` with the run's probes: the demo's own
    (:func:`fisherjax.demo.probe_settings`) for the demo model, else every ordinary token at
    length 32; ``--probe-tokens`` (the tokens of a text, without special tokens) and ``--probe-length``
    override either; ``--head-threshold NAME=VALUE`` changes one of the
    :class:`~fisherjax.heads.Thresholds` the labels use."""
    settings: dict = {}
    if config.model is None:
        from fisherjax import demo

        settings = demo.probe_settings(model)
    if config.probe_tokens is not None:
        if model.tokenizer is None:
            raise ConfigError("--probe-tokens is a text, and the checkpoint has no tokenizer to encode it; leave it out")
        settings["tokens"] = np.asarray(model.tokenizer(config.probe_tokens, add_special_tokens=False)["input_ids"], np.int64)
    if config.probe_length is not None:
        settings["length"] = config.probe_length
    thresholds = dataclasses.replace(heads.Thresholds(), **dict(config.head_thresholds))
    return heads.categorise(model, model.params, seed=config.seed, thresholds=thresholds, **settings)




def phase_heads(ctx: Context, out: Path) -> report.Section:
    """Behavioural head categories (computed before the phases, :func:`fisherjax.heads.categorise`),
    and per task on its first ``head_samples`` samples: head-mask importance against the Fisher head
    importance, and the single-head ablation table of the ``ablation_heads`` heads with the largest
    head-mask importance (every head when the model has no more; each costs a forward pass of
    those samples). Writes ``heads.json``."""
    model, layout = ctx.model, ctx.model.layout
    tasks = {}
    for name, fisher in ctx.fishers.items():
        chosen = first_batches(ctx, name, ctx.config.head_samples)
        gate = heads.head_mask_importance(model, model.params, chosen)
        ablation = None
        if ctx.config.ablation_heads:
            top = np.argsort(-gate.mean_abs, axis=None, kind="stable")[: ctx.config.ablation_heads]
            which = np.zeros(gate.mean_abs.shape, bool)
            which.flat[top] = True
            ablation = heads.ablate_heads(model, model.params, chosen, heads=which)
        tasks[name] = heads_report.task_summary(gate, importance.head_importance(fisher, layout).head, ablation, ctx.labels,
                                                top=ctx.config.top_k)
    section = heads_report.section(ctx.heads, tasks)
    (out / "heads.json").write_text(json.dumps(report.jsonable(section.json), indent=2))
    return section


def phase_importance(ctx: Context, out: Path) -> report.Section:
    """Phase 2: group and head importance per task (with bootstrap intervals of the heads and, with
    the ``heads`` phase, their categories), and how the tasks' rankings compare."""
    return importance_report.section(ctx.fishers, ctx.model.layout, k=ctx.config.top_k, seed=ctx.config.seed, labels=ctx.labels)


PRUNING_RANDOM_MASKS = 10
"""Random head masks the masks phase's pruning experiment evaluates beside each task's Fisher mask."""


def phase_masks(ctx: Context, out: Path) -> report.Section:
    """Phases 3 and 4: pruning masks of every ``mask_units`` unit (and unstructured ones, with the
    diagonal) at each sparsity, ranked at ``mask_scope``; their overlap between tasks, merge advice,
    and each task's loss after pruning half of each layer's heads by Fisher versus at random, on
    ``pruning_samples`` samples of each task."""
    layout, config = ctx.model.layout, ctx.config
    with_diagonal = all(f.diagonal for f in ctx.fishers.values())
    parameter_masks = ({n: masks.unstructured_masks(f, layout, config.sparsities, scope=config.mask_scope) for n, f in ctx.fishers.items()}
                       if with_diagonal else None)
    unit_masks = {unit: {n: [masks.structured_mask(f, layout, s, unit=unit, scope=config.mask_scope) for s in config.sparsities]
                         for n, f in ctx.fishers.items()} for unit in config.mask_units}
    experiment = experiments.head_pruning_experiment(
        ctx.model, ctx.model.params, ctx.batches, ctx.fishers, sparsity=0.5, n_random=PRUNING_RANDOM_MASKS, seed=config.seed,
        scope="layer", samples=config.pruning_samples, extra_masks=category_masks(layout, ctx.labels),
    )
    return masks_report.section(
        ctx.fishers, layout, sparsities=config.sparsities, unit_masks=unit_masks, parameter_masks=parameter_masks, experiment=experiment,
        labels=ctx.labels, scope=config.mask_scope,
    )


KEEP_ONLY_CATEGORIES = ("induction",)
"""Categories whose heads the masks phase also keeps alone (every other head pruned)."""


def category_masks(layout, labels: np.ndarray | None) -> dict[str, np.ndarray] | None:
    """``{"without <c>": keep, "only <c>": keep}`` head decisions by category for the head-pruning
    experiment: every category's heads removed, and the heads of :data:`KEEP_ONLY_CATEGORIES` kept
    alone (:func:`fisherjax.analysis.masks.category_mask`); None without categories."""
    if labels is None:
        return None
    present = sorted(set(labels.ravel().tolist()))
    chosen = {f"without {c}": masks.category_mask(layout, labels, [c], keep=False).keep["head"] for c in present}
    chosen.update({f"only {c}": masks.category_mask(layout, labels, [c]).keep["head"] for c in KEEP_ONLY_CATEGORIES if c in present})
    return chosen


def most_pruning_masks(tasks: int) -> int:
    """The most masks the masks phase's pruning experiment evaluates on each of ``tasks`` tasks:
    every task's Fisher mask, :data:`PRUNING_RANDOM_MASKS` random ones and :func:`category_masks`
    with every category present (the unpruned loss is Phase 1's)."""
    return tasks + PRUNING_RANDOM_MASKS + len(heads.CATEGORIES) + len(KEEP_ONLY_CATEGORIES)


CONFLICT_SCOPES = ("auto", *conflicts.SCOPES)
"""``--conflict-scope``: ``auto`` (the default) tests per attention-head group where those tests
fit the host's memory (:func:`conflict_scope`), else on the whole gradient."""

CONFLICT_MEMORY_SHARE = 0.5
"""``--conflict-scope auto`` tests per group when that takes at most this share of the host memory
still available (``conflicts.group_scope_bytes``)."""


def _conflict_grouping(layout) -> tuple[dict[str, tuple[int, ...]], conflicts.Grouping]:
    """The shapes of the attention parameters Phase 5 reads and their grouping."""
    shapes = {p: layout.spec(p).shape for p in attention_paths(layout)}
    return shapes, conflicts.grouping_for(shapes, layout)


def conflict_groups(layout) -> int:
    """Phase 5's groups: the (block, layer, head) groups of the attention parameters it reads."""
    return len(_conflict_grouping(layout)[1].index.is_head)


def conflict_open_groups(layout, n_a: int, n_b: int, options: conflicts.ConflictOptions | None = None) -> int | None:
    """The groups whose within-task dot products Phase 5 holds at once in the per-group scope, for
    ``n_a`` and ``n_b`` kept samples (``conflicts.open_groups``: the references stream into their
    pooled nulls as the parameter slices complete each group); None where they are held whole
    (a null other than the pooled one)."""
    options = options or conflicts.ConflictOptions()
    if options.null != "pooled":
        return None
    pairs = (("a", "b", True), ("a", "a", True), ("b", "b", True))
    return conflicts.open_groups(*_conflict_grouping(layout), {"a": n_a, "b": n_b}, pairs, options.memory_budget_bytes)


class ConflictScope(NamedTuple):
    """Phase 5's scope for a task pair (:func:`conflict_scope`): ``scope``, ``why`` (a note where
    ``auto`` chose the whole gradient) and ``max_kept`` (``ConflictOptions.max_kept_tests``)."""

    scope: str
    why: str | None
    max_kept: int | None


def conflict_scope(scope: str, n_a: int, n_b: int, groups: int, available: float | None, alpha: float = 0.05,
                   open_groups: int | None = None) -> ConflictScope:
    """The scope Phase 5 tests ``n_a`` × ``n_b`` samples in. ``auto``: per group unless its tests
    (``conflicts.group_scope_bytes`` with ``open_groups``: :func:`conflict_open_groups`; with the
    share of tests kept that tasks which do not conflict keep, twice over) would take more than
    :data:`CONFLICT_MEMORY_SHARE` of the ``available`` host bytes; then on the whole gradient, and
    ``why`` says so. Per group, the tests kept are bounded by that share
    (``conflicts.max_kept_tests``): tasks that conflict in many more of their tests are tested on
    the whole gradient once past it, and the pair's settings say why. A scope given is kept,
    unbounded."""
    if scope != "auto":
        return ConflictScope(scope, None, None)
    need = conflicts.group_scope_bytes(n_a, n_b, groups, alpha=alpha, open_groups=open_groups)
    if available is None or not np.isfinite(available):  # not known
        return ConflictScope("groups", None, None)
    budget = CONFLICT_MEMORY_SHARE * available
    if need <= budget:
        return ConflictScope("groups", None, conflicts.max_kept_tests(n_a, n_b, groups, budget, alpha, open_groups))
    why = (f"tested on the whole gradient, not per attention-head group: per-group tests of {n_a} × {n_b} samples over {groups} "
           f"groups would take about {need / 1e9:.1f} GB of the {available / 1e9:.1f} GB of host memory available "
           "(--conflict-scope groups asks for them; fewer samples, --max-samples, fit)")
    return ConflictScope("overall", why, None)


def check_conflict_scope(config: AnalysisConfig, layout, task_sizes: dict[str, int]) -> None:
    """Refuse, before Phase 1, ``--conflict-scope groups`` on tasks whose per-group tests could not
    fit even all the host memory available now (``conflicts.group_scope_bytes``); ``auto`` would
    test them on the whole gradient instead (:func:`conflict_scope`)."""
    if config.conflict_scope != "groups" or "conflicts" not in config.phases:
        return
    available, groups = backend.host_available_bytes(), conflict_groups(layout)
    for (name_a, n_a), (name_b, n_b) in itertools.combinations(task_sizes.items(), 2):
        need = conflicts.group_scope_bytes(n_a, n_b, groups, open_groups=conflict_open_groups(layout, n_a, n_b))
        check(available is None or need <= available,
              f"--conflict-scope groups: per-group tests of tasks {name_a!r} × {name_b!r} ({n_a} × {n_b} samples, {groups} groups) "
              f"would take about {need / 1e9:.1f} GB, more than the {(available or 0) / 1e9:.1f} GB of host memory available; use "
              "--conflict-scope auto (per group where it fits) or overall, or fewer samples (--max-samples)")


def phase_conflicts(ctx: Context, out: Path | None) -> report.Section:
    """Phase 5: sample-level conflicts between every pair of tasks, per attention head.

    Fisher-whitened cosines of all cross-task sample pairs, tested per (block, layer, head) group
    (or on the whole gradient: ``--conflict-scope``, :func:`conflict_scope`) against each task's own
    within-task cosines (BH FDR); writes ``conflicts.json``.
    """
    layout, config = ctx.model.layout, ctx.config
    options = conflicts.ConflictOptions(alpha=config.conflict_alpha, top_k=config.top_k)
    groups = conflict_groups(layout)
    parts = []
    for name_a, name_b in itertools.combinations(ctx.fishers, 2):
        n_a, n_b = (len(ctx.fishers[name].sample_grads) for name in (name_a, name_b))
        short = [f"{name} has {n} samples with active tokens; its own cosines, the null it is tested against, need at least {need}"
                 for name, n, need in ((name_a, n_a, options.samples_needed("a")), (name_b, n_b, options.samples_needed("b")))
                 if n < need]
        if short:  # a quick run on a few samples still gets the other phases
            parts.append(conflicts_report.pair_part(name_a, name_b, skipped="; ".join(short)))
            continue
        available = sharding.least_over_processes(backend.host_available_bytes())  # every process tests alike
        sized = dataclasses.replace(options, memory_budget_bytes=backend.host_work_budget(options.memory_budget_bytes, available))
        chosen = conflict_scope(config.conflict_scope, n_a, n_b, groups, available, options.alpha,
                                conflict_open_groups(layout, n_a, n_b, sized))
        found = conflicts.detect(
            ctx.fishers[name_a], ctx.fishers[name_b], layout=layout,
            options=dataclasses.replace(sized, scope=chosen.scope, max_kept_tests=chosen.max_kept),
            names=(name_a, name_b), progress=config.progress, mesh=ctx.mesh,
        )
        why = chosen.why or found.settings.get("scope_note")
        if why:
            warnings.warn(f"conflicts {name_a} × {name_b}: {why}", stacklevel=2)
        parts.append(conflicts_report.pair_part(name_a, name_b, found, note=why, labels=ctx.labels, kv_head_of=layout.kv_head_of))
        del found  # one pair's Grams and kept tests at a time: the next pair's tests get their memory
    section = conflicts_report.section_of(parts)
    if out is not None:  # None: a process of a multi-process run that computes with the others and writes nothing
        (out / "conflicts.json").write_text(json.dumps(report.jsonable(section.json), indent=2))
    return section


def phase_qkov(ctx: Context, out: Path | None) -> report.Section:
    """Phase 6: QK-OV interference of each task on each other task, per block, layer and head.

    For every ordered pair (A, B): the heatmap with Î from A, bootstrap intervals of its layer ×
    head averages, and a permutation test of A-vs-B against A-vs-A' (A split in two halves, BH
    FDR across cells). A task whose Fisher would rest on fewer than ``min_fisher_samples``
    samples (or whose fit half would) is skipped with the reason. Writes ``qkov.npz`` (keys
    ``A|B|array``). A pair of tasks is computed both ways at once (:func:`qkov_ways`), then each
    direction is written, summarised and drawn before the next pair is computed.
    """
    config = ctx.config
    summaries, drawn, factors = {}, {}, {}
    with outdir.NpzWriter(out / "qkov.npz") if out is not None else contextlib.nullcontext() as arrays:
        for name_a, name_b in itertools.combinations(ctx.fishers, 2):
            kernel = pair_kernel(config)
            ways = qkov_ways(ctx, name_a, name_b, factors, kernel)
            for (a, b), (result, test, shared) in zip(((name_a, name_b), (name_b, name_a)), ways):
                if isinstance(result, str):  # a quick run on a few samples still gets the other phases
                    summaries[a, b] = {"skipped": result}
                    continue
                if arrays is not None:  # None: a process of a multi-process run that computes with the others and writes nothing
                    arrays.add({f"{a}|{b}|{k}": v for k, v in qkov.to_arrays(result).items()})
                summary = qkov_report.summary(result, top_k=config.top_k, labels=ctx.labels)
                summary["kernel"] = dataclasses.asdict(kernel)  # the tile budget as the pair's scoring read it
                summary["both_directions_in_one_pass"] = shared
                summary["bootstrap"] = qkov_report.bootstrap_summary(qkov.bootstrap_layer_head_avg(result, n_bootstrap=200, seed=config.seed))
                summary["permutation_test"] = {"skipped": test} if isinstance(test, str) else qkov_report.permutation_summary(test, result)
                summaries[a, b], drawn[a, b] = summary, qkov_report.figures(result, ctx.labels)
                del result, test  # written, summarised, drawn
    order = [pair for pair in itertools.permutations(ctx.fishers, 2) if pair in summaries]
    return qkov_report.section({pair: summaries[pair] for pair in order}, {pair: drawn[pair] for pair in order if pair in drawn})


def pair_kernel(config: AnalysisConfig) -> qkov.KernelOptions:
    """The run's QK-OV kernel options with the tile budget fixed as a pair of tasks starts
    (:meth:`~fisherjax.analysis.qkov.KernelOptions.budget_bytes`: the backend's, on a CPU less
    where the host has little memory left; the least of every process's), so that every choice
    the pair's scoring makes reads one budget, not the memory left as it goes."""
    kernel = config.kernel_options()
    budget = sharding.least_over_processes(kernel.budget_bytes())  # every process of a run tiles alike
    return dataclasses.replace(kernel, memory_budget_bytes=budget)


def qkov_ways(ctx: Context, name_a: str, name_b: str, factors: dict, kernel: qkov.KernelOptions | None = None) -> Iterator[tuple]:
    """Phase 6 of a task pair, each ordered pair in turn (A ← B, then B ← A): ``(heatmap,
    permutation test, shared)``, where either of the first two may be the reason it was skipped
    instead, and ``shared`` says whether both directions came from one pass (:class:`qkov.Way`).

    On one device with a diagonal variant, :func:`fisherjax.analysis.qkov.both_ways` computes both
    directions from one formation of each task's kept samples (or, where that does not fit, one
    direction at a time); otherwise each direction is its own heatmap and test (task A's K-FAC for
    ``--qkov-variant kfac``, kept in ``factors`` for the task's other pairs; the mesh's tiles),
    holding one direction's scores at a time. ``kernel``: :func:`pair_kernel` where None."""
    layout, config = ctx.model.layout, ctx.config
    score, kernel = config.score_options(), kernel or pair_kernel(config)
    needed = score.min_fisher_samples
    curvature = score.variant in qkov.CURVATURE_VARIANTS
    skips, tested = {}, {}
    for a in (name_a, name_b):
        n = len(ctx.fishers[a].sample_grads)
        if n < needed:
            skips[a] = f"{a} has {n} samples with active tokens; its Fisher needs at least {needed}"
        if curvature:
            tested[a] = (f"the permutation test's null rests on the diagonal Fisher of {a}; it does not take --qkov-variant "
                         f"{score.variant}")
        elif score.fisher_pool != "A":
            tested[a] = (f"the permutation test weighs A against A' by the Fisher of {a} alone; it does not take "
                         f"--qkov-fisher-pool {score.fisher_pool}")
        elif not work.qkov_tested(n, needed):
            fit = n - int(round(work.HELDOUT * n))
            tested[a] = f"{a} has {n} samples with active tokens; its fit half ({fit}) needs at least {needed} for a stable Fisher"
        else:
            tested[a] = True
    test_options = dict(fraction=work.HELDOUT, split_seed=config.seed, n_permutations=1000, seed=config.seed, score=score, kernel=kernel,
                        progress=config.progress)
    if qkov_together(ctx, len(ctx.fishers[name_a].sample_grads), len(ctx.fishers[name_b].sample_grads)):
        ways = qkov.both_ways(ctx.fishers[name_a], ctx.fishers[name_b], layout, test=[tested[a] is True for a in (name_a, name_b)],
                              **test_options)
        for a, way in zip((name_a, name_b), ways):
            yield way.heatmap, way.test if tested[a] is True else tested[a], way.shared
            del way  # written and summarised: B ← A is finished without A ← B held
        return
    for a, b in ((name_a, name_b), (name_b, name_a)):
        if a in skips:
            yield skips[a], None, False
            continue
        fa, fb = ctx.fishers[a], ctx.fishers[b]
        if curvature and a not in factors:  # task A's K-FAC (its factors on one device, the heatmap on the mesh)
            factors[a] = attention_kfac(ctx, a)
        result = qkov.heatmap(fa, fb, layout, score=score, kernel=kernel, progress=config.progress, mesh=ctx.mesh, kfac=factors.get(a))
        test = tested[a] if tested[a] is not True else qkov.heldout_permutation_test(fa, fb, layout, mesh=ctx.mesh, **test_options)
        yield result, test, False
        del result, test


def qkov_together(ctx: Context, n_a: int, n_b: int) -> bool:
    """Whether Phase 6 scores a pair of tasks of ``n_a`` and ``n_b`` kept samples with
    :func:`fisherjax.analysis.qkov.both_ways` (which forms each sample once where it fits): on one
    device, with a diagonal variant, both tasks with enough samples for their Fisher."""
    score = ctx.config.score_options()
    return ctx.mesh is None and score.variant not in qkov.CURVATURE_VARIANTS and min(n_a, n_b) >= score.min_fisher_samples


def attention_kfac(ctx: Context, name: str) -> dict:
    """Task ``name``'s K-FAC restricted to each attention head (``{block: HeadFactors}``,
    :func:`fisherjax.curvature.kfac.attention_factors`) from its Phase 1 batches, with the run's
    Fisher type (``per_token`` uses the empirical factors), for ``--qkov-variant kfac``."""
    kind = "true" if ctx.config.fisher_type == "true" else "empirical"
    factors = kfac.kfac_factors(ctx.model, ctx.model.params, ctx.batches[name], fisher_type=kind,
                                key=jax.random.key(ctx.config.seed) if kind == "true" else None)
    return kfac.attention_factors(factors, ctx.model.layout)


PHASES: dict[str, Callable[[Context, Path], report.Section]] = {
    "fisher": phase_fisher,
    "curvature": phase_curvature,
    "heads": phase_heads,
    "importance": phase_importance,
    "masks": phase_masks,
    "conflicts": phase_conflicts,
    "qkov": phase_qkov,
    "natural": lambda ctx, out: natural_report.section(ctx.fishers, ctx.model.layout),
}
"""Phase name → phase function, in phase order (1, its method comparison, head categories, 2, 3–4, 5, 6, 7)."""

SPANNING_PHASES = ("conflicts", "qkov")
"""The phases after Phase 1 that run on the run's mesh, over every process of a multi-process run
(the others read the Fisher alone and run on process 0)."""

REUSING_PHASES = ("conflicts", "qkov")
"""The phases run inside :func:`fisherjax.allocator.reusing_freed_memory` where XLA's buffers are
host memory (:func:`fisherjax.backend.buffers_on_host`): slice by slice and layer by layer they
form kept samples' gradients into large arrays that live for one step, so each step would
otherwise fault in fresh pages (measured in ``benchmarks/RESULTS.md``; the heads and masks phases
gained nothing from it, and Phase 1 fragments the heap: ``docs/DECISIONS.md``)."""


REUSE_ROOM_BYTES = 8e9
"""Host memory that must be available when one of the :data:`REUSING_PHASES` starts for it to keep
freed memory (:func:`run_phase`). Kept memory grows to about the phase's largest working set
(Phase 5's 4 GB slices, a 2 GB QK-OV tile, their temporaries), which a run near its memory limit
cannot spare: GPT-2 small at 256 + 256 in a 15 GB cgroup was killed in a pair phase with it and
finished without it (RESULTS, forty-first session)."""


def run_phase(phase: str, ctx: Context, out: Path | None) -> report.Section:
    """``PHASES[phase](ctx, out)``, inside :func:`fisherjax.allocator.reusing_freed_memory` for the
    :data:`REUSING_PHASES` on a CPU with at least :data:`REUSE_ROOM_BYTES` of host memory available,
    with XLA's out-of-memory error as one line (:func:`naming_memory`), and the heap's free pages
    given back after it (:func:`fisherjax.allocator.return_free_memory`; ``analyze`` does the same
    after Phase 1)."""
    available = backend.host_available_bytes() if phase in REUSING_PHASES else None
    reusing = phase in REUSING_PHASES and backend.buffers_on_host() and (available is None or available >= REUSE_ROOM_BYTES)
    try:
        with naming_memory(phase), allocator.reusing_freed_memory() if reusing else contextlib.nullcontext():
            return PHASES[phase](ctx, out)
    finally:
        allocator.return_free_memory()


MEMORY_FIXES = {
    "load": "the model's parameters do not fit this device: use one with more memory",
    "collect": "use a smaller --batch-size or --max-length, or split each batch over more devices (--devices)",
    "heads (categories)": "use a smaller --probe-length, or leave heads out of --phases",
    "curvature": "use a smaller --batch-size (its passes go a batch at a time), fewer --curvature-samples or a smaller "
                 "--curvature-k, or leave curvature out of --phases",
    "heads": "use a smaller --batch-size (its head-mask gradients and ablations go a batch at a time), or leave heads out of --phases",
    "masks": "use fewer --pruning-samples, or leave masks out of --phases",
    "conflicts": "use fewer samples (--max-samples) or --conflict-scope overall, or leave conflicts out of --phases",
    "qkov": "use fewer samples (--max-samples), or leave qkov out of --phases",
}
"""What to change when a stage of a run runs out of memory (:func:`naming_memory`), by stage."""


@contextlib.contextmanager
def naming_memory(stage: str):
    """Within ``stage``, XLA's out-of-memory error (:func:`fisherjax.errors.out_of_memory`: on an
    accelerator the usual end of a run too large for its device) becomes a :class:`ConfigError`
    that names the stage, the device, XLA's own line and what to change (:data:`MEMORY_FIXES`):
    the command line prints one line and exits with code 2, and the output directory is not
    written."""
    try:
        yield
    except Exception as err:
        if not out_of_memory(err):
            raise
        device = jax.devices()[0]
        where = device.platform + ("" if device.device_kind.lower() == device.platform else f" ({device.device_kind})")
        fix = MEMORY_FIXES.get(stage, f"use fewer samples (--max-samples), or leave {stage} out of --phases")
        raise ConfigError(f"out of memory on {where} in the {stage} phase: {one_line(str(err).splitlines()[0], 200).rstrip('.')}; "
                          f"{fix}") from err


# ---- driver ------------------------------------------------------------------------------------


FOLD_FREE_FLOPS = 1e11
"""Phase 1 work below which :func:`task_batches` pads batches to a longer length already in use
rather than compile another (``fisherjax.data.run_buckets``' ``free``): about a second of a 2-core
CPU, and less than XLA takes to compile a step at any size (the demo's smallest, 3.6 s there)."""


def task_batches(model: Model, tasks: dict[str, Task], config: AnalysisConfig) -> dict[str, list[Batch]]:
    """Every task's batches as Phase 1 reads them (``--batch-size`` rows, each padded to its
    bucket, the run's buckets fewer where that saves compiling a shape: :func:`fisherjax.data.run_buckets`);
    token ids outside the vocabulary are refused here, naming the file and sample.

    A task that Phase 6 tests with a held-out split (:func:`fit_half_ids`) has its fit half's
    samples first, then the others (each part in file order, its own batches): Phase 1 then
    records that half's Fisher on the way (:func:`fit_prefix`), and Phase 6 reads none of its
    samples for it — a third of its reads at 7B, and a task's only read of its fit half for all its
    pairs. The split depends on the samples' ids alone (:func:`fisherjax.analysis.qkov.heldout_positions`),
    so it is the same whichever order they are collected in."""
    def of(task: Task, lengths: Sequence[int] = DEFAULT_BUCKETS) -> list[Batch]:
        return list(batches(task, config.batch_size, buckets=lengths, pad_id=model.config.pad_token_id or 0,
                            vocab_size=model.config.vocab_size))

    parts = {}
    for name, task in tasks.items():
        fit = fit_half_ids(of(task), config, len(tasks))
        parts[name] = (task,)
        if fit is not None:
            first = set(fit.tolist())
            ids = [e.sample_id for e in task.examples]
            parts[name] = (task.subset([i for i in ids if i in first]), task.subset([i for i in ids if i not in first]))

    def row_flops(length: int) -> float:
        return work.COLLECT_FORWARDS * work.forward_flops(model.layout, length).total

    lengths = run_buckets([part for both in parts.values() for part in both], config.batch_size, row_cost=row_flops, free=FOLD_FREE_FLOPS)
    return {name: [b for part in both for b in of(part, lengths)] for name, both in parts.items()}


def fit_half_ids(task_batches: Sequence[Batch], config: AnalysisConfig, tasks: int) -> np.ndarray | None:
    """Ids of the fit half of Phase 6's held-out test of a task with these batches (one of
    ``tasks``): :func:`fisherjax.analysis.qkov.heldout_positions` at :data:`fisherjax.work.HELDOUT`
    and the run's seed over the samples Phase 1 keeps (those with a predicted token). None where
    that test has no use for Phase 1's record of it: no ``qkov`` phase or one task, no test (a
    curvature variant, a Fisher pooled over both tasks), no full diagonal (``--no-diagonal``), a fit
    half too small to be tested, or sample ids that are not unique."""
    score = config.score_options()
    if ("qkov" not in config.phase_order() or tasks < 2 or not config.diagonal or score.variant in qkov.CURVATURE_VARIANTS
            or score.fisher_pool != "A"):
        return None
    ids = np.concatenate([seen_ids(b) for b in task_batches]) if task_batches else np.zeros(0, np.int64)
    if not work.qkov_tested(len(ids), score.min_fisher_samples) or len(np.unique(ids)) != len(ids):
        return None
    fit, _ = qkov.heldout_positions(ids, work.HELDOUT, config.seed)
    return ids[fit]


def fit_prefix(task_batches: Sequence[Batch], config: AnalysisConfig, tasks: int) -> int | None:
    """How many first batches hold exactly the fit half of a task (:func:`fit_half_ids`), as
    :func:`task_batches` orders them; None where no prefix does, or the task is not tested."""
    fit = fit_half_ids(task_batches, config, tasks)
    if fit is None:
        return None
    wanted, seen = set(fit.tolist()), set()
    for count, batch in enumerate(task_batches, start=1):
        seen.update(seen_ids(batch).tolist())
        if seen == wanted:
            return count
        if not seen <= wanted:
            return None
    return None


def collect_all(model: Model, all_batches: dict[str, list[Batch]], config: AnalysisConfig, *,
                spill_root: Path | None = None, mesh: Mesh | None = None) -> tuple[dict, dict[str, telemetry.Stretch]]:
    """Phase 1 Fisher (with attention gradients kept) of every task's batches, and what each
    task's collection cost (its :class:`~fisherjax.telemetry.Stretch`: the first task pays the
    step's compilation); kept gradients beyond their budget spill to ``spill_root/<task>``;
    samples split over ``mesh`` when given (:mod:`fisherjax.sharding`); with ``checkpoint_dir``
    each task's progress is saved in ``checkpoint_dir/<task>`` and, with ``resume``, continued.
    Where a task's batches hold the fit half of Phase 6's held-out test first (:func:`fit_prefix`),
    its attention parameters' Fisher over that half is recorded too (``TaskFisher.partial_diagonal``)."""
    options = config.collect_options(model.layout, longest(all_batches))
    fishers, stretches = {}, {}
    for name in all_batches:
        fishers[name], stretches[name] = telemetry.measure(
            collect,
            model,
            all_batches[name],
            task=name,
            options=options,
            spill_dir=None if spill_root is None else spill_root / name,
            checkpoint_dir=config.task_checkpoint_dir(name),
            resume=config.resume,
            key=jax.random.key(config.seed),
            progress=config.progress,
            mesh=mesh,
            prefix_batches=fit_prefix(all_batches[name], config, len(all_batches)),
            prefix_paths=attention_paths(model.layout),
        )
    return fishers, stretches


def check_phase1_memory(model: Model, all_batches: dict[str, list[Batch]], config: AnalysisConfig, mesh: Mesh | None = None) -> None:
    """Refuse, before anything is computed or created, a Phase 1 that cannot hold what it keeps:
    a task whose kept per-sample arrays exceed ``--sample-grads-budget-gb`` without a spill
    directory (:func:`~fisherjax.fisher.collect.check_kept_budget`), or a run that would take more
    host memory than this process may (:func:`check_host_memory`; the least available over the
    processes of a multi-process run, which must all go on or all stop)."""
    options, spill = config.collect_options(model.layout, longest(all_batches)), config.spill_dir is not None
    if not spill:
        for name, chosen in all_batches.items():
            check_kept_budget(model, chosen, options, task=name, mesh=mesh)
    available = sharding.least_over_processes(host_memory.available_bytes())  # every process decides alike
    check_host_memory(phase1_host_bytes(model, all_batches, options, spill=spill, mesh=mesh),
                      available if np.isfinite(available) else None, host_memory.limited_by_cgroup(), spill=spill)


HOST_MEMORY_SHARE = 0.9
"""Share of the host memory available before Phase 1 that Phase 1 may take
(:func:`check_host_memory`); the rest is left to the allocator's fragmentation. The later
phases size their own work by what is available when they start."""


class Phase1Memory(NamedTuple):
    """Host bytes Phase 1 adds to what the process holds when it starts (:func:`phase1_host_bytes`):
    ``kept`` (every task's kept per-sample arrays held in memory, of ``samples`` samples in
    ``tasks`` tasks) and ``step`` (its largest step's memory, ``shape`` = (rows, positions))."""

    kept: float
    samples: int
    tasks: int
    step: float
    shape: tuple[int, int]


def phase1_host_bytes(model: Model, all_batches: dict[str, list[Batch]], options: CollectOptions, *, spill: bool,
                      mesh: Mesh | None = None) -> Phase1Memory:
    """What Phase 1 will add to this process's host memory. ``kept``: every task's kept arrays
    (:func:`~fisherjax.fisher.collect.kept_bytes`; with a spill directory at most
    ``sample_grads_budget_bytes`` a task stay in memory), all of them, as every process holds
    every sample after Phase 1. ``step``: where XLA's buffers are host memory (a CPU), the memory
    of Phase 1's largest step (:func:`~fisherjax.fisher.step.step_memory`, the program the
    collection then runs without compiling it again) on each of this process's devices, less
    the parameters the process holds already; 0 on an accelerator, whose step lives in its own memory."""
    kept, samples = 0.0, 0
    for chosen in all_batches.values():
        need, rows = kept_bytes(model, chosen, options)
        kept += min(need, options.sample_grads_budget_bytes) if spill else need
        samples += int(rows.sum())
    shapes = set().union(*(step_shapes(model, chosen, options, mesh) for chosen in all_batches.values()))
    shape = max(shapes, key=lambda s: (s[0] * s[1], s[1]), default=(0, 0))
    step = 0.0
    if backend.buffers_on_host() and shape[0]:
        devices = len(mesh.local_devices) if mesh is not None else 1
        step = max(step_memory(model, *shape, options, mesh).total_bytes * devices - model.parameter_bytes, 0)
    return Phase1Memory(kept, samples, len(all_batches), step, shape)


def check_host_memory(need: Phase1Memory, available: float | None, cgroup: bool, *, spill: bool) -> None:
    """Refuse, before Phase 1, a run whose Phase 1 would take more than :data:`HOST_MEMORY_SHARE`
    of the host memory ``available`` to this process (``cgroup``: the bound is its memory
    cgroup's limit, as under Slurm or in a container, not the machine's): a process past it is
    killed by the kernel, late and without a word. Names what would take it and what fits."""
    if available is None:
        return
    room = HOST_MEMORY_SHARE * available
    if need.kept + need.step <= room:
        return
    where = "under its memory cgroup's limit" if cgroup else "on this machine (MemAvailable)"
    what = f"{need.kept / 1e9:.1f} GB of kept per-sample gradients for {need.samples} samples of {need.tasks} task(s)"
    if need.step:
        what += f" and {need.step / 1e9:.1f} GB for its largest step ({need.shape[0]} rows × {need.shape[1]} positions)"
    left = room - need.step
    if left <= 0.05 * room:
        fix = "use a smaller --batch-size, or a machine (or job) with more memory"
    else:
        per_sample = need.kept / max(need.samples, 1)
        fits = int(left // per_sample // max(need.tasks, 1)) if per_sample else 0
        budget = f"{math.floor(left / max(need.tasks, 1) / 1e7) / 100:g}"  # GB, rounded down: it must fit
        fix = (f"use --sample-grads-budget-gb {budget} with --spill-dir to keep the rest on disk"
               if spill else f"give a spill directory (--spill-dir DIR --sample-grads-budget-gb {budget}) to keep the rest on disk")
        fix += f", or at most {fits} samples per task (--max-samples {fits})" if fits else ""
    raise ConfigError(f"host memory: Phase 1 would take about {(need.kept + need.step) / 1e9:.1f} GB ({what}), more than "
                      f"{HOST_MEMORY_SHARE:.0%} of the {available / 1e9:.1f} GB this process may still take {where}; {fix}")


def saved_batches(config: AnalysisConfig, names: Sequence[str]) -> dict[str, int]:
    """Per task, the batches of Phase 1 its saves in ``checkpoint_dir/<task>`` hold (0: none), which
    a ``resume`` skips; empty without ``checkpoint_dir``.

    Raises:
      ConfigError: saves there without ``resume`` (the run would write over them).
    """
    if config.checkpoint_dir is None:
        return {}
    from fisherjax.fisher.progress import progress_manager

    found = {}
    for name in names:
        directory = config.task_checkpoint_dir(name)
        step = None
        if directory.is_dir():
            manager = progress_manager(directory)
            step = manager.latest_step()
            manager.close()
        if step is not None and not config.resume:
            raise ConfigError(f"{directory}: holds Phase 1's progress of task {name!r} (after batch {step}); pass --resume to "
                              "continue it, or give an empty --checkpoint-dir")
        found[name] = step or 0
    return found


def estimate_output_bytes(model: Model, all_batches: dict[str, list[Batch]], config: AnalysisConfig) -> tuple[float, float]:
    """``(output, spill)``: a generous estimate of the bytes the output directory and a spill
    directory will need. Output: per task the orbax state (group Fisher, its Welford state and
    per-sample values, the diagonal, and the kept gradients with ``--save-sample-grads``); per
    ordered pair of tasks the QK-OV scores; figures and JSON. Spill: the kept attention gradients
    or their token factors, as Phase 1 will keep them (:func:`~fisherjax.fisher.collect.kept_bytes`)."""
    layout = model.layout
    groups = sum(int(np.size(v)) for p in layout.paths() for v in group_sizes(layout, p).values())
    options = config.collect_options(layout, longest(all_batches))
    output, spill = 50e6, 0.0
    sizes = [sum(b.num_real for b in chosen) for chosen in all_batches.values()]
    for n, chosen in zip(sizes, all_batches.values()):
        output += 4 * (4 * groups + n * groups + (model.num_params if config.diagonal else 0))
        kept = kept_bytes(model, chosen, options)[0]
        spill += kept
        output += kept if config.save_sample_grads else 0
    if "qkov" in config.phases:
        output += sum(4 * 4 * layout.num_layers * layout.num_heads * a * b for i, a in enumerate(sizes) for j, b in enumerate(sizes) if i != j)
    return 1.2 * output, 1.2 * spill


def environment() -> dict:
    """What a number was computed with: package versions, the git commit when fisherjax runs from a
    checkout, the backend and its devices, the compilation cache and the XLA flags."""
    from importlib import metadata

    versions = {}
    for package in ("fisherjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy", "scipy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    devices = jax.devices()
    return {
        "versions": versions,
        "git": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backend": backend.platform(),
        "devices": [{"kind": d.device_kind, "platform": d.platform} for d in devices],
        "compilation_cache": compilation_cache.current(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _git_commit() -> dict | None:
    """``{"commit", "dirty"}`` of the checkout fisherjax runs from, or None when it is installed."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        # --no-optional-locks: status refreshes .git/index when it may, which writes outside --out (and under a
        # file-size limit left a truncated index.lock that stopped every later git command)
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def analyze(config: AnalysisConfig) -> dict:
    """Run the configured phases and write the output directory; returns results.json's content.

    Nothing is written outside the output directory (:mod:`fisherjax.outdir`): the destination is
    checked first (a new path, an empty directory, an earlier fisherjax output, or ``overwrite``),
    its filesystem and the spill directory's are checked for room before Phase 1, the run is
    written into a staging directory that replaces the destination only when every phase
    succeeded, and kept gradients spilled to disk live in a private folder of the spill directory
    that is removed at the end, whatever happens.

    What each stretch cost (loading, Phase 1's collection and each task's, every phase, the
    figures; :mod:`fisherjax.telemetry`) goes into ``results.json["phases"]`` and the report's
    "Where the time went".
    """
    with telemetry.running() as whole:
        return _analyze(config, whole)


def _analyze(config: AnalysisConfig, whole: telemetry.Meter) -> dict:
    """:func:`analyze` inside the meter ``whole`` of the entire run."""
    stretches: dict[str, telemetry.Stretch] = {}
    destination = Path(config.out).absolute()
    writer = jax.process_index() == 0  # in a multi-process run only process 0 touches the output
    if writer:
        outdir.check_destination(destination, overwrite=config.overwrite)
        outdir.remove_stale_staging(destination)
    mesh = sharding.run_mesh(config.devices)
    devices_used = sharding.data_size(mesh) * sharding.model_size(mesh)
    with naming_memory("load"):
        (model, tasks), stretches["load"] = telemetry.measure(load_inputs, config)
    check_conflict_scope(config, model.layout, {name: len(task) for name, task in tasks.items()})
    resumed = saved_batches(config, list(tasks))
    all_batches = task_batches(model, tasks, config)
    output_bytes, spill_bytes = estimate_output_bytes(model, all_batches, config)
    if writer:
        outdir.check_writable(destination, output_bytes, option="--out")
    if config.spill_dir is not None:
        outdir.check_writable(Path(config.spill_dir), spill_bytes, option="--spill-dir")
    _, stretches["memory check"] = telemetry.measure(check_phase1_memory, model, all_batches, config, mesh)
    with _private_spill(config.spill_dir) as spill_root:
        try:
            with naming_memory("collect"):
                (fishers, per_task), stretches["collect"] = telemetry.measure(collect_all, model, all_batches, config,
                                                                              spill_root=spill_root, mesh=mesh)
            allocator.return_free_memory()
        except OSError as err:
            if disk_errno(err):
                raise disk_error(err, Path(config.spill_dir or destination), "--spill-dir") from None
            raise
        if jax.process_count() > 1:  # every process holds every sample from here on
            fishers = {name: join_shares(f, np.concatenate([b.sample_ids for b in all_batches[name]])) for name, f in fishers.items()}
        ctx = Context(config, model, tasks, all_batches, fishers, mesh)
        if writer and "heads" in config.phase_order():  # every later phase names heads by their category
            with naming_memory("heads (categories)"):
                categories, stretches["heads (categories)"] = telemetry.measure(categorise_heads, model, config)
            ctx = dataclasses.replace(ctx, heads=categories)
        if not writer:  # the pair phases span every process's devices; process 0 alone runs the others and writes
            for phase in config.phase_order():
                if phase in SPANNING_PHASES:
                    run_phase(phase, ctx, None)
            return {"process": jax.process_index(), "fisher": {n: {"samples": f.n_samples} for n, f in fishers.items()}}
        with outdir.staging(destination) as out:
            (out / "figures").mkdir()
            header = {
                "fisherjax": _version(),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": {"platform": platform.platform(), "jax_backend": backend.platform(),
                            "devices": devices_used, "processes": jax.process_count()},
                "environment": environment(),
                "config": dataclasses.asdict(config),
                "model": model_info(model),
                "tasks": {name: {"file": task.source, "samples": len(task), **_truncation(task),
                                 **({"resumed_batches": resumed[name]} if resumed else {})} for name, task in tasks.items()},
            }
            sections = []
            for phase in config.phase_order():
                section, stretches[phase] = telemetry.measure(run_phase, phase, ctx, out)
                sections.append(section)
            sections, stretches["report"] = telemetry.measure(report.save_figures, out, sections)
            total = whole.stop()
            masks_json = next((sec.json for sec in sections if sec.key == "masks"), {})
            heads_json = next((sec.json for sec in sections if sec.key == "heads"), {})
            work_done = phase_work(ctx, resumed, masks_json.get("head_pruning"), heads_json.get("tasks"))
            sections.append(timing_report.section(stretches, per_task, total, work_done, cost_levers(config)))
            header["seconds"] = round(total.seconds, 1)
            heading = fisher_report.heading(header["model"], header["created"], header["machine"], header["seconds"])
            results = report.write(out, header, sections, heading=heading)
            outdir.write_marker(out, {"fisherjax": header["fisherjax"], "created": header["created"], "config": results["config"]})
    return results


def cost_levers(config: AnalysisConfig) -> dict[str, str]:
    """What sets the cost of each stretch whose cost an option sets, in those options at their
    values in ``config`` (:func:`fisherjax.report.timing.section` names them under its table)."""
    return {
        "collect": "a gradient pass of every sample of every task (--max-samples)",
        "curvature": (f"--curvature-samples {config.curvature_samples} and --curvature-k {config.curvature_k}; "
                      "leave `curvature` out of --phases to skip it"),
        "heads": (f"--head-samples {config.head_samples} a task, each ablated head a forward pass of them "
                  f"(--ablation-heads {config.ablation_heads}; 0 skips the ablation table)"),
        "masks": f"--pruning-samples {config.pruning_samples} a task, a forward pass of them per head mask tried",
        "conflicts": "the n_A · n_B sample pairs (--max-samples)",
        "qkov": "the n_A · n_B sample pairs (--max-samples)",
    }


def phase_work(ctx: Context, resumed, experiment: dict | None = None, heads_tasks: dict | None = None) -> dict[str, float]:
    """Matrix-product FLOPs of the stretches whose work :mod:`fisherjax.work` counts from the batches
    as they ran: Phase 1's collection (``COLLECT_FORWARDS`` forwards a row, every task's batches;
    left out of a resumed or multi-process run, whose batches this process did not all run), the
    ``heads`` phase (:func:`~fisherjax.work.heads_flops` a row of each task's first
    ``head_samples``, each ablated head from its own layer: ``heads_tasks``, the phase's per-task
    entries, whose ablation tables have a number where a head was ablated) and the masks phase's
    pruning experiment (a forward per gathered row and mask, at the gathered length:
    ``experiment``, its result), and the pair phases (:func:`pair_work`)."""
    layout, config = ctx.model.layout, ctx.config
    counted = pair_work(ctx) if jax.process_count() == 1 else {}  # a process of several holds its share of the samples
    if experiment is not None:
        counted["masks"] = sum(r["rows_evaluated"] * r["masks_evaluated"] * work.forward_flops(layout, r["length"]).total
                               for r in experiment["tasks"].values())
    if not any(resumed.values()) and jax.process_count() == 1:
        counted["collect"] = sum(work.batches_flops(layout, b, lambda f: work.COLLECT_FORWARDS * f.total) for b in ctx.batches.values())
    if "heads" in config.phase_order():
        def per_row(name: str):
            table = ((heads_tasks or {}).get(name) or {}).get("ablation")
            layers = np.nonzero(np.isfinite(np.asarray(table["accuracy"], np.float64)))[0] if table else None
            return lambda f: work.heads_flops(f, layout, 1, 1, config.ablation_heads if table is None else len(layers), layers)

        counted["heads"] = sum(work.batches_flops(layout, first_batches(ctx, name, config.head_samples), per_row(name))
                               for name in ctx.fishers)
    return counted


def pair_work(ctx: Context) -> dict[str, float]:
    """Matrix-product FLOPs of the pair phases that ran, from the kept samples' counts and storage:
    Phase 5 (``conflicts``: per pair with enough samples, :func:`fisherjax.work.conflict_pair_flops`
    over the kept features, A × A and B × B beside A × B, and each task's kept token factors formed
    once, as the sliced Grams read them) and Phase 6 (``qkov``: per ordered pair,
    :func:`fisherjax.work.qkov_pair_flops` and the formations of its
    :func:`fisherjax.work.qkov_pair_reads`). Floors, like the plan's: a run that reads a task more
    often (chunk pairs, tiles that do not hold B) does more."""
    phases = ctx.config.phase_order()
    kept = {name: fisher.sample_grads for name, fisher in ctx.fishers.items()}
    if not kept or any(grads is None for grads in kept.values()):
        return {}
    sizes = {name: len(grads) for name, grads in kept.items()}
    features = max(sum(math.prod(np.shape(leaf)[1:]) for leaf in grads.grads.values()) for grads in kept.values())  # a sample's
    reform = {name: work.reform_flops((leaf.shape[1:], leaf.inputs.shape[-2]) for leaf in grads.grads.values()  # one sample's
                                      if isinstance(leaf, FactoredGrads)) for name, grads in kept.items()}
    counted = {"conflicts": 0.0, "qkov": 0.0}
    if "conflicts" in phases:
        options = conflicts.ConflictOptions()
        for a, b in itertools.combinations(kept, 2):
            if sizes[a] >= options.samples_needed("a") and sizes[b] >= options.samples_needed("b"):
                counted["conflicts"] += (work.conflict_pair_flops(sizes[a], sizes[b], features, (sizes[a], sizes[b]))
                                         + sizes[a] * reform[a] + sizes[b] * reform[b])
    if "qkov" in phases:
        score, kernel, layout = ctx.config.score_options(), ctx.config.kernel_options(), ctx.model.layout
        needed = score.min_fisher_samples
        for a, b in itertools.permutations(kept, 2):
            formed_once = qkov_together(ctx, sizes[a], sizes[b]) and qkov.formed_once(
                sizes[a], sizes[b], layout, test=[work.qkov_tested(sizes[t], needed) for t in (a, b)],
                stores_per_task=1 if all(kept[t].derived for t in (a, b)) else 2, score=score, kernel=kernel)
            in_place = all(qkov.samples_in_place(kept[t], layout, score.include_bias) for t in (a, b))
            staged = qkov.stored_sample_layer_bytes([kept[t].grads for t in (a, b)], layout) if backend.stages_reads() else None
            reads = functools.partial(qkov.partner_reads, layout=layout, include_bias=score.include_bias, kernel=kernel, in_place=in_place,
                                      sample_layer_bytes=staged)
            reads_a, reads_b = work.qkov_pair_reads(sizes[a], sizes[b], needed, ctx.fishers[a].diagonal is not None, formed_once, reads,
                                                    fit_diagonal=ctx.fishers[a].partial_diagonal is not None)
            counted["qkov"] += (work.qkov_pair_flops(sizes[a], sizes[b], ctx.model.layout, score.include_bias, needed)
                                + reads_a * reform[a] + reads_b * reform[b])
    return {phase: flops for phase, flops in counted.items() if flops > 0}  # a phase that tested no pair has no rate


def _truncation(task: Task) -> dict:
    """The task's truncated samples, for results.json (when the task records them)."""
    truncated = getattr(task, "truncated", None)
    if truncated is None:
        return {}
    ids = [int(i) for i in truncated]
    return {"truncated_samples": len(ids), "truncated_ids": ids}


@contextlib.contextmanager
def _private_spill(spill_dir: Path | None):
    """A folder of this run's own inside ``spill_dir`` (removed on exit, whatever happens), or None."""
    if spill_dir is None:
        yield None
        return
    spill_dir = Path(spill_dir)
    created = not spill_dir.exists()
    try:
        spill_dir.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=".fisherjax-spill-", dir=spill_dir))
    except OSError as err:
        raise ConfigError(f"{spill_dir}: --spill-dir cannot be created ({err.strerror})") from None
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                spill_dir.rmdir()


def _version() -> str:
    from fisherjax import __version__

    return __version__


def parse_thresholds(values: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """``["induction=0.5", ...]`` → ``(("induction", 0.5), ...)`` (names and ranges are checked by
    :class:`AnalysisConfig`)."""
    out = []
    for v in values:
        name, sep, value = v.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not name or number is None:
            raise ConfigError(f"--head-threshold expects NAME=NUMBER, got {v!r}")
        out.append((name, number))
    return tuple(out)


def parse_task_args(values: Sequence[str]) -> tuple[tuple[str, Path], ...]:
    """``["math=tasks/math.jsonl", ...]`` → ``(("math", Path(...)), ...)`` (the names are checked by
    :class:`AnalysisConfig`)."""
    out = []
    for v in values:
        name, sep, file = v.partition("=")
        if not sep or not name or not file:
            raise DataError(f"--task expects NAME=FILE, got {v!r}")
        out.append((name, Path(file)))
    return tuple(out)


__all__ = ["PHASES", "AnalysisConfig", "Context", "analyze", "collect_all", "load_inputs", "model_info", "parse_task_args",
           "parse_thresholds", "task_batches"]
