"""Planning a production run before it starts: ``fisherjax plan``.

From a ``config.json`` alone (no weights: parameters are ``jax.ShapeDtypeStruct`` leaves,
:meth:`Model.abstract <fisherjax.models.model.Model.abstract>`) :func:`plan` answers, for ``samples`` per task, ``tasks`` tasks of
``seq_len`` tokens on ``devices`` devices of ``device_memory_gb`` each:

* **measured** — the per-device memory of the Phase 1 step, XLA's compiled memory analysis
  (:func:`step_memory`) of the step ``analyze`` runs (its Phase 1 options, the accelerator's
  one-``vmap`` code path), for every candidate micro-batch tried. With as many devices as planned
  (a CPU gets them as forced host devices: the command line re-runs itself with
  ``--xla_force_host_platform_device_count``) it is the *sharded* step compiled on each candidate
  mesh, ``("data",)`` and, when that does not fit, ``("data", "model")`` — one device's program with
  its collectives and partitioned matmuls (:attr:`Plan.sharded_step`);
* **derived** — everything else, each from a formula stated where it is computed: when the mesh
  cannot be compiled (fewer devices than planned), the per-device memory with parameters sharded
  over a ``"model"`` axis (:func:`model_axis_bytes`; :attr:`Plan.model_axis_estimate`), the
  storage of the kept per-sample gradients (:func:`kept_storage_bytes`), every phase's work —
  Phase 1, the method comparison, the ``heads`` and masks phases from one sample's forward FLOPs
  (:mod:`fisherjax.work`), Phases 5 and 6 (:func:`conflict_flops`, :func:`qkov_flops`) — the bytes
  Phase 5 streams from that storage (:func:`conflict_bytes_read`), whether the method comparison
  fits one device by ``analyze``'s rule (:func:`curvature_plan`) and the time the work takes at
  an *assumed* throughput.

Sizes are bytes; the command line prints GB = 10⁹ bytes. The compiled figures are those of the
backend this process runs on (XLA:CPU on a workstation); an accelerator's compiler lays out
temporaries differently (benchmarks/RESULTS.md compares the two for a 7B step).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from jax.sharding import AbstractMesh

from fisherjax import backend
from fisherjax.analysis import qkov
from fisherjax.analysis.qkov.options import CPU_BUDGET_BYTES
from fisherjax.analysis.conflicts import KEPT_SHARE, ConflictOptions, group_scope_bytes, group_test_core_seconds, group_test_values
from fisherjax.analysis.conflicts.gram import chunk_size_for, slice_dots_fit
from fisherjax.analysis.conflicts.sources import Stream, grouping_for
from fisherjax.config import DecoderConfig, read_hf_config
from fisherjax.curvature import compare
from fisherjax.errors import ConfigError
from fisherjax.fisher.options import STORAGE_DTYPES, CollectOptions, factored_paths, kept_paths
from fisherjax.fisher.step import kept_values as step_kept_values
from fisherjax.fisher.step import DEVICE_STEP_SHARE, MICRO_BATCHES, StepMemory, largest_fitting, make_plan
from fisherjax.fisher.step import step_memory as analysed_step
from fisherjax.layout import ModelLayout, flatten
from fisherjax.models.model import Model
from fisherjax.pipeline import (
    CURVATURE_AUTO_PARAMETERS, CURVATURE_MEMORY_SHARE, AnalysisConfig, conflict_groups, conflict_open_groups, conflict_scope, curvature_skip,
    default_storage, most_pruning_masks,
)
from fisherjax.settings import check
from fisherjax.sharding import DATA, MODEL, data_size, make_mesh, param_spec
from fisherjax.work import (
    COLLECT_FORWARDS, ForwardFlops, collect_flops, conflict_pair_flops, curvature_flops, forward_flops, heads_flops, masks_flops,
    qkov_pair_flops, qkov_pair_reads, qkov_tested,
)
from fisherjax.work import reform_flops as work_reform_flops

GB = 1e9
"""Bytes in a GB as the options and the printed plan count them."""

SAFETY = DEVICE_STEP_SHARE
"""Fraction of a device's (and a host's) memory a plan lets a run fill: the share of its free
memory ``analyze``'s Phase 1 step may fill on an accelerator, so that the plan's micro-batch is the
one the run picks."""

DEFAULT_TFLOPS = 100.0
"""Assumed sustained throughput per device, TFLOP/s, when none is given: an 80 GB data-centre GPU
on these GEMMs in bfloat16/TF32, well below its dense peak. An assumption, not a measurement."""

SEQ_LEN = 512
TASKS = 2
DEVICES = 1
DEVICE_MEMORY_GB = 80.0
DEVICES_PER_HOST = 8
HOST_MEMORY_GB = 256.0
"""Defaults of :func:`plan` (and of ``fisherjax plan``'s options)."""

@dataclasses.dataclass(frozen=True)
class Plan:
    """A production run's plan (see the module docstring for what is measured and what derived).

    Attributes:
      model_type, parameters, parameter_bytes, layers, hidden_size: the model (float32 parameters,
        as :func:`fisherjax.models.load_pretrained` loads them).
      samples, tasks, seq_len: the run: ``samples`` per task of ``seq_len`` tokens.
      devices, device_memory_bytes, safety: the machine; a figure fits when ``≤ safety × memory``.
      mesh: ``(data, model)`` sizes of the recommended mesh (``model == 1``: a ``("data",)`` mesh).
      micro_batch, global_micro_batch: samples per device per step, and per step over the mesh
        (``micro_batch × data``).
      step: compiled memory of the step at ``micro_batch``; ``candidates`` every micro-batch compiled.
      per_device_bytes: ``step.total_bytes``, or with a ``"model"`` axis :func:`model_axis_bytes`.
      model_axis_estimate: ``per_device_bytes`` is derived (parameters sharded), not compiled.
      sharded_step: the step compiled is the sharded one on the recommended mesh (as many devices
        as planned were there to compile it); else the single-device step.
      options: the Phase 1 options the step was compiled with.
      kept_parameters, kept_values, factored, stored_values, storage_dtype: parameters whose
        per-sample gradients are kept, the numbers kept for them per sample (:func:`kept_values`:
        fewer where ``factored`` kernels are kept as token factors), the numbers stored per sample
        (more when ``C_i`` is kept beside them), their storage dtype.
      storage_given: the storage dtype was asked for; else it is ``analyze``'s default.
      float32_bytes_per_host: a host's share stored in float32 (what the signed variants,
        ``--qkov-variant signed`` and ``kfac``, keep by default), for the choice the plan prints beside a narrower default.
      storage_bytes, storage_bytes_per_device, storage_bytes_per_host, hosts, host_memory_bytes,
        spill: kept-gradient storage in all, per ``"data"`` shard, per host; whether it must spill
        to disk (``--spill-dir``).
      phase5_flops, phase6_flops, phase5_bytes_read, phase5_chunk: the work of Phases 5 and 6,
        and what Phase 5 reads from the kept-gradient storage: by parameter slice, on one device or
        a mesh (``phase5_chunk`` None, :func:`conflict_slices`), else in chunk pairs of
        ``phase5_chunk`` samples.
      phase6_bytes_read: what Phase 6 reads from the kept-gradient storage, at least
        (:func:`qkov_bytes_read`).
      phase6_one_pass: whether a pair's two directions are scored in one pass that reads each
        kept sample once (:func:`fisherjax.analysis.qkov.formed_once`, with the host's memory
        less the kept gradients it holds).
      phase5_group_bytes, phase5_scope: host memory of a pair's per-group conflict tests
        (``conflicts.group_scope_bytes``) and the scope ``--conflict-scope auto`` takes with a
        host's memory (:func:`fisherjax.pipeline.conflict_scope`).
      phase5_test_values, phase5_test_core_seconds: the values Phase 5 tests on the host over all
        pairs of tasks in that scope (``conflicts.group_test_values``, one group on the whole
        gradient) and the host core-seconds they take where every test conflicts
        (``conflicts.group_test_core_seconds``; the tests use every core: divide by the host's);
        phase5_test_core_seconds_independent: the same for tasks that do not conflict.
      phase5_reform_flops, phase6_reform_flops: the part of that work spent forming factored
        kernels' gradients where they are read (:func:`reform_flops` per sample read,
        :func:`conflict_sample_reads`, :func:`qkov_sample_reads`).
      phase6_scores_bytes, phase6_output_bytes: one ordered pair's QK-OV scores (``qkov.scores_bytes``:
        the host holds them and their raw sums while they are formed, twice this) and all ordered
        pairs' in ``qkov.npz``.
      throughput_tflops, throughput_assumed, phase5_seconds, phase6_seconds: the time of that work
        over all devices at that throughput per device (compute only, no I/O).
      backend: the XLA backend that compiled the step; compile_seconds: time spent compiling (steps an
        earlier plan of the model in this process compiled are not compiled again: :func:`step_memory`).
      forward: ``work.ForwardFlops`` of one sample at ``seq_len``; phase1_flops, phase1_seconds:
        Phase 1's work (``work.collect_flops``) over all devices.
      curvature: the method comparison's memory rule and work on one device (:class:`CurvaturePlan`).
      heads_flops, heads_seconds: the ``heads`` phase (``work.heads_flops``) at ``analyze``'s
        defaults, on one device; masks, masks_flops, masks_seconds: the masks phase's pruning
        experiment, at most ``masks`` masks (``work.masks_flops``), on one device.
      total_seconds: every phase's compute at the throughput (the comparison's only where the
        default run takes it).
    """

    model_type: str
    parameters: int
    parameter_bytes: int
    layers: int
    hidden_size: int
    samples: int
    tasks: int
    seq_len: int
    devices: int
    device_memory_bytes: float
    safety: float
    mesh: tuple[int, int]
    micro_batch: int
    global_micro_batch: int
    step: StepMemory
    candidates: tuple[StepMemory, ...]
    per_device_bytes: float
    model_axis_estimate: bool
    sharded_step: bool
    options: CollectOptions
    kept_parameters: int
    kept_values: int
    factored: tuple[str, ...]
    stored_values: int
    storage_dtype: str
    storage_given: bool
    float32_bytes_per_host: float
    storage_bytes: float
    storage_bytes_per_device: float
    storage_bytes_per_host: float
    hosts: int
    host_memory_bytes: float
    spill: bool
    phase5_flops: float
    phase6_flops: float
    phase5_reform_flops: float
    phase6_reform_flops: float
    phase5_bytes_read: float
    phase6_bytes_read: float
    phase6_one_pass: bool
    phase5_chunk: int | None
    phase5_group_bytes: float
    phase5_scope: str
    phase5_test_values: int
    phase5_test_core_seconds: float
    phase5_test_core_seconds_independent: float
    phase6_scores_bytes: float
    phase6_output_bytes: float
    throughput_tflops: float
    throughput_assumed: bool
    phase5_seconds: float
    phase6_seconds: float
    backend: str
    compile_seconds: float
    forward: ForwardFlops
    phase1_flops: float
    phase1_seconds: float
    curvature: CurvaturePlan
    heads_flops: float
    heads_seconds: float
    masks: int
    masks_flops: float
    masks_seconds: float
    total_seconds: float


def read_config(model_dir: str | Path | None = None, config_file: str | Path | None = None) -> DecoderConfig:
    """The :class:`DecoderConfig` of ``model_dir/config.json`` or of ``config_file`` (exactly one);
    no weights are read.

    Raises:
      ConfigError: one line naming the directory or file: missing, not a directory / file,
        unreadable, not JSON, or bad fields (:func:`fisherjax.config.read_hf_config`).
    """
    check((model_dir is None) != (config_file is None), "plan needs exactly one of --model DIR and --config FILE")
    if model_dir is not None:
        directory = Path(model_dir)
        check(directory.is_dir(), f"{directory}: --model is not a directory (pass a checkpoint directory holding config.json)")
        file = directory / "config.json"
    else:
        file = Path(config_file)
        check(not file.is_dir(), f"{file}: --config is a directory; pass its config.json, or use --model DIR")
    check(file.is_file(), f"{file}: no such file (--{'model' if model_dir is not None else 'config'})")
    return read_hf_config(file)[0]


@functools.lru_cache(maxsize=64)
def step_memory(config: DecoderConfig, micro_batch: int, seq_len: int, options: CollectOptions, mesh=None) -> StepMemory:
    """``lower_step(Model.abstract(config), micro_batch, seq_len, options).compile().memory_analysis()``
    as a :class:`StepMemory` — with ``mesh``, of the sharded step (``micro_batch`` per ``"data"``
    shard; XLA reports one device's program, collectives and partitioned matmuls included).

    Kept per arguments (``functools.lru_cache``): plans of one model in one process — a notebook
    trying sample counts, devices or memories — compile each step once, not once per plan."""
    return analysed_step(Model.abstract(config), micro_batch * data_size(mesh), seq_len, options, mesh)


def model_axis_bytes(model: Model, step: StepMemory, data: int, model_size: int) -> float:
    """Derived per-device memory of ``step`` with parameters sharded over a ``"model"`` axis of
    ``model_size`` devices (FSDP-style, :func:`fisherjax.sharding.param_spec`):

        step.total − P + Σ_leaves P_leaf / s_leaf + P_layer + max P_outside

    ``P`` all parameter bytes, ``s_leaf`` = ``model_size`` for a leaf the axis divides (1 for one
    it does not), ``P_layer`` one layer's parameters and ``max P_outside`` the largest leaf outside
    the layer stack — gathered whole while they are computed with. Activations, the accumulation
    state and the kept gradients are assumed not to shrink (each device of a ``"model"`` group
    runs the whole micro-batch), so the figure errs high.
    """
    mesh = AbstractMesh((data, model_size), (DATA, MODEL))
    leaves = flatten(model.params)
    nbytes = {p: math.prod(x.shape) * np.dtype(x.dtype).itemsize for p, x in leaves.items()}
    sharded = sum(b / model_size if any(param_spec(leaves[p].shape, mesh)) else b for p, b in nbytes.items())
    layer = sum(b for p, b in nbytes.items() if p.startswith("layers/")) / model.config.num_layers
    outside = max((b for p, b in nbytes.items() if not p.startswith("layers/")), default=0)
    return step.total_bytes - sum(nbytes.values()) + sharded + layer + outside


def kept_parameters(layout: ModelLayout, options: CollectOptions) -> int:
    """Parameters per sample whose gradients Phase 1 keeps (:func:`~fisherjax.fisher.options.kept_paths`)."""
    return sum(math.prod(layout.spec(p).shape) for p in kept_paths(layout, options.keep_sample_grads))


def _factored(layout: ModelLayout, options: CollectOptions) -> tuple[str, ...]:
    return factored_paths(layout, kept_paths(layout, options.keep_sample_grads), options.sample_grads_factors)


def kept_values(layout: ModelLayout, options: CollectOptions, seq_len: int, *, contributions: bool = False) -> int:
    """Numbers Phase 1 keeps per sample (:func:`fisherjax.fisher.step.kept_values`): a kept leaf's
    parameters, or, for a kernel ``[*lead, d_in, d_out]`` kept as token factors
    (:mod:`fisherjax.fisher.factored`), ``lead · seq_len · (d_in + d_out)`` — what Phases 5 and 6
    read; with ``contributions``, also the dense ``C_i`` a Fisher other than the empirical keeps
    beside them — what is stored."""
    return step_kept_values(layout, make_plan(layout, options), seq_len, contributions=contributions)


def reform_flops(layout: ModelLayout, options: CollectOptions, seq_len: int) -> float:
    """FLOPs of forming one sample's gradients of the kernels kept as token factors at ``seq_len``
    positions, each time a phase reads them (:func:`fisherjax.work.reform_flops`)."""
    return work_reform_flops((layout.spec(p).shape, seq_len) for p in _factored(layout, options))


def kept_sample_layer_bytes(layout: ModelLayout, options: CollectOptions, seq_len: int) -> Callable[[tuple[tuple[str, str], ...]], float]:
    """``kinds -> bytes``: one kept sample of one layer of the QK-OV part ``kinds`` as the run
    stores it (token factors at ``seq_len`` positions for a factored kernel, else the gradient, in
    ``options.sample_grads_dtype``) — what a device stages for a part cut into groups of heads
    (:func:`fisherjax.analysis.qkov.partner_reads`' ``sample_layer_bytes``)."""
    factored, itemsize = set(_factored(layout, options)), np.dtype(STORAGE_DTYPES[options.sample_grads_dtype]).itemsize

    def numbers(path: str) -> int:
        shape = layout.spec(path).shape[1:]  # one layer of a layer-stacked leaf
        return seq_len * (shape[-2] + shape[-1]) if path in factored else math.prod(shape)

    return lambda kinds: float(itemsize * sum(numbers(p) for p in {layout.block_sources(b, k)[0] for b, k in kinds}))


@dataclasses.dataclass(frozen=True)
class CurvaturePlan:
    """Phase 1's method comparison in a plan: ``analyze``'s rule
    (:func:`fisherjax.pipeline.curvature_skip`) on one device whose free memory is the fitting
    limit less the float32 parameters.

    ``samples``, ``k``: its samples (``--curvature-samples``, at most a task's) and eigenvalues
    (``--curvature-k``); ``gram``: the top comes from the Gram route, else from Lanczos;
    ``peak_bytes``: ``compare.peak_bytes`` (the gradients or basis whole); ``least_bytes``:
    ``compare.least_bytes`` (the gradients in the most column slices); ``stream_bytes``: what the
    least holds beside them (``compare.stream_bytes``: K-FAC's stage by its smallest groups of
    parameters, or one model-sized probe; and a pass over one sample); ``free_bytes``: what
    the device has for it; ``skip``: why the default run skips it (None: it runs); ``forced_skip``:
    the same with ``--curvature``; ``slices``: the column slices the gradients are formed in and
    not held, in the run described (the default run's when it runs, else ``--curvature``'s; 0:
    held whole, :func:`~fisherjax.curvature.compare.gram_slices`) and ``groups`` the groups of
    parameters K-FAC's stage then goes by (:func:`~fisherjax.curvature.compare.stage_plan`; 0
    with the gradients held), in ``factor_passes`` K-FAC passes (more than ``groups`` where a
    group's factors go by ranges of layers); ``fit_samples``,
    ``fit_k``: the most samples that fit with ``--curvature``, and ``k`` (0, 0: nothing fits:
    ``stream_bytes`` alone does not); ``flops``, ``seconds``:
    ``work.curvature_flops`` of that run at the throughput.
    """

    samples: int
    k: int
    gram: bool
    peak_bytes: float
    least_bytes: float
    stream_bytes: float
    free_bytes: float
    skip: str | None
    forced_skip: str | None
    slices: int
    groups: int
    factor_passes: int
    fit_samples: int
    fit_k: int
    flops: float
    seconds: float


def curvature_plan(model: Model, forward: ForwardFlops, samples: int, free_bytes: float, rate: float, storage_dtype: str,
                   config: AnalysisConfig | None = None, seq_len: int = 0) -> CurvaturePlan:
    """:class:`CurvaturePlan` of ``model`` for tasks of ``samples`` samples of ``seq_len`` tokens,
    ``free_bytes`` on its device and ``rate`` FLOP/s, with ``config``'s comparison settings (default:
    ``analyze``'s; its passes go ``batch_size`` samples at a time with ``G̃`` held, one without).

    What fits with ``--curvature``: the most samples ``m ≤ n`` at the asked ``k`` (fewer samples
    than ``k`` take the Gram route too, whose memory does not depend on ``k``)."""
    config = config or AnalysisConfig()
    k, n = config.curvature_k, min(config.curvature_samples, samples)
    size = int(model.num_params)

    tokens = {"tokens": min(config.batch_size, n) * seq_len, "sample_tokens": seq_len}

    def least(m: int) -> float:
        return float(compare.least_bytes(model, k, n=m, sample_grads_dtype=storage_dtype, **tokens))

    fit = next(((m, k) for m in range(n, 0, -1) if least(m) <= free_bytes), (0, 0))
    peak = float(compare.peak_bytes(model, k, n=n, sample_grads_dtype=storage_dtype, tokens=tokens["tokens"], seq_len=seq_len or None))
    lowest = least(n)
    skip = curvature_skip(size, peak, free_bytes, config.curvature, lowest)
    gram = compare.from_gram(size, k, n)
    forced_skip = curvature_skip(size, peak, free_bytes, True, lowest)
    slices = groups = factor_passes = 0
    if skip is not None and forced_skip is None and gram:  # the run described is --curvature's, within all the free memory
        slices = len(compare.gram_slices(model, n, storage_dtype, free_bytes, **tokens) or ())
    if slices:
        parts = compare.stage_plan(model, free_bytes, min(config.batch_size, n), seq_len)[1]
        groups, factor_passes = len(parts), sum(len(g.ranges) or 1 for g in parts)
    flops = curvature_flops(forward, n, size, k, slices=slices, groups=groups, factor_passes=factor_passes or None)
    return CurvaturePlan(
        samples=n, k=k, gram=gram, peak_bytes=peak, least_bytes=lowest,
        stream_bytes=float(compare.stream_bytes(model, seq_len)),
        free_bytes=float(free_bytes), skip=skip, forced_skip=forced_skip,
        slices=slices, groups=groups, factor_passes=factor_passes, fit_samples=fit[0], fit_k=fit[1], flops=flops, seconds=flops / rate,
    )


def kept_storage_bytes(samples: int, tasks: int, stored: int, dtype: str) -> float:
    """``samples × tasks × stored × itemsize(dtype)``: the kept per-sample arrays (``stored``: the
    numbers stored per sample, :func:`kept_values` with ``contributions``)."""
    return float(samples) * tasks * stored * np.dtype(STORAGE_DTYPES[dtype]).itemsize


def conflict_flops(n: int, tasks: int, features: int, references: int) -> float:
    """Phase 5's GEMM work: per unordered pair of tasks :func:`fisherjax.work.conflict_pair_flops`
    with ``references`` within-task Grams of ``n`` samples: ``C(tasks, 2) · (1 + references) · 2 · n² · F``."""
    return math.comb(tasks, 2) * conflict_pair_flops(n, n, features, (n,) * references)


def qkov_flops(n: int, tasks: int, layout: ModelLayout, include_bias: bool, min_samples: int) -> float:
    """Phase 6's GEMM work: ``tasks · (tasks − 1)`` ordered pairs of :func:`fisherjax.work.qkov_pair_flops`."""
    return tasks * (tasks - 1) * qkov_pair_flops(n, n, layout, include_bias, min_samples)


def conflict_sample_reads(n: int, tasks: int, references: int, chunk: int | None, data: int = 1) -> float:
    """Samples Phase 5 reads from the kept-gradient storage (a sample read once counts once). By
    parameter slice (``chunk`` None, on one device or a mesh: :func:`conflict_slices`) the Grams of
    a pair of tasks are built in one pass over the slices
    (:func:`~fisherjax.analysis.conflicts.gram.sliced_grams`), which reads each task once:

        C(tasks, 2) · 2n

    In chunk pairs a Gram of A × B reads A once and B once per row chunk of A — ``data · c``
    samples, ``c`` per device — unless B fits one chunk (then it is read once,
    :func:`~fisherjax.analysis.conflicts.gram.split_sides`):

        C(tasks, 2) · (1 + references) · (n + ⌈n / (data · c)⌉ · n)   (c < n;  2 · n otherwise)
    """
    if chunk is None:
        return math.comb(tasks, 2) * 2.0 * n
    per_gram = 2 * n if chunk >= n else n + math.ceil(n / (data * chunk)) * n
    return math.comb(tasks, 2) * (1 + references) * float(per_gram)


def conflict_bytes_read(n: int, tasks: int, features: int, references: int, dtype: str, chunk: int | None, data: int = 1) -> float:
    """Bytes Phase 5 reads from the kept-gradient storage: :func:`conflict_sample_reads` ``· w · F``,
    ``w`` the storage itemsize, ``F`` the numbers stored per sample (:func:`kept_values`)."""
    width = np.dtype(STORAGE_DTYPES[dtype]).itemsize
    return conflict_sample_reads(n, tasks, references, chunk, data) * width * features


def qkov_sample_reads(n: int, tasks: int, min_samples: int, diagonal: bool = True, formed_once: bool = False,
                      partner_reads: Callable[[int, int], int] = lambda n_x, n_y: 1) -> float:
    """Samples Phase 6 reads from the kept-gradient storage: ``tasks · (tasks − 1)`` ordered pairs
    of :func:`fisherjax.work.qkov_pair_reads` (``formed_once``: each pair's two directions
    computed together, :func:`fisherjax.analysis.qkov.formed_once`; ``partner_reads``: how often a
    score array reads its partner, :func:`fisherjax.analysis.qkov.partner_reads`, 1 by default)."""
    return float(tasks * (tasks - 1) * sum(qkov_pair_reads(n, n, min_samples, diagonal, formed_once, partner_reads)))


def qkov_bytes_read(sample_reads: float, layout: ModelLayout, include_bias: bool, sample_layer_bytes: Callable) -> float:
    """Bytes Phase 6 reads from the kept-gradient storage, at least: its ``sample_reads``
    (:func:`qkov_sample_reads`) times one sample's QK-OV slices as stored, every layer
    (``sample_layer_bytes``, :func:`kept_sample_layer_bytes`). A part cut into groups of heads
    and read from the host rereads the factor it does not cut once per group (an accelerator
    stages it instead where that fits, ``qkov.partner_reads``): not counted."""
    kinds = tuple((b, k) for b, k in layout.attention_blocks() if k == "kernel" or include_bias)
    return sample_reads * layout.num_layers * sample_layer_bytes(kinds)


def qkov_kernel(device_memory_bytes: float, parameter_bytes: float) -> qkov.KernelOptions:
    """The QK-OV kernel of a planned run on accelerators of ``device_memory_bytes`` each, holding
    ``parameter_bytes`` of the model: the batched contraction (:func:`fisherjax.backend.qkov_contraction`
    on a GPU or TPU) and the tile budget :func:`fisherjax.backend.working_budget_bytes` gives there,
    :data:`~fisherjax.backend.DEVICE_WORKING_SHARE` of what the parameters leave of the fitting limit."""
    free = max(SAFETY * device_memory_bytes - parameter_bytes, 0.0)
    return qkov.KernelOptions(contraction="batched", memory_budget_bytes=max(CPU_BUDGET_BYTES, backend.DEVICE_WORKING_SHARE * free))


def reference_grams(conflicts: ConflictOptions) -> int:
    """Within-task Grams Phase 5 builds beside A × B: A × A and B × B for ``reference="both"``, else one."""
    return {"both": 2}.get(conflicts.reference, 1)


def conflict_slices(layout: ModelLayout, options: CollectOptions, n: int, conflicts: ConflictOptions) -> bool:
    """Whether Phase 5 reads the kept gradients a parameter slice at a time (with or without a
    mesh): its per-slice dot products of ``n`` samples a task fit the conflicts' memory budget
    (:func:`~fisherjax.analysis.conflicts.gram.slices_fit`; grouped: A × B, and the references in
    the per-group scope). Else it reads them in chunk pairs of samples."""
    shapes = {p: layout.spec(p).shape for p in kept_paths(layout, options.keep_sample_grads)}
    entries = n * n * (int(conflicts.by_group) + (reference_grams(conflicts) if conflicts.scope == "groups" else 0))
    return slice_dots_fit(shapes, grouping_for(shapes, layout), entries, conflicts.memory_budget_bytes)


def conflict_chunk(n: int, features: int, budget_bytes: float) -> int:
    """Samples per Phase 5 chunk at ``budget_bytes`` (:func:`~fisherjax.analysis.conflicts.gram.chunk_size_for`)."""
    stream = Stream("plan", lambda size: iter(()), {"kept": (features,)}, n, None, False, None)
    return chunk_size_for(None, stream, stream, budget_bytes=budget_bytes)


def default_options(layout: ModelLayout | None = None, seq_len: int | None = None, *, fisher_type: str = "empirical",
                    sample_grads_form: str = "auto") -> CollectOptions:
    """The Phase 1 options ``fisherjax analyze`` runs with (attention gradients kept; with ``layout``
    and ``seq_len``, kept as ``--sample-grads-form`` keeps them at that length:
    :meth:`~fisherjax.pipeline.AnalysisConfig.collect_options`)."""
    return AnalysisConfig(fisher_type=fisher_type, sample_grads_form=sample_grads_form).collect_options(layout, seq_len)


def plan(
    config: DecoderConfig,
    *,
    samples: int,
    seq_len: int | None = None,
    devices: int = DEVICES,
    device_memory_gb: float = DEVICE_MEMORY_GB,
    tasks: int = TASKS,
    throughput_tflops: float | None = None,
    host_memory_gb: float = HOST_MEMORY_GB,
    devices_per_host: int = DEVICES_PER_HOST,
    storage_dtype: str | None = None,
    options: CollectOptions | None = None,
    sample_grads_form: str | None = None,
    safety: float = SAFETY,
) -> Plan:
    """Plan a run of ``samples`` per task on ``devices`` devices (see the module docstring).

    1. Storage dtype: ``storage_dtype``, or what ``analyze`` keeps when ``--sample-grads-dtype``
       is not given (:func:`~fisherjax.pipeline.default_storage` of the default variant: bfloat16),
       so that the plan's storage, routes and reads are the default run's; ``spill`` when a host's
       share does not fit ``safety × host_memory_gb``.
    2. Micro-batch: of the candidates of :data:`MICRO_BATCHES` up to the samples of one
       ``"data"`` shard, the largest whose per-device memory fits ``safety × device_memory_gb``,
       found by :func:`largest_fitting` (each step compiled once; the next candidate's compiled
       and found not to fit, where there is one).
    3. Mesh: ``(devices, 1)`` when micro-batch 1 fits with replicated parameters, else
       ``(devices / m, m)`` for the smallest divisor ``m > 1`` of ``devices`` whose derived
       :func:`model_axis_bytes` fits.

    Args:
      options: Phase 1 options (default: :func:`default_options`); without an explicit
        ``sample_loop`` the step is compiled on the accelerator's path (one ``vmap``).
      sample_grads_form: how the kept attention kernels are stored, as ``analyze
        --sample-grads-form`` decides it at ``seq_len`` (``"auto"``: as token factors where they
        take at most half of the gradients); None keeps ``options``' own (``"auto"`` without
        ``options``). It sets the storage, the compiled step and the re-forming work of Phases 5–6.
      throughput_tflops: per device; None assumes :data:`DEFAULT_TFLOPS`.

    Raises:
      ConfigError: an option out of range (named), or nothing fits even with the parameters
        sharded over every device.
    """
    check(isinstance(samples, int) and samples >= 1, f"samples per task must be ≥ 1 (--samples), got {samples}")
    check(isinstance(tasks, int) and tasks >= 1, f"tasks must be ≥ 1 (--tasks), got {tasks}")
    check(isinstance(devices, int) and devices >= 1, f"devices must be ≥ 1 (--devices), got {devices}")
    check(isinstance(devices_per_host, int) and devices_per_host >= 1,
          f"devices per host must be ≥ 1 (--devices-per-host), got {devices_per_host}")
    if seq_len is None:  # a model with fewer positions is planned at all of them
        seq_len = min(SEQ_LEN, config.max_position_embeddings)
    check(isinstance(seq_len, int) and 2 <= seq_len <= config.max_position_embeddings,
          f"sequence length must be in [2, {config.max_position_embeddings}] (--seq-len; the model's max_position_embeddings), got {seq_len}")
    for name, flag, value in (("device memory", "--device-memory", device_memory_gb), ("host memory", "--host-memory", host_memory_gb)):
        check(math.isfinite(value) and value > 0, f"{name} must be > 0 GB ({flag}), got {value}")
    check(throughput_tflops is None or (math.isfinite(throughput_tflops) and throughput_tflops > 0),
          f"throughput must be > 0 TFLOP/s (--tflops), got {throughput_tflops}")
    check(0 < safety <= 1, f"safety must be in (0, 1], got {safety}")
    check(storage_dtype is None or storage_dtype in STORAGE_DTYPES,
          f"storage dtype must be one of {tuple(STORAGE_DTYPES)} (--sample-grads-dtype), got {storage_dtype!r}")

    model = Model.abstract(config)
    layout = model.layout
    if options is None:
        sample_grads_form = sample_grads_form or "auto"
        options = default_options()
    if sample_grads_form is not None:
        options = options.replace(sample_grads_factors=default_options(
            layout, seq_len, fisher_type=options.fisher_type, sample_grads_form=sample_grads_form).sample_grads_factors)
    kept = kept_parameters(layout, options)
    read = kept_values(layout, options, seq_len)
    stored = kept_values(layout, options, seq_len, contributions=True)
    hosts = math.ceil(devices / devices_per_host)

    def per_host(dtype: str) -> float:  # samples spread evenly over the hosts
        return kept_storage_bytes(math.ceil(samples / hosts), tasks, stored, dtype)

    host_limit = safety * host_memory_gb * GB
    dtype = storage_dtype or default_storage(AnalysisConfig().qkov_variant)
    options = options.replace(sample_grads_dtype=dtype, sample_loop=False if options.sample_loop is None else options.sample_loop)

    limit = safety * device_memory_gb * GB
    # with as many devices as planned (on a CPU: forced host devices, see `fisherjax plan`) the
    # sharded step itself is compiled on each mesh; else the single-device step, and a "model"
    # axis is derived from it
    on_mesh = devices > 1 and len(jax.devices()) >= devices
    compiled: dict[tuple[int, int, int], StepMemory] = {}
    started = time.perf_counter()

    def measured(mb: int, data: int, m: int) -> StepMemory:
        key = (mb, data, m) if on_mesh else (mb, 1, 1)
        if key not in compiled:
            mesh = make_mesh(data, m, jax.devices()[:devices]) if on_mesh else None
            compiled[key] = step_memory(config, mb, seq_len, options, mesh=mesh)
        return compiled[key]

    def per_device(step: StepMemory, data: int, m: int) -> float:
        return step.total_bytes if m == 1 or on_mesh else model_axis_bytes(model, step, data, m)

    chosen = None
    for m in [1] + [m for m in range(2, devices + 1) if devices % m == 0]:
        data = devices // m
        candidates = [c for c in MICRO_BATCHES if c == 1 or c <= math.ceil(samples / data)]
        best = largest_fitting(candidates, lambda mb: per_device(measured(mb, data, m), data, m), limit)
        if best is not None:
            chosen = (data, m, best, per_device(measured(best, data, m), data, m))
            break
    compile_seconds = time.perf_counter() - started
    if chosen is None:
        need = per_device(measured(1, 1, devices), 1, devices)
        raise ConfigError(
            f"nothing fits: micro-batch 1 needs {need / GB:.1f} GB per device"
            f"{' even with the parameters sharded over all ' + str(devices) + ' devices' if devices > 1 else ''}, "
            f"above {safety:g} × {device_memory_gb:g} GB (--device-memory); use more or larger devices, a shorter --seq-len, or --remat"
        )
    data, m, mb, per_device_bytes = chosen

    groups = conflict_groups(layout)
    held = conflict_open_groups(layout, samples, samples)
    phase5_scope = conflict_scope("auto", samples, samples, groups, host_memory_gb * GB, open_groups=held).scope
    conflicts = ConflictOptions(scope=phase5_scope)  # the route and the reads of the scope analyze takes
    references = reference_grams(conflicts)
    chunk = None if conflict_slices(layout, options, samples, conflicts) else conflict_chunk(samples, kept, conflicts.memory_budget_bytes)
    score = qkov.ScoreOptions()
    reform = reform_flops(layout, options, seq_len)
    phase5_reform = conflict_sample_reads(samples, tasks, references, chunk, data) * reform
    qkov_tests = qkov_tested(samples, score.min_fisher_samples)
    tiles = qkov_kernel(device_memory_gb * GB, model.parameter_bytes / m)  # the parameters as Phase 1 sharded them
    spilled = per_host(dtype) > host_limit  # on disk, read through the page cache; else held in the host's memory
    formed_once = devices == 1 and samples >= score.min_fisher_samples and qkov.formed_once(
        samples, samples, layout, test=(qkov_tests, qkov_tests), stores_per_task=1 if options.fisher_type == "empirical" else 2,
        host_bytes=host_limit - (0.0 if spilled else per_host(dtype)), score=score, kernel=tiles)
    stored_layer = kept_sample_layer_bytes(layout, options, seq_len)
    partner = functools.partial(qkov.partner_reads, layout=layout, include_bias=score.include_bias, kernel=tiles,
                                sample_layer_bytes=stored_layer)
    phase6_reads = qkov_sample_reads(samples, tasks, score.min_fisher_samples, options.diagonal, formed_once, partner)
    phase6_reform = phase6_reads * reform
    phase5 = conflict_flops(samples, tasks, kept, references) + phase5_reform
    tested_groups = groups if phase5_scope == "groups" else 1
    tested = math.comb(tasks, 2) * group_test_values(samples, samples, tested_groups)
    phase6 = qkov_flops(samples, tasks, layout, score.include_bias, score.min_fisher_samples) + phase6_reform
    tflops = DEFAULT_TFLOPS if throughput_tflops is None else float(throughput_tflops)
    rate = tflops * 1e12 * devices
    one_device = tflops * 1e12  # the comparison and the heads and masks phases run on one device
    forward = forward_flops(layout, seq_len)
    phase1 = collect_flops(forward, samples, tasks)
    defaults = AnalysisConfig()
    heads_work = heads_flops(forward, layout, tasks, min(defaults.head_samples, samples), defaults.ablation_heads)
    mask_count = most_pruning_masks(tasks)
    masks_work = masks_flops(forward, tasks, min(defaults.pruning_samples, samples), mask_count)
    comparison = curvature_plan(model, forward, samples, limit - model.parameter_bytes, one_device, dtype, defaults, seq_len)
    seconds = dict(phase1=phase1 / rate, heads=heads_work / one_device, masks=masks_work / one_device,
                   phase5=phase5 / rate, phase6=phase6 / rate, curvature=comparison.seconds if comparison.skip is None else 0.0)
    pair_scores = qkov.scores_bytes(samples, samples, layout)
    return Plan(
        model_type=config.model_type,
        parameters=model.num_params,
        parameter_bytes=model.parameter_bytes,
        layers=config.num_layers,
        hidden_size=config.hidden_size,
        samples=samples,
        tasks=tasks,
        seq_len=seq_len,
        devices=devices,
        device_memory_bytes=device_memory_gb * GB,
        safety=safety,
        mesh=(data, m),
        micro_batch=mb,
        global_micro_batch=mb * data,
        step=measured(mb, data, m),
        candidates=tuple(compiled[k] for k in sorted(compiled) if not on_mesh or k[1:] == (data, m)),
        per_device_bytes=float(per_device_bytes),
        model_axis_estimate=m > 1 and not on_mesh,
        sharded_step=on_mesh,
        options=options,
        kept_parameters=kept,
        kept_values=read,
        factored=_factored(layout, options),
        stored_values=stored,
        storage_dtype=dtype,
        storage_given=storage_dtype is not None,
        float32_bytes_per_host=per_host("float32"),
        storage_bytes=kept_storage_bytes(samples, tasks, stored, dtype),
        storage_bytes_per_device=kept_storage_bytes(math.ceil(samples / data), tasks, stored, dtype),
        storage_bytes_per_host=per_host(dtype),
        hosts=hosts,
        host_memory_bytes=host_memory_gb * GB,
        spill=spilled,
        phase5_flops=phase5,
        phase6_flops=phase6,
        phase5_reform_flops=phase5_reform,
        phase6_reform_flops=phase6_reform,
        phase5_bytes_read=conflict_bytes_read(samples, tasks, read, references, dtype, chunk, data),
        phase6_bytes_read=qkov_bytes_read(phase6_reads, layout, score.include_bias, stored_layer),
        phase6_one_pass=formed_once,
        phase5_chunk=chunk,
        phase5_group_bytes=group_scope_bytes(samples, samples, groups, open_groups=held),
        phase5_scope=phase5_scope,
        phase5_test_values=tested,
        phase5_test_core_seconds=math.comb(tasks, 2) * group_test_core_seconds(samples, samples, tested_groups),
        phase5_test_core_seconds_independent=math.comb(tasks, 2) * group_test_core_seconds(samples, samples, tested_groups, False),
        phase6_scores_bytes=float(pair_scores),
        phase6_output_bytes=float(tasks * (tasks - 1) * pair_scores * (samples >= score.min_fisher_samples)),
        throughput_tflops=tflops,
        throughput_assumed=throughput_tflops is None,
        phase5_seconds=seconds["phase5"],
        phase6_seconds=seconds["phase6"],
        backend=backend.platform(),
        compile_seconds=round(compile_seconds, 1),
        forward=forward,
        phase1_flops=phase1,
        phase1_seconds=seconds["phase1"],
        curvature=comparison,
        heads_flops=heads_work,
        heads_seconds=seconds["heads"],
        masks=mask_count,
        masks_flops=masks_work,
        masks_seconds=seconds["masks"],
        total_seconds=sum(seconds.values()),
    )


def _bytes(x: float) -> str:
    """Bytes in TB, GB, MB or kB, whichever is the largest below the value (GB = 10⁹ bytes)."""
    return _scaled(x, (("TB", 1e12), ("GB", GB), ("MB", 1e6), ("kB", 1e3)))


def _scaled(x: float, units) -> str:
    for unit, size in units:
        if abs(x) >= size:
            return f"{x / size:,.1f} {unit}"
    unit, size = units[-1]
    return f"{x / size:,.1f} {unit}"


COUNTS = (("B", 1e9), ("M", 1e6), ("k", 1e3), ("", 1))
FLOPS = (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3), ("FLOP", 1))


