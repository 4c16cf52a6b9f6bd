"""Hugging Face checkpoints ↔ fisherjax parameters.

Loading follows the Flax checkpoint-loader pattern: the expected parameter shapes come from
``nnx.eval_shape`` of the decoder, each expected leaf is filled from ``safetensors`` (numpy,
memory-mapped) through one name table per family, and every problem — missing, unexpected,
mis-shaped or non-finite tensors, unreadable files — is collected and reported in one error that
names the file. PyTorch ``[out, in]`` Linear weights become Flax ``[in, out]`` kernels; GPT-2's
Conv1D weights already are ``[in, out]``. Block parameters are stacked over layers. Checkpoints of
transformers 4.x's Flax classes (``flax_model.msgpack``, sharded or not, and Flax-named
safetensors) are read through :mod:`fisherjax.models.flax_checkpoint`, which presents their
tensors under these same PyTorch names and orientations.

:func:`save_pretrained` writes the inverse mapping, so ``load → save → load`` is exact.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fisherjax.config import DecoderConfig, read_hf_config
from fisherjax.errors import CheckpointError, ConfigError, FisherjaxError, one_line
from fisherjax.layout import flatten, layout_for, unflatten
from fisherjax.models import flax_checkpoint
from fisherjax.models.model import Model, abstract_decoder


@dataclasses.dataclass(frozen=True)
class NameTable:
    """How one family names its tensors in Hugging Face checkpoints.

    ``top`` maps our top-level module to candidate HF module names (first is what we write);
    ``layers`` is the HF name of the layer list; ``transpose`` says whether dense weights are
    PyTorch Linear ``[out, in]`` (True) or Conv1D ``[in, out]`` (False; an untied ``lm_head`` is a
    Linear in every family); ``ignore`` lists buffers
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


def _transposed(table: NameTable, path: str) -> bool:
    """Whether our kernel ``path`` is stored transposed in HF (PyTorch) naming: every ``Linear``
    weight is ``[out, in]``; GPT-2's ``Conv1D`` blocks are ``[in, out]`` but its untied ``lm_head``
    is a ``Linear``."""
    return path.endswith("/kernel") and (table.transpose or path == "lm_head/kernel")


def _to_flax(table: NameTable, path: str, tensor: np.ndarray) -> np.ndarray:
    return tensor.T if _transposed(table, path) else tensor


def _to_hf(table: NameTable, path: str, array: np.ndarray) -> np.ndarray:
    return _to_flax(table, path, array)  # a transpose is its own inverse


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
"""Storage dtypes accepted for parameters (safetensors' names); each is cast to the requested
dtype. Integers, booleans, complex and float8 (whose meaning needs scales stored beside it) are
refused, naming the tensor: read as floats they would be silently wrong numbers."""

SHOWN = 5
"""Problems named in one error message before "and N more"."""


