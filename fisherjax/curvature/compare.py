"""The Fisher method comparison: diagonal, K-FAC, Lanczos top-k and per-head block spectra, side by
side on the same samples (the original system's end of Phase 1).

Every method is run on the same samples (``batches``) and measured with
:func:`fisherjax.telemetry.measure` (wall time, peak resident and device memory). The exact
empirical Fisher ``F = (1/n) Σ_i g_i g_iᵀ / T_i`` is never formed; it enters only through
matrix-free products (:mod:`fisherjax.curvature.products`), which is what each approximation is
checked against:

* **diagonal** — ``D = diag(F) = Î`` (Phase 1's full diagonal, collected here on the same samples
  by one Phase 1 pass that also keeps the attention gradients the block spectra read; its time
  includes keeping them). Eigenvalues: its entries.
* **K-FAC** — ``A ⊗ G`` per dense site (:mod:`fisherjax.curvature.kfac`), ``Î`` on the parameters
  it does not cover (norms, embeddings, unembedding). Eigenvalues: the products ``s_A s_G`` of
  its factors' eigenvalues, and ``Î`` elsewhere.
* **Lanczos** — the ``k`` largest eigenpairs of ``F`` itself (:func:`~fisherjax.curvature.lanczos.lanczos`):
  the exact reference for the top of the spectrum. ``F``'s rank is at most its samples ``n``;
  when ``n ≤ 2 · steps`` the same pairs come exactly from the ``n × n`` Gram of the
  per-sample gradients (:func:`~fisherjax.curvature.lowrank.empirical_eigen`): one gradient pass
  instead of ``steps`` Fisher-vector products, in at most twice a float32 basis's memory
  (:func:`from_gram`); given too little memory to hold those gradients, the Gram is formed first
  from column slices of them (:func:`gram_slices`), and K-FAC's stage then goes by groups of
  parameters (:mod:`fisherjax.curvature.groups`). The report's notes say which.
* **block spectra** — the exact spectrum of ``F`` restricted to each attention head's slice
  (:mod:`fisherjax.curvature.blocks`), i.e. the block-diagonal Fisher of the heads, from the
  attention gradients of the diagonal's pass (as Phase 1 keeps them): its time is the per-slice
  Grams and their eigenvalues.

For each: the top-``k`` eigenvalues of the whole model and of the 10 slices with the largest
exact top eigenvalue, the condition number of the damped matrix ``(λ_max + λ)/(λ_min + λ)``
with ``λ = damping_rel · tr(F)/D`` (the mean eigenvalue, exact from ``Î``), the relative error
``‖F̃ v − F v‖ / ‖F v‖`` on Gaussian probes ``v`` (diagonal and K-FAC), and the Rayleigh quotients
``q_jᵀ F̃ q_j`` of the Lanczos vectors ``q_j`` over their Ritz values ``λ_j`` (1 is exact).

Recommendation (:func:`recommend`): the approximation to precondition with is the diagonal unless
K-FAC's probe error is below ``kfac_margin`` (0.75) times the diagonal's *and* its top eigenvalue
is within a factor 2 of Lanczos's; Lanczos is the method for the top of the spectrum and block
spectra for per-head curvature, both exact, so neither is a preconditioner.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fisherjax import telemetry
from fisherjax.curvature import blocks, groups, kfac, lanczos, lowrank, products
from fisherjax.data import Batch
from fisherjax.errors import ConfigError
from fisherjax.fisher.collect import collect
from fisherjax.fisher.options import CollectOptions
from fisherjax.layout import unflatten
from fisherjax.settings import STATIC, check

METHODS = ("diagonal", "kfac", "lanczos", "block_spectra")

HOST_BASIS_BYTES = 2e9
"""Above this a float64 host Lanczos basis would take, the basis is float32 on the device."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MethodResult:
    """One method's row of the comparison (numpy arrays; ``None`` where a number has no meaning
    for the method, with the reason in ``notes``).

    ``top``: ``[k]`` largest eigenvalues of the whole model; ``blocks_top``: ``[blocks]`` largest
    eigenvalue of each of the compared slices; ``probe_error``: mean relative error of ``F̃ v``;
    ``rayleigh``: ``[k]`` ``q_jᵀ F̃ q_j / λ_j``.
    """

    top: np.ndarray
    blocks_top: np.ndarray | None
    condition: float | None = dataclasses.field(metadata=STATIC)
    probe_error: float | None = dataclasses.field(metadata=STATIC)
    rayleigh: np.ndarray | None
    stretch: telemetry.Stretch = dataclasses.field(metadata=STATIC)
    notes: str = dataclasses.field(default="", metadata=STATIC)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MethodComparison:
    """The comparison: ``methods`` by name (:data:`METHODS`), the compared slices ``blocks``
    (``(block, layer, head)``), the recommended method and the rule's reason."""

    methods: dict[str, MethodResult]
    blocks: tuple[tuple[str, int, int], ...] = dataclasses.field(metadata=STATIC)
    n_samples: int = dataclasses.field(metadata=STATIC)
    n_parameters: int = dataclasses.field(metadata=STATIC)
    damping: float = dataclasses.field(metadata=STATIC)
    recommended: str = dataclasses.field(metadata=STATIC)
    reason: str = dataclasses.field(metadata=STATIC)
    lanczos_residuals: np.ndarray | None = None


