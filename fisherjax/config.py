"""One family-neutral description of a decoder, read from a Hugging Face ``config.json``.

The Flax modules never look at Hugging Face keys: :func:`from_hf_dict` maps each supported
``model_type`` onto :class:`DecoderConfig` once, with the fallbacks that real checkpoints need
(``rope_parameters`` first, then the older top-level ``rope_theta`` / ``rope_scaling`` /
``rotary_pct`` / ``rotary_emb_base`` keys). It is also where a user's ``config.json`` is checked:
the type and range of every field the family reads, in one pass, every problem listed in one
:class:`~fisherjax.errors.ConfigError` that names the file — so no bad value reaches a shape, a
division or the first forward pass.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from fisherjax.activations import ACTIVATIONS
from fisherjax.errors import ConfigError

FAMILIES = {
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gpt_neox": "gpt_neox",
}
"""Supported ``model_type`` values and the Flax family that implements each."""

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

SUPPORTED_ACTIVATIONS = tuple(sorted(ACTIVATIONS))
"""``hidden_act`` / ``activation_function`` values the decoders implement (the names of
:data:`fisherjax.activations.ACTIVATIONS`)."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding settings.

    ``rotary_dim`` is the number of leading head dimensions that rotate (GPT-NeoX rotates only
    ``partial_rotary_factor * head_dim``); ``scaling`` holds the extra keys of scaled variants
    (llama3 factors, yarn betas) as sorted ``(key, value)`` pairs so the config stays hashable.
    """

    theta: float
    rotary_dim: int
    rope_type: str = "default"
    scaling: tuple[tuple[str, Any], ...] = ()

    def inverse_frequencies(self) -> tuple[np.ndarray, float]:
        """Inverse frequencies ``[rotary_dim // 2]`` and the cos/sin scale, as Hugging Face computes them.

        default: ``θ^(-2i/d)``; linear: divided by ``factor``; llama3: low frequencies divided by
        ``factor`` with a smooth ramp between ``low_freq_factor`` and ``high_freq_factor``; yarn:
        a ramp between interpolated and extrapolated frequencies, with ``attention_factor``.
        Computed in float32 like the reference so logits agree to rounding.
        """
        dim = self.rotary_dim
        exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        base = np.float32(self.theta)
        inv_freq = (np.float32(1.0) / base**exponents).astype(np.float32)
        params = dict(self.scaling)
        if self.rope_type == "default":
            return inv_freq, 1.0
        if self.rope_type == "linear":
            return (inv_freq / np.float32(params["factor"])).astype(np.float32), 1.0
        if self.rope_type == "llama3":
            factor = params["factor"]
            low, high = params["low_freq_factor"], params["high_freq_factor"]
            old_len = params["original_max_position_embeddings"]
            low_wavelen, high_wavelen = old_len / low, old_len / high
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
        if self.rope_type == "yarn":
            return _yarn_frequencies(self.theta, dim, params)
        raise ConfigError(f"rope_type {self.rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")


def _yarn_frequencies(theta: float, dim: int, params: dict) -> tuple[np.ndarray, float]:
    """YaRN inverse frequencies and attention factor (Peng et al. 2023), as in transformers."""
    factor = params["factor"]
    original = params["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        if params.get("mscale") and params.get("mscale_all_dim"):
            attention_factor = mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    return inv_freq.astype(np.float32), float(attention_factor)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Everything the Flax decoders need, independent of the checkpoint's naming.

    Hashable, so it can be a static argument of ``jax.jit``. ``sliding_windows`` and
    ``attention_scales`` have one entry per layer (window 0 = full causal attention).
    """

    model_type: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    activation: str
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    rope: RopeConfig | None = None
    parallel_residual: bool = False
    sliding_windows: tuple[int, ...] = ()
    attention_scales: tuple[float, ...] = ()
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (0,) * self.num_layers)
        if not self.attention_scales:
            object.__setattr__(self, "attention_scales", (self.head_dim**-0.5,) * self.num_layers)
        if len(self.sliding_windows) != self.num_layers or len(self.attention_scales) != self.num_layers:
            raise ConfigError("sliding_windows and attention_scales need one entry per layer")

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head (``heads / kv_heads``)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> DecoderConfig:
        return dataclasses.replace(self, **changes)