def _listed(items: list[str], shown: int = SHOWN, sep: str = "; ") -> str:
    """``a; b; c and N more``: the first ``shown`` items and how many were left out."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return sep.join(items[:shown]) + more


def _inside(directory: Path, file: Path) -> bool:
    """Whether ``file``, symlinks resolved, lies inside ``directory``.

    A Hugging Face hub snapshot (``…/snapshots/<revision>/``) keeps its files as links into the
    hub's ``blobs/`` folder beside it, so for such a directory that folder counts as inside.
    """
    roots = {directory.resolve()}
    for d in (directory.absolute(), directory.resolve()):
        if d.parent.name == "snapshots":
            roots.add((d.parent.parent / "blobs").resolve())
    target = file.resolve()
    return any(target.is_relative_to(root) for root in roots)


def _index_shards(index: Path, directory: Path, kind: str = "safetensors") -> list[str]:
    """The shard files a ``model.safetensors.index.json`` (or, ``kind="Flax msgpack"``, a
    ``flax_model.msgpack.index.json``) names, each checked to be a file inside the checkpoint directory."""
    try:
        raw = json.loads(index.read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{index}: not a readable {kind} index ({one_line(err, 200)}); fix or remove the file") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        got = "no weight_map" if not isinstance(raw, dict) or "weight_map" not in raw else f"weight_map={_show(weight_map)}"
        raise CheckpointError(
            f"{index}: not a valid {kind} index ({got}); it needs a non-empty object \"weight_map\" "
            "mapping tensor names to shard files — fix or remove the file"
        )
    bad = [f"{k!r}: {_show(v)}" for k, v in weight_map.items() if not isinstance(v, str) or not v or "\0" in v]
    if bad:
        raise CheckpointError(f"{index}: weight_map values must be shard file names, got {_listed(bad, 3, ', ')}; fix the file")
    files = sorted(set(weight_map.values()))
    outside = [f if str((directory / f).resolve()) == f else f"{f} (resolves to {(directory / f).resolve()})"
               for f in files if not _inside(directory, directory / f)]
    if outside:
        raise CheckpointError(
            f"{index}: names shard(s) outside the checkpoint directory: {_listed(outside, 3, ', ')}; every shard must be a "
            f"file inside {directory} — move it there and name it by its relative path"
        )
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(
            f"{index}: names shard(s) that do not exist: {_listed(missing, 3, ', ')}; restore them or fix the index"
        )
    return files


def _show(value) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None), list, dict)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _torch_error(file: Path, err: BaseException) -> str:
    """One line for a ``torch.load(weights_only=True)`` failure, without PyTorch's advice to
    retry with ``weights_only=False`` (which would run whatever the file holds)."""
    text = str(err)
    blocked = re.search(r"GLOBAL ([\w.]+)", text)
    if blocked:
        return (f"{file}: refused to unpickle: it asks to call {blocked.group(1)}, which plain weights never do "
                "(the file may be malicious; nothing in it was run); do not use it, or convert trusted weights to safetensors")
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(boilerplate)]
    if lines:
        reason = lines[0]
    elif isinstance(err, EOFError):
        reason = "empty or truncated file"
    else:
        reason = type(err).__name__
    return (f"{file}: cannot be read as PyTorch weights ({one_line(reason, 200)}); the file is corrupt or not a saved "
            "state dict — re-download it, or convert the checkpoint to safetensors")


class _TensorSource:
    """Lazy access to every tensor of a checkpoint directory, across shards, under PyTorch names.

    Every weight file must lie inside the checkpoint directory once symlinks are resolved (see
    :func:`_inside`), whether a sharded index names it or it is found there; a tensor stored in two
    shards is an error. Flax checkpoints (``flax_model.msgpack``, its sharded index, or Flax-named
    safetensors) are renamed to PyTorch names and orientation by
    :mod:`fisherjax.models.flax_checkpoint`; ``stored`` and ``flipped`` remember the file's own
    name and whether the stored array is the transpose, so messages name what the file holds.
    """

    def __init__(self, directory: Path, allow_pickle: bool):
        self.directory = directory
        self.location: dict[str, Path] = {}
        self.stored: dict[str, str] = {}
        self.flipped: set[str] = set()
        self.flax: str | None = None
        self._handles = {}
        self._arrays: dict[Path, dict[str, np.ndarray]] = {}
        self._torch_state = None
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        flax_index = directory / flax_checkpoint.MSGPACK_INDEX
        flax_single = directory / flax_checkpoint.MSGPACK
        if index.exists():
            files = _index_shards(index, directory)
        elif single.exists():
            files = [single.name]
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if files:
            self._open_safetensors([directory / name for name in files])
            return
        if flax_index.exists():
            self.flax = flax_index.name
            self._open_msgpack([directory / name for name in _index_shards(flax_index, directory, "Flax msgpack")])
            return
        if flax_single.exists():
            self.flax = flax_single.name
            self._open_msgpack([flax_single])
            return
        bins = sorted(directory.glob("pytorch_model*.bin"))
        if not bins:
            raise CheckpointError(
                f"{directory}: no model.safetensors, sharded index or *.safetensors file found (nor a Flax "
                f"{flax_checkpoint.MSGPACK}); "
                "pass a Hugging Face checkpoint directory"
            )
        if not allow_pickle:
            raise CheckpointError(
                f"{bins[0]}: pickle-based weights are refused (they can run arbitrary code); convert the "
                "checkpoint to safetensors, or pass --allow-pickle (allow_pickle=True in Python) to load it with "
                "torch.load(weights_only=True)"
            )
        self._load_torch(bins)

    @property
    def kind(self) -> str:
        """What the checkpoint is, for messages: ``checkpoint`` or ``Flax checkpoint (<file>)``."""
        return f"Flax checkpoint ({self.flax})" if self.flax else "checkpoint"

    def _check_inside(self, file: Path) -> None:
        if not _inside(self.directory, file):
            raise CheckpointError(
                f"{file}: links to {file.resolve()}, outside the checkpoint directory; weights are read only from "
                f"inside {self.directory} — copy the file there"
            )

    def _add(self, key: str, file: Path, stored: str | None = None, flipped: bool = False) -> None:
        stored = stored or key
        if key in self.location and (self.location[key], self.stored.get(key, key)) != (file, stored):
            first, second = self.stored.get(key, key), stored
            where = (f"in {self.location[key].name} and {file.name}" if self.location[key] != file
                     else f"in {file.name}")
            what = f"tensor {key} is stored twice, {where}" if first == second else \
                f"tensors {first} and {second} both hold {key}, {where}"
            raise CheckpointError(f"{self.directory}: {what}; remove one copy")
        self.location[key] = file
        if stored != key:
            self.stored[key] = stored
        if flipped:
            self.flipped.add(key)

    def _open_safetensors(self, files: list[Path]) -> None:
        from safetensors import safe_open

        handles = {}
        for file in files:
            self._check_inside(file)
            try:
                handles[file] = safe_open(str(file), framework="numpy")
            except Exception as err:  # safetensors raises its own error types for bad headers
                raise CheckpointError(
                    f"{file}: cannot read safetensors file ({one_line(err, 200)}); the file is damaged or truncated, "
                    "re-download or re-export it"
                ) from None
        flax = [f for f, h in handles.items() if flax_checkpoint.is_flax_names(h.metadata(), h.keys())]
        if flax:
            self.flax = flax[0].name if len(handles) == 1 else f"Flax-named safetensors, {len(flax)} of {len(handles)} files"
        for file, handle in handles.items():
            self._handles[file] = handle
            for key in handle.keys():
                if self.flax:
                    ndim = len(handle.get_slice(key).get_shape())
                    name, flipped = flax_checkpoint.hf_name(key, ndim)
                    self._add(name, file, key, flipped)
                else:
                    self._add(key, file)

    def _open_msgpack(self, files: list[Path]) -> None:
        for file in files:
            self._check_inside(file)
            arrays = flax_checkpoint.read_msgpack(file)
            self._arrays[file] = arrays
            for key, value in arrays.items():
                name, flipped = flax_checkpoint.hf_name(key, value.ndim)
                self._add(name, file, key, flipped)

    def _load_torch(self, bins: list[Path]) -> None:
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{bins[0]}: reading .bin weights needs torch, which is not installed") from None
        self._torch_state = {}
        for file in bins:
            self._check_inside(file)
            try:
                state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as err:  # pickle, zip and torch errors of every kind for a bad file
                raise CheckpointError(_torch_error(file, err)) from None
            if not isinstance(state, dict):
                raise CheckpointError(
                    f"{file}: holds a {type(state).__name__}, not a state dict of named tensors; save the model's "
                    "state_dict(), or convert the checkpoint to safetensors"
                )
            odd = [f"{k!r} ({type(v).__name__})" for k, v in state.items()
                   if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
            if odd:
                raise CheckpointError(
                    f"{file}: not a flat state dict of named tensors: {_listed(odd, 3, ', ')}; save the model's state_dict(), "
                    "or convert the checkpoint to safetensors"
                )
            for key, value in state.items():
                self._torch_state[key] = value
                self._add(key, file)

    def keys(self) -> Iterator[str]:
        return iter(self.location)

    def shown(self, name: str) -> str:
        """The tensor's name as its file spells it (a Flax name for a Flax checkpoint)."""
        return self.stored.get(name, name)

    def shown_shape(self, name: str, shape) -> tuple[int, ...]:
        """``shape`` (PyTorch orientation) as the file stores tensor ``name``."""
        return tuple(reversed(shape)) if name in self.flipped else tuple(shape)

    def dtype(self, name: str) -> str:
        """The tensor's storage dtype in safetensors' naming (``F32``, ``BF16``, ``I32``, ``BOOL`` ...)."""
        if self._torch_state is not None:
            dtype = self._torch_state[name].dtype
            return _TORCH_DTYPES.get(str(dtype), str(dtype).removeprefix("torch."))
        file, stored = self.location[name], self.shown(name)
        if file in self._arrays:
            return flax_checkpoint.storage_dtype(self._arrays[file][stored])
        return self._handles[file].get_slice(stored).get_dtype()

    def get(self, name: str) -> np.ndarray:
        """The tensor in PyTorch orientation as a numpy float array (bfloat16 widened to float32)."""
        file, stored = self.location[name], self.shown(name)
        try:
            if self._torch_state is not None:
                return self._torch_state[name].float().numpy()
            value = self._arrays[file][stored] if file in self._arrays else self._handles[file].get_tensor(stored)
        except Exception as err:
            raise CheckpointError(f"{file}: tensor {stored!r} cannot be read, the file may be truncated ({one_line(err, 200)})") from None
        value = value if np.issubdtype(value.dtype, np.floating) else value.astype(np.float32)
        return value.T if name in self.flipped else value

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in PyTorch orientation."""
        if self._torch_state is not None:
            return tuple(self._torch_state[name].shape)
        file, stored = self.location[name], self.shown(name)
        if file in self._arrays:
            stored_shape = self._arrays[file][stored].shape
        else:
            stored_shape = self._handles[file].get_slice(stored).get_shape()
        return self.shown_shape(name, stored_shape)


_TORCH_DTYPES = {
    "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float32": "F32", "torch.float64": "F64",
    "torch.int8": "I8", "torch.int16": "I16", "torch.int32": "I32", "torch.int64": "I64", "torch.uint8": "U8",
    "torch.bool": "BOOL", "torch.complex64": "C64",
}
"""torch dtypes in safetensors' naming, so a .bin and a .safetensors file get the same message."""


