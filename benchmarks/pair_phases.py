"""The pair phases on stored per-sample gradients: Phase 5 (``conflicts.detect``) read by parameter
slice against chunk pairs, and Phase 6 (``qkov.heatmap``) from bfloat16 and float32 storage.

    python benchmarks/pair_phases.py                       # 4 layers, d 768, 64 samples per task
    python benchmarks/pair_phases.py --layers 12 --samples 32 --repeats 2

A GPT-2-shaped model with random weights (``Model.init``: ``--layers``, d = ``--width``, heads of
64, vocabulary 512) and two tasks of ``--samples`` random sequences of ``--tokens`` tokens are
collected once per storage dtype (``collect(keep_sample_grads=True)``, as ``analyze`` keeps them).
Then, interleaved ``--repeats`` times on the same stored gradients:

* ``conflicts slices``: ``detect`` with the defaults (one pass over parameter slices);
* ``conflicts chunks``: ``detect`` with ``chunk_size`` set to what the 4 GB budget gives chunk pairs
  (``gram.chunk_size_for``), the path taken before parameter slices;
* ``conflicts float32``: ``detect`` by slices on float32 storage (bfloat16's error, issue 23 item 4);
* ``qkov bfloat16`` / ``qkov float32``: ``heatmap`` with the defaults on each storage.

Each line gives wall seconds and the process's peak RSS so far (``ru_maxrss``: it only grows, so
run one mode per process with ``--only`` to attribute peaks). The first repeat includes
compilation. Cosines of the two Phase 5 paths, and each phase's bfloat16 results against float32
storage, are compared at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import numpy as np

from fisherjax import Model
from fisherjax.analysis import conflicts, qkov
from fisherjax.analysis.conflicts.gram import chunk_size_for
from fisherjax.analysis.conflicts.sources import as_stream
from fisherjax.config import DecoderConfig
from fisherjax.data import batches, task_from_tokens
from fisherjax.fisher.collect import collect

MODES = ("conflicts slices", "conflicts chunks", "conflicts float32", "qkov bfloat16", "qkov float32")


def model_of(layers: int, width: int) -> Model:
    config = DecoderConfig(
        model_type="gpt2", family="gpt2", vocab_size=512, hidden_size=width, num_layers=layers, num_heads=width // 64,
        num_kv_heads=width // 64, head_dim=64, intermediate_size=4 * width, max_position_embeddings=256, norm_eps=1e-5,
        activation="gelu_new", tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True,
    )
    return Model.init(config, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--samples", type=int, default=64, help="samples per task")
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", help="comma-separated modes: " + ", ".join(MODES))
    args = parser.parse_args()
    modes = [m.strip() for m in args.only.split(",")] if args.only else list(MODES)
    model = model_of(args.layers, args.width)
    rng = np.random.default_rng(0)
    tasks = {name: task_from_tokens(name, [rng.integers(3, 512, size=args.tokens).tolist() for _ in range(args.samples)]) for name in "ab"}
    dtypes = sorted({"float32" if m.endswith("float32") else "bfloat16" for m in modes})
    stored = {
        dtype: {name: collect(model, batches(task, 16), task=name, keep_sample_grads=True, sample_grads_dtype=dtype, progress=False)
                for name, task in tasks.items()}
        for dtype in dtypes
    }
    half = stored.get("bfloat16")
    chunk = chunk_size_for(None, as_stream(half["a"]), as_stream(half["b"])) if half else None
    collected = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(json.dumps(dict(machine=platform.node(), layers=args.layers, width=args.width, samples=args.samples, tokens=args.tokens,
                          chunk_pairs_chunk=chunk, peak_rss_gb_after_collection=round(collected, 2))), flush=True)
    results = {}
    for repeat in range(args.repeats):
        for mode in modes:
            start = time.perf_counter()
            if mode.startswith("conflicts"):
                fishers = stored["float32"] if mode.endswith("float32") else half
                results[mode] = conflicts.detect(fishers["a"], fishers["b"], layout=model.layout, names=("a", "b"),
                                                 chunk_size=chunk if mode.endswith("chunks") else None)
            else:
                fishers = stored[mode.split()[1]]
                results[mode] = qkov.heatmap(fishers["a"], fishers["b"], model.layout)
            seconds = time.perf_counter() - start
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
            print(json.dumps(dict(repeat=repeat, mode=mode, seconds=round(seconds, 2), peak_rss_gb=round(peak, 2))), flush=True)
    if {"conflicts slices", "conflicts chunks"} <= set(results):
        diff = np.abs(results["conflicts slices"].cosines - results["conflicts chunks"].cosines).max()
        print(json.dumps(dict(conflicts_max_cosine_difference=float(diff))))
    if {"conflicts slices", "conflicts float32"} <= set(results):
        a, b = results["conflicts slices"].cosines, results["conflicts float32"].cosines
        print(json.dumps(dict(conflicts_bfloat16_max_cosine_difference=float(np.abs(a - b).max()),
                              conflicts_bfloat16_relative_frobenius=float(np.linalg.norm(a - b) / np.linalg.norm(b)))))
    if {"qkov bfloat16", "qkov float32"} <= set(results):
        a, b = results["qkov bfloat16"].scores, results["qkov float32"].scores
        print(json.dumps(dict(qkov_bfloat16_relative_frobenius=float(np.linalg.norm(a - b) / np.linalg.norm(b)))))


if __name__ == "__main__":
    main()
