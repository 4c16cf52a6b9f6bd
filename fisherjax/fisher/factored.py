"""Per-sample gradients of dense kernels kept as their token factors, and formed where they are read.

A dense kernel ``W [d_in, d_out]`` (``y_t = a_t W``) has the per-sample token-sum gradient

    g_i = Σ_t a_{i,t} δ_{i,t}ᵀ = A_iᵀ Δ_i        A_i [T, d_in] (inputs), Δ_i [T, d_out] (output gradients)

— the same ``(a, δ)`` pairs Phase 1's sites record. Keeping ``A_i`` and ``Δ_i`` takes
``T · (d_in + d_out)`` numbers per sample instead of ``d_in · d_out``: smaller whenever
``T < d_in · d_out / (d_in + d_out)`` (576 positions for GPT-2 small's fused QKV kernel, 384 for
its output projection; at 128 positions their factors are a quarter and a third of the gradients). Positions without a loss have
``δ = 0`` and padding to a longer ``T`` adds zero rows, so neither changes ``g_i``.

:class:`FactoredGrads` is what Phases 5 and 6 see in ``SampleGrads.grads``: a read-only array of
shape ``[n, *lead, d_in, d_out]`` (``lead``: the layer axis of a stacked kernel) whose every read
(``x[samples, layers]``, ``x[i]``, ``x[..., rows, :]``) forms just the gradients asked for, in float32,
with one batched matmul over the selected factors. The whole array never exists unless it is asked
for (``np.asarray``).

Where they are formed. On the default device, by XLA (:func:`form`): only the selected factors
(a quarter to a third of the gradients' bytes at GPT-2 small's 128 positions, in their stored dtype)
travel there, and a phase that computes on the device takes the formed gradients where they are
(:func:`read_on_device`) — on a GPU, forming on the host would put Phase 6's largest work (most of
its flops at 7B, ``fisherjax plan``) on the CPU and send every formed gradient over the bus. A host
read (``x[key]``) is the device's result as a read-only numpy array (on a CPU, the same memory). On
a CPU, XLA's formation is also the steadier one: numpy's BLAS wrote into fresh arrays that numpy
backs with transparent huge pages, whose allocation stalled for seconds at a time on a busy Linux
host (docs/DECISIONS.md). The diagonal Fisher of the kept samples, ``mean_i w_i g_i²``, is summed
on the device sample by sample (:meth:`FactoredGrads.weighted_square_mean`), one formed sample
alive at a time. On a mesh the selected factors are placed as the gradients would be (split over
``"data"``, or replicated) and formed there (:meth:`FactoredGrads.on_device`'s ``place``): each
device forms the rows it reads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from fisherjax.sharding import pad_rows


FACTOR_BYTES = 256e6
""":meth:`FactoredGrads.weighted_square_mean` moves the selected samples' factors to the device in
groups of at most this many bytes (at least one sample each)."""


def factors_are_smaller(seq: int, d_in: int, d_out: int) -> bool:
    """Whether ``seq`` positions of factors, ``seq · (d_in + d_out)`` numbers, take at most half of
    the gradient's ``d_in · d_out``. Half, not less: every read re-forms what it reads
    (``2·seq·d_in·d_out`` flops a sample), which a saving of a few percent does not pay for (a
    4-layer d = 256 run at 128 positions, whose QKV factors are two thirds of its gradients, spent
    5 s more in QK-OV for 1 % less memory; RESULTS.md)."""
    return 2 * seq * (d_in + d_out) <= d_in * d_out


def smaller_as_factors(layout, paths, seq: int) -> tuple[str, ...]:
    """The dense kernels among ``paths`` whose factors at ``seq`` positions take at most half of
    their gradients (:func:`factors_are_smaller`)."""
    return tuple(p for p in paths if layout.spec(p).kind == "kernel" and factors_are_smaller(seq, *layout.spec(p).shape[-2:]))


def _split_key(key, ndim: int) -> tuple[tuple, object, object]:
    """``(lead key, row index, column index)`` of an index over ``[n, *lead, d_in, d_out]``."""
    key = key if isinstance(key, tuple) else (key,)
    if sum(k is Ellipsis for k in key) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if any(k is None for k in key):
        raise IndexError("FactoredGrads does not take np.newaxis in an index")
    at = next((i for i, k in enumerate(key) if k is Ellipsis), None)
    if at is not None:
        fill = ndim - (len(key) - 1)
        key = key[:at] + (slice(None),) * fill + key[at + 1 :]
    if len(key) > ndim:
        raise IndexError(f"too many indices for an array of {ndim} dimensions")
    key = key + (slice(None),) * (ndim - len(key))
    lead, rows, cols = key[:-2], key[-2], key[-1]
    if (isinstance(rows, (list, np.ndarray)) or isinstance(cols, (list, np.ndarray))) and any(
        isinstance(k, (list, np.ndarray)) for k in lead
    ):
        raise IndexError("FactoredGrads takes index arrays on the sample and layer axes or on the kernel axes, not both")
    return lead, rows, cols


def _last_axis(x: np.ndarray, index) -> tuple[np.ndarray, bool]:
    """``x[..., index]`` with an integer kept as a length-1 axis; the flag says it was one."""
    if isinstance(index, (int, np.integer)):
        return x[..., int(index) : int(index) + 1 or None], True
    return x[..., index], False


def _padded(x: np.ndarray, rows: int) -> np.ndarray:
    """``x`` with zero rows after it up to ``rows`` (:func:`~fisherjax.sharding.pad_rows`; ``x`` itself when it has them)."""
    return x if len(x) == rows else pad_rows(x, rows)


def _formed(inputs: Float[Array, "... seq d_in"], deltas: Float[Array, "... seq d_out"]) -> Float[Array, "... d_in d_out"]:
    """``Aᵀ Δ`` over the last two axes: products of the stored dtype's values accumulated in float32
    (exact products for bfloat16 and float16 factors; float32 factors at full float32 precision, not
    a GPU's TF32)."""
    return jnp.einsum("...ti,...to->...io", inputs, deltas, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames="shape")
def form(inputs: Float[Array, "m seq d_in"], deltas: Float[Array, "m seq d_out"], shape: tuple[int, ...]) -> Float[Array, "..."]:
    """``g_m = A_mᵀ Δ_m`` (``[m, d_in, d_out]`` float32, reshaped to ``shape``) for each of the ``m``
    selected (sample, lead) pieces."""
    return _formed(inputs, deltas).reshape(shape)


TRANSFORMS = {"identity": lambda x: x, "abs": jnp.abs, "sqrt": jnp.sqrt, "square": jnp.square}
"""Elementwise ``f`` of a per-sample gradient: what :meth:`FactoredGrads.weighted_mean` averages
of the formed ones, and how a stored per-sample array enters a QK-OV product
(:mod:`fisherjax.analysis.qkov`)."""


@functools.partial(jax.jit, static_argnames="transform")
def _add_weighted(total: Float[Array, "*lead d_in d_out"], inputs: Float[Array, "c *lead seq d_in"],
                  deltas: Float[Array, "c *lead seq d_out"], weights: Float[Array, " c"], transform: str) -> Float[Array, "*lead d_in d_out"]:
    """``total + Σ_c w_c f(g_c)`` with ``g_c = A_cᵀ Δ_c`` formed one sample at a time (a scan)."""
    def one(acc, xs):
        a, d, w = xs
        return acc + w * TRANSFORMS[transform](_formed(a, d)), None

    return jax.lax.scan(one, total, (inputs, deltas, weights))[0]


@jax.tree_util.register_pytree_node_class
class FactoredGrads:
    """Per-sample gradients ``g_i = A_iᵀ Δ_i`` of one dense kernel, formed on read (module docstring).

    A pytree whose leaves are the two factor arrays.

    Args:
      inputs: ``[n, *lead, T, d_in]`` the kernel's inputs ``a`` (any float dtype; padding rows zero
        or not, their ``δ`` is zero).
      deltas: ``[n, *lead, T, d_out]`` the loss's gradient at the kernel's output, ``δ``.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, inputs: Float[np.ndarray, "n *lead seq d_in"], deltas: Float[np.ndarray, "n *lead seq d_out"],
                 columns: tuple[np.ndarray | None, np.ndarray | None] = (None, None)):
        if np.shape(inputs)[:-1] != np.shape(deltas)[:-1]:
            raise ValueError(f"factors of different samples or positions: inputs {np.shape(inputs)}, deltas {np.shape(deltas)}")
        self.inputs, self.deltas = inputs, deltas
        self.columns = tuple(None if c is None else np.asarray(c, np.int64) for c in columns)

    @property
    def shape(self) -> tuple[int, ...]:
        widths = (len(c) if c is not None else f.shape[-1] for c, f in zip(self.columns, (self.inputs, self.deltas)))
        return (*self.inputs.shape[:-2], *widths)

    def take(self, positions: np.ndarray, axis: int) -> FactoredGrads:
        """The gradients' ``np.take(g, positions, axis)`` along a kernel axis (−2: ``d_in``, −1:
        ``d_out``), still as factors that share this one's arrays: each read takes those columns of
        the selected samples' inputs or deltas, so it forms (and moves) only the gradients' taken
        part — a group of heads of an attention kernel (:meth:`~fisherjax.layout.ModelLayout.head_positions`)."""
        if axis not in (-2, -1):
            raise ValueError(f"FactoredGrads.take takes along a kernel axis (-2 or -1), got {axis}")
        columns = list(self.columns)
        at = axis + 2
        positions = np.asarray(positions, np.int64)
        columns[at] = positions if columns[at] is None else columns[at][positions]
        return FactoredGrads(self.inputs, self.deltas, tuple(columns))

    def _factors(self, lead) -> tuple[np.ndarray, np.ndarray]:
        """The inputs and deltas of the samples (and layers) ``lead`` selects, their taken columns only."""
        a, d = self.inputs[lead + (Ellipsis,)], self.deltas[lead + (Ellipsis,)]
        ca, cd = self.columns
        return (a if ca is None else a[..., ca]), (d if cd is None else d[..., cd])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes of the formed array (float32), as a dense array of this shape would report."""
        return self.size * self.dtype.itemsize

    @property
    def stored_nbytes(self) -> int:
        """Bytes the factors take."""
        return int(self.inputs.nbytes + self.deltas.nbytes)

    @property
    def stored_dtype(self) -> np.dtype:
        """The dtype the factors are kept in (what is formed is float32: :attr:`dtype`)."""
        return np.dtype(self.inputs.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"FactoredGrads(shape={self.shape}, positions={self.inputs.shape[-2]}, factors {self.inputs.dtype})"

    def _selected(self, key, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
        """The factors ``key`` selects, as ``[m, T, d_in]`` and ``[m, T, d_out]`` host arrays, and
        the shape of the gradients they form; ``pad_to``: zero factors appended along the first
        selected axis up to this length (zero factors form zero gradients)."""
        lead, rows, cols = _split_key(key, self.ndim)
        a, d = self._factors(lead)
        a, squeeze_rows = _last_axis(a, rows)
        d, squeeze_cols = _last_axis(d, cols)
        if pad_to is not None:
            if a.ndim < 3:
                raise IndexError("pad_to pads the first selected axis: the index must keep the sample axis")
            a, d = _padded(a, pad_to), _padded(d, pad_to)
        shape = a.shape[:-2] + (() if squeeze_rows else a.shape[-1:]) + (() if squeeze_cols else d.shape[-1:])
        return a.reshape(-1, *a.shape[-2:]), d.reshape(-1, *d.shape[-2:]), shape

    def on_device(self, key=(), place: Callable[[np.ndarray], Array] | None = None, pad_to: int | None = None) -> Float[Array, "..."]:
        """The gradients at ``key`` (numpy indexing over ``[n, *lead, d_in, d_out]``; index arrays
        on the leading axes or on the kernel axes), formed in float32 where ``place`` puts the
        selected factors (a function of a host array; default :func:`jax.device_put`, the default
        device). With a placement split over a mesh's ``"data"`` axis
        (:func:`fisherjax.sharding.shard_rows`) each device forms its own rows; replicated, every
        device forms all of them: either way no formed gradient crosses between host and devices.
        ``pad_to``: zero rows after the selected ones up to this many (a tile's padding)."""
        a, d, shape = self._selected(key, pad_to)
        place = jax.device_put if place is None else place
        return form(place(a), place(d), shape)

    def staged(self, key=(), place: Callable[[np.ndarray], Array] | None = None) -> FactoredGrads:
        """The samples (and layers) ``key`` selects on the leading axes, still as factors (their
        taken columns kept), moved where ``place`` puts them (default the default device): reads
        of the result take their columns and form there, so reading it again — a group of heads
        after another — moves nothing."""
        lead, rows, cols = _split_key(key, self.ndim)
        if not all(isinstance(k, slice) and k == slice(None) for k in (rows, cols)):
            raise IndexError("FactoredGrads.staged selects samples and layers only, not kernel rows or columns")
        place = jax.device_put if place is None else place
        return FactoredGrads(place(np.asarray(self.inputs[lead + (Ellipsis,)])), place(np.asarray(self.deltas[lead + (Ellipsis,)])),
                             self.columns)

    def __getitem__(self, key) -> np.ndarray:
        """:meth:`on_device`'s gradients at ``key`` as a read-only numpy array."""
        return np.asarray(self.on_device(key))

    def weighted_square_mean(self, weights: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """``(1/|R|) Σ_{i∈R} w_i g_i²`` over the samples ``rows`` (None: all): :meth:`weighted_mean`
        of the squares."""
        return self.weighted_mean(weights, rows, "square")

    def weighted_mean(self, weights: np.ndarray, rows: np.ndarray | None = None, transform: str = "identity") -> np.ndarray:
        """``(1/|R|) Σ_{i∈R} w_i f(g_i)`` over the samples ``rows`` (None: all), ``f`` a
        :data:`TRANSFORMS` entry, ``[*lead, d_in, d_out]`` float32: summed on the device, one
        formed sample at a time, the factors moved in groups of :data:`FACTOR_BYTES`."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, np.int64)
        weights = np.asarray(weights, np.float32)
        per_sample = int(np.prod(self.inputs.shape[1:-1])) * (self.shape[-2] * self.inputs.itemsize + self.shape[-1] * self.deltas.itemsize)
        step = max(1, min(len(rows), int(FACTOR_BYTES // max(per_sample, 1))))
        total = jnp.zeros(self.shape[1:], jnp.float32)
        for start in range(0, len(rows), step):
            index = rows[start : start + step]
            w = weights[index]
            if len(index) < step:  # the last group padded with weight-0 repeats: one shape, one compilation
                w = np.concatenate([w, np.zeros(step - len(index), np.float32)])
                index = np.concatenate([index, np.full(step - len(index), index[-1])])
            a, d = self._factors((index,))
            total = _add_weighted(total, jax.device_put(a), jax.device_put(d), jnp.asarray(w), transform)
        return np.asarray(total) / np.float32(max(len(rows), 1))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[...]  # read-only; numpy's copy=True asks for a writable array of one's own
        return out.astype(dtype or out.dtype, copy=bool(copy))

    def tree_flatten(self):
        return (self.inputs, self.deltas), tuple(None if c is None else tuple(c.tolist()) for c in self.columns)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, aux)

    def take_rows(self, index) -> FactoredGrads:
        """The samples at ``index`` (an int array or a slice), still as factors."""
        return FactoredGrads(self.inputs[index], self.deltas[index], self.columns)


def stored_dtype(kept) -> np.dtype:
    """The dtype a kept leaf's numbers are stored in: a :class:`FactoredGrads`' factors', an
    array's (or memory map's) own."""
    return kept.stored_dtype if isinstance(kept, FactoredGrads) else np.dtype(kept.dtype)


def read_on_device(leaf, key, may_alias: bool | None = None, *, place: Callable[[np.ndarray], Array] | None = None,
                   pad_to: int | None = None) -> Array:
    """``leaf[key]`` on the default device, or where ``place`` puts a host array (a mesh placement):
    formed there for :class:`FactoredGrads` (only the factors travel), moved there for an array
    (``may_alias``: :func:`jax.device_put`'s, without ``place``). ``pad_to``: zero rows after the
    selected ones up to this many."""
    if isinstance(leaf, FactoredGrads):
        return leaf.on_device(key, place, pad_to)
    value = leaf[key]
    if pad_to is not None:
        value = _padded(np.asarray(value), pad_to)
    return jax.device_put(value, may_alias=may_alias) if place is None else place(np.asarray(value))

