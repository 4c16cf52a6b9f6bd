"""fisherjax: where a language model stores a task, and where two tasks collide.

Per-sample gradients, diagonal Fisher information reduced to heads and channels, pruning masks
and their overlap, sample-level conflict forensics and QK-OV interference, as pure JAX functions.
"""

from fisherjax.config import DecoderConfig
from fisherjax.errors import CheckpointError, ConfigError, DataError, FisherjaxError, NumericalError
from fisherjax.fisher import CollectOptions, SampleGrads, TaskFisher
from fisherjax.fisher.collect import collect
from fisherjax.layout import ModelLayout, Role
from fisherjax.models import Model, load_pretrained, save_pretrained
from fisherjax.analysis import conflicts, qkov  # DESIGN.md promises fisherjax.qkov and fisherjax.conflicts

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CollectOptions",
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
    "load_pretrained",
    "qkov",
    "save_pretrained",
]
