"""The Pallas kernel: QK-OV slice products in one pass over the stored leaves, reading each head's
strided slice inside the GEMM (``KernelOptions.contraction="pallas"``).

The batched kernel first writes head-major copies of both tasks' operands, then multiplies them;
on a GPU, where the problem is memory-bound, that copy is most of the kernel's time
(``benchmarks/RESULTS.md``). Here each program of the grid ``(layer, head, split)`` walks its
head's slice of the stored leaves tile by tile — the head's ``head_dim`` output columns of a
q/k/v kernel ``[d_in, columns]`` (wherever a fused QKV puts them), or its ``head_dim`` input rows
of an o kernel ``[H·hd, d_out]`` — weights each ``[samples, chunk]`` tile of task A by
``1/(Î+λ)``, applies the transforms and accumulates ``A_tile · G_tileᵀ`` in registers. The inputs
are read once; nothing else is written but the ``[split, layer, head, c_a, c_b]`` partial sums.

Written for Pallas' Triton backend (GPUs): the loaded tiles ``[c, chunk]`` must have power-of-two
sides of at least 16 (:func:`sample_chunk` rounds the sample chunks; ``chunk`` is the largest
power of two ≤ 256 dividing the slice's row length whose pipelined tiles fit a GPU's shared memory,
:func:`tile_chunk`, so ``head_dim`` must have a power-of-two factor ≥ 16). Elsewhere it runs in Pallas' interpret mode
(:func:`fisherjax.backend.pallas_interpret`): the same program evaluated by XLA, correct and slow.

Per-sample factors are applied to the ``[c_a, c_b]`` results, not to the tiles:
``Σ_k s_i x_ik · t_j y_jk = s_i t_j Σ_k x_ik y_jk``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from fisherjax.analysis.qkov._batched import leaf_operand_jit, products_jit
from fisherjax.analysis.qkov._operands import PRECISIONS, TRANSFORMS, BlockKinds, slice_key
from fisherjax.errors import ConfigError
from fisherjax.layout import ModelLayout

MIN_TILE = 16
"""Triton's smallest dot operand side."""
MAX_CHUNK = 256
"""The widest tile along a slice row."""
SHARED_MEMORY_BYTES = 96 * 1024
"""Shared memory one program's pipelined tiles may take. Triton keeps ``stages`` copies of a loop
iteration's tiles (``[c_a, chunk]``, ``[c_b, chunk]`` and ``[chunk]``) in shared memory, and a block
gets at most 227 KB on Hopper, 163 KB on an A100 and 96 KB on a V100: 64 + 64 samples at chunk 256
in float32 with 3 stages asked for 396 KB and were refused on an H200."""
MAX_STAGES = 3
"""Triton's software-pipelining depth when the tiles fit (fewer when they do not)."""


def sample_chunk(planned: int, n: int) -> int:
    """The samples of one side per tile: a power of two ≥ 16 (Triton's tile rule). All ``n``
    samples (rounded up; the padding repeats the last sample and is discarded) when the plan
    holds them all, otherwise the plan rounded down, so the tile stays within its budget."""
    if planned >= n:
        return max(MIN_TILE, 1 << max(n - 1, 0).bit_length())
    return max(MIN_TILE, 1 << (planned.bit_length() - 1))


def head_blocks(layout: ModelLayout, path: str, block: str) -> tuple[int, int]:
    """``(stride, offset)``: head ``h`` of ``block`` in leaf ``path`` occupies the ``head_dim``-wide
    block ``stride · h + offset`` of the leaf's head axis (output columns of a q/k/v kernel, input
    rows of an o kernel), read off :meth:`ModelLayout.head_index`.

    GPT-2's ``[Q|K|V]`` (offset ``index(block) · H``), GPT-NeoX's per-head interleaving (stride 3)
    and separate projections (stride 1) need no case of their own here.
    """
    hd = layout.head_dim
    heads = layout.head_index(path, block)
    starts = heads[:, 0]
    stride = int(starts[1] - starts[0]) // hd if len(starts) > 1 else 1
    offset = int(starts[0]) // hd
    affine = np.array_equal(heads, (stride * np.arange(len(starts)) + offset)[:, None] * hd + np.arange(hd))
    if not affine:
        raise ConfigError(f"qkov pallas: the heads of {block} in {path} are not head_dim-aligned blocks at a fixed stride")
    return stride, offset


