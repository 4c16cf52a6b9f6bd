"""Phase 5: which sample of task A pulls against which sample of task B, where, and is it more than noise.

Scores. For sample ``i`` with signed token-sum gradient ``g_i`` (:class:`~fisherjax.fisher.SampleGrads`
``grads``) and a diagonal Fisher ``Î`` (one task's, or both pooled), the whitened gradient is
``g̃_i = g_i / sqrt(Î + ε)`` and for every ``i ∈ A``, ``j ∈ B``

    cos_ij = ⟨g̃_i, g̃_j⟩ / (‖g̃_i‖ ‖g̃_j‖)            effect_ij = ‖ĝ_i − ĝ_j‖ / 2 = sqrt((1 − cos_ij) / 2)

(``ĝ`` the unit vectors; effect 0 = same direction, 1/√2 = orthogonal, 1 = opposite). The dot
products are one Gram matrix: per parameter leaf a batched GEMM ``[c_a, D] × [D, c_b]`` per
parameter *group* (attention head per (block, layer, head) through
:meth:`~fisherjax.layout.ModelLayout.view`, every other leaf per layer), accumulated leaf by leaf
over chunks of samples, so per-sample gradients stream through in chunks and a chunk pair is the
most that is ever on the device. Because groups partition the parameters,
``cos_ij = Σ_g ⟨g̃_i,g, g̃_j,g⟩ / (‖g̃_i‖ ‖g̃_j‖)``: the per-group *contributions* say which layer,
block and head carry a conflict; per-group cosines are kept too.

Significance. Null hypothesis for the pair ``(i, j)`` (``reference="a"``): *b_j pulls against
a_i no more than a sample of task A itself would*, i.e. ``b_j`` is exchangeable with A's other
samples as far as its cosine with ``a_i`` goes (it holds when both tasks draw their samples
i.i.d. from one distribution, as two random halves of one task do). The alternative is
one-sided: ``cos_ij`` lower than the within-task cosines. The reference distribution of row
``i`` is ``{cos(a_i, a_k): k ≠ i}`` (or the cosines with a held-out *reference split* of task A).
Three tests match this null (``null=``):

* ``"pooled"`` (default): standardise ``z_ij = (cos_ij − med_i) / mad_i`` by the median and
  median absolute deviation of row ``i``'s reference cosines (robust, so a coherent minority of
  A that shares a direction does not inflate the scale), and compare against the pooled
  empirical null of the reference's own standardised cosines ``z_kl`` (median and MAD of row
  ``k`` recomputed without ``l``, so the held-out partner plays the role of ``b_j``):
  ``p = (1 + #{z_kl ≤ z_ij}) / (1 + N)``. Assumes the standardised within-task cosines share
  one distribution across rows (and groups, for ``scope="groups"``): a location-scale family
  per sample; no shape assumption. The empirical p-value cannot go below ``1 / (1 + N)`` with
  ``N ≈ n²`` while BH needs ``α k / (n_a n_b)`` for ``k`` discoveries, so it certifies only
  conflicts that come at least about ``1/α`` at a time (a cluster of samples, a head) — the
  price of calibration: a task can hold a few idiosyncratic pairs far out in the tail that no
  location-scale model of the other rows predicts. ``tail="gpd"`` (opt-in) extends the far lower
  tail with a generalized Pareto fit to the null's 250 lowest values (Knijnenburg et al. 2009,
  shape ≥ 0, so a fitted bounded tail falls back to the heavier exponential) and can then
  certify single pairs; it was calibrated on synthetic tasks but not on random-token GPT-2
  gradients, where one such pair gave a false discovery in 11% of half-splits at α = 0.05.
* ``"normal"``: mean and standard deviation with a Student-t predictive tail,
  ``p = F_{m−1}((cos_ij − μ_i) / (s_i sqrt(1 + 1/m)))``; exact when row ``i``'s reference cosines
  are normal, no guarantee otherwise (on the random-token GPT-2 gradients: a false discovery in
  20% of half-splits at α = 0.05).
* ``"row"``: the exact rank test ``p = (1 + #{k: cos(a_i, a_k) ≤ cos_ij}) / (1 + m)``; valid by
  exchangeability alone, even conditionally on the data under random splits, but its resolution
  ``1/(1 + m)`` rarely survives FDR over many pairs.

``reference="b"`` swaps the roles (a_i exchangeable with B's samples around b_j) and
``reference="both"`` (default) takes ``max(p_a, p_b)``, valid under either null, so a pair is
declared only if it is unusual from both sides. ``scope="groups"`` runs the same test on every
parameter group's cosine (a conflict confined to one head is diluted to a ``~1/G`` share of the
whitened overall cosine). Adjusted p-values (q-values) come from
``scipy.stats.false_discovery_control`` (Benjamini–Hochberg, or Benjamini–Yekutieli under any
dependence) over all ``n_a · n_b`` (times ``G``) tests; a pair is a *conflict* when
``q ≤ alpha`` and ``effect > min_effect_size`` (default ``1/√2``: the gradients really point
apart). p-values of pairs that share a sample are positively dependent (BH's PRDS condition);
``fdr_method="by"`` needs no assumption. ``tests/test_conflicts.py`` checks the rate of runs with
any false discovery on many random half-splits of one task (synthetic with clusters, heavy
tails and uneven norms, and through a real model) and the power on planted conflicts.

Outputs. :func:`detect` returns a :class:`ConflictReport` (scores, p/q-values, top pairs with
their true sample ids and the groups most responsible, connected components of the conflict
graph via ``scipy.sparse.csgraph``, hotspot groups, recommendations); :func:`summarize` turns it
into the ``conflicts.json`` dict and :func:`plot_conflicts` draws the figure.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from fisherjax.analysis.conflict_null import conflict_pvalues
from fisherjax.analysis.gradgroups import (
    ATTENTION_ORDER,
    GradChunk,
    GroupedGrads,
    GroupIndex,
    Grouping,
    Source,
    _check_same_parameters,
    _Stream,
    _stream,
    grouping_for,
)
from fisherjax.errors import ConfigError, DataError, NumericalError
from fisherjax.layout import ModelLayout
from fisherjax.stats import fdr_qvalues

__all__ = [
    "ConflictCluster",
    "ConflictPair",
    "ConflictReport",
    "GradChunk",
    "Gram",
    "GroupedGrads",
    "Grouping",
    "Source",
    "conflict_pvalues",
    "damping",
    "detect",
    "effect_sizes",
    "grouping_for",
    "head_map",
    "pairwise_cosines",
    "plot_conflicts",
    "pooled_fisher",
    "summarize",
    "whiten",
]

ORTHOGONAL_EFFECT = math.sqrt(0.5)
"""Effect size of two orthogonal unit vectors; larger effects mean a negative cosine."""

REFERENCES = ("a", "b", "both")


# ---------------------------------------------------------------------------------------------
# Whitening
# ---------------------------------------------------------------------------------------------


def damping(fisher: Mapping[str, Any], *, eps: float = 1e-8, relative_eps: float = 1e-3) -> float:
    """The whitening damping ``ε = max(eps, relative_eps · mean(Î))``, mean over every stored entry.

    A relative floor keeps parameters the Fisher barely saw from being amplified without bound.
    """
    total = sum(float(np.sum(np.asarray(v, np.float64))) for v in fisher.values())
    count = sum(int(np.size(v)) for v in fisher.values())
    return max(eps, relative_eps * total / max(count, 1))


def whiten(
    grads: Mapping[str, Float[Array, "n *shape"]],
    fisher: Mapping[str, Float[Array, "*shape"]],
    eps: float,
) -> dict[str, Float[Array, "n *shape"]]:
    """``g̃ = g / sqrt(Î + ε)`` for every leaf; ``grads`` ``{path: [n, *shape]}``, ``fisher`` ``{path: shape}``."""
    missing = sorted(set(grads) - set(fisher))
    if missing:
        raise DataError(f"no Fisher for the gradients of {missing}")
    out = {}
    for path, g in grads.items():
        f = fisher[path]
        if tuple(np.shape(f)) != tuple(np.shape(g)[1:]):
            raise DataError(f"Fisher of {path!r} has shape {tuple(np.shape(f))}, its gradients {tuple(np.shape(g)[1:])}")
        out[path] = g * jax.lax.rsqrt(jnp.asarray(f, jnp.float32) + eps)
    return out


def pooled_fisher(fisher_a: Mapping[str, Any], n_a: int, fisher_b: Mapping[str, Any], n_b: int) -> dict[str, np.ndarray]:
    """``Î = (n_a Î_a + n_b Î_b) / (n_a + n_b)``: the Fisher of both tasks' samples together."""
    return {p: ((n_a * np.asarray(fisher_a[p], np.float64) + n_b * np.asarray(fisher_b[p], np.float64)) / (n_a + n_b)).astype(np.float32) for p in fisher_a}


