"""Saving and loading a finished :class:`~fisherjax.fisher.state.TaskFisher` with orbax-checkpoint.

The arrays go through orbax's standard pytree handler and the names and counts through its JSON
handler, in one composite checkpoint directory; orbax does the file format, atomic renames and
(on accelerators) asynchronous device-to-disk copies for us. The resumable state of a running
collection is :mod:`fisherjax.fisher.progress`'s.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from fisherjax.errors import CheckpointError, disk_errno, one_line
from fisherjax.fisher.accumulate import EMAState, WelfordState
from fisherjax.fisher.factored import FactoredGrads
from fisherjax.fisher.state import PartialDiagonal, SampleGrads, TaskFisher


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _checkpointer():
    """An orbax ``Checkpointer`` of the ``arrays`` + ``meta`` items. In a multi-process run the
    process that calls it writes or reads alone (it is its own primary host, no barrier with the
    others): the outputs are process 0's, which holds every sample after Phase 1."""
    ocp = _ocp()
    import jax

    if jax.process_count() == 1:
        return ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"process-{me}")
    handler = ocp.CompositeCheckpointHandler(
        composite_options=ocp.CompositeOptions(multiprocessing_options=alone),
        arrays=ocp.StandardCheckpointHandler(multiprocessing_options=alone),
        meta=ocp.JsonCheckpointHandler(multiprocessing_options=alone),
    )
    return ocp.Checkpointer(handler, multiprocessing_options=alone)


def _host(tree):
    import jax

    return jax.tree.map(np.asarray, tree)


_ARRAY_FIELDS = ("group_fisher", "group_sizes", "diagonal", "diagonal_variance", "per_sample_groups", "sample_ids", "losses", "tokens")
"""Saved when present; a field a save lacks (``losses`` and ``tokens`` before they existed) loads as None."""
_SCALAR_FIELDS = ("task", "n_samples", "n_skipped", "n_tokens", "total_loss", "fisher_type", "mode", "skipped_ids")