def tile_chunk(row_length: int, smallest: int, *, tile_rows: int = 0, itemsize: int = 4) -> tuple[int, int]:
    """``(chunk, stages)``: the tile width — the largest power of two ≤ 256 dividing a slice row,
    at least ``smallest`` (Triton's 16; interpret mode takes any) — and the pipelining depth, such
    that ``stages · tile_rows · chunk · itemsize ≤`` :data:`SHARED_MEMORY_BYTES` (``tile_rows =
    c_a + c_b + 1`` rows are loaded per iteration; 0: no shared-memory limit, interpret mode).
    The deepest pipeline is kept while its chunk stays ≥ ``smallest``."""
    chunk = min(MAX_CHUNK, row_length & -row_length)
    if chunk < smallest:
        raise ConfigError(
            f"qkov pallas: a slice row of {row_length} floats has no power-of-two tile ≥ {smallest} "
            "(head_dim needs a factor 16); use contraction='batched'"
        )
    if not tile_rows:
        return chunk, MAX_STAGES
    for stages in range(MAX_STAGES, 0, -1):
        fits = SHARED_MEMORY_BYTES // (stages * tile_rows * itemsize)
        width = min(chunk, 1 << (fits.bit_length() - 1)) if fits else 0
        if width >= smallest:
            return width, stages
    raise ConfigError(
        f"qkov pallas: {tile_rows - 1} samples per tile do not fit a GPU's shared memory even in {smallest}-wide tiles; "
        "give a smaller memory budget (smaller sample chunks) or use contraction='batched'"
    )


def _slice_kernel(x_ref, w_ref, y_ref, out_ref, *, transform_a: str, transform_b: str, chunk: int, precision):
    """One program: ``out = Σ_tiles (f_a(x) · w) · f_b(y)ᵀ`` over a slice's rows and column tiles.

    ``x_ref [c_a, rows, cols]``, ``y_ref [c_b, rows, cols]`` are the two tasks' slices of the
    stored leaves (strided in memory, in their stored dtype: tiles become float32 as they are
    loaded), ``w_ref [rows, cols]`` the slice's ``1/(Î+λ)``, ``out_ref [c_a, c_b]``.
    """
    rows, cols = w_ref.shape
    per_row = cols // chunk

    def body(t, acc):
        # lax.div/rem, not // and %: jnp's floor division lowers to ops Pallas' Triton backend rejects
        row, column = jax.lax.div(t, per_row), jax.lax.rem(t, per_row) * chunk
        columns = pl.ds(pl.multiple_of(column, chunk), chunk)
        a = TRANSFORMS[transform_a](x_ref[:, row, columns].astype(jnp.float32)) * w_ref[row, columns][None, :]
        b = TRANSFORMS[transform_b](y_ref[:, row, columns].astype(jnp.float32))
        return acc + jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)

    out_ref[...] = jax.lax.fori_loop(0, rows * per_row, body, jnp.zeros(out_ref.shape, jnp.float32))


def _block_products(
    x: Array, w: Array, y: Array, *, heads: int, hd: int, stride: int, offset: int, on_rows: bool, split_k: int,
    transform_a: str, transform_b: str, precision: str, interpret: bool,
) -> Float[Array, "layer heads c_a c_b"]:
    """Slice sums of one q/k/v/o kernel: ``x [c_a, L, R, C]``, ``y [c_b, L, R, C]`` stored leaves,
    ``w [L, R', C']`` the weights with the head axis flattened (``[L, d_in, H·hd]`` for q/k/v,
    ``[L, H·hd, d_out]`` for o). Heads sit on ``C`` (q/k/v) or on ``R`` (o, ``on_rows``).

    Grid ``(layer, head, split)``: each slice's rows are cut into ``split = gcd(rows, split_k)``
    programs (split-K, so that ``layer · heads`` small GEMMs still fill a GPU); the partial sums
    are added afterwards.
    """
    c_a, layers = x.shape[:2]
    c_b = y.shape[0]
    rows = hd if on_rows else x.shape[2]
    split = math.gcd(rows, split_k)
    block_rows = rows // split
    cols = x.shape[3] if on_rows else hd
    squeezed = pl.squeezed
    if on_rows:  # head h: rows (stride·h + offset)·hd … of the leaf, rows h·hd … of the weights
        x_map = lambda l, h, s: (0, l, (stride * h + offset) * split + s, 0)  # noqa: E731 — index maps
        w_map = lambda l, h, s: (l, h * split + s, 0)  # noqa: E731
    else:  # head h: columns (stride·h + offset)·hd … of the leaf, columns h·hd … of the weights
        x_map = lambda l, h, s: (0, l, s, stride * h + offset)  # noqa: E731
        w_map = lambda l, h, s: (l, s, h)  # noqa: E731
    call_kwargs = {}
    if interpret:
        chunk, _ = tile_chunk(cols, 1)
    else:
        from jax.experimental.pallas import triton as pallas_triton  # GPU-only dependency

        itemsize = max(jnp.dtype(x.dtype).itemsize, jnp.dtype(y.dtype).itemsize, 4)  # tiles become float32 as they load
        chunk, stages = tile_chunk(cols, MIN_TILE, tile_rows=c_a + c_b + 1, itemsize=itemsize)
        call_kwargs["compiler_params"] = pallas_triton.CompilerParams(num_warps=4, num_stages=stages)
    partial = pl.pallas_call(
        functools.partial(_slice_kernel, transform_a=transform_a, transform_b=transform_b, chunk=chunk, precision=PRECISIONS[precision]),
        out_shape=jax.ShapeDtypeStruct((split, layers, heads, c_a, c_b), jnp.float32),
        grid=(layers, heads, split),
        in_specs=[
            pl.BlockSpec((c_a, squeezed, block_rows, cols), x_map),
            pl.BlockSpec((squeezed, block_rows, cols), w_map),
            pl.BlockSpec((c_b, squeezed, block_rows, cols), x_map),
        ],
        out_specs=pl.BlockSpec((squeezed, squeezed, squeezed, c_a, c_b), lambda l, h, s: (s, l, h, 0, 0)),
        interpret=interpret,
        name="qkov_slice_products",
        **call_kwargs,
    )(x, w, y)
    return partial.sum(axis=0)


