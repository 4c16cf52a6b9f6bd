"""Phase 1 speed: samples/s of group Fisher against a plain batched gradient and PyTorch.

One run on one GPT-2-small-shaped model with random weights (the same weights in JAX and
PyTorch, exchanged through a safetensors checkpoint), T = 128:

  (a) plain batched ``jax.grad`` of the mean loss — the floor a per-sample method is held to;
  (b) fisherjax group Fisher (``collect``, no contributions);
  (c) fisherjax with contributions (per-sample C_i and g_i) for the attention parameters;
  (d) ``torch.func.vmap(grad)`` on Hugging Face's PyTorch model;
  (e) a PyTorch loop of one backward per sample.

Then XLA's compiled memory analysis of the Phase 1 step for a Llama-7B-shaped config at
T = 512 (abstract weights, nothing allocated).

Usage: python benchmarks/phase1.py [--batch 8] [--batches 3] [--skip-torch] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np

import fisherjax
from fisherjax.data import Batch
from fisherjax.fisher.collect import collect
from fisherjax.fisher.step import lower_step
from fisherjax.grads import sample_losses


def gpt2_small(tmp: str, seed: int = 0) -> str:
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    config._attn_implementation = "eager"
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(tmp)
    return tmp


def random_batches(n_batches: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[Batch]:
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n_batches):
        ids = rng.integers(0, vocab, size=(batch, seq)).astype(np.int32)
        mask = np.ones_like(ids)
        out.append(Batch(ids, mask, ids.copy(), np.arange(b * batch, (b + 1) * batch)))
    return out


def timed(fn, batches, warmup: int = 1) -> float:
    """Samples per second of ``fn(batch)`` over ``batches`` after ``warmup`` untimed calls."""
    for b in batches[:warmup]:
        jax.block_until_ready(fn(b))
    start = time.perf_counter()
    for b in batches[warmup:]:
        jax.block_until_ready(fn(b))
    elapsed = time.perf_counter() - start
    return sum(b.input_ids.shape[0] for b in batches[warmup:]) / elapsed


def collect_rate(model, batches, **options) -> float:
    """Samples/s of one ``collect`` over all batches but the first (a warm-up call compiles)."""
    jax.block_until_ready(collect(model, batches[:1], task="bench", progress=False, **options).group_fisher)
    start = time.perf_counter()
    result = collect(model, batches[1:], task="bench", progress=False, **options)
    jax.block_until_ready(result.group_fisher)
    return sum(b.input_ids.shape[0] for b in batches[1:]) / (time.perf_counter() - start)


def jax_rates(model, batches) -> dict:
    grad_fn = jax.jit(jax.grad(lambda p, i, m, y: sample_losses(model, p, i, m, y)[0].sum() / i.shape[0]))
    return {
        "a_batched_grad": timed(lambda b: grad_fn(model.params, b.input_ids, b.attention_mask, b.labels), batches),
        "b_group_fisher": collect_rate(model, batches),
        "c_with_attention_contributions": collect_rate(model, batches, keep_sample_grads=True),
    }


def torch_rates(directory: str, batches, device: str) -> dict:
    import torch
    import transformers
    from torch.func import functional_call, grad, vmap

    model = transformers.GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager").to(device).eval()
    model.config.pad_token_id = None  # HF's padding warning inspects values, which vmap cannot trace
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, ids):
        logits = functional_call(model, p, (ids[None],)).logits[0, :-1]
        return torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum")

    per_sample = vmap(grad(loss), in_dims=(None, 0))

    def run_vmap(b):
        g = per_sample(params, torch.tensor(b.input_ids, dtype=torch.long, device=device))
        torch.cuda.synchronize() if device == "cuda" else None
        return g

    def run_loop(b):
        ids = torch.tensor(b.input_ids, dtype=torch.long, device=device)
        for i in range(ids.shape[0]):
            model.zero_grad(set_to_none=True)
            loss(dict(model.named_parameters()), ids[i]).backward()
            _ = [p.grad.square() for p in model.parameters()]
        torch.cuda.synchronize() if device == "cuda" else None

    with torch.no_grad():
        pass
    return {"d_torch_func_vmap_grad": timed(run_vmap, batches), "e_torch_loop": timed(run_loop, batches)}


def memory_7b(batch: int, seq: int, remat: bool) -> dict:
    """Compiled memory of the Phase 1 step for Llama-7B shapes (no weights allocated)."""
    import transformers
    from flax import nnx

    from fisherjax.config import from_hf_dict
    from fisherjax.layout import layout_for
    from fisherjax.models.decoder import Decoder
    from fisherjax.models.hf import abstract_params
    from fisherjax.models.model import Model

    cfg = from_hf_dict(
        transformers.LlamaConfig(
            hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
        ).to_dict()
    )
    params = abstract_params(cfg)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(params=0))))
    model = Model(cfg, params, layout_for(cfg, params), graphdef)
    # sample_loop=False: the vmapped site work an 80 GB GPU runs (the CPU default loops over samples)
    analysis = lower_step(model, batch, seq, remat=remat, sample_loop=False).compile().memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    out = {f: int(getattr(analysis, f)) for f in fields if hasattr(analysis, f)}
    out["peak_estimate_gb"] = (out.get("argument_size_in_bytes", 0) + out.get("output_size_in_bytes", 0)
                               + out.get("temp_size_in_bytes", 0) - out.get("alias_size_in_bytes", 0)) / 1e9
    out.update(params_billion=model.num_params / 1e9, batch=batch, seq=seq, remat=remat)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3, help="batches per measurement (first one is warm-up)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--device", default="cuda" if jax.default_backend() == "gpu" else "cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind})",
        "batch": args.batch,
        "seq": args.seq,
    }
    with tempfile.TemporaryDirectory() as tmp:
        directory = gpt2_small(tmp)
        model = fisherjax.load_pretrained(directory)
        batches = random_batches(args.batches, args.batch, args.seq, model.config.vocab_size)
        rates = jax_rates(model, batches)
        if not args.skip_torch:
            rates.update(torch_rates(directory, batches, args.device))
    result["samples_per_s"] = {k: round(v, 3) for k, v in rates.items()}
    result["ratios"] = {"b_over_a": round(rates["b_group_fisher"] / rates["a_batched_grad"], 3)}
    if "d_torch_func_vmap_grad" in rates:
        result["ratios"]["b_over_d"] = round(rates["b_group_fisher"] / rates["d_torch_func_vmap_grad"], 3)
        result["ratios"]["b_over_e"] = round(rates["b_group_fisher"] / rates["e_torch_loop"], 3)
    if not args.skip_memory:
        result["llama7b_t512_memory"] = [memory_7b(1, 512, False), memory_7b(4, 512, True)]
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
