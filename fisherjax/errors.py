"""Errors a user can act on.

Every problem caused by input (a checkpoint, a config, a data file, a token id) is raised as a
:class:`FisherjaxError` whose message names the file or value and the problem. The command line
turns these into one line on stderr and exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path


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


def one_line(text, limit: int | None = None) -> str:
    """A message (or an exception's text) on one line — whitespace runs, line breaks included,
    become one space — shortened to ``limit`` characters when given. Messages quote other
    libraries' errors, which may run over many lines; the command line prints one."""
    text = " ".join(str(text).split()) or (type(text).__name__ if isinstance(text, BaseException) else "")
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is XLA's report that an allocation failed (``RESOURCE_EXHAUSTED``: a device
    out of memory, or on a CPU a host allocation refused): a run too large for its machine at the
    options given, which the command line reports in one line rather than as a crash."""
    return type(err).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and "RESOURCE_EXHAUSTED" in str(err)


DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG})
"""``OSError`` numbers a user's disk causes: full, read-only, not permitted, over quota, file too large."""

_WHAT = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "a file grew beyond the allowed file size",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def disk_errno(err: BaseException) -> int | None:
    """The disk error number behind ``err``: an ``OSError``'s own, or the ``os_error_code`` that
    tensorstore (orbax's storage layer) writes into its messages; None when it is not one."""
    if isinstance(err, OSError):
        return err.errno if err.errno in DISK_ERRNOS else None
    found = re.search(r"os_error_code='?(\d+)", str(err))
    code = int(found.group(1)) if found else None
    return code if code in DISK_ERRNOS else None


def disk_error(err: BaseException, where: Path | str, what: str) -> FisherjaxError:
    """A one-line :class:`FisherjaxError` for a disk problem met while writing ``what`` at ``where``."""
    number = disk_errno(err)
    reason = _WHAT.get(number, getattr(err, "strerror", None) or "a write failed")
    return FisherjaxError(f"{where}: cannot write {what}: {reason}; nothing was kept, free space or choose another location")
