"""What a Phase 1 collection is asked to compute: :class:`CollectOptions`, checked once.

The options are a frozen dataclass, like :class:`~fisherjax.analysis.qkov.ScoreOptions` and
:class:`~fisherjax.analysis.conflicts.ConflictOptions`: :func:`fisherjax.collect` takes one
(``options=``) and/or its fields as keywords, and the command line builds one from its flags.
Allowed values are listed in the tuples below and checked in ``__post_init__`` only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from fisherjax.errors import ConfigError
from fisherjax.settings import Options, check, check_choice

FISHER_TYPES = ("empirical", "true", "per_token")
MODES = ("welford", "ema")
GHOSTS = ("auto", "always", "never")
STORAGE_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}
SAMPLE_GRADS_FORMS = ("auto", "gradients", "factors")
"""How ``fisherjax analyze`` keeps the attention gradients (``AnalysisConfig.collect_options``)."""


@dataclasses.dataclass(frozen=True)
class CollectOptions(Options):
    """Options of :func:`fisherjax.collect`.

    Attributes:
      mode: ``"welford"`` (mean, variance, intervals) or ``"ema"`` (bias-corrected, ``ema_decay``).
      ema_decay: decay ``d`` of the EMA, in ``(0, 1)``.
      fisher_type: ``"empirical"`` (data labels), ``"true"`` (``true_samples`` labels drawn from the
        model at every predicted position) or ``"per_token"`` (each token's gradient squared).
      true_samples: draws per sample for ``"true"``.
      keep_sample_grads: keep per-sample signed gradients ``g_i`` (and, for the true and per-token
        Fisher, their own ``C_i``) in :attr:`TaskFisher.sample_grads` — ``True`` for the attention
        Q/K/V/O parameters, or a sequence of parameter paths. Phases 5 and 6 read them.
      sample_grads_factors: keep these kept dense kernels' gradients as their token factors
        ``(a, δ)`` instead (:mod:`fisherjax.fisher.factored`; read as
        :class:`~fisherjax.fisher.factored.FactoredGrads`): ``True`` for every kept dense kernel,
        or a sequence of kept kernel paths. Smaller when a sample's positions ``T < d_in·d_out /
        (d_in + d_out)``; empirical Fisher only (the others store their own contributions).
      sample_grads_dtype: their storage dtype (of the factors, with ``sample_grads_factors``):
        ``"float32"``, ``"bfloat16"`` or ``"float16"``.
      sample_grads_budget_bytes: host memory they may take; beyond it an error, or with
        ``spill_dir`` they are written to disk and returned memory-mapped.
      diagonal: also accumulate the full diagonal Fisher of every parameter.
      diagonal_variance: with ``diagonal``, also its per-element Welford variance across samples
        (:attr:`TaskFisher.diagonal_welford`, for intervals); off, only the mean is accumulated,
        which costs about half as much.
      ghost: ``"auto"`` chooses ghost norms per layer when cheaper; ``"always"`` / ``"never"`` force.
      keep_per_sample_groups: keep per-sample group values (for bootstrap intervals).
      remat: recompute each block in the backward pass (less memory, more time).
      sample_loop: per-sample work from the sites as a loop over (sample, layer) pieces instead of
        one vmap; ``None``: :func:`fisherjax.backend.sample_loop`. Same numbers either way.
      memory_budget_bytes: device memory one step may use for per-sample arrays, by
        :func:`fisherjax.fisher.step.micro_batch_size`'s estimate; larger batches run as
        micro-batches. None (the default): :func:`fisherjax.fisher.step.micro_batch`'s choice
        (2 GB by that estimate on a CPU; on an accelerator the largest micro-batch whose compiled
        step fits its free memory).
      checkpoint_every: with a checkpoint directory, save the state every this many batches.
    """

    mode: str = "welford"
    ema_decay: float = 0.99
    fisher_type: str = "empirical"
    true_samples: int = 1
    keep_sample_grads: bool | tuple[str, ...] = False
    sample_grads_factors: bool | tuple[str, ...] = False
    sample_grads_dtype: str = "float32"
    sample_grads_budget_bytes: float = 8e9
    diagonal: bool = False
    diagonal_variance: bool = False
    ghost: str = "auto"
    keep_per_sample_groups: bool = True
    remat: bool = False
    sample_loop: bool | None = None
    memory_budget_bytes: float | None = None
    checkpoint_every: int = 10

    def __post_init__(self):
        for name in ("keep_sample_grads", "sample_grads_factors"):
            if not isinstance(getattr(self, name), bool):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name, allowed in (
            ("mode", MODES),
            ("fisher_type", FISHER_TYPES),
            ("ghost", GHOSTS),
            ("sample_grads_dtype", tuple(STORAGE_DTYPES)),
        ):
            check_choice("collect", name, getattr(self, name), allowed)
        check(0.0 < self.ema_decay < 1.0, f"collect ema_decay must be in (0, 1), got {self.ema_decay}")
        check(not self.sample_grads_factors or self.fisher_type == "empirical",
              f"collect sample_grads_factors needs fisher_type='empirical' (the {self.fisher_type} Fisher stores its own "
              "per-sample contributions, which are not a product of factors); keep gradients instead")
        check(self.true_samples >= 1, f"collect true_samples must be ≥ 1, got {self.true_samples}")
        check(self.sample_grads_budget_bytes > 0, f"collect sample_grads_budget_bytes must be > 0, got {self.sample_grads_budget_bytes}")
        check(self.memory_budget_bytes is None or self.memory_budget_bytes > 0,
              f"collect memory_budget_bytes must be > 0 (or None: the backend's choice), got {self.memory_budget_bytes}")
        check(self.checkpoint_every >= 1, f"collect checkpoint_every must be ≥ 1, got {self.checkpoint_every}")



def kept_paths(layout, keep: bool | Sequence[str]) -> tuple[str, ...]:
    """The parameters whose per-sample gradients are kept: the attention Q/K/V/O kernels and
    q/k/v biases for ``True``, none for ``False``, else the given paths (checked)."""
    if keep is True:
        return tuple(attention_paths(layout))
    paths = tuple(keep or ())
    unknown = [p for p in paths if p not in layout.specs]
    if unknown:
        raise ConfigError(f"keep_sample_grads names parameters the model does not have: {unknown}")
    return paths


def factored_paths(layout, keep: Sequence[str], factors: bool | Sequence[str]) -> tuple[str, ...]:
    """The kept paths stored as token factors: the kept dense kernels for ``True``, none for
    ``False``, else the given paths (each must be a kept dense kernel)."""
    dense = [p for p in keep if layout.spec(p).kind == "kernel"]
    if factors is True:
        return tuple(dense)
    paths = tuple(factors or ())
    wrong = [p for p in paths if p not in dense]
    if wrong:
        raise ConfigError(f"sample_grads_factors names {wrong}, which are not kept dense kernels (kept: {list(keep)})")
    return paths


def attention_paths(layout) -> list[str]:
    """The attention parameters Phases 5 and 6 read: every leaf that feeds a (block, kind) of
    :meth:`~fisherjax.layout.ModelLayout.attention_blocks` (Q/K/V/O kernels and q/k/v biases)."""
    return sorted({p for block, kind in layout.attention_blocks() for p in layout.block_sources(block, kind)})
