"""Curvature speed (issue 20): K-FAC factors and Fisher-vector products against a plain batched
gradient, Lanczos convergence in products, and block spectra against a QK-OV heatmap.

On a GPT-2-small-shaped model with random weights (fisherjax's own initialisation), batch 8:

  (a) plain batched ``jax.grad`` of the summed token loss at T = 128 — the unit;
  (b) ``kfac.kfac_factors`` of one batch (factor collection);
  (c) one empirical Fisher-vector product of one batch (``fisher_operator(...).matvec``);
  interleaved round by round, medians reported as ratios to (a); with ``--factor-precision P,Q``
  (b) at each of those precisions of the factor sums (``kfac.FACTOR_PRECISIONS``), each also with
  its factors' largest error against ``highest``'s, relative to that factor's largest entry;
  (d) Lanczos top-k on a smaller model of the same family (``--lanczos-shape``; a whole-model
      Lanczos basis of GPT-2 small holds 60 × 124 M floats, more than this machine has): the
      products it takes, and the Ritz residuals ``‖F y − θ y‖ / θ`` of the top k;
  (e) ``blocks.block_spectra`` of every head of every block for ``--samples`` samples against one
      ``qkov.heatmap`` of the same samples against themselves (both read the kept gradients,
      collected at T = ``--kept-seq``: neither depends on T).

Usage: python benchmarks/curvature.py [--rounds 3] [--samples 128] [--skip-blocks] [--factor-precision highest,bfloat16_3x]
       [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fisherjax import qkov
from fisherjax.config import DecoderConfig
from fisherjax.curvature import blocks, kfac, lanczos, products
from fisherjax.data import Batch
from fisherjax.fisher.collect import collect
from fisherjax.grads import sample_losses
from fisherjax.models import Model


def gpt2_config(layers=12, width=768, heads=12, vocab=50257, positions=1024) -> DecoderConfig:
    return DecoderConfig(
        model_type="gpt2", family="gpt2", vocab_size=vocab, hidden_size=width, num_layers=layers, num_heads=heads,
        num_kv_heads=heads, head_dim=width // heads, intermediate_size=4 * width, max_position_embeddings=positions,
        norm_eps=1e-5, activation="gelu_new", tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True, rope=None)


def random_batches(n_batches: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[Batch]:
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n_batches):
        ids = rng.integers(0, vocab, size=(batch, seq)).astype(np.int32)
        out.append(Batch(ids, np.ones_like(ids), ids.copy(), np.arange(b * batch, (b + 1) * batch)))
    return out


def seconds(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def factor_error(factors, reference) -> float:
    """The largest ``max|F − F_ref| / max|F_ref|`` over every factor (``A`` and ``G``) of every site."""
    worst = 0.0
    for key, ref in reference.factors.items():
        for mine, theirs in ((factors.factors[key].inputs, ref.inputs), (factors.factors[key].outputs, ref.outputs)):
            theirs = np.asarray(theirs, np.float64)
            worst = max(worst, float(np.abs(np.asarray(mine, np.float64) - theirs).max() / max(np.abs(theirs).max(), 1e-30)))
    return worst


def unit_ratios(model, batch, rounds: int, precisions: tuple[str, ...] = ("highest",)) -> dict:
    """(a), (b) at each of ``precisions``, (c) interleaved: each round times one call of each, after
    one warm-up call."""
    grad = jax.jit(jax.grad(lambda p, i, m, y: sample_losses(model, p, i, m, y)[0].sum()))
    operator = products.fisher_operator(model, model.params, [batch])
    v = jax.random.normal(jax.random.key(0), (operator.size,), jnp.float32)
    name_of = {p: "kfac_factors" if p == "highest" else f"kfac_factors[{p}]" for p in precisions}
    calls = {
        "grad": lambda: grad(model.params, batch.input_ids, batch.attention_mask, batch.labels),
        **{name_of[p]: (lambda p=p: kfac.kfac_factors(model, model.params, [batch], precision=p)) for p in precisions},
        "fisher_vector_product": lambda: operator.matvec(v),
    }
    for fn in calls.values():
        seconds(fn)  # compile
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(seconds(fn))
    med = {name: statistics.median(t) for name, t in times.items()}
    out = {"seconds": med, "rounds": rounds, "fvp_cost_vs_grad": med["fisher_vector_product"] / med["grad"]}
    reference = kfac.kfac_factors(model, model.params, [batch]) if len(precisions) > 1 else None
    for p in precisions:
        out["kfac_throughput_vs_grad" + ("" if p == "highest" else f"[{p}]")] = med["grad"] / med[name_of[p]]
        if reference is not None and p != "highest":
            out[f"kfac_factor_error[{p}]"] = factor_error(kfac.kfac_factors(model, model.params, [batch], precision=p), reference)
    return out


def lanczos_convergence(shape: dict, samples: int, seq: int, k: int, steps: int) -> dict:
    model = Model.init(gpt2_config(**shape), seed=0)
    batches = random_batches(samples // 8, 8, seq, shape["vocab"], seed=1)
    operator = products.fisher_operator(model, model.params, batches)
    start = time.perf_counter()
    ritz = lanczos.lanczos(operator.matvec, operator.size, k, steps=steps, key=jax.random.key(2), dtype=np.float32)
    elapsed = time.perf_counter() - start
    values = np.asarray(ritz.values, np.float64)
    return {"shape": shape, "parameters": model.num_params, "samples": samples, "seq": seq, "k": k, "products": ritz.steps,
            "seconds": elapsed, "top": values.tolist(),
            "relative_residuals": (np.asarray(ritz.residuals, np.float64) / np.maximum(values, 1e-30)).tolist()}


def blocks_against_heatmap(model, samples: int, seq: int) -> dict:
    batches = random_batches(samples // 8, 8, seq, model.config.vocab_size, seed=3)
    start = time.perf_counter()
    task = collect(model, batches, task="bench", keep_sample_grads=True, sample_grads_dtype="bfloat16", progress=False)
    print(f"kept gradients of {samples} samples in {time.perf_counter() - start:.1f} s", flush=True)
    spectra_s = seconds(lambda: blocks.block_spectra(task, model.layout).top)
    print(f"block spectra {spectra_s:.1f} s", flush=True)
    heatmap_s = seconds(lambda: qkov.heatmap(task, task, model.layout).scores)
    return {"samples": samples, "block_spectra_seconds": spectra_s, "heatmap_seconds": heatmap_s,
            "ratio": spectra_s / heatmap_s, "note": "first call of each, compilation included; bfloat16 storage, as analyze keeps them"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--kept-seq", type=int, default=32)
    parser.add_argument("--lanczos-shape", default="4,256,4,8192", help="layers,width,heads,vocab of the Lanczos model")
    parser.add_argument("--lanczos-samples", type=int, default=128, help="more than the 60 steps, so F's rank does not end Lanczos early")
    parser.add_argument("--skip-blocks", action="store_true")
    parser.add_argument("--only", choices=("units", "lanczos", "blocks"), help="run one part")
    parser.add_argument("--factor-precision", default="highest",
                        help=f"comma-separated precisions of the K-FAC factor sums to time in (b), of {kfac.FACTOR_PRECISIONS}")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    out = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "backend": jax.default_backend(),
           "devices": [d.device_kind for d in jax.devices()]}
    model = Model.init(gpt2_config(), seed=0)
    if args.only in (None, "units"):
        batch = random_batches(1, args.batch, args.seq, model.config.vocab_size)[0]
        precisions = tuple(dict.fromkeys(["highest", *args.factor_precision.split(",")]))
        out["units"] = unit_ratios(model, batch, args.rounds, precisions)
        print(json.dumps(out["units"], indent=1), flush=True)
    if args.only in (None, "lanczos"):
        layers, width, heads, vocab = (int(x) for x in args.lanczos_shape.split(","))
        out["lanczos"] = lanczos_convergence({"layers": layers, "width": width, "heads": heads, "vocab": vocab},
                                             args.lanczos_samples, 64, k=20, steps=60)
        print(json.dumps(out["lanczos"], indent=1), flush=True)
    if args.only in (None, "blocks") and not args.skip_blocks:
        out["blocks"] = blocks_against_heatmap(model, args.samples, args.kept_seq)
        print(json.dumps(out["blocks"], indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
