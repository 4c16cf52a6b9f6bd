"""Head categories (issue 24): the cost of ``heads.categorise`` on its default probes against one
Phase 1 batch, and of the ``heads`` phase's per-task work (head-mask importance, ablation).

On a GPT-2-small-shaped model with random weights (fisherjax's own initialisation):

  (a) ``heads.categorise(model)`` on the default probes (16 random sequences and 16 repeated ones,
      65 tokens each, one compiled function) plus the copying score of 256 tokens;
  (b) one Phase 1 batch of the probe's size — ``collect`` of 16 sequences × 65 tokens with
      ``fisherjax analyze``'s options (kept attention gradients, the full diagonal) — and (b2) of
      32 sequences, the two probes together;
  (c) ``heads.head_mask_importance`` of one batch of 16 × 128 against (d) one Phase 1 batch of the
      same shape, and (e) ``heads.ablate_heads`` of 16 heads on that batch (17 forward passes);
  interleaved round by round after one warm-up call each; medians and their ratios reported.

Usage: python benchmarks/heads.py [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import numpy as np

from fisherjax import heads
from fisherjax.config import DecoderConfig
from fisherjax.data import Batch
from fisherjax.fisher.collect import collect
from fisherjax.fisher.options import CollectOptions
from fisherjax.models import Model


def gpt2_config(layers=12, width=768, n_heads=12, vocab=50257, positions=1024) -> DecoderConfig:
    return DecoderConfig(
        model_type="gpt2", family="gpt2", vocab_size=vocab, hidden_size=width, num_layers=layers, num_heads=n_heads,
        num_kv_heads=n_heads, head_dim=width // n_heads, intermediate_size=4 * width, max_position_embeddings=positions,
        norm_eps=1e-5, activation="gelu_new", tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True, rope=None)


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> Batch:
    ids = np.random.default_rng(seed).integers(0, vocab, size=(batch, seq)).astype(np.int32)
    return Batch(ids, np.ones_like(ids), ids.copy(), np.arange(batch))


def seconds(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model = Model.init(gpt2_config(), seed=0)
    vocab = model.config.vocab_size
    options = CollectOptions(keep_sample_grads=True, diagonal=True)
    probe16, probe32, batch = random_batch(16, 65, vocab, 1), random_batch(32, 65, vocab, 2), random_batch(16, 128, vocab, 3)
    top16 = np.zeros((model.config.num_layers, model.config.num_heads), bool)
    top16.flat[:16] = True

    def phase1(b):
        return lambda: collect(model, [b], task="bench", options=options, progress=False).group_fisher

    calls = {
        "categorise": lambda: heads.categorise(model).labels,
        "phase1_batch_16x65": phase1(probe16),
        "phase1_batch_32x65": phase1(probe32),
        "head_mask_importance_16x128": lambda: heads.head_mask_importance(model, model.params, [batch]).mean_abs,
        "phase1_batch_16x128": phase1(batch),
        "ablate_16_heads_16x128": lambda: heads.ablate_heads(model, model.params, [batch], heads=top16).loss,
    }
    first = {name: seconds(fn) for name, fn in calls.items()}  # compile + run
    times = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, fn in calls.items():
            times[name].append(seconds(fn))
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "machine": {"platform": platform.platform(), "backend": jax.default_backend(), "devices": len(jax.devices())},
        "rounds": args.rounds,
        "first_call_seconds": first,
        "median_seconds": med,
        "ratios": {
            "categorise / phase1 16x65": med["categorise"] / med["phase1_batch_16x65"],
            "categorise / phase1 32x65": med["categorise"] / med["phase1_batch_32x65"],
            "head_mask_importance / phase1 16x128": med["head_mask_importance_16x128"] / med["phase1_batch_16x128"],
            "ablate 16 heads / phase1 16x128": med["ablate_16_heads_16x128"] / med["phase1_batch_16x128"],
        },
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
