"""fisherjax results in Hugging Face names, for tools outside JAX.

Everything here is written with ``safetensors`` under the tensor names of the model's own
checkpoint (``model.layers.0.self_attn.q_proj.weight``, ``transformer.h.0.attn.c_attn.weight``),
one tensor per layer (no stacked layer axis) and in the checkpoint's orientation (PyTorch Linear
``[out, in]``, GPT-2 Conv1D ``[in, out]``), through :func:`fisherjax.models.hf.to_hf_tensors`; a
torch script reads them with ``safetensors.torch.load_file`` and looks them up by
``model.named_parameters()``.

:func:`export_fisher` writes, for one task, into ``<directory>/<task>/``:

==============================  ==================================================================
``diagonal.safetensors``        per-parameter diagonal Fisher ``Î`` (``TaskFisher.diagonal``), float32,
                                each tensor shaped like the parameter it is named after
``diagonal_variance.safetensors``  its per-element sample variance, when collected
``group_fisher.safetensors``    group Fisher, keyed ``"<hf_name>|<group_type>"`` (one layer's groups:
                                ``…q_proj.weight|head`` → ``[heads]``, GPT-2's fused
                                ``…c_attn.weight|head_q`` / ``head_k`` / ``head_v``)
``group_sizes.safetensors``     parameters per group, same keys (``F_g / size_g`` is the mean)
``masks.safetensors``           masks, keyed ``"<hf_name>|<mask_name>"``, uint8 shaped like the
                                parameter, 1 = keep; a parameter a mask prunes nothing of is left
                                out (absent = keep it all)
==============================  ==================================================================

Every file's safetensors metadata (strings) names the task, the Fisher type and accumulation
mode, the sample, skipped-sample and token counts, the fisherjax version, the model type and
:data:`NORMALISERS`' sentence for the Fisher type (how each sample's square is normalised and
averaged); ``masks.safetensors`` also holds ``masks``, JSON of each mask's unit, scope and
target and achieved sparsity. :func:`read_export` reads a task's directory back.

:func:`merge_checkpoints` (Fisher-weighted merge, :func:`fisherjax.natural.fisher_merge`) and
:func:`prune_checkpoint` (a Fisher mask applied, :mod:`fisherjax.masks`) write Hugging Face
checkpoints that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from importlib import metadata as package_metadata
from pathlib import Path

import numpy as np

from fisherjax.analysis import masks as masking
from fisherjax.analysis.natural import fisher_merge
from fisherjax.errors import CheckpointError, ConfigError, DataError
from fisherjax.fisher.state import GroupFisher, TaskFisher
from fisherjax.layout import flatten, unflatten
from fisherjax.models.hf import save_pretrained, to_hf_tensors
from fisherjax.models.model import Model
from fisherjax.outdir import check_task_name

DIAGONAL = "diagonal.safetensors"
DIAGONAL_VARIANCE = "diagonal_variance.safetensors"
GROUP_FISHER = "group_fisher.safetensors"
GROUP_SIZES = "group_sizes.safetensors"
MASKS = "masks.safetensors"
SEPARATOR = "|"
"""Between the Hugging Face name and the group type (or mask name) in a key."""

NORMALISERS = {
    "empirical": "per sample i: C_i = g_i^2 / T_i, g_i the gradient of the sample's token-sum loss with the data labels, "
                 "T_i its predicted (label != -100) tokens; F = (1/n) sum_i C_i over the n samples",
    "true": "per sample i: C_i = mean over the label draws s of (g_i^s)^2 / T_i, g_i^s the gradient of the token-sum loss "
            "with labels drawn from the model at every predicted position, T_i the sample's predicted tokens; "
            "F = (1/n) sum_i C_i over the n samples",
    "per_token": "per sample i: C_i = sum_t (grad l_it)^2 / T_i, each predicted token's loss gradient squared, T_i the "
                 "sample's predicted tokens; F = (1/n) sum_i C_i over the n samples",
}
"""For each Fisher type, how the per-parameter value is normalised (DESIGN.md, "The mathematics")."""

GROUP_REDUCTION = "sum over the group's parameters of the per-parameter F (square, then reduce); group_sizes.safetensors " \
                  "holds the parameter counts, so F_g / size_g is the group's mean"


def hf_names(model: Model) -> dict[str, list[str]]:
    """``{param_path: [hf_name, ...]}``: the Hugging Face tensor name of each layer of a stacked
    leaf (index = layer), or the one name of any other leaf — the names
    :func:`~fisherjax.models.hf.to_hf_tensors` writes."""
    out = {}
    for path, value in flatten(model.params).items():
        spec = model.layout.spec(path)
        index = np.arange(np.shape(value)[0]) if spec.layered else np.zeros((), np.int64)
        named = to_hf_tensors(model, unflatten({path: index}))
        out[path] = sorted(named, key=lambda name: int(named[name].reshape(-1)[0]))
    return out


def _check_matches(model: Model, fisher: TaskFisher) -> None:
    """The Fisher's parameters are the model's, with the model's shapes (else a one-line error)."""
    params = flatten(model.params)
    for what, tree in (("diagonal", fisher.diagonal or {}), ("diagonal variance", fisher.diagonal_variance or {})):
        bad = [p for p, v in tree.items() if p not in params or np.shape(v) != np.shape(params[p])]
        if bad:
            raise DataError(f"task {fisher.task!r}: {what} Fisher of {bad[0]} does not fit the model's parameters "
                            f"({len(bad)} leaves); it was collected on another model")
    unknown = sorted(set(fisher.group_fisher) - set(params))
    if unknown:
        raise DataError(f"task {fisher.task!r}: group Fisher of parameters the model does not have ({', '.join(unknown[:3])}); "
                        "it was collected on another model")


