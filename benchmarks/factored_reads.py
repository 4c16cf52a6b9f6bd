"""Reads of kept token factors (``fisher.factored.FactoredGrads``): where the gradients are formed,
and what Phase 6 costs on them.

Two parts, GPT-2-small shapes (12 layers, QKV kernel 768 × 2304, 128 positions, bfloat16 factors as
``fisherjax analyze`` keeps them):

* ``--part reads``: forming ``--samples`` samples × 3 layers of the QKV kernel's gradients (a QK-OV
  tile's read) — with numpy's BLAS on the host, widening the factors to float32 in groups of 64 MB
  and writing into a fresh array (the route before the twenty-first session), against
  ``FactoredGrads.on_device`` (XLA), interleaved round by round; wall, user and system seconds of
  each call (``getrusage``), so that time the kernel spends on page faults shows.
* ``--part qkov``: Phase 1 with kept factors on two tasks of ``--samples`` random token sequences of
  80–120 tokens (vocabulary 512: the unembedding is not what is measured), then ``--rounds`` rounds of
  one ``qkov.heatmap`` and one ``qkov.heldout_permutation_test`` (1000 permutations), the API's
  calls for one ordered pair. Run it from a worktree of another commit (``PYTHONPATH=WORKTREE``)
  to compare code.
* ``--part ways``: the same Phase 1, then ``qkov.both_ways`` — both directions with their tests,
  as ``fisherjax analyze`` scores the pair — by its shared pass and direction by direction
  (``host_bytes=0``), interleaved, each with its wall time and the peak RSS during the call
  (``fisherjax.telemetry``), and whether the two give the same numbers.
* ``--part fit``: Phase 1 as ``fisherjax analyze`` runs it (``pipeline.task_batches`` and
  ``collect_all``: each task's held-out fit half collected first, its Fisher recorded on the way),
  then ``qkov.both_ways`` with that record and without it (``partial_diagonal=None``: the fit
  halves read for their Fisher), interleaved, with wall time, peak RSS and whether they agree.

Usage: python3 benchmarks/factored_reads.py --part reads [--samples 64] [--rounds 4]
       python3 benchmarks/factored_reads.py --part qkov [--samples 64] [--rounds 2] [--save FILE.npz]
       python3 benchmarks/factored_reads.py --part ways [--samples 64] [--rounds 2]
       python3 benchmarks/factored_reads.py --part fit [--samples 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import time

import jax
import ml_dtypes
import numpy as np

from fisherjax import Model, telemetry
from fisherjax.analysis import qkov
from fisherjax.config import DecoderConfig
from fisherjax.data import batches, task_from_tokens
from fisherjax.fisher.collect import collect
from fisherjax.fisher.factored import FactoredGrads
from fisherjax.fisher.options import CollectOptions
from fisherjax.pipeline import AnalysisConfig, collect_all, task_batches

LAYERS, SEQ, D_IN, D_OUT = 12, 128, 768, 2304


def usage() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def resident_bytes() -> int:
    """The process's resident memory now (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def numpy_formed(inputs: np.ndarray, deltas: np.ndarray, group_bytes: float = 64e6) -> np.ndarray:
    """``Aᵀ Δ`` of ``[m, T, d_in]`` and ``[m, T, d_out]`` factors with numpy on the host: the factors
    widened to float32 a group at a time, written into one fresh float32 array."""
    out = np.empty((len(inputs), inputs.shape[-1], deltas.shape[-1]), np.float32)
    step = max(1, int(group_bytes // (4 * (inputs[0].size + deltas[0].size))))
    for i in range(0, len(inputs), step):
        np.matmul(np.swapaxes(inputs[i : i + step].astype(np.float32), -1, -2), deltas[i : i + step].astype(np.float32), out=out[i : i + step])
    return out


def reads(samples: int, rounds: int) -> None:
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((samples, LAYERS, SEQ, D_IN), np.float32).astype(ml_dtypes.bfloat16)
    deltas = rng.standard_normal((samples, LAYERS, SEQ, D_OUT), np.float32).astype(ml_dtypes.bfloat16)
    kept = FactoredGrads(inputs, deltas)
    key = (slice(0, samples), slice(0, 3))
    routes = {
        "numpy on the host": lambda: numpy_formed(inputs[key].reshape(-1, SEQ, D_IN), deltas[key].reshape(-1, SEQ, D_OUT)),
        "XLA (on_device)": lambda: jax.block_until_ready(kept.on_device(key)),
    }
    flops = 2.0 * SEQ * samples * 3 * D_IN * D_OUT
    gb = 4.0 * samples * 3 * D_IN * D_OUT / 1e9
    for fn in routes.values():
        fn()  # compile, first touch
    print(f"{samples} samples × 3 layers of a {D_IN} × {D_OUT} kernel from {SEQ} positions: {flops / 1e9:.0f} GFLOP, {gb:.2f} GB formed")
    print("| round | route | wall s | GFLOP/s | user s | system s |\n|---|---|---|---|---|---|")
    for r in range(rounds):
        for name, fn in routes.items():
            u0, s0 = usage()
            start = time.perf_counter()
            out = fn()
            wall = time.perf_counter() - start
            u1, s1 = usage()
            del out
            print(f"| {r + 1} | {name} | {wall:.2f} | {flops / wall / 1e9:.0f} | {u1 - u0:.2f} | {s1 - s0:.2f} |", flush=True)


def gpt2_small_attention(vocab: int = 512) -> Model:
    config = DecoderConfig(model_type="gpt2", family="gpt2", vocab_size=vocab, hidden_size=D_IN, num_layers=LAYERS, num_heads=12,
                           num_kv_heads=12, head_dim=64, intermediate_size=4 * D_IN, max_position_embeddings=256, norm_eps=1e-5,
                           activation="gelu_new", tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True)
    return Model.init(config, seed=0)


def qkov_pair(samples: int, rounds: int, save: str | None, both_ways: bool = False) -> None:
    model = gpt2_small_attention()
    rng = np.random.default_rng(0)
    options = CollectOptions(keep_sample_grads=True, sample_grads_factors=True, sample_grads_dtype="bfloat16", diagonal=True)
    start = time.perf_counter()
    fishers = {}
    for name in "ab":
        tokens = [rng.integers(1, 512, size=int(rng.integers(80, 120))).tolist() for _ in range(samples)]
        task_batches = list(batches(task_from_tokens(name, tokens), 8, pad_id=0, vocab_size=512))
        fishers[name] = collect(model, task_batches, task=name, options=options, progress=False)
    print(f"Phase 1 of {samples} + {samples} samples, kept factors: {time.perf_counter() - start:.1f} s", flush=True)
    a, b = fishers["a"], fishers["b"]
    if both_ways:  # the pair as analyze scores it: the shared pass against direction by direction, interleaved
        routes = {"shared pass": None, "by direction": 0.0}  # host_bytes=0 leaves the shared pass no room
        for r in range(rounds):
            found = {}
            for route, host_bytes in routes.items():
                before = resident_bytes()
                found[route], stretch = telemetry.measure(
                    lambda: list(qkov.both_ways(a, b, model.layout, fraction=0.5, split_seed=0, n_permutations=1000, seed=0,
                                                host_bytes=host_bytes)))
                print(f"round {r + 1}: both ways (two heatmaps, two held-out tests), {route}: {stretch.seconds:.1f} s, "
                      f"peak RSS {stretch.peak_rss_bytes / 1e9:.2f} GB ({before / 1e9:.2f} GB at its start)", flush=True)
            shared, alone = found.values()
            print("  largest relative difference of the heatmaps: "
                  f"{max(float(np.abs(s.heatmap.scores - d.heatmap.scores).max() / np.abs(d.heatmap.scores).max()) for s, d in zip(shared, alone)):.1e}"
                  f"; p-values that differ: {sum(int((s.test.pvalues != d.test.pvalues).sum()) for s, d in zip(shared, alone))} of "
                  f"{sum(s.test.pvalues.size for s in shared)}, by at most "
                  f"{max(float(np.abs(s.test.pvalues - d.test.pvalues).max()) for s, d in zip(shared, alone)) * 1001:.0f} / 1001", flush=True)
            del found, shared, alone
        print(f"formed once (host memory available now): {qkov.formed_once(len(a.sample_grads), len(b.sample_grads), model.layout)}")
        return
    for r in range(rounds):
        start = time.perf_counter()
        result = qkov.heatmap(a, b, model.layout)
        heatmap_s = time.perf_counter() - start
        start = time.perf_counter()
        test = qkov.heldout_permutation_test(a, b, model.layout, fraction=0.5, split_seed=0, n_permutations=1000, seed=0)
        print(f"round {r + 1}: heatmap {heatmap_s:.1f} s, permutation test {time.perf_counter() - start:.1f} s", flush=True)
    if save:
        np.savez(save, **qkov.to_arrays(result), pvalues=test.pvalues, observed=test.observed)


def fit_first(samples: int, rounds: int) -> None:
    """``--part fit`` (module docstring)."""
    model = gpt2_small_attention()
    rng = np.random.default_rng(0)
    tasks = {name: task_from_tokens(name, [rng.integers(1, 512, size=int(rng.integers(80, 120))).tolist() for _ in range(samples)])
             for name in "ab"}
    config = AnalysisConfig(batch_size=8, sample_grads_form="factors", sample_grads_dtype="bfloat16", seed=0, progress=False)
    start = time.perf_counter()
    fishers, _ = collect_all(model, task_batches(model, tasks, config), config)
    print(f"Phase 1 of {samples} + {samples} samples, kept factors, fit halves first: {time.perf_counter() - start:.1f} s", flush=True)
    recorded = [f.partial_diagonal is not None for f in fishers.values()]
    print(f"fit halves' Fisher recorded by Phase 1: {recorded}", flush=True)
    cases = {"recorded": fishers, "read": {n: dataclasses.replace(f, partial_diagonal=None) for n, f in fishers.items()}}
    for r in range(rounds):
        found = {}
        for case, pair in sorted(cases.items(), reverse=bool(r % 2)):  # alternating which runs first
            found[case], stretch = telemetry.measure(
                lambda: list(qkov.both_ways(pair["a"], pair["b"], model.layout, fraction=0.5, split_seed=config.seed, n_permutations=1000,
                                            seed=0)))
            print(f"round {r + 1}: both ways, fit halves' Fisher {case}: {stretch.seconds:.1f} s, peak RSS "
                  f"{stretch.peak_rss_bytes / 1e9:.2f} GB (shared pass: {found[case][0].shared})", flush=True)
        ours, theirs = found["recorded"], found["read"]
        print("  heatmaps equal: "
              f"{all(np.array_equal(x.heatmap.scores, y.heatmap.scores) for x, y in zip(ours, theirs))}; observed statistic within "
              f"{max(float(np.linalg.norm(x.test.observed - y.test.observed) / np.linalg.norm(y.test.observed)) for x, y in zip(ours, theirs)):.1e}"
              f" (norm-relative); p-values that differ: {sum(int((x.test.pvalues != y.test.pvalues).sum()) for x, y in zip(ours, theirs))}"
              f" of {sum(x.test.pvalues.size for x in ours)}", flush=True)
        del found, ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("reads", "qkov", "ways", "fit"), required=True)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=None, help="default: 4 (reads), 2 (qkov)")
    parser.add_argument("--save", help="qkov: write the heatmap's arrays and the test's p-values here (to compare commits)")
    args = parser.parse_args()
    if args.part == "reads":
        reads(args.samples, args.rounds or 4)
    elif args.part == "fit":
        fit_first(args.samples, args.rounds or 2)
    else:
        qkov_pair(args.samples, args.rounds or 2, args.save, both_ways=args.part == "ways")


if __name__ == "__main__":
    main()