def basis_dtype(size: int, k: int, steps: int | None = None):
    """The Lanczos basis of the comparison: float64 on the host up to :data:`HOST_BASIS_BYTES`,
    else float32 on the device."""
    return np.float64 if 8 * size * (steps or lanczos.default_steps(size, k)) <= HOST_BASIS_BYTES else np.float32


def from_gram(size: int, k: int, n: int, steps: int | None = None) -> bool:
    """Whether the top of ``F`` over ``n`` samples comes from their ``n × n`` Gram
    (:func:`~fisherjax.curvature.lowrank.empirical_eigen`) rather than Lanczos: ``n ≤ 2 · steps``.
    The Gram is exact and costs one pass of per-sample gradients where Lanczos takes ``steps``
    Fisher-vector products; its float32 ``n × size`` gradients are at most twice a float32 Lanczos
    basis (no more than a float64 one). Fewer samples than ``k`` take it too: ``F``'s rank is at
    most ``n``, so its top ``k`` are the Gram's ``n`` and ``k − n`` zeros (:func:`padded_pairs`),
    which Lanczos reaches only after its Fisher-vector products, in a basis of model-sized vectors:
    a quick run on a few samples took longer and more memory than one on many."""
    steps = steps or lanczos.default_steps(size, k)
    return n <= 2 * steps


def padded_pairs(k: int, values: np.ndarray, coefficients: np.ndarray, residuals: np.ndarray | None = None):
    """The Gram route's ``min(k, n)`` pairs (``values [m]``, ``coefficients [n, m]``, ``residuals
    [m]``) padded to ``k``: past ``F``'s rank bound each is eigenvalue 0 with zero coefficients and
    residual 0, as :func:`~fisherjax.curvature.lowrank.gram_pairs` gives an eigenvalue 0."""
    extra = k - len(values)
    if extra <= 0:
        return values, coefficients, residuals
    pad = functools.partial(np.pad, mode="constant")
    return (pad(values, (0, extra)), pad(coefficients, ((0, 0), (0, extra))),
            None if residuals is None else pad(residuals, (0, extra)))


def gram_dtype(sample_grads_dtype: str = "float32"):
    """The dtype the Gram route keeps ``G̃`` in for a run that stores its kept gradients as
    ``sample_grads_dtype``: bfloat16 for bfloat16 (half the memory, float32's range), else
    float32 — a float16 ``G̃`` would flush the small entries of ``g_i / sqrt(n T_i)`` to zero."""
    return jnp.bfloat16 if sample_grads_dtype == "bfloat16" else jnp.float32


def basis_bytes(size: int, k: int, steps: int | None = None, n: int | None = None, sample_grads_dtype: str = "float32") -> int:
    """Bytes of the comparison's largest allocation for a model of ``size`` parameters: the
    Lanczos basis ``steps · size · itemsize``, or with ``n`` samples that take the Gram route
    (:func:`from_gram`) their gradients ``n · size · itemsize`` as :func:`gram_dtype` keeps them
    for ``sample_grads_dtype``."""
    steps = steps or lanczos.default_steps(size, k)
    if n is not None and from_gram(size, k, n, steps):
        return n * size * jnp.dtype(gram_dtype(sample_grads_dtype)).itemsize
    return steps * size * np.dtype(basis_dtype(size, k, steps)).itemsize


MODEL_COPIES = 5
"""Model-sized float32 arrays the comparison holds beside ``G̃`` (or the basis) and K-FAC's factors:
the diagonal as collected and raveled for the products, a probe ``v`` and its exact ``F v``, and
the approximations' products of it. With :data:`WORKING_LOGITS`, what GPT-2 small's comparison
took above ``G̃`` and the factors (RESULTS.md, twenty-sixth session)."""


