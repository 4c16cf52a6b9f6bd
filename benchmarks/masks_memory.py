"""Unstructured masks of a float32 diagonal the size of GPT-2 small's: time and numpy's peak memory.

``masks.unstructured_masks`` (the leaf-by-leaf ranking) against the joined ranking it replaced
(every leaf concatenated and ranked by ``masks.keep_highest_each``, then split), on a random
gamma(0.5) float32 diagonal of GPT-2 small's 124 M parameters at three sparsities. One route per
process (``--route``), so each peak is its own: ``tracemalloc`` traces numpy's allocations. With
``--check DIR`` the masks are saved there and, when both routes' are, compared.

Usage::

    for r in joined pieces; do python3 benchmarks/masks_memory.py --route $r --scope global --check /tmp/masks; done
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from pathlib import Path

import numpy as np

SPARSITIES = (0.3, 0.5, 0.7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--route", choices=("joined", "pieces"), required=True)
    parser.add_argument("--scope", choices=("global", "layer"), default="global")
    parser.add_argument("--check", type=Path, help="save the masks here and compare them with the other route's")
    args = parser.parse_args()

    from fisherjax.analysis import masks
    from fisherjax.config import DecoderConfig
    from fisherjax.fisher.state import TaskFisher
    from fisherjax.layout import layout_for
    from fisherjax.models.hf import abstract_params

    config = DecoderConfig(model_type="gpt2", family="gpt2", vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
                           num_kv_heads=12, head_dim=64, intermediate_size=3072, max_position_embeddings=1024, norm_eps=1e-5,
                           activation="gelu_new", tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True, rope=None)
    layout = layout_for(config, abstract_params(config))
    rng = np.random.default_rng(0)
    diagonal = {p: rng.gamma(0.5, 1.0, size=s.shape).astype(np.float32) for p, s in layout.specs.items()}
    paths = [p for p in layout.specs if p in diagonal]
    tracemalloc.start()
    start = time.perf_counter()
    if args.route == "pieces":
        keeps = [m.keep for m in masks.unstructured_masks(TaskFisher("a", {}, {}, n_samples=8, diagonal=diagonal), layout, SPARSITIES,
                                                           scope=args.scope)]
    else:
        joined = np.concatenate([diagonal[p].reshape(-1) for p in paths])
        labels = (np.concatenate([np.repeat(ids, rows.shape[1]) for rows, ids in (layout.layer_rows(p, diagonal[p]) for p in paths)])
                  if args.scope == "layer" else np.zeros(len(joined), np.int8))
        levels = masks.keep_highest_each(joined, labels, SPARSITIES)
        del joined, labels
        ends = np.cumsum([diagonal[p].size for p in paths])[:-1]
        keeps = [{p: k.reshape(diagonal[p].shape) for p, k in zip(paths, np.split(level, ends), strict=True)} for level in levels]
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    size = sum(v.size for v in diagonal.values())
    print(f"{args.route} {args.scope}: {seconds:.2f} s, numpy's peak {peak / 1e9:.2f} GB "
          f"({len(SPARSITIES)} levels of masks: {len(SPARSITIES) * size / 1e9:.2f} GB)")
    if args.check:
        args.check.mkdir(parents=True, exist_ok=True)
        np.save(args.check / f"{args.route}_{args.scope}.npy", np.concatenate([k[p].reshape(-1) for k in keeps for p in paths]))
        other = args.check / f"{'pieces' if args.route == 'joined' else 'joined'}_{args.scope}.npy"
        if other.exists():
            print("the same masks as the other route:", bool(np.array_equal(np.load(other), np.load(args.check / f"{args.route}_{args.scope}.npy"))))


if __name__ == "__main__":
    main()
