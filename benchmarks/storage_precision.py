"""What storing the kept attention gradients in bfloat16 changes in Phases 5 and 6.

Collects each task twice on the same weights and samples — kept per-sample gradients stored in
float32 and in bfloat16 (the step forms them in float32 and casts them for storage) — then runs
the QK-OV heatmap of every ordered task pair and the conflict detection of every pair on both,
as ``fisherjax analyze`` does, and prints how far the bfloat16 results are from the float32 ones:

* QK-OV: ``‖S_bf16 − S_f32‖_F / ‖S_f32‖_F`` of the scores per block and of the layer × head
  averages, the largest error relative to the largest score, and how many of the top 20 sample
  pairs per block are the same;
* conflicts: the largest change of a whitened cosine (cosines lie in [−1, 1]), the relative error
  of the cosine matrix, and whether the same pairs are significant.

With ``--factors`` the bfloat16 run keeps every attention kernel as its token factors
(``sample_grads_factors=True``, :mod:`fisherjax.fisher.factored`); with ``--auto`` the kernels
``fisherjax analyze``'s default (``--sample-grads-form auto``) keeps as factors at the batches'
longest length (:func:`fisherjax.fisher.factored.smaller_as_factors`): the errors are then those of
bfloat16 factors against float32 gradients.

Usage: python benchmarks/storage_precision.py [--model DIR --task NAME=FILE ...] [--max-samples N]
[--batch-size B] [--factors | --auto] (default: the shipped demo model and tasks).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time

import numpy as np

import fisherjax
from fisherjax.analysis import conflicts, qkov
from fisherjax.data import batches, load_task
from fisherjax.fisher.factored import smaller_as_factors
from fisherjax.fisher.options import attention_paths


def relative(a: np.ndarray, b: np.ndarray) -> float:
    """``‖a − b‖_F / ‖b‖_F`` in float64 (0 when both are zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norm = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / norm) if norm > 0 else float(np.linalg.norm(a))


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = 20) -> float:
    """Fraction of the ``k`` largest entries of ``b`` that are also among the ``k`` largest of ``a``."""
    k = min(k, a.size)
    top = lambda x: set(np.argpartition(x.ravel(), -k)[-k:].tolist())  # noqa: E731
    return len(top(a) & top(b)) / k


def qkov_errors(low: qkov.QKOVResult, ref: qkov.QKOVResult) -> dict:
    blocks = {}
    for index, block in enumerate(ref.blocks):
        s, r = low.scores[index], ref.scores[index]
        blocks[block] = {
            "scores_rel_fro": relative(s, r),
            "max_abs_over_max": float(np.abs(s - r).max() / max(np.abs(r).max(), 1e-30)),
            "layer_head_avg_rel_fro": relative(low.layer_head_avg[index], ref.layer_head_avg[index]),
            "top20_pairs_same": top_overlap(s.sum(-1).sum(0), r.sum(-1).sum(0)),
        }
    return blocks


def conflict_errors(low: conflicts.ConflictReport, ref: conflicts.ConflictReport) -> dict:
    return {
        "cosines_max_abs": float(np.abs(low.cosines - ref.cosines).max()),
        "cosines_rel_fro": relative(low.cosines, ref.cosines),
        "significant_f32": int(ref.significant.sum()),
        "significant_bf16": int(low.significant.sum()),
        "significant_agree": float((low.significant == ref.significant).mean()),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--task", action="append", default=[])
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--json", default=None)
    form = p.add_mutually_exclusive_group()
    form.add_argument("--factors", action="store_true", help="the bfloat16 run keeps the attention kernels as token factors")
    form.add_argument("--auto", action="store_true", help="the bfloat16 run keeps as factors the kernels analyze's default does")
    args = p.parse_args()
    if args.model is None:
        from fisherjax import demo

        model_dir, files = demo.checkpoint_dir(), dict(demo.task_files())
    else:
        model_dir, files = args.model, dict(t.split("=", 1) for t in args.task)
    model = fisherjax.load_pretrained(model_dir)
    tasks = {}
    for name, file in files.items():
        task = load_task(file, model.tokenizer, name=name, max_length=args.max_length)
        tasks[name] = task if args.max_samples is None else dataclasses.replace(task, examples=task.examples[: args.max_samples])
    fishers = {}
    task_batches = {name: list(batches(task, args.batch_size, pad_id=model.config.pad_token_id or 0)) for name, task in tasks.items()}
    factors = args.factors
    if args.auto:
        longest = max(b.input_ids.shape[1] for bs in task_batches.values() for b in bs)
        factors = smaller_as_factors(model.layout, attention_paths(model.layout), longest)
        print(f"bfloat16 run keeps as factors: {', '.join(factors) or 'none'}", flush=True)
    for dtype in ("float32", "bfloat16"):
        for name in tasks:
            started = time.perf_counter()
            fishers[dtype, name] = fisherjax.collect(
                model, task_batches[name], task=name, keep_sample_grads=True, sample_grads_dtype=dtype, progress=False,
                sample_grads_factors=factors if dtype == "bfloat16" else False,
            )
            print(f"collected {name} ({dtype}) in {time.perf_counter() - started:.1f} s", flush=True)
    layout = model.layout
    out = {"model": str(model_dir), "samples": {n: len(t) for n, t in tasks.items()}, "factors": factors, "qkov": {}, "conflicts": {}}
    for a, b in itertools.permutations(tasks, 2):
        ref = qkov.heatmap(fishers["float32", a], fishers["float32", b], layout)
        low = qkov.heatmap(fishers["bfloat16", a], fishers["bfloat16", b], layout)
        out["qkov"][f"{a}|{b}"] = qkov_errors(low, ref)
    for a, b in itertools.combinations(tasks, 2):
        kw = dict(layout=layout, scope="groups", names=(a, b))
        ref = conflicts.detect(fishers["float32", a], fishers["float32", b], **kw)
        low = conflicts.detect(fishers["bfloat16", a], fishers["bfloat16", b], **kw)
        out["conflicts"][f"{a}|{b}"] = conflict_errors(low, ref)
    print(json.dumps(out, indent=2))
    worst = max(v["scores_rel_fro"] for pair in out["qkov"].values() for v in pair.values())
    print(f"worst QK-OV score error (relative Frobenius, any block/pair): {worst:.2e}")
    print(f"worst conflict cosine change: {max(v['cosines_max_abs'] for v in out['conflicts'].values()):.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