WORKING_LOGITS = 3
"""Logits-sized float32 arrays (``[tokens, vocabulary]``) counted for the working memory of a pass
over ``tokens`` tokens at once: the logits, their softmax, and a tangent or cotangent of them.
Measured with ``G̃`` held at batches of 16 × 80–120 tokens (RESULTS.md, twenty-sixth session):
above ``G̃``, the factors and :data:`MODEL_COPIES`, GPT-2 small's comparison took 2.2 such arrays
and the 4-layer model's 2.7 — memory that grows with the batch, not with the model."""


WORKING_MARGIN = 1.1
"""XLA's temporaries of the smallest layered leaf's gradient pass times this are a pass's working
memory in the rule: the comparison's other passes (K-FAC's factor passes, the gradients of the
widest kernels) held up to 6 % more in XLA's memory analysis of GPT-2 small, Qwen2.5-1.5B and
Llama-7B (``benchmarks/pass_memory.py``, RESULTS.md, twenty-ninth session)."""


def working_bytes(model, tokens: int, seq_len: int | None = None, *, bound: bool = False) -> int:
    """Bytes of a pass's working memory over ``tokens`` tokens at once: :data:`WORKING_LOGITS`
    float32 ``[tokens, vocabulary]`` arrays, or with ``seq_len`` (the samples' length) the larger of
    that and ``tokens / seq_len`` samples' backward temporaries as XLA reports them
    (:func:`~fisherjax.curvature.lowrank.pass_temporaries` of one sample, times
    :data:`WORKING_MARGIN`): the activations a
    backward keeps outgrow the logits in long samples of wide models (DECISIONS.md, "A pass's
    working memory from XLA"). ``bound``: the temporaries' upper bound instead
    (:func:`~fisherjax.curvature.lowrank.temporaries_bound`), for a rule that needs no more than
    "fits": nothing is compiled."""
    logits = 4 * WORKING_LOGITS * int(model.config.vocab_size) * int(tokens)
    if not seq_len or not tokens:
        return logits
    one = (lowrank.temporaries_bound if bound else lowrank.pass_temporaries)(model, 1, int(seq_len)) or 0
    return max(logits, math.ceil(WORKING_MARGIN * math.ceil(tokens / seq_len) * one))


def pass_tokens(batches: Sequence[Batch]) -> tuple[int, int]:
    """``(batch, sample)``: the most tokens a pass holds at once when it goes a batch at a time
    (the largest ``rows × length``) and a sample at a time (the longest length)."""
    shapes = [np.shape(b.input_ids) for b in batches]
    return max(r * t for r, t in shapes), max(t for _, t in shapes)


def rest_bytes(model, tokens: int = 0, seq_len: int | None = None, *, bound: bool = False) -> int:
    """Bytes the comparison of ``model`` holds beside ``G̃`` or the Lanczos basis: K-FAC's factors
    (``4 ·`` :func:`~fisherjax.curvature.kfac.factor_floats`), :data:`MODEL_COPIES` float32
    copies of the model, and the working memory of passes over ``tokens`` tokens at once of
    samples of ``seq_len`` (:func:`working_bytes`, whose ``bound`` this passes on)."""
    return (4 * kfac.factor_floats(model) + 4 * MODEL_COPIES * int(model.num_params)
            + working_bytes(model, tokens, seq_len, bound=bound))


def peak_bytes(model, k: int, steps: int | None = None, n: int | None = None, sample_grads_dtype: str = "float32",
               tokens: int = 0, seq_len: int | None = None, *, bound: bool = False) -> int:
    """Bytes the comparison of ``model`` holds at its peak with ``G̃`` (or the basis) whole and its
    passes over ``tokens`` tokens at once (the largest batch's, :func:`pass_tokens`) of samples of
    ``seq_len``: :func:`basis_bytes` and :func:`rest_bytes` (with ``bound``, an upper bound that
    compiles nothing)."""
    return basis_bytes(int(model.num_params), k, steps, n, sample_grads_dtype) + rest_bytes(model, tokens, seq_len, bound=bound)


MAX_GRAM_SLICES = 32
"""The most column slices the Gram route may cut ``G̃`` into when it is too large to hold
(:func:`gram_slices`): each slice is one more pass of per-sample gradients over the samples, so
beyond this many the comparison is a multiple of Phase 1's own work on them and is not run."""

SLICE_COPIES = 1
"""Model-sized float32 arrays counted beside a column slice of ``G̃`` (:func:`gram_slices`): the
slices are formed before K-FAC's factors and the model-sized vectors exist, so besides the slice
there are only the per-sample gradient passes' own arrays, budgeted at
:data:`GRADIENT_BUDGET_BYTES`; one model copy is the headroom kept for them."""


