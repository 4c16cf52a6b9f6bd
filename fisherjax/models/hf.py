"""Hugging Face checkpoints ↔ fisherjax parameters.

Loading follows the Flax checkpoint-loader pattern: the expected parameter shapes come from
``nnx.eval_shape`` of the decoder, each expected leaf is filled from ``safetensors`` (numpy,
memory-mapped) through one name table per family, and every problem — missing, unexpected,
mis-shaped or non-finite tensors, unreadable files — is collected and reported in one error that
names the file. PyTorch ``[out, in]`` Linear weights become Flax ``[in, out]`` kernels; GPT-2's
Conv1D weights already are ``[in, out]``. Block parameters are stacked over layers.

:func:`save_pretrained` writes the inverse mapping, so ``load → save → load`` is exact.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fisherjax.config import DecoderConfig, read_hf_config
from fisherjax.errors import CheckpointError, FisherjaxError
from fisherjax.layout import flatten, layout_for, unflatten
from fisherjax.models.decoder import Decoder
from fisherjax.models.model import Model


@dataclasses.dataclass(frozen=True)
class NameTable:
    """How one family names its tensors in Hugging Face checkpoints.

    ``top`` maps our top-level module to candidate HF module names (first is what we write);
    ``layers`` is the HF name of the layer list; ``transpose`` says whether dense weights are
    PyTorch Linear ``[out, in]`` (True) or Conv1D ``[in, out]`` (False); ``ignore`` lists buffers
    that old checkpoints carry and that are not parameters.
    """

    top: dict[str, tuple[str, ...]]
    layers: str
    transpose: bool
    ignore: tuple[str, ...] = ()


NAME_TABLES = {
    "gpt2": NameTable(
        top={
            "embed": ("transformer.wte", "wte"),
            "pos_embed": ("transformer.wpe", "wpe"),
            "final_norm": ("transformer.ln_f", "ln_f"),
            "lm_head": ("lm_head",),
        },
        layers="transformer.h",
        transpose=False,
        ignore=(".attn.bias", ".attn.masked_bias"),
    ),
    "llama": NameTable(
        top={"embed": ("model.embed_tokens",), "final_norm": ("model.norm",), "lm_head": ("lm_head",)},
        layers="model.layers",
        transpose=True,
        ignore=(".rotary_emb.inv_freq",),
    ),
    "gpt_neox": NameTable(
        top={
            "embed": ("gpt_neox.embed_in",),
            "final_norm": ("gpt_neox.final_layer_norm",),
            "lm_head": ("embed_out", "lm_head"),
        },
        layers="gpt_neox.layers",
        transpose=True,
        ignore=(".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq"),
    ),
}

LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _hf_candidates(table: NameTable, path: str, layer: int | None) -> list[str]:
    """Candidate HF tensor names for one of our leaves (one layer of a stacked leaf)."""
    module, leaf = path.rsplit("/", 1)
    suffix = LEAF_NAMES[leaf]
    if layer is not None:
        inner = module.split("/", 1)[1].replace("/", ".")
        prefixes = [table.layers, table.layers.split(".", 1)[-1]] if "." in table.layers else [table.layers]
        return [f"{p}.{layer}.{inner}.{suffix}" for p in prefixes]
    return [f"{name}.{suffix}" for name in table.top[module]]


def _to_flax(table: NameTable, path: str, tensor: np.ndarray) -> np.ndarray:
    if path.endswith("/kernel") and table.transpose:
        return tensor.T
    return tensor


def _to_hf(table: NameTable, path: str, array: np.ndarray) -> np.ndarray:
    return _to_flax(table, path, array)  # a transpose is its own inverse


class _TensorSource:
    """Lazy access to every tensor of a checkpoint directory, across shards."""

    def __init__(self, directory: Path, allow_pickle: bool):
        from safetensors import safe_open

        self.directory = directory
        self.location: dict[str, Path] = {}
        self._handles = {}
        self._torch_state = None
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (directory / f).exists()]
            if missing:
                raise CheckpointError(f"{index}: names shard(s) that do not exist: {', '.join(missing)}")
        elif single.exists():
            files = [single.name]
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if files:
            for name in files:
                file = directory / name
                try:
                    handle = safe_open(str(file), framework="numpy")
                except Exception as err:  # safetensors raises its own error types for bad headers
                    raise CheckpointError(f"{file}: cannot read safetensors file ({err})") from None
                self._handles[file] = handle
                for key in handle.keys():
                    self.location[key] = file
            return
        bins = sorted(directory.glob("pytorch_model*.bin"))
        if not bins:
            raise CheckpointError(f"{directory}: no model.safetensors, sharded index or *.safetensors file found")
        if not allow_pickle:
            raise CheckpointError(
                f"{bins[0]}: pickle-based weights are refused (they can run arbitrary code); convert the "
                "checkpoint to safetensors or pass allow_pickle=True to load it with torch.load(weights_only=True)"
            )
        self._torch_state = {}
        for file in bins:
            try:
                import torch
            except ImportError:
                raise CheckpointError(f"{file}: reading .bin weights needs torch, which is not installed") from None
            state = torch.load(file, map_location="cpu", weights_only=True)
            for key, value in state.items():
                self._torch_state[key] = value.float().numpy() if value.is_floating_point() else value.numpy()
                self.location[key] = file

    def keys(self) -> Iterator[str]:
        return iter(self.location)

    def get(self, name: str) -> np.ndarray:
        if self._torch_state is not None:
            return self._torch_state[name]
        file = self.location[name]
        try:
            return self._handles[file].get_tensor(name)
        except Exception as err:
            raise CheckpointError(f"{file}: tensor {name!r} cannot be read, the file may be truncated ({err})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        if self._torch_state is not None:
            return tuple(self._torch_state[name].shape)
        return tuple(self._handles[self.location[name]].get_slice(name).get_shape())


def abstract_params(config: DecoderConfig) -> dict:
    """Parameter shapes of a decoder, without allocating it."""
    abstract = nnx.eval_shape(lambda: Decoder(config, nnx.Rngs(params=0)))
    return nnx.to_pure_dict(nnx.state(abstract))


def load_pretrained(
    path: str | Path,
    *,
    dtype=jnp.float32,
    allow_pickle: bool = False,
    load_tokenizer: bool = True,
) -> Model:
    """Load a Hugging Face checkpoint directory as a :class:`~fisherjax.models.model.Model`.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or a sharded
        ``model.safetensors.index.json``), and tokenizer files when present.
      dtype: parameter dtype (float32 by default, whatever the checkpoint stores).
      allow_pickle: accept ``pytorch_model.bin`` (loaded with ``torch.load(weights_only=True)``).
      load_tokenizer: also load the tokenizer when the directory has one.

    Raises:
      ConfigError: unknown architecture or unusable config.
      CheckpointError: missing, truncated, unexpected, mis-shaped or non-finite tensors.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    config, raw = read_hf_config(directory)
    table = NAME_TABLES[config.family]
    source = _TensorSource(directory, allow_pickle)
    expected = flatten(abstract_params(config))
    flat, hf_names, problems, used = {}, {}, [], set()

    for path_, abstract in expected.items():
        stacked = path_.startswith("layers/")
        layers = range(config.num_layers) if stacked else [None]
        pieces, names = [], []
        for layer in layers:
            candidates = _hf_candidates(table, path_, layer)
            name = next((c for c in candidates if c in source.location), None)
            if name is None:
                problems.append(f"missing tensor {candidates[0]} (for {path_})")
                continue
            used.add(name)
            names.append(name)
            want = abstract.shape[1:] if stacked else abstract.shape
            if _hf_shape(table, path_, source.shape(name)) != tuple(want):
                problems.append(f"tensor {name} has shape {source.shape(name)}, config implies {_hf_shape(table, path_, want)}")
                continue
            pieces.append(_to_flax(table, path_, source.get(name)))
        if len(pieces) == len(layers):
            value = np.stack(pieces) if stacked else pieces[0]
            flat[path_] = value
            hf_names[path_] = names
    if config.tie_word_embeddings:
        used.update(c for c in ("lm_head.weight",) if c in source.location)
    ignored = [k for k in source.keys() if k not in used and any(k.endswith(s) or s in k for s in table.ignore)]
    unexpected = sorted(set(source.keys()) - used - set(ignored))
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
        problems.append(f"tensors the config does not account for: {shown}")
    if problems:
        raise CheckpointError(f"{directory}: checkpoint and config.json disagree:\n  " + "\n  ".join(problems))

    nonfinite = [p for p, v in flat.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
    if nonfinite:
        raise CheckpointError(f"{directory}: NaN or inf in parameters: {', '.join(nonfinite)}")

    params = jax.tree.map(lambda v: jnp.asarray(v, dtype=dtype), unflatten(flat))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(config, nnx.Rngs(params=0))))
    tokenizer = _load_tokenizer(directory, config) if load_tokenizer else None
    return Model(
        config=config,
        params=params,
        layout=layout_for(config, params),
        graphdef=graphdef,
        tokenizer=tokenizer,
        hf_config=raw,
        source=str(directory),
        hf_names=hf_names,
    )


