"""Phase 5 benchmark: all-pairs conflict scoring, exact vs projected, and projection agreement.

    python benchmarks/phase5.py agreement                 # demo model: projected vs exact cosines
    python benchmarks/phase5.py speed --mode exact        # one mode, prints a JSON line
    python benchmarks/phase5.py all --out /tmp/phase5.md   # everything, markdown

``speed`` builds a GPT-2-small-shaped model (12 layers, d 768, 12 heads, vocab 50257) with random
weights (``Model.init``), two tasks of random token sequences of length T = 128, and scores all
``n × n`` pairs with per-(block, layer, head) groups:

* ``exact``: per-sample gradients of the attention kernels and q/k/v biases (28.3M parameters)
  streamed in chunks from ``per_sample_grads`` and whitened; task B's chunks are recomputed for
  every chunk of A (memory holds two chunks, never a task);
* ``gram``: the same all-pairs GEMMs on gradients already on the device (the scoring cost alone);
* ``projected``: ``site_grads`` + Kronecker projections to ``k`` dimensions per (block, layer),
  then the Gram of the projected features.

Each mode runs in its own process so that peak memory (``memory_stats()['peak_bytes_in_use']`` on
an accelerator, ``ru_maxrss`` on CPU) belongs to it alone. ``agreement`` compares projected with
exact cosines of Fisher-whitened attention-kernel gradients of the 128 + 128 samples of the demo
tasks on the demo checkpoint (a random model of the demo's shape if it is absent), for
k = 256, 1024, 4096.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fisherjax import DecoderConfig, Model
from fisherjax.analysis import conflicts as C
from fisherjax.analysis.conflicts import projection as P
from fisherjax.config import RopeConfig
from fisherjax.data import Batch, batches, task_from_tokens
from fisherjax.fisher.pool import pool_fisher
from fisherjax.fisher.state import SampleGrads
from fisherjax.grads import per_sample_grads

REPO = Path(__file__).resolve().parents[1]

GPT2_SMALL = DecoderConfig(
    model_type="gpt2", family="gpt2", vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
    head_dim=64, intermediate_size=3072, max_position_embeddings=1024, norm_eps=1e-5, activation="gelu_new",
    tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True,
)


def attention_paths(model: Model) -> list[str]:
    lay = model.layout  # a fused QKV leaf feeds three blocks: keep it once
    return list(dict.fromkeys(p for block, kind in lay.attention_blocks() for p in lay.block_sources(block, kind)))


def random_batches(n: int, seq: int, vocab: int, batch_size: int, seed: int) -> list[Batch]:
    rng = np.random.default_rng(seed)
    task = task_from_tokens(f"random{seed}", [rng.integers(3, vocab, size=seq) for _ in range(n)])
    return list(batches(task, batch_size, buckets=(seq,)))


def peak_memory() -> dict:
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return {"peak_device_bytes": int(stats["peak_bytes_in_use"])}
    return {"peak_host_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def _block(tree):
    return jax.block_until_ready(tree)


# ---- speed ---------------------------------------------------------------------------------


def speed(mode: str, n: int, chunk: int, k: int, seq: int) -> dict:
    model = Model.init(GPT2_SMALL, seed=0)
    paths = attention_paths(model)
    n_params = sum(int(np.prod(model.layout.spec(p).shape)) for p in paths)
    tasks = {name: random_batches(n, seq, GPT2_SMALL.vocab_size, chunk, seed) for seed, name in enumerate("ab")}
    ones = {p: np.ones(model.layout.spec(p).shape, np.float32) for p in paths}  # whitening cost, unit Fisher
    record = dict(mode=mode, samples_per_task=n, chunk=chunk, seq=seq, stored_parameters=n_params, device=jax.devices()[0].device_kind)

    if mode == "exact":
        def stream(name):
            def chunks():
                for batch in tasks[name]:
                    out = per_sample_grads(model, model.params, batch, paths=paths, chunk_size=chunk)
                    yield C.GradChunk(batch.sample_ids, _block(out.grads))
            return chunks

        warm = next(stream("a")())  # compile the gradient and scoring functions once
        _block(C.pairwise_cosines(lambda: iter([warm]), lambda: iter([warm]), layout=model.layout, fisher=ones, chunk_size=chunk).dots)
        start = time.perf_counter()
        gram = C.pairwise_cosines(stream("a"), stream("b"), layout=model.layout, fisher=ones, chunk_size=chunk)
        seconds = time.perf_counter() - start
        gradients = n + n * math.ceil(n / chunk)
        record.update(seconds=seconds, per_sample_gradients_computed=gradients, gradient_samples_per_s=gradients / seconds)
    elif mode == "gram":
        rng = jax.random.PRNGKey(0)
        fake = {p: jax.random.normal(jax.random.fold_in(rng, i), (chunk,) + model.layout.spec(p).shape, jnp.float32) for i, p in enumerate(paths)}
        fake = _block(fake)
        ids = np.arange(chunk)
        stream = lambda: (C.GradChunk(ids + s, fake) for s in range(0, n, chunk))  # noqa: E731
        _block(C.pairwise_cosines(lambda: iter([C.GradChunk(ids, fake)]), lambda: iter([C.GradChunk(ids, fake)]), layout=model.layout, fisher=ones, chunk_size=chunk).dots)
        start = time.perf_counter()
        gram = C.pairwise_cosines(stream, stream, layout=model.layout, fisher=ones, chunk_size=chunk)
        seconds = time.perf_counter() - start
    elif mode == "projected":
        projection = P.make_projection(model.layout, k, seed=0, fisher=ones, eps=0.0)
        warm = P.project_batch(model, model.params, tasks["a"][0], projection)  # compile projection and scoring once
        warm_task = C.GroupedGrads("warm", warm.sample_ids, warm.grads, projection.grouping, projection.whitened)
        _block(C.pairwise_cosines(warm_task, warm_task, chunk_size=chunk).dots)
        start = time.perf_counter()
        projected = {name: P.project_task(model, model.params, tasks[name], projection, name=name) for name in "ab"}
        project_seconds = time.perf_counter() - start
        gram = C.pairwise_cosines(projected["a"], projected["b"], chunk_size=chunk)
        seconds = time.perf_counter() - start
        dims = sum(int(np.prod(v.shape[1:])) for v in projected["a"].features.values())
        record.update(k=k, projected_dimensions=dims, projection_seconds=project_seconds)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    record.update(
        seconds=seconds, samples_per_s=2 * n / seconds, pairs_per_s=n * n / seconds, groups=len(gram.groups),
        **peak_memory(),
    )
    return record


# ---- agreement -----------------------------------------------------------------------------


def demo_model_and_tasks(n_per_task: int):
    """The demo checkpoint and its task files, or a random model of the demo's shape on random tokens."""
    from fisherjax import demo

    try:
        model = demo.load()
        tasks = demo.load_tasks(model.tokenizer)
        source = f"demo checkpoint ({demo.checkpoint_dir().relative_to(REPO)}), demo tasks math / copy"
        task_batches = {name: list(batches(task, 32, buckets=demo.EVAL_BUCKETS)) for name, task in tasks.items()}
    except Exception as err:  # noqa: BLE001 - a missing or half-written checkpoint falls back to a random model
        config = DecoderConfig(
            model_type="llama", family="llama", vocab_size=64, hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
            head_dim=32, intermediate_size=384, max_position_embeddings=64, norm_eps=1e-5, activation="silu",
            tie_word_embeddings=False, rope=RopeConfig(10000.0, 32),
        )
        model = Model.init(config, seed=0)
        source = f"random Llama of the demo's shape (demo checkpoint unavailable: {err})"
        task_batches = {name: random_batches(n_per_task, 24, 64, 32, seed) for seed, name in enumerate(("math", "copy"))}
    return model, task_batches, source


