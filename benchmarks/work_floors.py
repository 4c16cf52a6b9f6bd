"""Each phase of a ``fisherjax analyze`` run against the floor of its work (issue 23).

Reads a run's ``results.json`` (per-phase seconds, samples per task, the pruning experiment's
masks) and its checkpoint's ``config.json``, takes each phase's matrix-product FLOPs from the run's
own count over its batches where it has one (Phase 1, the heads and masks phases:
``phases.NAME.work_tflop``, :mod:`fisherjax.work`) and otherwise from ``fisherjax plan``'s formulas
(through :func:`fisherjax.plan.plan`, at the run's samples per task, tasks and ``--seq-len``, the
length the batches were padded to; the masks phase with the run's own number of masks), measures this machine's float32 GEMM rate under
XLA in the same process (two shapes of the model: a dense layer of 16 × T rows and a 128-row tile
of the unembedding; the larger rate is kept, so the floors are lower bounds), and prints per phase:
seconds, floor TFLOP, achieved GFLOP/s, the floor's seconds at the measured rate, and measured /
floor. With ``--torch-seconds``, also the whole run's floor against issue 23's target (3 × the
torch loop), and the counted work over the loop's own (Phase 1's work, which the loop does): the
ratio the run would have at the loop's own rate.

Phases without a matrix-product count (loading, Phase 7, importance, the report, the categories'
probes) are one "other" row.

Usage::

    python3 benchmarks/end_to_end.py --shape small --samples 64 --keep   # keeps WORK/results-1.json
    python3 benchmarks/work_floors.py --model WORK/gpt2-small --results WORK/results-1.json --seq-len 128 --torch-seconds 114
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=false")  # what `fisherjax analyze` runs with on a CPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fisherjax import plan as planning  # noqa: E402

COUNTED = ("collect", "curvature", "heads", "masks", "conflicts", "qkov")
PLAN_DEVICE_GB = 8.0
"""Device memory the plan is asked for: its step's memory plays no part here, and a small device
stops its micro-batch search after a few compilations."""


def gemm_rate(m: int, k: int, n: int, rounds: int = 5) -> float:
    """FLOP/s of XLA's float32 ``[m, k] × [k, n]`` on this machine, the best of ``rounds`` after a warm-up."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((m, k), np.float32))
    y = jnp.asarray(np.random.default_rng(1).standard_normal((k, n), np.float32))
    product = jax.jit(lambda a, b: a @ b)
    product(x, y).block_until_ready()
    best = np.inf
    for _ in range(rounds):
        start = time.perf_counter()
        product(x, y).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * m * k * n / best


def masks_evaluated(results: dict) -> int:
    """Masks the pruning experiment evaluated on each task: every task's Fisher mask, the random
    ones and the categories' (and the unpruned model when Phase 1's losses could not be used)."""
    experiment = results["masks"]["head_pruning"]
    tasks = experiment["tasks"]
    first = next(iter(tasks.values()))
    return len(tasks) + int(experiment["n_random"]) + len(first.get("loss_extra", {})) + (first["loss_before_from"] != "phase 1")