def save_task_fisher(fisher: TaskFisher, directory: str | Path) -> Path:
    """Write a TaskFisher as an orbax checkpoint (arrays) plus JSON metadata.

    A full or read-only disk raises ``OSError`` with its number (tensorstore reports it inside a
    ``ValueError``), whatever layer of orbax met it."""
    ocp = _ocp()
    directory = Path(directory).absolute()
    arrays = {f: getattr(fisher, f) for f in _ARRAY_FIELDS if getattr(fisher, f) is not None}
    if fisher.welford is not None:
        arrays["welford"] = {"count": np.asarray(fisher.welford.count), "mean": fisher.welford.mean, "m2": fisher.welford.m2}
    if fisher.ema is not None:
        arrays["ema"] = {"count": np.asarray(fisher.ema.count), "value": fisher.ema.value}
    if fisher.partial_diagonal is not None:
        arrays["partial_diagonal"] = {"sample_ids": fisher.partial_diagonal.sample_ids, "mean": dict(fisher.partial_diagonal.mean)}
    if fisher.sample_grads is not None:
        c = fisher.sample_grads
        arrays["sample_grads"] = {
            "sample_ids": c.sample_ids,
            "tokens": c.tokens,
            "grads": {k: np.asarray(v) for k, v in c.grads.items() if not isinstance(v, FactoredGrads)},
        }
        factors = {k: {"inputs": np.asarray(v.inputs), "deltas": np.asarray(v.deltas)} for k, v in c.grads.items() if isinstance(v, FactoredGrads)}
        if factors:  # saved as kept, never formed
            arrays["sample_grads"]["factors"] = factors
        if not c.derived:
            arrays["sample_grads"]["stored_contributions"] = {k: np.asarray(v) for k, v in c.stored_contributions.items()}
    arrays = _host(arrays)
    meta = {f: getattr(fisher, f) for f in _SCALAR_FIELDS}
    meta["skipped_ids"] = [int(i) for i in fisher.skipped_ids]
    meta["ema_decay"] = fisher.ema.decay if fisher.ema is not None else None
    try:
        with _checkpointer() as ckpt:
            ckpt.save(directory, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as err:  # tensorstore reports disk errors as ValueError with the OS error code
        number = disk_errno(err)
        if number:
            raise OSError(number, os.strerror(number), str(directory)) from None
        raise
    return directory


def load_task_fisher(directory: str | Path) -> TaskFisher:
    """Read a TaskFisher written by :func:`save_task_fisher`.

    Raises:
      CheckpointError: one line naming ``directory`` when it does not exist, is not a saved
        TaskFisher (no orbax ``arrays`` and ``meta`` items, or items that do not hold a TaskFisher's
        fields), or cannot be restored (damaged files).
    """
    ocp = _ocp()
    directory = Path(directory).absolute()
    if not directory.exists():
        raise CheckpointError(f"{directory}: no saved Fisher state")
    remedy = "pass a directory written by save_task_fisher (fisherjax analyze writes them to OUT/fisher_state/TASK)"
    if not all((directory / item).is_dir() for item in ("arrays", "meta")):
        raise CheckpointError(f"{directory}: not a saved Fisher state (no orbax 'arrays' and 'meta' items); {remedy}")

    def unusable(reason: str) -> CheckpointError:
        reason = one_line(reason, 200)
        return CheckpointError(f"{directory}: not a usable saved Fisher state ({reason}); {remedy}, or collect it again")

    try:
        with _checkpointer() as ckpt:
            restored = ckpt.restore(directory, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    except Exception as err:  # orbax, tensorstore and JSON errors of every kind for damaged or foreign files
        raise unusable(f"orbax cannot restore it: {type(err).__name__}: {err}") from None
    arrays, meta = restored["arrays"], restored["meta"]
    if not isinstance(arrays, dict) or not isinstance(meta, dict):
        raise unusable("its items are not a TaskFisher's arrays and metadata")
    missing = [f for f in ("group_fisher", "group_sizes") if not isinstance(arrays.get(f), dict)]
    missing += [f for f in ("task", "n_samples") if f not in meta]
    if missing:
        raise unusable(f"no {', '.join(missing)}")
    try:
        fields = {f: arrays.get(f) for f in _ARRAY_FIELDS}
        fields.update({f: meta[f] for f in _SCALAR_FIELDS if f in meta})
        fields["skipped_ids"] = tuple(int(i) for i in meta.get("skipped_ids", ()))
        if "welford" in arrays:
            w = arrays["welford"]
            fields["welford"] = WelfordState(w["count"], w["mean"], w["m2"])
        if "ema" in arrays:
            fields["ema"] = EMAState(arrays["ema"]["count"], arrays["ema"]["value"], meta["ema_decay"])
        if "partial_diagonal" in arrays:
            fields["partial_diagonal"] = PartialDiagonal(arrays["partial_diagonal"]["sample_ids"], arrays["partial_diagonal"]["mean"])
        if "sample_grads" in arrays:
            c = arrays["sample_grads"]
            grads = dict(c.get("grads") or {})
            grads.update({k: FactoredGrads(v["inputs"], v["deltas"]) for k, v in (c.get("factors") or {}).items()})
            grads = {k: grads[k] for k in sorted(grads)}
            fields["sample_grads"] = SampleGrads(c["sample_ids"], c["tokens"], grads, c.get("stored_contributions"))
        return TaskFisher(**fields)
    except (KeyError, TypeError, ValueError) as err:  # a field missing or of the wrong kind
        raise unusable(f"{type(err).__name__}: {err}") from None


def _fields():  # keeps the field lists honest against the dataclass
    names = {f.name for f in dataclasses.fields(TaskFisher)}
    covered = set(_ARRAY_FIELDS) | set(_SCALAR_FIELDS) | {"welford", "ema", "sample_grads", "partial_diagonal"}
    assert names == covered, names ^ covered


_fields()
