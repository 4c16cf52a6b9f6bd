"""A plain batched gradient against the same loss with the unembedding and cross-entropy in
checkpointed chunks of positions (issue 23: a lead, not yet in the library).

On a model with a large vocabulary beside its width (the 4-layer d = 256 benchmark model, 50257
tokens; GPT-2 small too), a gradient pass writes and reads its ``[tokens, vocab]`` float32 logits
and their cotangent several times; taking the unembedding and ``−log p`` a chunk of positions at a time under
``jax.checkpoint`` (the backward recomputes a chunk's logits) never holds them whole. Prints the
two gradients' relative difference over the whole pytree, then the seconds of each for two
batches of 16 × 128 (rounds alternating), and of other chunk sizes.

Usage::

    python3 benchmarks/end_to_end.py --shape tiny --samples 64 --keep    # builds WORK/gpt2-tiny, WORK/tasks
    python3 benchmarks/chunked_loss.py --work WORK            # --shape small: end_to_end.py --shape small's WORK
"""

from __future__ import annotations

import argparse
import functools
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=false")  # the command line's XLA:CPU flags

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fisherjax.data import IGNORE, batches, load_task, predicted_labels  # noqa: E402
from fisherjax.grads import sample_losses  # noqa: E402
from fisherjax.models.hf import load_pretrained  # noqa: E402


def chunked_loss(model, params, ids, mask, labels, chunk: int = 256):
    """``Σ_i L_i`` with each chunk of ``chunk`` positions unembedded and scored alone, under
    ``jax.checkpoint`` (``batch · seq`` must be a multiple of ``chunk``)."""
    labels = predicted_labels(labels, mask)
    h = model.hidden(params, ids, mask)
    b, t, d = h.shape
    targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], axis=1).reshape(-1)

    @jax.checkpoint
    def piece(hc, yc):
        logits = model.unembed(params, hc).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, jnp.maximum(yc, 0)[:, None], axis=-1)[:, 0]
        return jnp.where(yc != IGNORE, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0).sum()

    n = b * t // chunk
    return jax.lax.map(lambda a: piece(*a), (h.reshape(n, chunk, d), targets.reshape(n, chunk))).sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="end_to_end.py's kept directory (its checkpoint, tasks/a.jsonl)")
    parser.add_argument("--shape", default="tiny", help="the checkpoint end_to_end.py wrote there: gpt2-SHAPE/")
    parser.add_argument("--chunks", default="256,128,512,1024")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = load_pretrained(os.path.join(args.work, f"gpt2-{args.shape}"))
    task = load_task(os.path.join(args.work, "tasks", "a.jsonl"), model.tokenizer, name="a")
    pieces = list(batches(task.subset(list(range(32))), 16))

    def plain(params, ids, mask, labels):
        return sample_losses(model, params, ids, mask, labels)[0].sum()

    grads = {"plain": jax.jit(jax.grad(plain))}
    for chunk in (int(c) for c in args.chunks.split(",")):
        grads[f"chunks of {chunk}"] = jax.jit(jax.grad(functools.partial(chunked_loss, model, chunk=chunk)))

    def run(f):
        return [jax.block_until_ready(f(model.params, b.input_ids, b.attention_mask, b.labels)) for b in pieces]

    reference = run(grads["plain"])
    for name, f in grads.items():
        got = run(f)
        num = sum(float(jnp.sum((x - y) ** 2)) for g, r in zip(got, reference) for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(r)))
        den = sum(float(jnp.sum(x**2)) for r in reference for x in jax.tree.leaves(r))
        print(f"{name}: relative difference {(num / den) ** 0.5:.2g}")
    seconds = {name: [] for name in grads}
    for _ in range(args.rounds):
        for name, f in grads.items():
            start = time.perf_counter()
            run(f)
            seconds[name].append(time.perf_counter() - start)
    for name, s in seconds.items():
        print(f"| {name} | {' / '.join(f'{x:.2f}' for x in s)} |")


if __name__ == "__main__":
    main()
