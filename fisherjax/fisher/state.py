"""What Phase 1 produces and every later phase reads: :class:`TaskFisher` and :class:`SampleGrads`.

Both are immutable data (host numpy arrays) registered as pytrees (``jax.tree_util.register_dataclass``):
``jax.tree.map`` reaches every array and ``jax.jit`` takes them; names, counts and the kind of
Fisher are static metadata. Parameters are addressed by their flat path
(``"layers/self_attn/q_proj/kernel"``, see :func:`fisherjax.layout.flatten`); layer-stacked
parameters keep their leading layer axis everywhere, so a per-head group value of a stacked
``q_proj`` kernel is ``[layer, heads]``.

Group types (``GroupFisher`` keys, second level):

* ``head``      — Q per query head, K/V per kv head, O per head along its input axis, q/k/v
  biases per head; a fused QKV leaf has ``head_q``, ``head_k``, ``head_v`` instead;
* ``channel``   — other dense kernels per output channel;
* ``neuron``    — MLP down/out kernels per input neuron (a second view of the same leaf);
* ``row``       — embeddings and the unembedding per vocabulary row (buckets of 1000 rows above
  50k rows);
* ``element``   — norms and other biases, one group per element.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import jax
import numpy as np

from fisherjax.backend import host_take
from fisherjax.errors import DataError
from fisherjax.fisher.accumulate import EMAState, WelfordState
from fisherjax.fisher.factored import FactoredGrads
from fisherjax.settings import STATIC


GroupFisher = dict[str, dict[str, np.ndarray]]
"""``{param_path: {group_type: values}}``."""


class DerivedContributions(Mapping):
    """``{path: C}`` computed on access from signed gradients: ``C_i = g_i² / T_i`` (float32).

    For the empirical Fisher the contributions are a function of the stored gradients, so they
    are never stored or transferred twice; each access computes one parameter's array.
    """

    def __init__(self, grads: Mapping[str, np.ndarray], tokens: np.ndarray):
        self._grads = grads
        self._inv_tokens = np.where(tokens > 0, 1.0 / np.maximum(tokens, 1), 0.0).astype(np.float32)

    def __getitem__(self, path: str) -> np.ndarray:
        g = np.asarray(self._grads[path], np.float32)
        return np.square(g) * self._inv_tokens.reshape((-1,) + (1,) * (g.ndim - 1))

    def __contains__(self, path: object) -> bool:  # Mapping's default would compute the array
        return path in self._grads

    @property
    def inv_tokens(self) -> np.ndarray:
        """``[n]`` float32 ``1 / T_i`` (0 where ``T_i = 0``)."""
        return self._inv_tokens

    def __iter__(self) -> Iterator[str]:
        return iter(self._grads)

    def __len__(self) -> int:
        return len(self._grads)


ROW_TRANSFORMS = {"identity": None, "abs": np.abs, "square": np.square, "sqrt": np.sqrt}
"""Elementwise ``f`` of a stored row that :func:`weighted_row_mean` averages."""


def weighted_row_mean(x: np.ndarray, weights: np.ndarray, rows: np.ndarray | None = None, transform: str = "square") -> np.ndarray:
    """``mean_i w_i · f(x_i)`` over the leading axis, or over the positions ``rows``, ``f`` a
    :data:`ROW_TRANSFORMS` entry, in float32, read row by row into one sample-sized scratch buffer
    (no ``[n, ...]`` temporary, no copy of the selected rows)."""
    total = np.zeros(x.shape[1:], np.float32)
    scratch = np.empty_like(total)
    rows = range(len(x)) if rows is None else rows
    f = ROW_TRANSFORMS[transform]
    for i in rows:
        if f is None:
            scratch[...] = x[i]
        else:
            f(x[i], out=scratch, dtype=np.float32)
        scratch *= weights[i]
        total += scratch
    return total / max(len(rows), 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleGrads:
    """Per-sample signed gradients, and their contributions, of selected parameters.

    Attributes:
      sample_ids: ``[n]`` the task's sample ids (file line numbers), in stored order.
      tokens: ``[n]`` active tokens ``T_i`` of each sample.
      grads: ``{path: [n, *param_shape]}`` signed token-sum gradients ``g_i``: arrays, or
        :class:`~fisherjax.fisher.factored.FactoredGrads` (kept as token factors, formed where read).
      stored_contributions: ``{path: [n, *param_shape]}`` contributions ``C_i`` when they are
        not a function of ``g_i`` (true and per-token Fisher average squares over several
        pullbacks); ``None`` for the empirical Fisher, whose ``C_i = g_i² / T_i`` is derived from
        ``grads`` on access (:attr:`contributions`), never stored or transferred twice.
    """

    sample_ids: np.ndarray
    tokens: np.ndarray
    grads: Mapping[str, np.ndarray]
    stored_contributions: Mapping[str, np.ndarray] | None = None

    def __post_init__(self):
        n = np.shape(self.sample_ids)[0] if hasattr(self.sample_ids, "shape") else None
        if n is None:  # a pytree transformation rebuilding the value with non-array leaves
            return
        # Derived contributions share the grads' shapes; reading them would compute every g²/T.
        trees = (("grads", self.grads),) + ((("stored_contributions", self.stored_contributions),) if not self.derived else ())
        for name, tree in trees:
            for path, value in tree.items():
                if hasattr(value, "shape") and value.shape[0] != n:
                    raise ValueError(f"{name}[{path!r}] has {value.shape[0]} samples, sample_ids has {n}")

    @property
    def derived(self) -> bool:
        """Whether the contributions are computed from ``grads`` rather than stored."""
        return self.stored_contributions is None

    @property
    def contributions(self) -> Mapping[str, np.ndarray]:
        """``{path: [n, *param_shape]}`` contributions ``C_i``: the stored ones, or
        :class:`DerivedContributions` (``g_i² / T_i``, one parameter computed per access)."""
        if self.stored_contributions is not None:
            return self.stored_contributions
        return DerivedContributions(self.grads, np.asarray(self.tokens))

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def paths(self) -> list[str]:
        return list(self.grads or self.contributions)

    def select(self, index) -> SampleGrads:
        """The samples at positions ``index`` (an int array or slice)."""
        stored = None if self.derived else {p: host_take(v, index) for p, v in self.stored_contributions.items()}
        grads = {p: v.take_rows(index) if isinstance(v, FactoredGrads) else host_take(v, index) for p, v in self.grads.items()}
        return SampleGrads(self.sample_ids[index], self.tokens[index], grads, stored)

    @classmethod
    def from_grads(cls, grads, tokens, sample_ids, *, dtype=np.float32) -> SampleGrads:
        """Build from signed per-sample gradients ``{path: [n, ...]}`` with the contributions
        ``C_i = g_i² / T_i`` stored (in ``dtype``, computed in float64).

        Samples with ``T_i = 0`` are dropped (they carry no contribution).
        """
        tokens = np.asarray(tokens)
        keep = tokens > 0
        grads = {p: np.asarray(g)[keep] for p, g in grads.items()}
        t = tokens[keep].astype(np.float64)
        contributions = {
            p: (np.square(g.astype(np.float64)) / t.reshape((-1,) + (1,) * (g.ndim - 1))).astype(dtype)
            for p, g in grads.items()
        }
        return cls(np.asarray(sample_ids)[keep], tokens[keep], {p: g.astype(dtype) for p, g in grads.items()}, contributions)

    def fisher(self, paths: Sequence[str] | None = None, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Diagonal Fisher of the stored parameters (or of ``paths``) from these samples (or from
        those at positions ``rows``, read in place): mean of ``C_i`` (float32).

        Derived contributions are accumulated sample by sample (``Σ_i g_i² / T_i``) into one
        parameter-sized buffer, so no ``[n, ...]`` array of squares is ever allocated.
        """
        if paths is None:
            paths = list(self.grads) if self.derived else list(self.stored_contributions)
        if not self.derived:
            if rows is None:
                return {p: np.mean(self.stored_contributions[p], axis=0, dtype=np.float32) for p in paths}
            return {p: weighted_row_mean(self.stored_contributions[p], np.ones(len(self)), rows, "identity") for p in paths}
        inv_tokens = self.contributions.inv_tokens
        return {p: g.weighted_square_mean(inv_tokens, rows) if isinstance(g := self.grads[p], FactoredGrads) else weighted_row_mean(g, inv_tokens, rows)
                for p in paths}


