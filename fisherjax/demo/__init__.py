"""The shipped demo: a small Llama-family model (grouped-query attention) trained by
``scripts/train_demo.py`` on two synthetic tasks that need different circuits — ``math``
(addition written as text) and ``copy`` (a segment repeated after ``|``, solved by induction
heads) — with 128 held-out samples of each task.

The checkpoint is a Hugging Face directory (``config.json``, ``model.safetensors``, character
tokenizer) plus ``metrics.json``, the numbers the training script measured on the shipped task
files; ``TRAINING.md`` tells how it was made.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np

from fisherjax.data import Task, batches, load_task
from fisherjax.errors import DataError
from fisherjax.grads import forward_scores

if TYPE_CHECKING:
    from fisherjax.models import Model

TASK_NAMES = ("math", "copy")
EVAL_BUCKETS = (16, 32, 64)

PROBE_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
"""The demo's heads are probed on the letters ``copy`` is made of: a toy model trained on a
narrow alphabet runs its mechanisms there (on digits its induction head sees arithmetic)."""

PROBE_LENGTH = 16
"""Probe segments as long as the longest copy segment (``tasks.COPY_LENGTHS``), the positions the
model was trained on."""
_HERE = Path(__file__).resolve().parent


def checkpoint_dir() -> Path:
    """Directory of the shipped Hugging Face checkpoint."""
    return _HERE / "checkpoint"


def task_files() -> dict[str, Path]:
    """``{"math": path, "copy": path}``: the shipped held-out jsonl task files."""
    return {name: _HERE / "tasks" / f"{name}.jsonl" for name in TASK_NAMES}


def load() -> Model:
    """The shipped model (``fisherjax.load_pretrained`` of :func:`checkpoint_dir`), with its tokenizer."""
    from fisherjax.models import load_pretrained

    return load_pretrained(checkpoint_dir())


def load_tasks(tokenizer) -> dict[str, Task]:
    """Both shipped task files as :class:`~fisherjax.data.Task` (``fisherjax.data.load_task``)."""
    return {name: load_task(path, tokenizer, name=name) for name, path in task_files().items()}


def probe_settings(model: Model) -> dict:
    """``{"tokens", "length"}`` for :func:`fisherjax.heads.categorise` on the demo model:
    :data:`PROBE_ALPHABET`'s token ids and :data:`PROBE_LENGTH`."""
    ids = model.tokenizer(list(PROBE_ALPHABET), add_special_tokens=False)["input_ids"]
    return {"tokens": np.asarray(ids).ravel(), "length": PROBE_LENGTH}


def recorded_metrics() -> dict:
    """``metrics.json`` of the shipped checkpoint: training loss and per-task accuracy and loss."""
    return json.loads((checkpoint_dir() / "metrics.json").read_text())


@jax.jit(static_argnums=0)
def _score_batch(model, params, input_ids, attention_mask, labels):
    return forward_scores(model, params, input_ids, attention_mask, labels)


def evaluate(model: Model, params: dict, task: Task | str, batch_size: int = 64) -> dict[str, float]:
    """Exact-match accuracy and loss of ``model`` on a task's completions, teacher-forced.

    Args:
      model: a :class:`~fisherjax.models.Model` (its tokenizer is used when ``task`` is a name).
      params: its parameters.
      task: a :class:`~fisherjax.data.Task`, or ``"math"`` / ``"copy"`` for a shipped task file.
      batch_size: samples per jitted forward pass (batches padded to a few bucket lengths).

    Returns:
      ``{"accuracy": mean_i exact_i, "loss_per_token": Σ_i nll_i / Σ_i T_i,
      "token_accuracy": Σ_i correct_i / Σ_i T_i, "num_samples": n}`` (see :func:`fisherjax.grads.completion_scores`).
    """
    if isinstance(task, str):
        if task not in TASK_NAMES:
            raise DataError(f"unknown demo task {task!r} (known: {', '.join(TASK_NAMES)})")
        if model.tokenizer is None:
            raise DataError("the model has no tokenizer to encode the demo task file with")
        task = load_task(task_files()[task], model.tokenizer, name=task)
    totals = np.zeros(4)
    real_rows = 0
    for batch in batches(task, batch_size, buckets=EVAL_BUCKETS, vocab_size=model.config.vocab_size):
        real = batch.sample_ids >= 0
        scores = _score_batch(model, params, batch.input_ids, batch.attention_mask, batch.labels)
        totals += [float(np.asarray(s)[real].sum()) for s in scores]
        real_rows += int(real.sum())
    exact, nll, correct, tokens = totals
    if tokens == 0:
        raise DataError(f"task {task.name!r} ({task.source}) has no completion tokens to score")
    return {
        "accuracy": float(exact / real_rows),
        "loss_per_token": float(nll / tokens),
        "token_accuracy": float(correct / tokens),
        "num_samples": real_rows,
    }
