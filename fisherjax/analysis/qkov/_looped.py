"""The looped kernel: each slice's contraction walked in cache-sized pieces — what a CPU needs.

The same sums as the batched kernel (``{block: [layer, c_a, c_b, heads]}``), for a backend where a
pass that writes whole head-major operands costs more than the GEMMs: on XLA:CPU fresh operand
buffers fault page by page and transposing copies run far below memory bandwidth. A
``fori_loop`` per kernel walks pieces of about ``piece_floats`` floats per side; each piece is
weighted, made a GEMM operand while it is in cache, multiplied and added to its slice's sum. The
stored leaves are read as they are (in place on a CPU when aligned), and the layer ranges (with
fewer layers than threads, each block's) run on a thread pool (:func:`in_parallel`), because
XLA:CPU runs a GEMM with a small ``c_a × c_b`` output on about one core and the computations of
one thread one after another.
Measurements: ``docs/DECISIONS.md`` (Phase 6) and ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from fisherjax import backend
from fisherjax.analysis.qkov._operands import PRECISIONS, BlockKinds, head_major, per_block, slice_key, views_of, weighted
from fisherjax.layout import ATTENTION_BLOCKS, ModelLayout

MAX_STACKED_ROWS = 8
"""A q/k/v piece's rows are moved head-major one by one, unrolled in the loop body: at most this many."""


def rows_per_piece(rows: int, floats_per_row: int, target_floats: int, most: int | None = None) -> int:
    """The most rows ``r`` (a divisor of ``rows``, at most ``most``) with ``r · floats_per_row ≤
    target_floats``; at least 1."""
    fits = [r for r in range(1, (most or rows) + 1) if rows % r == 0 and r * floats_per_row <= target_floats]
    return max(fits, default=1)


