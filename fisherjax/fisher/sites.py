"""Per-sample gradients and their squared marginals from one batched backward pass.

A *site* is a parametrised module call of the decoder (see :mod:`fisherjax.models.common`): a
dense layer records its input ``a`` and receives the output gradient ``δ``; a norm records
``x̂``; an embedding records its ids. For sample ``i`` (sums over its positions ``t``, ``s``):

* dense kernel ``g = Σ_t a_t δ_tᵀ``; bias ``g = Σ_t δ_t``;
* norm scale ``g = Σ_t x̂_t ⊙ δ_t``; norm bias ``g = Σ_t δ_t``;
* embedding row ``v``: ``g_v = Σ_{t: id_t = v} δ_t``; untied unembedding ``g = Σ_t h_t e_tᵀ``
  with ``e = ∂L/∂logits``; a tied table receives both.

Group Fisher needs only the column and row marginals of ``g²`` (:mod:`fisherjax.fisher.groups`).
For a dense kernel they follow without forming ``g`` ("ghost norms"):

    col_c = Σ_{t,s} (a_t·a_s) δ_tc δ_sc        row_r = Σ_{t,s} (δ_t·δ_s) a_tr a_sr

costing ``T²(d_in + d_out)`` per sample instead of ``T·d_in·d_out`` for materialising ``g``;
:func:`use_ghost` picks the cheaper per site. Embedding rows use the same identity restricted to
equal ids, ``‖g_v‖² = Σ_{t,s: id_t = id_s = v} δ_t·δ_s``, and the unembedding
``‖g_{:,v}‖² = Σ_{t,s} (h_t·h_s) e_tv e_sv``.

The formulas are written for one sample (``[seq, width]``); :func:`over_samples` maps them over
a site's leading axes (``[layer, batch, seq, width]`` for layer sites) with the sample axis first
in the results (``[batch, layer, ...]``, the layout of per-sample pytrees everywhere else), as one
vmap or, on CPU, as a loop over (sample, layer) pieces. All functions are pure and traceable.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from fisherjax import backend
from fisherjax.fisher.groups import needed_marginals
from fisherjax.layout import ModelLayout, Role


@dataclasses.dataclass(frozen=True)
class Site:
    """One site and the parameters it feeds.

    ``kind``: ``dense`` | ``norm`` | ``embed`` | ``unembed``; ``params`` maps the leaf name
    (``kernel``, ``bias``, ``scale``, ``embedding``) to the flat parameter path; ``layered``
    marks a leading layer axis; ``tied`` marks an unembedding that is the embedding transposed.
    """

    name: str
    kind: str
    params: Mapping[str, str]
    layered: bool
    tied: bool = False


def discover_sites(layout: ModelLayout, site_names) -> tuple[Site, ...]:
    """Match the model's site names (``embed``, ``layers/attn/c_attn`` ...) to parameter paths."""
    sites = []
    for name in site_names:
        leaves = {p.rsplit("/", 1)[1]: p for p in layout.specs if p.rsplit("/", 1)[0] == name}
        layered = name.startswith("layers/")
        if "kernel" in leaves:
            sites.append(Site(name, "unembed" if layout.specs[leaves["kernel"]].role == Role.UNEMBED else "dense", leaves, layered))
        elif "scale" in leaves:
            sites.append(Site(name, "norm", leaves, layered))
        elif "embedding" in leaves:
            sites.append(Site(name, "embed", leaves, layered))
        elif name == "lm_head":
            embed = layout.paths(Role.EMBED)
            sites.append(Site(name, "unembed", {"embedding": embed[0]}, False, tied=True))
        else:
            raise ValueError(f"site {name!r} matches no parameters of the layout")
    return tuple(sites)


def use_ghost(seq: int, d_in: int, d_out: int) -> bool:
    """Ghost norms cost ``T²(d_in + d_out)`` per sample, materialising costs ``T·d_in·d_out``."""
    return seq * (d_in + d_out) < d_in * d_out


# ---- one sample's dense layer ([seq, width]) --------------------------------------------------


def dense_grad(a: Float[Array, "t i"], delta: Float[Array, "t o"]) -> Float[Array, "i o"]:
    """Kernel gradient ``Σ_t a_t δ_tᵀ``."""
    return a.T @ delta


