"""``fisherjax analyze --config FILE``: an :class:`~fisherjax.pipeline.AnalysisConfig` from a TOML
or JSON file, and back (``--print-config``).

The file holds AnalysisConfig's own field names (``batch_size = 8``, ``phases = ["fisher",
"heads"]``, ``tasks = [["math", "math.jsonl"]]``, ``head_thresholds = [["induction", 0.5]]``);
each value is checked against the field's declared type before the config's own range checks, and
every refusal names the file and the key. Relative paths in the file are relative to the file's
folder, so a config works from any working directory. ``tomllib`` (the standard library) reads TOML; what
``--print-config`` prints is JSON that ``--config`` reads back.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

from fisherjax.errors import ConfigError


def _number(value, integer: bool):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise TypeError("an integer" if integer else "a number")
    return int(value) if integer else float(value)


def _coerce(annotation: str, value: Any):
    """``value`` read from a file as the field annotated ``annotation`` (a string: the module
    uses ``from __future__ import annotations``)."""
    if value is None:
        if "None" in annotation:
            return None
        raise TypeError("a value, not null")
    if annotation.startswith("tuple[tuple["):
        inner = annotation[len("tuple[tuple["):].split("]")[0].split(",")
        if not isinstance(value, list) or not all(isinstance(v, list) and len(v) == len(inner) for v in value):
            raise TypeError(f"a list of [{', '.join(s.strip() for s in inner)}] pairs")
        return tuple(tuple(_coerce(t.strip(), x) for t, x in zip(inner, v, strict=True)) for v in value)
    if annotation.startswith("tuple["):
        if not isinstance(value, list):
            raise TypeError("a list")
        return tuple(_coerce(annotation[len("tuple["):].split(",")[0], v) for v in value)
    if annotation.startswith("Path"):
        if not isinstance(value, str):
            raise TypeError("a path string")
        return Path(value)
    if annotation.startswith("bool"):
        if not isinstance(value, bool):
            raise TypeError("true or false")
        return value
    if annotation.startswith("int"):
        return _number(value, integer=True)
    if annotation.startswith("float"):
        return _number(value, integer=False)
    if annotation.startswith("str"):
        if not isinstance(value, str):
            raise TypeError("a string")
        return value
    raise TypeError(f"a value of type {annotation}")


def read(path: Path, config_class) -> dict:
    """``{field: value}`` of a TOML (``.toml``) or JSON (any other suffix) file, each value coerced
    to its field's type; raises :class:`ConfigError` naming the file and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the --config file ({err.strerror or err})") from None
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'} ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a --config file holds a table of AnalysisConfig fields, not {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    out = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{path}: unknown key {key!r}; the keys are AnalysisConfig's fields ({', '.join(fields)})")
        try:
            out[key] = _coerce(str(fields[key].type), value)
        except TypeError as err:
            raise ConfigError(f"{path}: {key} must be {err}, got {value!r}") from None
    return {key: _relative_to(path.parent, v) for key, v in out.items()}


def _relative_to(folder: Path, value):
    if isinstance(value, Path):
        return value if value.is_absolute() else folder / value
    if isinstance(value, tuple):
        return tuple(_relative_to(folder, v) for v in value)
    return value


def dumps(config) -> str:
    """The config as JSON that :func:`read` takes back from anywhere: paths absolute (a relative
    one is relative to the working directory, as on the command line), tuples as lists."""

    def plain(value):
        if isinstance(value, Path):
            return str(value.absolute())
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return json.dumps({f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}, indent=2)
