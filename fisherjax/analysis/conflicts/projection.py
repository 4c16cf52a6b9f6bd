"""Random projections of per-sample dense-kernel gradients that never form the gradients.

For a dense kernel ``[d_in, d_out]`` the per-sample gradient is ``g_i = Σ_t a_t δ_tᵀ`` (input
``a_t``, output gradient ``δ_t``, both from one batched backward pass,
:func:`fisherjax.grads.site_grads`). A Kronecker-structured Gaussian sketch projects it with
``m`` independent pairs ``R_in^(c) [d_in, k1]``, ``R_out^(c) [d_out, k2]`` (entries ``N(0, 1/k1)``,
``N(0, 1/k2)``):

    P_c(g_i) = R_in^(c)ᵀ g_i R_out^(c) = Σ_t (R_in^(c)ᵀ a_t)(R_out^(c)ᵀ δ_t)ᵀ      [k1, k2],  c = 1..m

scaled by ``1/sqrt(m)`` and concatenated (``m·k1·k2`` dimensions). It costs
``T·m·(d_in·k1 + d_out·k2 + k1·k2)`` per sample and never forms the ``d_in × d_out`` gradient.
Because ``E[R Rᵀ] = I`` for each independent factor (Johnson–Lindenstrauss scaling),
``E⟨P(g), P(h)⟩ = ⟨g, h⟩``: projected inner products are unbiased. Their variance is not that of
a dense Gaussian projection (relative variance about ``2/k`` for ``k`` dimensions): one outer
product multiplies two independent estimates, each with relative variance about ``2/k1``, which
is large for the low-rank (rank ``≤ T``) per-sample gradients. With ``m`` copies of side
``s = k1 = k2`` the relative variance is about ``4s / k`` and the first-stage cost
``T·(k/s)·(d_in + d_out)``: ``side=1`` (each coordinate ``Σ_t (r_cᵀ a_t)(q_cᵀ δ_t)``, a Khatri–Rao
sketch; the default) is within about a factor two of the dense projection's variance, larger
sides trade accuracy for speed, and ``side=None`` takes one outer product with ``k1 ≈ k2``. A
side whose ``k`` reaches its width uses the identity (exact on that side).
``benchmarks/phase5.py`` measures the agreement.

Groups. Projections are per (block, layer, head) for attention kernels — the head's slice of
the output axis for q/k/v and of the input axis for o, where
:meth:`~fisherjax.layout.ModelLayout.head_index` puts it (fused QKV included) — and per layer
for any other dense kernel, so projected features carry the same :class:`~.sources.Grouping` as
exact gradients and per-head conflict scores survive projection. ``k`` is the number of
dimensions per (block or kernel, layer), shared evenly among its heads:
``k_g = k // heads = m · k1 · k2``.

Whitening. The exact whitening ``g ⊙ W``, ``W = (Î + ε)^{-1/2}``, is elementwise and breaks
the Kronecker structure. Here each group's ``W_g [d_in_g, d_out_g]`` is replaced by its best
rank-one *multiplicative* fit ``W_g ≈ w_in w_outᵀ`` (least squares on ``log W``:
``log w_in = rowmean(log W) − μ/2``, ``log w_out = colmean(log W) − μ/2``, ``μ`` the grand mean),
so ``g ⊙ (w_in w_outᵀ) = Σ_t (w_in ⊙ a_t)(w_out ⊙ δ_t)ᵀ`` stays a sum of outer products and the
whitening folds into ``R_in`` and ``R_out``. It is exact when ``Î_g`` is itself rank-one
multiplicative (e.g. K-FAC-like ``E[a²] E[δ²]``); :func:`whitening_fit_error` measures the
approximation, and ``benchmarks/phase5.py`` reports projected-vs-exact agreement of whitened
cosines. For small leaves, :func:`project_grads` projects exactly whitened gradients instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from fisherjax.analysis.conflicts.gram import damping
from fisherjax.analysis.conflicts.sources import GradChunk, GroupedGrads, Grouping, grouping_for
from fisherjax.data import Batch
from fisherjax.errors import ConfigError, DataError
from fisherjax.grads import site_grads
from fisherjax.layout import ModelLayout, Role
from fisherjax.models.model import model_jit

__all__ = [
    "ATTENTION_ROLES",
    "DENSE_ROLES",
    "KernelProjection",
    "Projection",
    "agreement",
    "group_fisher_blocks",
    "kronecker_whitening",
    "make_projection",
    "project_batch",
    "project_grads",
    "project_stream",
    "project_task",
    "split_dims",
    "whitening_fit_error",
]

ATTENTION_ROLES = (Role.Q, Role.K, Role.V, Role.QKV, Role.O)
DENSE_ROLES = ATTENTION_ROLES + (Role.MLP_IN, Role.MLP_GATE, Role.MLP_OUT)


@dataclasses.dataclass(frozen=True, eq=False)
class KernelProjection:
    """Projection of one feature (a kernel, or one block of a fused QKV kernel).

    ``key``: its feature key in the grouping; ``path``: the kernel; ``site``: the site whose
    ``a`` / ``δ`` feed it; ``layered``: the site has a leading layer axis.
    ``in_index [G, d_in_g]`` / ``out_index [G, d_out_g]``: each group's slice of the input /
    output axis (None: the whole axis, shared by the groups). ``r_in [L, G, m, d_in_g, k1]``,
    ``r_out [L, G, m, d_out_g, k2]``: the (whitening-scaled) projection factors of the ``m``
    copies, with the ``1/sqrt(m)`` of the concatenation folded into ``r_in``.
    """

    key: str
    path: str
    site: str
    layered: bool
    in_index: np.ndarray | None
    out_index: np.ndarray | None
    r_in: Array
    r_out: Array


@dataclasses.dataclass(frozen=True, eq=False)
class Projection:
    """Projections of every selected kernel, their grouping, ``k``, and the whitening used."""

    kernels: tuple[KernelProjection, ...]
    grouping: Grouping
    k: int
    whitened: bool
    eps: float | None = None

    @property
    def dims(self) -> dict[str, tuple[int, int]]:
        """``{key: (m, k1, k2)}`` per feature."""
        return {p.key: (int(p.r_in.shape[-3]), int(p.r_in.shape[-1]), int(p.r_out.shape[-1])) for p in self.kernels}


def _site_of(path: str, layered: bool) -> str:
    if not path.endswith("/kernel"):
        raise ConfigError(f"{path!r} is not a dense kernel")
    site = path[: -len("/kernel")]
    return site[len("layers/") :] if layered else site


def split_dims(k_group: int, d_in: int, d_out: int, side: int | None = 1) -> tuple[int, int, int]:
    """``(m, k1, k2)`` with ``m · k1 · k2 ≈ k_group``, each ``k`` at most its side's width.

    ``side``: ``k1 = k2 = side`` and ``m = k_group // side²`` copies; None: one copy, ``k1 ≈ k2``.
    A request as wide as the gradient itself gets the identity (``m = 1``, full widths).
    """
    if k_group >= d_in * d_out:
        return 1, d_in, d_out
    if side is None:
        k1 = min(d_in, max(1, int(round(math.sqrt(k_group)))))
        k2 = min(d_out, max(1, k_group // k1))
        return 1, min(d_in, max(1, k_group // k2)), k2
    k1, k2 = min(side, d_in), min(side, d_out)
    return max(1, k_group // (k1 * k2)), k1, k2


def _factor(rng: np.random.Generator, layers: int, groups: int, copies: int, width: int, k: int) -> np.ndarray:
    """``[L, G, m, width, k]`` with N(0, 1/k) entries (``E[R Rᵀ] = I``), or the identity when ``k ≥ width``."""
    if k >= width:
        return np.broadcast_to(np.eye(width, dtype=np.float32), (layers, groups, copies, width, width)).copy()
    return rng.standard_normal((layers, groups, copies, width, k), dtype=np.float32) / np.float32(math.sqrt(k))


def group_fisher_blocks(fisher: np.ndarray, in_index, out_index) -> np.ndarray:
    """A kernel's Fisher ``[L, d_in, d_out]`` sliced per group: ``[L, G, d_in_g, d_out_g]``."""
    if out_index is not None:
        return np.moveaxis(np.take(fisher, out_index, axis=-1), -3, -2)  # [L, d_in, G, hd] -> [L, G, d_in, hd]
    if in_index is not None:
        return np.take(fisher, in_index, axis=-2)  # [L, G, hd, d_out]
    return fisher[:, None]