def stream_bytes(model, sample_tokens: int = 0) -> int:
    """Bytes the comparison holds at least, with a pass over one sample of ``sample_tokens`` tokens
    (:func:`working_bytes`; none for 0), after a Gram formed in column slices
    (:func:`gram_slices`), when K-FAC's stage goes by groups of parameters
    (:mod:`fisherjax.curvature.groups`): the larger of its largest unit
    (:func:`~fisherjax.curvature.groups.least_group_bytes`: one kernel's factors a layer at a time
    and :data:`~fisherjax.curvature.groups.GROUP_COPIES` copies of its leaves) and the one
    model-sized float32 probe it differentiates along whole."""
    held = max(4 * int(model.num_params), groups.least_group_bytes(model))
    return held + working_bytes(model, sample_tokens, sample_tokens or None)


def least_bytes(model, k: int, steps: int | None = None, n: int | None = None, sample_grads_dtype: str = "float32",
                tokens: int = 0, sample_tokens: int = 0) -> int:
    """The least memory the comparison of ``model`` runs in: on the Gram route, with ``G̃`` not held
    and every pass after the diagonal's going a sample at a time (``sample_tokens``), the larger of
    :func:`stream_bytes` (K-FAC's stage by groups, after the Gram) and one of
    :data:`MAX_GRAM_SLICES` column slices of ``G̃`` with :data:`SLICE_COPIES` (before it); on the
    Lanczos route :func:`peak_bytes` (its basis is whole; passes over ``tokens``)."""
    size = int(model.num_params)
    if n is not None and from_gram(size, k, n, steps):
        slice_bytes = math.ceil(basis_bytes(size, k, steps, n, sample_grads_dtype) / MAX_GRAM_SLICES)
        stage = max(stream_bytes(model), slice_bytes + 4 * SLICE_COPIES * size)
        return stage + working_bytes(model, sample_tokens, sample_tokens)
    return peak_bytes(model, k, steps, n, sample_grads_dtype, tokens, sample_tokens or None)


def gram_slices(model, rows: int, sample_grads_dtype: str = "float32", memory_bytes: float | None = None,
                tokens: int = 0, sample_tokens: int = 0) -> tuple[tuple[int, int], ...] | None:
    """None where the Gram route's ``G̃ [rows, D]`` fits ``memory_bytes`` (None: always) whole beside
    :func:`rest_bytes` with passes over ``tokens`` at once, and is held through the comparison;
    else the column ranges (:func:`fisherjax.curvature.lowrank.column_slices`; one range when
    ``G̃`` fits alone) it is formed in before K-FAC's stage, each fitting ``memory_bytes`` with
    :data:`SLICE_COPIES` and passes over ``sample_tokens`` (:func:`pass_tokens`).

    Raises:
      ConfigError: :func:`stream_bytes` at ``sample_tokens`` is more than
        ``memory_bytes``, or the slices would be more than :data:`MAX_GRAM_SLICES` (the memory is
        below :func:`least_bytes`).
    """
    size, itemsize = int(model.num_params), jnp.dtype(gram_dtype(sample_grads_dtype)).itemsize
    held = rows * size * itemsize  # fits at the bound, else measured (a pass compiled for XLA's figure)
    if memory_bytes is None or any(held + rest_bytes(model, tokens, sample_tokens or None, bound=b) <= memory_bytes for b in (True, False)):
        return None
    least = stream_bytes(model, sample_tokens)
    if least > memory_bytes:
        raise ConfigError(f"the method comparison's K-FAC stage takes at least {least / 1e9:.1f} GB (its largest group of "
                          f"factors and parameters, or one model-sized probe), more than its {memory_bytes / 1e9:.1f} GB: "
                          "give it more memory")
    budget = max(memory_bytes - 4 * SLICE_COPIES * size - working_bytes(model, sample_tokens, sample_tokens), 1.0)
    count = lowrank.slice_count(size, rows, budget, itemsize)
    if count > MAX_GRAM_SLICES:
        raise ConfigError(f"the method comparison's {rows} per-sample gradients need {count} column slices in "
                          f"{memory_bytes / 1e9:.1f} GB, more than {MAX_GRAM_SLICES}: give it more memory or fewer samples")
    return lowrank.column_slices(size, rows, budget, itemsize)


