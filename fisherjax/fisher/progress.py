"""What a running collection keeps on the host, and how it survives being killed.

* :class:`CollectionLog`: the samples seen so far — ids, token counts and losses, per-sample
  group values and kept gradients — an immutable record that :meth:`~CollectionLog.add` extends
  batch by batch;
* :class:`Spill`: kept per-sample arrays written to disk batch by batch (``.npy``) and read back
  memory-mapped when they exceed their host-memory budget;
* :func:`progress_manager`, :func:`save_progress`, :func:`restore_progress`: the accumulation
  state and the log saved with an orbax ``CheckpointManager`` (atomic writes, the last two steps
  kept; in a multi-process run each process saves its own share,
  :mod:`fisherjax.fisher.process_saves`), so ``collect(..., resume=True)`` continues after the last save with bitwise-identical
  numbers on CPU;
* :class:`Fingerprint` and :class:`DataDigest`: what a checkpoint was made from — the task's
  name, the collection options, the parameters and every batch's sample ids and tokens — saved
  with it and checked on resume, so a checkpoint of another task, other data, other options or
  other weights is refused with what differs, never silently continued.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np

from fisherjax.data import Batch
from fisherjax.errors import CheckpointError, ConfigError, FisherjaxError
from fisherjax.fisher.accumulate import EMAState, SumState, WelfordState
from fisherjax.fisher.process_saves import ProcessSaves


@dataclasses.dataclass(frozen=True)
class CollectionLog:
    """Host-side record of the samples seen so far (immutable; :meth:`add` returns a new one).

    ``sample_ids``, ``tokens`` (``T_i``) and ``losses`` (token-sum ``L_i``, float64) are per-batch
    chunks of the kept samples (``T_i > 0``), aligned; ``losses`` is ``None`` once the log was
    restored from a checkpoint that did not record them (written by an older fisherjax).
    """

    n_seen: int = 0
    n_skipped: int = 0
    n_tokens: int = 0
    total_loss: float = 0.0
    skipped_ids: tuple[int, ...] = ()
    sample_ids: tuple[np.ndarray, ...] = ()
    tokens: tuple[np.ndarray, ...] = ()
    losses: tuple[np.ndarray, ...] | None = ()
    groups: tuple[dict, ...] = ()
    kept: tuple[dict, ...] = ()
    kept_bytes: int = 0

    def add(self, batch: Batch, tokens: np.ndarray, losses: np.ndarray, groups, kept, *, budget: float, spill, task: str) -> CollectionLog:
        """The log with one (micro-)batch's outputs added: samples with ``T_i > 0`` are kept, the
        others counted as skipped. Kept arrays beyond ``budget`` bytes go to ``spill`` or raise."""
        losses = np.asarray(losses, np.float64)
        real = batch.sample_ids >= 0
        active = real & (tokens > 0)
        idx = np.flatnonzero(active)
        skipped = tuple(int(i) for i in batch.sample_ids[real & (tokens == 0)])
        new_groups = self.groups
        if groups is not None:
            new_groups += (jax.tree.map(lambda v: _rows(v, idx), groups),)
        new_kept, kept_bytes = self.kept, self.kept_bytes
        if kept is not None:
            host = jax.tree.map(lambda v: _rows(v, idx), kept)
            kept_bytes += sum(v.nbytes for v in jax.tree.leaves(host))
            if spill is not None:
                host = spill.write(len(self.kept), host)
            elif kept_bytes > budget:
                raise FisherjaxError(
                    f"task {task!r}: kept per-sample gradients need more than {budget / 1e9:.3g} GB of host memory "
                    f"after {self.n_seen + len(idx)} samples; give a spill directory (spill_dir=..., --spill-dir) to "
                    "write them to disk, keep fewer parameters, or store them as bfloat16"
                )
            new_kept += (host,)
        return dataclasses.replace(
            self,
            n_seen=self.n_seen + len(idx),
            n_skipped=self.n_skipped + len(skipped),
            n_tokens=self.n_tokens + int(tokens[active].sum()),
            total_loss=self.total_loss + float(losses[active].sum()),
            skipped_ids=self.skipped_ids + skipped,
            sample_ids=self.sample_ids + (batch.sample_ids[idx],),
            tokens=self.tokens + (tokens[idx],),
            losses=None if self.losses is None else self.losses + (losses[idx],),
            groups=new_groups,
            kept=new_kept,
            kept_bytes=kept_bytes,
        )

    @property
    def spilled(self) -> bool:
        """Whether the kept arrays were written to disk (the log then holds their file names)."""
        return bool(self.kept) and isinstance(jax.tree.leaves(self.kept[0])[0], Path)


def _rows(values, idx: np.ndarray) -> np.ndarray:
    """``values[idx]`` on the host, without a copy when every row is kept."""
    values = np.asarray(values)
    return values if len(idx) == values.shape[0] and np.array_equal(idx, np.arange(len(idx))) else values[idx]


class Spill:
    """Writes kept per-sample arrays batch by batch as ``.npy`` files and reads them memory-mapped.

    ``.npy`` has no bfloat16: such arrays are written as their raw 16-bit words (``uint16``) and
    viewed back as bfloat16 when read, so a spilled array has the dtype it was kept in.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.dtypes: dict[str, np.dtype] = {}  # file name → dtype, for arrays .npy cannot describe
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"spill_dir {directory}: cannot create it ({err.strerror})") from err

    def write(self, index: int, host: dict) -> dict:
        """``{kind: {path: array}}`` of one batch written to disk; returns the same tree of file names."""
        out = {}
        for kind, tree in host.items():
            out[kind] = {}
            for path, value in tree.items():
                file = self.directory / f"{kind}.{path.replace('/', '.')}.{index:06d}.npy"
                np.save(file, self._storable(file, np.asarray(value)))
                out[kind][path] = file
        return out

    def _storable(self, file: Path, array: np.ndarray) -> np.ndarray:
        """``array``, or its raw words when ``.npy`` cannot store its dtype (ml_dtypes' bfloat16)."""
        if np.dtype(array.dtype).isbuiltin == 1:  # 2: a user-defined type such as bfloat16
            return array
        self.dtypes[file.name] = array.dtype
        return array.view(f"u{array.dtype.itemsize}")

    def concatenate(self, files: Sequence[Path], name: str) -> np.ndarray:
        """One memory-mapped array of all chunks, copied chunk by chunk (bounded memory); chunks
        of fewer positions (factors of shorter batches) are padded with zeros (:func:`joined_shape`)."""
        chunks = [np.load(f, mmap_mode="r") for f in files]
        dtype = self.dtypes.get(Path(files[0]).name)
        out = np.lib.format.open_memmap(self.directory / f"{name}.npy", mode="w+", dtype=chunks[0].dtype, shape=joined_shape(chunks))
        at = 0
        for c in chunks:  # a new file reads as zeros: the padding needs no writing
            at += put_rows(out, at, c)
        out.flush()
        for f in files:
            Path(f).unlink()
            self.dtypes.pop(Path(f).name, None)
        whole = np.load(self.directory / f"{name}.npy", mmap_mode="r")
        return whole if dtype is None else whole.view(dtype)