def kronecker_whitening(
    fisher_blocks: Float[np.ndarray, "*lead d_in d_out"], eps: float
) -> tuple[Float[np.ndarray, "*lead d_in"], Float[np.ndarray, "*lead d_out"]]:
    """Rank-one multiplicative fit of ``W = (Î + ε)^{-1/2}``: ``W ≈ w_in w_outᵀ``.

    ``log w_in = rowmean(log W) − μ/2``, ``log w_out = colmean(log W) − μ/2`` (``μ`` the mean of
    ``log W``), the least-squares fit of ``log W_ab ≈ u_a + v_b``.
    """
    log_w = -0.5 * np.log(np.asarray(fisher_blocks, np.float64) + eps)
    grand = log_w.mean(axis=(-2, -1), keepdims=True)
    w_in = np.exp(log_w.mean(-1) - grand[..., 0] / 2)
    w_out = np.exp(log_w.mean(-2) - grand[..., 0] / 2)
    return w_in.astype(np.float32), w_out.astype(np.float32)


def whitening_fit_error(fisher_blocks: Float[np.ndarray, "*lead d_in d_out"], eps: float) -> float:
    """Relative Frobenius error ``‖W − w_in w_outᵀ‖ / ‖W‖`` of :func:`kronecker_whitening`, all groups together."""
    w = (np.asarray(fisher_blocks, np.float64) + eps) ** -0.5
    w_in, w_out = kronecker_whitening(fisher_blocks, eps)
    return float(np.linalg.norm(w - w_in[..., :, None] * w_out[..., None, :]) / np.linalg.norm(w))


