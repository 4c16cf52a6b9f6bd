"""`fisherjax analyze` end to end against a PyTorch per-sample loop (issue 23).

What is compared, on the same weights and the same samples:

* **fisherjax**: ``python3 -m fisherjax.cli analyze`` with its default options (all phases,
  ``--no-progress``) on a GPT-2- or Llama-shaped checkpoint (:data:`SHAPES`) with random weights,
  written by transformers' PyTorch ``save_pretrained`` (safetensors) with the demo's character tokenizer,
  and two tasks (``a``, ``b``) of ``--samples`` texts of about ``--tokens`` tokens each (random
  text over the tokenizer's characters, ``text`` field, lengths 0.8–1.2 × ``--tokens``; the
  copied ``tokenizer_config.json`` says the model's positions instead of the demo model's 64, which made
  transformers warn about every longer sample; ``--max-length`` is given only for samples longer
  than its default, which fisherjax would cut and torch not).
* **torch**: what the original system's Phase 1 does, and only that: Hugging Face's model
  (``AutoModelForCausalLM``) loaded from the same checkpoint, one forward and backward pass per sample of
  its token-sum loss over the predicted tokens (the tokens ``fisherjax.data.load_task`` gives,
  targets = the next real token, no padding), ``diag += g**2 / T_i`` per parameter, then ``/ n``;
  each task's diagonal is kept, as a Phase 1 keeps its result.

Each measured run is a child process of this script, timed from start to exit (wall seconds,
imports and loading included). Its peak RSS (GB = 10⁹ bytes) is the largest of its ``wait4``
rusage, ``/proc/PID/status`` polled every 10 ms, and, for fisherjax, results.json's
``phases.total.peak_rss_gb`` (fisherjax's telemetry samples the resident size and leaves the
kernel's high-water mark alone, so the rusage figure is the true peak too; the other two guard
against a child that is not fisherjax's). This script itself imports nothing heavy, since a forked child's peak RSS starts at its
parent's: writing the checkpoint, tokenizing and checking the results run as child workers too.
With ``--repeats R`` the fisherjax and torch runs alternate. Ratios are fisherjax / torch. After
the first pair, a check worker compares the two runs' diagonal Fisher totals and token-sum losses
per task (they must agree, or the comparison is not of the same computation).

The compilation cache: ``--cold`` (default) gives every fisherjax run a new, empty
``--compilation-cache`` directory; ``--warm`` gives each configuration one directory, filled by a
first run (reported, as cold) before the measured runs reuse it. ``FISHERJAX_COMPILATION_CACHE``
and ``JAX_COMPILATION_CACHE_DIR`` are removed from the runs' environment. When ``fisherjax
analyze --help`` lists no ``--compilation-cache`` option, runs get no cache option at all.

``--curve`` runs only fisherjax (``--repeats`` times per point), at several samples per task
(``--max-samples`` on one pair of task files), and reports each stretch's time, share of the total
and peak RSS when ``results.json`` has ``phases`` (else only the total).

The output is a Markdown block for benchmarks/RESULTS.md on stdout (progress on stderr);
``--json FILE`` also writes the raw numbers. Each fisherjax run's ``results.json`` is copied into
the working directory as ``results-N.json`` (kept with ``--keep``, for ``benchmarks/work_floors.py``).

Usage:
    python3 benchmarks/end_to_end.py                                  # GPT-2-small, 64 samples/task, 100 tokens
    python3 benchmarks/end_to_end.py --shape small --samples 64 --tokens 100 --repeats 3 --json e2e.json
    python3 benchmarks/end_to_end.py --warm --repeats 2               # compilation cache reused
    python3 benchmarks/end_to_end.py --curve 32,64,128,256            # fisherjax only, tiny shape by default
    python3 benchmarks/end_to_end.py --shape tiny --samples 8 --tokens 40 --repeats 1   # a quick try
    python3 benchmarks/end_to_end.py --shape smollm                  # the Llama family at GPT-2 small's size
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_CHECKPOINT = REPO / "fisherjax" / "demo" / "checkpoint"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TASKS = ("a", "b")
SHAPES = {
    "small": dict(model_type="gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    "tiny": dict(model_type="gpt2", n_layer=4, n_embd=256, n_head=4, vocab_size=50257, n_positions=1024),
    # SmolLM-135M's shape: the Llama family (RMSNorm, RoPE, grouped-query attention, gated MLP) at
    # GPT-2 small's size, with 30 layers, 9 query heads over 3 kv heads and tied embeddings
    "smollm": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True),
}
"""Checkpoint shapes: ``model_type`` and the Hugging Face config's fields (transformers' ``AutoConfig.for_model``)."""
GB = 1e9
POLL_S = 0.01
PHASE1 = "collect"
"""results.json's stretch for Phase 1's collection (``phases.fisher`` is the writing of the states)."""
STRETCH_FIELDS = ("seconds", "peak_rss_gb", "compilations", "compile_seconds", "cache_hits")
ANALYZE_MAX_LENGTH = 256
"""``fisherjax analyze --max-length``'s default: longer samples get the option (fisherjax would cut them, torch not)."""
CACHE_ENV = ("FISHERJAX_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")
"""Taken out of the fisherjax runs' environment: the cache is what this script's options say."""