def dense_col_squares(a: Float[Array, "t i"], delta: Float[Array, "t o"], ghost: bool) -> Float[Array, " o"]:
    """``Σ_i g_io²`` for every output channel ``o``; ghost: ``Σ_t δ_t ⊙ (G δ)_t`` with ``G = a aᵀ``."""
    if not ghost:
        return jnp.square(dense_grad(a, delta)).sum(0)
    return ((a @ a.T) @ delta * delta).sum(0)


def dense_row_squares(a: Float[Array, "t i"], delta: Float[Array, "t o"], ghost: bool) -> Float[Array, " i"]:
    """``Σ_o g_io²`` for every input feature ``i``; ghost: ``Σ_t a_t ⊙ (G a)_t`` with ``G = δ δᵀ``."""
    if not ghost:
        return jnp.square(dense_grad(a, delta)).sum(1)
    return ((delta @ delta.T) @ a * a).sum(0)


def bias_grad(delta: Float[Array, "t o"]) -> Float[Array, " o"]:
    """Bias gradient ``Σ_t δ_t`` (dense and norm biases)."""
    return delta.sum(0)


def scale_grad(x_hat: Float[Array, "t d"], delta: Float[Array, "t d"]) -> Float[Array, " d"]:
    """Norm scale gradient ``Σ_t x̂_t ⊙ δ_t``."""
    return (x_hat * delta).sum(0)


# ---- one sample's embeddings and unembedding ---------------------------------------------------


def embedding_grad(ids: Int[Array, " t"], delta: Float[Array, "t d"], rows: int) -> Float[Array, "rows d"]:
    """Table gradient: ``δ_t`` added to row ``id_t`` (ids outside ``[0, rows)`` are dropped)."""
    ids = jnp.where((ids >= 0) & (ids < rows), ids, rows)  # negative ids would wrap around
    return jnp.zeros((rows, delta.shape[-1]), delta.dtype).at[ids].add(delta, mode="drop")


def embedding_row_squares(ids: Int[Array, " t"], delta: Float[Array, "t d"], rows: int) -> Float[Array, " rows"]:
    """``‖g_v‖²`` of every table row, ``Σ_{t,s: id_t = id_s = v} δ_t·δ_s``."""
    per_position = jnp.where(ids[:, None] == ids[None, :], delta @ delta.T, 0.0).sum(-1)
    return jnp.zeros((rows,), per_position.dtype).at[ids].add(per_position)


def unembed_grad(h: Float[Array, "t d"], e: Float[Array, "t v"]) -> Float[Array, "d v"]:
    """Output-head gradient ``Σ_t h_t e_tᵀ`` (``[d, vocab]``, the lm_head kernel layout)."""
    return h.T @ e


def unembed_col_squares(
    h: Float[Array, "t d"], e: Float[Array, "t v"], ghost: bool, vocab_chunk: int | None = None
) -> Float[Array, " v"]:
    """``‖g_{:,v}‖²`` of every vocabulary column, ``vocab_chunk`` columns at a time when given.

    Ghost: ``Σ_t e_t ⊙ (G e)_t`` with ``G = h hᵀ``. Chunks keep ``G e`` of a few thousand columns in
    cache instead of writing a ``[T, vocab]`` array and reading it back (CPU).
    """
    gram = h @ h.T if ghost else None

    def columns(x):
        return (gram @ x * x).sum(0) if ghost else jnp.square(h.T @ x).sum(0)

    return _in_column_chunks(columns, e, vocab_chunk)