def stage_plan(model, memory_bytes: float, batch_rows: int, sample_tokens: int) -> tuple[int, tuple[groups.ParameterGroup, ...]]:
    """``(rows, groups)``: how K-FAC's stage goes where ``G̃`` is not held (:func:`gram_slices`).
    First the fewest groups of parameters (:func:`~fisherjax.curvature.groups.parameter_groups`)
    that fit ``memory_bytes`` beside one sample's pass — each group costs a pass per eigenvector
    and per probe — then the most rows a pass takes beside the largest group (or the one whole
    probe), a power of two up to a batch's ``batch_rows`` over ``sample_tokens`` tokens a sample
    (the longest, :func:`pass_tokens`): a sample at a time leaves an accelerator a one-sample batch
    and costs time even on a CPU (RESULTS.md, twenty-sixth session)."""
    parts = groups.parameter_groups(model, memory_bytes - working_bytes(model, sample_tokens, sample_tokens))
    held = max(4 * int(model.num_params), max(g.bytes for g in parts))
    rows = 1
    while 2 * rows <= batch_rows and held + working_bytes(model, 2 * rows * sample_tokens, sample_tokens) <= memory_bytes:
        rows *= 2
    return rows, parts


GRADIENT_BUDGET_BYTES = 0.25e9
"""What the Gram route's per-sample gradient pieces may take beside ``G̃`` (``scaled_gradients``'s
budget): one sample of a 16 M-parameter model at a time, which costs no time against larger pieces
(the pass is bound by its GEMMs) and keeps the phase's peak near ``G̃`` itself."""