def _count(x: float) -> str:
    """A count: ``1.7 B``, ``345.6 k``, or the integer below a thousand."""
    return _scaled(x, COUNTS[:-1]) if x >= 1e3 else f"{int(x):,}"


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.1f} s"


def _curvature_line(c: CurvaturePlan, parameters: int) -> str:
    """What the plan says of the method comparison: whether the default run and ``--curvature``
    run it on one device, its peak against the memory free there, and what fits otherwise."""
    route = f"{c.samples} sample{'s' * (c.samples != 1)}, top {c.k} {'from their Gram' if c.gram else 'by Lanczos'}"
    peak = f"peak {_bytes(c.peak_bytes)} of {_bytes(max(c.free_bytes, 0.0))} free on one device"
    if c.slices:
        peak += (f", so their Gram in {c.slices} column slice{'s' * (c.slices != 1)} of the gradients (a gradient pass each) "
                 f"and K-FAC's stage by {c.groups} group{'s' * (c.groups != 1)} of parameters"
                 + (f" ({c.factor_passes} factor passes: the largest factors by ranges of layers)" if c.factor_passes > c.groups else ""))
    work = f"{_scaled(c.flops, FLOPS)} ≈ {_duration(c.seconds)}"
    if c.forced_skip is None:
        runs = f"{route}, {peak}; {work}"
    elif c.fit_samples:
        runs = (f"it does not fit ({route}, {peak}; at least {_bytes(c.least_bytes)}); --curvature-samples {c.fit_samples}"
                + ("" if c.fit_k == c.k else f" --curvature-k {c.fit_k}") + " fits with --curvature")
    else:
        runs = (f"it does not fit ({route}, {peak}), with any number of samples: K-FAC's stage alone takes "
                f"{_bytes(c.stream_bytes)} (its largest group of factors and parameters, or one model-sized probe)")
    if c.skip is None:
        return f"runs: {runs}"
    if c.skip == "parameters":
        limit = _scaled(CURVATURE_AUTO_PARAMETERS, COUNTS)
        return (f"skipped by default ({_scaled(parameters, COUNTS)} parameters, more than {limit}); with --curvature "
                + (f"it runs: {runs}" if c.forced_skip is None else runs))
    if c.skip == "share":
        return (f"skipped by default (its peak is more than {CURVATURE_MEMORY_SHARE:.0%} of the free memory); "
                f"with --curvature it runs: {runs}")
    return f"skipped: {runs}"


