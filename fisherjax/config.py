"""One family-neutral description of a decoder, read from a Hugging Face ``config.json``.

The Flax modules never look at Hugging Face keys: :func:`from_hf_dict` maps each supported
``model_type`` onto :class:`DecoderConfig` once, with the fallbacks that real checkpoints need
(``rope_parameters`` first, then the older top-level ``rope_theta`` / ``rope_scaling`` /
``rotary_pct`` / ``rotary_emb_base`` keys).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

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
        if self.num_heads % self.num_kv_heads:
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
    """Read ``config.json`` from a checkpoint directory; returns (DecoderConfig, raw dict)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise ConfigError(f"{file}: no config.json found (is this a Hugging Face checkpoint directory?)")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}: not valid JSON ({err})") from None
    return from_hf_dict(raw, source=str(file)), raw


def from_hf_dict(raw: dict, source: str = "config") -> DecoderConfig:
    """Map a Hugging Face config dict onto :class:`DecoderConfig`."""
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(
            f"{source}: unknown architecture model_type={model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    try:
        if FAMILIES[model_type] == "gpt2":
            return _gpt2(raw)
        if FAMILIES[model_type] == "llama":
            return _llama(raw, model_type)
        return _gpt_neox(raw)
    except KeyError as err:
        raise ConfigError(f"{source}: missing required key {err.args[0]!r} for model_type={model_type!r}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: invalid value ({err})") from None


def _token_ids(raw: dict) -> dict:
    def first(value):
        return value[0] if isinstance(value, list) and value else value

    return {
        "pad_token_id": first(raw.get("pad_token_id")),
        "bos_token_id": first(raw.get("bos_token_id")),
        "eos_token_id": first(raw.get("eos_token_id")),
    }


def _gpt2(raw: dict) -> DecoderConfig:
    if raw.get("add_cross_attention"):
        raise ConfigError("GPT-2 with cross-attention is an encoder-decoder part, not a decoder LM")
    d, heads, layers = raw["n_embd"], raw["n_head"], raw["n_layer"]
    if d % heads:
        raise ConfigError(f"n_embd={d} is not divisible by n_head={heads}")
    head_dim = d // heads
    scale = head_dim**-0.5 if raw.get("scale_attn_weights", True) else 1.0
    if raw.get("scale_attn_by_inverse_layer_idx", False):
        scales = tuple(scale / (i + 1) for i in range(layers))
    else:
        scales = (scale,) * layers
    return DecoderConfig(
        model_type="gpt2",
        family="gpt2",
        vocab_size=raw["vocab_size"],
        hidden_size=d,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=raw.get("n_inner") or 4 * d,
        max_position_embeddings=raw.get("n_positions", 1024),
        norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        activation=raw.get("activation_function", "gelu_new"),
        tie_word_embeddings=raw.get("tie_word_embeddings", True),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        attention_scales=scales,
        **_token_ids(raw),
    )


def rope_from_hf(raw: dict, head_dim: int, default_partial: float = 1.0) -> RopeConfig:
    """Rope settings from ``rope_parameters`` (transformers ≥ 5), else the older top-level keys."""
    params = dict(raw.get("rope_parameters") or {})
    if not params:
        params = dict(raw.get("rope_scaling") or {})
        params.setdefault("rope_theta", raw.get("rope_theta", raw.get("rotary_emb_base", 10000.0)))
        partial = raw.get("partial_rotary_factor", raw.get("rotary_pct", default_partial))
        params.setdefault("partial_rotary_factor", partial)
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    partial = params.pop("partial_rotary_factor", raw.get("partial_rotary_factor", default_partial))
    if rope_type in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings"))
    scaling = tuple(sorted((k, v) for k, v in params.items() if not isinstance(v, (list, dict))))
    return RopeConfig(theta=theta, rotary_dim=int(head_dim * partial), rope_type=rope_type, scaling=scaling)


def _llama(raw: dict, model_type: str) -> DecoderConfig:
    d, heads, layers = raw["hidden_size"], raw["num_attention_heads"], raw["num_hidden_layers"]
    kv_heads = raw.get("num_key_value_heads") or heads
    head_dim = raw.get("head_dim") or d // heads
    if model_type == "qwen2":
        qkv_bias, o_bias, mlp_bias = True, False, False
        window = raw.get("sliding_window") if raw.get("use_sliding_window", False) else None
        layer_types = raw.get("layer_types") or [
            "sliding_attention" if window is not None and i >= raw.get("max_window_layers", 28) else "full_attention"
            for i in range(layers)
        ]
        windows = tuple((window or 0) if t == "sliding_attention" else 0 for t in layer_types)
    elif model_type == "mistral":
        qkv_bias = o_bias = mlp_bias = False
        windows = (raw.get("sliding_window") or 0,) * layers
    else:
        bias = bool(raw.get("attention_bias", False))
        qkv_bias, o_bias, mlp_bias = bias, bias, bool(raw.get("mlp_bias", False))
        windows = (0,) * layers
    return DecoderConfig(
        model_type=model_type,
        family="llama",
        vocab_size=raw["vocab_size"],
        hidden_size=d,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=raw["intermediate_size"],
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        norm_eps=raw.get("rms_norm_eps", 1e-6),
        activation=raw.get("hidden_act", "silu"),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        rope=rope_from_hf(raw, head_dim),
        sliding_windows=windows,
        **_token_ids(raw),
    )


def _gpt_neox(raw: dict) -> DecoderConfig:
    d, heads, layers = raw["hidden_size"], raw["num_attention_heads"], raw["num_hidden_layers"]
    if d % heads:
        raise ConfigError(f"hidden_size={d} is not divisible by num_attention_heads={heads}")
    head_dim = d // heads
    bias = bool(raw.get("attention_bias", True))
    return DecoderConfig(
        model_type="gpt_neox",
        family="gpt_neox",
        vocab_size=raw["vocab_size"],
        hidden_size=d,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=raw.get("intermediate_size") or 4 * d,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        norm_eps=raw.get("layer_norm_eps", 1e-5),
        activation=raw.get("hidden_act", "gelu"),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=True,
        rope=rope_from_hf(raw, head_dim, default_partial=0.25),
        parallel_residual=raw.get("use_parallel_residual", True),
        **_token_ids(raw),
    )