def hf_config(shape: str):
    """The shape's Hugging Face config (imports transformers: call it in a worker)."""
    import transformers

    fields = dict(SHAPES[shape])
    return transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)


def describe(shape: str) -> str:
    """``gpt2-small (12 layers, d = 768, vocab 50257)`` from :data:`SHAPES` alone."""
    f = SHAPES[shape]
    layers, d = f.get("n_layer", f.get("num_hidden_layers")), f.get("n_embd", f.get("hidden_size"))
    heads = f"{f['num_attention_heads']} / {f['num_key_value_heads']} kv heads, " if "num_key_value_heads" in f else ""
    return f"{f['model_type']}-{shape} ({layers} layers, d = {d}, {heads}vocab {f['vocab_size']})"


# ---- child processes ----------------------------------------------------------------------------


def run_child(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` to completion: its wall seconds and peak RSS.

    The peak is the larger of the child's own rusage (``wait4``) and the highest ``VmHWM`` /
    ``VmRSS`` read from ``/proc/PID/status`` every ``POLL_S`` while it runs. The rusage alone is
    not enough: a process that resets its high-water mark (fisherjax's telemetry writes ``5`` to
    ``/proc/self/clear_refs`` per stretch) leaves in its rusage only the peak since the last reset.
    stdout and stderr go to ``log``; a failing command stops the benchmark with the log's tail.
    """
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        poller = RssPoller(proc.pid)
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped: the pid is still this child's
        wall = time.perf_counter() - start
        polled_kb = poller.stop()
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        sys.exit(f"end_to_end: {' '.join(map(str, cmd))} exited with {proc.returncode}; the end of {log}:\n{tail}")
    return {
        "wall_s": round(wall, 2),
        "peak_rss_gb": round(max(usage.ru_maxrss, polled_kb) * 1024 / GB, 3),
        "peak_rss_sources_gb": {"wait4": round(usage.ru_maxrss * 1024 / GB, 3), "polled": round(polled_kb * 1024 / GB, 3)},
    }


class RssPoller:
    """A thread that keeps the highest ``VmHWM`` or ``VmRSS`` (kB) of a process until stopped."""

    def __init__(self, pid: int):
        self.path, self.peak_kb = f"/proc/{pid}/status", 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self) -> None:
        while not self.done.is_set():
            self.read()
            self.done.wait(POLL_S)

    def read(self) -> None:
        try:
            with open(self.path) as f:
                fields = [line.split() for line in f if line.startswith(("VmHWM:", "VmRSS:"))]
        except OSError:
            return
        self.peak_kb = max([self.peak_kb] + [int(parts[1]) for parts in fields])

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return self.peak_kb


def worker_cmd(worker: str, *args) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", worker, *map(str, args)]


def log_lines(log: Path) -> list[str]:
    """The distinct non-empty lines a run printed, in order (for warnings worth reporting)."""
    return list(dict.fromkeys(line for line in log.read_text(errors="replace").splitlines() if line.strip()))


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- fisherjax runs -----------------------------------------------------------------------------


def cache_flag_supported() -> bool:
    """Whether ``fisherjax analyze`` has a ``--compilation-cache DIR`` option."""
    help_text = subprocess.run(
        [sys.executable, "-m", "fisherjax.cli", "analyze", "--help"], capture_output=True, text=True, cwd=REPO
    ).stdout
    return re.search(r"(?<![\w-])--compilation-cache\b", help_text) is not None


class Fisherjax:
    """Runs of ``fisherjax analyze`` on one prepared checkpoint and pair of task files."""

    def __init__(self, work: Path, inputs: dict, cache: str, cache_supported: bool):
        self.work, self.inputs = work, inputs
        self.cache = cache if cache_supported else "no cache option"
        self.count = 0

    def cache_dir(self, max_samples: int | None) -> Path | None:
        """``--cold``: a new directory per run; ``--warm``: one per configuration, shared by its runs."""
        if self.cache == "no cache option":
            return None
        name = f"run-{self.count}" if self.cache == "cold" else f"shared-{max_samples or 'all'}"
        return self.work / f"compilation-cache-{name}"

    def run(self, max_samples: int | None = None, keep: bool = False) -> dict:
        """One measured run; its output directory is removed unless ``keep`` (then it is ``out``)."""
        self.count += 1
        out = self.work / f"fisherjax-out-{self.count}"
        cache = self.cache_dir(max_samples)
        cmd = [sys.executable, "-m", "fisherjax.cli", "analyze", "--model", self.inputs["model"], "--out", str(out), "--no-progress"]
        cmd += [arg for task in TASKS for arg in ("--task", f"{task}={self.inputs['tasks'][task]}")]
        cmd += ["--max-samples", str(max_samples)] if max_samples else []
        cmd += ["--max-length", str(self.inputs["max_tokens"])] if self.inputs["max_tokens"] > ANALYZE_MAX_LENGTH else []
        cmd += ["--compilation-cache", str(cache)] if cache else []
        state = "no cache option" if cache is None else ("warm" if cache.exists() and any(cache.iterdir()) else "cold")
        log = self.work / f"fisherjax-{self.count}.log"
        measured = run_child(cmd, log, env={k: v for k, v in os.environ.items() if k not in CACHE_ENV})
        results = json.loads((out / "results.json").read_text())
        shutil.copyfile(out / "results.json", self.work / f"results-{self.count}.json")  # kept with --keep (benchmarks/work_floors.py reads it)
        run = {
            **measured,
            "cache": state,
            "results_s": results.get("seconds"),
            "phases": phase_times(results),
            "samples": {task: results["tasks"][task]["samples"] for task in TASKS},
            "environment": results.get("environment"),
            "log": log_lines(log),
        }
        telemetry_peak = stretch(run, "total", "peak_rss_gb")
        if telemetry_peak is not None:  # fisherjax's own whole-run peak, kept across its high-water resets
            run["peak_rss_sources_gb"]["results_json"] = telemetry_peak
            run["peak_rss_gb"] = max(run["peak_rss_gb"], telemetry_peak)
        if keep:
            run["out"] = str(out)
        else:
            shutil.rmtree(out, ignore_errors=True)
        return run

    def priming(self, max_samples: int | None = None) -> list[dict]:
        """With ``--warm``, the run that fills a configuration's cache (its cold run); else none."""
        if self.cache != "warm":
            return []
        say(f"fisherjax analyze{f' at {max_samples} samples per task' if max_samples else ''}: priming the compilation cache")
        return [self.run(max_samples)]


def phase_times(results: dict) -> dict:
    """``{stretch: {seconds, peak_rss_gb, compilations, ..}}`` from results.json's ``phases``
    (``total`` is the whole run; empty when results.json has no ``phases``)."""
    phases = results.get("phases") or {}
    return {name: {k: v for k, v in p.items() if k in STRETCH_FIELDS} for name, p in phases.items() if isinstance(p, dict)}


# ---- workers (each runs in its own process) -----------------------------------------------------


def prepare_worker(args) -> None:
    """Write the checkpoint, the task files and the token ids both sides use."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from fisherjax.data import load_task

    model_dir, data = Path(args.model), Path(args.data)
    torch.manual_seed(args.seed)
    config = hf_config(args.shape)
    transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(model_dir)
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO_CHECKPOINT / name, model_dir / name)
    # The demo tokenizer says 64 positions (its model's); this checkpoint has max_position_embeddings.
    config_path = model_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["model_max_length"] = config.max_position_embeddings
    config_path.write_text(json.dumps(tok_config, indent=2))

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    special = set(tokenizer.all_special_tokens)
    alphabet = sorted(t for t in tokenizer.get_vocab() if len(t) == 1 and t not in special and t.isprintable())
    rng = random.Random(args.seed)
    tokens = {}
    for task in TASKS:
        path = data / f"{task}.jsonl"
        with open(path, "w") as f:
            for _ in range(args.samples):
                length = rng.randint(int(0.8 * args.tokens), int(1.2 * args.tokens)) - 1  # the tokenizer adds <bos>
                f.write(json.dumps({"text": "".join(rng.choice(alphabet) for _ in range(max(length, 1)))}) + "\n")
        tokens[task] = [list(ex.tokens) for ex in load_task(path, tokenizer).examples]
    (data / "tokens.json").write_text(json.dumps(tokens))


def torch_worker(args) -> None:
    """Phase 1 as a per-sample loop: diag += g² / T_i, then / n, for each task; times the loop."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    device = torch.device(args.torch_device or "cpu")
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model).eval().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    tokens = json.loads(Path(args.tokens_json).read_text())
    loaded = time.perf_counter()
    diagonals, totals = {}, {}
    for task, samples in tokens.items():
        diag = [torch.zeros_like(p) for p in params]
        loss_sum, n_tokens = 0.0, 0
        for sample in samples:
            ids = torch.tensor(sample, dtype=torch.long, device=device)[None]
            logits = model(ids).logits[0, :-1]
            loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            model.zero_grad(set_to_none=False)  # zeroes the .grad buffers in place: no fresh allocation per sample
            loss.backward()
            t = ids.shape[1] - 1
            with torch.no_grad():
                for d, p in zip(diag, params):
                    d.addcmul_(p.grad, p.grad, value=1.0 / t)
            loss_sum, n_tokens = loss_sum + loss.item(), n_tokens + t
        for d in diag:
            d.div_(len(samples))
        if device.type == "cuda":
            torch.cuda.synchronize()
        diagonals[task] = diag
        totals[task] = {"diag_sum": float(sum(d.double().sum() for d in diag)), "loss_sum": loss_sum, "n_tokens": n_tokens}
    done = time.perf_counter()
    result = {
        "load_s": round(loaded - start, 2),
        "loop_s": round(done - loaded, 2),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "attn_implementation": model.config._attn_implementation,
        "totals": totals,
    }
    Path(args.result).write_text(json.dumps(result))


def check_worker(args) -> None:
    """Compare the fisherjax run's Fisher states with the torch run's totals, per task."""
    import numpy as np

    from fisherjax.io import load_task_fisher

    torch_totals = json.loads(Path(args.torch_result).read_text())["totals"]
    check = {}
    for task, ref in torch_totals.items():
        fisher = load_task_fisher(Path(args.out) / "fisher_state" / task)
        diag_sum = float(sum(np.asarray(v, np.float64).sum() for v in fisher.diagonal.values()))
        check[task] = {
            "fisherjax_diag_sum": diag_sum,
            "torch_diag_sum": ref["diag_sum"],
            "diag_sum_rel_diff": abs(diag_sum - ref["diag_sum"]) / abs(ref["diag_sum"]),
            "loss_sum_rel_diff": abs(fisher.total_loss - ref["loss_sum"]) / abs(ref["loss_sum"]),
            "tokens": [fisher.n_tokens, ref["n_tokens"]],
        }
    Path(args.result).write_text(json.dumps(check))


WORKERS = {"prepare": prepare_worker, "torch": torch_worker, "check": check_worker}


# ---- the benchmark ------------------------------------------------------------------------------


def prepare(work: Path, shape: str, samples: int, tokens: int, seed: int) -> dict:
    model, data = work / f"{SHAPES[shape]['model_type']}-{shape}", work / "tasks"
    model.mkdir()
    data.mkdir()
    say(f"writing a random {SHAPES[shape]['model_type']}-{shape} checkpoint and two tasks of {samples} samples to {work}")
    run_child(worker_cmd("prepare", "--model", model, "--data", data, "--shape", shape, "--samples", samples,
                         "--tokens", tokens, "--seed", seed), work / "prepare.log")
    lengths = [len(s) for task in json.loads((data / "tokens.json").read_text()).values() for s in task]
    return {
        "model": str(model),
        "tasks": {task: str(data / f"{task}.jsonl") for task in TASKS},
        "tokens_json": str(data / "tokens.json"),
        "mean_tokens": round(sum(lengths) / len(lengths), 1),
        "max_tokens": max(lengths),
    }


def torch_run(work: Path, inputs: dict, index: int) -> dict:
    result = work / f"torch-{index}.json"
    log = work / f"torch-{index}.log"
    device = ("--torch-device", inputs["torch_device"]) if inputs.get("torch_device") else ()
    measured = run_child(worker_cmd("torch", "--model", inputs["model"], "--tokens-json", inputs["tokens_json"], "--result", result, *device), log)
    return {**measured, **json.loads(result.read_text()), "log": log_lines(log)}


def check(work: Path, fisherjax_run: dict, torch_result: Path) -> dict:
    result = work / "check.json"
    run_child(worker_cmd("check", "--out", fisherjax_run["out"], "--torch-result", torch_result, "--result", result), work / "check.log")
    shutil.rmtree(fisherjax_run.pop("out"), ignore_errors=True)
    return json.loads(result.read_text())


def compare(work: Path, fj: Fisherjax, inputs: dict, repeats: int) -> dict:
    """Alternating fisherjax and torch runs, and the agreement check on the first pair."""
    runs = {"fisherjax": [], "torch": [], "fisherjax_priming": fj.priming()}
    agreement = None
    for r in range(repeats):
        say(f"repeat {r + 1}/{repeats}: fisherjax analyze")
        runs["fisherjax"].append(fj.run(keep=r == 0))
        say(f"repeat {r + 1}/{repeats}: torch per-sample loop")
        runs["torch"].append(torch_run(work, inputs, r))
        if r == 0:
            agreement = check(work, runs["fisherjax"][0], work / "torch-0.json")
    return {"runs": runs, "agreement": agreement}


def curve(fj: Fisherjax, points: list[int], repeats: int) -> list[dict]:
    """fisherjax alone at each number of samples per task (the first ``n`` lines of the task files)."""
    rows = []
    for n in points:
        runs = fj.priming(n)
        for r in range(repeats):
            say(f"curve: fisherjax analyze at {n} samples per task ({r + 1}/{repeats})")
            runs.append(fj.run(n))
        rows.append({"samples_per_task": n, "runs": runs})
    return rows


# ---- report -------------------------------------------------------------------------------------


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"^Model name:\s*(.+)$", lscpu, re.M).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or platform.machine()
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1),
        "python": platform.python_version(),
        "jax": _version("jax"),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "platform": platform.platform(),
        "accelerator": _accelerator(),
    }


def _accelerator() -> str | None:
    """The GPU(s) ``nvidia-smi -L`` lists, or None (fisherjax runs on JAX's default backend)."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return "; ".join(line.split(" (UUID")[0] for line in listed.splitlines()) or None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "—"


def fmt(x, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def heading(meta: dict, setup: dict) -> str:
    commit = setup.get("commit") or "?"
    return (
        f"{meta['date']}, {meta['cpu']}, {meta['cores']} cores, {meta['memory_gb']} GB, "
        f"{('accelerator ' + meta['accelerator'] + ', ') if meta.get('accelerator') else ''}jax {meta['jax']}, "
        f"torch {meta['torch']}, transformers {meta['transformers']}, fisherjax at {commit}. Random {setup['shape_name']}, demo character "
        f"tokenizer, tasks `a` and `b` of random text, {setup['mean_tokens']} tokens per sample on average; "
        f"compilation cache: {setup['cache']}; torch loop on {setup.get('torch_device', 'cpu')}. `python3 {' '.join(setup['argv'])}`"
    )


def comparison_markdown(result: dict) -> str:
    runs, agreement = result["runs"], result["agreement"]
    header = ["run", "wall s", "peak RSS GB", "inside s", "Phase 1 s", "compile s (cache hits)", "wall fisherjax/torch", "RSS fisherjax/torch"]
    rows = [fisherjax_row("fisherjax analyze, priming (cold cache)", run, None) for run in runs["fisherjax_priming"]]
    for i, (fj, pt) in enumerate(zip(runs["fisherjax"], runs["torch"])):
        rows.append(fisherjax_row(f"{i + 1}: fisherjax analyze ({fj['cache']})", fj, pt))
        rows.append([f"{i + 1}: torch loop (Phase 1 diagonal only)", pt["wall_s"], fmt(pt["peak_rss_gb"], 2), fmt(pt["loop_s"]),
                     fmt(pt["loop_s"]), "—", "—", "—"])
    wall = statistics.median(fj["wall_s"] / pt["wall_s"] for fj, pt in zip(runs["fisherjax"], runs["torch"]))
    rss = statistics.median(fj["peak_rss_gb"] / pt["peak_rss_gb"] for fj, pt in zip(runs["fisherjax"], runs["torch"]))
    torch = runs["torch"][0]
    text = table(header, rows)
    text += f"\n\nMedian ratios fisherjax / torch: wall **{wall:.2f}**, peak RSS **{rss:.2f}**."
    text += ("\n\nWall and peak RSS: the whole process. `inside s`: results.json `seconds` for fisherjax (all phases), "
             "the per-sample loop for torch (loading excluded); `Phase 1 s`: results.json `phases.collect.seconds` "
             f"(Phase 1's collection, both tasks). torch: {torch['threads']} threads, `{torch['attn_implementation']}` attention.")
    if agreement:
        worst = max(max(a["diag_sum_rel_diff"], a["loss_sum_rel_diff"]) for a in agreement.values())
        tokens = all(a["tokens"][0] == a["tokens"][1] for a in agreement.values())
        text += (f" Same computation: per task, the two runs' diagonal Fisher totals and token-sum losses differ by at most "
                 f"{worst:.1e} relative; predicted-token counts {'equal' if tokens else 'DIFFER'}.")
    return text


def fisherjax_row(label: str, run: dict, torch: dict | None) -> list:
    return [label, run["wall_s"], fmt(run["peak_rss_gb"], 2), fmt(run["results_s"]), fmt(stretch(run, PHASE1, "seconds")),
            compile_cell(run), ratio(run["wall_s"], torch and torch["wall_s"]), ratio(run["peak_rss_gb"], torch and torch["peak_rss_gb"])]


def stretch(run: dict, name: str, field: str):
    return run["phases"].get(name, {}).get(field)


def compile_cell(run: dict) -> str:
    seconds = stretch(run, "total", "compile_seconds")
    return "—" if seconds is None else f"{seconds:.1f} ({stretch(run, 'total', 'cache_hits')})"


def curve_markdown(rows: list[dict]) -> str:
    phases = list(dict.fromkeys(p for row in rows for run in row["runs"] for p in run["phases"] if p != "total"))
    header = ["samples/task", "cache", "wall s", "peak RSS GB", "results.json s", "compile s (cache hits)"]
    header += [f"{p} s (share), GB" for p in phases]
    lines = [
        [row["samples_per_task"], run["cache"], run["wall_s"], fmt(run["peak_rss_gb"], 2), fmt(run["results_s"]), compile_cell(run)]
        + [phase_cell(run, p) for p in phases]
        for row in rows
        for run in row["runs"]
    ]
    text = table(header, lines)
    if not phases:
        text += "\n\n(results.json has no `phases`: only the totals are known.)"
    else:
        text += ("\n\nPer stretch (results.json `phases`): seconds, share of results.json `seconds`, the stretch's own peak RSS. "
                 "`collect` is Phase 1's collection, `fisher` the writing of the Fisher states, `report` the figures.")
    return text


def phase_cell(run: dict, phase: str) -> str:
    seconds = stretch(run, phase, "seconds")
    if seconds is None:
        return "—"
    share = f" ({100 * seconds / run['results_s']:.0f} %)" if run["results_s"] else ""
    peak = stretch(run, phase, "peak_rss_gb")
    return f"{seconds:.1f}{share}" + (f", {peak:.2f}" if peak is not None else "")


def report_logs(result: dict) -> None:
    """Print on stderr what the first run of each kind printed (warnings are worth a look)."""
    runs = result.get("runs") or {"fisherjax": result["curve"][0]["runs"]}
    for name in ("fisherjax", "torch"):
        if runs.get(name) and runs[name][0]["log"]:
            say(f"{name}'s output (first run, distinct lines):\n    " + "\n    ".join(runs[name][0]["log"][:40]))


# ---- command line -------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, help="checkpoint shape (default: small; tiny with --curve)")
    parser.add_argument("--samples", type=int, default=64, help="samples per task (default 64)")
    parser.add_argument("--tokens", type=int, default=100, help="approximate tokens per sample (default 100)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating fisherjax / torch pairs (default 1)")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--cold", dest="cache", action="store_const", const="cold", help="a new, empty compilation cache per run (default)")
    cache.add_argument("--warm", dest="cache", action="store_const", const="warm", help="reuse a compilation cache filled by a first run")
    parser.set_defaults(cache="cold")
    parser.add_argument("--curve", help="comma-separated samples per task: fisherjax only, per-phase shares")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-device", help="device of the torch loop, e.g. cuda (default: cpu); fisherjax uses JAX's default backend")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (checkpoint, tasks, logs)")
    # worker processes (internal)
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    for name in ("--model", "--data", "--result", "--out", "--torch-result"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--tokens-json", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        WORKERS[args.worker](args)
        return
    points = [int(n) for n in args.curve.split(",")] if args.curve else []
    shape = args.shape or ("tiny" if points else "small")
    work = Path(tempfile.mkdtemp(prefix="fisherjax-e2e-"))
    try:
        inputs = prepare(work, shape, max(points) if points else args.samples, args.tokens, args.seed)
        inputs["torch_device"] = args.torch_device
        supported = cache_flag_supported()
        if not supported:
            say("fisherjax analyze has no --compilation-cache option: runs get no cache option")
        fj = Fisherjax(work, inputs, args.cache, supported)
        result = {"machine": machine(), "setup": {
            "shape": shape, "shape_config": SHAPES[shape], "shape_name": describe(shape), "samples": points or args.samples,
            "tokens": args.tokens,
            "mean_tokens": inputs["mean_tokens"], "repeats": args.repeats, "cache": fj.cache,
            "torch_device": args.torch_device or "cpu",
            "argv": ["benchmarks/end_to_end.py", *(argv if argv is not None else sys.argv[1:])],
        }}
        if points:
            result["curve"] = curve(fj, points, args.repeats)
            first = result["curve"][0]["runs"][0]
            markdown = curve_markdown(result["curve"])
        else:
            result.update(compare(work, fj, inputs, args.repeats))
            first = result["runs"]["fisherjax"][0]
            markdown = comparison_markdown(result)
        git = (first.get("environment") or {}).get("git") or {}
        result["setup"]["commit"] = (git.get("commit") or "")[:7] + (" (dirty)" if git.get("dirty") else "") or None
        report_logs(result)
        print(heading(result["machine"], result["setup"]) + "\n\n" + markdown)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
