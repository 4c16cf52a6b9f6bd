"""The tile loop: which kernel computes the slice sums (chosen once per heatmap), how the samples
and layers are cut into tiles that fit a memory budget, and how each tile's stored leaves reach
the device (plain slices, read in place where the backend allows).

Tiles are chunks of layers × chunks of A × chunks of B, of all the slices' parts at once, or,
where B is not one chunk, of each part that shares no stored leaf in turn (:func:`part_chunks`),
and where B is still not one chunk of a part's layer, of a group of its heads at a time
(:func:`head_cut`; :mod:`._groups` reads the stored leaves through the group's columns, and the
kernels run on the group's layout).
Each side's stored leaves go to the device once per tile row / column (B's once per layer chunk
when it fits in one chunk). :func:`shared_raw_scores` is the loop of several score arrays over
the same samples, each sample put on the device once per layer chunk. The
batched kernel turns them there into head-major operands, so the per-tile work is its GEMM
alone; the looped and Pallas kernels read the leaves themselves, and when a CPU can read them in
place (:func:`in_place`) the whole problem is one tile and nothing is copied.

On a mesh (:func:`sharded_raw_scores`) the same tiles are cut per device: task A's samples are
split over ``"data"`` in contiguous blocks (zero rows pad each block to whole tiles), task B's
tile and the weights are replicated, and each tile is one ``jax.shard_map`` step in which every
device contracts its rows of A with all of the tile's B (:func:`whole_tile`) and writes them into
its block of a sharded output. Nothing is gathered here.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array

from fisherjax import backend
from fisherjax.analysis.qkov._batched import leaf_operand, leaf_operand_jit, products, products_jit
from fisherjax.analysis.qkov._groups import group_side, group_store, group_weights, head_groups
from fisherjax.analysis.qkov._looped import leaf_sums, looped_tile
from fisherjax.analysis.qkov._operands import BlockKinds, Side, block_kinds, leaf_sources, side_of
from fisherjax.analysis.qkov._pallas import pallas_tile, sample_chunk
from fisherjax.analysis.qkov._prepare import Prepared, factor_a, required_paths
from fisherjax.analysis.qkov.options import KernelOptions, ScoreOptions
from fisherjax.fisher.factored import FactoredGrads, read_on_device
from fisherjax.layout import ATTENTION_BLOCKS, ModelLayout
from fisherjax.progressbar import progress_bar
from fisherjax.sharding import DATA, data_size, placements, put_replicated


def tile_plan(
    n_a: int, n_b: int, n_layers: int, floats_per_layer: int, memory_budget_bytes: float, copies: int = 3
) -> tuple[int, int, int]:
    """Sample chunks ``(c_a, c_b)`` and layer chunk ``c_l`` whose tile fits the memory budget.

    A tile holds ``c_a + c_b`` samples of ``c_l`` layers, ``copies`` float32 copies of each (three
    for the batched kernel: input, head-major operand, slack for the GEMM; one for the looped
    kernel, whose pieces are small, and for the Pallas kernel, which reads the stored leaves
    themselves; none when the inputs are read in place, so everything is one tile) plus the
    weights. Task B is one chunk, at the most layers that leave room beside it for ``min(n_a, 32)``
    of A's samples, whenever some layer count does: B is then read once per layer chunk, not once
    per A chunk (a store formed on read, :class:`~fisherjax.fisher.factored.FactoredGrads`, is
    formed that much less often). Otherwise tiles are one layer deep and hold equal chunks of both
    tasks, the most samples a tile can hold: B is read once per chunk of A, so the fewer chunks of
    A the better (docs/DECISIONS.md, "A tile's default budget is the backend's").
    """
    if copies == 0:
        return max(n_a, 1), max(n_b, 1), n_layers
    per_sample_layer = copies * 4 * max(floats_per_layer, 1)
    want = max(1, min(max(n_a, n_b), 32))

    def fit(c_l: int) -> int:  # samples a tile of c_l layers holds, one slot left for the weights
        return int(memory_budget_bytes // (c_l * per_sample_layer) - 1)

    for c_l in range(n_layers, 0, -1):
        if n_b and fit(c_l) - n_b >= min(n_a, want):
            return max(1, min(n_a, fit(c_l) - n_b)), n_b, c_l
    c_a = max(1, min(n_a, fit(1) // 2 if n_b else fit(1)))
    return c_a, max(1, min(n_b, fit(1) - c_a)), 1


def tile_chunks(n_a: int, n_b: int, n_layers: int, floats_per_layer: int, budget: float, copies: int,
                fit: Callable[[int, int], int] = lambda planned, n: planned) -> tuple[int, int, int]:
    """:func:`tile_plan`'s chunks made even: each the size of ``ceil(n / planned)`` equal tiles
    (``fit``: the kernel's :attr:`TileKernel.sample_chunk` rule), so every tile has one shape and
    a last tile padded with repeated positions is a slice, not a host gather."""
    c_a, c_b, c_l = tile_plan(n_a, n_b, n_layers, floats_per_layer, budget, copies=copies)
    return _even_chunk(c_a, n_a, fit), _even_chunk(c_b, n_b, fit), _even_chunk(c_l, n_layers, lambda planned, n: planned)


def layer_floats(layout: ModelLayout, include_bias: bool, kinds: BlockKinds | None = None) -> int:
    """Parameters of one layer's slices (every kernel, q/k/v biases with ``include_bias``; or of
    the parts ``kinds``): what a tile holds per sample and layer."""
    paths = required_paths(layout, block_kinds(layout, include_bias) if kinds is None else kinds)
    return sum(int(np.prod(layout.spec(p).shape)) for p in paths) // layout.num_layers


class PartChunks(NamedTuple):
    """How one part of the slices is tiled (:func:`part_chunks`)."""

    kinds: BlockKinds
    chunks: tuple[int, int, int]
    """:func:`tile_chunks`' ``(c_a, c_b, c_l)`` of one group of heads."""
    kv_heads: int
    """kv heads a tile holds, with their query heads (:meth:`ModelLayout.head_group`): all of them
    unless the part is cut into groups of heads."""
    staged: bool = False
    """Whether each layer's stored samples of both tasks go to the device once for all the
    groups of heads (:func:`staged_side`), where each group would read them again."""


