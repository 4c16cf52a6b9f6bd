"""How exact the float32 QK-OV ``variant="kfac"`` scores are: the slice sums ``g_iᵀ (A ⊗ G + λI)⁻¹ g_j``
of ``kronecker.slice_sums`` (float32 rotations on the device) against the same sums in float64 (numpy:
``eigh`` of the same factors, the same stored gradients formed as the kernel forms them, float64
rotations and products), on the shipped demo's two tasks, both ways.

Per block it prints the largest and median per-slice error ``‖M₃₂ − M₆₄‖ / ‖M₆₄‖`` over the (layer,
head) slices, the part of it that rounding the eigenvectors to float32 alone explains (the rest is
float32 arithmetic), and how much of each slice's score comes from the eigen-directions whose
eigenvalue ``s_A[r] · s_G[c]`` is below ``1e-6`` of the slice's largest (``‖M_low‖ / ‖M₆₄‖``): where
the damping is far below the spectrum those directions, weighted by up to ``1/λ``, carry the score
and magnify the rounding.

Usage: python3 benchmarks/kfac_accuracy.py [--samples 24] [--storage float32] [--ridge-rel 1e-6]
"""

from __future__ import annotations

import argparse

import numpy as np

from fisherjax.analysis.qkov import kronecker
from fisherjax.analysis.qkov._operands import leaf_sources, views_of
from fisherjax.analysis.qkov._tiles import device_leaves
from fisherjax.analysis.qkov.options import KernelOptions, ScoreOptions
from fisherjax.layout import ATTENTION_BLOCKS
from fisherjax.pipeline import AnalysisConfig, Context, attention_kfac, collect_all, load_inputs, task_batches

LOW = 1e-6
"""Eigenvalues below this share of the slice's largest count as low-curvature directions."""


def eigh64(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(m, np.float64)
    s, u = np.linalg.eigh((m + np.swapaxes(m, -1, -2)) / 2)
    return np.maximum(s, 0), u


def block_sums(block: str, ga, gb, factors, ridge, rounded: bool):
    """``(M [layer, n_a, n_b, heads], low-curvature part of M)`` in float64; ``rounded``: the
    eigenvectors rounded to float32 first, as the kernel holds them."""
    (si, ui), (so, uo) = eigh64(factors[0]), eigh64(factors[1])
    if rounded:
        ui, uo = (u.astype(np.float32).astype(np.float64) for u in (ui, uo))
    if block == "o":  # A per head [L, H, R, R], G shared [L, C, C]
        def rotate(g):
            return np.einsum("lhrs,nlhrc,lcd->nlhsd", ui, g, uo)
        s = si[:, :, :, None] * so[:, None, None, :]
    else:  # A shared [L, R, R], G per head [L, H, C, C]
        def rotate(g):
            return np.einsum("lrs,nlhrc,lhcd->nlhsd", ui, g, uo)
        s = si[:, None, :, None] * so[:, :, None, :]
    weighted, rb = rotate(ga) / (s + ridge[:, :, None, None])[None], rotate(gb)
    low = s < LOW * s.max(axis=(2, 3), keepdims=True)
    return (np.einsum("alhrc,blhrc->labh", weighted, rb), np.einsum("alhrc,blhrc->labh", np.where(low[None], weighted, 0), rb))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=24, help="samples per task (the device-split test's 24 by default)")
    parser.add_argument("--storage", default="float32", choices=("float32", "bfloat16"),
                        help="kept gradients' dtype (default float32, what analyze keeps for the kfac variant)")
    parser.add_argument("--ridge-rel", type=float, default=ScoreOptions.ridge_lambda_rel, help="--qkov-ridge-rel")
    args = parser.parse_args()
    config = AnalysisConfig(max_samples=args.samples, progress=False, phases=("fisher", "qkov"), sample_grads_form="factors",
                            sample_grads_dtype=args.storage, qkov_variant="kfac", qkov_ridge_rel=args.ridge_rel)
    model, tasks = load_inputs(config)
    batches = task_batches(model, tasks, config)
    fishers, _ = collect_all(model, batches, config)
    ctx, layout = Context(config, model, tasks, batches, fishers, None), model.layout
    score = ScoreOptions(variant="kfac", fisher_pool="A", ridge_lambda_rel=args.ridge_rel)
    layers = np.arange(layout.num_layers)
    print(f"demo, {args.samples} samples a task, kept {args.storage} token factors, ridge_lambda_rel {args.ridge_rel:g}")
    print("| A → B | block | λ / largest eigenvalue (min) | float32 error max | median | float32 eigenvectors alone, max | "
          "low-curvature share of the score, median |")
    print("|---|---|---|---|---|---|---|")
    for a_name, b_name in (("math", "copy"), ("copy", "math")):
        kfac = attention_kfac(ctx, a_name)
        prep = kronecker.prepare(fishers[a_name], fishers[b_name], layout, kfac, score)
        n_a, n_b = len(prep.a), len(prep.b)
        raw = kronecker.slice_sums(prep, layout, KernelOptions(), np.arange(n_a), np.arange(n_b), layers)
        factors, sources = kronecker.check_factors(kfac, layout, prep.kinds), leaf_sources(layout, prep.kinds)
        views = [views_of(layout, device_leaves(side.grads, layout, sources, np.arange(len(side)), layers), prep.kinds)
                 for side in (prep.a, prep.b)]
        for number, block in enumerate(ATTENTION_BLOCKS):
            with_bias = (block, "bias") in prep.kinds
            ga, gb = (np.asarray(kronecker.head_slices(v, block, with_bias), np.float64) for v in views)
            ridge = prep.curvature.ridge[block].astype(np.float64)
            exact, low = block_sums(block, ga, gb, factors[block], ridge, rounded=False)
            rounded, _ = block_sums(block, ga, gb, factors[block], ridge, rounded=True)

            def error(x):
                return np.linalg.norm(x - exact, axis=(1, 2)) / np.linalg.norm(exact, axis=(1, 2))

            err = error(raw[block].astype(np.float64))
            share = np.linalg.norm(low, axis=(1, 2)) / np.linalg.norm(exact, axis=(1, 2))
            spread = float(np.min(prep.diagnostics.ridge[number] / prep.diagnostics.fisher_max[number]))
            print(f"| {a_name} → {b_name} | {block} | {spread:.1e} | {err.max():.1e} | {np.median(err):.1e} | {error(rounded).max():.1e} | "
                  f"{np.median(share):.2f} |")


if __name__ == "__main__":
    main()
