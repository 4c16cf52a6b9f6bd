"""Phase 6 benchmark: the QK-OV heatmap kernel against a loop over (i, j, layer, head, block).

For a GPT-2-small-shaped config (12 layers, d 768, 12 heads, fused QKV with biases) and a
Llama-shaped GQA config (16 layers, d 2048, 32 heads / 8 kv heads) it times, on synthetic
contributions and gradients of the right shapes (no model forward needed):

* the kernel as :func:`fisherjax.analysis.qkov.heatmap` runs it, both ways of evaluating the
  contraction (``KernelOptions.contraction``): batched — operand preparation (``_batched.operand``:
  ``C/(Î+λ)`` for task A, ``|g|`` for task B, head-major) then the batched split-K GEMMs
  (``_batched.products``) — and looped (``_looped.looped_tile``: the same work in cache-sized pieces
  read straight from the stored leaves, one jitted call per block and layer range, run by
  ``--workers`` threads) — and optionally the Pallas kernel (``_pallas.pallas_tile``) — on
  device-resident inputs, layer chunk by layer chunk (each chunk's data is generated
  on the device before its timing starts, so only ``n × layer_chunk`` samples of one chunk are
  ever in memory);
* its achieved GFLOP/s against ``2 · n_A · n_B · P_attn`` (:func:`fisherjax.analysis.qkov.flops`)
  and against this machine's measured matmul peak (a jitted square ``jnp.dot`` at the same
  precision, timed in the same run);
* a straightforward numpy loop over (i, j, layer, head, block) on the same data, timed on a few
  sample pairs and scaled to ``n_A · n_B`` pairs (its results are checked against the kernel's);
* optionally (``--end-to-end``) the public ``heatmap`` on host numpy ``SampleGrads``, which adds
  the Fisher, its per-slice medians and diagnostics, and the host → device copies.

Usage::

    python benchmarks/phase6.py                                   # both configs, 64 x 64 samples
    python benchmarks/phase6.py --config gpt2-small --n-a 16 --n-b 16 --memory-budget 2e9
    python benchmarks/phase6.py --split-k 8,32 --piece-floats 65536,262144     # both contractions
    python benchmarks/phase6.py --end-to-end --markdown /tmp/phase6.md   # tables for benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from fisherjax import backend
from fisherjax.analysis import qkov
from fisherjax.analysis.qkov import _batched, _looped, _operands, _pallas
from fisherjax.fisher.state import SampleGrads
from fisherjax.layout import FAMILY_RULES, ModelLayout

CONFIGS = {
    "gpt2-small": dict(family="gpt2", layers=12, d=768, heads=12, kv_heads=12),
    "llama-gqa": dict(family="llama", layers=16, d=2048, heads=32, kv_heads=8),
}


def synthetic_layout(name: str, layers: int | None = None) -> ModelLayout:
    """The attention parameters' layout of a config, from shape-only (zero-stride) arrays."""
    c = dict(CONFIGS[name])
    L, d, H, Hkv = layers or c["layers"], c["d"], c["heads"], c["kv_heads"]
    hd = d // H
    if c["family"] == "gpt2":
        shapes = {
            "layers/attn/c_attn/kernel": (L, d, 3 * d),
            "layers/attn/c_attn/bias": (L, 3 * d),
            "layers/attn/c_proj/kernel": (L, d, d),
        }
    else:
        shapes = {
            "layers/self_attn/q_proj/kernel": (L, d, H * hd),
            "layers/self_attn/k_proj/kernel": (L, d, Hkv * hd),
            "layers/self_attn/v_proj/kernel": (L, d, Hkv * hd),
            "layers/self_attn/o_proj/kernel": (L, H * hd, d),
        }
    params = {p: np.broadcast_to(np.float32(0), s) for p, s in shapes.items()}
    return ModelLayout.from_rules(
        params, FAMILY_RULES[c["family"]], num_heads=H, num_kv_heads=Hkv, head_dim=hd, num_layers=L, layered="layers/"
    )