def join_padded(chunks: Sequence[np.ndarray]) -> np.ndarray:
    """``np.concatenate(chunks)`` along the first axis, shorter chunks zero-padded to :func:`joined_shape`."""
    shape = joined_shape(chunks)
    if all(c.shape[1:] == shape[1:] for c in chunks):
        return np.concatenate(chunks)
    out = np.zeros(shape, chunks[0].dtype)
    at = 0
    for c in chunks:
        at += put_rows(out, at, c)
    return out


def put_rows(out: np.ndarray, at: int, chunk: np.ndarray, *, zero_rest: bool = False) -> int:
    """Write ``chunk`` into rows ``at : at + len(chunk)`` of ``out``, at the start of every other
    axis (a chunk of fewer positions than ``out``); ``zero_rest``: zero the rest of those rows (an
    uninitialised ``out``). Returns the rows written."""
    rows = out[at : at + len(chunk)]
    if zero_rest and rows.shape[1:] != chunk.shape[1:]:
        rows[...] = 0
    rows[(Ellipsis, *(slice(0, n) for n in chunk.shape[1:]))] = chunk
    return len(chunk)


def joined_shape(chunks: Sequence[np.ndarray]) -> tuple[int, ...]:
    """The shape of chunks joined along their first axis: the sum of their rows, and the largest of
    each other axis (kept factors of batches of different lengths differ in their positions axis)."""
    return (sum(c.shape[0] for c in chunks), *(max(sizes) for sizes in zip(*(c.shape[1:] for c in chunks))))