class PartialDiagonal(NamedTuple):
    """The full diagonal Fisher over a subset of a task's samples, ``mean_{i∈S} C_i``: what
    :func:`~fisherjax.fisher.collect.collect` records after the batches that hold the subset
    (``prefix_batches``), so a later step that needs that subset's Fisher — Phase 6's held-out
    test, its fit half — reads no sample for it."""

    sample_ids: np.ndarray
    """``[k]`` int64 ids of the samples of ``S`` (those with ``T_i ≥ 1``), in collection order."""
    mean: Mapping[str, np.ndarray]
    """``{path: param-shaped}`` float32 ``mean_{i∈S} C_i`` of the recorded paths."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TaskFisher:
    """Phase 1 result for one task.

    Attributes:
      task: task name.
      group_fisher: ``{path: {group_type: [.., groups]}}`` mean over samples of the per-sample
        group sums of ``C_i`` (square, then reduce; head additivity is exact).
      group_sizes: same keys, number of parameters in each group.
      welford: Welford state over the per-sample group values (same tree as ``group_fisher``)
        in ``welford`` mode; variance, standard errors and intervals come from it.
      ema: EMA state over the same values in ``ema`` mode (its bias-corrected value is
        ``group_fisher``).
      diagonal: ``{path: param-shaped}`` full diagonal Fisher ``Î = mean_i C_i`` when requested.
      diagonal_variance: ``{path: param-shaped}`` sample variance (ddof 1) of ``C_i`` per element, when
        collected with ``diagonal_variance=True`` (the standard error of ``Î`` is
        ``sqrt(diagonal_variance / n_samples)``).
      partial_diagonal: the diagonal over the samples of the first batches (:class:`PartialDiagonal`),
        when collected with ``prefix_batches``.
      sample_grads: per-sample ``g_i`` (and ``C_i``) of selected parameters when kept
        (:class:`SampleGrads`).
      per_sample_groups: ``{path: {group_type: [n, ..]}}`` per-sample group values (for bootstrap
        intervals), with ``sample_ids`` giving their order, when kept.
      sample_ids: ``[n]`` int64 ids of the samples that entered the Fisher, in collection order.
      losses: ``[n]`` float64 token-sum losses ``L_i = Σ_t −log p(y_{t+1} | x_≤t)`` of the data
        labels, aligned with ``sample_ids`` (``Σ_i losses_i = total_loss``); tokens: ``[n]`` int64
        ``T_i``, aligned likewise (``Σ_i tokens_i = n_tokens``). Always kept by
        :func:`~fisherjax.fisher.collect.collect` (16 bytes a sample); ``None`` in a TaskFisher
        built by hand or saved by an older fisherjax.
      n_samples: samples that entered the Fisher; n_skipped: samples with ``T_i = 0`` (no
        predicted token), whose ids are ``skipped_ids``.
      n_tokens: total active tokens; total_loss: sum of the token-sum losses of the kept samples
        (``total_loss / n_tokens`` is the task's mean token loss).
      fisher_type: ``"empirical"``, ``"true"`` or ``"per_token"``; mode: ``"welford"`` or ``"ema"``.

    Arrays are pytree leaves; ``task``, the counts, ``total_loss``, ``fisher_type`` and ``mode``
    are static metadata.
    """

    task: str = dataclasses.field(metadata=STATIC)
    group_fisher: GroupFisher
    group_sizes: GroupFisher
    n_samples: int = dataclasses.field(metadata=STATIC)
    n_skipped: int = dataclasses.field(default=0, metadata=STATIC)
    n_tokens: int = dataclasses.field(default=0, metadata=STATIC)
    total_loss: float = dataclasses.field(default=0.0, metadata=STATIC)
    welford: WelfordState | None = None
    ema: EMAState | None = None
    diagonal: Mapping[str, np.ndarray] | None = None
    diagonal_variance: Mapping[str, np.ndarray] | None = None
    sample_grads: SampleGrads | None = None
    per_sample_groups: GroupFisher | None = None
    sample_ids: np.ndarray | None = None
    losses: np.ndarray | None = None
    tokens: np.ndarray | None = None
    fisher_type: str = dataclasses.field(default="empirical", metadata=STATIC)
    mode: str = dataclasses.field(default="welford", metadata=STATIC)
    skipped_ids: tuple[int, ...] = dataclasses.field(default=(), metadata=STATIC)
    partial_diagonal: PartialDiagonal | None = None

    @property
    def loss_per_token(self) -> float:
        return self.total_loss / max(self.n_tokens, 1)

    def keys(self) -> list[tuple[str, str]]:
        """All (param_path, group_type) pairs."""
        return [(p, g) for p, groups in self.group_fisher.items() for g in groups]

    def flat_groups(self) -> dict[str, np.ndarray]:
        """``{"task|param_path|group_type": values}`` — the layout of ``group_fisher.npz``."""
        return {f"{self.task}|{p}|{g}": np.asarray(v) for p, groups in self.group_fisher.items() for g, v in groups.items()}


def sample_grads_of(task: TaskFisher | SampleGrads, name: str | None = None) -> tuple[SampleGrads, str]:
    """The per-sample arrays of a task and its name: the one adapter Phases 5 and 6 read tasks
    through.

    ``task``: a :class:`TaskFisher` with kept per-sample gradients (named by its ``task``
    unless ``name`` is given) or :class:`SampleGrads` (named ``name``, default ``"task"``).

    Raises:
      DataError: a TaskFisher collected without per-sample gradients.
    """
    if isinstance(task, TaskFisher):
        if task.sample_grads is None or not task.sample_grads.grads:
            raise DataError(
                f"task {task.task!r} has no stored per-sample gradients; collect it with keep_sample_grads=True "
                "(the attention parameters) or a list of parameter paths"
            )
        return task.sample_grads, name or task.task
    if isinstance(task, SampleGrads):
        return task, name or "task"
    raise TypeError(f"expected a TaskFisher or SampleGrads, got {type(task).__name__}")