def _version() -> str:
    try:
        return package_metadata.version("fisherjax")
    except package_metadata.PackageNotFoundError:
        return "unknown"


def export_metadata(model: Model, fisher: TaskFisher, content: str) -> dict[str, str]:
    """The safetensors metadata of an exported file (module docstring); ``content`` says which file."""
    return {
        "format": "pt",
        "content": content,
        "fisherjax": _version(),
        "model_type": model.config.model_type,
        "task": fisher.task,
        "fisher_type": fisher.fisher_type,
        "mode": fisher.mode,
        "n_samples": str(fisher.n_samples),
        "n_skipped": str(fisher.n_skipped),
        "n_tokens": str(fisher.n_tokens),
        "normaliser": NORMALISERS.get(fisher.fisher_type, fisher.fisher_type),
        "group_reduction": GROUP_REDUCTION,
    }


def per_layer_groups(model: Model, groups: GroupFisher, names: Mapping[str, list[str]] | None = None) -> dict[str, np.ndarray]:
    """``{"<hf_name>|<group_type>": values}``: a stacked leaf's ``[L, ...]`` group values split into
    one entry per layer, named after that layer's tensor; other leaves' values as they are."""
    names = hf_names(model) if names is None else names
    out = {}
    for path, by_type in groups.items():
        layered = model.layout.spec(path).layered
        for group_type, values in by_type.items():
            values = np.asarray(values)
            pieces = values if layered else [values]
            for name, piece in zip(names[path], pieces, strict=True):
                out[f"{name}{SEPARATOR}{group_type}"] = np.ascontiguousarray(piece)
    return out


def _check_mask_name(name: str) -> str:
    if not isinstance(name, str) or not name or SEPARATOR in name or "\n" in name:
        raise ConfigError(f"mask name {name!r} is not allowed: a non-empty name without {SEPARATOR!r}")
    return name


