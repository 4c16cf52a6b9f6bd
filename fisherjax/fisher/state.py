"""What Phase 1 produces and every later phase reads: :class:`TaskFisher` and :class:`Contributions`.

Both are immutable data (host numpy arrays). Parameters are addressed by their flat path
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

import numpy as np

from fisherjax.fisher.accumulate import EMAState, WelfordState

GroupFisher = dict[str, dict[str, np.ndarray]]
"""``{param_path: {group_type: values}}``."""

HOST_ALIGNMENT = 64
"""Byte alignment of the per-sample host arrays: XLA:CPU uses a C-contiguous numpy array this
aligned in place (``jax.device_put(x, may_alias=True)``) instead of copying it, which on a CPU is
most of the cost of handing gigabytes of stored gradients to a jitted kernel."""


def host_empty(shape: Sequence[int], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a :data:`HOST_ALIGNMENT` boundary
    (numpy's allocator guarantees only 16 bytes)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + HOST_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % HOST_ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def host_concatenate(parts: Sequence[np.ndarray]) -> np.ndarray:
    """``np.concatenate(parts, axis=0)`` into a :func:`host_empty` array."""
    out = host_empty((sum(len(x) for x in parts), *parts[0].shape[1:]), np.result_type(*parts))
    return np.concatenate(parts, axis=0, out=out)


def host_take(x: np.ndarray, index) -> np.ndarray:
    """``x[index]`` along the first axis (an int array or a slice) into a :func:`host_empty` array."""
    rows = np.arange(len(x))[index]
    return np.take(x, rows, axis=0, out=host_empty((len(rows), *x.shape[1:]), x.dtype))


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


def _mean_of_weighted_squares(g: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``mean_i w_i · g_i²`` over the leading axis, in float32, with one sample-sized scratch buffer."""
    total = np.zeros(g.shape[1:], np.float32)
    scratch = np.empty_like(total)
    for row, weight in zip(g, weights):
        np.square(row, out=scratch, dtype=np.float32)
        scratch *= weight
        total += scratch
    return total / max(len(g), 1)


@dataclasses.dataclass(frozen=True)
class Contributions:
    """Per-sample contributions and signed gradients for selected parameters.

    Attributes:
      sample_ids: ``[n]`` the task's sample ids (file line numbers), in stored order.
      tokens: ``[n]`` active tokens ``T_i`` of each sample.
      contributions: ``{path: [n, *param_shape]}`` with ``C_i = g_i² / T_i``. Pass ``None`` to
        derive them from ``grads`` on access (:class:`DerivedContributions`), as the empirical
        Fisher does; true and per-token Fisher store their own.
      grads: ``{path: [n, *param_shape]}`` signed token-sum gradients ``g_i``.
    """

    sample_ids: np.ndarray
    tokens: np.ndarray
    contributions: Mapping[str, np.ndarray] | None
    grads: Mapping[str, np.ndarray]

    @property
    def derived(self) -> bool:
        """Whether ``contributions`` are computed from ``grads`` rather than stored."""
        return isinstance(self.contributions, DerivedContributions)

    def __post_init__(self):
        if self.contributions is None:
            object.__setattr__(self, "contributions", DerivedContributions(self.grads, np.asarray(self.tokens)))
        n = len(self.sample_ids)
        # Derived contributions share the grads' shapes; reading them would compute every g²/T.
        trees = (("grads", self.grads),) + (() if self.derived else (("contributions", self.contributions),))
        for name, tree in trees:
            for path, value in tree.items():
                if value.shape[0] != n:
                    raise ValueError(f"{name}[{path!r}] has {value.shape[0]} samples, sample_ids has {n}")

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def paths(self) -> list[str]:
        return list(self.grads or self.contributions)

    def select(self, index) -> Contributions:
        """The samples at positions ``index`` (an int array or slice)."""
        return Contributions(
            self.sample_ids[index],
            self.tokens[index],
            None if self.derived else {p: host_take(v, index) for p, v in self.contributions.items()},
            {p: host_take(v, index) for p, v in self.grads.items()},
        )

    @classmethod
    def from_grads(cls, grads, tokens, sample_ids, *, dtype=np.float32) -> Contributions:
        """Build from signed per-sample gradients ``{path: [n, ...]}``: ``C_i = g_i² / T_i``.

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
        return cls(np.asarray(sample_ids)[keep], tokens[keep], contributions, {p: g.astype(dtype) for p, g in grads.items()})

    def fisher(self, paths: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Diagonal Fisher of the stored parameters (or of ``paths``) from these samples: mean of
        ``C_i`` (float32).

        Derived contributions are accumulated sample by sample (``Σ_i g_i² / T_i``) into one
        parameter-sized buffer, so no ``[n, ...]`` array of squares is ever allocated.
        """
        paths = list(self.contributions) if paths is None else paths
        if not self.derived:
            return {p: np.mean(self.contributions[p], axis=0, dtype=np.float32) for p in paths}
        inv_tokens = self.contributions.inv_tokens
        return {p: _mean_of_weighted_squares(self.grads[p], inv_tokens) for p in paths}


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
      contributions: per-sample ``C_i`` and ``g_i`` for selected parameters when requested.
      per_sample_groups: ``{path: {group_type: [n, ..]}}`` per-sample group values (for bootstrap
        intervals), with ``sample_ids`` giving their order, when kept.
      n_samples: samples that entered the Fisher; n_skipped: samples with ``T_i = 0``.
      n_tokens: total active tokens; total_loss: sum of the token-sum losses of the kept samples
        (``total_loss / n_tokens`` is the task's mean token loss).
      fisher_type: ``"empirical"``, ``"true"`` or ``"per_token"``; mode: ``"welford"`` or ``"ema"``.
    """

    task: str
    group_fisher: GroupFisher
    group_sizes: GroupFisher
    n_samples: int
    n_skipped: int = 0
    n_tokens: int = 0
    total_loss: float = 0.0
    welford: WelfordState | None = None
    ema: EMAState | None = None
    diagonal: Mapping[str, np.ndarray] | None = None
    contributions: Contributions | None = None
    per_sample_groups: GroupFisher | None = None
    sample_ids: np.ndarray | None = None
    fisher_type: str = "empirical"
    mode: str = "welford"

    @property
    def loss_per_token(self) -> float:
        return self.total_loss / max(self.n_tokens, 1)

    def keys(self) -> list[tuple[str, str]]:
        """All (param_path, group_type) pairs."""
        return [(p, g) for p, groups in self.group_fisher.items() for g in groups]

    def flat_groups(self) -> dict[str, np.ndarray]:
        """``{"task|param_path|group_type": values}`` — the layout of ``group_fisher.npz``."""
        return {f"{self.task}|{p}|{g}": np.asarray(v) for p, groups in self.group_fisher.items() for g, v in groups.items()}
