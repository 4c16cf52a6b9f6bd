"""Errors a user can act on.

Every problem caused by input (a checkpoint, a config, a data file, a token id) is raised as a
:class:`FisherjaxError` whose message names the file or value and the problem. The command line
turns these into one line on stderr and exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class FisherjaxError(Exception):
    """Base class for errors caused by the user's input rather than by fisherjax."""


class ConfigError(FisherjaxError, ValueError):
    """A config or option fisherjax cannot use (unknown architecture, a value out of range); also a
    ``ValueError``, as Python code expects of a bad argument."""


class CheckpointError(FisherjaxError):
    """Weights that are missing, truncated, mis-shaped or disagree with their config."""


class DataError(FisherjaxError):
    """Task data that cannot be used: empty, malformed, or with token ids outside the vocabulary."""


class NumericalError(FisherjaxError):
    """NaN or inf in parameters, losses or gradients."""
