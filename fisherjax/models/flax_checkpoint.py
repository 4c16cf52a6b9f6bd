"""Checkpoints written by transformers 4.x's Flax classes, seen under PyTorch names.

``FlaxXxxForCausalLM.save_pretrained`` writes ``flax_model.msgpack`` (a nested dict of arrays,
``flax.serialization.to_bytes``), its sharded form (``flax_model.msgpack.index.json`` naming
``flax_model-0000k-of-0000n.msgpack`` shards, keys joined by ``/``), or with
``safe_serialization=True`` a ``model.safetensors`` whose metadata says ``format: flax`` and whose
names are the dotted Flax paths (``transformer.h.0.attn.c_attn.kernel``, ``...wte.embedding``,
``...ln_1.scale``, Llama's RMSNorm ``...input_layernorm.weight``).

The loader in :mod:`fisherjax.models.hf` knows the Hugging Face (PyTorch) names and orientations,
so a Flax checkpoint is one more tensor source: :func:`hf_name` renames every Flax leaf to the
PyTorch name transformers' own Flax↔PyTorch conversion gives it, and says whether the stored
array is the transpose of the PyTorch tensor. The rule is the same for every family:

- ``<module>.kernel`` [2-D] → ``<module>.weight``, transposed. A Flax ``Dense`` kernel is
  ``[in, out]`` and a PyTorch ``Linear`` weight ``[out, in]``; transformers' Flax GPT-2 ``Conv1D``
  stores its kernel ``[out, in]`` (it transposes it in ``__call__``), which is again the transpose
  of PyTorch's ``Conv1D`` weight ``[in, out]``.
- ``<module>.embedding`` and ``<module>.scale`` → ``<module>.weight``, unchanged; ``.bias`` and
  ``.weight`` keep their name.

Flax GPT-2 with tied embeddings has no ``lm_head`` in the file; Flax Llama and Mistral always
have one (they ignore ``tie_word_embeddings``). transformers 4.x had no Flax Qwen2 or GPT-NeoX.
Reading needs flax (``msgpack_restore``), not transformers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fisherjax.errors import CheckpointError, one_line

MSGPACK = "flax_model.msgpack"
MSGPACK_INDEX = "flax_model.msgpack.index.json"

RENAMED = {"kernel": "weight", "embedding": "weight", "scale": "weight"}
"""Flax leaf names that PyTorch calls ``weight``."""

NORM_LEAF = {"gpt2": "scale", "llama": "weight", "gpt_neox": "scale"}
"""What each family's Flax norms call their gain (``nn.LayerNorm``: ``scale``; Flax Llama's RMSNorm:
``weight``), to name a missing norm tensor as the file would."""

FLAX_LEAF = {"kernel": "kernel", "embedding": "embedding", "bias": "bias"}
"""Our leaf name → the Flax leaf that holds it (norm gains: :data:`NORM_LEAF`)."""

NUMPY_DTYPES = {
    "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64", "int8": "I8", "int16": "I16",
    "int32": "I32", "int64": "I64", "uint8": "U8", "bool": "BOOL", "complex64": "C64",
}
"""numpy dtype names in safetensors' naming, so every source reports dtypes alike."""


def hf_name(flax_name: str, ndim: int) -> tuple[str, bool]:
    """The PyTorch name of a dotted Flax tensor name, and whether the stored array is its transpose."""
    module, _, leaf = flax_name.rpartition(".")
    if leaf not in RENAMED or not module:
        return flax_name, False
    return f"{module}.{RENAMED[leaf]}", leaf == "kernel" and ndim == 2


def flax_name(hf: str, leaf: str, family: str) -> str:
    """The Flax name a file would give the PyTorch-named tensor ``hf`` that fills our leaf ``leaf``
    (``kernel``, ``embedding``, ``scale`` or ``bias``): the inverse of :func:`hf_name`, for messages."""
    module = hf.rpartition(".")[0]
    return f"{module}.{FLAX_LEAF.get(leaf) or NORM_LEAF[family]}"


def is_flax_names(metadata: dict | None, names) -> bool:
    """Whether a safetensors file holds Flax-named tensors: its metadata says ``format: flax``, or a
    name ends in ``.kernel`` / ``.embedding`` (which PyTorch never writes)."""
    if (metadata or {}).get("format") == "flax":
        return True
    return any(n.endswith((".kernel", ".embedding")) for n in names)


def storage_dtype(array: np.ndarray) -> str:
    """An array's dtype in safetensors' naming (``F32``, ``BF16``, ``I32`` ...)."""
    return NUMPY_DTYPES.get(array.dtype.name, array.dtype.name.upper())


def read_msgpack(file: Path) -> dict[str, np.ndarray]:
    """Every array of a Flax msgpack file, keyed by its dotted path (``transformer.h.0.ln_1.scale``).

    Raises:
      CheckpointError: one line naming the file when it is a Git LFS pointer, is not msgpack, is
        truncated, or is not a nested dict of arrays with string keys.
    """
    from flax.serialization import msgpack_restore

    try:
        data = file.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{file}: cannot read the file ({err.strerror or err}); check that it is a readable file") from None
    if data.startswith(b"version https://git-lfs"):
        raise CheckpointError(f"{file}: is a Git LFS pointer, not the weights; fetch them with `git lfs pull` in the checkpoint's repository")
    try:
        tree = msgpack_restore(data)
    except Exception as err:  # msgpack raises its own types (ExtraData, FormatError, StackError...) and ValueError
        raise CheckpointError(
            f"{file}: not a readable Flax msgpack checkpoint ({one_line(err, 200) or type(err).__name__}); the file is "
            "damaged or truncated, re-download or re-export it"
        ) from None
    if not isinstance(tree, dict) or not tree:
        got = "an empty dict" if isinstance(tree, dict) else f"a {type(tree).__name__}"
        raise CheckpointError(
            f"{file}: holds {got}, not a Flax parameter dict (nested dicts of arrays, as save_pretrained writes); "
            "the file is damaged or not a Flax checkpoint"
        )
    flat, odd = {}, []
    stack = [((), tree)]
    while stack:
        prefix, node = stack.pop()
        for key, value in node.items():
            path = (*prefix, key)
            name = ".".join(str(k) for k in path)
            if not isinstance(key, str) or not key:
                odd.append(f"key {key!r} under {'.'.join(prefix) or 'the top'}")
            elif isinstance(value, dict):
                stack.append((path, value))
            elif isinstance(value, np.ndarray):
                flat[name] = value
            else:
                odd.append(f"{name} is a {type(value).__name__}")
    if odd:
        more = f" and {len(odd) - 3} more" if len(odd) > 3 else ""
        raise CheckpointError(
            f"{file}: not a Flax parameter dict: {', '.join(sorted(odd)[:3])}{more}; every leaf must be an array under "
            "string keys — the file is damaged or not a Flax checkpoint"
        )
    return flat
