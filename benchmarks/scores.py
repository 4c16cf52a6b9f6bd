"""Forward-only scores: every position unembedded against only the predicted ones.

On a GPT-2-shaped model with random weights (fisherjax's own initialisation) and one batch of 8
samples of 80–120 random tokens (padded to the 128 bucket, as ``fisherjax.data.batches`` pads):

  (a) ``completion_scores(model.apply(...))``: the ``[batch, seq, vocab]`` logits of every
      position, then the losses and exact match (the route before the seventeenth session);
  (b) ``forward_scores``: the final norm's output, then only the predicted positions unembedded
      in ``[chunk, vocab]`` tiles (``grads.hidden_scores``);
  (c) (a)'s losses alone (``sample_losses``) against (d) ``forward_scores(matches=False)`` (what
      the head-pruning experiment reads);

each jitted, interleaved round by round after one warm-up call; the best of 3 calls per round and
the median over rounds are reported, with the largest difference of the losses.

Usage: python benchmarks/scores.py [--shape tiny|small] [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import numpy as np

from fisherjax.config import DecoderConfig
from fisherjax.data import batches, predicted_labels, task_from_tokens
from fisherjax.grads import completion_scores, forward_scores, sample_losses
from fisherjax.models import Model

SHAPES = {"tiny": (4, 256), "small": (12, 768)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    layers, width = SHAPES[args.shape]
    vocab = 50257
    config = DecoderConfig(
        model_type="gpt2", family="gpt2", vocab_size=vocab, hidden_size=width, num_layers=layers, num_heads=width // 64,
        num_kv_heads=width // 64, head_dim=64, intermediate_size=4 * width, max_position_embeddings=256, norm_eps=1e-5,
        activation="gelu_new", tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True,
    )
    model = Model.init(config, seed=0)
    rng = np.random.default_rng(0)
    task = task_from_tokens("t", [rng.integers(1, vocab, size=int(rng.integers(80, 121))).tolist() for _ in range(8)])
    b = next(iter(batches(task, 8, pad_id=0, vocab_size=vocab)))
    labels = predicted_labels(b.labels, b.attention_mask)
    calls = {
        "a: all positions, losses + exact match": jax.jit(lambda p: completion_scores(model.apply(p, b.input_ids, b.attention_mask), labels)),
        "b: predicted positions, losses + exact match": jax.jit(lambda p: forward_scores(model, p, b.input_ids, b.attention_mask, b.labels)),
        "c: all positions, losses": jax.jit(lambda p: sample_losses(model, p, b.input_ids, b.attention_mask, b.labels)[0]),
        "d: predicted positions, losses": jax.jit(lambda p: forward_scores(model, p, b.input_ids, b.attention_mask, b.labels, matches=False)[1]),
    }
    outputs = {name: jax.block_until_ready(f(model.params)) for name, f in calls.items()}
    losses = [np.asarray(o[1] if isinstance(o, tuple) else o, np.float64) for o in outputs.values()]
    difference = max(float(np.max(np.abs(x - losses[0]) / np.abs(losses[0]))) for x in losses)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, f in calls.items():
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                jax.block_until_ready(f(model.params))
                best = min(best, time.perf_counter() - start)
            times[name].append(best)
    medians = {name: statistics.median(t) for name, t in times.items()}
    predicted = int((np.asarray(labels)[:, 1:] != -100).sum())
    print(f"{platform.processor() or platform.machine()}, jax {jax.__version__} on {jax.default_backend()}; "
          f"{args.shape}: {layers} layers, d = {width}, vocab {vocab}; batch 8 × {b.input_ids.shape[1]} positions, {predicted} predicted")
    print("| call | seconds (median of best-of-3) |\n|---|---|")
    for name, t in medians.items():
        print(f"| {name} | {t:.4f} |")
    print(f"ratios b/a {medians[list(calls)[1]] / medians[list(calls)[0]]:.2f}, d/c {medians[list(calls)[3]] / medians[list(calls)[2]]:.2f}; "
          f"largest relative difference of the losses {difference:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "medians": medians, "rounds": times, "loss_difference": difference}, f, indent=2)


if __name__ == "__main__":
    main()