def read_hf_config(path: str | Path) -> tuple[DecoderConfig, dict]:
    """Read and validate ``config.json`` of a checkpoint directory; returns (DecoderConfig, raw dict).

    Raises:
      ConfigError: one line naming the file: missing, unreadable, not UTF-8, not JSON, not a JSON
        object, or every problem :func:`from_hf_dict` finds in its fields.
    """
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise ConfigError(f"{file}: no config.json found (is this a Hugging Face checkpoint directory?)")
    try:
        data = file.read_bytes()
    except OSError as err:
        raise ConfigError(f"{file}: cannot read the file ({err.strerror or err}); check that it is a readable file") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{file}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "a config.json is JSON in UTF-8, re-save it as such"
        ) from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}: not valid JSON ({err}); fix the file") from None
    except RecursionError:
        raise ConfigError(f"{file}: not a usable JSON config (nested too deeply); fix the file") from None
    return from_hf_dict(raw, source=str(file)), raw


def from_hf_dict(raw: dict, source: str = "config") -> DecoderConfig:
    """Map a Hugging Face config dict onto :class:`DecoderConfig`, checking it in one pass.

    Every field the family reads is checked for its type and range (counts are positive
    integers, not floats or booleans; eps and rope numbers are finite and positive; flags are
    booleans; ``hidden_act`` and the rope type are supported ones; heads divide as the family
    needs; rope scaling has the keys its type needs), and every problem found is listed in one
    :class:`ConfigError` that starts with ``source``. Absent optional fields and JSON ``null`` take
    Hugging Face's defaults. Token ids outside ``[0, vocab_size)`` (old LLaMA configs write
    ``pad_token_id: -1``) are read as "none": they only pick the filler of padded positions.
    """
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: not a JSON object (it holds {_kind(raw)}); a config.json maps setting names to values, fix the file"
        )
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ConfigError(
            f"{source}: unknown architecture model_type={model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    fields = _Fields(raw)
    read = {"gpt2": _gpt2, "llama": _llama, "gpt_neox": _gpt_neox}[FAMILIES[model_type]]
    settings = read(fields, model_type)
    fields.check(source)
    try:
        return DecoderConfig(**settings)
    except ConfigError as err:  # a check of DecoderConfig itself that the fields above did not foresee
        raise ConfigError(f"{source}: {err}; fix the file") from None


def _kind(value) -> str:
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _show(value) -> str:
    """A value as the JSON the user wrote, shortened."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_REQUIRED = object()
MAX_COUNT = 2**31 - 1
"""Largest size or count a config may give: array dimensions are 32-bit."""
MAX_LAYERS = 2**16
"""Largest number of layers a config may give (per-layer settings are Python tuples)."""


class _Fields:
    """Typed reads of one config dict that collect every problem instead of stopping at the first.

    Each read returns a usable value even when the field is wrong (its default, or a harmless
    placeholder), so later fields and cross-checks can still be read; :meth:`check` then raises
    one error listing everything.
    """

    def __init__(self, raw: dict, prefix: str = "", parent: _Fields | None = None):
        self.raw, self.prefix = raw, prefix
        self.problems: list[str] = [] if parent is None else parent.problems
        self.bad: set[str] = set() if parent is None else parent.bad  # full names of the fields with a problem

    def nested(self, raw: dict, prefix: str) -> _Fields:
        """Reads of a sub-object (``rope_parameters``), reporting into the same list."""
        return _Fields(raw, prefix, self)

    def problem(self, text: str, key: str | None = None) -> None:
        self.problems.append(text)
        if key is not None:
            self.bad.add(self.prefix + key)

    def ok(self, *keys: str) -> bool:
        """Whether none of ``keys`` (full names, e.g. ``rope_parameters.factor``) had a problem, so a
        cross-check between them means something."""
        return not self.bad.intersection(keys)

    def check(self, source: str) -> None:
        if self.problems:
            many = f"{len(self.problems)} problems: " if len(self.problems) > 1 else ""
            raise ConfigError(f"{source}: {many}{'; '.join(self.problems)}; fix the file")

    def _get(self, key: str, default):
        """``(present, value)``: an absent key or JSON null gives the default (absent if required)."""
        value = self.raw.get(key)
        if value is None:
            if default is _REQUIRED:
                said = "is missing" if key not in self.raw else "must be set, got null"
                self.problem(f"{self.prefix}{key} {said}", key)
                return False, None
            return False, default
        return True, value

    def count(self, key: str, default=_REQUIRED, *, minimum: int = 1, maximum: int = MAX_COUNT) -> int:
        """An integer in ``[minimum, maximum]`` (a float or boolean is refused, as is ``2.0``); 1
        stands in for a wrong or missing one."""
        present, value = self._get(key, default)
        if not present:
            return 1 if value is None else value
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            what = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
            limit = f" ≤ {maximum}" if isinstance(value, int) and not isinstance(value, bool) and value > maximum else ""
            self.problem(f"{self.prefix}{key} must be {what}{limit}, got {_show(value)}", key)
            return 1
        return value

    def number(self, key: str, default=_REQUIRED, *, above: float = 0.0, at_most: float | None = None) -> float:
        """A finite number ``> above`` (and ``≤ at_most``); integers are accepted."""
        present, value = self._get(key, default)
        if not present:
            return 1.0 if value is None else float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value <= above or (at_most is not None and value > at_most):
            bound = f" in ({above:g}, {at_most:g}]" if at_most is not None else f" > {above:g}" if above > -math.inf else ""
            self.problem(f"{self.prefix}{key} must be a finite number{bound}, got {_show(value)}", key)
            return max(above, 0.0) + 1.0 if at_most is None else at_most
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        present, value = self._get(key, default)
        if present and not isinstance(value, bool):
            self.problem(f"{self.prefix}{key} must be true or false, got {_show(value)}", key)
            return default
        return value

    def choice(self, key: str, default: str, choices) -> str:
        present, value = self._get(key, default)
        if present and (not isinstance(value, str) or value not in choices):
            self.problem(f"{self.prefix}{key} {_show(value)} is not supported (supported: {', '.join(sorted(choices))})", key)
            return default
        return value

    def divides(self, big: tuple[str, int], small: tuple[str, int]) -> None:
        if self.ok(self.prefix + big[0], self.prefix + small[0]) and big[1] % small[1]:
            self.problem(f"{self.prefix}{big[0]}={big[1]} is not a multiple of {small[0]}={small[1]}", big[0])

    def token_ids(self, vocab_size: int) -> dict:
        """pad/bos/eos ids: an integer, a list of integers (the first counts), or null."""
        out = {}
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = self.raw.get(key)
            first = value[0] if isinstance(value, list) and value else (None if isinstance(value, list) else value)
            ok = value is None or (isinstance(value, list) and all(_is_int(v) for v in value)) or _is_int(value)
            if not ok:
                self.problem(f"{key} must be an integer, a list of integers or null, got {_show(value)}")
                first = None
            out[key] = first if first is not None and 0 <= first < vocab_size else None
        return out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _gpt2(f: _Fields, model_type: str) -> dict:
    if f.flag("add_cross_attention", False):
        f.problem("add_cross_attention=true: GPT-2 with cross-attention is part of an encoder-decoder, not a decoder LM")
    d, heads = f.count("n_embd"), f.count("n_head")
    layers = f.count("n_layer", maximum=MAX_LAYERS)
    f.divides(("n_embd", d), ("n_head", heads))
    head_dim = max(d // heads, 1)
    scale = head_dim**-0.5 if f.flag("scale_attn_weights", True) else 1.0
    if f.flag("scale_attn_by_inverse_layer_idx", False):
        scales = tuple(scale / (i + 1) for i in range(layers))
    else:
        scales = (scale,) * layers
    vocab = f.count("vocab_size")
    return dict(
        model_type="gpt2",
        family="gpt2",
        vocab_size=vocab,
        hidden_size=d,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=f.count("n_inner", 4 * d),
        max_position_embeddings=f.count("n_positions", 1024),
        norm_eps=f.number("layer_norm_epsilon", 1e-5),
        activation=f.choice("activation_function", "gelu_new", SUPPORTED_ACTIVATIONS),
        tie_word_embeddings=f.flag("tie_word_embeddings", True),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        attention_scales=scales,
        **f.token_ids(vocab),
    )


def rope_from_hf(raw: dict, head_dim: int, default_partial: float = 1.0, *, max_positions: int | None = None,
                 fields: _Fields | None = None) -> RopeConfig:
    """Rope settings from ``rope_parameters`` (transformers ≥ 5), else the older top-level keys
    (``rope_scaling``, ``rope_theta``, ``rotary_emb_base``, ``partial_rotary_factor``, ``rotary_pct``).

    Checked like every other field: a supported ``rope_type`` (``type`` in old configs), a
    ``rope_theta`` > 1, a ``partial_rotary_factor`` in (0, 1] that rotates an even number of
    dimensions, and the keys each scaled type needs (linear: ``factor``; llama3: ``factor``,
    ``low_freq_factor`` < ``high_freq_factor``; yarn: ``factor``, optional betas and attention
    factor), with ``original_max_position_embeddings`` defaulting to the top-level one, then to
    ``max_position_embeddings`` (``max_positions``), as transformers does. Problems go to
    ``fields`` when given, else they raise a :class:`ConfigError`.
    """
    own = fields is None
    f = _Fields(raw) if own else fields
    if max_positions is None:
        max_positions = f.count("max_position_embeddings", 2048)
    new, old = raw.get("rope_parameters"), raw.get("rope_scaling")
    for key, value in (("rope_parameters", new), ("rope_scaling", old)):
        if value is not None and not isinstance(value, dict):
            f.problem(f"{key} must be an object or null, got {_show(value)}")
    if isinstance(new, dict) and new:
        params, prefix = dict(new), "rope_parameters."
        nested = sorted(k for k, v in params.items() if isinstance(v, dict))
        if nested:
            f.problem(f"rope_parameters per layer type ({', '.join(nested)}) are not supported for {raw.get('model_type')}")
    else:
        params = dict(old) if isinstance(old, dict) else {}
        prefix = "rope_scaling." if params else ""
    top = f.nested(raw, "")
    here = f.nested(params, prefix)
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    rope_type = "default" if rope_type is None else rope_type
    if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES:
        f.problem(f"{prefix}rope_type {_show(rope_type)} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        rope_type = "default"
    if "rope_theta" in params:
        theta = here.number("rope_theta", 10000.0, above=1.0)
    elif raw.get("rope_theta") is not None:
        theta = top.number("rope_theta", 10000.0, above=1.0)
    else:
        theta = top.number("rotary_emb_base", 10000.0, above=1.0)
    params.pop("rope_theta", None)
    if "partial_rotary_factor" in params:
        partial = here.number("partial_rotary_factor", default_partial, at_most=1.0)
    elif raw.get("partial_rotary_factor") is not None:
        partial = top.number("partial_rotary_factor", default_partial, at_most=1.0)
    else:
        partial = top.number("rotary_pct", default_partial, at_most=1.0)
    params.pop("partial_rotary_factor", None)
    rotary_dim = int(head_dim * partial)
    partial_keys = ("head_dim", "hidden_size", "num_attention_heads", "n_embd", "n_head", "rope_parameters.partial_rotary_factor",
                    "rope_scaling.partial_rotary_factor", "partial_rotary_factor", "rotary_pct")
    if f.ok(*partial_keys) and (rotary_dim < 2 or rotary_dim % 2):
        f.problem(f"rotary dimension int(head_dim × partial_rotary_factor) = int({head_dim} × {partial:g}) = {rotary_dim} "
                  "must be a positive even number")
    if rope_type in ("linear", "llama3", "yarn"):
        here.number("factor")
    if rope_type in ("llama3", "yarn"):
        if "original_max_position_embeddings" not in params:
            params["original_max_position_embeddings"] = raw.get("original_max_position_embeddings") or max_positions
        here.count("original_max_position_embeddings")
    if rope_type == "llama3":
        low, high = here.number("low_freq_factor"), here.number("high_freq_factor")
        if f.ok(f"{prefix}low_freq_factor", f"{prefix}high_freq_factor") and high <= low:
            f.problem(f"{prefix}high_freq_factor={high:g} must be greater than low_freq_factor={low:g}")
    if rope_type == "yarn":
        for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            here.number(key, 1.0, above=0.0 if key.startswith("beta") or key == "attention_factor" else -math.inf)
        here.flag("truncate", True)
    if own:
        f.check("config")
    scaling = tuple(sorted((k, v) for k, v in params.items() if not isinstance(v, (list, dict))))
    return RopeConfig(theta=theta, rotary_dim=max(rotary_dim, 2), rope_type=rope_type, scaling=scaling)


def _llama(f: _Fields, model_type: str) -> dict:
    d, heads = f.count("hidden_size"), f.count("num_attention_heads")
    layers = f.count("num_hidden_layers", maximum=MAX_LAYERS)
    kv_heads = f.count("num_key_value_heads", heads)
    f.divides(("num_attention_heads", heads), ("num_key_value_heads", kv_heads))
    if f.raw.get("head_dim") is None and f.ok("hidden_size", "num_attention_heads") and d < heads:
        f.problem(f"hidden_size={d} is smaller than num_attention_heads={heads} (head_dim would be 0)")
    head_dim = f.count("head_dim", max(d // heads, 1))
    if model_type == "qwen2":
        qkv_bias, o_bias, mlp_bias = True, False, False
        window = f.count("sliding_window", 0, minimum=0) if f.flag("use_sliding_window", False) else 0
        max_window_layers = f.count("max_window_layers", 28, minimum=0)
        types = _layer_types(f, layers) or [
            "sliding_attention" if f.raw.get("sliding_window") is not None and window and i >= max_window_layers
            else "full_attention"
            for i in range(layers)
        ]
        windows = tuple(window if t == "sliding_attention" else 0 for t in types)
    elif model_type == "mistral":
        qkv_bias = o_bias = mlp_bias = False
        # transformers' MistralConfig: an absent sliding_window means 4096, null means none
        window = 0 if "sliding_window" in f.raw and f.raw["sliding_window"] is None else f.count("sliding_window", 4096, minimum=0)
        windows = (window,) * layers
    else:
        bias = f.flag("attention_bias", False)
        qkv_bias, o_bias, mlp_bias = bias, bias, f.flag("mlp_bias", False)
        windows = (0,) * layers
    vocab = f.count("vocab_size")
    max_positions = f.count("max_position_embeddings", 2048)
    return dict(
        model_type=model_type,
        family="llama",
        vocab_size=vocab,
        hidden_size=d,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=f.count("intermediate_size"),
        max_position_embeddings=max_positions,
        norm_eps=f.number("rms_norm_eps", 1e-6),
        activation=f.choice("hidden_act", "silu", SUPPORTED_ACTIVATIONS),
        tie_word_embeddings=f.flag("tie_word_embeddings", False),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        rope=rope_from_hf(f.raw, head_dim, max_positions=max_positions, fields=f),
        sliding_windows=windows,
        **f.token_ids(vocab),
    )


LAYER_TYPES = ("full_attention", "sliding_attention")


def _layer_types(f: _Fields, layers: int) -> list[str] | None:
    """Qwen2's ``layer_types`` (one of :data:`LAYER_TYPES` per layer), or None when absent."""
    value = f.raw.get("layer_types")
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != layers or any(t not in LAYER_TYPES for t in value):
        f.problem(f"layer_types must be a list of {layers} entries, each one of {', '.join(LAYER_TYPES)}, got {_show(value)}")
        return ["full_attention"] * layers
    return value


def _gpt_neox(f: _Fields, model_type: str) -> dict:
    d, heads = f.count("hidden_size"), f.count("num_attention_heads")
    layers = f.count("num_hidden_layers", maximum=MAX_LAYERS)
    f.divides(("hidden_size", d), ("num_attention_heads", heads))
    head_dim = max(d // heads, 1)
    bias = f.flag("attention_bias", True)
    vocab = f.count("vocab_size")
    max_positions = f.count("max_position_embeddings", 2048)
    return dict(
        model_type="gpt_neox",
        family="gpt_neox",
        vocab_size=vocab,
        hidden_size=d,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=f.count("intermediate_size", 4 * d),
        max_position_embeddings=max_positions,
        norm_eps=f.number("layer_norm_eps", 1e-5),
        activation=f.choice("hidden_act", "gelu", SUPPORTED_ACTIVATIONS),
        tie_word_embeddings=f.flag("tie_word_embeddings", False),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=True,
        rope=rope_from_hf(f.raw, head_dim, default_partial=0.25, max_positions=max_positions, fields=f),
        parallel_residual=f.flag("use_parallel_residual", True),
        **f.token_ids(vocab),
    )
