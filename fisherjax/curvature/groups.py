"""The method comparison's K-FAC stage one group of parameter leaves at a time.

Where the Gram route does not hold ``G̃`` (:func:`fisherjax.curvature.compare.gram_slices`), a
model of billions of parameters cannot hold K-FAC's factors and several model-sized vectors
either (Llama-7B's factors alone are 71 GB). So the leaves are packed into groups
(:func:`parameter_groups`), each with the factors on its kernels, and the device holds one group's
factors and :data:`GROUP_COPIES` float32 copies of its leaves beside the parameters.

Every number this stage reports is a sum over the parameters, and K-FAC is block-diagonal over
its factors (with the diagonal ``D = Î`` on the leaves it does not cover), so each is a sum over
the groups ``g``::

    ‖D v − F v‖² = Σ_g ‖D_g v_g − (F v)_g‖²      ‖F̃ v − F v‖² = Σ_g ‖F̃_g v_g − (F v)_g‖²
    qᵀ D q = Σ_g q_gᵀ D_g q_g                     qᵀ F̃ q = Σ_g q_gᵀ F̃_g q_g

with ``F v = G̃ᵀ (G̃ v)``: ``G̃ v`` from one JVP of the whole probe before the groups
(:func:`~fisherjax.curvature.lowrank.gradients_times`, the one model-sized vector on the device),
and ``(F v)_g`` and ``q_g = (G̃ᵀ c)_g`` from one weighted gradient of the group's leaves each
(:func:`~fisherjax.curvature.lowrank.combined_gradient`). Per group that is one K-FAC pass
restricted to its factors (:func:`~fisherjax.curvature.kfac.kfac_factors` with ``keys``), then a
gradient pass per probe and per eigenvector: ``groups · (1 + probes + k)`` passes in all, the same
numbers as with everything held. K-FAC is block-diagonal over layers too, so a kernel whose
factors alone are too large forms them by ranges of its layers (``kfac_factors`` with ``layers``),
each range's kept on the host between the vector passes. The probes are drawn leaf by leaf
(:func:`probe`), so a group's part of one is drawn again without the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fisherjax import telemetry
from fisherjax.curvature import kfac, lowrank
from fisherjax.curvature.factors import KroneckerFactor
from fisherjax.data import Batch
from fisherjax.errors import ConfigError
from fisherjax.layout import flatten, leaf_paths, unflatten

GROUP_COPIES = 4
"""Float32 copies of a group's leaves the stage holds at once: the diagonal's, the probe's (or the
eigenvector's), its exact product's and K-FAC's product of it (a product goes layer by layer, so
its temporaries are one layer's)."""

FACTOR_PASS_COPIES = 4
"""Copies of a group's factors its K-FAC pass holds at its peak beside a pass's working memory: the
running sum over batches, the batch's sums, the blocks of a factor's Gram before they are joined,
and the float32 copies of the recordings they are formed from, which grow with the factors
(XLA's memory analysis of the factor passes of GPT-2 small, Qwen2.5-1.5B and Llama-7B:
``benchmarks/pass_memory.py``, RESULTS.md, twenty-ninth session)."""


@dataclasses.dataclass(frozen=True)
class ParameterGroup:
    """Leaves checked together: their ``paths``, the K-FAC factor ``keys`` on their kernels, the
    float32 bytes of those factors (``factor_bytes``) and of one copy of the leaves
    (``leaf_bytes``). A single unit whose leaves share a stacked layer axis of ``layers`` may form
    its factors by ``ranges`` of those layers (``(lo, hi)``, each one K-FAC pass, kept on the host
    between the vector passes); none: whole, kept on the device."""

    paths: tuple[str, ...]
    keys: tuple[str, ...]
    factor_bytes: int
    leaf_bytes: int
    layers: int | None = None
    ranges: tuple[tuple[int, int], ...] = ()

    @property
    def held_factor_bytes(self) -> int:
        """The factors on the device at once: all, or the widest range's."""
        if not self.ranges:
            return self.factor_bytes
        return math.ceil(self.factor_bytes * max(hi - lo for lo, hi in self.ranges) / self.layers)

    @property
    def bytes(self) -> int:
        """What the stage holds for the group beside a pass's working memory: the larger of its
        factor pass (:data:`FACTOR_PASS_COPIES` copies of the factors held) and its products (the
        factors held and :data:`GROUP_COPIES` copies of the leaves)."""
        held = self.held_factor_bytes
        return max(FACTOR_PASS_COPIES * held, held + GROUP_COPIES * self.leaf_bytes)

    def by_ranges(self, count: int) -> ParameterGroup:
        """The group with its factors by ``count`` ranges of its layers, as even as they go."""
        width = math.ceil(self.layers / count)
        return dataclasses.replace(self, ranges=tuple((lo, min(lo + width, self.layers)) for lo in range(0, self.layers, width)))


