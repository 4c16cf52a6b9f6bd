"""The head-pruning experiment's pass shape on this machine: rows a pass against time (issue 23).

Runs :func:`fisherjax.analysis.experiments.masked_loss_sums` (one mask a pass, as a CPU takes them)
with ``--masks`` random head masks over 32 samples of 128 positions, every position predicted, cut
into passes of each ``--rows`` rows (filler rows pad the last pass), alternating the row counts
round by round so that the machine's drift falls on all of them alike. It is what
``backend.rows_per_pass`` decides on a CPU: at most a batch of the run's rows a pass.

Usage::

    python3 benchmarks/end_to_end.py --shape small --samples 64 --keep     # builds WORK/gpt2-small
    python3 benchmarks/scoring_rows.py --model WORK/gpt2-small --rows 8,11,16,32 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=false")  # the command line's XLA:CPU flags

import numpy as np  # noqa: E402

from fisherjax.analysis.experiments import masked_loss_sums  # noqa: E402
from fisherjax.models.hf import load_pretrained  # noqa: E402

SAMPLES, LENGTH = 32, 128


def passes(model, rows: int, rng) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``SAMPLES`` random samples of ``LENGTH`` tokens in passes of ``rows`` (the last padded)."""
    total = -(-SAMPLES // rows) * rows
    ids = rng.integers(0, model.config.vocab_size, (total, LENGTH)).astype(np.int32)
    mask = np.ones((total, LENGTH), np.int32)
    mask[SAMPLES:] = 0
    mask[SAMPLES:, 0] = 1  # a filler row keeps one position, so no query row is all masked
    labels = np.where(mask == 1, ids, -100).astype(np.int32)
    return [(ids[s : s + rows], mask[s : s + rows], labels[s : s + rows]) for s in range(0, total, rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Hugging Face checkpoint directory")
    parser.add_argument("--rows", default="8,11,16,32", help="rows a pass, comma-separated")
    parser.add_argument("--masks", type=int, default=4, help="random head masks evaluated")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model = load_pretrained(args.model)
    rng = np.random.default_rng(0)
    keeps = rng.random((args.masks, model.config.num_layers, model.config.num_heads)) < 0.5
    sizes = [int(r) for r in args.rows.split(",")]
    data = {r: passes(model, r, rng) for r in sizes}

    def run(rows: int) -> float:
        return sum(float(np.asarray(masked_loss_sums(model, model.params, keeps, *p, unit="head", masks_per_pass=1)).sum())
                   for p in data[rows])

    for rows in sizes:  # compile every shape first
        run(rows)
    seconds = {r: [] for r in sizes}
    for _ in range(args.rounds):
        for rows in sizes:
            start = time.perf_counter()
            run(rows)
            seconds[rows].append(time.perf_counter() - start)
    print(f"| rows a pass | passes | seconds ({args.masks} masks, {SAMPLES} samples × {LENGTH}, rounds alternating) |")
    print("|---|---|---|")
    for rows in sizes:
        print(f"| {rows} | {len(data[rows])} | {' / '.join(f'{s:.2f}' for s in seconds[rows])} |")


if __name__ == "__main__":
    main()