def _host_tests(p: Plan) -> str:
    """Phase 5's host tests in one core's time, from tasks that do not conflict to tasks that
    conflict in every test."""
    return (f"{_duration(p.phase5_test_core_seconds_independent)} (tasks that do not conflict) to "
            f"{_duration(p.phase5_test_core_seconds)} (conflicting in every test) of one core's time")


def _storage_line(p: Plan) -> str:
    """The storage dtype, where it comes from and whether a host holds it; beside analyze's
    bfloat16 default, what float32 would take."""
    room = p.safety * p.host_memory_bytes

    def fits(per_host: float) -> str:
        return (f"spill to disk (--spill-dir): a host holds {_bytes(room)} of {_bytes(p.host_memory_bytes)}" if per_host > room
                else f"fits host memory ({_bytes(p.host_memory_bytes)})")

    source = "as given" if p.storage_given else "analyze's default"
    line = f"{p.storage_dtype} ({source}); {fits(p.storage_bytes_per_host)}"
    if p.storage_dtype != "float32":
        line += (f"; float32 (--sample-grads-dtype float32, kept by default with --qkov-variant signed or kfac): "
                 f"{_bytes(p.float32_bytes_per_host)} per host, {fits(p.float32_bytes_per_host)}")
    return line


def format_plan(p: Plan) -> str:
    """The plan as a short table (what ``fisherjax plan`` prints)."""
    limit = p.safety * p.device_memory_bytes
    s = p.step
    mesh = f"({p.mesh[0]},) over (\"data\",)" if p.mesh[1] == 1 else f"({p.mesh[0]}, {p.mesh[1]}) over (\"data\", \"model\")"
    tried = ", ".join(f"{c.micro_batch}: {_bytes(c.total_bytes)}" for c in p.candidates)
    assumed = " (assumed, pass --tflops)" if p.throughput_assumed else ""
    rows = [
        ("model", f"{p.model_type}, {_scaled(p.parameters, COUNTS)} parameters ({_bytes(p.parameter_bytes)} float32), "
                  f"{p.layers} layers, d {p.hidden_size}"),
        ("run", f"{p.tasks} tasks × {p.samples} samples, T = {p.seq_len}, {p.options.fisher_type} Fisher"
                f"{', diagonal' if p.options.diagonal else ''}{', remat' if p.options.remat else ''}"),
        ("devices", f"{p.devices} × {_bytes(p.device_memory_bytes)} (fits: ≤ {_bytes(limit)}), {p.hosts} host(s)"),
        ("Phase 1 step / device", f"compiled by XLA:{p.backend}{' (sharded step on the mesh)' if p.sharded_step else ''} "
                                  f"at micro-batch {s.micro_batch}: arguments {_bytes(s.argument_bytes)}, "
                                  f"outputs {_bytes(s.output_bytes)}, temporaries {_bytes(s.temp_bytes)}, "
                                  f"aliased −{_bytes(s.alias_bytes)} → total {_bytes(s.total_bytes)}"),
        ("  micro-batches compiled", f"{tried} ({p.compile_seconds:g} s compiling)"),
    ]
    if p.model_axis_estimate:
        rows.append(("  with \"model\" axis", f"{_bytes(p.per_device_bytes)} per device — DERIVED, not compiled "
                                              f"(parameters sharded over {p.mesh[1]} devices)"))
    rows += [
        ("recommended mesh", mesh),
        ("recommended micro-batch", f"{p.micro_batch} per device" + (" (per \"data\" shard)" if p.model_axis_estimate else "")
                                    + f", {p.global_micro_batch} per step"),
        ("kept gradients", f"{_scaled(p.kept_parameters, COUNTS)} parameters per sample"
                           + (f", {len(p.factored)} kernel(s) as token factors at T = {p.seq_len}: "
                              f"{_scaled(p.kept_values, COUNTS)} numbers kept" if p.factored else "")
                           + (f", {_scaled(p.stored_values, COUNTS)} stored with C_i = g_i²/T_i beside them"
                              if p.stored_values != p.kept_values else "")
                           + f", {p.storage_dtype}: {_bytes(p.storage_bytes)} in all, "
                           f"{_bytes(p.storage_bytes_per_device)} per \"data\" shard, {_bytes(p.storage_bytes_per_host)} per host"),
        ("storage", _storage_line(p)),
        ("Phase 1 (collect)", f"{_scaled(p.phase1_flops, FLOPS)} ≈ {_duration(p.phase1_seconds)} (at least {COLLECT_FORWARDS} "
                              f"forward passes' products a sample, one pass {_scaled(p.forward.total, FLOPS)})"),
        ("method comparison", _curvature_line(p.curvature, p.parameters)),
        ("heads phase", f"{_scaled(p.heads_flops, FLOPS)} ≈ {_duration(p.heads_seconds)} on one device (head-mask gradients "
                        "and the single-head ablations, --head-samples and --ablation-heads at their defaults)"),
        ("masks phase", f"{_scaled(p.masks_flops, FLOPS)} ≈ {_duration(p.masks_seconds)} on one device (the pruning "
                        f"experiment: --pruning-samples under at most {p.masks} head masks a task)"),
        ("Phase 5 (conflicts)", f"{_scaled(p.phase5_flops, FLOPS)} ≈ {_duration(p.phase5_seconds)}"
                                + (f" ({_scaled(p.phase5_reform_flops, FLOPS)} of it forming factored gradients)" if p.factored else "")
                                + f"; reads {_bytes(p.phase5_bytes_read)} of kept gradients "
                                + ("(by parameter slice: each task once per pair)" if p.phase5_chunk is None
                                   else f"(chunk size {p.phase5_chunk})")
                                + f"; per-group tests hold {_bytes(p.phase5_group_bytes)} of host memory per pair "
                                  f"(with {KEPT_SHARE:.0%} of their tests kept: p ≤ alpha): "
                                + ("tested per head group" if p.phase5_scope == "groups"
                                   else "tested on the whole gradient (--conflict-scope auto; fewer samples keep the groups)")
                                + f"; host tests of {_count(p.phase5_test_values)} values ≈ {_host_tests(p)}"),
        ("Phase 6 (QK-OV)", f"{_scaled(p.phase6_flops, FLOPS)} ≈ {_duration(p.phase6_seconds)}"
                            + (f" ({_scaled(p.phase6_reform_flops, FLOPS)} of it forming factored gradients"
                               f"{', at least: each device forms the tiles of task B it reads' if p.devices > 1 else ''})"
                               if p.factored else "")
                            + f"; reads {_bytes(p.phase6_bytes_read)} of kept gradients at least "
                            + ("(both directions of a pair in one pass: each sample once"
                               + ("; the fit halves' Fisher recorded by Phase 1, which collects them first)" if p.options.diagonal
                                  else ", a fit half once more for its Fisher)")
                               if p.phase6_one_pass else "(one direction at a time: each score array its samples once, its partner as "
                                                         "often as it forms it)")
                            + f"; scores of {_bytes(p.phase6_scores_bytes)} per ordered pair ("
                            + ("the host holds both directions', twice that, and half of one again while finishing them"
                               if p.phase6_one_pass else "the host holds one direction's, and half that again while finishing them")
                            + f"), {_bytes(p.phase6_output_bytes)} in qkov.npz"),
        ("total", f"≈ {_duration(p.total_seconds)} of device compute"
                  + ("" if p.curvature.skip is None else " (without the method comparison, which the default run skips)")
                  + f", and ≈ {_host_tests(p)} for Phase 5's tests (they use every core: divide by the host's)"),
        ("throughput", f"{p.throughput_tflops:g} TFLOP/s per device{assumed}, over {p.devices} device(s), compute only"),
        ("measured / derived", "the Phase 1 step's memory is compiled"
                               + ("" if p.sharded_step or p.devices == 1 else " (single-device step: fewer devices than planned)")
                               + "; storage, work and time are derived (formulas: fisherjax/plan.py)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


__all__ = [
    "CurvaturePlan", "Plan", "StepMemory", "conflict_bytes_read", "conflict_chunk", "conflict_flops", "curvature_plan",
    "default_options",
    "conflict_sample_reads", "conflict_slices", "format_plan", "kept_parameters", "kept_storage_bytes", "kept_values", "model_axis_bytes",
    "plan", "qkov_flops", "qkov_sample_reads", "read_config", "reference_grams", "reform_flops", "step_memory",
]