# ---------------------------------------------------------------------------------------------
# Gram matrices
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Gram:
    """Dot products of every pair and squared norms, overall and per group.

    ``dots [n_a, n_b]``, ``sq_norms_a [n_a]``, ``sq_norms_b [n_b]`` (float64 on the host);
    ``group_dots [G, n_a, n_b]``, ``group_sq_norms_a [G, n_a]``, ``group_sq_norms_b [G, n_b]``
    (float32, None unless computed ``by_group``); ``groups`` the :class:`GroupIndex`.
    """

    sample_ids_a: np.ndarray
    sample_ids_b: np.ndarray
    dots: np.ndarray
    sq_norms_a: np.ndarray
    sq_norms_b: np.ndarray
    groups: GroupIndex
    group_dots: np.ndarray | None = None
    group_sq_norms_a: np.ndarray | None = None
    group_sq_norms_b: np.ndarray | None = None

    @property
    def cosines(self) -> Float[np.ndarray, "n_a n_b"]:
        """``⟨g_i, g_j⟩ / (‖g_i‖ ‖g_j‖)``."""
        return self.dots / np.sqrt(np.outer(self.sq_norms_a, self.sq_norms_b))

    @property
    def group_contributions(self) -> Float[np.ndarray, "groups n_a n_b"]:
        """``⟨g_i,g, g_j,g⟩ / (‖g_i‖ ‖g_j‖)``: sums over groups to :attr:`cosines`."""
        return self.group_dots / np.sqrt(np.outer(self.sq_norms_a, self.sq_norms_b))[None].astype(np.float32)

    @property
    def group_cosines(self) -> Float[np.ndarray, "groups n_a n_b"]:
        """``⟨g_i,g, g_j,g⟩ / (‖g_i,g‖ ‖g_j,g‖)`` (0 where a group's gradient is zero)."""
        denom = np.sqrt(self.group_sq_norms_a[:, :, None] * self.group_sq_norms_b[:, None, :])
        return np.divide(self.group_dots, denom, out=np.zeros_like(self.group_dots), where=denom > 0)


@functools.partial(jax.jit, static_argnames=("members", "n_groups", "by_group", "mapped"))
def _block_gram(features_a, features_b, members, n_groups, by_group, mapped=None):
    """Dots of one chunk pair of features ``{key: [c, G_leaf, D]}``: ``[c_a, c_b]`` and (by_group)
    ``[G, c_a, c_b]``.

    Per group one GEMM ``[c_a, D] · [D, c_b]``. ``mapped`` (default: on a CPU) walks a leaf's
    groups with ``lax.map``: each group's rows are contiguous runs of ``D`` floats, so its slice is
    a cheap copy, where one einsum batched over groups made XLA:CPU move both sides group-major
    first (GPT-2-small attention, 16 × 16 samples: 1.5–2.4 s a Gram, 7 s on first use, vs
    0.25–0.8 s; bitwise equal). Elsewhere the batched einsum keeps a GPU's GEMMs wide.
    """
    hi = jax.lax.Precision.HIGHEST
    if not by_group:
        total = sum(
            jnp.dot(features_a[k].reshape(features_a[k].shape[0], -1), features_b[k].reshape(features_b[k].shape[0], -1).T, precision=hi)
            for k, _ in members
        )
        return total, None
    mapped = jax.default_backend() == "cpu" if mapped is None else mapped

    def leaf_dots(xa, xb):  # [c_a, G_leaf, D], [c_b, G_leaf, D] -> [G_leaf, c_a, c_b]
        if not mapped:
            return jnp.einsum("cgd,egd->gce", xa, xb, precision=hi)

        def group_dots(g):
            a = jax.lax.dynamic_index_in_dim(xa, g, axis=1, keepdims=False)
            b = jax.lax.dynamic_index_in_dim(xb, g, axis=1, keepdims=False)
            return jnp.dot(a, b.T, precision=hi)

        return jax.lax.map(group_dots, jnp.arange(xa.shape[1]))

    ca, cb = next(iter(features_a.values())).shape[0], next(iter(features_b.values())).shape[0]
    grouped = jnp.zeros((n_groups, ca, cb), jnp.float32)
    for key, ids in members:
        grouped = grouped.at[np.array(ids)].add(leaf_dots(features_a[key], features_b[key]))
    return grouped.sum(0), grouped