def mask_tensors(model: Model, masks: Mapping[str, masking.Mask]) -> dict[str, np.ndarray]:
    """``{"<hf_name>|<mask_name>": uint8}`` (1 = keep) of every parameter each mask prunes something of."""
    out = {}
    for mask_name, mask in masks.items():
        for name, keep in to_hf_tensors(model, mask.tree).items():
            if not keep.all():
                out[f"{name}{SEPARATOR}{_check_mask_name(mask_name)}"] = keep.astype(np.uint8)
    return out


def mask_description(mask: masking.Mask) -> dict:
    """What ``masks.safetensors``' metadata says of one mask."""
    return {"unit": mask.unit, "scope": mask.scope, "target_sparsity": mask.target_sparsity, "sparsity": mask.sparsity,
            "param_sparsity": mask.param_sparsity, "task": mask.task}


def standard_masks(fisher: TaskFisher, layout, units: Sequence[str], sparsities: Sequence[float], *,
                   scope: str = "global") -> dict[str, masking.Mask]:
    """``{"<unit>@<sparsity>": Mask}`` of the task for every unit and sparsity (the ``parameter``
    masks share one ranking of the diagonal, :func:`~fisherjax.masks.unstructured_masks`)."""
    out = {}
    for unit in units:
        if unit == "parameter":
            made = masking.unstructured_masks(fisher, layout, sparsities, scope=scope)
        else:
            made = [masking.structured_mask(fisher, layout, s, unit=unit, scope=scope) for s in sparsities]
        out.update({f"{unit}@{s:g}": mask for s, mask in zip(sparsities, made, strict=True)})
    return out


def export_fisher(model: Model, fisher: TaskFisher, directory: str | Path, *, masks: Mapping[str, masking.Mask] | None = None) -> Path:
    """Write one task's Fisher (and ``masks``, ``{mask_name: Mask}``) in Hugging Face names into
    ``<directory>/<task>/`` (files and keys in the module docstring). Returns that directory.

    Raises:
      DataError: a task name that cannot be a folder name, or a Fisher of another model's parameters.
      ConfigError: a mask name with ``|``.
    """
    from safetensors.numpy import save_file

    check_task_name(fisher.task, option="task name")
    _check_matches(model, fisher)
    target = Path(directory) / fisher.task
    target.mkdir(parents=True, exist_ok=True)
    names = hf_names(model)
    for file, tree in ((DIAGONAL, fisher.diagonal), (DIAGONAL_VARIANCE, fisher.diagonal_variance)):
        if tree:
            tensors = to_hf_tensors(model, unflatten({p: np.asarray(v, np.float32) for p, v in tree.items()}))
            save_file(tensors, str(target / file), metadata=export_metadata(model, fisher, file.split(".")[0]))
    save_file(per_layer_groups(model, fisher.group_fisher, names), str(target / GROUP_FISHER),
              metadata=export_metadata(model, fisher, "group_fisher"))
    save_file(per_layer_groups(model, fisher.group_sizes, names), str(target / GROUP_SIZES),
              metadata=export_metadata(model, fisher, "group_sizes"))
    if masks:
        info = export_metadata(model, fisher, "masks")
        info["masks"] = json.dumps({_check_mask_name(n): mask_description(m) for n, m in masks.items()})
        save_file(mask_tensors(model, masks), str(target / MASKS), metadata=info)
    return target


@dataclasses.dataclass(frozen=True)
class Export:
    """One task's export read back (:func:`read_export`).

    Attributes:
      metadata: the group Fisher file's safetensors metadata (strings; module docstring).
      diagonal, diagonal_variance: ``{hf_name: array}``, or None when not exported.
      group_fisher, group_sizes: ``{hf_name: {group_type: values}}``.
      masks: ``{mask_name: {hf_name: bool array}}`` (parameters a mask leaves whole are absent).
      mask_info: ``{mask_name: {"unit", "scope", "target_sparsity", "sparsity", ...}}``.
    """

    metadata: dict[str, str]
    diagonal: dict[str, np.ndarray] | None
    diagonal_variance: dict[str, np.ndarray] | None
    group_fisher: dict[str, dict[str, np.ndarray]]
    group_sizes: dict[str, dict[str, np.ndarray]]
    masks: dict[str, dict[str, np.ndarray]]
    mask_info: dict[str, dict]


