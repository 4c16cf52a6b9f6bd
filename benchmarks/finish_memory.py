"""Host memory of finishing QK-OV scores: ``qkov._scores.assemble`` of a heatmap's slice sums
(GPT-2-small shape: 12 layers, 12 heads, ``--samples`` × ``--samples`` pairs, four blocks), the
process's resident memory sampled every 2 ms by a thread, its peak above what the sums take.

Usage: python3 benchmarks/finish_memory.py [--samples 700]
Run it from a worktree of another commit (``PYTHONPATH=WORKTREE``) to compare code.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np

from fisherjax.analysis.qkov import _scores
from fisherjax.layout import ATTENTION_BLOCKS

LAYERS, HEADS = 12, 12


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=700)
    n = parser.parse_args().samples
    rng = np.random.default_rng(0)
    raw = {block: rng.standard_normal((LAYERS, n, n, HEADS), np.float32) for block in ATTENTION_BLOCKS}
    scores = sum(x.nbytes for x in raw.values())
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=watch)
    base = resident_bytes()
    thread.start()
    _scores.assemble(raw, np.ones(n, np.float32), [1, 1, 1, 1], np.arange(HEADS), "mean")
    done.set()
    thread.join()
    print(f"scores {scores / 1e9:.2f} GB; finishing took {(peak[0] - base) / 1e9:.2f} GB more "
          f"({(peak[0] - base) / scores:.2f} of the scores)")


if __name__ == "__main__":
    main()
