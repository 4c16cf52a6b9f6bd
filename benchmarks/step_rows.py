"""Phase 1's step at several rows a step: the same samples as one step of a batch or as several
smaller ones (how :func:`fisherjax.fisher.step.micro_batch` splits a batch).

Each split ``RxS`` runs ``S`` steps of ``R`` rows × ``--seq`` random tokens with ``analyze``'s
Phase 1 options (kept bfloat16 attention gradients in the form ``analyze`` chooses, the full
diagonal), fetching every step's outputs as the collection does; the splits alternate for
``--rounds`` rounds after one untimed run each (compilation). Prints seconds per split and round.

    python3 benchmarks/step_rows.py --model smollm-135m --splits 9x2,8x2,4x4,16x1
    python3 benchmarks/step_rows.py --model gpt2-small --splits 16x1,8x2,4x4
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from profile_phase1 import build

from fisherjax.fisher.step import compiled_step, initial_state, make_plan
from fisherjax.pipeline import AnalysisConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-small", help="gpt2-small | smollm-135m | tiny (profile_phase1.py's shapes)")
    parser.add_argument("--splits", default="16x1,8x2,4x4", help="comma-separated ROWSxSTEPS")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = build(args.model)
    options = AnalysisConfig(out="/dev/null", model="-", tasks=(("a", "-"),)).collect_options(model.layout, args.seq)
    step = compiled_step(model, make_plan(model.layout, options))
    rng, key = np.random.default_rng(0), jax.random.key(0)
    splits = [tuple(int(x) for x in s.split("x")) for s in args.splits.split(",")]

    def run(rows: int, steps: int) -> float:
        state = initial_state(model, make_plan(model.layout, options))
        start = time.perf_counter()
        for _ in range(steps):
            ids = jnp.asarray(rng.integers(0, model.config.vocab_size, (rows, args.seq)), jnp.int32)
            state, *outputs = step(model.params, state, ids, jnp.ones_like(ids), ids, jnp.arange(rows), key)
            jax.device_get(outputs)
        jax.block_until_ready(state)
        return time.perf_counter() - start

    for rows, steps in splits:
        run(rows, 1)
    seconds = {split: [] for split in splits}
    for _ in range(args.rounds):
        for split in splits:
            seconds[split].append(run(*split))
    print(f"{args.model}, T = {args.seq}, seconds per split (rounds alternating):")
    for (rows, steps), s in seconds.items():
        print(f"| {rows} rows × {steps} | {' / '.join(f'{x:.2f}' for x in s)} |")


if __name__ == "__main__":
    main()