def _read(file: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{file}: cannot be read as safetensors ({' '.join(str(err).split())[:200]})") from None


def _split_keys(tensors: Mapping[str, np.ndarray], file: Path) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        name, sep, second = key.rpartition(SEPARATOR)
        if not sep:
            raise CheckpointError(f"{file}: key {key!r} is not '<hf_name>{SEPARATOR}<name>'; not a fisherjax export")
        out.setdefault(name, {})[second] = value
    return out


def read_export(directory: str | Path) -> Export:
    """Read a task's export directory (``<directory>`` = ``…/<task>``, as :func:`export_fisher` returns).

    Raises:
      CheckpointError: no ``group_fisher.safetensors`` there, or a file that is not an export.
    """
    directory = Path(directory)
    if not (directory / GROUP_FISHER).is_file():
        raise CheckpointError(f"{directory}: no {GROUP_FISHER}; pass a task folder written by fisherjax export")
    groups, info = _read(directory / GROUP_FISHER)
    sizes = _read(directory / GROUP_SIZES)[0] if (directory / GROUP_SIZES).is_file() else {}
    optional = {f: _read(directory / f)[0] if (directory / f).is_file() else None for f in (DIAGONAL, DIAGONAL_VARIANCE)}
    masks, mask_info = {}, {}
    if (directory / MASKS).is_file():
        tensors, mask_meta = _read(directory / MASKS)
        mask_info = json.loads(mask_meta.get("masks", "{}"))
        masks = {name: {} for name in mask_info}
        for hf_name, by_mask in _split_keys(tensors, directory / MASKS).items():
            for mask_name, keep in by_mask.items():
                masks.setdefault(mask_name, {})[hf_name] = keep.astype(bool)
    return Export(info, optional[DIAGONAL], optional[DIAGONAL_VARIANCE], _split_keys(groups, directory / GROUP_FISHER),
                  _split_keys(sizes, directory / GROUP_SIZES), masks, mask_info)


# ---- checkpoints: merge and prune ----------------------------------------------------------------


IDENTITY_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")
"""DecoderConfig fields that do not change what the parameters compute (ignored when comparing)."""


def check_same_architecture(base: Model, other: Model, what: str) -> None:
    """Raise a one-line :class:`CheckpointError` naming ``what`` unless ``other`` has ``base``'s
    architecture: every config field that shapes or computes (token ids aside) and every
    parameter's path and shape."""
    a, b = dataclasses.asdict(base.config), dataclasses.asdict(other.config)
    differ = [f"{k} {b[k]!r} (base {a[k]!r})" for k in a if k not in IDENTITY_FIELDS and a[k] != b[k]]
    pa, pb = {p: np.shape(v) for p, v in flatten(base.params).items()}, {p: np.shape(v) for p, v in flatten(other.params).items()}
    differ += [f"{p} {pb.get(p)} (base {pa.get(p)})" for p in sorted(set(pa) | set(pb)) if pa.get(p) != pb.get(p)]
    if differ:
        shown = "; ".join(differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
        raise CheckpointError(f"{what}: not the base model's architecture: {shown}; merged models must share one architecture")


def merge_checkpoints(
    base: Model,
    finetuned: Mapping[str, Model],
    fishers: Mapping[str, TaskFisher],
    directory: str | Path,
    *,
    floor: float = 1e-8,
    normalise: bool = False,
) -> dict:
    """Fisher-weighted merge ``θ = Σ_k F̃_k θ_k / Σ_k F̃_k`` (:func:`~fisherjax.natural.fisher_merge`,
    ``F̃_k = max(F_k, floor)``) of the ``finetuned`` models, each weighted by the Fisher of the
    task of the same name (``fishers``; its full diagonal where collected, else group means), saved
    to ``directory`` as a Hugging Face checkpoint with ``base``'s config and tokenizer.

    Returns:
      the merged parameters (fisherjax's tree).

    Raises:
      ConfigError: names of models and Fishers that do not match one to one.
      CheckpointError: a finetuned model whose architecture is not the base's.
    """
    if set(finetuned) != set(fishers) or not finetuned:
        raise ConfigError(f"every finetuned model needs the Fisher of its task: models {sorted(finetuned)}, Fishers {sorted(fishers)}")
    for name, model in finetuned.items():
        check_same_architecture(base, model, f"finetuned model {name!r} ({model.source or 'in memory'})")
    names = list(finetuned)
    merged = fisher_merge([finetuned[n].params for n in names], [fishers[n] for n in names], layout=base.layout, floor=floor,
                          normalise=normalise)
    save_pretrained(base, directory, merged)
    return merged


def mean_fisher(fishers: Sequence[TaskFisher]) -> TaskFisher:
    """The tasks' Fishers averaged with equal weights, ``(1/K) Σ_k F_k`` (group Fisher, and the
    diagonal when every task has one), named ``"a+b+…"``; counts are summed. A mask ranks units,
    so the mean and the sum of the tasks' Fishers prune the same units."""
    if not fishers:
        raise ConfigError("no task Fisher given")
    if len(fishers) == 1:
        return fishers[0]

    def mean(trees):
        return {p: np.mean([np.asarray(t[p], np.float64) for t in trees], axis=0).astype(np.float32) for p in trees[0]}

    groups = {p: mean([f.group_fisher[p] for f in fishers]) for p in fishers[0].group_fisher}
    diagonal = mean([f.diagonal for f in fishers]) if all(f.diagonal for f in fishers) else None
    first = fishers[0]
    return TaskFisher(
        task="+".join(f.task for f in fishers), group_fisher=groups, group_sizes=first.group_sizes,
        n_samples=sum(f.n_samples for f in fishers), n_skipped=sum(f.n_skipped for f in fishers),
        n_tokens=sum(f.n_tokens for f in fishers), total_loss=sum(f.total_loss for f in fishers), diagonal=diagonal,
        fisher_type=first.fisher_type, mode=first.mode,
    )


def prune_checkpoint(
    model: Model,
    fishers: TaskFisher | Sequence[TaskFisher],
    directory: str | Path,
    *,
    sparsity: float,
    unit: str = "head",
    scope: str = "global",
) -> tuple[dict, masking.Mask]:
    """Zero the ``sparsity`` fraction of ``unit``\\ s with the lowest Fisher (the tasks' mean,
    :func:`mean_fisher`) and save the pruned parameters to ``directory`` as a Hugging Face
    checkpoint. ``unit``: ``head``, ``kv_head``, ``neuron``, ``channel`` (:func:`~fisherjax.masks.structured_mask`)
    or ``parameter`` (:func:`~fisherjax.masks.unstructured_mask`, needs the diagonal).

    Returns:
      ``(pruned params, the Mask)``.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ConfigError(f"sparsity must be in [0, 1] (--sparsity), got {sparsity}")
    fisher = mean_fisher([fishers] if isinstance(fishers, TaskFisher) else list(fishers))
    _check_matches(model, fisher)
    if unit == "parameter":
        mask = masking.unstructured_mask(fisher, model.layout, sparsity, scope=scope)
    else:
        mask = masking.structured_mask(fisher, model.layout, sparsity, unit=unit, scope=scope)
    pruned = masking.apply_mask(model.params, mask)
    save_pretrained(model, directory, pruned)
    return pruned, mask


__all__ = [
    "Export",
    "check_same_architecture",
    "export_fisher",
    "hf_names",
    "mean_fisher",
    "merge_checkpoints",
    "per_layer_groups",
    "prune_checkpoint",
    "read_export",
    "standard_masks",
]
