"""Meshes the phases accept: samples over ``"data"``, parameters replicated or over ``"model"``.

Every phase that takes ``mesh=`` takes a :class:`jax.sharding.Mesh` whose axis names are
``("data",)`` or ``("data", "model")`` and asks this module, so the rules are in one place:

* samples (the leading axis of a batch, of kept per-sample gradients, of task A in the pair
  phases) are split over ``"data"`` in contiguous blocks — device ``k`` of ``D`` holds rows
  ``[k·n/D, (k+1)·n/D)`` — so the global order of samples is the single-device order;
* parameters are replicated, or, on a ``"model"`` axis, sharded along their largest dimension
  that the axis divides (FSDP-style: the compiler gathers what a step needs);
* a batch is padded with filler rows (sample id −1, every label ignored) to a multiple of the
  ``"data"`` size, so filler never changes a number.

JAX does the work (``shard_map`` over ``"data"``, ``NamedSharding`` placement, XLA's
collectives); this module only names the layouts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fisherjax import backend
from fisherjax.errors import ConfigError, one_line

DATA = "data"
MODEL = "model"
AXES = ((DATA,), (DATA, MODEL))
"""The axis names a mesh may have."""


def check_mesh(mesh: Mesh | None) -> Mesh | None:
    """``mesh`` itself when its axes are ``("data",)`` or ``("data", "model")`` (or it is None)."""
    if mesh is None:
        return None
    if not isinstance(mesh, Mesh):
        raise ConfigError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if tuple(mesh.axis_names) not in AXES:
        raise ConfigError(f"mesh axes must be ('data',) or ('data', 'model'), got {tuple(mesh.axis_names)}")
    return mesh


def make_mesh(data: int | None = None, model: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ``("data",)`` mesh over ``data`` devices (default: all), or ``("data", "model")`` when
    ``model > 1``; ``devices`` default to ``jax.devices()``."""
    devices = list(jax.devices() if devices is None else devices)
    if model < 1:
        raise ConfigError(f"model axis size must be ≥ 1, got {model}")
    data = len(devices) // model if data is None else data
    if data < 1 or data * model > len(devices):
        raise ConfigError(f"a mesh of {data} × {model} devices needs {data * model} devices; {len(devices)} are available")
    grid = np.array(devices[: data * model], dtype=object)
    if model == 1:
        return Mesh(grid.reshape(data), (DATA,))
    return Mesh(grid.reshape(data, model), (DATA, MODEL))


def data_size(mesh: Mesh | None) -> int:
    """Devices along ``"data"`` (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape[DATA])


def model_size(mesh: Mesh | None) -> int:
    """Devices along ``"model"`` (1 without one)."""
    return 1 if mesh is None or MODEL not in mesh.axis_names else int(mesh.shape[MODEL])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def by_sample(mesh: Mesh) -> NamedSharding:
    """Leading (sample) axis split over ``"data"``."""
    return NamedSharding(mesh, P(DATA))


def param_spec(shape: Sequence[int], mesh: Mesh) -> P:
    """Replicated, or on a ``"model"`` axis the largest dimension it divides (replicated if none)."""
    m = model_size(mesh)
    if m == 1:
        return P()
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % m == 0 and shape[d] >= m:
            return P(*([None] * d + [MODEL]))
    return P()


def param_shardings(tree, mesh: Mesh):
    """A :class:`NamedSharding` per leaf of a parameter-shaped ``tree`` (the parameters, or the
    full diagonal's state): :func:`param_spec` of its shape."""
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), mesh)), tree)


def place_params(params, mesh: Mesh):
    """``params`` on the mesh: replicated, or sharded over ``"model"`` (:func:`param_shardings`);
    each process places the pieces of its own devices from its host copy."""
    return place(params, param_shardings(params, mesh))


def _put(x, sharding: NamedSharding) -> jax.Array:
    """``x`` (the same on every process) placed with ``sharding``, which may span processes:
    ``jax.device_put`` takes only shardings of this process's devices. PRNG keys travel as
    their key data."""
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def pad_rows(x, rows: int) -> np.ndarray:
    """``x`` ``[n, ...]`` on the host with zero rows after it up to ``rows``."""
    x = np.asarray(x)
    out = np.zeros((rows,) + x.shape[1:], x.dtype)
    out[: len(x)] = x
    return out


