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

All functions here are pure and traceable; layer sites carry a leading layer axis
``[layer, batch, seq, width]`` and are vmapped over it, with the sample axis moved first in the
results (``[batch, layer, ...]``, the layout of per-sample pytrees everywhere else).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

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


# ---- dense layers (one layer, [batch, seq, width]) --------------------------------------------


def dense_grad(a: Float[Array, "b t i"], delta: Float[Array, "b t o"]) -> Float[Array, "b i o"]:
    """Per-sample kernel gradient ``Σ_t a_t δ_tᵀ``."""
    return jnp.einsum("bti,bto->bio", a, delta)


def dense_col_squares(a: Float[Array, "b t i"], delta: Float[Array, "b t o"], ghost: bool) -> Float[Array, "b o"]:
    """Per-sample ``Σ_i g_io²`` for every output channel ``o``."""
    if not ghost:
        return jnp.square(dense_grad(a, delta)).sum(1)
    gram = jnp.einsum("bti,bsi->bts", a, a)
    return jnp.einsum("bts,bso,bto->bo", gram, delta, delta)


def dense_row_squares(a: Float[Array, "b t i"], delta: Float[Array, "b t o"], ghost: bool) -> Float[Array, "b i"]:
    """Per-sample ``Σ_o g_io²`` for every input feature ``i``."""
    if not ghost:
        return jnp.square(dense_grad(a, delta)).sum(2)
    gram = jnp.einsum("bto,bso->bts", delta, delta)
    return jnp.einsum("bts,bsi,bti->bi", gram, a, a)


# ---- embeddings and the unembedding -----------------------------------------------------------


def embedding_grad(ids: Int[Array, "b t"], delta: Float[Array, "b t d"], rows: int) -> Float[Array, "b rows d"]:
    """Per-sample table gradient: ``δ_t`` added to row ``id_t``."""
    return jax.vmap(lambda i, d: jnp.zeros((rows, d.shape[-1]), d.dtype).at[i].add(d))(ids, delta)


def embedding_row_squares(ids: Int[Array, "b t"], delta: Float[Array, "b t d"], rows: int) -> Float[Array, "b rows"]:
    """Per-sample ``‖g_v‖²`` of every table row, ``Σ_{t,s: id_t = id_s = v} δ_t·δ_s``."""
    same = ids[:, :, None] == ids[:, None, :]
    per_position = jnp.where(same, jnp.einsum("btd,bsd->bts", delta, delta), 0.0).sum(-1)
    return jax.vmap(lambda i, r: jnp.zeros((rows,), r.dtype).at[i].add(r))(ids, per_position)


def unembed_grad(h: Float[Array, "b t d"], e: Float[Array, "b t v"]) -> Float[Array, "b d v"]:
    """Per-sample output-head gradient ``Σ_t h_t e_tᵀ`` (``[d, vocab]``, the lm_head kernel layout)."""
    return jnp.einsum("btd,btv->bdv", h, e)


def unembed_col_squares(h: Float[Array, "b t d"], e: Float[Array, "b t v"], ghost: bool) -> Float[Array, "b v"]:
    """Per-sample ``‖g_{:,v}‖²`` of every vocabulary column."""
    if not ghost:
        return jnp.square(unembed_grad(h, e)).sum(1)
    gram = jnp.einsum("btd,bsd->bts", h, h)
    return jnp.einsum("bts,bsv,btv->bv", gram, e, e)


def tied_cross_term(ids, delta_in, h, e, rows: int) -> Float[Array, "b rows"]:
    """``2 g_in[v]·g_out[v]`` for a table used as both embedding and unembedding.

    ``g_in[v] = Σ_{s: id_s = v} δ_s`` and ``g_out[v] = Σ_t e_tv h_t``, so the cross term is
    ``2 Σ_{s: id_s = v} Σ_t e_{t, id_s} (h_t·δ_s)``.
    """
    overlap = jnp.einsum("btd,bsd->bts", h, delta_in)
    e_at_ids = jnp.take_along_axis(e, jnp.broadcast_to(ids[:, None, :], overlap.shape), axis=-1)
    per_position = (e_at_ids * overlap).sum(1)
    return jax.vmap(lambda i, c: jnp.zeros((rows,), c.dtype).at[i].add(2.0 * c))(ids, per_position)


# ---- all sites ---------------------------------------------------------------------------------


def _per_layer(fn, site: Site):
    """Apply a single-layer function to a site's arrays, layer axis first in, sample axis first out."""
    if not site.layered:
        return fn
    return jax.vmap(fn, in_axes=0, out_axes=1)


def _layer_site(tree: dict, name: str):
    return tree["layers"][name[len("layers/") :]] if name.startswith("layers/") else tree[name]