def _hf_shape(table: NameTable, path: str, flax_shape) -> tuple[int, ...]:
    return tuple(reversed(flax_shape)) if path.endswith("/kernel") and table.transpose else tuple(flax_shape)


def _load_tokenizer(directory: Path, config: DecoderConfig):
    if not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # transformers raises many types for broken tokenizer files
        raise CheckpointError(f"{directory}: tokenizer files present but unreadable ({err})") from None
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(
            f"{directory}: tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {config.vocab_size}"
        )
    return tokenizer


def to_hf_tensors(model: Model, params: dict | None = None) -> dict[str, np.ndarray]:
    """Our parameters as a ``{hf_name: array}`` dict in the checkpoint's own naming."""
    table = NAME_TABLES[model.config.family]
    flat = flatten(params if params is not None else model.params)
    out = {}
    for path_, value in flat.items():
        value = np.asarray(value)
        names = (model.hf_names or {}).get(path_)
        if path_.startswith("layers/"):
            names = names or [_hf_candidates(table, path_, i)[0] for i in range(value.shape[0])]
            for name, piece in zip(names, value):
                out[name] = np.ascontiguousarray(_to_hf(table, path_, piece))
        else:
            name = names[0] if names else _hf_candidates(table, path_, None)[0]
            out[name] = np.ascontiguousarray(_to_hf(table, path_, value))
    return out


def save_pretrained(model: Model, directory: str | Path, params: dict | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` (HF names) and tokenizer files to ``directory``."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model.hf_config is None:
        raise FisherjaxError("this model has no Hugging Face config to export (build it with hf_config=...)")
    (directory / "config.json").write_text(json.dumps(model.hf_config, indent=2, sort_keys=True))
    save_file(to_hf_tensors(model, params), str(directory / "model.safetensors"), metadata={"format": "pt"})
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(directory))
    elif model.source:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(model.source) / name).exists():
                shutil.copy(Path(model.source) / name, directory / name)
    return directory
