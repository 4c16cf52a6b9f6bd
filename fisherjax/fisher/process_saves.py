"""Each process's own collection saves in a multi-process run: ``directory/process-<k>/<step>/``.

In a ``jax.distributed`` run every process holds the same accumulation state but its own share
of the samples (their ids, losses, group values and kept gradients), so each process saves its
own. orbax's ``CheckpointManager`` is used on one process; on several it cannot take this
share — its numpy handler writes host arrays from process 0 only, and a host-local ``jax.Array``
is refused in a multi-process run — so here each process writes a step the way orbax does
(into a temporary folder renamed into place once complete, the last two steps kept), with
``np.savez`` for the arrays and JSON for the rest. The interface is the part of orbax's manager
that :mod:`fisherjax.fisher.progress` uses.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from fisherjax.layout import flatten, unflatten

SEP = "|"
"""Joins the keys of nested dicts into one ``.npz`` entry name (parameter paths hold ``/``)."""


class ProcessSaves:
    """Steps saved by this process alone under ``directory`` (keeps the newest ``max_to_keep``)."""

    def __init__(self, directory: Path, max_to_keep: int = 2):
        self.directory = Path(directory)
        self.max_to_keep = max_to_keep
        self.directory.mkdir(parents=True, exist_ok=True)

    def all_steps(self) -> list[int]:
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and (p / "meta.json").exists())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save_arrays(self, step: int, arrays: dict, meta: dict) -> None:
        """Write ``arrays`` (nested dicts of arrays) and ``meta`` (JSON) as ``step``, atomically.
        Dtypes numpy cannot name in a ``.npz`` (bfloat16) travel as their bits."""
        flat = {k: np.asarray(v) for k, v in flatten(arrays, SEP).items()}
        dtypes = {k: str(v.dtype) for k, v in flat.items() if v.dtype.kind == "V"}
        flat = {k: (v.view(f"u{v.dtype.itemsize}") if k in dtypes else v) for k, v in flat.items()}
        tmp = self.directory / f".{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        np.savez(tmp / "arrays.npz", **flat)
        (tmp / "meta.json").write_text(json.dumps({"meta": meta, "bits_of": dtypes}))
        shutil.rmtree(self.directory / str(step), ignore_errors=True)
        os.replace(tmp, self.directory / str(step))
        for old in self.all_steps()[: -self.max_to_keep]:
            shutil.rmtree(self.directory / str(old), ignore_errors=True)

    def restore_arrays(self, step: int) -> tuple[dict, dict]:
        """``(arrays, meta)`` of ``step``."""
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

        folder = self.directory / str(step)
        saved = json.loads((folder / "meta.json").read_text())
        with np.load(folder / "arrays.npz") as npz:
            flat = {k: npz[k] for k in npz.files}
        flat = {k: (v.view(np.dtype(saved["bits_of"][k])) if k in saved["bits_of"] else v) for k, v in flat.items()}
        return unflatten(flat, SEP), saved["meta"]

    def wait_until_finished(self) -> None:
        """Writes are synchronous."""

    def close(self) -> None:
        """Nothing is held open."""