def per_sample_grads_from_sites(
    layout: ModelLayout, sites, inputs: dict, deltas: dict, paths=None
) -> dict[str, Float[Array, "b ..."]]:
    """Full per-sample gradients ``{path: [batch, *param_shape]}`` (all parameters, or ``paths``)."""
    want = set(paths) if paths is not None else set(layout.specs)
    out: dict[str, Array] = {}

    def add(path, value):
        out[path] = out[path] + value if path in out else value

    for site in sites:
        x, d = _layer_site(inputs, site.name), _layer_site(deltas, site.name)
        p = site.params
        if site.kind in ("dense", "unembed") and not site.tied:
            if p["kernel"] in want:
                add(p["kernel"], _per_layer(dense_grad, site)(x, d))
            if "bias" in p and p["bias"] in want:
                add(p["bias"], _per_layer(lambda d: d.sum(1), site)(d))
        elif site.kind == "unembed":  # tied: lm_head is the embedding transposed
            if p["embedding"] in want:
                add(p["embedding"], jnp.swapaxes(unembed_grad(x, d), -1, -2))
        elif site.kind == "norm":
            if p["scale"] in want:
                add(p["scale"], _per_layer(lambda x, d: jnp.einsum("btd,btd->bd", x, d), site)(x, d))
            if "bias" in p and p["bias"] in want:
                add(p["bias"], _per_layer(lambda d: d.sum(1), site)(d))
        elif site.kind == "embed" and p["embedding"] in want:
            rows = layout.specs[p["embedding"]].shape[0]
            add(p["embedding"], embedding_grad(x, d, rows))
    return out


def squared_marginals_from_sites(
    layout: ModelLayout, sites, inputs: dict, deltas: dict, *, seq: int, ghost: str = "auto", skip=()
) -> dict[str, tuple]:
    """Per-sample ``(col, row)`` marginals of ``g²`` for every parameter not in ``skip``.

    ``ghost``: ``"auto"`` (cheaper per site, see :func:`use_ghost`), ``"always"`` or ``"never"``.
    Marginals a parameter's groups do not use are None. Not yet divided by ``T_i``.
    """
    out: dict[str, tuple] = {}
    tied_parts: dict[str, Array] = {}

    def decide(d_in, d_out):
        return {"auto": use_ghost(seq, d_in, d_out), "always": True, "never": False}[ghost]

    for site in sites:
        x, d = _layer_site(inputs, site.name), _layer_site(deltas, site.name)
        p = site.params
        if site.kind == "dense" or (site.kind == "unembed" and not site.tied):
            kernel = p["kernel"]
            if kernel not in skip:
                need_col, need_row = needed_marginals(layout.specs[kernel])
                d_in, d_out = layout.specs[kernel].shape[-2:]
                g = decide(d_in, d_out)
                col_fn = unembed_col_squares if site.kind == "unembed" else dense_col_squares
                col = _per_layer(lambda x, d: col_fn(x, d, g), site)(x, d) if need_col else None
                row = _per_layer(lambda x, d: dense_row_squares(x, d, g), site)(x, d) if need_row else None
                out[kernel] = (col, row)
            if "bias" in p and p["bias"] not in skip:
                out[p["bias"]] = (_per_layer(lambda d: jnp.square(d.sum(1)), site)(d), None)
        elif site.kind == "unembed":
            table = p["embedding"]
            d_model, vocab = x.shape[-1], d.shape[-1]
            tied_parts["out"] = unembed_col_squares(x, d, decide(d_model, vocab))
            tied_parts["h"], tied_parts["e"] = x, d
        elif site.kind == "norm":
            if p["scale"] not in skip:
                out[p["scale"]] = (_per_layer(lambda x, d: jnp.square(jnp.einsum("btd,btd->bd", x, d)), site)(x, d), None)
            if "bias" in p and p["bias"] not in skip:
                out[p["bias"]] = (_per_layer(lambda d: jnp.square(d.sum(1)), site)(d), None)
        elif site.kind == "embed" and p["embedding"] not in skip:
            rows = layout.specs[p["embedding"]].shape[0]
            out[p["embedding"]] = (None, embedding_row_squares(x, d, rows))
            if layout.specs[p["embedding"]].tied:
                tied_parts["ids"], tied_parts["delta_in"] = x, d
    if "out" in tied_parts:
        table = next(s.params["embedding"] for s in sites if s.kind == "unembed" and s.tied)
        if table not in skip:
            rows = layout.specs[table].shape[0]
            cross = tied_cross_term(tied_parts["ids"], tied_parts["delta_in"], tied_parts["h"], tied_parts["e"], rows)
            out[table] = (None, out[table][1] + tied_parts["out"] + cross)
    return out
