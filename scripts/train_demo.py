"""Train the shipped demo model: a small Llama (grouped-query attention) on "math" and "copy".

    python scripts/train_demo.py            # writes fisherjax/demo/{checkpoint,tasks,TRAINING.md}
    python scripts/train_demo.py --out /tmp/demo --steps 500   # a quick trial elsewhere

The model is fisherjax's own Flax decoder (``Model.init``) of a ``transformers.LlamaConfig``;
the loss is the mean next-token NLL over completion tokens (``fisherjax.grads.token_nll`` on
``fisherjax.data`` batches), optimised with optax AdamW under a warmup-cosine schedule, with
global-norm clipping. Held-out task files (128 samples each) are drawn first; the training
stream excludes their prompts. Everything is seeded; on CPU the run is deterministic.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the recorded numbers are CPU numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from fisherjax.config import from_hf_dict
from fisherjax.data import IGNORE, Task, batches, load_task, task_from_tokens
from fisherjax.demo import TASK_NAMES, evaluate
from fisherjax.demo.tasks import generate, write_jsonl
from fisherjax.demo.tokenizer import save_tokenizer
from fisherjax.grads import token_nll
from fisherjax.models import Model, load_pretrained, save_pretrained

REPO = Path(__file__).resolve().parents[1]
HELD_OUT = 128
TRAIN_BUCKETS = (24,)  # every training batch has one shape: copy needs ≤ 22 tokens, math ≤ 13


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=REPO / "fisherjax" / "demo", help="writes checkpoint/, tasks/, TRAINING.md here"
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=384)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--math-fraction", type=float, default=0.9, help="share of math samples in the training stream")
    parser.add_argument("--pool", type=int, default=100_000, help="training samples drawn (reshuffled each epoch)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    return args


def hf_config_dict(args, vocab_size: int) -> dict:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["LlamaForCausalLM"],
    )
    return config.to_dict()


def encode(name: str, records: list[dict], tokenizer) -> Task:
    """Prompt with ``<bos>``, completion without, as ``fisherjax.data.load_task`` encodes jsonl."""
    prompts = tokenizer([r["prompt"] for r in records], add_special_tokens=True)["input_ids"]
    completions = tokenizer([r["completion"] for r in records], add_special_tokens=False)["input_ids"]
    return task_from_tokens(name, [p + c for p, c in zip(prompts, completions)], prompt_lens=[len(p) for p in prompts])


def training_stream(args, tokenizer, held_out: dict[str, list[dict]]) -> Task:
    n_math = int(round(args.pool * args.math_fraction))
    counts = {"math": n_math, "copy": args.pool - n_math}
    examples = []
    for offset, name in enumerate(TASK_NAMES):
        exclude = {r["prompt"] for r in held_out[name]}
        records = generate(name, counts[name], seed=args.seed + 1000 + offset, exclude=exclude, distinct=False)
        examples.extend(encode(name, records, tokenizer).examples)
    return Task("train", tuple(examples))


def make_train_step(model: Model, optimizer: optax.GradientTransformation):
    def loss_fn(params, input_ids, attention_mask, labels):
        nll = token_nll(model.apply(params, input_ids, attention_mask), labels)
        return nll.sum() / jnp.maximum((labels[:, 1:] != IGNORE).sum(), 1)

    @jax.jit
    def step(params, opt_state, input_ids, attention_mask, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, input_ids, attention_mask, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def epochs(task: Task, batch_size: int, seed: int):
    """Endless batches; the training stream is reshuffled (seeded) every epoch."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(task))
        shuffled = Task(task.name, tuple(task.examples[i] for i in order))
        for batch in batches(shuffled, batch_size, buckets=TRAIN_BUCKETS):
            if batch.num_real == batch_size:
                yield batch


