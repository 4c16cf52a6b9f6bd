"""Saving and restoring Fisher state with orbax-checkpoint.

Two uses: the resumable state of a running :func:`~fisherjax.fisher.collect.collect` (saved every
N batches through an ``orbax.checkpoint.CheckpointManager``, which writes atomically and keeps the
last two steps), and a finished :class:`~fisherjax.fisher.state.TaskFisher` (pytree of numpy
arrays + JSON metadata). orbax does the file format, atomic renames and (on accelerators)
asynchronous device-to-disk copies for us.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from fisherjax.errors import CheckpointError
from fisherjax.fisher.accumulate import EMAState, WelfordState
from fisherjax.fisher.state import Contributions, TaskFisher


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def progress_manager(directory: str | Path):
    """A checkpoint manager for resumable collection (keeps the two most recent saves)."""
    ocp = _ocp()
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def _state_to_tree(state: dict) -> dict:
    out = {}
    for name, value in state.items():
        if isinstance(value, WelfordState):
            out[name] = {"count": np.asarray(value.count), "mean": _host(value.mean), "m2": _host(value.m2)}
        elif isinstance(value, EMAState):
            out[name] = {"count": np.asarray(value.count), "value": _host(value.value), "decay": np.asarray(value.decay)}
        else:
            raise TypeError(f"cannot checkpoint state entry {name!r} of type {type(value).__name__}")
    return out


def _tree_to_state(tree: dict, like: dict) -> dict:
    out = {}
    for name, template in like.items():
        t = tree[name]
        if isinstance(template, WelfordState):
            out[name] = WelfordState(t["count"], t["mean"], t["m2"])
        else:
            out[name] = EMAState(t["count"], t["value"], float(t["decay"]))
    return out


def _host(tree):
    import jax

    return jax.tree.map(np.asarray, tree)


def save_progress(manager, batches_done: int, state: dict, log) -> None:
    """Save the accumulation state and the host log after ``batches_done`` batches."""
    import jax

    ocp = _ocp()
    arrays = {"state": _state_to_tree(state)}
    if log.sample_ids:
        arrays["sample_ids"] = np.concatenate(log.sample_ids)
        arrays["tokens"] = np.concatenate(log.tokens)
    if log.groups:
        arrays["groups"] = jax.tree.map(lambda *xs: np.concatenate(xs), *log.groups)
    spilled = bool(log.kept) and isinstance(jax.tree.leaves(log.kept[0])[0], Path)
    if log.kept and not spilled:
        arrays["kept"] = jax.tree.map(lambda *xs: np.concatenate(xs), *log.kept)
    meta = {
        "batches_done": batches_done,
        "n_seen": log.n_seen,
        "n_skipped": log.n_skipped,
        "n_tokens": log.n_tokens,
        "total_loss": log.total_loss,
        "skipped_ids": list(log.skipped_ids),
        "kept_bytes": log.kept_bytes,
        "spilled": [jax.tree.map(str, k) for k in log.kept] if spilled else None,
    }
    manager.save(batches_done, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()


def restore_progress(manager, like_state: dict):
    """``(state, log, batches_done)`` from the latest save, or None when there is none."""
    import jax

    from fisherjax.fisher.collect import _Log

    ocp = _ocp()
    step = manager.latest_step()
    if step is None:
        return None
    try:
        restored = manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    except Exception as err:  # orbax raises several types for damaged directories
        raise CheckpointError(f"{manager.directory}: cannot restore collection state at step {step} ({err})") from None
    arrays, meta = restored["arrays"], restored["meta"]
    state = _tree_to_state(arrays["state"], like_state)
    kept = ()
    if meta.get("spilled"):
        kept = tuple(jax.tree.map(Path, k) for k in meta["spilled"])
    elif "kept" in arrays:
        kept = (arrays["kept"],)
    log = _Log(
        n_seen=meta["n_seen"],
        n_skipped=meta["n_skipped"],
        n_tokens=meta["n_tokens"],
        total_loss=meta["total_loss"],
        skipped_ids=tuple(meta["skipped_ids"]),
        sample_ids=(arrays["sample_ids"],) if "sample_ids" in arrays else (),
        tokens=(arrays["tokens"],) if "tokens" in arrays else (),
        groups=(arrays["groups"],) if "groups" in arrays else (),
        kept=kept,
        kept_bytes=meta["kept_bytes"],
    )
    return state, log, int(meta["batches_done"])


_ARRAY_FIELDS = ("group_fisher", "group_sizes", "diagonal", "per_sample_groups", "sample_ids")
_SCALAR_FIELDS = ("task", "n_samples", "n_skipped", "n_tokens", "total_loss", "fisher_type", "mode")


def save_task_fisher(fisher: TaskFisher, directory: str | Path) -> Path:
    """Write a TaskFisher as an orbax checkpoint (arrays) plus JSON metadata."""
    ocp = _ocp()
    directory = Path(directory).absolute()
    arrays = {f: getattr(fisher, f) for f in _ARRAY_FIELDS if getattr(fisher, f) is not None}
    if fisher.welford is not None:
        arrays["welford"] = {"count": np.asarray(fisher.welford.count), "mean": fisher.welford.mean, "m2": fisher.welford.m2}
    if fisher.ema is not None:
        arrays["ema"] = {"count": np.asarray(fisher.ema.count), "value": fisher.ema.value}
    if fisher.contributions is not None:
        c = fisher.contributions
        arrays["contributions"] = {
            "sample_ids": c.sample_ids,
            "tokens": c.tokens,
            "grads": {k: np.asarray(v) for k, v in c.grads.items()},
        }
        if not c.derived:
            arrays["contributions"]["contributions"] = {k: np.asarray(v) for k, v in c.contributions.items()}
    arrays = _host(arrays)
    meta = {f: getattr(fisher, f) for f in _SCALAR_FIELDS}
    meta["ema_decay"] = fisher.ema.decay if fisher.ema is not None else None
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        ckpt.save(directory, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)
    return directory


def load_task_fisher(directory: str | Path) -> TaskFisher:
    """Read a TaskFisher written by :func:`save_task_fisher`."""
    ocp = _ocp()
    directory = Path(directory).absolute()
    if not directory.exists():
        raise CheckpointError(f"{directory}: no saved Fisher state")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        restored = ckpt.restore(directory, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    arrays, meta = restored["arrays"], restored["meta"]
    fields = {f: arrays.get(f) for f in _ARRAY_FIELDS}
    fields.update({f: meta[f] for f in _SCALAR_FIELDS})
    if "welford" in arrays:
        w = arrays["welford"]
        fields["welford"] = WelfordState(w["count"], w["mean"], w["m2"])
    if "ema" in arrays:
        fields["ema"] = EMAState(arrays["ema"]["count"], arrays["ema"]["value"], meta["ema_decay"])
    if "contributions" in arrays:
        c = arrays["contributions"]
        fields["contributions"] = Contributions(c["sample_ids"], c["tokens"], c.get("contributions"), c["grads"])
    return TaskFisher(**fields)


def _fields():  # keeps the field lists honest against the dataclass
    names = {f.name for f in dataclasses.fields(TaskFisher)}
    covered = set(_ARRAY_FIELDS) | set(_SCALAR_FIELDS) | {"welford", "ema", "contributions"}
    assert names == covered, names ^ covered


_fields()
