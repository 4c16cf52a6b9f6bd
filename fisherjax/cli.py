"""``fisherjax`` command line: ``analyze`` runs the phases, ``info`` describes a checkpoint.

Errors caused by input (a checkpoint, a task file, an option) print one line on stderr and exit
with code 2, without a traceback; nothing is written to the output directory in that case.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from fisherjax.errors import FisherjaxError, one_line
from fisherjax.analysis.masks import SCOPES as MASK_SCOPES
from fisherjax.analysis.masks import STRUCTURED_UNITS as MASK_UNITS
from fisherjax.analysis.qkov import AGGREGATES, CONTRACTIONS, CURVATURE_VARIANTS, FISHER_POOLS, NORMALIZE_GJ, VARIANTS
from fisherjax.fisher.options import FISHER_TYPES, MODES, SAMPLE_GRADS_FORMS, STORAGE_DTYPES

EXIT_INPUT_ERROR = 2



def _defaults():
    """AnalysisConfig's defaults: the command line restates none of them."""
    from fisherjax.pipeline import AnalysisConfig

    return AnalysisConfig


class _Parser(argparse.ArgumentParser):
    """argparse with fisherjax's error format: one line, exit code 2 (no usage block)."""

    def error(self, message: str):
        self.exit(EXIT_INPUT_ERROR, f"fisherjax: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    d = _defaults()
    from fisherjax.heads import Thresholds
    from fisherjax.pipeline import CONFLICT_SCOPES, CURVATURE_AUTO_PARAMETERS
    parser = _Parser(
        prog="fisherjax",
        description="Where a language model stores a task, and where two tasks collide.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    a = sub.add_parser(
        "analyze",
        help="run every phase on a model and its tasks (the shipped demo by default)",
        description="Collect per-sample Fisher information for each task, then importance, pruning masks, "
        "mask overlap, sample conflicts, QK-OV interference and Fisher-scaled updates. With no arguments it runs "
        "on the shipped demo model and its 'math' and 'copy' tasks.",
    )
    a.add_argument("--model", type=Path,
                   help="Hugging Face checkpoint directory: config.json and model.safetensors (or transformers 4.x's Flax "
                        "flax_model.msgpack), with tokenizer files unless --tokenizer gives them or the tasks are pre-tokenised")
    a.add_argument("--tokenizer", type=Path, metavar="DIR",
                   help="a directory of tokenizer files (tokenizer.json, tokenizer_config.json, ...) to encode the tasks with, "
                        "for a checkpoint saved without them (default: the checkpoint's own)")
    a.add_argument("--task", action="append", default=[], metavar="NAME=FILE",
                   help="a task: .jsonl with 'text', 'prompt'+'completion', or pre-tokenised 'input_ids' (+ optional "
                        "Hugging Face 'labels') per line, or .txt with one text per line (repeat)")
    a.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML (.toml) or JSON file of AnalysisConfig fields (e.g. batch_size = 8); flags given here override it")
    a.add_argument("--print-config", action="store_true", help="print the effective configuration as JSON (--config reads it) and exit")
    a.add_argument("--out", type=Path, default=d.out, help=f"output directory (default: ./{d.out})")
    a.add_argument("--batch-size", type=int, default=d.batch_size, help=f"samples per batch (default {d.batch_size})")
    a.add_argument("--max-length", type=int, default=d.max_length, help=f"truncate samples to this many tokens (default {d.max_length})")
    a.add_argument("--max-samples", type=int, default=d.max_samples, help="use at most this many samples per task (default: all)")
    a.add_argument("--fisher-type", choices=FISHER_TYPES, default=d.fisher_type,
                   help=f"empirical (data labels), true (labels sampled from the model) or per_token (default {d.fisher_type})")
    a.add_argument("--mode", choices=MODES, default=d.mode, help=f"accumulation (default {d.mode})")
    a.add_argument("--sample-grads-dtype", "--contribution-dtype", dest="sample_grads_dtype", choices=tuple(STORAGE_DTYPES),
                   default=d.sample_grads_dtype, help="storage dtype of the kept per-sample gradients (default bfloat16; float32 with "
                   "--qkov-variant signed or kfac, whose scores bfloat16's rounding moves more)")
    a.add_argument("--sample-grads-form", choices=SAMPLE_GRADS_FORMS, default=d.sample_grads_form,
                   help="keep each attention kernel's per-sample gradients as they are, or as their token factors (inputs and "
                        "output gradients, formed again where Phases 5 and 6 read them): 'auto' keeps factors where they take "
                        f"at most half, i.e. for samples of at most d_in*d_out/(2(d_in+d_out)) tokens (default {d.sample_grads_form})")
    a.add_argument("--sample-grads-budget-gb", "--contribution-budget-gb", dest="sample_grads_budget_gb", type=float,
                   default=d.sample_grads_budget_gb,
                   help=f"host memory allowed for the kept per-sample gradients per task (default {d.sample_grads_budget_gb:g} GB)")
    a.add_argument("--spill-dir", type=Path, default=d.spill_dir,
                   help="write kept per-sample gradients beyond the budget to this directory (memory-mapped)")
    a.add_argument("--checkpoint-dir", type=Path, default=d.checkpoint_dir, metavar="DIR",
                   help="save Phase 1's progress of each task in DIR/<task> every --checkpoint-every batches (outside --out; "
                        "not with --spill-dir)")
    a.add_argument("--resume", action="store_true",
                   help="continue Phase 1 from the saves in --checkpoint-dir (same model, tasks, batch size and options)")
    a.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="N",
                   help=f"batches between two saves of --checkpoint-dir (default {d.checkpoint_every})")
    a.add_argument("--no-diagonal", action="store_true", help="skip the full per-parameter diagonal (no unstructured masks)")
    a.add_argument("--diagonal-variance", action="store_true",
                   help="also accumulate the per-element variance of the full diagonal (about twice its cost; saved with the Fisher state)")
    a.add_argument("--sparsity", type=float, action="append",
                   help=f"pruning sparsity level (repeat; default {' '.join(f'{s:g}' for s in d.sparsities)})")
    a.add_argument("--mask-unit", action="append", choices=MASK_UNITS,
                   help=f"structured unit the pruning masks remove (repeat; default {' '.join(d.mask_units)})")
    a.add_argument("--mask-scope", choices=MASK_SCOPES, default=d.mask_scope,
                   help=f"rank the mask units over the whole model (global) or within each layer (default {d.mask_scope})")
    a.add_argument("--top-k", type=int, default=d.top_k, help=f"rows in the top-k tables (default {d.top_k})")
    a.add_argument("--pruning-samples", type=int, default=d.pruning_samples, metavar="N",
                   help="samples per task the head-pruning experiment evaluates, a fixed random subsample "
                        f"(default {d.pruning_samples})")
    a.add_argument("--phases", default=",".join(d.phases), help=f"comma-separated phases to run (default: all of {','.join(d.phases)})")
    a.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    a.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin weights (unsafe for untrusted files)")
    a.add_argument("--save-sample-grads", "--save-contributions", dest="save_sample_grads", action="store_true",
                   help="also store the per-sample gradients in fisher_state/")
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
    a.add_argument("--overwrite", action="store_true",
                   help="replace --out even when fisherjax did not write it (by default only a new or empty directory, "
                        "or an earlier fisherjax output, is replaced)")
    a.add_argument("--truncate", action="store_true",
                   help="cut samples longer than the model's maximum positions instead of refusing them "
                        "(the count of cut samples is in results.json)")
    a.add_argument("--qkov-contraction", choices=CONTRACTIONS, default=d.qkov_contraction,
                   help="how the QK-OV kernel evaluates a slice's contraction: auto (looped on CPU, batched elsewhere), "
                        f"batched, looped, or pallas (one pass over the inputs, a Triton kernel for GPUs; default {d.qkov_contraction})")
    a.add_argument("--qkov-variant", choices=VARIANTS + CURVATURE_VARIANTS, default=d.qkov_variant,
                   help=f"QK-OV score: unsigned |g_j|, signed g_j, symmetric, natural, or kfac (task A's damped K-FAC block "
                        f"of each head instead of its diagonal Fisher; no permutation test) (default {d.qkov_variant})")
    a.add_argument("--qkov-fisher-pool", choices=FISHER_POOLS, default=d.qkov_fisher_pool,
                   help=f"whose Fisher whitens the scores: task A's, B's, both (equal weights) or both by sample count "
                        f"(default {d.qkov_fisher_pool})")
    a.add_argument("--qkov-normalize-gj", choices=NORMALIZE_GJ, default=d.qkov_normalize_gj,
                   help=f"divide task B's gradients by its token count (default {d.qkov_normalize_gj})")
    a.add_argument("--qkov-aggregate", choices=AGGREGATES, default=d.qkov_aggregate,
                   help=f"mean or sum over a slice's parameters (default {d.qkov_aggregate})")
    a.add_argument("--qkov-ridge-rel", type=float, default=d.qkov_ridge_rel, metavar="R",
                   help=f"ridge added to Î, relative to its mean (default {d.qkov_ridge_rel:g})")
    a.add_argument("--conflict-scope", choices=CONFLICT_SCOPES, default=d.conflict_scope,
                   help="Phase 5 tests each sample pair per attention-head group ('groups'), on the whole gradient "
                        "('overall'), or per group where those tests fit the host's memory ('auto', the default)")
    a.add_argument("--conflict-alpha", type=float, default=d.conflict_alpha, metavar="Q",
                   help=f"false discovery rate of Phase 5's tests (default {d.conflict_alpha})")
    a.add_argument("--compilation-cache", type=Path, metavar="DIR",
                   help="keep XLA compilations in DIR so the next run loads them "
                        "(default: $XDG_CACHE_HOME/fisherjax/jax-cache, i.e. ~/.cache/fisherjax/jax-cache)")
    a.add_argument("--no-compilation-cache", action="store_true",
                   help="neither read nor write the compilation cache (also FISHERJAX_COMPILATION_CACHE=0)")
    a.add_argument("--curvature", action="store_true",
                   help=f"compare the Fisher methods (diagonal, K-FAC, Lanczos, block spectra) also on a model of more than "
                        f"{CURVATURE_AUTO_PARAMETERS // 1_000_000}M parameters (smaller ones get it by default; leave the phase "
                        "'curvature' out of --phases to skip it), within all the free memory, its per-sample gradients in "
                        "column slices where they do not fit whole")
    a.add_argument("--curvature-samples", type=int, default=d.curvature_samples, metavar="N",
                   help=f"samples of the first task the method comparison runs on (default {d.curvature_samples})")
    a.add_argument("--curvature-k", type=int, default=d.curvature_k, metavar="K",
                   help=f"top eigenvalues per method in the comparison (default {d.curvature_k})")
    a.add_argument("--head-samples", type=int, default=d.head_samples, metavar="N",
                   help=f"samples of each task for head-mask importance and the single-head ablation table of the "
                        f"'heads' phase (default {d.head_samples})")
    a.add_argument("--probe-tokens", default=d.probe_tokens, metavar="TEXT",
                   help="a text whose tokens the head probes draw from, e.g. an alphabet a toy model "
                        "was trained on (default: every ordinary token; the demo: lowercase letters)")
    a.add_argument("--probe-length", type=int, default=d.probe_length, metavar="N",
                   help="tokens of each random probe segment, repeated once for the induction score (default 32; the demo 16)")
    a.add_argument("--head-threshold", action="append", default=[], metavar="NAME=VALUE",
                   help="change a threshold of the head categories (repeat); defaults: "
                        + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(Thresholds()).items()))
    a.add_argument("--ablation-heads", type=int, default=d.ablation_heads, metavar="N",
                   help=f"heads of each task ablated one at a time in the 'heads' phase: those with the largest head-mask "
                        f"importance, each costing a forward pass of the head samples; 0 turns the table off (default {d.ablation_heads})")
    a.add_argument("--devices", type=int, metavar="N",
                   help="split each batch's samples over N devices (default: every device, when there are several)")
    a.add_argument("--coordinator", metavar="HOST:PORT",
                   help="join a multi-process run (jax.distributed) through this coordinator; with --num-processes and "
                        "--process-id, or JAX's cluster environment (JAX_COORDINATOR_ADDRESS, SLURM, Open MPI). Phase 1 "
                        "and the pair phases span every process; process 0 runs the other phases and writes --out")
    a.add_argument("--num-processes", type=int, metavar="P", help="processes in the multi-process run")
    a.add_argument("--process-id", type=int, metavar="I", help="this process's index in the multi-process run (0 … P−1)")

    i = sub.add_parser("info", help="describe a checkpoint: architecture, layers, heads, parameter counts",
                       description="Print the architecture, layers, heads, kv heads, head_dim and parameter counts.")
    i.add_argument("model", type=Path, help="Hugging Face checkpoint directory")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin weights")

    from fisherjax import plan as planning

    p = sub.add_parser("plan", help="plan a production run from compiled memory analyses (config.json only, no weights)",
                       description="Compile the Phase 1 step for abstract parameters (no weights, works on a CPU) and print its "
                       "per-device memory, the storage of the kept per-sample gradients, every phase's work and its time at --tflops "
                       "(with Phase 5's host tests in core-time, and what Phases 5 and 6 read of the kept gradients), whether the method "
                       "comparison fits one device, a recommended mesh and micro-batch, and whether the kept gradients fit the "
                       "host or must spill. Only the step's memory is compiled (XLA's memory analysis); a "
                       "per-device figure with a \"model\" axis is marked DERIVED, and storage, work and time come from formulas.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="checkpoint directory (only its config.json is read)")
    source.add_argument("--config", type=Path, help="a Hugging Face config.json file")
    p.add_argument("--samples", type=int, required=True, help="samples per task")
    p.add_argument("--tasks", type=int, default=planning.TASKS, help=f"tasks (default {planning.TASKS})")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per sample (default {planning.SEQ_LEN}, or the model's positions when it has fewer)")
    p.add_argument("--devices", type=int, default=planning.DEVICES, help=f"devices (default {planning.DEVICES})")
    p.add_argument("--device-memory", type=float, default=planning.DEVICE_MEMORY_GB, metavar="GB",
                   help=f"memory per device, GB = 1e9 bytes (default {planning.DEVICE_MEMORY_GB:g})")
    p.add_argument("--host-memory", type=float, default=planning.HOST_MEMORY_GB, metavar="GB",
                   help=f"memory per host for the kept gradients (default {planning.HOST_MEMORY_GB:g})")
    p.add_argument("--devices-per-host", type=int, default=planning.DEVICES_PER_HOST,
                   help=f"devices per host (default {planning.DEVICES_PER_HOST})")
    p.add_argument("--tflops", type=float, help=f"sustained TFLOP/s per device (default: assumed {planning.DEFAULT_TFLOPS:g})")
    p.add_argument("--sample-grads-dtype", "--storage-dtype", dest="storage_dtype", choices=tuple(STORAGE_DTYPES),
                   help="as for analyze: storage dtype of the kept per-sample gradients (default analyze's: bfloat16; pass float32 "
                        "to plan a --qkov-variant signed or kfac run)")
    p.add_argument("--fisher-type", choices=FISHER_TYPES, default=d.fisher_type, help=f"as for analyze (default {d.fisher_type})")
    p.add_argument("--sample-grads-form", choices=SAMPLE_GRADS_FORMS, default=d.sample_grads_form,
                   help=f"as for analyze, at --seq-len: how the kept attention gradients are stored (default {d.sample_grads_form})")
    p.add_argument("--no-diagonal", action="store_true", help="as for analyze: no full diagonal in the step")
    p.add_argument("--remat", action="store_true", help="recompute each block in the backward pass (less memory, more time)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_export_commands(sub, d)
    parser.analyze = a  # for _given_flags
    return parser


FLAG_FIELDS = {"task": "tasks", "head_threshold": "head_thresholds", "no_diagonal": "diagonal", "sparsity": "sparsities",
               "no_progress": "progress", "mask_unit": "mask_units"}
"""Command-line destinations whose AnalysisConfig field has another name (the others share theirs)."""


class _Unset(list):
    """The marker of a flag not given; a list, so that an ``append`` flag can extend a copy of it."""


def _given_flags(argv) -> set[str]:
    """The AnalysisConfig fields whose flags appear on ``argv`` (parsed again with every default
    replaced by a marker, so a flag given with its default value still counts)."""
    parser = build_parser()
    unset = _Unset()
    parser.analyze.set_defaults(**{action.dest: unset for action in parser.analyze._actions if action.dest != "help"})
    args = parser.parse_args(argv)
    return {FLAG_FIELDS.get(dest, dest) for dest, value in vars(args).items() if value is not unset}


def _analyze(args) -> int:
    from fisherjax import compilation_cache

    cache = compilation_cache.requested_dir(args.compilation_cache, args.no_compilation_cache)
    from fisherjax.pipeline import AnalysisConfig, analyze, parse_task_args, parse_thresholds

    flags = dict(
        out=args.out,
        model=args.model,
        tokenizer=args.tokenizer,
        tasks=parse_task_args(args.task),
        head_thresholds=parse_thresholds(args.head_threshold),
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_samples=args.max_samples,
        fisher_type=args.fisher_type,
        mode=args.mode,
        sample_grads_dtype=args.sample_grads_dtype,
        sample_grads_form=args.sample_grads_form,
        sample_grads_budget_gb=args.sample_grads_budget_gb,
        spill_dir=args.spill_dir,
        diagonal=not args.no_diagonal,
        diagonal_variance=args.diagonal_variance,
        sparsities=tuple(args.sparsity) if args.sparsity else AnalysisConfig.sparsities,
        top_k=args.top_k,
        pruning_samples=args.pruning_samples,
        seed=args.seed,
        allow_pickle=args.allow_pickle,
        save_sample_grads=args.save_sample_grads,
        progress=not args.no_progress,
        phases=tuple(p.strip() for p in args.phases.split(",") if p.strip()),
        qkov_contraction=args.qkov_contraction,
        qkov_variant=args.qkov_variant,
        qkov_fisher_pool=args.qkov_fisher_pool,
        qkov_normalize_gj=args.qkov_normalize_gj,
        qkov_aggregate=args.qkov_aggregate,
        qkov_ridge_rel=args.qkov_ridge_rel,
        conflict_scope=args.conflict_scope,
        conflict_alpha=args.conflict_alpha,
        overwrite=args.overwrite,
        truncate=args.truncate,
        devices=args.devices,
        curvature=args.curvature,
        curvature_samples=args.curvature_samples,
        curvature_k=args.curvature_k,
        head_samples=args.head_samples,
        ablation_heads=args.ablation_heads,
        probe_tokens=args.probe_tokens,
        probe_length=args.probe_length,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
        mask_units=tuple(args.mask_unit) if args.mask_unit else AnalysisConfig.mask_units,
        mask_scope=args.mask_scope,
    )
    if args.config is None:
        config = AnalysisConfig(**flags)
    else:  # the file's fields, the flags given over them, checked together (some checks relate two fields)
        from fisherjax import config_file

        from_file = config_file.read(args.config, AnalysisConfig)
        given = _given_flags(args.argv)
        try:
            config = AnalysisConfig(**{**from_file, **{k: v for k, v in flags.items() if k in given}})
        except FisherjaxError:
            try:
                AnalysisConfig(**from_file)
            except FisherjaxError as err:  # the file alone is wrong: name it
                raise type(err)(f"{args.config}: {one_line(err)}") from None
            raise
    if args.print_config:
        from fisherjax import config_file

        print(config_file.dumps(config))
        return 0
    if config.model is not None and not config.tasks:
        raise FisherjaxError("--model needs at least one --task NAME=FILE")
    _join_distributed(args)
    if cache is not None:
        compilation_cache.enable(cache)
    results = analyze(config)
    if "process" in results:
        print(f"process {results['process']}: done (Phase 1 and the pair phases); process 0 writes the outputs")
        return 0
    out = Path(config.out).absolute()
    print(f"wrote {out}  ({results['seconds']} s)")
    for name, r in results["fisher"].items():
        print(f"  {name}: {r['samples']} samples, loss/token {r['loss_per_token']:.4f}")
    print(f"  report: {out / 'report.md'}")
    return 0


def _join_distributed(args) -> None:
    """``jax.distributed.initialize`` when the command line or the environment asks for several
    processes (before anything starts a JAX backend)."""
    import os

    from fisherjax import sharding

    flags = (args.coordinator, args.num_processes, args.process_id)
    if all(f is None for f in flags) and "JAX_COORDINATOR_ADDRESS" not in os.environ:
        return
    if args.num_processes is not None and args.num_processes < 1:
        raise FisherjaxError(f"--num-processes must be ≥ 1, got {args.num_processes}")
    if args.process_id is not None and not 0 <= args.process_id < (args.num_processes or args.process_id + 1):
        raise FisherjaxError(f"--process-id must be in [0, --num-processes), got {args.process_id}")
    sharding.initialize_distributed(*flags)


def _info(args) -> int:
    from fisherjax.models import load_pretrained
    from fisherjax.pipeline import model_info

    info = model_info(load_pretrained(args.model, allow_pickle=args.allow_pickle))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ("architecture", f"{info['model_type']} (family {info['family']})"),
        ("layers", info["layers"]),
        ("heads", info["heads"]),
        ("kv heads", info["kv_heads"]),
        ("head_dim", info["head_dim"]),
        ("hidden size", info["hidden_size"]),
        ("intermediate size", info["intermediate_size"]),
        ("vocabulary", info["vocab_size"]),
        ("tied embeddings", info["tied_embeddings"]),
        ("rope", info["rope"] or "learned positions"),
        ("parameters", f"{info['parameters']:,}"),
    ]
    rows += [(f"  {role}", f"{n:,}") for role, n in sorted(info["parameters_by_role"].items())]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


PLAN_CHILD = "FISHERJAX_PLAN_DEVICES"
"""Set in the environment of the process ``plan`` re-runs itself in with forced host devices."""


def _plan(args) -> int:
    import dataclasses
    import os
    import subprocess

    import jax

    from fisherjax import backend
    from fisherjax import plan as planning

    if args.devices > len(jax.devices()) and backend.is_cpu() and PLAN_CHILD not in os.environ:
        # compile the sharded step on as many (host) devices as planned: a fresh process, because
        # the device count is fixed when jax starts
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}".strip()
        env = {**os.environ, "XLA_FLAGS": flags, PLAN_CHILD: str(args.devices), "JAX_PLATFORMS": "cpu"}
        return subprocess.run([sys.executable, "-m", "fisherjax.cli", *args.argv], env=env, check=False).returncode

    config = planning.read_config(args.model, args.config)
    options = planning.default_options().replace(fisher_type=args.fisher_type, diagonal=not args.no_diagonal, remat=args.remat)
    result = planning.plan(
        config, samples=args.samples, seq_len=args.seq_len, devices=args.devices, device_memory_gb=args.device_memory,
        tasks=args.tasks, throughput_tflops=args.tflops, host_memory_gb=args.host_memory,
        devices_per_host=args.devices_per_host, storage_dtype=args.storage_dtype, options=options,
        sample_grads_form=args.sample_grads_form,
    )
    print(json.dumps(dataclasses.asdict(result), indent=2) if args.json else planning.format_plan(result))
    return 0


# ---- export, merge, prune: results and checkpoints in Hugging Face names (fisherjax.export) ------


def _add_export_commands(sub, d) -> None:
    """The ``export``, ``merge`` and ``prune`` subparsers (``d``: AnalysisConfig, for defaults)."""
    from fisherjax.analysis import masks as masking

    e = sub.add_parser("export", help="write an analyze output's Fisher and masks as safetensors in Hugging Face names",
                       description="Read OUT/fisher_state/ of a fisherjax analyze run and write, per task, TO/TASK/diagonal.safetensors "
                       "(per-parameter diagonal Fisher, the checkpoint's own tensor names and shapes), group_fisher.safetensors and "
                       "group_sizes.safetensors (keys HF_NAME|GROUP_TYPE, one layer each) and masks.safetensors (keys HF_NAME|UNIT@SPARSITY, "
                       "uint8, 1 = keep).")
    e.add_argument("--from", dest="source", type=Path, required=True, metavar="RUN", help="an output directory of fisherjax analyze")
    e.add_argument("--to", type=Path, required=True, metavar="DIR", help="directory to write (one folder per task)")
    e.add_argument("--model", type=Path, help="the analyzed checkpoint (default: the one RUN's fisherjax-output.json names)")
    e.add_argument("--sparsity", type=float, action="append", help="sparsity of the exported masks (repeat; default: the run's)")
    e.add_argument("--unit", action="append", choices=masking.UNITS,
                   help="unit of the exported masks (repeat; default: the run's structured units, else head; parameter masks "
                        "are as large as the model in uint8)")
    e.add_argument("--scope", choices=masking.SCOPES, help="mask threshold over the model or per layer (default: the run's, else global)")
    e.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin weights")
    e.add_argument("--overwrite", action="store_true", help="replace --to even when fisherjax did not write it")

    def collection(c, what: str) -> None:
        c.add_argument("--model", type=Path, required=True, help=f"Hugging Face checkpoint directory ({what})")
        c.add_argument("--task", action="append", default=[], metavar="NAME=FILE", help="a task file, .jsonl or .txt (repeat)")
        c.add_argument("--tokenizer", type=Path, metavar="DIR", help="tokenizer files to encode the tasks with (default: the model's own)")
        c.add_argument("--out", type=Path, required=True, help="directory of the Hugging Face checkpoint to write")
        c.add_argument("--batch-size", type=int, default=d.batch_size, help=f"samples per batch (default {d.batch_size})")
        c.add_argument("--max-length", type=int, default=d.max_length, help=f"truncate samples to this many tokens (default {d.max_length})")
        c.add_argument("--max-samples", type=int, help="use at most this many samples per task (default: all)")
        c.add_argument("--truncate", action="store_true", help="cut samples longer than the model's maximum positions")
        c.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin weights (unsafe for untrusted files)")
        c.add_argument("--no-progress", action="store_true", help="no progress bars")
        c.add_argument("--overwrite", action="store_true", help="replace --out even when fisherjax did not write it")

    m = sub.add_parser("merge", help="Fisher-weighted merge of finetuned models into one Hugging Face checkpoint",
                       description="For each --finetuned NAME=DIR, the diagonal Fisher of --task NAME=FILE on that model; then "
                       "theta = sum_k F_k theta_k / sum_k F_k, written to --out with the base model's config and tokenizer.")
    collection(m, "the base: its config and tokenizer")
    m.add_argument("--finetuned", action="append", default=[], metavar="NAME=DIR",
                   help="a finetuned model, weighted by the Fisher of the task of the same NAME (repeat; at least two)")
    m.add_argument("--floor", type=float, default=1e-8, help="lower bound of every Fisher value (default 1e-8)")
    m.add_argument("--normalise", action="store_true", help="divide each model's Fisher by its sum first")

    r = sub.add_parser("prune", help="zero the units with the lowest Fisher and write a Hugging Face checkpoint",
                       description="The Fisher of the tasks (their mean, each task weighted equally), a mask at --sparsity by "
                       "--unit, the pruned weights set to zero, written to --out.")
    collection(r, "the model to prune")
    r.add_argument("--sparsity", type=float, required=True, help="fraction of units to prune, in [0, 1]")
    r.add_argument("--unit", choices=masking.UNITS, default="head", help="what to prune (default head)")
    r.add_argument("--scope", choices=masking.SCOPES, default="global", help="one threshold over the model or one per layer (default global)")


def _named_dirs(values, option: str) -> dict[str, Path]:
    """``["a=dir", ...]`` → ``{"a": Path("dir")}``, names checked (:func:`fisherjax.outdir.check_task_names`)."""
    from fisherjax.outdir import check_task_names

    out = {}
    for v in values:
        name, sep, file = v.partition("=")
        if not sep or not name or not file:
            raise FisherjaxError(f"{option} expects NAME=PATH, got {v!r}")
        out.setdefault(name, []).append(Path(file))
    check_task_names([n for n, paths in out.items() for _ in paths], option=option)
    return {n: paths[0] for n, paths in out.items()}


def _output_checked(out: Path, inputs: dict[str, Path], *, overwrite: bool, option: str = "--out") -> Path:
    """The output directory, absolute, after :func:`fisherjax.outdir.check_destination`; refused when it
    is or contains one of the ``inputs`` (``{option: path}``): it is replaced whole."""
    from fisherjax import outdir

    destination = Path(out).absolute()
    for given_option, given in inputs.items():
        source = Path(given).absolute()
        if source == destination or destination in source.parents:
            raise FisherjaxError(f"{out}: {option} is or contains {given_option} {given}, which writing it would replace; "
                                 "choose another directory")
    outdir.check_destination(destination, overwrite=overwrite)
    outdir.remove_stale_staging(destination)
    return destination


def _collection_tasks(args) -> dict[str, Path]:
    """The ``--task`` files of ``merge`` / ``prune`` after checking the collection options."""
    from fisherjax.settings import check

    check(args.batch_size >= 1, f"batch size must be ≥ 1 (--batch-size), got {args.batch_size}")
    check(args.max_length >= 2, f"max length must be ≥ 2 tokens (--max-length), got {args.max_length}")
    check(args.max_samples is None or args.max_samples >= 1, f"max samples must be ≥ 1 (--max-samples), got {args.max_samples}")
    if not args.task:
        raise FisherjaxError(f"{args.command} needs at least one --task NAME=FILE")
    return _named_dirs(args.task, "--task")


def _load(directory: Path, args, *, tokenizer: bool):
    """The checkpoint (with its tokenizer when asked; text tasks without one are refused by
    :func:`fisherjax.data.load_task`, naming the line)."""
    from fisherjax.models import load_pretrained

    return load_pretrained(directory, allow_pickle=args.allow_pickle, load_tokenizer=tokenizer,
                           tokenizer=args.tokenizer if tokenizer else None)


def _task_fisher(model, params, name: str, file: Path, args, *, diagonal: bool):
    """Phase 1 Fisher of the task file on ``params`` (``model``'s architecture and tokenizer)."""
    from fisherjax.data import batches, check_targets, load_task
    from fisherjax.fisher.collect import collect

    task = load_task(file, model.tokenizer, name=name, max_length=args.max_length,
                     max_positions=model.config.max_position_embeddings, truncate=args.truncate, vocab_size=model.config.vocab_size)
    if args.max_samples is not None:
        task = dataclasses.replace(task, examples=task.examples[: args.max_samples])
    check_targets(task, args.max_length)
    chosen = list(batches(task, args.batch_size, pad_id=model.config.pad_token_id or 0, vocab_size=model.config.vocab_size))
    return collect(model, chosen, task=name, params=params, diagonal=diagonal, progress=not args.no_progress)


def _written(destination: Path, args, write) -> None:
    """``write(staging_dir)``, then the marker, then the staging directory moved to ``destination``."""
    from fisherjax import __version__, outdir

    with outdir.staging(destination) as staged:
        write(staged)
        outdir.write_marker(staged, {"fisherjax": __version__, "command": args.command, "argv": args.argv})


def _export(args) -> int:
    from fisherjax import io, outdir
    from fisherjax.export import export_fisher, standard_masks
    from fisherjax.settings import check

    run = Path(args.source)
    states = run / "fisher_state"
    if not states.is_dir():
        raise FisherjaxError(f"{run}: --from has no fisher_state/ folder; pass an output directory of fisherjax analyze (its 'fisher' phase)")
    names = sorted(p.name for p in states.iterdir() if p.is_dir())
    if not names:
        raise FisherjaxError(f"{states}: no saved task Fisher; pass an output directory of fisherjax analyze")
    recorded = {}
    if outdir.is_fisherjax_output(run):
        recorded = json.loads((run / outdir.MARKER).read_text()).get("config") or {}
    if args.model is not None:
        model_dir = args.model
    elif not recorded:
        raise FisherjaxError(f"{run}: no {outdir.MARKER} naming the analyzed model; pass --model DIR")
    elif recorded.get("model") is None:
        from fisherjax import demo

        model_dir = demo.checkpoint_dir()
    else:
        model_dir = Path(recorded["model"])
        if not model_dir.is_dir():
            raise FisherjaxError(f"{model_dir}: the model {run} was analyzed with is not a directory here; pass --model DIR")
    sparsities = tuple(args.sparsity or recorded.get("sparsities") or _defaults().sparsities)
    for s in sparsities:
        check(0.0 <= s <= 1.0, f"sparsity must be in [0, 1] (--sparsity), got {s}")
    destination = _output_checked(args.to, {"--from": run, "the model": model_dir}, overwrite=args.overwrite, option="--to")
    model = _load(Path(model_dir), args, tokenizer=False)
    fishers = [io.load_task_fisher(states / name) for name in names]
    units = args.unit or list(recorded.get("mask_units") or ["head"])
    scope = args.scope or recorded.get("mask_scope") or "global"
    without = [f.task for f in fishers if f.diagonal is None]
    if "parameter" in units and without:
        raise FisherjaxError(f"{run}: --unit parameter needs the per-parameter diagonal Fisher, which the run did not keep for "
                             f"task(s) {', '.join(without)} (analyzed with --no-diagonal); export a structured --unit, or analyze "
                             "again without --no-diagonal")

    def write(staged: Path) -> None:
        for fisher in fishers:
            export_fisher(model, fisher, staged, masks=standard_masks(fisher, model.layout, units, sparsities, scope=scope))

    _written(destination, args, write)
    print(f"wrote {destination}  (tasks {', '.join(f.task for f in fishers)}; masks {', '.join(units)} at "
          f"{', '.join(f'{s:g}' for s in sparsities)})")
    return 0


def _merge(args) -> int:
    from fisherjax.export import check_same_architecture, merge_checkpoints

    tasks = _collection_tasks(args)
    finetuned = _named_dirs(args.finetuned, "--finetuned")
    for name in finetuned:
        if name not in tasks:
            raise FisherjaxError(f"--finetuned {name} has no --task {name}=FILE; each finetuned model is weighted by the Fisher "
                                 "of the task of its name")
    for name in tasks:
        if name not in finetuned:
            raise FisherjaxError(f"--task {name} has no --finetuned {name}=DIR; name each task after the model finetuned on it")
    if len(finetuned) < 2:
        raise FisherjaxError("merge needs at least two --finetuned NAME=DIR models")
    if not args.floor > 0:
        raise FisherjaxError(f"--floor must be > 0, got {args.floor}")
    destination = _output_checked(args.out, {"--model": args.model, **{f"--finetuned {n}": d for n, d in finetuned.items()}},
                                  overwrite=args.overwrite)
    base = _load(args.model, args, tokenizer=True)
    models = {}
    for name, directory in finetuned.items():
        models[name] = _load(directory, args, tokenizer=False)
        check_same_architecture(base, models[name], f"{directory} (--finetuned {name})")
    # every Fisher on the base's compiled step, with the finetuned parameters (one architecture)
    fishers = {name: _task_fisher(base, models[name].params, name, tasks[name], args, diagonal=True) for name in finetuned}
    _written(destination, args, lambda staged: merge_checkpoints(base, models, fishers, staged, floor=args.floor,
                                                                 normalise=args.normalise))
    print(f"wrote {destination}  (Fisher-weighted merge of {', '.join(finetuned)})")
    return 0


def _prune(args) -> int:
    from fisherjax.export import prune_checkpoint
    from fisherjax.settings import check

    tasks = _collection_tasks(args)
    check(0.0 <= args.sparsity <= 1.0, f"sparsity must be in [0, 1] (--sparsity), got {args.sparsity}")
    destination = _output_checked(args.out, {"--model": args.model}, overwrite=args.overwrite)
    model = _load(args.model, args, tokenizer=True)
    fishers = [_task_fisher(model, model.params, name, file, args, diagonal=args.unit == "parameter") for name, file in tasks.items()]
    result = {}

    def write(staged: Path) -> None:
        result["mask"] = prune_checkpoint(model, fishers, staged, sparsity=args.sparsity, unit=args.unit, scope=args.scope)[1]

    _written(destination, args, write)
    mask = result["mask"]
    print(f"wrote {destination}  (pruned {mask.n_pruned} of {mask.n_units} {args.unit} units, "
          f"{mask.param_sparsity:.1%} of the parameters)")
    return 0


def _place_matplotlib_cache(argv: list[str]) -> None:
    """``analyze`` draws figures: matplotlib's font list and config folder go beside the compilation
    cache the command line asks for, or to a temporary folder (``compilation_cache.place_matplotlib_cache``).
    Decided from the two cache flags before the parser, whose defaults import the pipeline and with
    it matplotlib; a bad cache setting is refused later, by ``analyze`` itself."""
    if not argv or argv[0] != "analyze":
        return
    from fisherjax import compilation_cache

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--compilation-cache", type=Path)
    pre.add_argument("--no-compilation-cache", action="store_true")
    known, _ = pre.parse_known_args(argv[1:])
    try:
        cache = compilation_cache.requested_dir(known.compilation_cache, known.no_compilation_cache)
    except FisherjaxError:
        cache = None
    compilation_cache.place_matplotlib_cache(cache)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    """Run a command; input errors and disk errors print one line and return 2, Ctrl-C and SIGTERM
    return 130 after the run's staging directory is removed."""
    import signal

    from fisherjax.errors import disk_errno, disk_error

    from fisherjax import allocator, backend

    backend.use_compiler_flags()  # before any computation starts XLA
    allocator.use_one_arena()  # before XLA starts its threads: see fisherjax.allocator
    argv = list(sys.argv[1:] if argv is None else argv)
    _place_matplotlib_cache(argv)
    _quiet_background_logs()  # before the parser, whose defaults import matplotlib
    args = build_parser().parse_args(argv)
    args.argv = argv
    previous = signal.signal(signal.SIGTERM, _interrupt) if _main_thread() else None
    try:
        return {"analyze": _analyze, "info": _info, "plan": _plan, "export": _export, "merge": _merge, "prune": _prune}[args.command](args)
    except FisherjaxError as err:
        print(f"fisherjax: error: {one_line(err)}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except OSError as err:
        if not disk_errno(err):
            raise
        print(f"fisherjax: error: {one_line(disk_error(err, getattr(args, 'out', Path('.')), 'the output'))}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("fisherjax: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _quiet_background_logs() -> None:
    """orbax reports a failed background write (a full disk) again from its own threads — absl and
    asyncio log records with tracebacks, and "Event loop is closed" from tensorstore callbacks that
    fire after orbax's loop has shut down — after the error has reached the caller; the command
    line reports it once, itself. Any other uncaught exception keeps its traceback. matplotlib's
    font manager warns when it cannot save its font list (the same full disk, or a read-only cache
    folder); the list is only a cache, so that warning is dropped too (its errors stay). So is
    JAX's warning that it could not write an entry of the compilation cache (a full disk, a file
    size limit): the entry is compiled again next time, and a full disk under ``--out`` is the
    run's own one line."""
    import logging
    import warnings

    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Error writing persistent compilation cache entry", category=UserWarning)
    original = sys.unraisablehook

    def unraisablehook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        original(unraisable)

    sys.unraisablehook = unraisablehook


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