def main(argv=None) -> dict:
    args = parse_args(argv)
    started, cpu_started, load_before = time.time(), time.process_time(), os.getloadavg()[0]
    checkpoint, task_dir = args.out / "checkpoint", args.out / "tasks"
    checkpoint.mkdir(parents=True, exist_ok=True)
    tokenizer = save_tokenizer(checkpoint)

    held_out = {name: generate(name, HELD_OUT, seed=args.seed + offset) for offset, name in enumerate(TASK_NAMES)}
    for name, records in held_out.items():
        write_jsonl(records, task_dir / f"{name}.jsonl")
    train = training_stream(args, tokenizer, held_out)

    hf_dict = hf_config_dict(args, len(tokenizer))
    model = Model.init(from_hf_dict(hf_dict), seed=args.seed, hf_config=hf_dict)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, args.steps, end_value=args.lr * 0.01)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=args.weight_decay))
    params, opt_state = model.params, optimizer.init(model.params)
    step = make_train_step(model, optimizer)

    losses = []
    stream = epochs(train, args.batch_size, args.seed)
    with tqdm(range(args.steps), desc="train", mininterval=5.0) as bar:
        for i in bar:
            batch = next(stream)
            params, opt_state, loss = step(params, opt_state, batch.input_ids, batch.attention_mask, batch.labels)
            losses.append(loss)
            if (i + 1) % 200 == 0:
                bar.set_postfix(loss=f"{float(np.mean(jax.device_get(losses[-200:]))):.4f}")
    losses = np.asarray(jax.device_get(losses))
    train_seconds = time.time() - started

    save_pretrained(model, checkpoint, params)
    shipped = load_pretrained(checkpoint)  # measure what ships, through the public loader
    results = {name: evaluate(shipped, shipped.params, _held_out_task(shipped, task_dir, name)) for name in TASK_NAMES}
    metrics = {
        "final_train_loss": float(losses[-100:].mean()),
        "steps": args.steps,
        "tasks": results,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "num_params": shipped.num_params,
    }
    (checkpoint / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    wall = time.time() - started
    usage = {"cpu_seconds": time.process_time() - cpu_started, "load_before": load_before, "load_after": os.getloadavg()[0]}
    _write_training_md(args, argv, metrics, train_seconds, wall, usage)
    print(json.dumps({**metrics, "wall_seconds": round(wall, 1)}, indent=2))
    return metrics


def _held_out_task(model, task_dir: Path, name: str) -> Task:
    return load_task(task_dir / f"{name}.jsonl", model.tokenizer, name=name)


def _write_training_md(args, argv, metrics: dict, train_seconds: float, wall: float, usage: dict) -> None:
    command = "python scripts/train_demo.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    rows = "\n".join(
        f"| {name} | {r['num_samples']} | {r['accuracy']:.4f} | {r['token_accuracy']:.4f} | {r['loss_per_token']:.4f} |"
        for name, r in metrics["tasks"].items()
    )
    config = metrics["config"]
    text = f"""# Demo model: how it was trained

- Date: {datetime.date.today().isoformat()}
- Command: `{command.strip()}`
- Machine: CPU only ({os.cpu_count()} cores, shared with other jobs), jax {jax.__version__} on {jax.devices()[0].platform}
- Wall time: {wall:.0f} s in total, {train_seconds:.0f} s until the end of training; {usage['cpu_seconds']:.0f} CPU-seconds
  used by this process; 1-minute load average {usage['load_before']:.1f} at the start and {usage['load_after']:.1f} at the end
- Model: Llama, {config['layers']} layers, d_model {config['hidden']}, 4 query heads / 2 kv heads, MLP {config['intermediate']}, untied head, {metrics['num_params']:,} parameters
- Training: {config['steps']} steps of {config['batch_size']} samples ({config['math_fraction']:.0%} math), AdamW peak lr {config['lr']} (warmup {config['warmup']}, cosine to 1%), weight decay {config['weight_decay']}, clip 1.0, seed {config['seed']}
- Final training loss (mean NLL per completion token, last 100 steps): {metrics['final_train_loss']:.4f}

Held-out task files (`tasks/*.jsonl`, prompts never seen in training), teacher-forced — exact
match means the argmax at every completion position is the label, i.e. greedy decoding
reproduces the whole completion:

| task | samples | exact-match accuracy | token accuracy | loss per token |
|---|---|---|---|---|
{rows}

These numbers are also in `checkpoint/metrics.json`, which `tests/test_demo.py` checks the
shipped model against.
"""
    (args.out / "TRAINING.md").write_text(text)


if __name__ == "__main__":
    main()