def make_projection(
    layout: ModelLayout,
    k: int,
    *,
    paths: Sequence[str] | str = "attention",
    seed: int = 0,
    fisher: Mapping[str, np.ndarray] | None = None,
    eps: float | None = None,
    relative_eps: float = 1e-3,
    side: int | None = 1,
) -> Projection:
    """Draw the projections of the chosen dense kernels.

    Args:
      layout: the model's layout.
      k: projected dimensions per (attention block or dense kernel, layer), split among heads.
      paths: ``"attention"`` (q/k/v/o kernels), ``"dense"`` (plus MLP kernels) or explicit paths.
      seed: seed of the Gaussian factors (``numpy.random.default_rng``).
      side: ``k1 = k2`` of each of the ``m = k_g / side²`` copies (default 1, the Khatri–Rao
        sketch, most accurate); None for one ``k1 × k2`` outer product per group (cheapest).
      fisher: ``{path: [L, d_in, d_out]}`` diagonal Fisher; when given, the projections include
        the Kronecker-factored whitening (module docstring) with damping ``eps`` (default
        ``max(1e-8, relative_eps · mean Î)`` over the chosen kernels, as in
        :func:`~.gram.damping`).
    """
    if k < 1:
        raise ConfigError(f"k must be positive, got {k}")
    if isinstance(paths, str):
        if paths not in ("attention", "dense"):
            raise ConfigError(f"paths must be 'attention', 'dense' or a list of kernel paths, got {paths!r}")
        roles = ATTENTION_ROLES if paths == "attention" else DENSE_ROLES
        paths = [p for role in roles for p in layout.paths(role, "kernel")]
    for path in paths:
        spec = layout.spec(path)
        if spec.kind != "kernel" or spec.role not in DENSE_ROLES:
            raise ConfigError(f"{path!r} ({spec.role.value} {spec.kind}) is not a dense kernel")
        if not spec.layered and spec.layer is not None:
            raise ConfigError(f"{path!r}: per-layer (unstacked) kernels have no layer-stacked site; not supported")
    grouping = grouping_for({p: layout.spec(p).shape for p in paths}, layout)
    if fisher is not None:
        missing = [p for p in paths if p not in fisher]
        if missing:
            raise DataError(f"no Fisher for {missing}")
        if eps is None:
            eps = damping({p: fisher[p] for p in paths}, relative_eps=relative_eps)
    rng = np.random.default_rng(seed)  # host-side draws: no device compile per factor shape
    kernels = []
    for view in grouping.views:
        spec = layout.spec(view.path)
        shape = spec.shape if spec.layered else (1,) + spec.shape
        layers, d_in, d_out = shape
        in_index = out_index = None
        if view.kind == "in_heads":
            out_index = layout.head_index(view.path, view.block)
        elif view.kind == "out_heads":
            in_index = layout.head_index(view.path)
        groups = len(grouping.members[view.key]) // layers
        width_in = in_index.shape[-1] if in_index is not None else d_in
        width_out = out_index.shape[-1] if out_index is not None else d_out
        copies, k1, k2 = split_dims(max(1, k // groups), width_in, width_out, side)
        r_in = _factor(rng, layers, groups, copies, width_in, k1) / np.float32(math.sqrt(copies))
        r_out = _factor(rng, layers, groups, copies, width_out, k2)
        if fisher is not None:
            f = np.asarray(fisher[view.path], np.float32).reshape(shape)
            w_in, w_out = kronecker_whitening(group_fisher_blocks(f, in_index, out_index), eps)  # [L, G, d]
            r_in, r_out = w_in[:, :, None, :, None] * r_in, w_out[:, :, None, :, None] * r_out
        kernels.append(
            KernelProjection(view.key, view.path, _site_of(view.path, spec.layered), spec.layered, in_index, out_index, jnp.asarray(r_in), jnp.asarray(r_out))
        )
    projected = Grouping(grouping.index, grouping.members, None)
    return Projection(tuple(kernels), projected, k, fisher is not None, eps)


def _project_factors(a, delta, in_index, out_index, r_in, r_out):
    """``Σ_t (R_inᵀ a_t)(R_outᵀ δ_t)ᵀ`` per group and copy: ``a [L,B,T,d_in]``, ``δ [L,B,T,d_out]``
    → ``[B, L·G, m·k1·k2]``."""
    hi = jax.lax.Precision.HIGHEST
    if in_index is not None:
        a_in = jnp.einsum("lbtge,lgmei->lbtgmi", a[..., in_index], r_in, precision=hi)
    else:
        a_in = jnp.einsum("lbtd,lgmdi->lbtgmi", a, r_in, precision=hi)
    if out_index is not None:
        d_out = jnp.einsum("lbtge,lgmek->lbtgmk", delta[..., out_index], r_out, precision=hi)
    else:
        d_out = jnp.einsum("lbtd,lgmdk->lbtgmk", delta, r_out, precision=hi)
    p = jnp.einsum("lbtgmi,lbtgmk->blgmik", a_in, d_out, precision=hi)
    return p.reshape(p.shape[0], p.shape[1] * p.shape[2], -1)


@model_jit(static_argnames=("model", "plan"))
def _project_batch(model, params, input_ids, attention_mask, labels, factors, plan):
    sites = site_grads(model, params, input_ids, attention_mask, labels)
    out = {}
    for key, site, layered in plan:
        a = sites.inputs["layers"][site] if layered else sites.inputs[site][None]
        delta = sites.deltas["layers"][site] if layered else sites.deltas[site][None]
        in_index, out_index, r_in, r_out = factors[key]
        out[key] = _project_factors(a, delta, in_index, out_index, r_in, r_out)
    return out


def _factors(projection: Projection):
    return {
        p.key: (None if p.in_index is None else jnp.asarray(p.in_index), None if p.out_index is None else jnp.asarray(p.out_index), p.r_in, p.r_out)
        for p in projection.kernels
    }


def project_batch(model, params, batch: Batch, projection: Projection) -> GradChunk:
    """Projected per-sample gradients of one batch from one backward pass (filler rows dropped).

    Returns a :class:`~.sources.GradChunk` whose ``grads`` are features
    ``{key: [c, G_leaf, m·k1·k2]}``.
    """
    plan = tuple((p.key, p.site, p.layered) for p in projection.kernels)
    features = _project_batch(model, params, batch.input_ids, batch.attention_mask, batch.labels, _factors(projection), plan)
    keep = np.asarray(batch.sample_ids) >= 0
    return GradChunk(np.asarray(batch.sample_ids)[keep], {k: np.asarray(v)[keep] for k, v in features.items()})


def project_stream(model, params, make_batches: Callable[[], Iterable[Batch]], projection: Projection) -> Callable[[], Iterator[GradChunk]]:
    """A re-iterable :data:`~.sources.Source`: projects each batch on the fly."""

    def chunks() -> Iterator[GradChunk]:
        for batch in make_batches():
            yield project_batch(model, params, batch, projection)

    return chunks


def project_task(model, params, batches: Iterable[Batch], projection: Projection, *, name: str = "task") -> GroupedGrads:
    """Projected gradients of a whole task, held in memory (``n · Σ k`` floats), as GroupedGrads."""
    chunks = [project_batch(model, params, b, projection) for b in batches]
    if not chunks:
        raise DataError(f"task {name!r} has no batches")
    ids = np.concatenate([c.sample_ids for c in chunks])
    features = {k: np.concatenate([c.grads[k] for c in chunks]) for k in chunks[0].grads}
    return GroupedGrads(name, ids, features, projection.grouping, projection.whitened)


def project_grads(grads: Mapping[str, Float[Array, "n *shape"]], projection: Projection) -> dict[str, Float[Array, "n groups k"]]:
    """Project explicit per-sample gradients ``{path: [n, (L,) d_in, d_out]}``: ``R_inᵀ g R_out`` per group.

    The reference the Kronecker route is tested against, and the route for exactly whitened
    gradients of small leaves (whiten first, project with an unwhitened projection).
    """
    hi = jax.lax.Precision.HIGHEST
    out = {}
    for p in projection.kernels:
        if p.path not in grads:
            raise DataError(f"no gradients for {p.path!r}")
        g = jnp.asarray(grads[p.path], jnp.float32)
        g = g if p.layered else g[:, None]
        if p.out_index is not None:
            sliced = jnp.moveaxis(g[..., jnp.asarray(p.out_index)], -3, -2)  # [n, L, G, d_in, hd]
        elif p.in_index is not None:
            sliced = g[:, :, jnp.asarray(p.in_index), :]  # [n, L, G, hd, d_out]
        else:
            sliced = g[:, :, None]
        proj = jnp.einsum("nlgde,lgmdi,lgmek->nlgmik", sliced, p.r_in, p.r_out, precision=hi)
        out[p.key] = proj.reshape(proj.shape[0], proj.shape[1] * proj.shape[2], -1)
    return out


def agreement(exact: Float[np.ndarray, "n_a n_b"], projected: Float[np.ndarray, "n_a n_b"], *, top: int | None = None) -> dict[str, float]:
    """How well projected cosines reproduce exact ones: Pearson and Spearman correlation
    (``scipy.stats``), max and mean absolute error, and the overlap of the ``top`` most negative
    pairs (default 1% of pairs, at least 10)."""
    from scipy import stats

    x, y = np.asarray(exact, np.float64).ravel(), np.asarray(projected, np.float64).ravel()
    top = top or max(10, x.size // 100)
    lowest_x, lowest_y = set(np.argsort(x)[:top].tolist()), set(np.argsort(y)[:top].tolist())
    return dict(
        pearson=float(stats.pearsonr(x, y)[0]),
        spearman=float(stats.spearmanr(x, y)[0]),
        max_abs_error=float(np.abs(x - y).max()),
        mean_abs_error=float(np.abs(x - y).mean()),
        top_overlap=len(lowest_x & lowest_y) / top,
    )
