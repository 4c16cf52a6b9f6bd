"""Shared fixtures: tiny random Hugging Face checkpoints built with transformers' PyTorch classes.

Each family gets a checkpoint that exercises what makes it different: GPT-2's fused c_attn and
tied head, Llama's grouped-query attention with llama3 rope scaling and a head_dim unequal to
hidden/heads, Mistral's sliding window (shorter than the test sequences), Qwen2's q/k/v biases,
and GPT-NeoX's partial rotary with interleaved fused QKV.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The command line keeps a compilation cache in the user's cache directory: no test run of it (in
# this process, where it would also switch JAX's cache for every later test, or in a subprocess,
# which inherits this) writes there. tests/test_compilation_cache.py turns it on in a tmp folder.
os.environ["FISHERJAX_COMPILATION_CACHE"] = "0"
# The tests' tiny programs spend most of their time in XLA:CPU's compiler: LLVM at -O0 compiles
# them faster (the default run 15 % shorter) and runs them no slower at these sizes; the numbers
# checked do not depend on it (every comparison has a tolerance or compares two programs compiled
# alike). Subprocesses inherit it unless they set XLA_FLAGS themselves.
# The command line's XLA:CPU flags (fisherjax.backend.CPU_COMPILER_FLAGS: the older elemental
# fusion emitters) compile the same programs in about half the backend time (tests/test_qkov.py +
# tests/test_collect.py: 92 → 40 s of backend compilation, 157 → 95 s in all; benchmarks/RESULTS.md).
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
# Added to what is set already (a setting given there wins); the mesh and multi-host subprocesses
# add their device count to these. Set before fisherjax is imported: the looped QK-OV kernel keeps
# the fusion emitters unless XLA_FLAGS sets them as fisherjax is imported (backend.looped_compiler_options);
# here they are the tests' setting for every program, for compile time.
_given = os.environ.get("XLA_FLAGS", "").split()
_names = {f.split("=", 1)[0] for f in _given}
os.environ["XLA_FLAGS"] = " ".join([*_given, *(f for f in TEST_XLA_FLAGS if f.split("=", 1)[0] not in _names)])

from fisherjax.backend import CPU_COMPILER_FLAGS, with_compiler_flags  # noqa: E402

assert set(CPU_COMPILER_FLAGS) <= set(TEST_XLA_FLAGS)  # the command line's flags, and what with_compiler_flags would give:
assert with_compiler_flags(os.environ["XLA_FLAGS"], TEST_XLA_FLAGS) == os.environ["XLA_FLAGS"]

# One JAX compilation cache for the whole test run, shared by the xdist workers and every
# subprocess (they inherit these variables): many tests compile the same programs for the same
# tiny checkpoints, and each compiles them once per run instead of once per process. It starts
# empty (a temporary folder, made by the first process of the run and removed when it exits), so
# no test depends on an earlier run. Tests of the command line's own cache switch it off or
# point it elsewhere (tests/test_compilation_cache.py).
if "FISHERJAX_TEST_JAX_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["FISHERJAX_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="fisherjax-test-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["FISHERJAX_TEST_JAX_CACHE"], True)
TEST_JAX_CACHE = os.environ["FISHERJAX_TEST_JAX_CACHE"]
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", TEST_JAX_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

LONGEST_FIRST = (
    "test_qkov.py", "test_cli.py", "test_factored.py", "test_collect.py", "test_compare.py", "test_plan.py", "test_conflicts.py",
    "test_fisher_reference.py", "test_kfac.py", "test_compilation_cache.py", "test_sharded_analysis.py", "test_readme.py",
    "test_heads.py", "test_loss.py", "test_sharded_collect.py", "test_multihost.py", "test_refuse_cli.py",
)
"""The test files whose default tests take longest, longest first (measured: benchmarks/RESULTS.md,
thirty-sixth session). The two xdist workers take whole files in collection order; xdist's own
order (most tests first) left files of one or two long tests (the README example, the multi-host
and sharded checks) to the end, where one worker ran them while the other had nothing left."""


def pytest_collection_modifyitems(items) -> None:
    """The files of :data:`LONGEST_FIRST` first, in its order; the others after them, most tests first."""
    counts = collections.Counter(item.path.name for item in items)

    def rank(item) -> tuple:
        name = item.path.name
        return (LONGEST_FIRST.index(name), 0, "") if name in LONGEST_FIRST else (len(LONGEST_FIRST), -counts[name], name)

    items.sort(key=rank)


VOCAB = 97
FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "gpt_neox")
FAST_FAMILIES = [f if f in ("gpt2", "llama", "gpt_neox") else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]
"""Every family, Mistral and Qwen2 marked slow: for a check whose default run must stay short, the
three layouts that differ (GPT-2's fused [Q|K|V] with biases, Llama's GQA, NeoX's interleaved
fused QKV) run by default; Mistral is Llama's layout and Qwen2 Llama's with q/k/v biases."""


def hf_config(kind: str):
    """A tiny transformers config of the given model_type."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "gpt2":
        return tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, **common)
    if kind == "llama":
        return tf.LlamaConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
            intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
            **common,
        )
    if kind == "mistral":
        return tf.MistralConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, max_position_embeddings=64, sliding_window=5, **common,
        )
    if kind == "qwen2":
        return tf.Qwen2Config(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=1,
            intermediate_size=48, max_position_embeddings=64, **common,
        )
    if kind == "gpt_neox":
        return tf.GPTNeoXConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, rotary_pct=0.5, **common,
        )
    raise ValueError(kind)