def floors(config, results: dict, seq_len: int) -> dict[str, float]:
    """Matrix-product FLOPs of each counted phase of the run (:data:`COUNTED`): the run's own count
    over its batches where ``results.json`` has one (``phases.NAME.work_tflop``: Phase 1, the heads
    and masks phases), else the plan's formulas at ``seq_len``."""
    samples = {t["samples"] for t in results["tasks"].values()}
    if len(samples) != 1:
        raise SystemExit(f"the tasks have different sample counts {sorted(samples)}; the plan's formulas take one")
    n, tasks = samples.pop(), len(results["tasks"])
    p = planning.plan(config, samples=n, seq_len=seq_len, tasks=tasks, device_memory_gb=PLAN_DEVICE_GB)
    work = {"collect": p.phase1_flops, "heads": p.heads_flops, "conflicts": p.phase5_flops, "qkov": p.phase6_flops}
    if "masks" in results.get("phases", {}):
        work["masks"] = p.masks_flops / p.masks * masks_evaluated(results)
    comparison = results.get("method_comparison") or {}
    if "curvature" in results.get("phases", {}) and "skipped" not in comparison:
        work["curvature"] = p.curvature.flops
    own = {name: 1e12 * entry["work_tflop"] for name, entry in results.get("phases", {}).items() if "work_tflop" in entry}
    return {**work, **own}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="the run's checkpoint directory (its config.json)")
    parser.add_argument("--results", required=True, help="the run's results.json")
    parser.add_argument("--seq-len", type=int, required=True, help="tokens the batches were padded to (the bucket of the run's samples)")
    parser.add_argument("--torch-seconds", type=float, help="the torch loop's wall seconds on the same samples (end_to_end.py)")
    args = parser.parse_args()
    results = json.loads(open(args.results).read())
    config = planning.read_config(model_dir=args.model)
    work = floors(config, results, args.seq_len)
    d, vocab = config.hidden_size, config.vocab_size
    rates = {"dense": gemm_rate(16 * args.seq_len, d, 4 * d), "unembedding": gemm_rate(128, d, vocab)}
    rate = max(rates.values())
    phases = {name: v["seconds"] for name, v in results["phases"].items() if name != "total"}
    print(f"XLA float32 GEMM rate here: dense [{16 * args.seq_len}, {d}] × [{d}, {4 * d}] {rates['dense'] / 1e9:.0f} GFLOP/s, "
          f"unembedding [128, {d}] × [{d}, {vocab}] {rates['unembedding'] / 1e9:.0f} GFLOP/s; floors at {rate / 1e9:.0f}.\n")
    print("| phase | seconds | floor TFLOP | achieved GFLOP/s | floor s at that rate | measured / floor |")
    print("|---|---|---|---|---|---|")
    floor_total = 0.0
    for name in COUNTED:
        if name not in phases or name not in work:
            continue
        seconds, flops = phases[name], work[name]
        floor_total += flops / rate
        ratio = f"{seconds / (flops / rate):.2f}" if flops else "—"
        print(f"| {name} | {seconds:.1f} | {flops / 1e12:.2f} | {flops / seconds / 1e9:.0f} | {flops / rate:.1f} | {ratio} |")
    other = sum(s for name, s in phases.items() if name not in work)
    print(f"| other ({', '.join(sorted(n for n in phases if n not in work))}) | {other:.1f} | — | — | — | — |")
    total = results["phases"]["total"]["seconds"]
    print(f"| total | {total:.1f} | {sum(work.values()) / 1e12:.2f} | — | {floor_total:.1f} | {total / floor_total:.2f} |")
    if args.torch_seconds:
        t = args.torch_seconds
        print(f"\nThe counted phases' floor at this rate is {floor_total:.0f} s: {floor_total / t:.2f}× the torch loop's {t:g} s; "
              f"with the other stretches as measured, {floor_total + other:.0f} s: {(floor_total + other) / t:.2f}× "
              f"(issue 23's target: ≤ 3×, {3 * t:.0f} s, for the whole run).")
        if "collect" in work:  # the loop does Phase 1's work: the forward, the pullback and the per-sample products
            times_loop = sum(work.values()) / work["collect"]  # the run's work over the loop's: its time at the loop's rate, in loops
            print(f"The torch loop does Phase 1's work ({work['collect'] / 1e12:.2f} TFLOP) at {work['collect'] / t / 1e9:.0f} GFLOP/s; "
                  f"the counted phases' work is {times_loop:.2f}× that, so at the loop's own rate they alone would take "
                  f"{times_loop * t:.0f} s, {times_loop:.2f}× the loop (fisherjax's whole run: {total / t:.2f}×).")


if __name__ == "__main__":
    main()