STAGED_SHARE = 0.5
"""The most of a part's tile budget a layer of both tasks' stored samples, staged on the device
for its groups of heads, may take (:func:`part_chunks`); the tiles get the rest."""


def part_chunks(layout: ModelLayout, kinds: BlockKinds, n_a: int, n_b: int, n_layers: int, budget: float, copies: int,
                fit: Callable[[int, int], int] = lambda planned, n: planned,
                sample_layer_bytes: Callable[[BlockKinds], float] | None = None) -> list[PartChunks]:
    """The parts of the slices ``kinds`` tiled one after another, with their :func:`tile_chunks`:
    all of them in one plan when task B is one chunk of it, else each :func:`leaf_groups` part in
    its own, whose tiles hold more samples than a whole layer's would, so B is read fewer times
    (and each part forms only its own leaves). Where B is still not one chunk of a part's layer,
    the part's heads are cut into groups (:func:`head_cut`).

    ``sample_layer_bytes(kinds)``: the bytes one stored sample of one layer of a part takes, when
    stored samples may be staged on the device (:func:`fisherjax.backend.stages_reads`). A part cut
    into groups then stages a layer of both tasks' samples at a time, when that takes at most
    :data:`STAGED_SHARE` of the budget and its tiles, one layer deep, fit the rest without reading
    B more often: each group takes its columns on the device, so every stored sample crosses the
    bus once per score array, not once per group."""
    whole = tile_chunks(n_a, n_b, n_layers, layer_floats(layout, False, kinds), budget, copies, fit)
    if whole[1] >= n_b:
        return [PartChunks(kinds, whole, layout.num_kv_heads)]
    parts = []
    for group in leaf_groups(layout, kinds):
        part = PartChunks(group, *head_cut(layout, group, n_a, n_b, n_layers, budget, copies, fit))
        staged = 0.0 if sample_layer_bytes is None or part.kv_heads == layout.num_kv_heads else (n_a + n_b) * sample_layer_bytes(group)
        if 0 < staged <= STAGED_SHARE * budget:
            on_device = PartChunks(group, *head_cut(layout, group, n_a, n_b, 1, budget - staged, copies, fit), staged=True)
            part = on_device if partner_passes(on_device.chunks, n_a, n_b) <= partner_passes(part.chunks, n_a, n_b) else part
        parts.append(part)
    return parts


