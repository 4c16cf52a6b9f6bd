"""Conflicts on a mesh, GPT-2-small-shaped: parameter slices against chunk pairs of samples (issue 21).

``conflicts.detect`` of two tasks of ``--samples`` synthetic bfloat16 attention gradients of GPT-2
small's shape (as ``fisherjax analyze`` keeps them), whitened by their mean Fisher, per group, both
references, on ``--devices`` forced host devices (a CPU; set before jax is imported, so this script
sets ``XLA_FLAGS`` itself). Two routes, interleaved ``--rounds`` times in one process:

* **slices** — stored tasks read a parameter slice at a time, each slice's rows split over
  ``"data"`` and the slice replicated (the default);
* **chunks** — chunk pairs of ``--chunk`` samples (``chunk_size=``), B read once per chunk of A: what
  a mesh did before, at the default 4 GB budget (``4e9 / (16 · 28.3 M features)`` = 8 samples).

Prints each run's seconds and the largest difference of the two routes' cosines.

Usage::

    python3 benchmarks/mesh_conflicts.py --samples 32 --devices 4 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=32, help="samples per task (default 32)")
    parser.add_argument("--devices", type=int, default=4, help="forced host devices (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--chunk", type=int, default=8, help="the chunk route's samples per chunk (default 8)")
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}".strip()

    import jax.numpy as jnp
    import numpy as np

    from fisherjax.analysis import conflicts
    from fisherjax.config import DecoderConfig
    from fisherjax.fisher.options import attention_paths
    from fisherjax.fisher.state import SampleGrads
    from fisherjax.layout import layout_for
    from fisherjax.models.hf import abstract_params
    from fisherjax.sharding import make_mesh

    config = DecoderConfig(model_type="gpt2", family="gpt2", vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
                           num_kv_heads=12, head_dim=64, intermediate_size=3072, max_position_embeddings=1024, norm_eps=1e-5,
                           activation="gelu_new", tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True, rope=None)
    layout = layout_for(config, abstract_params(config))
    paths = attention_paths(layout)
    n = args.samples

    def task(seed: int) -> SampleGrads:
        rng = np.random.default_rng(seed)
        grads = {p: rng.standard_normal((n,) + layout.spec(p).shape, np.float32).astype(jnp.bfloat16) for p in paths}
        return SampleGrads(np.arange(n) + 1000 * seed, rng.integers(80, 120, n), grads)

    a, b = task(1), task(2)
    fisher_a, fisher_b = a.fisher(paths), b.fisher(paths)
    fisher = {p: (fisher_a[p] + fisher_b[p]) / 2 for p in paths}
    mesh = make_mesh(args.devices)
    seconds, cosines = {}, {}
    for r in range(args.rounds):
        for name, options in (("slices", {}), (f"chunks of {args.chunk}", {"chunk_size": args.chunk})):
            start = time.perf_counter()
            report = conflicts.detect(a, b, layout=layout, fisher=fisher, mesh=mesh, **options)
            seconds.setdefault(name, []).append(round(time.perf_counter() - start, 1))
            cosines[name] = report.cosines
            print(f"round {r}: {name} {seconds[name][-1]} s", flush=True)
    first, second = cosines.values()
    print(seconds, "largest |Δ cosine|", float(np.abs(first - second).max()))


if __name__ == "__main__":
    main()