# ---- what a checkpoint was made from ------------------------------------------------------------

_SAMPLED_VALUES = 1 << 16  # values per parameter leaf that enter its digest


def params_digest(params) -> str:
    """sha256 over every parameter leaf's path, shape, dtype and a strided sample of at most 2^16 of
    its values (every value of small leaves): changed weights change it, and a 7B model is
    fingerprinted without reading every byte."""
    digest = hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in leaves:
        array = np.asarray(leaf).reshape(-1)
        step = max(1, array.size // _SAMPLED_VALUES)
        digest.update(f"{jax.tree_util.keystr(path)}|{np.shape(leaf)}|{array.dtype}|".encode())
        digest.update(np.ascontiguousarray(array[::step]).tobytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What a collection computes from, besides its batches: the task name, the options that
    change its numbers (:class:`~fisherjax.fisher.options.CollectOptions` without
    ``checkpoint_every``) and the parameters (:func:`params_digest`)."""

    task: str
    options: Mapping
    params: str

    @classmethod
    def of(cls, task: str, options, params) -> Fingerprint:
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(options).items() if k != "checkpoint_every"}
        return cls(task, settings, params_digest(params))

    def as_json(self) -> dict:
        return {"task": self.task, "options": dict(self.options), "params": self.params}

    def differences(self, saved: Mapping) -> list[str]:
        """What differs from a saved fingerprint, in words (empty when nothing does)."""
        out = []
        if saved.get("task") != self.task:
            out.append(f"task {saved.get('task')!r} there, {self.task!r} here")
        saved_options = saved.get("options") or {}
        changed = sorted(k for k in set(saved_options) | set(self.options) if saved_options.get(k) != self.options.get(k))
        out += [f"option {k}={saved_options.get(k)!r} there, {self.options.get(k)!r} here" for k in changed]
        if saved.get("params") != self.params:
            out.append("different model parameters")
        return out


class DataDigest:
    """A running sha256 over the batches seen, in order: their shapes, sample ids, tokens, masks
    and labels (mutable, host-side bookkeeping of the driver loop)."""

    def __init__(self):
        self._hash = hashlib.sha256()
        self.batches = 0

    def update(self, batch: Batch) -> None:
        for array in (batch.sample_ids, batch.input_ids, batch.attention_mask, batch.labels):
            array = np.ascontiguousarray(array)
            self._hash.update(f"{array.shape}{array.dtype}".encode())
            self._hash.update(array.tobytes())
        self.batches += 1

    def hexdigest(self) -> str:
        return self._hash.copy().hexdigest()


# ---- resumable state (orbax) --------------------------------------------------------------------


def progress_manager(directory: str | Path):
    """A checkpoint manager for resumable collection (keeps the two most recent saves): orbax's
    on one process; in a multi-process run each process's own saves of its share of the samples
    (beside the global state) in ``directory/process-<index>``
    (:class:`~fisherjax.fisher.process_saves.ProcessSaves`, whose docstring says why)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if jax.process_count() > 1:
        return ProcessSaves(directory / f"process-{jax.process_index()}")
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, options=options)


def _state_to_tree(state: dict) -> dict:
    out = {}
    for name, value in state.items():
        if isinstance(value, WelfordState):
            out[name] = {"count": np.asarray(value.count), "mean": _host(value.mean), "m2": _host(value.m2)}
        elif isinstance(value, EMAState):
            out[name] = {"count": np.asarray(value.count), "value": _host(value.value), "decay": np.asarray(value.decay)}
        elif isinstance(value, SumState):
            out[name] = {"count": np.asarray(value.count), "total": _host(value.total)}
        else:
            raise TypeError(f"cannot checkpoint state entry {name!r} of type {type(value).__name__}")
    return out


def _tree_to_state(tree: dict, like: dict) -> dict:
    out = {}
    for name, template in like.items():
        t = tree[name]
        if isinstance(template, WelfordState):
            out[name] = WelfordState(t["count"], t["mean"], t["m2"])
        elif isinstance(template, SumState):
            out[name] = SumState(t["count"], t["total"])
        else:
            out[name] = EMAState(t["count"], t["value"], float(t["decay"]))
    return out


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def save_progress(manager, batches_done: int, state: dict, log: CollectionLog, *, fingerprint: Fingerprint, data: DataDigest,
                  batch_size: int) -> None:
    """Save the accumulation state and the host log after ``batches_done`` batches, with what they
    were made from (the fingerprint, the digest of those batches and the batch size)."""
    import orbax.checkpoint as ocp

    arrays = {"state": _state_to_tree(state)}
    if log.sample_ids:
        arrays["sample_ids"] = np.concatenate(log.sample_ids)
        arrays["tokens"] = np.concatenate(log.tokens)
        if log.losses is not None:
            arrays["losses"] = np.concatenate(log.losses)
    if log.groups:
        arrays["groups"] = jax.tree.map(lambda *xs: np.concatenate(xs), *log.groups)
    if log.kept and not log.spilled:
        arrays["kept"] = jax.tree.map(lambda *xs: join_padded(xs), *log.kept)
    meta = {
        "batches_done": batches_done,
        "n_seen": log.n_seen,
        "n_skipped": log.n_skipped,
        "n_tokens": log.n_tokens,
        "total_loss": log.total_loss,
        "skipped_ids": list(log.skipped_ids),
        "kept_bytes": log.kept_bytes,
        "spilled": [jax.tree.map(str, k) for k in log.kept] if log.spilled else None,
        "fingerprint": fingerprint.as_json(),
        "data": data.hexdigest(),
        "batch_size": batch_size,
    }
    if isinstance(manager, ProcessSaves):
        manager.save_arrays(batches_done, arrays, meta)
        return
    manager.save(batches_done, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()


def restore_progress(manager, like_state: dict, fingerprint: Fingerprint) -> tuple[dict, CollectionLog, int, dict] | None:
    """``(state, log, batches_done, meta)`` from the latest save, or None when there is none.

    Raises:
      CheckpointError: the save is damaged, or was made for another task, other options or other
        parameters (``fingerprint``; the message lists what differs).
    """
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return None
    try:
        if isinstance(manager, ProcessSaves):
            arrays, meta = manager.restore_arrays(step)
        else:
            restored = manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
            arrays, meta = restored["arrays"], restored["meta"]
    except Exception as err:  # orbax raises several types for damaged directories
        raise CheckpointError(f"{manager.directory}: cannot restore collection state at step {step} ({err})") from None
    if "fingerprint" not in meta:
        raise CheckpointError(f"{manager.directory}: the checkpoint records no fingerprint of what it holds (an older "
                              "fisherjax wrote it); remove it to collect again")
    differences = fingerprint.differences(meta["fingerprint"])
    if differences:
        raise CheckpointError(f"{manager.directory}: the checkpoint was made for another collection ({'; '.join(differences)}); "
                              "resume with the same task, options and model, or use another checkpoint directory")
    kept = ()
    if meta.get("spilled"):
        kept = tuple(jax.tree.map(Path, k) for k in meta["spilled"])
    elif "kept" in arrays:
        kept = (arrays["kept"],)
    log = CollectionLog(
        n_seen=meta["n_seen"],
        n_skipped=meta["n_skipped"],
        n_tokens=meta["n_tokens"],
        total_loss=meta["total_loss"],
        skipped_ids=tuple(meta["skipped_ids"]),
        sample_ids=(arrays["sample_ids"],) if "sample_ids" in arrays else (),
        tokens=(arrays["tokens"],) if "tokens" in arrays else (),
        # a save with samples but no losses was written by an older fisherjax: they stay unknown
        losses=(arrays["losses"],) if "losses" in arrays else (None if "sample_ids" in arrays else ()),
        groups=(arrays["groups"],) if "groups" in arrays else (),
        kept=kept,
        kept_bytes=meta["kept_bytes"],
    )
    return _tree_to_state(arrays["state"], like_state), log, int(meta["batches_done"]), meta
