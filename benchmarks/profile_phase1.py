"""Where the Phase 1 step spends its time: steady-state timings of its pieces on one model.

Prints milliseconds per batch for: the plain batched gradient; the forward + pullback to the
taps alone; the per-sample norms from the recorded sites alone (looped over (sample, layer)
pieces and vmapped); the full step (group Fisher) with ghost norms chosen automatically (with the
backend's default per-sample mapping and with one vmap), forced on and forced off; the step
with attention contributions; and the step with the full diagonal (running sums looped or vmapped over
samples, or a Welford state with its variance), without and with them. Usage:
python benchmarks/profile_phase1.py [--batch 16] [--seq 128] [--model gpt2-small|smollm-135m|tiny] [--only LABEL,...]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from fisherjax.fisher.options import CollectOptions
from fisherjax.fisher.step import compiled_step, initial_state, make_plan, site_names
from fisherjax.fisher.sites import discover_sites, squared_marginals_from_sites
from fisherjax.grads import sample_losses, site_grads


def build(name: str):
    import transformers

    from fisherjax.config import from_hf_dict
    from fisherjax.models import Model

    if name == "gpt2-small":
        hf = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    elif name == "smollm-135m":  # a Llama-family model of GPT-2 small's size: 30 layers, 9 query / 3 kv heads, tied
        hf = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
    else:
        hf = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=256)
    return Model.init(from_hf_dict(hf.to_dict()), seed=0)


def per_batch_ms(fn, args_list, repeats: int) -> float:
    jax.block_until_ready(fn(*args_list[0]))
    start = time.perf_counter()
    for i in range(repeats):
        out = fn(*args_list[i % len(args_list)])
    jax.block_until_ready(out)
    return 1e3 * (time.perf_counter() - start) / repeats


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--model", default="gpt2-small")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--only", default=None, help="comma-separated labels to time (default: all)")
    args = p.parse_args()
    wanted = None if args.only is None else set(args.only.split(","))
    model = build(args.model)
    rng = np.random.default_rng(0)
    ids = [jnp.asarray(rng.integers(0, model.config.vocab_size, (args.batch, args.seq)), jnp.int32) for _ in range(2)]
    mask = jnp.ones((args.batch, args.seq), jnp.int32)
    sample_ids = jnp.arange(args.batch)
    key = jax.random.key(0)
    results = {}

    def want(label):
        return wanted is None or label in wanted

    grad = jax.jit(jax.grad(lambda p, i, m: sample_losses(model, p, i, m, i)[0].mean()))
    if want("batched_grad"):
        results["batched_grad"] = per_batch_ms(grad, [(model.params, i, mask) for i in ids], args.repeats)
    taps = jax.jit(lambda p, i, m: site_grads(model, p, i, m, i).deltas)
    if want("forward_and_pullback_to_taps"):
        results["forward_and_pullback_to_taps"] = per_batch_ms(taps, [(model.params, i, mask) for i in ids], args.repeats)
    sites = discover_sites(model.layout, site_names(model))
    norm_labels = [label for label in ("ghost_norms_alone_looped", "ghost_norms_alone_vmapped") if want(label)]
    recorded = [jax.jit(lambda p, i, m: site_grads(model, p, i, m, i))(model.params, i, mask) for i in ids] if norm_labels else []
    for label in norm_labels:
        loop = label.endswith("looped")
        norms = jax.jit(
            lambda x, d, loop=loop: squared_marginals_from_sites(model.layout, sites, x, d, seq=args.seq, loop=loop)
        )
        results[label] = per_batch_ms(norms, [(r.inputs, r.deltas) for r in recorded], args.repeats)
    del recorded
    for label, options in {
        "step_ghost_auto": dict(ghost="auto"),
        "step_ghost_auto_vmapped": dict(ghost="auto", sample_loop=False),
        "step_ghost_always": dict(ghost="always"),
        "step_ghost_never": dict(ghost="never"),
        "step_attention_contributions": dict(keep_sample_grads=True, ghost="auto"),
        "step_diagonal": dict(ghost="auto", diagonal=True),
        "step_diagonal_vmapped": dict(ghost="auto", diagonal=True, sample_loop=False),
        "step_diagonal_variance": dict(ghost="auto", diagonal=True, diagonal_variance=True),
        "step_diagonal_and_attention_contributions": dict(keep_sample_grads=True, ghost="auto", diagonal=True),
        "step_analyze": dict(keep_sample_grads=True, sample_grads_factors=True, sample_grads_dtype="bfloat16", ghost="auto",
                             diagonal=True),
        "step_kept_factors": dict(keep_sample_grads=True, sample_grads_factors=True, sample_grads_dtype="bfloat16", ghost="auto"),
    }.items():
        if not want(label):
            continue
        plan = make_plan(model.layout, CollectOptions(**options))
        step = compiled_step(model, plan)
        state = initial_state(model, plan)
        fn = lambda p, s, i: step(p, jax.tree.map(jnp.copy, s), i, mask, i, sample_ids, key)  # noqa: E731
        results[label] = per_batch_ms(fn, [(model.params, state, i) for i in ids], args.repeats)
    results = {k: round(v, 2) for k, v in results.items()}
    results["samples_per_s"] = {k: round(args.batch / v * 1e3, 1) for k, v in results.items() if isinstance(v, float)}
    print(json.dumps({"backend": jax.default_backend(), "batch": args.batch, "seq": args.seq, "ms_per_batch": results}, indent=2))


if __name__ == "__main__":
    main()
