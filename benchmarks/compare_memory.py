"""The method comparison's time and memory on the end-to-end benchmark's model shapes.

``curvature.compare.compare_methods`` with ``fisherjax analyze``'s Phase 1 options (bfloat16 kept
gradients, the run's compiled step) on a random GPT-2 with GPT-2's vocabulary (fisherjax's own
initialisation): ``--shape tiny``, 4 layers d = 256 (16.6 M parameters), or ``small``, GPT-2
small's 12 layers d = 768 (124 M); 32 samples of 80–120 random tokens in batches of 16: the
process's peak RSS (``/proc/self/status`` polled every 10 ms; the process starts at about 0.5 GB),
the wall time, each method's stretch (seconds, peaks of the host and, on an accelerator, the device,
compilations) and the top eigenvalues. With
``--slices S`` the comparison gets ``compare.rest_bytes`` (one sample's passes) and an ``S``-th of
its gradients' bytes, so it does not hold them and forms its Gram from column slices of them
(``compare.gram_slices`` says how many), K-FAC's stage then in one group of parameters; with
``--least`` it gets ``compare.least_bytes``, the least it runs in: the Gram in the most slices,
K-FAC's stage in the most groups (``compare.stage_plan``) and every pass a sample at a time. Run
one process per setting to compare peaks.

Usage: python benchmarks/compare_memory.py [--shape tiny|small] [--samples 32] [--k 10] [--slices S | --least]
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from fisherjax.config import DecoderConfig
from fisherjax.curvature import compare
from fisherjax.data import batches, task_from_tokens
from fisherjax.models import Model
from fisherjax.pipeline import AnalysisConfig


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--shape", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--slices", type=int, default=1, help="give it memory for its gradients in this many column slices")
    parser.add_argument("--least", action="store_true", help="give it the least memory it runs in")
    args = parser.parse_args()
    peak = [0.0]

    def poll():
        while True:
            peak[0] = max(peak[0], rss_gb())
            time.sleep(0.01)

    threading.Thread(target=poll, daemon=True).start()
    vocab = 50257
    width, layers, heads = (256, 4, 4) if args.shape == "tiny" else (768, 12, 12)
    config = DecoderConfig(
        model_type="gpt2", family="gpt2", vocab_size=vocab, hidden_size=width, num_layers=layers, num_heads=heads,
        num_kv_heads=heads, head_dim=64, intermediate_size=4 * width, max_position_embeddings=256, norm_eps=1e-5, activation="gelu_new",
        tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True,
    )
    model = Model.init(config, seed=0)
    rng = np.random.default_rng(0)
    task = task_from_tokens("t", [rng.integers(1, vocab, size=int(rng.integers(80, 121))).tolist() for _ in range(args.samples)])
    chosen = list(batches(task, 16, pad_id=0, vocab_size=vocab))
    start_rss = rss_gb()
    start = time.time()
    options = AnalysisConfig().collect_options()
    memory = None
    rows, tokens = sum(len(b.sample_ids) for b in chosen), compare.pass_tokens(chosen)
    if args.slices > 1:
        gradients = rows * model.num_params * np.dtype(compare.gram_dtype(options.sample_grads_dtype)).itemsize
        memory = compare.rest_bytes(model, tokens[1], tokens[1]) + gradients / args.slices + 2 * rows  # a column's slack for the rounding
    elif args.least:
        memory = compare.least_bytes(model, args.k, n=rows, sample_grads_dtype=options.sample_grads_dtype, tokens=tokens[0],
                                     sample_tokens=tokens[1])
    if memory is not None:
        slices = compare.gram_slices(model, rows, options.sample_grads_dtype, memory, *tokens)
        per_pass, parts = compare.stage_plan(model, memory, max(len(b.sample_ids) for b in chosen), tokens[1])
        print(f"memory_bytes {memory / 1e9:.2f} GB: {len(slices or ())} column slice(s) of the gradients, K-FAC's stage in "
              f"{len(parts)} group(s), {per_pass} sample(s) a pass")
    result = compare.compare_methods(model, chosen, k=args.k, options=options, memory_bytes=memory)
    print(f"compare_methods: {time.time() - start:.1f} s, peak RSS {peak[0]:.2f} GB (process at {start_rss:.2f} GB before)")
    print(f"lanczos: {result.methods['lanczos'].notes}")
    for name in ("lanczos", "kfac", "diagonal"):
        m = result.methods[name]
        print(f"{name} top {np.array2string(m.top[:4], precision=6)} probe error {m.probe_error} "
              f"rayleigh {None if m.rayleigh is None else np.array2string(m.rayleigh[:3], precision=6)}")
    print("| method | seconds | peak RSS GB | device peak GB | compilations |\n|---|---|---|---|---|")
    for name, method in result.methods.items():
        s = method.stretch
        device = "—" if s.device_peak_bytes is None else f"{s.device_peak_bytes / 1e9:.2f} ({s.device_scope})"
        print(f"| {name} | {s.seconds:.1f} | {s.peak_rss_bytes / 1e9:.2f} | {device} | {s.compilations} |")


if __name__ == "__main__":
    main()