def partner_passes(chunks: tuple[int, int, int], n_a: int, n_b: int) -> int:
    """How often a tile loop of ``chunks`` ``(c_a, c_b, c_l)`` reads task B's samples: once when B
    is one chunk (every chunk of A is multiplied with it), else once per chunk of A."""
    return 1 if chunks[1] >= n_b else -(-n_a // chunks[0])


def most_kv_heads(layout: ModelLayout, fits: Callable[[int], bool]) -> int | None:
    """The most kv heads in a group (a divisor of ``kv_heads``; their query heads come with them)
    for which ``fits(count)``, or None where not even one does."""
    kv = layout.num_kv_heads
    return next((count for count in range(kv, 0, -1) if kv % count == 0 and fits(count)), None)


def head_cut(layout: ModelLayout, kinds: BlockKinds, n_a: int, n_b: int, n_layers: int, budget: float, copies: int,
             fit: Callable[[int, int], int]) -> tuple[tuple[int, int, int], int]:
    """The :func:`tile_chunks` of the part ``kinds`` and the kv heads a tile holds: the most (a
    divisor of ``kv_heads``, with their query heads) at which task B is one chunk, else one.

    A group of heads of a layer is that share of the layer's parameters, so its tiles hold that
    many times more samples; B is then read once per group of heads, and a read forms only the
    group's part of each gradient: B is formed once in all, not once per chunk of A."""
    floats, kv = layer_floats(layout, False, kinds), layout.num_kv_heads

    def chunks(count: int) -> tuple[int, int, int]:
        return tile_chunks(n_a, n_b, n_layers, floats // kv * count, budget, copies, fit)

    count = most_kv_heads(layout, lambda count: chunks(count)[1] >= n_b) or 1
    return chunks(count), count


def partner_reads(n_a: int, n_b: int, layout: ModelLayout, include_bias: bool, kernel: KernelOptions, in_place: bool = False,
                  sample_layer_bytes: Callable[[BlockKinds], float] | None = None) -> float:
    """How often one score array of ``n_a × n_b`` samples (:func:`raw_scores`) forms task B's kept
    token factors: once when B is one tile's chunk (every chunk of A is multiplied with it), else
    once per chunk of A, in each part of :func:`part_chunks` (the parts' reads weighted by their
    share of a layer's parameters; a part cut into groups of heads forms each group's share of B
    that often). ``in_place``: the stored samples are float32 gradients a CPU reads in place (one
    tile); ``sample_layer_bytes``: :func:`part_chunks`' (staging on the device)."""
    contraction = backend.qkov_contraction(kernel.contraction)
    if in_place and contraction != "batched":
        return 1.0
    limits = tile_limits(contraction)
    parts = part_chunks(layout, block_kinds(layout, include_bias), n_a, n_b, layout.num_layers,
                        min(kernel.budget_bytes(), limits.most_bytes), limits.copies, limits.sample_chunk, sample_layer_bytes)
    shares = [layer_floats(layout, include_bias, part.kinds) for part in parts]
    reads = [float(partner_passes(part.chunks, n_a, n_b)) for part in parts]
    return sum(r * w for r, w in zip(reads, shares)) / sum(shares)


def _is_run(index: np.ndarray) -> bool:
    return bool(len(index)) and bool(np.all(np.diff(index) == 1))


def _rows_and_layers(samples: np.ndarray, layers: np.ndarray) -> tuple:
    """The index of ``x[samples][:, layers]``: plain slices (no gather) when both index runs are contiguous."""
    if _is_run(samples) and _is_run(layers):
        return slice(samples[0], samples[-1] + 1), slice(layers[0], layers[-1] + 1)
    return samples[:, None], layers[None, :]


def _chunk_index(start: int, size: int, n: int) -> np.ndarray:
    """``size`` positions from ``start``; past the end the last one repeats (results are discarded),
    so every tile has one shape and the jitted kernel compiles once."""
    return np.minimum(np.arange(start, start + size), n - 1)


def device_leaves(
    store: Mapping[str, np.ndarray], layout: ModelLayout, sources: Mapping[str, tuple[str, ...]], samples: np.ndarray, layers: np.ndarray
) -> dict[str, Array]:
    """``{leaf key: [c, layer, *shape]}`` on the device for the selected samples and layers.

    Contiguous runs are moved as plain slices of the stored arrays (no host gather) and used in
    place where the backend allows (:func:`in_place`); kept token factors are formed on the device
    (:func:`~fisherjax.fisher.factored.read_on_device`); per-layer leaves are stacked on the device
    (:meth:`ModelLayout.stack_layers`).
    """
    out = {}
    rows = slice(samples[0], samples[-1] + 1) if _is_run(samples) else samples
    for key, paths in sources.items():
        if layout.spec(key).layered:
            out[key] = read_on_device(store[key], _rows_and_layers(samples, layers), may_alias=True)
        else:
            out[key] = layout.stack_layers([paths[layer] for layer in layers], lambda p: read_on_device(store[p], rows), axis=1)
    return out


def in_place(store: Mapping[str, np.ndarray], layout: ModelLayout, sources: Mapping[str, tuple[str, ...]]) -> bool:
    """Whether the backend can read every stored leaf in place: layer-stacked and
    :func:`fisherjax.backend.reads_in_place` (a CPU and a C-contiguous, aligned host array, as
    :func:`~fisherjax.collect` stores them) float32 array. Then a tile of whole sample runs over all
    layers costs no copy at all. A bfloat16 leaf is tiled instead: read in place, its conversion
    to float32 became one float32 copy of every sample at once (QK-OV of 8 × 8 GPT-2-small samples
    took 2.5 GB more than float32 storage; docs/DECISIONS.md), which tiles bound."""
    return all(layout.spec(key).layered and backend.reads_in_place(store[key]) and np.dtype(store[key].dtype) == np.float32
               for key in sources)


def samples_in_place(samples, layout: ModelLayout, include_bias: bool) -> bool:
    """Whether the backend reads every stored gradient of ``samples`` (a
    :class:`~fisherjax.fisher.state.SampleGrads`) that the slices take in place (:func:`in_place`)."""
    return in_place(samples.grads, layout, leaf_sources(layout, block_kinds(layout, include_bias)))


_widen = jax.jit(lambda x: x.astype(jnp.float32))


def float32_leaves(leaves: Mapping[str, Array], scale, weights, transform):
    """The looped kernel's operand: the tile's leaves as they are when float32 (read in place),
    else widened to float32 in one pass per leaf (the one copy :func:`tile_plan` counts). Read
    piece by piece inside the loop, bfloat16 leaves made each piece's conversion a slow scalar
    loop on XLA:CPU (measured in benchmarks/RESULTS.md, fifteenth session)."""
    del weights, transform
    return {k: v if v.dtype == jnp.float32 else _widen(v) for k, v in leaves.items()}, scale


LOOPED_TILE_BYTES = 1e9
"""The most one tile of the looped kernel takes: it walks a tile in cache-sized pieces, so a larger
tile is no faster and only holds memory next to the stored gradients (64 + 64 GPT-2-small samples:
2 GB tiles as fast as 1 GB ones and 1.6 GB larger, benchmarks/RESULTS.md)."""


class TileKernel(NamedTuple):
    """The kernel of every tile of one heatmap, chosen once by :func:`select_kernel`."""

    name: str
    """``"batched"``, ``"looped"`` or ``"pallas"``."""
    copies: int
    """Float32 copies of a tile's inputs it holds (:func:`tile_plan`) when they are not read in place."""
    reads_in_place: bool
    """Whether it works on the stored leaves themselves, so leaves read in place cost no copy."""
    sample_chunk: Callable[[int, int], int]
    """``(planned, n) -> samples per tile`` it accepts."""
    operand: Callable[[dict, Array, Any, str], Any]
    """``(leaves, scale, weights or None, transform) ->`` what :attr:`products` takes for one side."""
    products: Callable[[Any, Any, dict], Mapping[str, Any]]
    """``(a_operand, b_operand, weights) -> {block: [layer, c_a, c_b, heads]}``."""
    most_bytes: float = float("inf")
    """The most a tile may take whatever the memory budget (:data:`LOOPED_TILE_BYTES`)."""
    stored: Callable[[dict], dict] = lambda leaves: leaves
    """What :func:`shared_raw_scores` keeps of a part's leaves for all its products (the looped
    kernel's float32 leaves: a bfloat16 leaf widened once, not once per product)."""


def _whole(planned: int, n: int) -> int:
    return planned


class TileLimits(NamedTuple):
    """What a kernel's tiles may hold: :attr:`TileKernel.copies`, :attr:`~TileKernel.most_bytes`
    and :attr:`~TileKernel.sample_chunk`."""

    copies: int
    most_bytes: float
    sample_chunk: Callable[[int, int], int]


def tile_limits(contraction: str) -> TileLimits:
    """The :class:`TileLimits` of ``contraction`` (``"looped"``, ``"pallas"`` or ``"batched"``): what
    :func:`select_kernel`'s kernel holds and what the counts (:func:`partner_reads`,
    :func:`~fisherjax.analysis.qkov.formed_once`) assume, without building the kernel."""
    return {
        "looped": TileLimits(1, LOOPED_TILE_BYTES, _whole),
        "pallas": TileLimits(1, float("inf"), sample_chunk),
        "batched": TileLimits(3, float("inf"), _whole),
    }[contraction]


def select_kernel(kernel: KernelOptions, layout: ModelLayout, kinds: BlockKinds, transform_a: str, transform_b: str) -> TileKernel:
    """The tile kernel of ``kernel.contraction`` (``"auto"`` decided by
    :func:`fisherjax.backend.qkov_contraction`) with its settings bound."""
    contraction = backend.qkov_contraction(kernel.contraction)
    statics = dict(layout=layout, kinds=kinds, transform_a=transform_a, transform_b=transform_b, precision=kernel.precision)

    def leaves_as_they_are(leaves, scale, weights, transform):
        return leaves, scale

    if contraction == "looped":
        workers = kernel.workers if kernel.workers is not None else backend.available_cores()
        products = functools.partial(looped_tile, workers=workers, piece_floats=kernel.piece_floats, **statics)
        limits = tile_limits("looped")
        return TileKernel("looped", limits.copies, True, limits.sample_chunk, float32_leaves, lambda a, b, w: products(*a, w, *b),
                          limits.most_bytes, lambda leaves: float32_leaves(leaves, None, None, None)[0])
    if contraction == "pallas":
        interpret = backend.pallas_interpret()
        if interpret:
            warnings.warn(
                f"qkov: contraction='pallas' is a GPU (Triton) kernel; on {backend.platform()} it runs in Pallas' "
                "interpret mode, which is slow (contraction='auto' picks the fast path here)",
                stacklevel=5,
            )
        products = functools.partial(pallas_tile, split_k=kernel.split_k, interpret=interpret, **statics)
        limits = tile_limits("pallas")
        return TileKernel("pallas", limits.copies, True, limits.sample_chunk, leaves_as_they_are, lambda a, b, w: products(*a, w, *b),
                          limits.most_bytes)

    def head_major_operand(leaves, scale, weights, transform):
        return leaf_operand_jit(leaves, scale, weights, layout=layout, kinds=kinds, transform=transform, split_k=kernel.split_k)

    limits = tile_limits("batched")
    return TileKernel("batched", limits.copies, False, limits.sample_chunk, head_major_operand,
                      lambda a, b, w: products_jit(a, b, precision=kernel.precision), limits.most_bytes)


def leaf_groups(layout: ModelLayout, kinds: BlockKinds) -> tuple[BlockKinds, ...]:
    """The parts of ``kinds`` that share no stored leaf, in block order: each block's kernel and
    bias, merged where they read one leaf (GPT-2's fused QKV kernel and bias: q, k and v together;
    Llama's q, k, v and o apart)."""
    groups: list[tuple[set, list]] = []  # (source paths, kinds)
    for block in ATTENTION_BLOCKS:
        parts = [(b, k) for b, k in kinds if b == block]
        paths = {p for b, k in parts for p in layout.block_sources(b, k)}
        for other in [g for g in groups if g[0] & paths]:
            groups.remove(other)
            paths |= other[0]
            parts = other[1] + parts
        if parts:
            groups.append((paths, parts))
    return tuple(tuple(parts) for _, parts in groups)


class TilePlan(NamedTuple):
    """The tiles of one part of :func:`raw_scores`."""

    kinds: BlockKinds
    tiles: TileKernel
    """Its kernel, bound to the layout of :attr:`kv_heads` kv heads."""
    chunks: tuple[int, int, int]
    """``(c_a, c_b, c_l)``."""
    kv_heads: int
    """kv heads (with their query heads) a tile holds: :class:`PartChunks`'."""
    staged: bool = False
    """:class:`PartChunks`'."""


def plan_parts(prep: Prepared, layout: ModelLayout, score: ScoreOptions, kernel: KernelOptions, n_a: int, n_b: int, n_l: int,
               on_mesh: bool = False) -> list[TilePlan]:
    """The tiles of :func:`raw_scores` (``on_mesh``: of :func:`sharded_raw_scores`, ``n_a`` a
    device's rows, nothing read in place): :func:`part_chunks` of the slices within the kernel's
    budget, each part with its kernel."""
    a_side, b_side = factor_a(prep, score.variant), side_of(prep.b, "b", score.variant)
    tiles = select_kernel(kernel, layout, prep.kinds, a_side.transform, b_side.transform)
    sources = leaf_sources(layout, prep.kinds)
    read_in_place = (not on_mesh and tiles.reads_in_place and in_place(a_side.store, layout, sources)
                     and in_place(b_side.store, layout, sources))
    copies = 0 if read_in_place else max(tiles.copies, 1 if on_mesh else 0)
    stages = backend.stages_reads() and not on_mesh and all(layout.spec(key).layered for key in sources)
    parts = part_chunks(layout, prep.kinds, n_a, n_b, n_l, min(kernel.budget_bytes(), tiles.most_bytes), copies, tiles.sample_chunk,
                        stored_sample_layer_bytes((a_side.store, b_side.store), layout) if stages else None)
    if len(parts) == 1 and parts[0].kv_heads == layout.num_kv_heads:
        return [TilePlan(prep.kinds, tiles, parts[0].chunks, parts[0].kv_heads)]
    return [TilePlan(part.kinds, select_kernel(kernel, layout.head_group(part.kv_heads), part.kinds, a_side.transform, b_side.transform),
                     part.chunks, part.kv_heads, part.staged) for part in parts]


def stored_sample_layer_bytes(stores, layout: ModelLayout) -> Callable[[BlockKinds], float]:
    """``kinds -> bytes``: what one stored sample of one layer of the part ``kinds`` takes, the
    most of ``stores`` (layer-stacked leaves: kept token factors their positions' inputs and
    deltas, arrays a layer's slice), as :func:`part_chunks` stages it."""
    def leaf_bytes(leaf) -> float:
        if isinstance(leaf, FactoredGrads):
            return leaf.inputs.shape[-2] * (leaf.inputs.shape[-1] * leaf.inputs.itemsize + leaf.deltas.shape[-1] * leaf.deltas.itemsize)
        return float(np.prod(leaf.shape[2:])) * np.dtype(leaf.dtype).itemsize

    return lambda kinds: max(sum(leaf_bytes(store[key]) for key in leaf_sources(layout, kinds)) for store in stores)


def staged_side(side: Side, layout: ModelLayout, sources: Mapping[str, tuple[str, ...]], positions: np.ndarray, layers: np.ndarray) -> Side:
    """``side``'s stored samples at ``positions`` of ``layers`` (layer-stacked leaves of
    ``sources``) on the device, kept token factors still as factors
    (:meth:`~fisherjax.fisher.factored.FactoredGrads.staged`): read at positions ``0 … len − 1``
    and layers ``0 … len(layers) − 1``, each group of heads takes its columns there."""
    index = _rows_and_layers(positions, layers)
    store = {key: side.store[key].staged(index) if isinstance(side.store[key], FactoredGrads) else jax.device_put(np.asarray(side.store[key][index]))
             for key in sources}
    return Side(store, side.transform, side.scale[positions])


def raw_scores(
    prep: Prepared,
    layout: ModelLayout,
    score: ScoreOptions,
    kernel: KernelOptions,
    a_positions: np.ndarray,
    b_positions: np.ndarray,
    layers: np.ndarray,
    *,
    progress: bool = False,
    desc: str = "QK-OV",
) -> dict[str, np.ndarray]:
    """``{block: [layer, n_a, n_b, heads_of_block]}`` slice sums ``Σ_k a_ik b_jk`` (before the
    partner factor and the aggregation) for the selected samples and layers, tile by tile, the
    parts of :func:`plan_parts` one after another.

    ``progress``: a bar over the tiles (``desc``).
    """
    a_side: Side = factor_a(prep, score.variant)
    b_side: Side = side_of(prep.b, "b", score.variant)
    n_a, n_b, n_l = len(a_positions), len(b_positions), len(layers)
    out = empty_sums(layout, n_l, n_a, n_b)
    if n_a == 0 or n_b == 0:
        return out
    parts = plan_parts(prep, layout, score, kernel, n_a, n_b, n_l)
    total = sum(-(-n_l // part.chunks[2]) * -(-n_a // part.chunks[0]) * -(-n_b // part.chunks[1]) * layout.num_kv_heads // part.kv_heads
                for part in parts)

    def layer_chunk(part: TilePlan, lsel: np.ndarray, l0: int, bar) -> None:
        """One layer chunk of a part, every group of heads: its tiles written into ``out``. A
        staged part's samples go to the device here once and are dropped on return."""
        tiles, (c_a, c_b, c_l) = part.tiles, part.chunks
        sources = leaf_sources(layout, part.kinds)
        if part.staged:
            a_on, b_on = (staged_side(side, layout, sources, at, lsel) for side, at in ((a_side, a_positions), (b_side, b_positions)))
            a_at, b_at, read_layers = np.arange(n_a), np.arange(n_b), np.arange(len(lsel))
        else:
            a_on, b_on, a_at, b_at, read_layers = a_side, b_side, a_positions, b_positions, lsel
        for group in head_groups(layout, part.kv_heads):
            a_group, b_group = group_side(a_on, layout, sources, group), group_side(b_on, layout, sources, group)
            weights = {k: jnp.asarray(w) for k, w in group_weights({k: w[lsel] for k, w in prep.weights.items()}, layout, part.kinds, group).items()}

            def operand(side: Side, positions, weights, group=group):
                leaves = device_leaves(side.store, group.layout, sources, positions, read_layers)
                return tiles.operand(leaves, jnp.asarray(side.scale[positions]), weights, side.transform)

            b_starts, b_cached = range(0, n_b, c_b), None
            for i0 in range(0, n_a, c_a):
                a_operand = operand(a_group, a_at[_chunk_index(i0, c_a, n_a)], weights)
                for j0 in b_starts:
                    if b_cached is None or len(b_starts) > 1:
                        b_cached = operand(b_group, b_at[_chunk_index(j0, c_b, n_b)], None)
                    tile = tiles.products(a_operand, b_cached, weights)
                    li, ii, ji = min(c_l, n_l - l0), min(c_a, n_a - i0), min(c_b, n_b - j0)
                    for block, value in tile.items():
                        out[block][l0 : l0 + li, i0 : i0 + ii, j0 : j0 + ji, group.heads(block)] = np.asarray(value)[:li, :ii, :ji]
                    bar.update()

    with progress_bar(progress, total=total, desc=desc, unit="tile") as bar:
        for part in parts:
            for l0 in range(0, n_l, part.chunks[2]):
                layer_chunk(part, layers[_chunk_index(l0, part.chunks[2], n_l)], l0, bar)
    return out


class Request(NamedTuple):
    """One score array of :func:`shared_raw_scores`: ``prep``'s weights and sides, over the samples
    of task A at ``a_positions`` and of task B at ``b_positions`` (positions in ``prep.a`` /
    ``prep.b``, sorted)."""

    prep: Prepared
    a_positions: np.ndarray
    b_positions: np.ndarray


def shared_scores_bytes(n_a: int, n_b: int, layout: ModelLayout) -> int:
    """Bytes of one request's sums on the host: float32 ``{block: [layer, n_a, n_b, heads]}``
    (query heads for every block: the finished scores' size, an upper bound on the sums under
    grouped-query attention)."""
    return 4 * n_a * layout.num_layers * n_b * layout.num_heads * len(ATTENTION_BLOCKS)


def empty_sums(layout: ModelLayout, n_l: int, n_a: int, n_b: int) -> dict[str, np.ndarray]:
    """Zeroed float32 slice sums of ``n_l`` layers ``{block: [layer, n_a, n_b, heads_of_block]}``
    (:func:`shared_scores_bytes` bounds their size)."""
    return {block: np.zeros((n_l, n_a, n_b, layout.heads_of(block)), np.float32) for block in ATTENTION_BLOCKS}


def atoms(position_sets: list[np.ndarray]) -> list[np.ndarray]:
    """The coarsest partition of the union of ``position_sets`` of which every set is a union of
    parts (the positions grouped by which sets hold them), each part sorted: a heatmap's samples,
    a held-out split's fit half and held half give two parts, the halves."""
    universe = np.unique(np.concatenate(position_sets))
    signature = np.stack([np.isin(universe, s) for s in position_sets], axis=1)
    _, label = np.unique(signature, axis=0, return_inverse=True)
    label = np.ravel(label)
    return [universe[label == k] for k in range(int(label.max()) + 1)]


SHARED_HOST_SHARE = 0.5
"""The share of the host's available memory the sums of one :func:`shared_raw_scores` pass may
take together (both heatmaps of a pair, held until the pass ends, and its tests' mean rows'):
past it, a pair is scored one direction at a time, which holds one heatmap's scores (and, while
finishing them, the sums they are made from)."""

SHARED_SCORES_BYTES = 2e9
"""What the sums of one :func:`shared_raw_scores` pass may take where the host's available memory
is not known."""


def shared_scores_fit(scores_bytes: float, host_bytes: float | None) -> bool:
    """Whether a shared pass's sums (``scores_bytes``) fit :data:`SHARED_HOST_SHARE` of
    ``host_bytes``, the host memory available (:data:`SHARED_SCORES_BYTES` where None)."""
    return scores_bytes <= (SHARED_SCORES_BYTES if host_bytes is None else SHARED_HOST_SHARE * host_bytes)


def shared_layer_chunk(samples: int, weight_sets: int, floats_per_layer: int, copies: int, n_layers: int, budget: float) -> int:
    """Layers per chunk of :func:`shared_raw_scores`: the most (up to ``n_layers``) whose
    ``samples`` stored samples on the device (``copies`` float32 copies each, :func:`tile_plan`'s
    count) and ``weight_sets`` weight sets, ``floats_per_layer`` floats a layer each, fit
    ``budget`` bytes (0 where not even one layer does):

        ⌊budget / (4 · floats_per_layer · (copies · samples + weight_sets))⌋"""
    return min(n_layers, int(budget // (4 * max(floats_per_layer, 1) * (max(copies, 1) * samples + weight_sets))))


class SharedPart(NamedTuple):
    """One part of :func:`shared_raw_scores`' pass (:func:`shared_parts`)."""

    kinds: BlockKinds
    kv_heads: int
    """kv heads (with their query heads) a group of the part holds: all of them unless cut."""
    layers: int
    """Layers per chunk."""


def shared_parts(layout: ModelLayout, kinds: BlockKinds, samples: int, weight_sets: int, copies: int, budget: float,
                 scores_bytes: float, host_bytes: float | None) -> list[SharedPart] | None:
    """How :func:`shared_raw_scores` walks the slices ``kinds`` with ``samples`` stored samples on
    the device at once: all the parts together in chunks of :func:`shared_layer_chunk` layers when
    one layer fits, else each :func:`leaf_groups` part in turn, in the groups of the most kv heads
    (a divisor of ``kv_heads``) of which one layer fits — each sample is still formed once, a
    group's columns at a time. None where not even one kv head of a part's layer fits, or where
    the pass's sums (``scores_bytes``) do not fit the host (:func:`shared_scores_fit`)."""
    if not shared_scores_fit(scores_bytes, host_bytes):
        return None
    n_l, kv = layout.num_layers, layout.num_kv_heads

    def chunk(part: BlockKinds, count: int) -> int:
        return shared_layer_chunk(samples, weight_sets, layer_floats(layout, False, part) // kv * count, copies, n_l, budget)

    if chunk(kinds, kv) >= 1:
        return [SharedPart(kinds, kv, chunk(kinds, kv))]
    parts = []
    for group in leaf_groups(layout, kinds):
        count = most_kv_heads(layout, lambda count, group=group: chunk(group, count) >= 1)
        if count is None:
            return None
        parts.append(SharedPart(group, count, chunk(group, count)))
    return parts


def shared_raw_scores(
    requests: list[Request], layout: ModelLayout, score: ScoreOptions, kernel: KernelOptions, *, host_bytes: float | None,
    progress: bool = False, desc: str = "QK-OV",
) -> list[dict[str, np.ndarray]] | None:
    """:func:`raw_scores` of several requests over all layers — ``[{block: [layer, n_a, n_b,
    heads]}]`` in their order, float32 — forming each stored sample once (per layer chunk, part
    and group of heads: each a share of its columns), where :func:`raw_scores` reads a sample
    once per request (and a kept token factor is formed on each read). A task pair's two heatmaps
    and two held-out permutation tests read each task's samples in six score arrays; here each is
    formed once. Requests may read their sides with different transforms (a permutation test's
    mean row is read as it is, :func:`~._prepare.mean_row`): each product takes the tile kernel
    of its own.

    Every stored array the requests read (:func:`~._operands.side_of`) is cut into
    :func:`atoms` of the positions its requests read; per layer chunk each atom is put on the device
    once (:func:`device_leaves`), and each request is the products of its A atoms with its B atoms,
    written into its rows and columns. The layer chunk is the most
    layers whose atoms, one weight set per prepared Fisher and the kernel's working copies fit the
    tile budget; where not even one layer fits, the parts and groups of heads of
    :func:`shared_parts`. ``None`` when not even one
    kv head of a part's layer fits, or when the requests' sums together do not fit the host
    memory ``host_bytes`` available (:func:`shared_scores_fit`; then the caller reads request by
    request).
    """
    kinds = requests[0].prep.kinds
    sides = [(factor_a(r.prep, score.variant), side_of(r.prep.b, "b", score.variant)) for r in requests]
    stores: dict[int, tuple[Mapping, list[np.ndarray]]] = {}
    for (a_side, b_side), r in zip(sides, requests):
        for side, positions in ((a_side, r.a_positions), (b_side, r.b_positions)):
            stores.setdefault(id(side.store), (side.store, []))[1].append(np.asarray(positions))
    parts = {key: atoms(sets) for key, (_, sets) in stores.items()}
    weight_sets = {id(r.prep.weights): r.prep.weights for r in requests}
    n_l = layout.num_layers
    copies = tile_limits(backend.qkov_contraction(kernel.contraction)).copies
    scores_bytes = sum(shared_scores_bytes(len(r.a_positions), len(r.b_positions), layout) for r in requests)
    plan = shared_parts(layout, kinds, sum(len(np.concatenate(p)) for p in parts.values()), len(weight_sets), copies,
                        kernel.budget_bytes(), scores_bytes, host_bytes)
    if plan is None or any(not len(r.a_positions) or not len(r.b_positions) for r in requests):
        return None
    out = [empty_sums(layout, n_l, len(r.a_positions), len(r.b_positions)) for r in requests]

    def inside(part, positions):  # the part's rows in a request's positions, when the part is one of its parts
        at = np.searchsorted(positions, part)
        return at if at.max() < len(positions) and np.array_equal(positions[at], part) else None

    products = []  # (request, A's store, A's part, B's store, B's part, rows, columns)
    for n, ((a_side, b_side), r) in enumerate(zip(sides, requests)):
        for i, part_a in enumerate(parts[id(a_side.store)]):
            rows = inside(part_a, r.a_positions)
            for j, part_b in enumerate(parts[id(b_side.store)]):
                cols = inside(part_b, r.b_positions)
                if rows is not None and cols is not None:
                    products.append((n, id(a_side.store), i, id(b_side.store), j, rows, cols))

    def layer_chunk(part: SharedPart, group, group_stores: dict, kernels: dict[tuple[str, str], TileKernel], lsel: np.ndarray, l0: int,
                    bar) -> None:
        """One layer chunk of one group of heads of a part (``group_stores``: each stored array
        read as the group's, :func:`~._groups.group_store`): every atom formed once, every product
        written into its request's rows, columns and heads."""
        sources, count = leaf_sources(layout, part.kinds), min(part.layers, n_l - l0)
        weights = {key: {k: jnp.asarray(w) for k, w in group_weights({k: w[lsel] for k, w in ws.items()}, layout, part.kinds, group).items()}
                   for key, ws in weight_sets.items()}
        tiles = next(iter(kernels.values()))  # how leaves are stored and operands built: the same for every transform
        leaves = {(key, i): tiles.stored(device_leaves(group_stores[key], group.layout, sources, atom, lsel))
                  for key, key_parts in parts.items() for i, atom in enumerate(key_parts)}
        b_operands = {}  # unweighted, so shared by every request that reads the part as task B

        def operand(side: Side, store_key, atom, weights_key):
            scale = jnp.asarray(side.scale[parts[store_key][atom]])
            return tiles.operand(leaves[store_key, atom], scale, None if weights_key is None else weights[weights_key], side.transform)

        for n, a_key, i, b_key, j, rows, cols in products:
            (a_side, b_side), w_key = sides[n], id(requests[n].prep.weights)
            b_at = (b_key, j, b_side.transform, b_side.scale[parts[b_key][j]].tobytes())
            if b_at not in b_operands:
                b_operands[b_at] = operand(b_side, b_key, j, None)
            tile = kernels[a_side.transform, b_side.transform].products(operand(a_side, a_key, i, w_key), b_operands[b_at], weights[w_key])
            for block, value in tile.items():
                out[n][block][l0 : l0 + count, rows[:, None], cols[None, :], group.heads(block)] = np.asarray(value)[:count]
            bar.update()

    plan = [part._replace(layers=_even_chunk(part.layers, n_l, lambda planned, n: planned)) for part in plan]
    total = sum(-(-n_l // part.layers) * layout.num_kv_heads // part.kv_heads for part in plan) * len(products)
    with progress_bar(progress, total=total, desc=desc, unit="tile") as bar:
        for part in plan:
            kernels = {pair: select_kernel(kernel, layout.head_group(part.kv_heads), part.kinds, *pair)
                       for pair in dict.fromkeys((a.transform, b.transform) for a, b in sides)}
            sources = leaf_sources(layout, part.kinds)
            for group in head_groups(layout, part.kv_heads):
                group_stores = {key: group_store(store, layout, sources, group) for key, (store, _) in stores.items()}
                for l0 in range(0, n_l, part.layers):
                    layer_chunk(part, group, group_stores, kernels, np.minimum(np.arange(l0, l0 + part.layers), n_l - 1), l0, bar)
    return out


# ---------------------------------------------------------------------------------------------
# On a mesh
# ---------------------------------------------------------------------------------------------


def whole_tile(
    contraction: str, layout: ModelLayout, kinds: BlockKinds, transform_a: str, transform_b: str, kernel: KernelOptions
) -> Callable[..., dict[str, Array]]:
    """One tile of ``contraction`` as a single traceable function ``(leaves_a, scale_a, weights,
    leaves_b, scale_b) -> {block: [layer, c_a, c_b, heads]}``: what each device of a mesh runs
    on its rows of task A. The same sums as :func:`select_kernel`'s kernel, without its host
    work: the looped kernel walks all blocks and layers in one computation (no thread pool: the
    devices are the parallelism), the batched kernel builds both operands and multiplies them."""
    statics = dict(layout=layout, kinds=kinds, transform_a=transform_a, transform_b=transform_b, precision=kernel.precision)
    if contraction == "looped":
        return functools.partial(leaf_sums, piece_floats=kernel.piece_floats, **statics)
    if contraction == "pallas":
        return functools.partial(pallas_tile, split_k=kernel.split_k, interpret=backend.pallas_interpret(), **statics)

    def batched(leaves_a, scale_a, weights, leaves_b, scale_b):
        side = functools.partial(leaf_operand, layout=layout, kinds=kinds, split_k=kernel.split_k)
        return products(side(leaves_a, scale_a, weights, transform=transform_a), side(leaves_b, scale_b, None, transform=transform_b),
                        precision=kernel.precision)

    return batched


@functools.lru_cache(maxsize=16)
def sharded_step(
    mesh: Mesh, contraction: str, layout: ModelLayout, kinds: BlockKinds, transform_a: str, transform_b: str, kernel: KernelOptions
) -> Callable:
    """``step(out, leaves_a, scale_a, weights, leaves_b, scale_b, at) -> out``, jitted once per
    mesh and kernel: under ``shard_map`` every device computes :func:`whole_tile` of its rows of A
    (``leaves_a``, ``scale_a`` split over ``"data"``) against the replicated B tile and weights, and
    writes it into its block of ``out`` ``{block: [layer, n_pad, n_b_pad, heads]}`` (split over
    ``"data"`` along the sample axis, donated) at the local offset ``at = (layer, row, column,
    query head, kv head)`` (the head of a group of heads, :func:`head_groups`).
    A ``"model"`` axis only replicates the work."""
    whole = whole_tile(contraction, layout, kinds, transform_a, transform_b, kernel)

    def step(out, leaves_a, scale_a, weights, leaves_b, scale_b, at):
        tile = whole(leaves_a, scale_a, weights, leaves_b, scale_b)
        return {block: jax.lax.dynamic_update_slice(value, tile[block].astype(value.dtype), (at[0], at[1], at[2], at[4 if block in ("k", "v") else 3]))
                for block, value in out.items()}

    rows = P(DATA)
    mapped = jax.shard_map(step, mesh=mesh, in_specs=(P(None, DATA), rows, rows, P(), P(), P(), P()), out_specs=P(None, DATA),
                           check_vma=False)
    options = backend.LOOPED_COMPILER_OPTIONS if contraction == "looped" else None
    return jax.jit(mapped, donate_argnums=0, compiler_options=options)


def padded_positions(index: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``positions[index]``, −1 (padding, for :func:`mesh_leaves`) where ``index`` runs past them."""
    return np.where(index < len(positions), positions[np.minimum(index, len(positions) - 1)], -1)


def mesh_leaves(
    store: Mapping[str, np.ndarray], layout: ModelLayout, sources: Mapping[str, tuple[str, ...]], positions: np.ndarray, layers: np.ndarray,
    place: Callable[[np.ndarray], Array],
) -> dict[str, Array]:
    """``{leaf key: [len(positions), layer, *shape]}`` where ``place`` puts a host array (split over
    a mesh's ``"data"`` axis, or replicated): the stored rows at ``positions`` of the selected
    layers (per-layer leaves stacked), zero rows where a position is −1 (padding, only at the end).
    Kept token factors travel as factors and are formed where they land
    (:func:`~fisherjax.fisher.factored.read_on_device`): each device forms its own rows."""
    real = positions[positions >= 0]
    if np.any(positions[len(real):] >= 0):
        raise ValueError("mesh_leaves: padding positions (−1) must come after every real one")
    out = {}
    for key, paths in sources.items():
        if layout.spec(key).layered:
            out[key] = read_on_device(store[key], _rows_and_layers(real, layers), place=place, pad_to=len(positions))
        else:
            out[key] = layout.stack_layers([paths[layer] for layer in layers],
                                           lambda p: read_on_device(store[p], real, place=place, pad_to=len(positions)), axis=1)
    return out


def _even_chunk(planned: int, n: int, fit: Callable[[int, int], int]) -> int:
    """The chunk of ``n`` items in ``ceil(n / planned)`` tiles of equal size (``fit``: the
    kernel's :attr:`TileKernel.sample_chunk` rule), so padding to whole tiles stays small."""
    tiles = -(-n // max(planned, 1))
    return fit(-(-n // tiles), n)


def sharded_raw_scores(
    prep: Prepared, layout: ModelLayout, score: ScoreOptions, kernel: KernelOptions, mesh: Mesh, *, progress: bool = False,
    desc: str = "QK-OV",
) -> dict[str, Array]:
    """``{block: [layer_pad, n_pad, n_b_pad, heads]}`` slice sums of every sample pair and layer,
    left on ``mesh`` with task A's rows split over ``"data"``.

    Device ``k`` of ``D`` holds A's rows ``[k·n_loc, (k+1)·n_loc)`` (``n_pad = D·n_loc ≥ n_a``;
    rows ``≥ n_a`` are zero and so are their sums). The tiles are :func:`plan_parts`' for one
    device (``ceil(n_a / D)`` rows of A, all of B; by parts where B is not one chunk), their row
    chunks cut to divide ``n_loc``; each tile puts ``c_a`` rows per device of A (split), ``c_b``
    samples of B and the weights (replicated) on the mesh and runs one :func:`sharded_step`.
    Layers and B are padded to whole tiles too (a repeated layer, zero samples), for the caller to
    slice off.
    """
    a_side: Side = factor_a(prep, score.variant)
    b_side: Side = side_of(prep.b, "b", score.variant)
    a_positions, b_positions = prep.a_positions, prep.b_positions
    n_a, n_b, n_l = len(a_positions), len(b_positions), layout.num_layers
    devices = data_size(mesh)
    per_device = -(-n_a // devices)
    parts = plan_parts(prep, layout, score, kernel, per_device, n_b, n_l, on_mesh=True)
    # One split of A's rows for every part (n_loc a device), which each part's row chunk divides:
    # the largest one, within its plan and its kernel's rule, that does.
    c_min = min(part.chunks[0] for part in parts)
    n_loc = -(-per_device // c_min) * c_min
    row_chunks = [max(d for d in range(c_min, part.chunks[0] + 1) if n_loc % d == 0 and part.tiles.sample_chunk(d, n_loc) == d)
                  for part in parts]
    n_b_pad = max(-(-n_b // c_b) * c_b for _, c_b, _ in (part.chunks for part in parts))
    n_l_pad = max(-(-n_l // c_l) * c_l for _, _, c_l in (part.chunks for part in parts))
    out = {block: jnp.zeros((n_l_pad, devices * n_loc, n_b_pad, layout.heads_of(block)), jnp.float32,
                            device=NamedSharding(mesh, P(None, DATA))) for block in ATTENTION_BLOCKS}
    split_rows, replicate = placements(mesh)
    total = sum(-(-n_l // part.chunks[2]) * (n_loc // c_a) * -(-n_b // part.chunks[1]) * layout.num_kv_heads // part.kv_heads
                for part, c_a in zip(parts, row_chunks))
    with progress_bar(progress, total=total, desc=desc, unit="tile") as bar:
        for (part, c_a), group in ((pc, group) for pc in zip(parts, row_chunks) for group in head_groups(layout, pc[0].kv_heads)):
            (_, c_b, c_l), sources = part.chunks, leaf_sources(layout, part.kinds)
            blocks = sorted({block for block, _ in part.kinds})
            step = sharded_step(mesh, part.tiles.name, group.layout, part.kinds, a_side.transform, b_side.transform, kernel)
            a_group, b_group = group_side(a_side, layout, sources, group), group_side(b_side, layout, sources, group)
            group_w = group_weights(prep.weights, layout, part.kinds, group)

            def placed(side: Side, positions: np.ndarray, layers: np.ndarray, split: bool):
                place = split_rows if split else replicate
                scale = np.where(positions >= 0, side.scale[np.maximum(positions, 0)], 0).astype(np.float32)
                return mesh_leaves(side.store, group.layout, sources, positions, layers, place), place(scale)

            for l0 in range(0, n_l, c_l):
                lsel = np.minimum(np.arange(l0, l0 + c_l), n_l - 1)
                weights = put_replicated({k: w[lsel] for k, w in group_w.items()}, mesh)
                b_cached = None
                for i0 in range(0, n_loc, c_a):
                    # Device k's rows of this tile: k·n_loc + i0 + [0, c_a), padding past n_a.
                    rows = (np.arange(devices)[:, None] * n_loc + i0 + np.arange(c_a)).ravel()
                    leaves_a, scale_a = placed(a_group, padded_positions(rows, a_positions), lsel, True)
                    for j0 in range(0, n_b, c_b):
                        if b_cached is None or n_b > c_b:
                            b_cached = placed(b_group, padded_positions(np.arange(j0, j0 + c_b), b_positions), lsel, False)
                        at = np.array([l0, i0, j0, group.q.start, group.kv.start], np.int32)
                        written = step({b: out[b] for b in blocks}, leaves_a, scale_a, weights, *b_cached, at)
                        out.update(written)
                        bar.update()
    return out