def _leaf_sizes(params) -> dict[str, int]:
    return {p: int(np.prod(np.shape(x))) for p, x in flatten(params).items()}


def units(model) -> tuple[ParameterGroup, ...]:
    """The least groups, in ravel order: each factored kernel with its bias and every factor on it
    (a fused QKV kernel's three), every other leaf alone."""
    sizes, specs = _leaf_sizes(model.params), model.layout.specs
    keys: dict[str, list[str]] = {}
    biases: dict[str, str] = {}
    for site in kfac.factor_sites(model):
        keys.setdefault(site.kernel, []).append(site.key)
        if site.bias is not None:
            biases[site.kernel] = site.bias
    grouped = set(biases.values())
    out = []
    for path in leaf_paths(model.params):
        if path in grouped:
            continue
        paths = (path, biases[path]) if path in biases else (path,)
        factor_keys = tuple(keys.get(path, ()))
        factors = 4 * kfac.factor_floats(model, factor_keys) if factor_keys else 0
        stacked = factor_keys and all(specs[p].layered for p in paths)
        out.append(ParameterGroup(paths, factor_keys, factors, 4 * sum(sizes[p] for p in paths),
                                  specs[path].shape[0] if stacked else None))
    return tuple(out)


def _least(unit: ParameterGroup) -> ParameterGroup:
    """A unit with its factors a layer at a time, where it has stacked layers."""
    return unit.by_ranges(unit.layers) if unit.layers and unit.layers > 1 else unit


def least_group_bytes(model) -> int:
    """What the stage holds at least beside the parameters: its largest unit (:func:`units`), with
    its factors a layer at a time where they stack."""
    return max(_least(u).bytes for u in units(model))


def parameter_groups(model, budget_bytes: float | None) -> tuple[ParameterGroup, ...]:
    """:func:`units` packed in order into as few groups as fit ``budget_bytes`` each (one group for
    None); a unit too large alone goes by the fewest ranges of its layers that fit, in a group of
    its own.

    Raises:
      ConfigError: a unit does not fit ``budget_bytes`` even a layer at a time.
    """
    out: list[ParameterGroup] = []
    for unit in units(model):
        if budget_bytes is not None and unit.bytes > budget_bytes:
            if _least(unit).bytes > budget_bytes:
                raise ConfigError(f"the method comparison's K-FAC factors and vectors of {', '.join(unit.paths)} take "
                                  f"{_least(unit).bytes / 1e9:.1f} GB at least, more than the {max(budget_bytes, 0) / 1e9:.1f} GB "
                                  "left for them: give it more memory")
            out.append(next(g for g in (unit.by_ranges(c) for c in range(2, unit.layers + 1)) if g.bytes <= budget_bytes))
            continue
        if out and not out[-1].ranges:
            last = out[-1]
            merged = ParameterGroup(last.paths + unit.paths, last.keys + unit.keys, last.factor_bytes + unit.factor_bytes,
                                    last.leaf_bytes + unit.leaf_bytes)
            if budget_bytes is None or merged.bytes <= budget_bytes:
                out[-1] = merged
                continue
        out.append(unit)
    return tuple(out)


PROBE_CHUNK = 1 << 20
"""Values :func:`probe` draws at a time: every leaf is drawn in chunks of this size, so
``jax.random`` compiles one program for all of them, not one per leaf shape."""


@jax.jit
def _probe_chunk(key: jax.Array, leaf: jax.Array, chunk: jax.Array) -> jax.Array:
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, leaf), chunk), (PROBE_CHUNK,), jnp.float32)