@functools.partial(jax.jit, static_argnames=("whitened_paths", "views", "members", "n_groups", "size"))
def _prepare_chunk(grads, inv_sqrt, whitened_paths, views, members, n_groups, size):
    """One chunk: nonfinite flags ``{path: [c]}``, whitened group features padded to ``size``
    samples ``{key: [size, G_leaf, D]}``, and squared group norms ``[G, size]``."""
    bad = {p: ~jnp.all(jnp.isfinite(g.reshape(g.shape[0], -1)), axis=1) for p, g in grads.items()}
    grads = {p: (g * inv_sqrt[p] if p in whitened_paths else g) for p, g in grads.items()}
    features = {v.key: v.apply(grads[v.path]) for v in views} if views is not None else grads
    c = next(iter(features.values())).shape[0]
    features = {k: jnp.pad(v, [(0, size - c)] + [(0, 0)] * (v.ndim - 1)) for k, v in features.items()}
    norms = jnp.zeros((n_groups, size), jnp.float32)
    for key, ids in members:
        norms = norms.at[np.array(ids)].add(jnp.sum(jnp.square(features[key]), -1).T)
    return bad, features, norms


def _prepared_chunks(stream: _Stream, grouping: Grouping, inv_sqrt: dict | None, chunk_size: int):
    """Yields ``(sample_ids, features padded to the chunk size, squared group norms, real count)``;
    raises on NaN/inf gradients."""
    paths = tuple(sorted(inv_sqrt)) if inv_sqrt else ()
    for chunk in stream.chunks(chunk_size):
        if set(chunk.grads) != set(stream.shapes):
            raise DataError(f"task {stream.name!r}: a chunk holds gradients of {sorted(chunk.grads)}, expected {sorted(stream.shapes)}")
        ids = np.asarray(chunk.sample_ids)
        c = len(ids)
        if c > chunk_size:
            raise ConfigError(f"task {stream.name!r}: a chunk of {c} samples exceeds chunk_size={chunk_size}")
        grads = {p: jnp.asarray(g, jnp.float32) for p, g in chunk.grads.items()}
        bad, features, norms = _prepare_chunk(
            grads, {p: inv_sqrt[p] for p in paths}, paths, grouping.views, grouping.static_members, len(grouping.index), chunk_size
        )
        for path, flags in bad.items():
            flags = np.asarray(flags)
            if flags.any():
                raise NumericalError(f"task {stream.name!r}: gradient of sample {int(ids[np.argmax(flags)])} on {path!r} is NaN or inf")
        yield ids, features, np.asarray(norms)[:, :c], c


def _prepared(stream: _Stream, grouping: Grouping, inv_sqrt: dict | None, chunk_size: int) -> Callable[[], Iterator]:
    """A function returning a fresh iterator of :func:`_prepared_chunks`.

    A stored stream that fits in one chunk (the usual case: ``n ≤ chunk_size``) is prepared once
    and its chunk kept, so the Grams :func:`detect` builds from it (A·B, A·A, B·B) whiten and view
    it once instead of once per side per Gram (GPT-2-small attention, 16 samples a task: 2
    preparations instead of 12). Memory is what one Gram already held: one chunk of each side.
    """
    if stream.size is None or stream.size > chunk_size:
        return lambda: _prepared_chunks(stream, grouping, inv_sqrt, chunk_size)
    kept: list = []

    def chunks():
        if not kept:
            kept.extend(_prepared_chunks(stream, grouping, inv_sqrt, chunk_size))
        return iter(kept)

    return chunks


def _gram(chunks_a: Callable[[], Iterator], chunks_b: Callable[[], Iterator], grouping: Grouping, by_group: bool) -> Gram:
    """The :class:`Gram` of two sides' prepared chunks (:func:`_prepared`), one chunk pair at a time."""
    members, n_groups = grouping.static_members, len(grouping.index)
    rows, group_rows, norms_a, norms_b, ids_a, ids_b = [], [], [], [], [], []
    for first_a, (sid_a, feat_a, norm_a, ca) in enumerate(chunks_a()):
        ids_a.append(sid_a)
        norms_a.append(norm_a)
        row, group_row = [], []
        for sid_b, feat_b, norm_b, cb in chunks_b():
            if first_a == 0:
                ids_b.append(sid_b)
                norms_b.append(norm_b)
            total, grouped = _block_gram(feat_a, feat_b, members, n_groups, by_group)
            row.append(np.asarray(total, np.float64)[:ca, :cb])
            if by_group:
                group_row.append(np.asarray(grouped)[:, :ca, :cb])
        rows.append(np.concatenate(row, 1))
        if by_group:
            group_rows.append(np.concatenate(group_row, 2))
    group_sq_a, group_sq_b = np.concatenate(norms_a, 1), np.concatenate(norms_b, 1)
    return Gram(
        np.concatenate(ids_a),
        np.concatenate(ids_b),
        np.concatenate(rows, 0),
        group_sq_a.astype(np.float64).sum(0),
        group_sq_b.astype(np.float64).sum(0),
        grouping.index,
        np.concatenate(group_rows, 1) if by_group else None,
        group_sq_a if by_group else None,
        group_sq_b if by_group else None,
    )