def compare_methods(
    model,
    batches: Sequence[Batch],
    *,
    k: int = 10,
    steps: int | None = None,
    probes: int = 4,
    count: int = 10,
    damping_rel: float = 1e-3,
    kfac_margin: float = 0.75,
    seed: int = 0,
    progress: bool = False,
    options: CollectOptions | None = None,
    memory_bytes: float | None = None,
) -> MethodComparison:
    """Run the four methods on ``batches`` and compare them (see the module docstring).

    Args:
      model: a :class:`~fisherjax.models.Model` (its own parameters are used).
      batches: the samples every method sees (a list: it is read several times).
      k: eigenvalues of the whole model per method; ``steps``: Lanczos steps (default: its own).
      probes: Gaussian probes of the product error; count: slices compared per method.
      damping_rel: ``λ = damping_rel · tr(F)/D`` in the condition numbers.
      kfac_margin: K-FAC is recommended when its probe error is below this times the diagonal's.
      options: Phase 1 options for the diagonal's pass (its empirical diagonal and kept attention
        gradients are switched on, whatever they say): a run's own, as ``fisherjax analyze`` passes
        them, make that pass its already compiled step, and the block spectra and the Gram route read
        gradients stored as the run stores them (``sample_grads_dtype``: bfloat16 by default there,
        half the memory; float32 without ``options``; the Gram route's as :func:`gram_dtype`).
      memory_bytes: what the comparison may hold on the device (None: no bound). Where the Gram
        route's ``G̃`` and :func:`rest_bytes` would take more, the Gram is formed first, summed
        over column slices of ``G̃`` (:func:`gram_slices`, one per-sample gradient pass each) and
        each slice dropped before K-FAC's stage, which then goes by groups of parameters
        (:func:`stage_plan`, as few as fit; :mod:`fisherjax.curvature.groups`): per group a
        K-FAC pass of its factors and a weighted gradient pass of its leaves for each eigenvector
        and probe, each pass as many samples at a time as the rest of the memory leaves room for
        (one at least): the same numbers, neither ``G̃`` nor all of K-FAC's factors ever held.

    Returns:
      :class:`MethodComparison`.

    Raises:
      ConfigError: bad ``k``, ``probes`` or ``count``; ``memory_bytes`` below :func:`least_bytes`
        (refused before any pass).
    """
    check(k >= 1 and probes >= 1 and count >= 1, f"compare_methods: k, probes and count must be ≥ 1, got {k}, {probes}, {count}")
    batches = list(batches)
    layout, params = model.layout, model.params
    key = jax.random.key(seed)
    options = dataclasses.replace(options or CollectOptions(), fisher_type="empirical", diagonal=True, keep_sample_grads=True,
                                  keep_per_sample_groups=False)

    # rank ≤ n: the n × n Gram is exact and cheaper than the products; its gradients whole or in column slices
    gram = from_gram(int(model.num_params), k, products.count_samples(batches), steps)
    slices = None
    if gram:
        slices = gram_slices(model, sum(len(b.sample_ids) for b in batches), options.sample_grads_dtype, memory_bytes,
                             *pass_tokens(batches))
    rows = batches
    if slices is not None:  # K-FAC's stage by groups, its passes as many samples at a time as fit (refused here if none fit)
        per_pass, parts = stage_plan(model, memory_bytes, max(len(b.sample_ids) for b in batches), pass_tokens(batches)[1])
        rows = [piece for batch in batches for piece in batch.pieces(per_pass)]

    # ---- the four methods, each measured ----------------------------------------------------
    # One Phase 1 pass gives the diagonal and the attention gradients the block spectra read; the
    # block spectra are measured (and their gradients freed) before the Gram route allocates G̃.
    def run_diagonal():
        return collect(model, batches, task="compare", options=options, progress=progress)

    kept, diag_stretch = telemetry.measure(run_diagonal)
    diagonal = {p: np.asarray(v, np.float32) for p, v in kept.diagonal.items()}  # as collected: no float64 copy
    n_params = sum(v.size for v in diagonal.values())
    damping = damping_rel * sum(float(v.sum(dtype=np.float64)) for v in diagonal.values()) / n_params  # tr F / D = mean of Î
    spectra, block_stretch = telemetry.measure(blocks.block_spectra, kept, layout, top_k=k)
    del kept
    chosen = blocks.largest_blocks(spectra, count=count)
    block_ids = tuple((c.block, int(c.layer), int(c.head)) for c in chosen)

    n_samples, size = products.count_samples(batches), int(model.num_params)
    probe_keys = jax.random.split(jax.random.fold_in(key, 2), probes)
    if slices is None:
        stage, values, residuals, how, lanczos_stretch = _held_route(model, batches, k, steps, key, probe_keys, diagonal, block_ids,
                                                                     gram, options)
    else:  # G̃ too large to hold: its Gram by column slices, then K-FAC's stage by groups of leaves
        def sliced_route():
            k_gram = lowrank.sliced_gram(model, params, batches, slices, dtype=gram_dtype(options.sample_grads_dtype),
                                         memory_budget_bytes=GRADIENT_BUDGET_BYTES)
            return k_gram, padded_pairs(k, *lowrank.gram_pairs(k_gram, min(k, n_samples)))[:2]

        (k_gram, (values, coefficients)), lanczos_stretch = telemetry.measure(sliced_route)
        residuals = lowrank.residual_norms(k_gram, k_gram @ coefficients - coefficients * values)  # G̃ G̃ᵀ c = K c, in float64
        stage = groups.grouped_kfac(model, params, rows, parts, diagonal, block_ids, probe_keys, coefficients)
        how = (f"from the {n_samples} × {n_samples} Gram of the per-sample gradients, formed before K-FAC in {len(slices)} "
               f"column slice{'s' * (len(slices) != 1)} of them (a gradient pass each; residuals of the Gram's float64 "
               f"eigenpairs); K-FAC's factors, its products and the eigenvectors' Rayleigh quotients then by {len(parts)} "
               f"group{'s' * (len(parts) != 1)} of parameters, a gradient pass per group for each eigenvector and probe, "
               f"{per_pass} sample{'s' * (per_pass != 1)} at a time, not timed")

    values = np.asarray(values, np.float64)
    safe = np.where(values > 0, values, np.nan)

    # ---- spectra and condition numbers ------------------------------------------------------
    uncovered = [v for p, v in diagonal.items() if p not in stage.covered]
    kfac_low, kfac_high = kfac.kronecker_extremes(stage.values)
    if uncovered:
        low, high = _extremes(uncovered)
        kfac_low, kfac_high = min(kfac_low, low), max(kfac_high, high)
    kfac_top = _top_of([kfac.kronecker_top(stage.values, k), *uncovered], k)

    def cond(smallest, largest):
        return float((largest + damping) / (max(smallest, 0.0) + damping))

    diagonal_tree = unflatten(diagonal)

    def slice_diagonal_max(block_id):
        return float(np.max(np.asarray(products.restrict_head(layout, *block_id).project(diagonal_tree))))

    block_top = np.asarray(spectra.top, np.float64).reshape(-1)
    rank_deficient = size > n_samples
    methods = {
        "diagonal": MethodResult(
            top=_top_of(diagonal.values(), k), blocks_top=np.array([slice_diagonal_max(b) for b in block_ids]),
            condition=cond(*_extremes(diagonal.values())), probe_error=float(np.mean(stage.diagonal_errors)),
            rayleigh=stage.diagonal_forms / safe, stretch=diag_stretch,
            notes="one Phase 1 pass, which also keeps the attention gradients the block spectra read"),
        "kfac": MethodResult(
            top=kfac_top, blocks_top=stage.slice_tops,
            condition=cond(kfac_low, kfac_high), probe_error=float(np.mean(stage.kfac_errors)),
            rayleigh=stage.kfac_forms / safe, stretch=stage.stretch,
            notes="Î on the parameters K-FAC does not cover (norms, embeddings, unembedding)"),
        "lanczos": MethodResult(
            top=_pad(values, k), blocks_top=None, condition=cond(0.0, float(values.max())) if rank_deficient else None,
            probe_error=0.0, rayleigh=np.ones(len(values)), stretch=lanczos_stretch,
            notes=(f"exact top-{k} of F {how}; F has rank ≤ n = {n_samples} < D, so λ_min = 0"
                   + (f" and the last {k - n_samples} of the top {k} are 0" if k > n_samples else "")
                   if rank_deficient else f"exact top-{k} of F {how}")),
        "block_spectra": MethodResult(
            top=_top(block_top[np.isfinite(block_top)], k), blocks_top=np.array([c.lambda_max for c in chosen]),
            condition=float(np.nanmedian(spectra.condition)), probe_error=None, rayleigh=None, stretch=block_stretch,
            notes="exact within each attention head's slice (condition: median over slices); other parameters and "
                  "cross-slice terms are not covered; from the attention gradients kept by the diagonal's pass"),
    }
    recommended, reason = recommend(methods, kfac_margin)
    return MethodComparison(methods, block_ids, n_samples, n_params, float(damping), recommended, reason, np.asarray(residuals))