def probe(key: jax.Array, params, paths: Sequence[str] | None = None) -> dict[str, jax.Array]:
    """A standard Gaussian probe as flat float32 ``{path: array}`` on the leaves ``paths`` (all for
    None): chunk ``j`` of leaf ``i`` of the ravel order (:data:`PROBE_CHUNK` values, the last one
    cut) is drawn from ``fold_in(fold_in(key, i), j)``, so any group's part of the same probe is
    drawn without the rest, on the device, by one compiled program."""
    shapes = {p: np.shape(x) for p, x in flatten(params).items()}
    index = {p: i for i, p in enumerate(leaf_paths(params))}
    paths = tuple(index) if paths is None else tuple(paths)

    def leaf(p):
        size = math.prod(shapes[p])
        chunks = [_probe_chunk(key, index[p], j) for j in range(max(-(-size // PROBE_CHUNK), 1))]
        return (chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks))[:size].reshape(shapes[p])

    return {p: leaf(p) for p in paths}


def _layerwise_product(factor, w):
    """``A W̄ G`` of one factor, one layer at a time (``jax.lax.map``): temporaries of one layer."""
    def one(args):
        a, x, g = args
        return jnp.matmul(jnp.matmul(a, x, precision=kfac.HIGHEST), g, precision=kfac.HIGHEST)

    a, g = factor.inputs, factor.outputs
    if w.ndim == 2:
        return one((a, w, g))
    flat = (a.reshape(-1, *a.shape[-2:]), w.reshape(-1, *w.shape[-2:]), g.reshape(-1, *g.shape[-2:]))
    return jax.lax.map(one, flat).reshape(w.shape)


def _group_product(factors, layout, v: dict, diagonal: dict, per_layer: bool) -> dict:
    """K-FAC's ``F̃_g v_g`` (``D_g ⊙ v_g`` on the leaves without a factor), flat like ``v``."""
    return kfac.map_covered(factors, layout, v, _layerwise_product, lambda path, x: diagonal[path] * x, per_layer=per_layer)


def _squares(tree) -> jax.Array:
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


def _over_layers(body, factors, trees, layers):
    """``body(factors, *trees)`` — or with ``layers = (lo, hi)``, its sum over the stacked layers
    ``lo ≤ l < hi``, each taken on layer ``l`` of the flat ``trees`` and layer ``l − lo`` of the
    factors (which hold only that range), one layer at a time (``jax.lax.map``): no range of the
    leaves is copied, and the temporaries are one layer's."""
    if layers is None:
        return body(factors, *trees)

    def one(layer):
        cut = tuple({p: jax.lax.dynamic_index_in_dim(x, layer, keepdims=True) for p, x in tree.items()} for tree in trees)
        held = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, layer - layers[0], keepdims=True), factors)
        return body(held, *cut)

    return jax.lax.map(one, jnp.arange(*layers)).sum(0)


@functools.partial(jax.jit, static_argnames=("layout", "layers"))
def _probe_sums(factors, layout, diagonal, v, exact, layers=None):
    """``[3]``: ``‖D_g v_g − (F v)_g‖²``, ``‖F̃_g v_g − (F v)_g‖²`` and ``‖(F v)_g‖²``, over the
    layers ``(lo, hi)`` the factors hold (all for None)."""
    def body(factors, diagonal, v, exact):
        kv = _group_product(factors, layout, v, diagonal, layers is not None)
        return jnp.stack([_squares(jax.tree.map(lambda d, x, f: d * x - f, diagonal, v, exact)),
                          _squares(jax.tree.map(jnp.subtract, kv, exact)), _squares(exact)])

    return _over_layers(body, factors, (diagonal, v, exact), layers)


@functools.partial(jax.jit, static_argnames=("layout", "layers"))
def _form_sums(factors, layout, diagonal, q, layers=None):
    """``[2]``: ``q_gᵀ D_g q_g`` and ``q_gᵀ F̃_g q_g``, over the layers the factors hold."""
    def body(factors, diagonal, q):
        kq = _group_product(factors, layout, q, diagonal, layers is not None)
        return jnp.stack([sum(jnp.vdot(d * x, x) for d, x in zip(jax.tree.leaves(diagonal), jax.tree.leaves(q))),
                          sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(q), jax.tree.leaves(kq)))])

    return _over_layers(body, factors, (diagonal, q), layers)


def lowered_products(model, group: ParameterGroup) -> jax.stages.Lowered:
    """The probes' product program of ``group`` (its first range of layers, if it has ranges),
    lowered from the shapes of its leaves and factors (nothing allocated), for XLA's memory
    analysis: what it holds is its arguments (the factors, ``D``, the probe and its exact product)
    and its temporaries."""
    layers = group.ranges[0] if group.ranges else None
    sizes = {p: np.shape(x) for p, x in flatten(model.params).items()}
    leaves = {p: jax.ShapeDtypeStruct(sizes[p], jnp.float32) for p in group.paths}
    factors = {}
    for site in kfac.chosen_sites(model, group.keys):
        stacked, d_in, d_out = kfac.factor_dims(model, site)
        lead = () if stacked is None else ((stacked,) if layers is None else (layers[1] - layers[0],))
        factors[site.key] = KroneckerFactor(jax.ShapeDtypeStruct((*lead, d_in, d_in), jnp.float32),
                                            jax.ShapeDtypeStruct((*lead, d_out, d_out), jnp.float32), site.kernel, site.bias, site.block)
    return _probe_sums.lower(factors, model.layout, leaves, leaves, leaves, layers)