def _in_column_chunks(fn, x: Float[Array, "t v"], width: int | None) -> Float[Array, " v"]:
    """``fn(x)`` for a column-wise ``fn``, evaluated on ``width`` columns at a time.

    The last chunk is moved back to end at the last column; the columns it shares with the one
    before are recomputed and written again with the same values, so no padded copy of ``x`` is
    made.
    """
    n = x.shape[-1]
    if width is None or width >= n:
        return fn(x)
    rows = x.shape[0]

    def chunk(k, out):
        start = jnp.minimum(k * width, n - width)
        part = jax.lax.dynamic_slice(x, (0, start), (rows, width))
        return jax.lax.dynamic_update_slice(out, fn(part), (start,))

    return jax.lax.fori_loop(0, -(-n // width), chunk, jnp.zeros((n,), x.dtype))


def tied_cross_term(ids, delta_in, h, e, rows: int) -> Float[Array, " rows"]:
    """``2 g_in[v]·g_out[v]`` for a table used as both embedding and unembedding.

    ``g_in[v] = Σ_{s: id_s = v} δ_s`` and ``g_out[v] = Σ_t e_tv h_t``, so the cross term is
    ``2 Σ_{s: id_s = v} Σ_t e_{t, id_s} (h_t·δ_s)``.
    """
    per_position = (e[:, ids] * (h @ delta_in.T)).sum(0)
    return jnp.zeros((rows,), per_position.dtype).at[ids].add(2.0 * per_position)


# ---- all sites ---------------------------------------------------------------------------------

VOCAB_CHUNK = 1024  # unembedding columns per piece on the looped path (measured best on CPU)


def over_samples(fn, layered: bool, loop: bool):
    """Map a one-sample function over a site's leading axes: ``[(layer,) batch, ...]`` in,
    ``[batch, (layer,) ...]`` out (the sample axis first, as for per-sample pytrees everywhere).

    ``loop``: ``jax.lax.map`` over the pieces in (sample, layer) order, each read in place with a
    dynamic index, so the result needs no transpose; otherwise ``jax.vmap``.
    """
    if not loop:
        mapped = jax.vmap(fn)
        return jax.vmap(mapped, in_axes=0, out_axes=1) if layered else mapped

    def looped(*xs):
        xs = [jnp.asarray(x) for x in xs]
        lead = (xs[0].shape[1], xs[0].shape[0]) if layered else xs[0].shape[:1]

        def piece(n):
            index = (n % lead[1], n // lead[1]) if layered else (n,)
            return fn(*(x[index] for x in xs))

        out = jax.lax.map(piece, jnp.arange(math.prod(lead)))
        return jax.tree.map(lambda y: y.reshape(*lead, *y.shape[1:]), out)

    return looped


def _tied_unembedding(sites) -> Site | None:
    """The unembedding site that reads the embedding table transposed, if the model ties them."""
    return next((s for s in sites if s.kind == "unembed" and s.tied), None)


def layer_site(tree: dict, name: str):
    """Site ``name``'s entry of a recording (``"layers/..."`` names live under ``tree["layers"]``)."""
    return tree["layers"][name[len("layers/") :]] if name.startswith("layers/") else tree[name]


class GradWalk(NamedTuple):
    """Per-sample gradients of one parameter, formed a piece at a time along one of its axes.

    ``grads(start, width)`` returns ``[batch, *piece]``: the parameter's per-sample gradients
    restricted to ``start : start + width`` along ``axis``; ``sample(i, start, width)`` returns
    sample ``i``'s piece alone (``[*piece]``), so a loop over samples can square and sum it while
    it is still in cache (:func:`fisherjax.fisher.diagonal.square_sums`). ``width`` is static,
    ``i`` and ``start`` may be traced. Layer-stacked parameters are walked along their layer
    axis, embedding tables along their rows, other kernels along their output columns.
    """

    axis: int
    size: int
    grads: Callable[[Array, int], Array]
    sample: Callable[[Array, Array, int], Array]


def grad_walks(layout: ModelLayout, sites, inputs: dict, deltas: dict, *, loop: bool | None = None) -> dict[str, GradWalk]:
    """A :class:`GradWalk` for every parameter (nothing is computed until a walk is called).

    ``loop``: see :func:`over_samples` (default :func:`fisherjax.backend.sample_loop`).
    """
    loop = backend.sample_loop() if loop is None else loop
    tied = _tied_unembedding(sites)
    walks: dict[str, GradWalk] = {}

    def layer_walk(fn, *arrays) -> GradWalk:
        """Walk a layer-stacked parameter along its layer axis (the arrays' axis 0)."""
        mapped = over_samples(fn, True, loop)

        def grads(start, width):
            return mapped(*(jax.lax.dynamic_slice_in_dim(a, start, width, 0) for a in arrays))

        def sample(i, start, width):
            if width == 1:  # one layer: a plain product, no batched matmul
                return fn(*(jax.lax.dynamic_index_in_dim(a, start, 0, keepdims=False)[i] for a in arrays))[None]
            return jax.vmap(fn)(*(jax.lax.dynamic_slice_in_dim(a, start, width, 0)[:, i] for a in arrays))

        return GradWalk(0, arrays[0].shape[0], grads, sample)

    def column_walk(axis, fn, whole: tuple, sliced: tuple) -> GradWalk:
        """Walk ``axis`` of a parameter of a non-layer site: each piece reads ``whole`` as they
        are and the matching columns (last axis) of ``sliced``."""
        mapped = over_samples(fn, False, loop)

        def grads(start, width):
            return mapped(*whole, *(jax.lax.dynamic_slice_in_dim(a, start, width, a.ndim - 1) for a in sliced))

        def sample(i, start, width):
            return fn(*(a[i] for a in whole), *(jax.lax.dynamic_slice_in_dim(a[i], start, width, a.ndim - 2) for a in sliced))

        return GradWalk(axis, sliced[0].shape[-1], grads, sample)

    for site in sites:
        x, d = layer_site(inputs, site.name), layer_site(deltas, site.name)
        p = site.params
        if site.layered:
            if site.kind == "dense":
                walks[p["kernel"]] = layer_walk(dense_grad, x, d)
            if site.kind == "norm":
                walks[p["scale"]] = layer_walk(scale_grad, x, d)
            if "bias" in p:
                walks[p["bias"]] = layer_walk(bias_grad, d)
        elif site.kind in ("dense", "unembed") and not site.tied:
            walks[p["kernel"]] = column_walk(1, dense_grad, (x,), (d,))
            if "bias" in p:
                walks[p["bias"]] = column_walk(0, bias_grad, (), (d,))
        elif site.kind == "norm":
            walks[p["scale"]] = column_walk(0, scale_grad, (), (x, d))
            if "bias" in p:
                walks[p["bias"]] = column_walk(0, bias_grad, (), (d,))
        elif site.kind == "embed":
            table = p["embedding"]
            unembedded = tied is not None and tied.params["embedding"] == table
            h, e = (inputs[tied.name], deltas[tied.name]) if unembedded else (None, None)
            rows = layout.specs[table].shape[0]
            walks[table] = GradWalk(0, rows, functools.partial(_table_rows, x, d, h, e, loop=loop),
                                    functools.partial(_sample_table_rows, x, d, h, e))
    return walks


def _table_rows(ids, delta_in, h, e, start, width: int, *, loop: bool):
    """Per-sample gradients of table rows ``start : start + width``: the embedding's scattered
    ``δ`` plus, for a tied table, the unembedding's ``(hᵀ e)ᵀ`` on those vocabulary columns."""

    rows = over_samples(lambda ids, delta: embedding_grad(ids - start, delta, width), False, loop)(ids, delta_in)
    if h is None:
        return rows
    columns = jax.lax.dynamic_slice_in_dim(e, start, width, e.ndim - 1)
    return rows + over_samples(lambda h, e: unembed_grad(h, e).T, False, loop)(h, columns)


def _sample_table_rows(ids, delta_in, h, e, i, start, width: int):
    """Sample ``i``'s gradient of table rows ``start : start + width`` (see :func:`_table_rows`)."""
    rows = embedding_grad(ids[i] - start, delta_in[i], width)
    if h is None:
        return rows
    return rows + unembed_grad(h[i], jax.lax.dynamic_slice_in_dim(e[i], start, width, 1)).T


def per_sample_grads_from_sites(
    layout: ModelLayout, sites, inputs: dict, deltas: dict, paths=None, *, loop: bool | None = None
) -> dict[str, Float[Array, "b ..."]]:
    """Full per-sample gradients ``{path: [batch, *param_shape]}`` (all parameters, or ``paths``).

    ``loop``: see :func:`over_samples` (default :func:`fisherjax.backend.sample_loop`).
    """
    walks = grad_walks(layout, sites, inputs, deltas, loop=loop)
    want = walks if paths is None else paths
    return {path: walks[path].grads(0, walks[path].size) for path in want}


def squared_marginals_from_sites(
    layout: ModelLayout,
    sites,
    inputs: dict,
    deltas: dict,
    *,
    seq: int,
    ghost: str = "auto",
    skip=(),
    loop: bool | None = None,
) -> dict[str, tuple]:
    """Per-sample ``(col, row)`` marginals of ``g²`` for every parameter not in ``skip``.

    ``ghost``: ``"auto"`` (cheaper per site, see :func:`use_ghost`), ``"always"`` or ``"never"``;
    ``loop``: see :func:`over_samples` (default :func:`fisherjax.backend.sample_loop`; the looped path also
    walks the vocabulary in chunks of :data:`VOCAB_CHUNK`). Marginals a parameter's groups do not
    use are None. Not yet divided by ``T_i``.
    """
    loop = backend.sample_loop() if loop is None else loop
    vocab_chunk = VOCAB_CHUNK if loop else None

    def decide(d_in, d_out):
        return {"auto": use_ghost(seq, d_in, d_out), "always": True, "never": False}[ghost]

    def bias_squares(x, d):
        return jnp.square(bias_grad(d)), None

    tied = _tied_unembedding(sites)
    tied_table = tied.params["embedding"] if tied is not None else None
    out: dict[str, tuple] = {}
    for site in sites:
        p = site.params
        marginals = {}  # path -> one sample's (x, δ) -> (col, row)
        if site.kind == "dense" or (site.kind == "unembed" and not site.tied):
            kernel = p["kernel"]
            if kernel not in skip:
                need_col, need_row = needed_marginals(layout.specs[kernel])
                g = decide(*layout.specs[kernel].shape[-2:])
                if site.kind == "unembed":
                    col_fn = functools.partial(unembed_col_squares, ghost=g, vocab_chunk=vocab_chunk)
                else:
                    col_fn = functools.partial(dense_col_squares, ghost=g)
                marginals[kernel] = lambda x, d, col_fn=col_fn, need_col=need_col, need_row=need_row, g=g: (
                    col_fn(x, d) if need_col else None,
                    dense_row_squares(x, d, g) if need_row else None,
                )
            if "bias" in p and p["bias"] not in skip:
                marginals[p["bias"]] = bias_squares
        elif site.kind == "norm":
            if p["scale"] not in skip:
                marginals[p["scale"]] = lambda x, d: (jnp.square(scale_grad(x, d)), None)
            if "bias" in p and p["bias"] not in skip:
                marginals[p["bias"]] = bias_squares
        elif site.kind == "embed" and p["embedding"] not in skip and p["embedding"] != tied_table:
            rows = layout.specs[p["embedding"]].shape[0]
            marginals[p["embedding"]] = lambda ids, d, rows=rows: (None, embedding_row_squares(ids, d, rows))
        if marginals:
            x, d = layer_site(inputs, site.name), layer_site(deltas, site.name)
            per_site = over_samples(lambda x, d: {k: f(x, d) for k, f in marginals.items()}, site.layered, loop)
            out.update(per_site(x, d))
    if tied_table is not None and tied_table not in skip:
        rows, d_model = layout.specs[tied_table].shape
        embed = next(s.name for s in sites if s.kind == "embed" and s.params["embedding"] == tied_table)
        table_rows = functools.partial(_tied_table_rows, rows=rows, ghost=decide(d_model, rows), vocab_chunk=vocab_chunk)
        out[tied_table] = over_samples(table_rows, False, loop)(inputs[embed], deltas[embed], inputs[tied.name], deltas[tied.name])
    return out


def _tied_table_rows(ids, delta_in, h, e, *, rows: int, ghost: bool, vocab_chunk: int | None):
    """One sample's ``‖g_v‖²`` of a table used as embedding and unembedding: ``‖g_in + g_out‖²``."""
    squares = embedding_row_squares(ids, delta_in, rows) + unembed_col_squares(h, e, ghost, vocab_chunk)
    return None, squares + tied_cross_term(ids, delta_in, h, e, rows)
