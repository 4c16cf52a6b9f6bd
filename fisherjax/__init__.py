"""fisherjax: where a language model stores a task, and where two tasks collide.

Per-sample gradients, diagonal Fisher information reduced to heads and channels, pruning masks
and their overlap, sample-level conflict forensics and QK-OV interference, as pure JAX functions.

The phases are importable from the top: ``fisherjax.collect`` (Phase 1), ``fisherjax.importance``
(2), ``fisherjax.masks`` (3), ``fisherjax.overlap`` (4), ``fisherjax.conflicts`` (5),
``fisherjax.qkov`` (6), ``fisherjax.natural`` (7), ``fisherjax.curvature`` (K-FAC, Lanczos,
block spectra and the Fisher method comparison), ``fisherjax.heads`` (behavioural head categories,
head-mask importance, single-head ablation), and ``fisherjax.data`` for task files.
``fisherjax.enable_compilation_cache()`` keeps XLA compilations in the user's cache directory
for the next session (the command line does it by default).
"""

from fisherjax import curvature, data, heads
from fisherjax.analysis import conflicts, importance, masks, natural, overlap, qkov
from fisherjax.compilation_cache import enable as enable_compilation_cache
from fisherjax.config import DecoderConfig
from fisherjax.errors import CheckpointError, ConfigError, DataError, FisherjaxError, NumericalError
from fisherjax.export import export_fisher, merge_checkpoints, prune_checkpoint, read_export
from fisherjax.fisher import CollectOptions, SampleGrads, TaskFisher
from fisherjax.fisher.collect import collect
from fisherjax.layout import ModelLayout, Role
from fisherjax.models import Model, load_pretrained, save_pretrained

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CollectOptions",
    "ConfigError",
    "DataError",
    "DecoderConfig",
    "FisherjaxError",
    "Model",
    "ModelLayout",
    "NumericalError",
    "Role",
    "SampleGrads",
    "TaskFisher",
    "collect",
    "conflicts",
    "curvature",
    "data",
    "enable_compilation_cache",
    "export_fisher",
    "heads",
    "importance",
    "load_pretrained",
    "masks",
    "merge_checkpoints",
    "natural",
    "overlap",
    "prune_checkpoint",
    "qkov",
    "read_export",
    "save_pretrained",
]
