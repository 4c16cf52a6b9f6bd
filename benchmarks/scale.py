"""Sharding cost and scaling: collect, the QK-OV heatmap and conflict detection on 1, 2, 4 devices.

Each device count runs in its own subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=D``
on a CPU; on a GPU machine the first D of its devices), on the same random model (a small
GPT-2-shaped decoder, ``--layers``/``--d``) and the same random tasks: Phase 1 with kept attention
gradients and the full diagonal (``collect(..., mesh=)``), then the heatmap and ``conflicts.detect``
on the kept gradients. The first call of each pays its compilation and is not timed. Rounds
interleave the device counts (1, 2, 4, 1, 2, 4, ...) so a noisy machine hurts each alike, and every
figure is reported as a ratio to one device *in the same round*.

On a CPU the forced "devices" share the machine's cores: there the question is what sharding costs
(the collectives, the padding, the per-device programs), not whether it scales.

Usage::

    python benchmarks/scale.py                       # 1, 2, 4 devices, 3 rounds
    python benchmarks/scale.py --devices 1,2,4,8 --rounds 2 --samples 32 --json /tmp/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORKER = "worker"


def worker(devices: int, args) -> dict:
    """One device count: the timings of this process (its devices set before jax is imported)."""
    import jax
    import numpy as np

    from fisherjax import Model
    from fisherjax.analysis import conflicts, qkov
    from fisherjax.config import DecoderConfig
    from fisherjax.data import batches, task_from_tokens
    from fisherjax.fisher.collect import collect
    from fisherjax.sharding import make_mesh

    config = DecoderConfig(
        model_type="gpt2", family="gpt2", vocab_size=512, hidden_size=args.d, num_layers=args.layers, num_heads=args.d // 32,
        num_kv_heads=args.d // 32, head_dim=32, intermediate_size=4 * args.d, max_position_embeddings=256, norm_eps=1e-5,
        activation="gelu_new", tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True, rope=None,
    )
    model = Model.init(config, seed=0)
    rng = np.random.default_rng(0)
    tasks = {name: task_from_tokens(name, [rng.integers(3, 512, size=args.seq).tolist() for _ in range(args.samples)])
             for name in ("a", "b")}
    mesh = make_mesh(devices) if devices > 1 else None
    data = {name: list(batches(task, args.batch)) for name, task in tasks.items()}

    def timed(fn):
        fn()  # compilation and warm-up
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out

    options = dict(keep_sample_grads=True, diagonal=True, progress=False, mesh=mesh)
    seconds, fa = timed(lambda: collect(model, data["a"], task="a", **options))
    fb = collect(model, data["b"], task="b", **options)
    out = {"devices": len(jax.devices()), "collect_s": seconds, "collect_samples_per_s": args.samples / seconds}
    out["qkov_s"], _ = timed(lambda: qkov.heatmap(fa, fb, model.layout, mesh=mesh))
    out["conflicts_s"], _ = timed(lambda: conflicts.detect(fa, fb, layout=model.layout, scope="groups", mesh=mesh))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="1,2,4", help="device counts, comma-separated (default 1,2,4)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=32, help="samples per task (default 32)")
    parser.add_argument("--batch", type=int, default=8, help="global batch (default 8)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--json", help="write the per-round figures here")
    parser.add_argument(WORKER, nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--worker-devices", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == WORKER:
        print(json.dumps(worker(args.worker_devices, args)))
        return

    counts = [int(d) for d in args.devices.split(",")]
    forwarded = [f"--{k}={getattr(args, k)}" for k in ("samples", "batch", "seq", "layers", "d")]
    rounds = []
    for r in range(args.rounds):
        row = {}
        for d in counts:
            env = dict(os.environ)
            if env.get("JAX_PLATFORMS", "cpu").startswith("cpu") and "CUDA_VISIBLE_DEVICES" not in env:
                env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={d}".strip()
            else:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(d))
            proc = subprocess.run([sys.executable, __file__, WORKER, f"--worker-devices={d}", *forwarded], env=env,
                                  capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            row[d] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"round {r}  devices {d}: " + ", ".join(f"{k} {v:.3g}" for k, v in row[d].items() if k != "devices"), flush=True)
        rounds.append(row)
    print("\nratio to one device in the same round (median over rounds; < 1 is faster):")
    import numpy as np

    for key in ("collect_s", "qkov_s", "conflicts_s"):
        ratios = {d: float(np.median([row[d][key] / row[counts[0]][key] for row in rounds])) for d in counts}
        print(f"  {key:<12} " + "  ".join(f"{d} dev: {v:.2f}" for d, v in ratios.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rounds": rounds}, f, indent=1)


if __name__ == "__main__":
    main()
