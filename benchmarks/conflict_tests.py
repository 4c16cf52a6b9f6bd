"""Phase 5's per-group tests against the samples per task: time and host memory (issue 23).

``conflicts.detect`` in the per-group scope (``fisherjax analyze``'s when it fits: ``--conflict-scope
auto``) on two tasks of synthetic float32 gradients of a 12-layer, 12-head attention with 8-wide
heads: GPT-2 small's 576 (block, layer, head) groups over 446 k parameters, so the Grams cost
next to nothing and what is measured is the tests — p-values of every (group, pair) against both
within-task references (pooled null), q-values over all of them, the findings. Each sample count
runs in a fresh process (its peak is its own). Prints, per count: seconds, the peak resident
memory above the start, and that peak per (group, pair) of ``G · (n_a·n_b + n_a² + n_b²)``; what
``conflicts.group_scope_bytes`` says at the share of tests this run kept; and the host core-seconds
per (group, pair), seconds ×
the cores the tests run on (``backend.available_cores``) over that count, and that over
``log2(G · n_a · n_b)``: the rate ``conflicts.GROUP_TEST_CORE_SECONDS`` states; and the share of
the A × B tests kept (``p ≤ alpha``: :class:`~fisherjax.analysis.conflicts.group_tests.GroupTests`).

Independent tasks keep about ``alpha`` of their tests. ``--shift S`` adds ``S`` times one random
direction to every sample of A and subtracts it from every sample of B: with ``S = 1`` every group's
cross-task cosines sit far below the within-task ones, so every test is kept and significant — the
per-group scope's most memory.

Usage::

    python3 benchmarks/conflict_tests.py --samples 64,128,256 [--shift 1]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys


def resident_bytes() -> int:
    """This process's resident memory now (``VmRSS``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def measure(n: int, shift: float = 0.0) -> dict:
    """One count, in this process."""
    import gc

    import numpy as np

    from fisherjax import backend, telemetry
    from fisherjax.analysis import conflicts
    from fisherjax.config import DecoderConfig
    from fisherjax.fisher.options import attention_paths
    from fisherjax.fisher.state import SampleGrads
    from fisherjax.layout import layout_for
    from fisherjax.models.hf import abstract_params
    from fisherjax.pipeline import conflict_open_groups

    config = DecoderConfig(model_type="gpt2", family="gpt2", vocab_size=64, hidden_size=96, num_layers=12, num_heads=12,
                           num_kv_heads=12, head_dim=8, intermediate_size=96, max_position_embeddings=64, norm_eps=1e-5,
                           activation="gelu_new", tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True, rope=None)
    layout = layout_for(config, abstract_params(config))
    paths = attention_paths(layout)

    direction = {p: np.random.default_rng(0).standard_normal(layout.spec(p).shape).astype(np.float32) for p in paths}

    def task(seed: int, sign: float) -> SampleGrads:
        rng = np.random.default_rng(seed)
        return SampleGrads(np.arange(n), np.full(n, 100), {p: rng.standard_normal((n, *layout.spec(p).shape), np.float32)
                                                           + sign * shift * direction[p] for p in paths})

    a, b = task(1, 1.0), task(2, -1.0)
    fisher = {p: np.ones(layout.spec(p).shape, np.float32) for p in paths}
    gc.collect()
    start = resident_bytes()
    report, stretch = telemetry.measure(conflicts.detect, a, b, layout=layout, fisher=fisher, scope="groups")
    groups = len(report.groups.is_head)
    extra = stretch.peak_rss_bytes - start
    values = conflicts.group_test_values(n, n, groups)
    kept = len(report.group_tests.index) / report.group_tests.tested
    held = conflict_open_groups(layout, n, n)
    return {"samples": n, "groups": groups, "seconds": round(stretch.seconds, 1), "extra_peak_gb": round(extra / 1e9, 2),
            "bytes_per_group_pair": round(extra / values),
            "model_gb": round(conflicts.group_scope_bytes(n, n, groups, kept, open_groups=held) / 1e9, 2),
            "cores": backend.available_cores(), "core_us_per_group_pair": round(1e6 * stretch.seconds * backend.available_cores() / values, 3),
            "core_us_per_doubling": round(1e6 * stretch.seconds * backend.available_cores() / values / math.log2(groups * n * n), 4),
            "kept": round(kept, 4), "significant": report.group_tests.n_significant}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", default="64,128,256", help="samples per task, comma-separated (default 64,128,256)")
    parser.add_argument("--shift", type=float, default=0.0, help="A's samples + S·u, B's − S·u for one random u (default 0)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(measure(args.worker, args.shift)))
        return
    print("| samples per task | seconds | extra peak GB | bytes per (group, pair) | group_scope_bytes GB | cores | core-µs per (group, pair) "
          "| per doubling of G·n_a·n_b | tests kept | significant |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.samples.split(",")):
        out = subprocess.run([sys.executable, __file__, "--worker", str(n), "--shift", str(args.shift)], capture_output=True, text=True,
                             check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {n} | {row['seconds']} | {row['extra_peak_gb']} | {row['bytes_per_group_pair']} | {row['model_gb']} | {row['cores']} "
              f"| {row['core_us_per_group_pair']} | {row['core_us_per_doubling']} | {row['kept']} | {row['significant']} |", flush=True)


if __name__ == "__main__":
    main()