def _view_shapes(layout: ModelLayout) -> dict[str, tuple[int, ...]]:
    """``{block/kind: view shape without the layer axis}``."""
    d_in = {b: layout.spec(layout.block_sources(b, "kernel")[0]).shape[-2] for b in "qkv"}
    d_out = layout.spec(layout.block_sources("o", "kernel")[0]).shape[-1]
    hd = layout.head_dim
    shapes = {}
    for block, kind in layout.attention_blocks():
        heads = layout.heads_of(block)
        if kind == "bias":
            shapes[f"{block}/{kind}"] = (heads, hd)
        elif block == "o":
            shapes[f"{block}/{kind}"] = (heads, hd, d_out)
        else:
            shapes[f"{block}/{kind}"] = (d_in[block], heads, hd)
    return shapes


def _timed(fn, *args, repeats: int, **kwargs) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls after one warm-up call (which also compiles)."""
    out = jax.block_until_ready(fn(*args, **kwargs))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        best = min(best, time.perf_counter() - start)
    return best, out


def matmul_peak(size: int, precision: str, repeats: int = 5) -> float:
    """GFLOP/s of a jitted float32 ``[size, size] @ [size, size]``."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (size, size), jnp.float32)
    b = jax.random.normal(key_b, (size, size), jnp.float32)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=_operands.PRECISIONS[precision]))
    seconds, _ = _timed(dot, a, b, repeats=repeats)
    return 2 * size**3 / seconds / 1e9


@functools.partial(jax.jit, static_argnames=("shape", "square"))
def _draw(key, shape, square):
    """Standard normal draws (``x² / 7`` with ``square``), one sample at a time into the stacked
    output, so that drawing a multi-GB leaf needs no temporaries of its size."""
    def one(k):
        x = jax.random.normal(k, shape[1:])
        return jnp.square(x) / 7.0 if square else x

    return jax.lax.map(one, jax.random.split(key, shape[0]))


def _make_chunk(key, leaves_a: dict, leaves_b: dict, fisher_shapes: dict, ridge):
    """Synthetic stored leaves ``{path: [n, layer, *shape]}`` of one layer chunk — ``C`` (A: squares / T)
    and ``g`` (B), as ``collect`` stores them (GPT-2's fused ``c_attn``) — and ``1/(Î+λ)`` per head
    view ``{block/kind: [layer, *view]}``, on the device."""
    out_a, out_b, weights, fisher = {}, {}, {}, {}
    for n, path in enumerate(sorted(leaves_a)):
        ka, kb = jax.random.split(jax.random.fold_in(key, n))
        out_a[path] = _draw(ka, leaves_a[path].shape, square=True)
        out_b[path] = _draw(kb, leaves_b[path].shape, square=False)
    for n, view in enumerate(sorted(fisher_shapes)):
        fisher[view] = jax.random.uniform(jax.random.fold_in(key, 1000 + n), fisher_shapes[view].shape, minval=0.0, maxval=2.0)
        weights[view] = 1.0 / (fisher[view] + ridge)
    return out_a, out_b, weights, fisher


def loop_scores(C, g, fisher, ridge, layout: ModelLayout) -> np.ndarray:
    """The straightforward evaluation: one numpy reduction per (i, j, layer, head, block).

    ``C``, ``g``: ``{block/kind: [p, layer, *view]}``; ``fisher``: ``{block/kind: [layer, *view]}``.
    Returns raw slice sums ``[block, layer, p_a, p_b, head]`` (K/V of query head h read kv head h // groups).
    """
    p_a, layers = next(iter(C.values())).shape[:2]
    p_b = next(iter(g.values())).shape[0]
    kv = layout.kv_head_of
    out = np.zeros((4, layers, p_a, p_b, layout.num_heads))
    for i in range(p_a):
        for j in range(p_b):
            for layer in range(layers):
                for h in range(layout.num_heads):
                    for b, block in enumerate(qkov.BLOCKS):
                        head = kv[h] if block in ("k", "v") else h
                        total = 0.0
                        for key in C:
                            if key.split("/")[0] != block:
                                continue
                            kind = key.split("/")[1]
                            # views: q/k/v kernel [d_in, head, hd]; o kernel [head, hd, d_out]; bias [head, hd]
                            index = (slice(None), head) if kind == "kernel" and block != "o" else (head,)
                            c = C[key][i, layer][index]
                            f = fisher[key][layer][index]
                            total += np.sum(c / (f + ridge) * np.abs(g[key][j, layer][index]))
                        out[b, layer, i, j, h] = total
    return out