def pairwise_cosines(
    grads_a: Source,
    grads_b: Source,
    *,
    layout: ModelLayout | None = None,
    fisher: Mapping[str, Any] | None = None,
    eps: float = 0.0,
    chunk_size: int = 64,
    by_group: bool = True,
) -> Gram:
    """All-pairs dot products (and so cosines) of per-sample gradients, chunked.

    ``Gram.dots[i, j] = Σ_leaves Σ_groups ⟨g̃_i,g, g̃_j,g⟩`` with ``g̃ = g / sqrt(Î + ε)`` when
    ``fisher`` is given (else ``g̃ = g``). Per chunk pair of ``c`` samples each leaf costs one
    batched GEMM ``[G_leaf] × [c, D] × [D, c]``; memory holds one chunk of each side. Use
    :attr:`Gram.cosines` for ``[n_a, n_b]`` cosines.

    Args:
      grads_a, grads_b: sources (stored gradients or chunk streams, see :data:`Source`).
      layout: model layout for per-head groups (else one group per leaf).
      fisher: ``{path: param-shaped}`` diagonal Fisher to whiten with, and ``eps`` its damping.
      chunk_size: samples per chunk (stored sources); a stream's chunks must not exceed it.
      by_group: also keep ``[G, n_a, n_b]`` per-group dot products.
    """
    stream_a, stream_b = _stream(grads_a, None, "A"), _stream(grads_b, None, "B")
    _check_same_parameters([stream_a, stream_b])
    grouping = stream_a.grouping or grouping_for(stream_a.shapes, layout)
    inv_sqrt = _inverse_sqrt(fisher, eps, stream_a) if fisher is not None else None
    size = _chunk(chunk_size, stream_a, stream_b)
    return _gram(_prepared(stream_a, grouping, inv_sqrt, size), _prepared(stream_b, grouping, inv_sqrt, size), grouping, by_group)


def _chunk(chunk_size: int, *streams: _Stream) -> int:
    sizes = [s.size for s in streams if s.size is not None]
    return min(chunk_size, max(sizes)) if sizes and len(sizes) == len(streams) else chunk_size


def _inverse_sqrt(fisher, eps, stream) -> dict[str, Array]:
    if stream.grouping is not None:
        raise ConfigError("pre-grouped (projected) gradients are whitened when they are projected; pass fisher there")
    missing = sorted(set(stream.shapes) - set(fisher))
    if missing:
        raise DataError(f"no Fisher for the gradients of {missing}")
    out = {}
    for path, shape in stream.shapes.items():
        f = np.asarray(fisher[path], np.float32)
        if f.shape != shape:
            raise DataError(f"Fisher of {path!r} has shape {f.shape}, its gradients {shape}")
        if not np.all(np.isfinite(f)) or (f < 0).any():
            raise NumericalError(f"Fisher of {path!r} has NaN, inf or negative entries")
        out[path] = jax.lax.rsqrt(jnp.asarray(f) + eps)
    return out