def run_mesh(count: int | None = None, model: int = 1) -> Mesh | None:
    """The mesh of a run over ``count`` devices (``--devices``) of ``jax.devices()`` (every
    process's): None (one device, no mesh) for 1, or when ``count`` is None and only one device
    exists; all of them when None."""
    available = len(jax.devices())
    count = available if count is None else count
    if count < 1:
        raise ConfigError(f"--devices must be ≥ 1, got {count}")
    if count > available:
        raise ConfigError(f"--devices {count}: only {available} device(s) are available ({backend.platform()})")
    if count % model:
        raise ConfigError(f"--devices {count} is not a multiple of the model axis size {model}")
    if count == 1:
        return None
    return make_mesh(count // model, model)


def shard_rows(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array every process holds whole, as a global array split over ``"data"``: each
    process places only the rows of its own devices (works on one host and on several)."""
    return jax.make_array_from_callback(x.shape, by_sample(mesh), lambda index: x[index])


def place(tree, shardings):
    """``tree`` (the same on every process) placed leaf by leaf with ``shardings`` (a tree of
    :class:`NamedSharding` like ``tree``), each process placing its own devices' pieces."""
    return jax.tree.map(_put, tree, shardings)


def put_replicated(tree, mesh: Mesh):
    """``tree`` (the same on every process) replicated on every device of the mesh."""
    return jax.tree.map(lambda x: _put(x, replicated(mesh)), tree)


def placements(mesh: Mesh) -> tuple[Callable, Callable]:
    """``(split, replicate)``: :func:`shard_rows` and :func:`put_replicated` on ``mesh``, as functions
    of the host value alone (what :meth:`fisherjax.fisher.factored.FactoredGrads.on_device` and the
    pair phases' tiles take as ``place``)."""
    return functools.partial(shard_rows, mesh=mesh), functools.partial(put_replicated, mesh=mesh)


def local_rows(tree) -> tuple[np.ndarray, object]:
    """``(rows, values)``: the rows of arrays split over ``"data"`` that this process's devices hold
    (every row on one host), in order, copied to the host once each (replicas over ``"model"``
    skipped). ``rows`` indexes the global leading axis; every leaf must be split alike."""
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return np.zeros(0, np.int64), tree
    starts, out = None, []
    for leaf in leaves:
        shards = {}
        for shard in leaf.addressable_shards:
            if shard.data.shape[1:] != leaf.shape[1:]:
                raise ValueError(f"local_rows: an array split along more than its rows ({leaf.sharding})")
            rows = shard.index[0] if shard.index else slice(None)
            start = rows.start or 0
            if start not in shards:
                shards[start] = (rows, shard.data)
        order = sorted(shards)
        if starts is None:
            n = leaf.shape[0]
            starts = np.concatenate([np.arange(*shards[s][0].indices(n)) for s in order])
        out.append(np.concatenate([np.asarray(shards[s][1]) for s in order]) if len(order) > 1 else np.asarray(shards[order[0]][1]))
    return starts, jax.tree.unflatten(treedef, out)


def process_sum(values: np.ndarray) -> np.ndarray:
    """``values`` summed over the processes of a multi-host run (itself on one host)."""
    return _every_process(values).sum(0)


def process_min(values: np.ndarray) -> np.ndarray:
    """``values``' smallest over the processes of a multi-host run (itself on one host): a choice
    every process must make alike."""
    return _every_process(values).min(0)


def least_over_processes(value: float | None) -> float:
    """One number's smallest over the processes of a multi-host run (:func:`process_min`), with
    None (not known here) counting as infinite: a bound every process must apply alike."""
    return float(process_min(np.array([np.inf if value is None else value], np.float64))[0])


def _every_process(values: np.ndarray) -> np.ndarray:
    """``[processes, *shape]``: every process's ``values`` (:func:`_allgather`; on one host, its
    own with a leading axis of 1)."""
    values = np.ascontiguousarray(values)
    return values[None] if jax.process_count() == 1 else _allgather(values)


def _allgather(x: np.ndarray) -> np.ndarray:
    """``multihost_utils.process_allgather`` of a host array, ``[processes, *shape]``, exactly:
    64-bit values go as pairs of 32-bit words, since JAX without ``jax_enable_x64`` narrows int64 to
    int32 (a host's memory in bytes wrapped negative) and float64 to float32."""
    from jax.experimental import multihost_utils

    x = np.ascontiguousarray(x)
    if x.dtype.itemsize != 8:
        return np.asarray(multihost_utils.process_allgather(x))
    words = np.asarray(multihost_utils.process_allgather(x.reshape(-1).view(np.uint32)))
    return np.ascontiguousarray(words).view(x.dtype).reshape(jax.process_count(), *x.shape)


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> None:
    """Join a multi-process run (``jax.distributed.initialize``; arguments left None are read by
    JAX from the cluster environment: SLURM, Open MPI, Kubernetes, or
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``). On CPUs the
    collectives between processes go over gloo. Must run before any computation."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only; asks no backend
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"--coordinator {coordinator}: cannot join the multi-process run ({one_line(err)})") from None


def gather_rows(tree):
    """Arrays of which each process holds some rows (its share of the samples), joined on every
    process in process order: ``[Σ_p n_p, ...]`` (the tree itself on one process), exactly
    (:func:`_allgather`). Shares may differ in length: each is padded to the longest and cut back."""
    if jax.process_count() == 1:
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    counts = _allgather(np.array([len(leaves[0])], np.int64)).reshape(-1)
    longest = int(counts.max())
    joined = []
    for leaf in leaves:
        x = np.asarray(leaf)
        every = _allgather(pad_rows(x, longest)).reshape(len(counts), longest, *x.shape[1:])
        joined.append(np.concatenate([every[p, :c] for p, c in enumerate(counts)]))
    return jax.tree.unflatten(treedef, joined)


def to_host(x) -> np.ndarray:
    """A value on the host whole: ``np.asarray`` when this process holds all of it (one host, or
    a replicated array), else ``process_allgather`` of the pieces every process holds (a
    collective: every process of a multi-process run calls it at the same point)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