def bench_kernel(name: str, args) -> list[dict]:
    """Per split-K setting and piece size: seconds of the kernel over all layer chunks, and the loop baseline."""
    layout = synthetic_layout(name, args.layers)
    shapes = _view_shapes(layout)
    L = layout.num_layers
    floats_per_layer = sum(int(np.prod(s)) for s in shapes.values())
    # All samples of both tasks in one tile; as many layers per tile as the budget allows (the
    # same per-sample cost model as qkov.tile_plan: three float32 copies, plus the weights).
    c_l = args.layer_chunk or min(L, int(args.memory_budget // (3 * 4 * floats_per_layer * (args.n_a + args.n_b + 1))))
    if c_l < 1:
        raise SystemExit(f"{name}: {args.n_a}+{args.n_b} samples of one layer exceed --memory-budget; raise it or lower --n-a/--n-b")
    ridge = 1e-3
    splits = [int(k) for k in args.split_k.split(",") if k]
    pieces = [int(float(k)) for k in args.piece_floats.split(",") if k]
    totals = {k: dict(operand_a=0.0, operand_b=0.0, gemm=0.0, fused=0.0) for k in splits}
    workers = [int(w) if w else backend.available_cores() for w in args.workers.split(",")]
    looped_s = {(k, w): 0.0 for k in pieces for w in workers}
    pallas_splits = [int(k) for k in args.pallas_split_k.split(",") if k]
    pallas_s = {k: 0.0 for k in pallas_splits}
    loop_per_pair, max_rel = 0.0, 0.0
    p = args.loop_samples
    ones_a, ones_b = jnp.ones(args.n_a), jnp.ones(args.n_b)
    for l0 in range(0, L, c_l):
        width = min(c_l, L - l0)
        make = {path: jax.ShapeDtypeStruct((args.n_a, width, *spec.shape[1:]), jnp.float32) for path, spec in layout.specs.items()}
        make_b = {path: jax.ShapeDtypeStruct((args.n_b, width, *spec.shape[1:]), jnp.float32) for path, spec in layout.specs.items()}
        fisher_shapes = {k: jax.ShapeDtypeStruct((width, *s), jnp.float32) for k, s in shapes.items()}
        leaves_a, leaves_b, weights, fisher = jax.block_until_ready(_make_chunk(jax.random.PRNGKey(l0), make, make_b, fisher_shapes, ridge))
        raws = {}
        for k, n_workers in looped_s:
            t_l, raws[f"looped {k} x{n_workers}"] = _timed(
                _looped.looped_tile, leaves_a, ones_a, weights, leaves_b, ones_b, layout=layout, kinds=tuple(layout.attention_blocks()),
                workers=n_workers, transform_a="identity", transform_b="abs", piece_floats=k, precision=args.precision,
                repeats=args.repeats,
            )
            looped_s[k, n_workers] += t_l
        for k in pallas_splits:
            t_p, raws[f"pallas {k}"] = _timed(
                _pallas.pallas_tile, leaves_a, ones_a, weights, leaves_b, ones_b, layout=layout, kinds=tuple(layout.attention_blocks()),
                transform_a="identity", transform_b="abs", split_k=k, precision=args.precision, interpret=backend.pallas_interpret(),
                repeats=args.repeats,
            )
            pallas_s[k] += t_p
        if p:  # the loop baseline's samples, as head views on the host
            host_C, host_g = ({k: np.asarray(v) for k, v in _views(layout, {path: x[:p] for path, x in leaves.items()}).items()}
                              for leaves in (leaves_a, leaves_b))
        # the batched path's inputs are whole head views (for GPT-2 a copy of the fused QKV, made outside its timing)
        C, g = (_views(layout, leaves_a), _views(layout, leaves_b)) if splits else (None, None)
        leaves_a = leaves_b = None
        for k in splits:
            t_a, a_op = _timed(_batched.operand_jit, C, ones_a, weights, transform="identity", split_k=k, repeats=args.repeats)
            t_b, b_op = _timed(_batched.operand_jit, g, ones_b, None, transform="abs", split_k=k, repeats=args.repeats)
            t_g, raws[f"split-K {k}"] = _timed(_batched.products_jit, a_op, b_op, precision=args.precision, repeats=args.repeats)
            del a_op, b_op
            t_f, _ = _timed(_fused, C, g, weights, split_k=k, precision=args.precision, repeats=args.repeats) if args.fused else (float("nan"), None)
            totals[k]["operand_a"] += t_a
            totals[k]["operand_b"] += t_b
            totals[k]["gemm"] += t_g
            totals[k]["fused"] += t_f
        if p:
            host_f = {k: np.asarray(v) for k, v in fisher.items()}
            start = time.perf_counter()
            reference = loop_scores(host_C, host_g, host_f, ridge, layout)
            loop_per_pair += (time.perf_counter() - start) / (p * p)
            kv = layout.kv_head_of
            for raw in raws.values():
                kernel = np.stack([np.asarray(raw[b])[:, :p, :p][..., kv if b in ("k", "v") else slice(None)] for b in qkov.BLOCKS])
                max_rel = max(max_rel, float(np.max(np.abs(kernel - reference) / np.maximum(np.abs(reference), 1e-30))))
        del C, g, weights, fisher, raws
    flops = qkov.flops(args.n_a, args.n_b, layout)
    common = dict(
        config=name, layers=L, n_a=args.n_a, n_b=args.n_b, layer_chunk=c_l, p_attn=int(flops / (2 * args.n_a * args.n_b)),
        gflop=flops / 1e9, loop_s=loop_per_pair * args.n_a * args.n_b if p else float("nan"), loop_pairs=p * p,
        loop_max_rel_err=max_rel if p else float("nan"),
    )
    rows = []
    for k in splits:
        t = totals[k]
        kernel_s = t["operand_a"] + t["operand_b"] + t["gemm"]
        rows.append(dict(
            common, contraction=f"batched, split-K {k}", kernel_s=kernel_s, gemm_s=t["gemm"],
            operands_s=t["operand_a"] + t["operand_b"], fused_s=t["fused"],
        ))
    for (k, n_workers), seconds in looped_s.items():
        rows.append(dict(
            common, contraction=f"looped, {k} floats, {n_workers} worker{'s' if n_workers > 1 else ''}", kernel_s=seconds,
            gemm_s=float("nan"), operands_s=float("nan"), fused_s=float("nan"),
        ))
    for k, seconds in pallas_s.items():
        rows.append(dict(
            common, contraction=f"pallas, split-K {k}", kernel_s=seconds, gemm_s=float("nan"), operands_s=float("nan"), fused_s=float("nan"),
        ))
    return rows


def _views(layout: ModelLayout, leaves: dict) -> dict:
    """``{block/kind: [n, layer, *view]}`` head views of stored leaves, materialised."""
    return jax.jit(lambda x: _operands.views_of(layout, x, tuple(layout.attention_blocks())))(leaves)


@functools.partial(jax.jit, static_argnames=("split_k", "precision"))
def _fused(C, g, weights, *, split_k, precision):
    """The three kernel pieces under one jit (XLA may fuse the operand passes into the GEMM)."""
    a = _batched.operand(C, jnp.ones(next(iter(C.values())).shape[0]), weights, transform="identity", split_k=split_k)
    b = _batched.operand(g, jnp.ones(next(iter(g.values())).shape[0]), None, transform="abs", split_k=split_k)
    return _batched.products(a, b, precision=precision)


def bench_end_to_end(name: str, args) -> str:
    """Seconds of the public ``heatmap`` on host numpy SampleGrads (second call; the first compiles).

    Two inputs: task A with stored ``C`` (true or per-token Fisher), and with ``C`` derived from
    ``g`` (the empirical Fisher, which is what ``collect`` stores by default).
    """
    layout = synthetic_layout(name, args.layers)
    key = jax.random.PRNGKey(7)
    paths = sorted(layout.specs)
    grads_a, grads_b = {}, {}
    for n, path in enumerate(paths):  # drawn on the device, copied to host numpy
        shape = layout.spec(path).shape
        grads_a[path] = np.asarray(jax.random.normal(jax.random.fold_in(key, 2 * n + 1), (args.n_a, *shape)))
        grads_b[path] = np.asarray(jax.random.normal(jax.random.fold_in(key, 2 * n), (args.n_b, *shape)))
    tokens_a, tokens_b = np.full(args.n_a, 7), np.full(args.n_b, 7)
    B = SampleGrads(np.arange(args.n_b), tokens_b, grads_b)
    options = dict(min_fisher_samples=1, precision=args.precision, memory_budget_bytes=args.memory_budget)
    seconds = {}
    for label, A in (("stored C", SampleGrads.from_grads(grads_a, tokens_a, np.arange(args.n_a))),
                     ("derived C", SampleGrads(np.arange(args.n_a), tokens_a, grads_a))):
        qkov.heatmap(A, B, layout, **options)
        start = time.perf_counter()
        qkov.heatmap(A, B, layout, **options)
        seconds[label] = time.perf_counter() - start
        del A
    return ", ".join(f"{s:.2f} ({label})" for label, s in seconds.items())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS), help="repeatable; default: all")
    parser.add_argument("--n-a", type=int, default=64)
    parser.add_argument("--n-b", type=int, default=64)
    parser.add_argument("--layers", type=int, default=None, help="override the config's layer count")
    parser.add_argument("--memory-budget", type=float, default=8e9, help="bytes per tile (qkov.tile_plan)")
    parser.add_argument("--layer-chunk", type=int, default=None,
                        help="layers per tile instead of the budget's choice (looped contraction on a CPU reads "
                             "aligned inputs in place, so heatmap runs all layers as one tile)")
    parser.add_argument("--precision", default="highest", choices=["highest", "high", "default"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-samples", type=int, default=2, help="p: the loop runs p x p pairs and is scaled")
    parser.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak (default: 8192 on GPU, 2048 on CPU)")
    parser.add_argument("--split-k", default="8,32", help="comma-separated split-K settings of batched contraction to time")
    parser.add_argument("--piece-floats", default=str(qkov.KernelOptions.piece_floats), help="comma-separated piece sizes of looped contraction to time")
    parser.add_argument("--workers", default="1,", help="comma-separated concurrent computations of looped contraction to time "
                                                          "(empty: KernelOptions' default, the cores available)")
    parser.add_argument("--pallas-split-k", default="", help="comma-separated split-K settings of the Pallas kernel to time "
                        "(contraction='pallas'; interpret mode off a GPU)")
    parser.add_argument("--fused", action="store_true", help="also time the three kernel pieces under one jit")
    parser.add_argument("--end-to-end", action="append", default=[], choices=sorted(CONFIGS),
                        help="also time the public heatmap on host numpy inputs for this config (repeatable)")
    parser.add_argument("--markdown", default=None, help="append the results table to this file")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    peak_size = args.peak_size or (8192 if device.platform == "gpu" else 2048)
    peak = matmul_peak(peak_size, args.precision)
    lines = [
        f"Device: {device.device_kind} ({device.platform}), jax {jax.__version__}, precision {args.precision}; "
        f"matmul peak {peak:.1f} GFLOP/s (jitted {peak_size}² float32 jnp.dot, same precision).",
        "",
        "| config | layers (chunk) | n_A × n_B | P_attn | GFLOP | contraction | kernel s (operands + GEMM) | GFLOP/s | % peak "
        "| GEMM-only s | GEMM % peak | one-jit s | loop s (scaled) | speed-up vs loop | end-to-end heatmap s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in args.config or sorted(CONFIGS):
        rows = bench_kernel(name, args)
        e2e = bench_end_to_end(name, args) if name in args.end_to_end else "—"
        for r in rows:
            gflops = r["gflop"] / r["kernel_s"]
            fused = f"{r['fused_s']:.4f}" if args.fused and r["fused_s"] == r["fused_s"] else "—"
            parts = f" ({r['operands_s']:.4f} + {r['gemm_s']:.4f})" if r["gemm_s"] == r["gemm_s"] else ""
            gemm = f"{r['gemm_s']:.4f} | {100 * r['gflop'] / r['gemm_s'] / peak:.0f} %" if parts else "— | —"
            loop = f"{r['loop_s']:.0f} ({r['loop_pairs']} pairs, max rel err {r['loop_max_rel_err']:.1e})" if args.loop_samples else "—"
            speedup = f"{r['loop_s'] / r['kernel_s']:.0f}×" if args.loop_samples else "—"
            lines.append(
                f"| {name} | {r['layers']} ({r['layer_chunk']}) | {r['n_a']} × {r['n_b']} | {r['p_attn'] / 1e6:.1f} M | {r['gflop']:.0f} "
                f"| {r['contraction']} | {r['kernel_s']:.4f}{parts} | {gflops:.0f} | {100 * gflops / peak:.0f} % "
                f"| {gemm} | {fused} | {loop} | {speedup} | {e2e} |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write(text + "\n\n")


if __name__ == "__main__":
    main()
