"""QK-OV tiles cut into groups of heads, with a layer's stored samples staged on the device or read
from the host by every group: one heatmap of a Llama-shaped attention (default Llama-7B's: d 4096,
32 heads, 512 positions, bfloat16 token factors of every attention kernel, as ``fisherjax analyze``
keeps them at 7B), ``--samples`` per task, ``--layers`` layers.

The factors are one random block per kernel, the same for every sample (broadcast views: no host
memory, the same bytes to move and form; the scores are for timing, ``tests/test_qkov.py`` checks
the values).
For each route, interleaved over ``--rounds`` after a warm-up call: wall seconds, the bytes of
token factors moved to the device, how often a score array forms task B (``qkov.partner_reads``),
and the largest relative difference of the scores from the first route's.

Usage (a GPU: the tile budget is half the free memory unless ``--budget`` says)::

    python3 benchmarks/head_groups.py --samples 256 --layers 2
    python3 benchmarks/head_groups.py --d 256 --heads 4 --seq 32 --samples 16 --layers 1 --budget 2e6   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import time

import jax
import ml_dtypes
import numpy as np

from fisherjax import backend
from fisherjax.analysis import qkov
from fisherjax.fisher.factored import FactoredGrads
from fisherjax.fisher.state import SampleGrads
from fisherjax.layout import FAMILY_RULES, ModelLayout


def llama_layout(layers: int, d: int, heads: int, kv_heads: int) -> ModelLayout:
    """The attention kernels' layout of a Llama-shaped model, from shape-only (zero-stride) arrays."""
    hd = d // heads
    shapes = {"layers/self_attn/q_proj/kernel": (layers, d, heads * hd), "layers/self_attn/k_proj/kernel": (layers, d, kv_heads * hd),
              "layers/self_attn/v_proj/kernel": (layers, d, kv_heads * hd), "layers/self_attn/o_proj/kernel": (layers, heads * hd, d)}
    params = {p: np.broadcast_to(np.float32(0), s) for p, s in shapes.items()}
    return ModelLayout.from_rules(params, FAMILY_RULES["llama"], num_heads=heads, num_kv_heads=kv_heads, head_dim=hd, num_layers=layers,
                                  layered="layers/")


def task(layout: ModelLayout, n: int, seq: int, seed: int) -> SampleGrads:
    """``n`` samples of bfloat16 token factors for every attention kernel: one random block per
    kernel and factor, the same for every sample, as read-only broadcast views."""
    rng = np.random.default_rng(seed)
    grads = {}
    for path in layout.paths():
        layers, d_in, d_out = layout.spec(path).shape
        a = rng.standard_normal((1, layers, seq, d_in), np.float32).astype(ml_dtypes.bfloat16)
        g = (0.1 * rng.standard_normal((1, layers, seq, d_out), np.float32)).astype(ml_dtypes.bfloat16)
        grads[path] = FactoredGrads(np.broadcast_to(a, (n, layers, seq, d_in)), np.broadcast_to(g, (n, layers, seq, d_out)))
    return SampleGrads(np.arange(n), np.full(n, seq), grads)


MOVED = {"bytes": 0.0}
"""Bytes of token factors moved host → device by the reads and staging of the current call."""


def count_moves() -> None:
    """Count what ``FactoredGrads`` reads and stages move to the device (a read of staged factors
    moves nothing), by wrapping its two public methods."""
    on_device, staged = FactoredGrads.on_device, FactoredGrads.staged

    def read(self, key=(), place=None, pad_to=None):
        value = on_device(self, key, place, pad_to)
        if isinstance(self.inputs, np.ndarray):
            d_in, d_out = self.shape[-2:]
            MOVED["bytes"] += value.size / (d_in * d_out) * self.inputs.shape[-2] * (d_in + d_out) * self.inputs.itemsize
        return value

    def stage(self, key=(), place=None):
        value = staged(self, key, place)
        MOVED["bytes"] += value.inputs.nbytes + value.deltas.nbytes
        return value

    FactoredGrads.on_device, FactoredGrads.staged = read, stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=256, help="samples per task (default 256)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--budget", type=float, default=None, help="tile budget in bytes (default: the backend's)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    backend.use_compiler_flags()
    layout = llama_layout(args.layers, args.d, args.heads, args.kv_heads or args.heads)
    a, b = task(layout, args.samples, args.seq, 1), task(layout, args.samples, args.seq, 2)
    kernel = qkov.KernelOptions(contraction="batched", memory_budget_bytes=args.budget)
    stored = qkov.stored_sample_layer_bytes((a.grads, b.grads), layout)
    print(f"{backend.platform()}: {args.samples} + {args.samples} samples, {args.layers} layer(s), d {args.d}, {args.heads} heads, "
          f"T {args.seq}; tile budget {kernel.budget_bytes() / 1e9:.2f} GB")
    routes = {"staged": True, "from the host": False}
    for name, staged in routes.items():
        reads = qkov.partner_reads(args.samples, args.samples, layout, False, kernel, sample_layer_bytes=stored if staged else None)
        print(f"  {name}: B formed {reads:g} time(s) a score array")
    count_moves()
    first, times = None, {name: [] for name in routes}
    for r in range(args.rounds + 1):
        for name, staged in routes.items():
            backend.stages_reads = lambda staged=staged: staged  # the route, whatever the backend
            MOVED["bytes"] = 0.0
            start = time.perf_counter()
            scores = qkov.heatmap(a, b, layout, contraction="batched", memory_budget_bytes=args.budget, include_bias=False,
                                  min_fisher_samples=2).scores
            seconds = time.perf_counter() - start
            first = scores if first is None else first
            if r:  # the first round compiles
                times[name].append(seconds)
                diff = float(np.max(np.abs(scores - first)) / max(float(np.max(np.abs(first))), 1e-30))
                print(f"round {r}: {name} {seconds:.2f} s, {MOVED['bytes'] / 1e6:.1f} MB of factors moved to the device "
                      f"(scores differ from the first route's by {diff:.1e} of their largest)")
    for name, seconds in times.items():
        print(f"{name}: best {min(seconds):.2f} s of {len(seconds)}")
    jax.clear_caches()


if __name__ == "__main__":
    main()