def _held_route(model, batches, k, steps, key, probe_keys, diagonal, block_ids, gram, options):
    """K-FAC, the top of ``F`` and the approximations' errors with everything held: ``G̃`` whole on
    the Gram route, else the Lanczos basis; K-FAC's factors whole; the probes' exact products from
    ``G̃`` (two reads) or by Fisher-vector products. Returns what :func:`compare_methods` reads:
    ``(factor values, covered leaves, K-FAC's slice tops, the probes' errors of D and K-FAC, the
    Rayleigh forms, the eigenvalues, their residuals, how they were found, Lanczos's stretch,
    K-FAC's stretch)``."""
    layout, params = model.layout, model.params

    def run_kfac():
        factors = kfac.kfac_factors(model, params, batches)
        return factors, kfac.factor_values(factors)

    (factors, factor_values), kfac_stretch = telemetry.measure(run_kfac)
    operator = products.fisher_operator(model, params, batches, kind="empirical")
    exact_product = operator.matvec
    diag_device = operator.ravel(unflatten(diagonal))
    if gram:
        def gram_route():
            g = lowrank.scaled_gradients(model, params, batches, dtype=gram_dtype(options.sample_grads_dtype), memory_budget_bytes=GRADIENT_BUDGET_BYTES)
            return g, padded_pairs(k, *lowrank.gram_top(g, min(k, operator.n_samples)))

        (scaled, (values, coefficients, residuals)), lanczos_stretch = telemetry.measure(gram_route)
        exact_product = functools.partial(lowrank.product, scaled)  # F v from the same gradients: exact, two reads of G̃
        # the eigenvectors' Rayleigh quotients, each vector G̃ᵀ c_j formed in turn: no [D, k] array beside G̃
        forms = _gram_quadratic_forms(factors, layout, params, diag_device, scaled, jnp.asarray(coefficients, jnp.float32))
        how = f"from the {operator.n_samples} × {operator.n_samples} Gram of the per-sample gradients (one gradient pass, no products)"
    else:
        basis = basis_dtype(operator.size, k, steps)
        ritz, lanczos_stretch = telemetry.measure(
            lanczos.lanczos, operator.matvec, operator.size, k, steps=steps, key=jax.random.fold_in(key, 1), dtype=basis)
        values, residuals = ritz.values, ritz.residuals
        forms = _quadratic_forms(factors, layout, params, diag_device, jnp.asarray(ritz.vectors, jnp.float32))
        how = f"in {ritz.steps} products"
        scaled = ritz = None

    diag_err, kfac_err = [], []
    for probe_key in probe_keys:
        v = operator.ravel(unflatten(groups.probe(probe_key, params)))
        errors = _probe_errors(factors, layout, params, diag_device, v, exact_product(v))
        diag_err.append(float(errors[0]))
        kfac_err.append(float(errors[1]))
    del scaled, exact_product
    covered = frozenset(p for f in factors.factors.values() for p in (f.kernel, f.bias) if p is not None)
    stage = groups.KFACStage(factor_values, covered, kfac.slice_tops(factors, layout, block_ids), np.asarray(diag_err),
                             np.asarray(kfac_err), *(np.asarray(q, np.float64) for q in forms), kfac_stretch)
    return stage, values, residuals, how, lanczos_stretch


def _kfac_flat_product(factors, layout, like, diagonal, v):
    """K-FAC's ``F̃ v`` on the operator's flat float32 vectors (``ravel_pytree`` order of ``like``),
    with ``diagonal ⊙ v`` on the parameters K-FAC does not cover."""
    unravel = ravel_pytree(like)[1]
    product = kfac.kfac_vector_product(factors, layout, unravel(v.astype(jnp.float32)), diagonal=unravel(diagonal))
    return ravel_pytree(product)[0].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames="layout")
