"""Phase 1: diagonal Fisher information from per-sample gradients, reduced to groups."""

from fisherjax.fisher.accumulate import (
    EMAState,
    WelfordState,
    ema_init,
    ema_update,
    ema_value,
    welford_batch,
    welford_init,
    welford_interval,
    welford_merge,
    welford_stderr,
    welford_update,
    welford_variance,
)
from fisherjax.fisher.options import CollectOptions
from fisherjax.fisher.state import GroupFisher, PartialDiagonal, SampleGrads, TaskFisher, sample_grads_of

__all__ = [
    "CollectOptions",
    "EMAState",
    "GroupFisher",
    "PartialDiagonal",
    "SampleGrads",
    "TaskFisher",
    "WelfordState",
    "ema_init",
    "ema_update",
    "ema_value",
    "sample_grads_of",
    "welford_batch",
    "welford_init",
    "welford_interval",
    "welford_merge",
    "welford_stderr",
    "welford_update",
    "welford_variance",
]