def effect_sizes(cosines: Float[np.ndarray, "*pairs"]) -> Float[np.ndarray, "*pairs"]:
    """``‖ĝ_a − ĝ_b‖ / 2 = sqrt((1 − cos) / 2)`` for unit vectors; 0 aligned, 1/√2 orthogonal, 1 opposite."""
    return np.sqrt(np.clip((1.0 - np.asarray(cosines, np.float64)) / 2.0, 0.0, 1.0))


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConflictPair:
    """One pair: true sample ids, positions, scores, and the groups that pull it apart.

    ``groups``: ``(label, contribution to the cosine, group cosine, group q-value)``, most
    negative contribution first (per-group scope: significant groups first; q NaN otherwise).
    """

    sample_a: int
    sample_b: int
    index_a: int
    index_b: int
    cosine: float
    effect_size: float
    pvalue: float
    qvalue: float
    significant: bool
    groups: tuple[tuple[str, float, float, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class ConflictCluster:
    """A connected component of the conflict graph (edges = significant pairs)."""

    samples_a: np.ndarray
    samples_b: np.ndarray
    n_pairs: int
    mean_cosine: float
    groups: tuple[tuple[str, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class ConflictReport:
    """Everything :func:`detect` found for tasks A and B.

    Arrays are ``[n_a, n_b]`` over pairs (rows = A's samples in ``sample_ids_a`` order):
    ``cosines``, ``effect_sizes``, ``pvalues``, ``qvalues``, ``significant``. With
    ``scope="groups"`` the tests are per (group, pair): ``group_pvalues``, ``group_qvalues``,
    ``group_significant`` are ``[G, n_a, n_b]`` and the pair arrays hold the smallest p- and
    q-value over groups, a pair being significant when any of its groups is. ``gram`` keeps the
    dot products (per group too, when computed); ``null_cosines`` the within-task reference
    cosines per side (``{"a": [...], "b": [...]}`` or ``{"reference": [...]}``), for the figure,
    and ``null_group_cosines`` the same per group (``[G, pairs]``, per-group scope only).
    ``hotspots [G]``: net conflict of each group over what was found,
    ``−Σ contribution_g`` over significant pairs (or significant group-pairs); positive = the
    group pulls them apart. ``settings``: the arguments that produced it.
    """

    task_a: str
    task_b: str
    sample_ids_a: np.ndarray
    sample_ids_b: np.ndarray
    cosines: np.ndarray
    effect_sizes: np.ndarray
    pvalues: np.ndarray
    qvalues: np.ndarray
    significant: np.ndarray
    gram: Gram
    null_cosines: Mapping[str, np.ndarray]
    hotspots: np.ndarray | None
    top_pairs: tuple[ConflictPair, ...]
    clusters: tuple[ConflictCluster, ...]
    recommendations: Mapping[str, Any]
    settings: Mapping[str, Any]
    group_pvalues: np.ndarray | None = None
    group_qvalues: np.ndarray | None = None
    group_significant: np.ndarray | None = None
    null_group_cosines: Mapping[str, np.ndarray] | None = None

    @property
    def groups(self) -> GroupIndex:
        return self.gram.groups

    @property
    def n_significant(self) -> int:
        return int(self.significant.sum())


def detect(
    task_a: Source,
    task_b: Source,
    *,
    layout: ModelLayout | None = None,
    scope: str = "overall",
    reference: str | Source = "both",
    null: str = "pooled",
    tail: str | None = None,
    whiten: bool | None = None,
    fisher_pool: str | None = "pooled",
    fisher: Mapping[str, Any] | None = None,
    eps: float = 1e-8,
    relative_eps: float = 1e-3,
    alpha: float = 0.05,
    fdr_method: str = "bh",
    min_effect_size: float = ORTHOGONAL_EFFECT,
    top_k: int = 20,
    top_groups: int = 3,
    max_clusters: int = 20,
    filter_fraction: float = 0.25,
    chunk_size: int = 64,
    by_group: bool = True,
    names: tuple[str, str] | None = None,
) -> ConflictReport:
    """Find the sample pairs of tasks A and B whose whitened gradients conflict.

    Scores, null hypothesis and tests: see the module docstring. With ``scope="overall"`` each
    pair's cosine is tested; with ``scope="groups"`` each pair's cosine *within every parameter
    group* (head, layer) is tested against the same group's within-task cosines, and BH/BY runs
    over all ``G · n_a · n_b`` tests — the way to find a conflict confined to one head, which
    whitening dilutes to a ``~1/G`` share of the overall cosine. A (group-)pair is significant
    when its q-value is ``≤ alpha`` and its (group) effect size ``> min_effect_size``.

    Args:
      task_a, task_b: per-sample gradients (:data:`Source`), e.g. TaskFisher values with stored
        signed gradients, or GroupedGrads from :mod:`fisherjax.analysis.projection`.
      layout: the model's layout, for per-head groups (without it, one group per leaf).
      scope: ``"overall"`` or ``"groups"``.
      reference: ``"a"``, ``"b"``, ``"both"`` (max of the two p-values) or a source holding a
        held-out reference split of task A (same parameters, disjoint samples).
      null: ``"pooled"``, ``"normal"`` or ``"row"`` (see the module docstring); ``tail``:
        None (default: purely empirical pooled null) or ``"gpd"`` (far tail from a generalized
        Pareto fit: single-pair power, weaker calibration; see the module docstring).
      whiten: whiten with ``1/sqrt(Î + ε)`` (default: yes for raw gradients, as-projected for
        GroupedGrads). ``fisher_pool``: whose Fisher, ``"pooled"`` (both tasks' samples),
        ``"a"``, ``"b"``, or None for no whitening; ``fisher`` overrides it with an explicit
        ``{path: param-shaped}`` Fisher (needed for streamed sources).
      eps, relative_eps: damping ``ε = max(eps, relative_eps · mean Î)``.
      alpha, fdr_method: FDR level and ``"bh"`` / ``"by"``.
      min_effect_size: effect-size threshold (default ``1/√2``: negative cosine).
      top_k, top_groups, max_clusters: sizes of the reported lists.
      filter_fraction: a sample that conflicts with at least this fraction of the other task is
        recommended for filtering, one with fewer conflicts for down-weighting.
      chunk_size: samples per chunk; by_group: keep per-group scores (``[G, n_a, n_b]`` floats).
      names: task names for the report (default: from the sources).

    Raises:
      DataError: a task with fewer than two samples (or too few for the reference), different
        parameter sets, a zero gradient, a missing Fisher. NumericalError: NaN/inf gradients.
    """
    if fdr_method not in ("bh", "by"):
        raise ConfigError(f"fdr_method must be 'bh' or 'by', got {fdr_method!r}")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must lie in (0, 1), got {alpha}")
    if scope not in ("overall", "groups"):
        raise ConfigError(f"scope must be 'overall' or 'groups', got {scope!r}")
    if scope == "groups" and not by_group:
        raise ConfigError("scope='groups' needs by_group=True")
    names = names or (None, None)
    stream_a, stream_b = _stream(task_a, names[0], "A"), _stream(task_b, names[1], "B")
    external = None
    if isinstance(reference, str):
        if reference not in REFERENCES:
            raise ConfigError(f"reference must be one of {REFERENCES} or a source of reference samples, got {reference!r}")
    else:
        external = _stream(reference, None, "reference")
    streams = [stream_a, stream_b] + ([external] if external else [])
    _check_same_parameters(streams)
    for s in streams:
        if s.size is not None and s.size < 2:
            raise DataError(f"task {s.name!r} has {s.size} sample(s); conflict detection needs at least two per task")

    grouping = stream_a.grouping or grouping_for(stream_a.shapes, layout)
    whiten = (stream_a.whitened if stream_a.grouping is not None else fisher_pool is not None or fisher is not None) if whiten is None else whiten
    inv_sqrt, eps_used = None, None
    if stream_a.grouping is not None:
        if whiten and not stream_a.whitened:
            raise ConfigError("these projected gradients were not whitened; project them with a Fisher to whiten")
    elif whiten:
        pool = _whitening_fisher(fisher, fisher_pool, stream_a, stream_b)
        eps_used = damping(pool, eps=eps, relative_eps=relative_eps)
        inv_sqrt = _inverse_sqrt(pool, eps_used, stream_a)

    size = _chunk(chunk_size, *streams)
    per_group = scope == "groups"
    chunks_a, chunks_b = _prepared(stream_a, grouping, inv_sqrt, size), _prepared(stream_b, grouping, inv_sqrt, size)
    gram = _gram(chunks_a, chunks_b, grouping, by_group)
    _check_sizes(gram, stream_a.name, stream_b.name)
    cosines = gram.cosines
    scores = _nan_group_cosines(gram) if per_group else cosines
    null_cosines: dict[str, np.ndarray] = {}
    null_group_cosines: dict[str, np.ndarray] | None = {} if per_group else None
    pvalues = []

    def reference_scores(ref: Gram, side: str, square: bool):
        """Scores to test against; keeps the distinct reference cosines for the figure."""
        pairs = np.triu_indices(len(ref.sample_ids_a), 1) if square else (slice(None), slice(None))
        null_cosines[side] = ref.cosines[pairs].ravel()
        if not per_group:
            return ref.cosines
        group_scores = _nan_group_cosines(ref)
        null_group_cosines[side] = group_scores[(slice(None),) + pairs].reshape(len(group_scores), -1)
        return group_scores

    if external is not None:
        ref = _gram(chunks_a, _prepared(external, grouping, inv_sqrt, size), grouping, per_group)
        _check_sizes(ref, stream_a.name, "reference")
        pvalues.append(conflict_pvalues(scores, reference_scores(ref, "reference", False), null=null, tail=tail))
    else:
        if reference in ("a", "both"):
            ref_scores = reference_scores(_gram(chunks_a, chunks_a, grouping, per_group), "a", True)
            pvalues.append(conflict_pvalues(scores, ref_scores, exclude_self=True, null=null, tail=tail))
        if reference in ("b", "both"):
            ref_scores = reference_scores(_gram(chunks_b, chunks_b, grouping, per_group), "b", True)
            pvalues.append(np.swapaxes(conflict_pvalues(np.swapaxes(scores, -1, -2), ref_scores, exclude_self=True, null=null, tail=tail), -1, -2))
    pvalues = np.fmax.reduce(pvalues) if len(pvalues) > 1 else pvalues[0]
    qvalues = fdr_qvalues(pvalues, fdr_method)
    effects = effect_sizes(cosines)
    group_p = group_q = group_sig = None
    if per_group:
        group_p, group_q = pvalues, qvalues
        group_sig = (np.nan_to_num(group_q, nan=1.0) <= alpha) & (effect_sizes(np.nan_to_num(scores, nan=1.0)) > min_effect_size)
        significant = group_sig.any(0)
        pvalues, qvalues = np.fmin.reduce(group_p, axis=0), np.fmin.reduce(group_q, axis=0)
    else:
        significant = (np.nan_to_num(qvalues, nan=1.0) <= alpha) & (effects > min_effect_size)

    hotspots = None
    if by_group:
        weight = 1.0 / np.sqrt(np.outer(gram.sq_norms_a, gram.sq_norms_b))
        if per_group:
            hotspots = -np.einsum("gij,gij,ij->g", gram.group_dots, group_sig.astype(np.float32), weight.astype(np.float32), dtype=np.float64)
        else:
            hotspots = -np.einsum("gij,ij->g", gram.group_dots, (significant * weight).astype(np.float32), dtype=np.float64)
    top = _top_pairs(gram, cosines, effects, pvalues, qvalues, significant, group_sig, top_k, top_groups, group_q)
    clusters = _clusters(gram, cosines, significant, group_sig, max_clusters, top_groups)
    if per_group:  # a pair's conflict strength: its most negative significant group cosine
        pair_scores = np.nanmin(np.where(group_sig, scores, np.inf), axis=0)
    else:
        pair_scores = cosines
    recommendations = _recommend(gram, pair_scores, significant, hotspots, filter_fraction)
    settings = dict(
        scope=scope, reference=reference if isinstance(reference, str) else "external split",
        null=null, tail=tail if null == "pooled" else None, whiten=bool(whiten), fisher_pool=fisher_pool if fisher is None else "given",
        eps=eps_used, alpha=alpha, fdr_method=fdr_method, min_effect_size=min_effect_size,
    )
    return ConflictReport(
        stream_a.name, stream_b.name, gram.sample_ids_a, gram.sample_ids_b, cosines, effects, pvalues, qvalues,
        significant, gram, null_cosines, hotspots, top, clusters, recommendations, settings, group_p, group_q, group_sig,
        null_group_cosines,
    )


def _nan_group_cosines(gram: Gram) -> np.ndarray:
    """Per-group cosines with NaN (untested) where either side's group gradient is zero."""
    denom = np.sqrt(gram.group_sq_norms_a[:, :, None].astype(np.float64) * gram.group_sq_norms_b[:, None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, gram.group_dots / denom, np.nan)


def _check_sizes(gram: Gram, name_a: str, name_b: str) -> None:
    for name, ids, norms in ((name_a, gram.sample_ids_a, gram.sq_norms_a), (name_b, gram.sample_ids_b, gram.sq_norms_b)):
        if len(ids) < 2:
            raise DataError(f"task {name!r} has {len(ids)} sample(s); conflict detection needs at least two per task")
        if (norms <= 0).any():
            bad = ids[norms <= 0]
            raise DataError(f"task {name!r}: samples {bad[:5].tolist()} have a zero gradient; their cosine is undefined")


def _whitening_fisher(fisher, pool, stream_a, stream_b):
    if fisher is not None:
        return fisher
    if pool not in ("pooled", "a", "b"):
        raise ConfigError(f"fisher_pool must be 'pooled', 'a', 'b' or None, got {pool!r}")
    need = [s for s, used in ((stream_a, pool in ("a", "pooled")), (stream_b, pool in ("b", "pooled"))) if used]
    for s in need:
        if s.fisher is None:
            raise ConfigError(f"task {s.name!r} is a stream without a stored Fisher; pass fisher= to whiten")
    if pool == "a":
        return stream_a.fisher()
    if pool == "b":
        return stream_b.fisher()
    return pooled_fisher(stream_a.fisher(), stream_a.size, stream_b.fisher(), stream_b.size)


def _pair_groups(gram: Gram, i, j, top_groups: int, group_q=None, group_sig=None):
    """Groups that pull pairs ``(i, j)`` apart: ``(label, contribution, group cosine, group q)``.

    Ordered by most negative contribution (per-group scope: significant groups first)."""
    if gram.group_dots is None or len(i) == 0:
        return [()] * len(i)
    dots = gram.group_dots[:, i, j].astype(np.float64)  # [G, P]
    contrib = dots / np.sqrt(gram.sq_norms_a[i] * gram.sq_norms_b[j])[None]
    denom = np.sqrt(gram.group_sq_norms_a[:, i].astype(np.float64) * gram.group_sq_norms_b[:, j])
    group_cos = np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)
    q = group_q[:, i, j] if group_q is not None else np.full(dots.shape, np.nan)
    first = ~group_sig[:, i, j] if group_sig is not None else np.zeros(dots.shape, bool)
    order = np.lexsort((contrib, first), axis=0)[:top_groups]  # [top, P]
    labels = np.array(gram.groups.labels, dtype=object)
    cols = np.arange(len(i))[None]
    names, values, cosines, qs = labels[order], contrib[order, cols], group_cos[order, cols], q[order, cols]
    return [
        tuple(zip(names[:, p].tolist(), values[:, p].tolist(), cosines[:, p].tolist(), qs[:, p].tolist()))
        for p in range(len(i))
    ]


def _top_pairs(gram, cosines, effects, pvalues, qvalues, significant, group_sig, top_k, top_groups, group_q=None):
    # Significant pairs first, strongest effect first; then the strongest of the rest.
    order = np.lexsort((-effects.ravel(), ~significant.ravel()))[:top_k]
    i, j = np.unravel_index(order, cosines.shape)
    groups = _pair_groups(gram, i, j, top_groups, group_q, group_sig)
    return tuple(
        ConflictPair(
            int(gram.sample_ids_a[a]), int(gram.sample_ids_b[b]), int(a), int(b), float(cosines[a, b]),
            float(effects[a, b]), float(pvalues[a, b]), float(qvalues[a, b]), bool(significant[a, b]), g,
        )
        for a, b, g in zip(i, j, groups)
    )


def _clusters(gram, cosines, significant, group_sig, max_clusters, top_groups):
    """Connected components of the bipartite graph A ∪ B whose edges are the significant pairs
    (``scipy.sparse.csgraph.connected_components``), with the groups that pull each apart."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n_a, n_b = cosines.shape
    i, j = np.nonzero(significant)
    if len(i) == 0:
        return ()
    graph = coo_matrix((np.ones(len(i)), (i, n_a + j)), shape=(n_a + n_b, n_a + n_b))
    _, labels = connected_components(graph, directed=False)
    edge_label = labels[i]
    sizes = np.bincount(edge_label, minlength=labels.max() + 1)
    chosen = np.argsort(-sizes)[: min(max_clusters, int((sizes > 0).sum()))]
    label_names = np.array(gram.groups.labels, dtype=object)
    if gram.group_dots is not None:
        contrib = gram.group_dots[:, i, j] / np.sqrt(gram.sq_norms_a[i] * gram.sq_norms_b[j])[None]
        if group_sig is not None:
            contrib = contrib * group_sig[:, i, j]
        per_cluster = np.zeros((labels.max() + 1, contrib.shape[0]))
        np.add.at(per_cluster, edge_label, -contrib.T)  # net pull apart per cluster and group
    out = []
    for c in chosen:
        on_edges = edge_label == c
        groups = ()
        if gram.group_dots is not None:
            pull = np.maximum(per_cluster[c], 0)
            share = pull / max(pull.sum(), 1e-30)
            best = np.argsort(-share)[:top_groups]
            groups = tuple((str(label_names[g]), float(share[g])) for g in best if share[g] > 0)
        out.append(
            ConflictCluster(
                gram.sample_ids_a[np.unique(i[on_edges])], gram.sample_ids_b[np.unique(j[on_edges])], int(on_edges.sum()),
                float(cosines[i[on_edges], j[on_edges]].mean()), groups,
            )
        )
    return tuple(out)


def _recommend(gram, pair_scores, significant, hotspots, filter_fraction, max_hotspots: int = 5):
    """Samples to filter or down-weight and hotspot groups, each with the numbers behind it.

    ``pair_scores [n_a, n_b]``: the cosine of each pair (overall scope) or its most negative
    significant group cosine (per-group scope); reported as ``mean_conflict_cosine``."""
    cosines = pair_scores
    n_a, n_b = cosines.shape
    n_sig = int(significant.sum())
    samples = []
    for side, ids, degree, other in (("a", gram.sample_ids_a, significant.sum(1), n_b), ("b", gram.sample_ids_b, significant.sum(0), n_a)):
        sig_cos = np.where(significant, cosines, 0.0).sum(1 if side == "a" else 0)
        for k in np.nonzero(degree)[0]:
            fraction = degree[k] / other
            samples.append(
                dict(
                    task=side, sample_id=int(ids[k]), conflicts=int(degree[k]), fraction_of_other_task=float(fraction),
                    mean_conflict_cosine=float(sig_cos[k] / degree[k]), action="filter" if fraction >= filter_fraction else "reweight",
                )
            )
    samples.sort(key=lambda s: -s["conflicts"])
    # Greedy cover: which few samples, removed, take away most significant pairs.
    remaining, removed = significant.copy(), []
    while remaining.any() and len(removed) < max(1, (n_a + n_b) // 10):
        deg_a, deg_b = remaining.sum(1), remaining.sum(0)
        if deg_a.max() >= deg_b.max():
            k = int(deg_a.argmax())
            removed.append(("a", int(gram.sample_ids_a[k])))
            remaining[k, :] = False
        else:
            k = int(deg_b.argmax())
            removed.append(("b", int(gram.sample_ids_b[k])))
            remaining[:, k] = False
        if 1 - remaining.sum() / n_sig >= 0.8:
            break
    hot = []
    if hotspots is not None and n_sig:
        pull = np.maximum(hotspots, 0)
        share = pull / max(pull.sum(), 1e-30)
        for g in np.argsort(-share)[:max_hotspots]:
            if share[g] >= 0.05:
                hot.append(dict(group=gram.groups.labels[g], share=float(share[g]), mean_contribution=float(-hotspots[g] / n_sig)))
    return dict(
        samples=samples,
        removal=dict(
            samples=[dict(task=t, sample_id=s) for t, s in removed],
            fraction_of_conflicts_removed=float(1 - remaining.sum() / n_sig) if n_sig else 0.0,
        ),
        hotspots=hot,
    )


def head_map(report: ConflictReport) -> tuple[Float[np.ndarray, "blocks layers heads"], tuple[str, ...]]:
    """``[blocks, L, H]`` mean net conflict per conflict of each (block, layer, head) group, and the
    block names (q, k, v, o that are present; NaN where a block has fewer heads).

    With significant pairs: ``hotspots / n_significant``. Without any, a descriptive stand-in:
    ``−mean contribution_g`` over the ``top_pairs`` (the most opposed pairs, none significant).
    """
    groups = report.groups
    heads = groups.is_head
    if report.hotspots is None or not heads.any():
        return np.zeros((0, 0, 0)), ()
    if report.n_significant:
        values = report.hotspots / report.n_significant
    else:
        i = np.array([p.index_a for p in report.top_pairs], int)
        j = np.array([p.index_b for p in report.top_pairs], int)
        g = report.gram
        values = -(g.group_dots[:, i, j] / np.sqrt(g.sq_norms_a[i] * g.sq_norms_b[j])[None]).mean(1) if len(i) else np.zeros(len(groups))
    n_layers, n_heads = groups.layer[heads].max() + 1, groups.head[heads].max() + 1
    out = np.full((len(ATTENTION_ORDER), n_layers, n_heads), np.nan)
    block_pos = np.array([ATTENTION_ORDER.index(b) for b in groups.block[heads]])
    out[block_pos, groups.layer[heads], groups.head[heads]] = values[heads]
    present = [b for b in ATTENTION_ORDER if (groups.block[heads] == b).any()]
    keep = [ATTENTION_ORDER.index(b) for b in present]
    return out[keep], tuple(present)


def summarize(report: ConflictReport) -> dict:
    """The ``conflicts.json`` dict: settings, counts, null, top pairs (true sample ids), clusters,
    hotspots, the layer × head conflict map, and recommendations. JSON-serialisable."""
    cos = report.cosines
    hmap, blocks = head_map(report)
    settings = report.settings
    null_doc = (
        "H0 for pair (i, j): b_j is exchangeable with task A's own samples as far as its cosine with a_i goes "
        "(reference='a'; 'b' swaps the roles, 'both' takes the larger p-value, an external split replaces A's samples). "
        f"One-sided (conflict = lower cosine), tested on {'each parameter group' if settings['scope'] == 'groups' else 'the whole gradient'}; "
        f"test {settings['null']!r}{' with a generalized Pareto tail' if settings.get('tail') else ''}; "
        f"FDR by {settings['fdr_method'].upper()} over all tests; significant = q <= {settings['alpha']} and effect > {settings['min_effect_size']:.3f}."
    )
    return dict(
        task_a=report.task_a,
        task_b=report.task_b,
        n_samples_a=int(len(report.sample_ids_a)),
        n_samples_b=int(len(report.sample_ids_b)),
        n_pairs=int(cos.size),
        n_significant=report.n_significant,
        settings={k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in settings.items()},
        null=null_doc,
        cosine=dict(
            mean=float(cos.mean()), std=float(cos.std()), min=float(cos.min()), max=float(cos.max()),
            null_mean={k: float(v.mean()) for k, v in report.null_cosines.items() if v.size},
            null_std={k: float(v.std()) for k, v in report.null_cosines.items() if v.size},
        ),
        top_pairs=[
            dict(
                sample_a=p.sample_a, sample_b=p.sample_b, cosine=p.cosine, effect_size=p.effect_size, pvalue=p.pvalue,
                qvalue=p.qvalue, significant=p.significant,
                groups=[
                    dict(group=g, contribution=c, group_cosine=gc, **({} if np.isnan(q) else dict(group_qvalue=q)))
                    for g, c, gc, q in p.groups
                ],
            )
            for p in report.top_pairs
        ],
        clusters=[
            dict(
                samples_a=c.samples_a.tolist(), samples_b=c.samples_b.tolist(), n_pairs=c.n_pairs, mean_cosine=c.mean_cosine,
                groups=[dict(group=g, share=s) for g, s in c.groups],
            )
            for c in report.clusters
        ],
        head_map=dict(
            blocks=list(blocks), values=np.where(np.isnan(hmap), None, hmap).tolist(),
            over="significant pairs" if report.n_significant else f"top {len(report.top_pairs)} pairs (none significant)",
        ),
        recommendations=report.recommendations,
    )


def plot_conflicts(report: ConflictReport):
    """Figure: histogram of the tested A × B cosines against the within-task null (significant
    pairs as a rug), and per attention block a layer × head map of mean net conflict.

    Overall scope: pair cosines. Per-group scope: the cosines of the hottest group (the one
    pulling the significant pairs apart most), against that group's within-task cosines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hmap, blocks = head_map(report)
    label = "cosine"
    values, nulls, marked = report.cosines, dict(report.null_cosines), report.significant
    if report.group_significant is not None and report.n_significant:
        hot = int(np.argmax(report.hotspots))
        g = report.gram
        denom = np.sqrt(g.group_sq_norms_a[hot][:, None].astype(np.float64) * g.group_sq_norms_b[hot][None, :])
        values = np.divide(g.group_dots[hot], denom, out=np.zeros(denom.shape), where=denom > 0)
        nulls = {k: v[hot] for k, v in report.null_group_cosines.items()}
        marked = report.group_significant[hot]
        label = f"cosine on {report.groups.labels[hot]}"
    values = values.ravel()
    n_maps = len(blocks)
    fig = plt.figure(figsize=(6.0 + 2.6 * n_maps, 4.2), layout="constrained")
    grid = fig.add_gridspec(1, 1 + n_maps, width_ratios=[2.2] + [1] * n_maps)
    ax = fig.add_subplot(grid[0, 0])
    everything = np.concatenate([values] + [v for v in nulls.values() if v.size])
    bins = np.linspace(everything.min(), everything.max(), 60)
    ax.hist(values, bins=bins, density=True, alpha=0.55, color="tab:blue", label=f"{report.task_a} × {report.task_b} ({values.size} pairs)")
    colors = {"a": "tab:green", "b": "tab:orange", "reference": "tab:green"}
    for key, null in nulls.items():
        name = {"a": f"within {report.task_a}", "b": f"within {report.task_b}"}.get(key, "reference split")
        ax.hist(null, bins=bins, density=True, histtype="step", lw=1.6, color=colors[key], label=f"null: {name}")
    sig = values[marked.ravel()]
    if sig.size:
        ax.plot(sig, np.zeros_like(sig), "|", color="tab:red", ms=14, mew=1.2, label=f"significant ({sig.size}, q ≤ {report.settings['alpha']})")
    whitened = "whitened " if report.settings["whiten"] else ""
    ax.set_xlabel(f"{label} of {whitened}per-sample gradients")
    ax.set_ylabel("density")
    ax.set_title(f"Sample conflicts: {report.task_a} vs {report.task_b}")
    ax.legend(fontsize=7, loc="upper right")
    if n_maps:
        finite = hmap[np.isfinite(hmap)]
        bound = max(float(np.abs(finite).max()) if finite.size else 0.0, 1e-12)
        maps = [fig.add_subplot(grid[0, 1 + b]) for b in range(n_maps)]
        for b, (block, axm) in enumerate(zip(blocks, maps)):
            image = axm.imshow(hmap[b], cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
            axm.set_title(block if report.n_significant else f"{block}: top {len(report.top_pairs)} pairs, none significant", fontsize=8)
            axm.set_xlabel("kv head" if block in ("k", "v") and report.groups.head[report.groups.block == block].max() + 1 < hmap.shape[2] else "head")
            axm.set_xticks(range(hmap.shape[2]))
            axm.set_yticks(range(hmap.shape[1]))
            if b == 0:
                axm.set_ylabel("layer")
            else:
                axm.set_yticklabels([])
        fig.colorbar(image, ax=maps, shrink=0.85, label="mean −contribution to the cosine\nper pair (red = pulls apart)")
    return fig