def _probe_errors(factors, layout, like, diagonal, v, exact):
    """``[2]``: ``‖D v − F v‖ / ‖F v‖`` and ``‖F̃_KFAC v − F v‖ / ‖F v‖`` for one probe ``v`` and
    its exact product, on the device (one compiled program for every probe)."""
    norm = jnp.linalg.norm(exact)
    kfac_v = _kfac_flat_product(factors, layout, like, diagonal, v)
    return jnp.stack([jnp.linalg.norm(diagonal * v - exact), jnp.linalg.norm(kfac_v - exact)]) / norm


def _forms(factors, layout, like, diagonal, q):
    """``[2]``: ``(qᵀ D q, qᵀ F̃_KFAC q)`` of one flat vector ``q``."""
    return jnp.stack([jnp.vdot(q * diagonal, q), jnp.vdot(q, _kfac_flat_product(factors, layout, like, diagonal, q))])


@functools.partial(jax.jit, static_argnames="layout")
def _quadratic_forms(factors, layout, like, diagonal, vectors):
    """``(qᵀ D q, qᵀ F̃_KFAC q)`` for every column ``q`` of ``vectors [D, k]``, each ``[k]``: the
    Lanczos vectors' Rayleigh quotients under the two approximations, one column at a time (taken
    in place: a transpose would copy all ``k``)."""
    forms = jax.lax.map(lambda j: _forms(factors, layout, like, diagonal, vectors[:, j]), jnp.arange(vectors.shape[1]))
    return forms[:, 0], forms[:, 1]


@functools.partial(jax.jit, static_argnames="layout")
def _gram_quadratic_forms(factors, layout, like, diagonal, g, coefficients):
    """:func:`_quadratic_forms` of the Gram route's eigenvectors ``q_j = G̃ᵀ c_j`` (``g`` ``[n, D]``,
    ``coefficients`` ``[n, k]``), each formed in turn from ``G̃`` (:func:`~fisherjax.curvature.lowrank.
    transposed_times`), so only one is alive."""
    forms = jax.lax.map(lambda c: _forms(factors, layout, like, diagonal, lowrank.transposed_times(g, c)), coefficients.T)
    return forms[:, 0], forms[:, 1]


def recommend(methods: dict[str, MethodResult], kfac_margin: float = 0.75) -> tuple[str, str]:
    """The stated rule (module docstring): ``("kfac" | "diagonal", reason)``."""
    d, kf, lz = methods["diagonal"], methods["kfac"], methods["lanczos"]
    top_ratio = float(kf.top[0] / lz.top[0]) if lz.top[0] > 0 else np.nan
    if kf.probe_error < kfac_margin * d.probe_error and 0.5 <= top_ratio <= 2.0:
        return "kfac", (f"K-FAC's product error {kf.probe_error:.3g} is below {kfac_margin:g}× the diagonal's {d.probe_error:.3g} "
                        f"and its top eigenvalue is {top_ratio:.2f}× Lanczos's")
    return "diagonal", (f"K-FAC's product error {kf.probe_error:.3g} against the diagonal's {d.probe_error:.3g} "
                        f"(K-FAC needs < {kfac_margin:g}×) and top eigenvalue {top_ratio:.2f}× Lanczos's (needs 0.5–2×): "
                        "the diagonal is as good and cheaper")


def _top(values: np.ndarray, k: int) -> np.ndarray:
    values = np.asarray(values, np.float64).reshape(-1)
    k_eff = min(k, values.size)
    return _pad(np.sort(np.partition(values, values.size - k_eff)[values.size - k_eff:])[::-1], k)


def _top_of(pieces, k: int) -> np.ndarray:
    """:func:`_top` of the values of several arrays, each partitioned in its own dtype: no
    model-sized float64 array."""
    tops = []
    for v in pieces:
        v = np.asarray(v).reshape(-1)
        if v.size:
            tops.append(np.partition(v, v.size - min(k, v.size))[v.size - min(k, v.size):])
    return _top(np.concatenate(tops), k)


def _extremes(pieces) -> tuple[float, float]:
    """``(min, max)`` over the values of several arrays."""
    pieces = [np.asarray(v) for v in pieces if np.size(v)]
    return float(min(v.min() for v in pieces)), float(max(v.max() for v in pieces))


def _pad(values: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros(k)
    out[: min(k, len(values))] = np.asarray(values, np.float64)[:k]
    return out