def kernel_products(
    leaves_a: Mapping[str, Array], scale_a: Array, weights: Mapping[str, Array], leaves_b: Mapping[str, Array], scale_b: Array, *,
    layout: ModelLayout, kinds: BlockKinds, transform_a: str, transform_b: str, split_k: int, precision: str, interpret: bool,
) -> dict[str, Float[Array, "layer c_a c_b heads"]]:
    """``{block: [layer, c_a, c_b, heads]}``: ``Σ_k f_a(x_ik)·s_i·w_k · f_b(y_jk)·t_j`` over each
    (layer, head) slice of the q/k/v/o kernels in ``kinds``, read from the stored leaves
    ``{leaf key: [c, layer, *shape]}`` (``weights``: ``{block/kind: [layer, *view]}``)."""
    out = {}
    for block, kind in kinds:
        if kind != "kernel":
            raise ConfigError(f"qkov pallas: the kernel reads kernels only, got ({block}, {kind})")
        path = layout.block_sources(block, kind)[0]
        stride, offset = head_blocks(layout, path, block)
        w = weights[slice_key(block, kind)]
        flat_w = w.reshape(w.shape[0], -1, w.shape[-1]) if block == "o" else w.reshape(*w.shape[:2], -1)
        sums = _block_products(
            leaves_a[path], flat_w, leaves_b[path], heads=layout.heads_of(block), hd=layout.head_dim, stride=stride,
            offset=offset, on_rows=block == "o", split_k=split_k, transform_a=transform_a, transform_b=transform_b,
            precision=precision, interpret=interpret,
        )
        sums = sums * scale_a[None, None, :, None] * scale_b[None, None, None, :]
        out[block] = jnp.transpose(sums, (0, 2, 3, 1))
    return out


KERNEL_PRODUCTS_STATIC = ("layout", "kinds", "transform_a", "transform_b", "split_k", "precision", "interpret")
"""The static arguments of :func:`kernel_products`."""

kernel_products_jit = jax.jit(kernel_products, static_argnames=KERNEL_PRODUCTS_STATIC)
""":func:`kernel_products`, jitted."""


def pallas_tile(
    leaves_a: Mapping[str, Array], scale_a: Array, weights: Mapping[str, Array], leaves_b: Mapping[str, Array], scale_b: Array, *,
    layout: ModelLayout, kinds: BlockKinds, transform_a: str, transform_b: str, split_k: int, precision: str, interpret: bool,
) -> dict[str, Array]:
    """One tile by :func:`kernel_products_jit` (kernels, read in place from the stored leaves)
    plus the q/k/v biases, which are small, by the batched kernel."""
    kernels = tuple(p for p in kinds if p[1] == "kernel")
    biases = tuple(p for p in kinds if p[1] == "bias")
    out = kernel_products_jit(
        leaves_a, scale_a, weights, leaves_b, scale_b, layout=layout, kinds=kernels, transform_a=transform_a,
        transform_b=transform_b, split_k=split_k, precision=precision, interpret=interpret,
    )
    if biases:
        side = functools.partial(leaf_operand_jit, layout=layout, kinds=biases, split_k=1)
        bias = products_jit(side(leaves_a, scale_a, weights, transform=transform_a), side(leaves_b, scale_b, None, transform=transform_b), precision=precision)
        out = {block: out[block] + bias[block] if block in bias else out[block] for block in out}
    return out
