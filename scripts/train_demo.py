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

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # JAX_PLATFORMS=cuda to train on a GPU, as the shipped model was (TRAINING.md)

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from fisherjax.config import from_hf_dict
from fisherjax.data import IGNORE, Task, batches, load_task, task_from_tokens
from fisherjax.demo import TASK_NAMES, evaluate
from fisherjax.demo.tasks import COPY_LENGTHS, SEPARATOR, generate, write_jsonl
from fisherjax.demo.tokenizer import save_tokenizer
from fisherjax.grads import token_nll
from fisherjax.heads.ablation import gate_heads
from fisherjax.models import Model, load_pretrained, save_pretrained

REPO = Path(__file__).resolve().parents[1]
HELD_OUT = 128
NUM_HEADS, NUM_KV_HEADS = 4, 2
MATH_TOKENS = 13  # <bos> + "999+999=" + "1998"


def train_buckets(copy_max: int) -> tuple[int]:
    """One shape for every training batch: copy needs ``2·max + 2`` tokens (40 for the default 16)."""
    return (-(-max(2 * copy_max + 2, MATH_TOKENS) // 8) * 8,)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=REPO / "fisherjax" / "demo", help="writes checkpoint/, tasks/, TRAINING.md here"
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=384)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--math-fraction", type=float, default=0.9, help="share of math samples in the training stream")
    parser.add_argument("--pool", type=int, default=100_000, help="training samples drawn (reshuffled each epoch)")
    parser.add_argument(
        "--copy-lengths", type=int, nargs=2, default=COPY_LENGTHS, metavar=("MIN", "MAX"), help="copy segment lengths"
    )
    parser.add_argument(
        "--head-dropout",
        type=float,
        default=0.3,
        help="per-sample probability of zeroing each head's output in every layer but the last (training only)",
    )
    parser.add_argument(
        "--last-layer-dropout",
        type=float,
        default=0.3,
        help="the same for the last layer's heads except head 0, the one head the model can always rely on",
    )
    parser.add_argument(
        "--dropout-tasks",
        choices=("copy", "all"),
        default="all",
        help="samples that get head dropout: copy only (math trains undisturbed) or all",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    for name in ("head_dropout", "last_layer_dropout"):
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} ({getattr(args, name)}) must be in [0, 1)")
    args.copy_lengths = tuple(args.copy_lengths)
    return args


def hf_config_dict(args, vocab_size: int) -> dict:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
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
        records = generate(
            name, counts[name], seed=args.seed + 1000 + offset, exclude=exclude, distinct=False, copy_lengths=args.copy_lengths
        )
        examples.extend(encode(name, records, tokenizer).examples)
    return Task("train", tuple(examples))


def head_dropout_rates(layers: int, heads: int, earlier: float, last: float) -> np.ndarray:
    """``[layer, head]`` dropout probabilities: ``earlier`` in every layer but the last, ``last``
    for the last layer's heads 1 … H−1, 0 for its head 0."""
    rates = np.full((layers, heads), earlier)
    rates[-1] = last
    rates[-1, 0] = 0.0
    return rates


def head_keep(key: jax.Array, batch: int, rates: np.ndarray) -> jax.Array:
    """``[batch, layer, head]`` inverted-dropout factors: 0 with probability ``rates[l, h]``, else
    ``1 / (1 − rates[l, h])``."""
    kept = jax.random.bernoulli(key, 1.0 - rates, (batch, *rates.shape))
    return kept / (1.0 - rates)


def make_train_step(
    model: Model,
    optimizer: optax.GradientTransformation,
    rates: np.ndarray | None = None,
    seed: int = 0,
    routed_token: int | None = None,
):
    """A jitted AdamW step on the mean completion NLL; with dropout ``rates`` ``[layer, head]``
    every sample gets its own head mask (:func:`head_keep`, drawn from ``seed`` and the step
    number) — with ``routed_token`` only the samples holding that token, the others keep every head."""

    def logits_of(params, input_ids, attention_mask, step_number):
        if rates is None or not rates.any():
            return model.apply(params, input_ids, attention_mask)
        key = jax.random.fold_in(jax.random.key(seed), step_number)
        keep = head_keep(key, input_ids.shape[0], rates)
        if routed_token is not None:
            keep = jnp.where((input_ids == routed_token).any(-1)[:, None, None], keep, 1.0)

        def one(keep_i, ids_i, mask_i):
            return model.apply(gate_heads(model.layout, params, keep_i), ids_i[None], mask_i[None])[0]

        return jax.vmap(one)(keep, input_ids, attention_mask)

    def loss_fn(params, input_ids, attention_mask, labels, step_number):
        nll = token_nll(logits_of(params, input_ids, attention_mask, step_number), labels)
        return nll.sum() / jnp.maximum((labels[:, 1:] != IGNORE).sum(), 1)

    @jax.jit
    def step(params, opt_state, input_ids, attention_mask, labels, step_number):
        loss, grads = jax.value_and_grad(loss_fn)(params, input_ids, attention_mask, labels, step_number)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def epochs(task: Task, batch_size: int, seed: int, buckets: tuple[int, ...]):
    """Endless batches; the training stream is reshuffled (seeded) every epoch."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(task))
        shuffled = Task(task.name, tuple(task.examples[i] for i in order))
        for batch in batches(shuffled, batch_size, buckets=buckets):
            if batch.num_real == batch_size:
                yield batch


def main(argv=None) -> dict:
    args = parse_args(argv)
    started, cpu_started, load_before = time.time(), time.process_time(), os.getloadavg()[0]
    checkpoint, task_dir = args.out / "checkpoint", args.out / "tasks"
    checkpoint.mkdir(parents=True, exist_ok=True)
    tokenizer = save_tokenizer(checkpoint)

    held_out = {
        name: generate(name, HELD_OUT, seed=args.seed + offset, copy_lengths=args.copy_lengths)
        for offset, name in enumerate(TASK_NAMES)
    }
    for name, records in held_out.items():
        write_jsonl(records, task_dir / f"{name}.jsonl")
    train = training_stream(args, tokenizer, held_out)

    hf_dict = hf_config_dict(args, len(tokenizer))
    model = Model.init(from_hf_dict(hf_dict), seed=args.seed, hf_config=hf_dict)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, args.steps, end_value=args.lr * 0.01)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=args.weight_decay))
    params, opt_state = model.params, optimizer.init(model.params)
    rates = head_dropout_rates(args.layers, NUM_HEADS, args.head_dropout, args.last_layer_dropout)
    routed = tokenizer.convert_tokens_to_ids(SEPARATOR) if args.dropout_tasks == "copy" else None
    step = make_train_step(model, optimizer, rates, args.seed, routed)

    losses = []
    stream = epochs(train, args.batch_size, args.seed, train_buckets(args.copy_lengths[1]))
    with tqdm(range(args.steps), desc="train", mininterval=5.0) as bar:
        for i in bar:
            batch = next(stream)
            params, opt_state, loss = step(params, opt_state, batch.input_ids, batch.attention_mask, batch.labels, i)
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


def _dropout_line(config: dict) -> str:
    """The TRAINING.md line on head dropout and copy lengths ("" for a run without dropout)."""
    if not (config["head_dropout"] or config["last_layer_dropout"]):
        return ""
    last = config["layers"] - 1
    samples = "copy samples only" if config["dropout_tasks"] == "copy" else "every sample"
    return (
        f"- Head dropout ({samples}, training only): each head's output zeroed with probability "
        f"{config['head_dropout']} in layers 0–{last - 1}, {config['last_layer_dropout']} for heads 1–{NUM_HEADS - 1} of layer {last}, "
        f"never for L{last}H0 — copy's previous-token signal must be carried redundantly in the earlier layer(s) and its "
        f"induction read-out can rely on L{last}H0 alone; copy segments of {config['copy_lengths'][0]}–{config['copy_lengths'][1]} letters\n"
    )


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
{_dropout_line(config)}- Final training loss (mean NLL per completion token, last 100 steps): {metrics['final_train_loss']:.4f}

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
