"""``fisherjax`` command line: ``analyze`` runs the phases, ``info`` describes a checkpoint.

Errors caused by input (a checkpoint, a task file, an option) print one line on stderr and exit
with code 2, without a traceback; nothing is written to the output directory in that case.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fisherjax.errors import FisherjaxError
from fisherjax.fisher.options import FISHER_TYPES, MODES, STORAGE_DTYPES
from fisherjax.pipeline import QKOV_CONTRACTIONS, AnalysisConfig

EXIT_INPUT_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fisherjax",
        description="Where a language model stores a task, and where two tasks collide.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    a = sub.add_parser(
        "analyze",
        help="run every phase on a model and its tasks (the shipped demo by default)",
        description="Collect per-sample Fisher information for each task, then importance, pruning masks, "
        "mask overlap, sample conflicts and QK-OV interference. With no arguments it runs on the shipped "
        "demo model and its 'math' and 'copy' tasks.",
    )
    a.add_argument("--model", type=Path, help="Hugging Face checkpoint directory (config.json + *.safetensors + tokenizer)")
    a.add_argument("--task", action="append", default=[], metavar="NAME=FILE",
                   help="a task: .jsonl with 'text' or 'prompt'+'completion' per line, or .txt with one text per line (repeat)")
    a.add_argument("--out", type=Path, default=Path("fisherjax-out"), help="output directory (default: ./fisherjax-out)")
    a.add_argument("--batch-size", type=int, default=16, help="samples per batch (default 16)")
    a.add_argument("--max-length", type=int, default=256, help="truncate samples to this many tokens (default 256)")
    a.add_argument("--max-samples", type=int, help="use at most this many samples per task")
    a.add_argument("--fisher-type", choices=FISHER_TYPES, default="empirical",
                   help="empirical (data labels), true (labels sampled from the model) or per_token (default empirical)")
    a.add_argument("--mode", choices=MODES, default="welford", help="accumulation (default welford)")
    a.add_argument("--contribution-dtype", choices=tuple(STORAGE_DTYPES), default="float32",
                   help="storage dtype of per-sample contributions (default float32)")
    a.add_argument("--contribution-budget-gb", type=float, default=8.0,
                   help="host memory allowed for per-sample contributions per task (default 8 GB)")
    a.add_argument("--spill-dir", type=Path,
                   help="write per-sample contributions beyond the budget to this directory (memory-mapped)")
    a.add_argument("--no-diagonal", action="store_true", help="skip the full per-parameter diagonal (no unstructured masks)")
    a.add_argument("--sparsity", type=float, action="append", help="pruning sparsity level (repeat; default 0.5 0.7 0.9)")
    a.add_argument("--top-k", type=int, default=20, help="rows in the top-k tables (default 20)")
    a.add_argument("--phases", default=",".join(AnalysisConfig.phases),
                   help=f"comma-separated phases to run (default: all of {','.join(AnalysisConfig.phases)})")
    a.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    a.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin weights (unsafe for untrusted files)")
    a.add_argument("--save-contributions", action="store_true", help="also store per-sample contributions in fisher_state/")
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
    a.add_argument("--qkov-contraction", choices=QKOV_CONTRACTIONS, default="auto",
                   help="how the QK-OV kernel evaluates a slice's contraction: auto (looped on CPU, batched elsewhere), "
                        "batched, looped, or pallas (one pass over the inputs, a Triton kernel for GPUs)")

    i = sub.add_parser("info", help="describe a checkpoint: architecture, layers, heads, parameter counts",
                       description="Print the architecture, layers, heads, kv heads, head_dim and parameter counts.")
    i.add_argument("model", type=Path, help="Hugging Face checkpoint directory")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin weights")
    return parser


def _analyze(args) -> int:
    from fisherjax.pipeline import analyze, parse_task_args

    config = AnalysisConfig(
        out=args.out,
        model=args.model,
        tasks=parse_task_args(args.task),
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_samples=args.max_samples,
        fisher_type=args.fisher_type,
        mode=args.mode,
        contribution_dtype=args.contribution_dtype,
        contribution_budget_gb=args.contribution_budget_gb,
        spill_dir=args.spill_dir,
        diagonal=not args.no_diagonal,
        sparsities=tuple(args.sparsity) if args.sparsity else (0.5, 0.7, 0.9),
        top_k=args.top_k,
        seed=args.seed,
        allow_pickle=args.allow_pickle,
        save_contributions=args.save_contributions,
        progress=not args.no_progress,
        phases=tuple(p.strip() for p in args.phases.split(",") if p.strip()),
        qkov_contraction=args.qkov_contraction,
    )
    if args.model is not None and not args.task:
        raise FisherjaxError("--model needs at least one --task NAME=FILE")
    results = analyze(config)
    out = Path(config.out).absolute()
    print(f"wrote {out}  ({results['seconds']} s)")
    for name, r in results["fisher"].items():
        print(f"  {name}: {r['samples']} samples, loss/token {r['loss_per_token']:.4f}")
    print(f"  report: {out / 'report.md'}")
    return 0


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


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"analyze": _analyze, "info": _info}[args.command](args)
    except FisherjaxError as err:
        print(f"fisherjax: error: {err}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("fisherjax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
