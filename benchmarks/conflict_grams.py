"""Phase 5's Grams on kept token factors: how long forming the gradients and multiplying them take.

``conflicts.detect`` in the per-group scope, as ``fisherjax analyze`` runs it at GPT-2 small's size
when Phase 1 keeps the attention kernels as token factors: two tasks of ``--samples`` samples,
GPT-2 small's attention (``configs/gpt2-small.json``: 12 layers, QKV kernel 768 × 2304 and output
kernel 768 × 768 as bfloat16 factors at 128 positions, biases as arrays), random factors, a flat
Fisher. The command line's XLA flags are applied. Each round prints the call's seconds and, summed
over its parameter slices, the seconds spent forming the kept gradients (``fisher.factored.form``)
and in the slices' whitening and dot products (``conflicts.gram.slice_dots``), each waited for;
the rest is the tests and the host's reading of the slices. With the FLOPs of each part, the rates
show how far each runs from the machine's GEMM rate (``benchmarks/factored_reads.py --part reads``
measures formation alone).

Usage::

    python3 benchmarks/conflict_grams.py --samples 64 --rounds 2
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from fisherjax import backend

SEQ = 128
CONFIG = Path(__file__).parent / "configs" / "gpt2-small.json"


def kept_factors(layout, paths, n: int, seed: int):
    """A task's attention gradients as Phase 1 keeps them: ``[layers, d_in, d_out]`` kernels as
    bfloat16 token factors at :data:`SEQ` positions, biases as float32 arrays; random values."""
    from fisherjax.fisher.factored import FactoredGrads
    from fisherjax.fisher.state import SampleGrads

    rng = np.random.default_rng(seed)
    grads = {}
    for path in paths:
        shape = layout.spec(path).shape
        if len(shape) == 3:
            inputs = rng.standard_normal((n, shape[0], SEQ, shape[1]), np.float32).astype(ml_dtypes.bfloat16)
            deltas = rng.standard_normal((n, shape[0], SEQ, shape[2]), np.float32).astype(ml_dtypes.bfloat16)
            grads[path] = FactoredGrads(inputs, deltas)
        else:
            grads[path] = rng.standard_normal((n, *shape), np.float32)
    return SampleGrads(np.arange(n), np.full(n, 100), grads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=64, help="samples per task (default 64)")
    parser.add_argument("--rounds", type=int, default=2, help="calls of conflicts.detect (default 2; the first compiles)")
    args = parser.parse_args()
    backend.use_compiler_flags()
    from fisherjax.analysis import conflicts
    from fisherjax.config import read_hf_config
    from fisherjax.fisher.options import attention_paths
    from fisherjax.layout import layout_for
    from fisherjax.models.hf import abstract_params

    gram = importlib.import_module("fisherjax.analysis.conflicts.gram")
    factored = importlib.import_module("fisherjax.fisher.factored")
    config, _ = read_hf_config(CONFIG)
    layout = layout_for(config, abstract_params(config))
    paths = attention_paths(layout)
    a, b = (kept_factors(layout, paths, args.samples, seed) for seed in (1, 2))
    n = args.samples
    fisher = {p: np.ones(layout.spec(p).shape, np.float32) for p in paths}
    kernel_params = sum(int(np.prod(layout.spec(p).shape)) for p in paths if len(layout.spec(p).shape) == 3)
    all_params = sum(int(np.prod(layout.spec(p).shape)) for p in paths)
    form_flop = 2 * n * 2 * SEQ * kernel_params  # both tasks, every sample once
    dot_flop = 3 * 2 * n * n * all_params  # A × B, A × A, B × B

    spent = {"form": 0.0, "slice_dots": 0.0}

    def timed(name, function):
        def run(*call_args, **kwargs):
            start = time.perf_counter()
            out = jax.block_until_ready(function(*call_args, **kwargs))
            spent[name] += time.perf_counter() - start
            return out
        return run

    factored.form = timed("form", factored.form)
    gram.slice_dots = timed("slice_dots", gram.slice_dots)
    print(f"{n} + {n} samples; forming {form_flop / 1e9:.0f} GFLOP, Grams {dot_flop / 1e9:.0f} GFLOP")
    print("| round | detect s | forming s (GFLOP/s) | slice_dots s (GFLOP/s) | rest s |")
    print("|---|---|---|---|---|")
    for round_ in range(1, args.rounds + 1):
        spent.update(form=0.0, slice_dots=0.0)
        start = time.perf_counter()
        conflicts.detect(a, b, layout=layout, fisher=fisher, scope="groups")
        total = time.perf_counter() - start
        rest = total - spent["form"] - spent["slice_dots"]
        print(f"| {round_} | {total:.1f} | {spent['form']:.1f} ({form_flop / 1e9 / spent['form']:.0f}) | "
              f"{spent['slice_dots']:.1f} ({dot_flop / 1e9 / spent['slice_dots']:.0f}) | {rest:.1f} |", flush=True)


if __name__ == "__main__":
    main()