def exact_task(model, task_batches, paths) -> SampleGrads:
    grads, tokens, ids = {p: [] for p in paths}, [], []
    for batch in task_batches:
        out = per_sample_grads(model, model.params, batch, paths=paths)
        keep = batch.sample_ids >= 0
        for p in paths:
            grads[p].append(np.asarray(out.grads[p])[keep])
        tokens.append(np.asarray(out.tokens)[keep])
        ids.append(batch.sample_ids[keep])
    return SampleGrads.from_grads({p: np.concatenate(v) for p, v in grads.items()}, np.concatenate(tokens), np.concatenate(ids))


def _joined(parts: list[SampleGrads]) -> SampleGrads:
    return SampleGrads(
        np.concatenate([p.sample_ids for p in parts]), np.concatenate([p.tokens for p in parts]),
        {path: np.concatenate([p.grads[path] for p in parts]) for path in parts[0].grads},
    )


def agreement(ks=(256, 1024, 4096), seeds=(0, 1, 2), sides=(1, None), n_per_task: int = 128) -> dict:
    """Projected vs exact cosines of every pair of the two tasks' samples together.

    Reported on the cross-task pairs (what detection tests) and on all distinct pairs (cross and
    within tasks, a wider spread of cosines), with the mean absolute error a dense Gaussian JL
    projection to the same number of dimensions would have, ``E|ĉ − c| ≈ sqrt(2/π) · sqrt((1 + c²)/K)``.
    """
    model, task_batches, source = demo_model_and_tasks(n_per_task)
    paths = [p for role in P.ATTENTION_ROLES for p in model.layout.paths(role, "kernel")]
    exact = [exact_task(model, b, paths) for b in task_batches.values()]
    n_a = len(exact[0])
    both = _joined(exact)
    fisher = pool_fisher("pooled", exact[0].fisher(), len(exact[0]), exact[1].fisher(), len(exact[1]))  # (Î_A + Î_B) / 2
    eps = C.damping(fisher)
    exact_cos = {
        False: C.pairwise_cosines(both, both, layout=model.layout).cosines,
        True: C.pairwise_cosines(both, both, layout=model.layout, fisher=fisher, eps=eps).cosines,
    }
    upper = np.triu_indices(len(both), 1)

    def projected_cosines(k, seed, fisher_used, side=1):
        projection = P.make_projection(model.layout, k, seed=seed, fisher=fisher_used, eps=eps if fisher_used else None, side=side)
        parts = [P.project_task(model, model.params, b, projection, name=n) for n, b in task_batches.items()]
        joined = C.GroupedGrads("both", np.concatenate([p.sample_ids for p in parts]),
                                {key: np.concatenate([p.features[key] for p in parts]) for key in parts[0].features}, projection.grouping, projection.whitened)
        dims = sum(int(np.prod(v.shape[1:])) for v in parts[0].features.values())
        return C.pairwise_cosines(joined, joined).cosines, dims

    def scores(exact_c, projected_c, dims):
        cross = P.agreement(exact_c[:n_a, n_a:], projected_c[:n_a, n_a:])
        every = P.agreement(exact_c[upper], projected_c[upper])
        jl = float(np.mean(np.sqrt(2 / np.pi) * np.sqrt((1 + exact_c[upper] ** 2) / dims)))
        return dict(pearson_cross=cross["pearson"], top_overlap_cross=cross["top_overlap"], **every, dense_jl_mean_abs_error=jl)

    rows = []
    for k in ks:
        for side in sides:
            for whitened in (False, True):
                per_seed = []
                for seed in seeds:
                    start = time.perf_counter()
                    cos, dims = projected_cosines(k, seed, fisher if whitened else None, side)
                    per_seed.append(dict(scores(exact_cos[whitened], cos, dims), seconds=time.perf_counter() - start))
                mean = {key: float(np.mean([r[key] for r in per_seed])) for key in per_seed[0]}
                rows.append(dict(k=k, side=side, whitened=whitened, projected_dimensions=dims, **mean,
                                 worst_max_abs_error=float(np.max([r["max_abs_error"] for r in per_seed]))))
    # The whitening approximation alone: identity projections with Kronecker-factored whitening.
    full, dims = projected_cosines(10**9, 0, fisher)
    whitening_only = scores(exact_cos[True], full, dims)
    fit_errors = {
        kp.key: P.whitening_fit_error(P.group_fisher_blocks(fisher[kp.path], kp.in_index, kp.out_index), eps)
        for kp in P.make_projection(model.layout, 1, fisher=fisher, eps=eps).kernels
    }
    spread = {
        "cross_std": float(exact_cos[True][:n_a, n_a:].std()), "all_std": float(exact_cos[True][upper].std()),
    }
    return dict(
        source=source, n_a=n_a, n_b=len(both) - n_a, exact_dimensions=sum(int(np.prod(model.layout.spec(p).shape)) for p in paths),
        seeds=list(seeds), rows=rows, whitening_only=whitening_only, whitening_fit_errors=fit_errors, eps=eps, spread=spread,
    )