@dataclasses.dataclass(frozen=True)
class KFACStage:
    """K-FAC's part of the comparison, however it was run: every factor's eigenvalues (``values``, as
    :func:`~fisherjax.curvature.kfac.factor_values`), the covered leaves, K-FAC's top eigenvalue
    of each compared slice (``slice_tops``), the probes' relative errors of ``D`` and K-FAC
    (``[probes]`` each), the eigenvectors' ``qᵀ D q`` and ``qᵀ F̃ q`` (``[k]`` each), and K-FAC's
    stretch (its factor passes and eigenvalues; by groups, summed over them)."""

    values: dict[str, tuple[np.ndarray, np.ndarray]]
    covered: frozenset[str]
    slice_tops: np.ndarray
    diagonal_errors: np.ndarray
    kfac_errors: np.ndarray
    diagonal_forms: np.ndarray
    kfac_forms: np.ndarray
    stretch: telemetry.Stretch


def grouped_kfac(model, params, batches: Sequence[Batch], groups: Sequence[ParameterGroup], diagonal: Mapping[str, np.ndarray],
                 block_ids: Sequence[tuple[str, int, int]], probe_keys: Sequence[jax.Array], coefficients: np.ndarray) -> KFACStage:
    """K-FAC's factors, spectrum, probe errors and Rayleigh forms of the comparison by ``groups``
    (see the module docstring): ``diagonal`` the host's flat ``Î``, ``probe_keys`` one key per probe
    (:func:`probe`), ``coefficients`` ``[rows, k]`` the eigenvectors ``G̃ᵀ c_j``."""
    layout = model.layout
    directions = [lowrank.gradients_times(model, params, batches, unflatten(probe(key, params))) for key in probe_keys]
    probe_sums = np.zeros((len(probe_keys), 3))
    form_sums = np.zeros((coefficients.shape[1], 2))
    values, covered, stretches, tops = {}, set(), [], np.full(len(block_ids), np.nan)
    for group in groups:
        parts = []  # (layers, factors): on the device whole, on the host by ranges
        for layers in group.ranges or (None,):
            def run_kfac(layers=layers, keys=group.keys):
                factors = kfac.kfac_factors(model, params, batches, keys=keys, layers=layers)
                return factors, kfac.factor_values(factors)

            (factors, part_values), stretch = telemetry.measure(run_kfac)
            stretches.append(stretch)
            for k, (s_a, s_g) in part_values.items():  # a key's ranges in layer order
                values[k] = (s_a, s_g) if k not in values else (np.concatenate([values[k][0], s_a]), np.concatenate([values[k][1], s_g]))
            covered.update(p for f in factors.factors.values() for p in (f.kernel, f.bias) if p is not None)
            lo, hi = layers or (0, None)
            inside = [i for i, (block, layer, _) in enumerate(block_ids)
                      if set(layout.block_sources(block, "kernel")) <= set(group.paths) and (layers is None or lo <= layer < hi)]
            if inside:
                shifted = [(block, layer - lo, head) for block, layer, head in (block_ids[i] for i in inside)]
                tops[inside] = kfac.slice_tops(factors, layout, shifted)
            parts.append((layers, factors.factors if layers is None else jax.device_get(factors.factors)))
            del factors
        diag = {p: jnp.asarray(diagonal[p], jnp.float32) for p in group.paths}
        for row, (key, direction) in enumerate(zip(probe_keys, directions)):
            exact = lowrank.combined_gradient(model, params, batches, direction, group.paths)
            v = probe(key, params, group.paths)
            for layers, factors in parts:
                probe_sums[row] += np.asarray(_probe_sums(factors, layout, diag, v, exact, layers), np.float64)
            del exact, v
        for j in range(coefficients.shape[1]):
            q = lowrank.combined_gradient(model, params, batches, coefficients[:, j], group.paths)
            for layers, factors in parts:
                form_sums[j] += np.asarray(_form_sums(factors, layout, diag, q, layers), np.float64)
            del q
        del parts, diag
    split = [block_ids[i] for i in np.flatnonzero(np.isnan(tops))]
    if split:  # only a layout of unstacked per-layer leaves can spread one block's kernels over groups
        raise ConfigError(f"the compared slices {split} have kernels in several groups of parameters: give the comparison "
                          "the memory to hold their factors together")
    norms = np.sqrt(probe_sums)
    return KFACStage(values, frozenset(covered), tops, norms[:, 0] / norms[:, 2], norms[:, 1] / norms[:, 2], form_sums[:, 0],
                       form_sums[:, 1], telemetry.total(stretches))