def looped_sums(
    views_a: Mapping[str, Array], scale_a: Array, weights: Mapping[str, Array] | None, views_b: Mapping[str, Array], scale_b: Array,
    first_layer: Int[Array, ""] | int = 0, *, n_layers: int | None = None, transform_a: str, transform_b: str, piece_floats: int,
    precision: str, row_heads: Mapping[str, Callable[[Array], Array]] | None = None,
) -> dict[str, Array]:
    """``M = A · Gᵀ`` per (layer, head) slice of layers ``[first_layer, first_layer + n_layers)``
    (all by default), walking each slice's contraction in pieces: ``{block: [n_layers, c_a, c_b, heads]}``.

    ``views_*``: ``{block/kind: [c, layer, *view]}``; ``weights``: ``{block/kind: [layer, *view]}``.
    The pieces:

    * q/k/v kernels ``[c, layer, d_in, h, e]``: ``r`` rows of ``d_in`` of one layer, every head.
      Each row's ``[c, h, e] → [h, c, e]`` is a small 3-D transpose, which XLA:CPU does at cache
      speed (a 4-D ``[c, r, h, e] → [h, c, r, e]`` did not); ``r`` of them stacked give every head
      one GEMM with a contraction of ``r · e`` (one GEMM per row was dominated by per-call cost).
    * o kernels ``[c, layer, h, e, d_out]``: ``r`` rows of ``e`` of one head and layer — ``r ·
      d_out`` contiguous floats per sample, already the GEMM operand ``[c, r · d_out]``.
    * biases ``[c, layer, h, e]`` are small and taken whole.

    A q/k/v kernel may also be given as its stored leaf ``[c, layer, d_in, columns]`` with
    ``row_heads[key]`` viewing one row ``[c, columns] → [c, h, e]``: fused QKV leaves (GPT-2,
    GPT-NeoX) are then sliced piece by piece, where a whole q/k/v view of them would be one strided
    copy of the block before the loop. ``first_layer`` is traced, so every layer range of one
    length shares a compilation.
    """
    n_layers = n_layers or next(iter(views_a.values())).shape[1]
    dot = functools.partial(jnp.einsum, precision=PRECISIONS[precision], preferred_element_type=jnp.float32)

    def layers_of(x, offset):  # offset: 1 for views [c, layer, ...], 0 for weights [layer, ...]
        return jax.lax.dynamic_slice_in_dim(x, first_layer, n_layers, axis=1 - offset)

    def take(x, start, sizes):  # x[:, first_layer + start[0], ...] of a view; weights: without the sample axis
        lead = x.ndim - len(start)
        return jax.lax.dynamic_slice(x, (0,) * lead + (first_layer + start[0], *start[1:]), x.shape[:lead] + sizes)

    def all_heads_walk(xa, xb, w, to_heads):
        c, _, d_in, *row_shape = xa.shape
        heads, e = jax.eval_shape(to_heads, jax.ShapeDtypeStruct((c, *row_shape), xa.dtype)).shape[1:]
        r = rows_per_piece(d_in, c * heads * e, piece_floats, MAX_STACKED_ROWS)

        def operand(x, layer, row, transform, scale, is_weighted):
            rows = []
            for i in range(r):
                xi = to_heads(take(x, (layer, row + i) + (0,) * len(row_shape), (1, 1, *row_shape)).reshape(x.shape[0], *row_shape))
                wi = take(w, (layer, row + i, 0, 0), (1, 1, heads, e)).reshape(heads, e) if is_weighted else None
                rows.append(jnp.transpose(weighted(xi, transform, scale, wi), (1, 0, 2)))
            return jnp.stack(rows, axis=2).reshape(heads, x.shape[0], r * e)

        def body(k, acc):
            layer, row = k // (d_in // r), (k % (d_in // r)) * r
            m = dot("hcs,hbs->hcb", operand(xa, layer, row, transform_a, scale_a, w is not None),
                    operand(xb, layer, row, transform_b, scale_b, False))
            return jax.lax.dynamic_update_index_in_dim(acc, acc[layer] + m, layer, axis=0)

        zero = jnp.zeros((n_layers, heads, c, xb.shape[0]), jnp.float32)
        return jax.lax.fori_loop(0, n_layers * (d_in // r), body, zero)

    def one_head_walk(xa, xb, w):
        c, _, heads, e, d_out = xa.shape
        r = rows_per_piece(e, c * d_out, piece_floats)
        pieces = e // r

        def operand(x, layer, head, row, transform, scale, is_weighted):
            x = take(x, (layer, head, row, 0), (1, 1, r, d_out)).reshape(x.shape[0], r * d_out)
            return weighted(x, transform, scale, take(w, (layer, head, row, 0), (1, 1, r, d_out)).reshape(-1) if is_weighted else None)

        def body(k, acc):
            layer, head, row = k // (heads * pieces), (k // pieces) % heads, (k % pieces) * r
            m = dot("cs,bs->cb", operand(xa, layer, head, row, transform_a, scale_a, w is not None),
                    operand(xb, layer, head, row, transform_b, scale_b, False))
            return jax.lax.dynamic_update_slice(acc, (acc[layer, head] + m)[None, None], (layer, head, 0, 0))

        zero = jnp.zeros((n_layers, heads, c, xb.shape[0]), jnp.float32)
        return jax.lax.fori_loop(0, n_layers * heads * pieces, body, zero)

    def term(key):
        block, kind = key.split("/")
        xa, xb, w = views_a[key], views_b[key], weights.get(key) if weights is not None else None
        if kind == "bias":
            a = head_major(weighted(layers_of(xa, 0), transform_a, scale_a, None if w is None else layers_of(w, 1)), block, kind, 1)
            b = head_major(weighted(layers_of(xb, 0), transform_b, scale_b, None), block, kind, 1)
            return dot("lhcs,lhbs->lhcb", a[:, :, 0], b[:, :, 0])
        if block == "o":
            return one_head_walk(xa, xb, w)
        return all_heads_walk(xa, xb, w, (row_heads or {}).get(key, lambda x: x))

    return per_block((key.split("/")[0], term(key)) for key in sorted(views_a))


def leaf_sums(
    leaves_a: Mapping[str, Array], scale_a: Array, weights: Mapping[str, Array], leaves_b: Mapping[str, Array], scale_b: Array,
    first_layer: Int[Array, ""] | int = 0, *, layout: ModelLayout, kinds: BlockKinds, n_layers: int | None = None, transform_a: str,
    transform_b: str, piece_floats: int, precision: str,
) -> dict[str, Array]:
    """:func:`looped_sums` of both tasks' stored leaves ``{leaf key: [c, layer, *shape]}``: q/k/v
    kernels as leaves whose row pieces are viewed with heads (:meth:`ModelLayout.output_heads`),
    o kernels and biases as head views."""
    row_heads = {}
    for block, kind in kinds:
        if kind == "kernel" and block != "o":
            row_heads[slice_key(block, kind)] = functools.partial(layout.output_heads, layout.block_sources(block, kind)[0], block=block)

    def sides(leaves):
        views = views_of(layout, leaves, tuple(p for p in kinds if slice_key(*p) not in row_heads))
        return views | {key: leaves[layout.block_sources(*key.split("/"))[0]] for key in row_heads}

    return looped_sums(
        sides(leaves_a), scale_a, weights, sides(leaves_b), scale_b, first_layer, n_layers=n_layers, transform_a=transform_a,
        transform_b=transform_b, piece_floats=piece_floats, precision=precision, row_heads=row_heads,
    )


LEAF_SUMS_STATIC = ("layout", "kinds", "n_layers", "transform_a", "transform_b", "piece_floats", "precision")
"""The static arguments of :func:`leaf_sums`."""

leaf_sums_jit = jax.jit(leaf_sums, static_argnames=LEAF_SUMS_STATIC, compiler_options=backend.LOOPED_COMPILER_OPTIONS)
""":func:`leaf_sums`, jitted (one compilation per set of blocks and layer-range length) with
:data:`fisherjax.backend.LOOPED_COMPILER_OPTIONS`."""


def layer_ranges(n_layers: int, parts: int) -> list[tuple[int, int]]:
    """``(first, count)`` of at most ``parts`` contiguous layer ranges covering ``n_layers``, sizes
    differing by at most one (so at most two lengths, i.e. two compilations per block)."""
    parts = max(1, min(parts, n_layers))
    sizes = [n_layers // parts + (p < n_layers % parts) for p in range(parts)]
    starts = np.cumsum([0] + sizes[:-1])
    return [(int(first), count) for first, count in zip(starts, sizes)]


def in_parallel(
    work: Callable[[BlockKinds, int, int], Mapping[str, Array]],
    kinds: BlockKinds,
    n_layers: int,
    workers: int,
    cost: Callable[[str], float] = lambda block: 1.0,
) -> dict[str, np.ndarray]:
    """``{block: [n_layers, c_a, c_b, heads]}``: ``work(block_kinds, first_layer, count)`` over every
    block and layer, as ``workers`` concurrent computations.

    A second core only helps when a second thread runs a computation of its own (see the module
    docstring), so the work is cut into computations handed to a thread pool (the standard
    library's ``ThreadPoolExecutor``): where every worker gets layers (``n_layers ≥ workers``),
    one computation per :func:`layer_ranges` range, every block in it — the ranges are the same
    work to within a layer, and a tile is at most two programs to compile (one per range length)
    instead of two per block; with fewer layers, each block is cut into layer ranges, largest
    ``cost`` first so the pool ends evenly.
    """
    if workers <= 1:
        return {block: np.asarray(value) for block, value in work(kinds, 0, n_layers).items()}
    blocks = {block: tuple(p for p in kinds if p[0] == block) for block, _ in kinds}
    ranges = layer_ranges(n_layers, workers)
    if n_layers >= workers:
        units = [(kinds, first, count) for first, count in ranges]  # largest ranges first
    else:
        by_cost = sorted(((block, first, count) for block in blocks for first, count in ranges),
                         key=lambda u: cost(u[0]) * u[2], reverse=True)
        units = [(blocks[block], first, count) for block, first, count in by_cost]

    def run(unit):
        part, first, count = unit
        return [((block, first), np.asarray(value)) for block, value in work(part, first, count).items()]  # waits on this thread

    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = dict(pair for pairs in pool.map(run, units) for pair in pairs)
    return {block: np.concatenate([parts[block, first] for first, _ in ranges]) for block in blocks}


def looped_tile(
    leaves_a: Mapping[str, Array], scale_a: Array, weights: Mapping[str, Array], leaves_b: Mapping[str, Array], scale_b: Array, *,
    layout: ModelLayout, kinds: BlockKinds, workers: int, transform_a: str, transform_b: str, piece_floats: int, precision: str,
) -> dict[str, np.ndarray]:
    """Looped contraction of one tile (``weights``: ``{block/kind: [layer, *view]}``): the
    computations of :func:`leaf_sums_jit` that :func:`in_parallel` runs, each block's cost its
    number of weights."""
    cost = {block: sum(int(np.prod(w.shape[1:])) for key, w in weights.items() if key.startswith(block + "/")) for block in ATTENTION_BLOCKS}

    def work(block_kinds, first, count):
        return leaf_sums_jit(
            leaves_a, scale_a, weights, leaves_b, scale_b, first, layout=layout, kinds=block_kinds, n_layers=count,
            transform_a=transform_a, transform_b=transform_b, piece_floats=piece_floats, precision=precision,
        )

    n_layers = next(iter(weights.values())).shape[0]
    return in_parallel(work, kinds, n_layers, workers, cost.get)
