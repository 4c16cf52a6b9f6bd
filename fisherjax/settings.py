"""Options dataclasses, the way every phase takes its settings.

Each phase has a frozen dataclass of options (:class:`~fisherjax.fisher.options.CollectOptions`,
:class:`~fisherjax.analysis.qkov.ScoreOptions` and ``KernelOptions``,
:class:`~fisherjax.analysis.conflicts.ConflictOptions`) that checks its values once, in
``__post_init__``, with :func:`check_choice` and :func:`check`; its entry point takes one
instance and/or keyword overrides of its fields (:func:`with_overrides`), as optax and flax
configs do. The command line builds the same objects, so a value is never checked twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TypeVar

from fisherjax.errors import ConfigError

T = TypeVar("T")

STATIC = {"static": True}
"""Dataclass field metadata marking a result type's field as pytree metadata rather than a leaf
(``jax.tree_util.register_dataclass``): names, units and other hashable labels."""


def check_choice(owner: str, name: str, value, allowed: Iterable) -> None:
    """Raise a :class:`ConfigError` naming ``owner.name`` unless ``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{owner} {name} must be one of {allowed}, got {value!r}")


def check(ok: bool, message: str) -> None:
    """Raise a :class:`ConfigError` with ``message`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def with_overrides(options: T, overrides: Mapping) -> T:
    """``dataclasses.replace(options, **overrides)``, naming unknown fields in a ConfigError."""
    known = {f.name for f in dataclasses.fields(options)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown {type(options).__name__} field(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(options, **overrides) if overrides else options


class Options:
    """Base of the option dataclasses: :meth:`replace` returns a copy with some fields changed."""

    def replace(self, **changes):
        """A copy with ``changes``; unknown names are a :class:`~fisherjax.errors.ConfigError`."""
        return with_overrides(self, changes)


def split_overrides(overrides: Mapping, *option_types: type) -> list[dict]:
    """Keyword overrides split by the options class whose field each names (first match wins);
    a name no class has is a ConfigError."""
    parts = [dict() for _ in option_types]
    for key, value in overrides.items():
        for part, kind in zip(parts, option_types):
            if key in {f.name for f in dataclasses.fields(kind)}:
                part[key] = value
                break
        else:
            names = ", ".join(t.__name__ for t in option_types)
            raise ConfigError(f"unknown option {key!r} (not a field of {names})")
    return parts