def build_torch_model(kind: str, seed: int = 0):
    """A random HF causal LM in eval mode, float32, eager attention (vmappable by torch.func)."""
    import torch
    import transformers as tf

    classes = {
        "gpt2": tf.GPT2LMHeadModel,
        "llama": tf.LlamaForCausalLM,
        "mistral": tf.MistralForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
        "gpt_neox": tf.GPTNeoXForCausalLM,
    }
    torch.manual_seed(seed)
    config = hf_config(kind)
    config._attn_implementation = "eager"
    model = classes[kind](config).eval()
    # Random init leaves biases and norms at 0 / 1; perturb every parameter so that a wrong
    # mapping of any tensor shows up in the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """``hf_checkpoint(kind) -> (directory, torch_model)``, built once per session."""
    pytest.importorskip("torch")
    cache: dict[str, tuple[Path, object]] = {}

    def make(kind: str):
        if kind not in cache:
            model = build_torch_model(kind)
            directory = tmp_path_factory.mktemp(f"hf-{kind}")
            model.save_pretrained(directory)
            cache[kind] = (directory, model)
        return cache[kind]

    return make


def padded_batch(rng: np.random.Generator, lengths, seq: int, side: str):
    """Random token ids with the given real lengths, padded (with id 0) on ``side``."""
    ids = np.zeros((len(lengths), seq), np.int32)
    mask = np.zeros((len(lengths), seq), np.int32)
    for i, n in enumerate(lengths):
        tokens = rng.integers(3, VOCAB, size=n)
        sl = slice(seq - n, seq) if side == "left" else slice(0, n)
        ids[i, sl] = tokens
        mask[i, sl] = 1
    return ids, mask


def tiny_config(family: str = "llama", **changes):
    """A small DecoderConfig (no checkpoint needed)."""
    from fisherjax.config import DecoderConfig, RopeConfig

    base = dict(
        model_type=family,
        family=family,
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2 if family == "llama" else 4,
        head_dim=8,
        intermediate_size=48,
        max_position_embeddings=64,
        norm_eps=1e-5,
        activation="silu" if family == "llama" else "gelu_new",
        tie_word_embeddings=family == "gpt2",
        qkv_bias=family != "llama",
        o_bias=family != "llama",
        mlp_bias=family != "llama",
        rope=RopeConfig(10000.0, 8) if family != "gpt2" else None,
    )
    base.update(changes)
    return DecoderConfig(**base)


def random_task(name: str, n: int, seed: int = 0, min_len: int = 4, max_len: int = 14, prompt: int = 0):
    """Random token sequences as a task (ids 0..n-1); ``prompt`` leading tokens are not predicted."""
    from fisherjax.data import task_from_tokens

    rng = np.random.default_rng(seed)
    tokens = [rng.integers(3, VOCAB, size=rng.integers(min_len, max_len + 1)).tolist() for _ in range(n)]
    return task_from_tokens(name, tokens, prompt_lens=[min(prompt, len(t)) for t in tokens])


def abstract_layout(config):
    """The layout of a decoder built from abstract parameter shapes (nothing initialised)."""
    from fisherjax.layout import layout_for
    from fisherjax.models.hf import abstract_params

    return layout_for(config, abstract_params(config))


class compilations:
    """Context manager counting XLA backend compilations (``jax.monitoring`` events) inside it:
    ``with compilations() as c: ...; assert c.count == 0``."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __enter__(self):
        import jax

        self.count = 0

        def listener(event, duration, **kwargs):
            if event == self.EVENT:
                self.count += 1

        self._listener = listener
        jax.monitoring.register_event_duration_secs_listener(listener)
        return self

    def __exit__(self, *exc):
        import jax

        jax.monitoring.unregister_event_duration_listener(self._listener)


@pytest.fixture(scope="session")
def cli_checkpoint(tmp_path_factory):
    """A random Llama checkpoint (GQA) with the demo's character tokenizer (``model/``), and two task
    files (``add.jsonl``, prompt + completion, 12 lines; ``words.txt``, 10 lines), built once."""
    torch = pytest.importorskip("torch")
    import transformers

    from fisherjax.demo.tokenizer import build_tokenizer, vocabulary

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(vocabulary()), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(root / "model")
    build_tokenizer().save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    with open(root / "add.jsonl", "w") as f:
        for _ in range(12):
            a, b = rng.integers(0, 99, size=2)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")
    with open(root / "words.txt", "w") as f:
        for _ in range(10):
            f.write("".join(rng.choice(list("abcdefgh"), size=rng.integers(3, 9))) + "\n")
    return root


@pytest.fixture(autouse=True, scope="module")
def _release_compilations():
    """Free every module's compiled executables when it is done.

    Each XLA:CPU executable keeps its code in memory maps of its own, and one pytest process
    compiles thousands of them: the default run passed Linux's per-process limit
    (``vm.max_map_count`` = 65530) and XLA's next mmap failed with a segmentation fault.
    ``jax.clear_caches`` drops the executables (a later module recompiles what it needs).
    """
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
