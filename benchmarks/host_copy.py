"""Device-to-host copy speed: the pageable copy behind ``np.asarray`` of a device array against a
``device_put`` into page-locked host memory (memory kind ``"pinned_host"``) then ``np.asarray``
(what :func:`fisherjax.backend.start_host_copy` does on an accelerator).

The array is what Phase 1 keeps of a batch: 16 GPT-2-small samples' attention gradients in
bfloat16 (16 × 28.3 M values, 906 MB). Rounds alternate the two routes; each route's copy is timed
from a ready device array to a filled numpy array. Usage: ``python3 benchmarks/host_copy.py
[--mb 906] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=906.0, help="megabytes (10^6 bytes) per copy")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    n = int(args.mb * 1e6 / 2)
    x = jax.block_until_ready(jnp.arange(n, dtype=jnp.float32).astype(jnp.bfloat16))

    def pageable():
        y = x + 0  # a fresh device array each time, so no host copy is cached
        y.block_until_ready()
        t = time.perf_counter()
        y.copy_to_host_async()
        np.asarray(y)
        return time.perf_counter() - t

    def pinned():
        y = x + 0
        y.block_until_ready()
        t = time.perf_counter()
        np.asarray(jax.device_put(y, y.sharding.with_memory_kind("pinned_host")))
        return time.perf_counter() - t

    pageable(), pinned()  # warm-up
    times = {"pageable": [], "pinned": []}
    for _ in range(args.rounds):
        times["pageable"].append(pageable())
        times["pinned"].append(pinned())
    out = {"device": str(jax.devices()[0].device_kind), "megabytes": args.mb,
           **{f"{k}_gb_per_s": round(args.mb / 1e3 / float(np.median(v)), 3) for k, v in times.items()},
           "seconds": {k: [round(t, 4) for t in v] for k, v in times.items()}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