# ---- report --------------------------------------------------------------------------------


def markdown(agree: dict | None, speeds: list[dict], command: str, measured_on: str | None = None) -> str:
    where = measured_on or f"{platform.node()} ({jax.devices()[0].device_kind}), jax {jax.__version__}"
    lines = ["## Phase 5: sample conflicts", "", f"Command: `{command}`", f"Measured on: {where}", ""]
    if agree:
        lines += [
            f"### Projected vs exact cosines ({agree['source']})", "",
            f"{agree['n_a']} × {agree['n_b']} pairs, attention q/k/v/o kernels ({agree['exact_dimensions']} parameters); "
            f"means over projection seeds {agree['seeds']}. k = dimensions per (block, layer), split over heads; side = k1 = k2 of each "
            "of the k/side² Kronecker copies (1: Khatri–Rao); dense-JL = the mean error a dense Gaussian projection to the same dimension would have.", "",
            "| k | side | whitening | dims | Pearson A×B | top-1% A×B | Pearson all | Spearman all | max abs err (mean / worst seed) | mean abs err | dense-JL mean abs err | top-1% all |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in agree["rows"]:
            lines.append(
                f"| {r['k']} | {r['side'] or 'one outer product'} | {'Kronecker' if r['whitened'] else 'none'} | {r['projected_dimensions']} | {r['pearson_cross']:.3f} | {r['top_overlap_cross']:.2f} | "
                f"{r['pearson']:.3f} | {r['spearman']:.3f} | {r['max_abs_error']:.3f} / {r['worst_max_abs_error']:.3f} | {r['mean_abs_error']:.4f} | "
                f"{r['dense_jl_mean_abs_error']:.4f} | {r['top_overlap']:.2f} |"
            )
        w = agree["whitening_only"]
        lines += [
            "",
            f"Exact whitened cosines: std {agree['spread']['cross_std']:.4f} over A×B pairs, {agree['spread']['all_std']:.4f} over all pairs. "
            f"Whitening approximation alone (identity projections, Kronecker-factored whitening vs exact `g / sqrt(Î + ε)`): "
            f"Pearson all {w['pearson']:.4f}, A×B {w['pearson_cross']:.4f}, max abs err {w['max_abs_error']:.4f}; "
            "relative Frobenius error of the rank-one fit of `(Î+ε)^-1/2` per kernel: "
            + ", ".join(f"{key.split('/')[-2]}{'#' + key.split('#')[1] if '#' in key else ''} {err:.2f}" for key, err in agree["whitening_fit_errors"].items())
            + ".", "",
        ]
    if speeds:
        lines += [
            "### All-pairs scoring speed (GPT-2-small shape, random weights, T = 128)", "",
            "| mode | n × n | chunk | seconds | samples/s | pairs/s | per-sample grads computed | peak memory | notes |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in speeds:
            mem = s.get("peak_device_bytes", s.get("peak_host_rss_bytes"))
            where = "device" if "peak_device_bytes" in s else "host RSS"
            note = {"exact": "grads streamed, B recomputed per A chunk", "gram": "GEMMs only, grads already on device",
                    "projected": f"k={s.get('k')} ({s.get('projected_dimensions')} dims), projection {s.get('projection_seconds', 0):.1f}s"}[s["mode"]]
            lines.append(
                f"| {s['mode']} | {s['samples_per_task']} × {s['samples_per_task']} | {s['chunk']} | {s['seconds']:.1f} | {s['samples_per_s']:.2f} | "
                f"{s['pairs_per_s']:.0f} | {s.get('per_sample_gradients_computed', '—')} | {mem / 2**30:.2f} GiB {where} | {note} |"
            )
        lines += ["", f"Device: {speeds[0]['device']}; {speeds[0]['stored_parameters']} stored parameters per sample (exact); "
                  f"{speeds[0]['groups']} groups.", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["agreement", "speed", "all", "report"])
    parser.add_argument("--mode", default="exact", choices=["exact", "gram", "projected"])
    parser.add_argument("--samples", type=int, default=None, help="samples per task (default 128 on an accelerator, 8 on CPU)")
    parser.add_argument("--chunk", type=int, default=None, help="samples per chunk (default 32 on an accelerator, 4 on CPU)")
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--json", action="store_true", help="agreement: print JSON instead of markdown")
    parser.add_argument("--inputs", type=Path, default=None, help="report: folder of agreement.json and <mode>.json files")
    parser.add_argument("--measured-on", default=None, help="report: where the JSON files were measured")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-agreement", action="store_true")
    args = parser.parse_args(argv)
    command = " ".join(["python", "benchmarks/phase5.py", *(argv if argv is not None else sys.argv[1:])])
    if args.what == "report":  # markdown from JSON files written by the other subcommands (e.g. on a GPU machine)
        agree_file = args.inputs / "agreement.json"
        agree = json.loads(agree_file.read_text()) if agree_file.exists() else None
        speeds = [json.loads(f.read_text().strip().splitlines()[-1]) for m in ("exact", "gram", "projected") if (f := args.inputs / f"{m}.json").exists()]
        text = markdown(agree, speeds, command, args.measured_on)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        return
    accelerator = jax.devices()[0].platform != "cpu"
    samples = args.samples or (128 if accelerator else 8)
    chunk = args.chunk or (32 if accelerator else 4)
    if args.what == "speed":
        print(json.dumps(speed(args.mode, samples, chunk, args.k, args.seq)), flush=True)
        return
    agree = None if args.skip_agreement else agreement()
    if args.what == "agreement":
        print(json.dumps(agree, default=str) if args.json else markdown(agree, [], command))
        return
    speeds = []
    for mode in ("exact", "gram", "projected"):
        cmd = [sys.executable, __file__, "speed", "--mode", mode, "--samples", str(samples), "--chunk", str(chunk), "--k", str(args.k), "--seq", str(args.seq)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        speeds.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(speeds[-1]), flush=True)
    text = markdown(agree, speeds, command)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