def _checkpoint_layers(table: NameTable, keys) -> int:
    """How many layers the checkpoint's tensor names cover (highest layer index + 1)."""
    prefixes = tuple(f"{p}." for p in {table.layers, table.layers.split(".", 1)[-1]})
    count = 0
    for key in keys:
        for prefix in prefixes:
            if key.startswith(prefix):
                head = key[len(prefix):].split(".", 1)[0]
                if head.isdigit():
                    count = max(count, int(head) + 1)
    return count


def abstract_params(config: DecoderConfig) -> dict:
    """Parameter shapes of a decoder, without allocating it: a copy of
    :func:`~fisherjax.models.model.abstract_decoder`'s, the caller's to change."""
    return jax.tree.map(lambda leaf: leaf, abstract_decoder(config)[1])


def load_pretrained(
    path: str | Path,
    *,
    dtype=jnp.float32,
    allow_pickle: bool = False,
    load_tokenizer: bool = True,
    tokenizer: str | Path | None = None,
) -> Model:
    """Load a Hugging Face checkpoint directory as a :class:`~fisherjax.models.model.Model`.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or a sharded
        ``model.safetensors.index.json`` whose shards lie inside the directory), or the
        ``flax_model.msgpack`` (sharded: ``flax_model.msgpack.index.json``) or Flax-named
        ``model.safetensors`` of transformers 4.x's Flax classes, and tokenizer files when present.
      dtype: parameter dtype (float32 by default); the checkpoint may store F32, F16, BF16 or F64.
      allow_pickle: accept ``pytorch_model.bin`` (loaded with ``torch.load(weights_only=True)``,
        which never runs code from the file).
      load_tokenizer: also load the tokenizer when the directory has one.
      tokenizer: a directory of tokenizer files (``tokenizer.json``, ``tokenizer_config.json``,
        ``vocab.json`` ...) to use instead of the checkpoint's own, e.g. for a checkpoint saved
        without one; its vocabulary may not be larger than the model's.

    Raises:
      ConfigError: unknown architecture or a config.json with bad fields (all listed at once).
      CheckpointError: missing, truncated, unexpected, mis-shaped, non-floating or non-finite
        tensors; an index naming files outside the directory; unreadable pickles, msgpack files
        or tokenizers.
      ConfigError: ``tokenizer`` is not a directory of tokenizer files transformers can load, or
        its vocabulary is larger than the model's.
      Every message is one line that starts with the file or directory it is about.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    config, raw = read_hf_config(directory)
    table = NAME_TABLES[config.family]
    source = _TensorSource(directory, allow_pickle)
    expected = flatten(abstract_params(config))
    flat, hf_names, problems, not_float, used = {}, {}, [], [], set()
    have = _checkpoint_layers(table, source.keys())
    if config.num_layers > have:
        problems.append(f"config.json asks for {config.num_layers} layers, the checkpoint holds {have}")
    scanned = range(min(config.num_layers, have + 1))  # one layer past the checkpoint's names its missing tensors

    for path_, abstract in expected.items():
        stacked = path_.startswith("layers/")
        layers = scanned if stacked else [None]
        pieces, names = [], []
        for layer in layers:
            candidates = _hf_candidates(table, path_, layer)
            name = next((c for c in candidates if c in source.location), None)
            if name is None:
                leaf = path_.rsplit("/", 1)[1]
                shown = flax_checkpoint.flax_name(candidates[0], leaf, config.family) if source.flax else candidates[0]
                problems.append(f"missing tensor {shown} (for {path_})")
                continue
            used.add(name)
            names.append(name)
            want = abstract.shape[1:] if stacked else abstract.shape
            if _hf_shape(table, path_, source.shape(name)) != tuple(want):
                implied = source.shown_shape(name, _hf_shape(table, path_, want))
                problems.append(
                    f"tensor {source.shown(name)} has shape {source.shown_shape(name, source.shape(name))}, config implies {implied}"
                )
                continue
            if source.dtype(name) not in FLOAT_DTYPES:
                not_float.append((source.shown(name), source.dtype(name), source.location[name]))
                continue
            pieces.append(_to_flax(table, path_, source.get(name)))
        if len(pieces) == (config.num_layers if stacked else 1):
            value = np.stack(pieces) if stacked else pieces[0]
            flat[path_] = value
            hf_names[path_] = names
    if config.tie_word_embeddings:
        used.update(c for c in ("lm_head.weight",) if c in source.location)
        if source.flax and "embed/embedding" in flat:
            problems.extend(_untied_flax_head(source, flat["embed/embedding"]))
    ignored = [k for k in source.keys() if k not in used and any(k.endswith(s) or s in k for s in table.ignore)]
    unexpected = sorted(source.shown(k) for k in set(source.keys()) - used - set(ignored))
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
        problems.append(f"tensors the config does not account for: {shown}")
    if problems:
        raise CheckpointError(
            f"{directory}: {source.kind} and config.json disagree ({len(problems)} problem{'s' * (len(problems) > 1)}): "
            f"{_listed(problems)}; check that config.json belongs to these weights"
        )
    if not_float:
        files = {file for _, _, file in not_float}
        where = str(files.pop()) if len(files) == 1 else str(directory)
        bad = [f"{name} is {dt}" + (f" (in {file.name})" if where == str(directory) else "") for name, dt, file in not_float]
        raise CheckpointError(
            f"{where}: parameters stored with a non-floating dtype: {_listed(bad, sep=', ')}; parameters must be "
            f"{', '.join(FLOAT_DTYPES)} — the file is damaged or not these weights, re-export it with float tensors"
        )

    nonfinite = [p for p, v in flat.items() if not np.isfinite(v).all()]
    if nonfinite:
        raise CheckpointError(
            f"{directory}: NaN or inf in parameters: {_listed(nonfinite, sep=', ')}; the weights are damaged or diverged, "
            "re-download or re-export them"
        )

    params = jax.tree.map(lambda v: jnp.asarray(v, dtype=dtype), unflatten(flat))
    graphdef = abstract_decoder(config)[0]
    if tokenizer is not None:
        tokenizer = _borrowed_tokenizer(Path(tokenizer), config, directory)
    elif load_tokenizer:
        tokenizer = _load_tokenizer(directory, config)
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


def _untied_flax_head(source: _TensorSource, embedding: np.ndarray) -> list[str]:
    """The problem, if any, with a Flax checkpoint's ``lm_head`` when config.json ties it to the embedding.

    transformers' Flax Llama and Mistral always compute logits with their own ``lm_head.kernel``,
    whatever ``tie_word_embeddings`` says; reading the checkpoint as tied would then give other
    logits than the model that wrote it. A head equal to the embedding's transpose is harmless.
    """
    name = "lm_head.weight"
    if name not in source.location:
        return []
    if source.shape(name) == embedding.shape and np.array_equal(source.get(name), embedding):
        return []
    return [
        f"config.json ties the output layer to the embedding (tie_word_embeddings), but the file holds its own "
        f"{source.shown(name)}, which differs from it and is what transformers' Flax model computes logits with — set "
        '"tie_word_embeddings": false in config.json'
    ]


def _hf_shape(table: NameTable, path: str, flax_shape) -> tuple[int, ...]:
    return tuple(reversed(flax_shape)) if _transposed(table, path) else tuple(flax_shape)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
"""Files whose presence means a directory holds a tokenizer."""


def _borrowed_tokenizer(directory: Path, config: DecoderConfig, model_dir: Path):
    """The tokenizer of another directory, for a checkpoint that has none (or to replace its own)."""
    if not directory.is_dir():
        raise ConfigError(f"{directory}: the tokenizer to use (--tokenizer / tokenizer=) is not a directory; pass the directory holding tokenizer.json")
    if not any((directory / f).exists() for f in TOKENIZER_FILES):
        raise ConfigError(
            f"{directory}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) found for --tokenizer / tokenizer=; "
            "pass a directory that holds a saved tokenizer"
        )
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # transformers raises many types for broken tokenizer files
        raise ConfigError(
            f"{directory}: transformers cannot load the tokenizer given with --tokenizer / tokenizer= "
            f"({one_line(err, 200)}); fix its files or pass another directory"
        ) from None
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(
            f"{directory}: tokenizer has {len(tokenizer)} tokens but the model in {model_dir} has a vocabulary of "
            f"{config.vocab_size}; its ids would fall outside the embedding — use a tokenizer made for this model"
        )
    return tokenizer


def _load_tokenizer(directory: Path, config: DecoderConfig):
    if not any((directory / f).exists() for f in TOKENIZER_FILES[:3]):
        return None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # transformers raises many types for broken tokenizer files
        _blame_config(directory)
        raise CheckpointError(
            f"{directory}: tokenizer files present but transformers cannot load them ({one_line(err, 200)}); "
            "fix or remove tokenizer.json / tokenizer_config.json"
        ) from None
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(
            f"{directory}: tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {config.vocab_size}; "
            "the tokenizer files belong to another model, use the ones this model was trained with"
        )
    return tokenizer


def _blame_config(directory: Path) -> None:
    """transformers reads config.json while loading a tokenizer: when it is config.json that
    transformers cannot read, say so instead of blaming the tokenizer files."""
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # as above: any failure here is config.json's
        raise ConfigError(
            f"{directory / 'config.json'}: transformers cannot read it ({one_line(err, 200)}), so the tokenizer cannot be "
            "loaded either; fix the file"
        ) from None


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
