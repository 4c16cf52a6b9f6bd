"""Write the Flax checkpoint fixtures of ``tests/test_flax_checkpoints.py`` with transformers' own Flax classes.

transformers 5 dropped its Flax models, so this script runs in a separate environment that has
transformers 4.x (the last with ``FlaxGPT2LMHeadModel``, ``FlaxLlamaForCausalLM``,
``FlaxMistralForCausalLM``; 4.x never had Flax classes for Qwen2 or GPT-NeoX). Create it once, on
top of the system's jax / flax / numpy::

    python3 -m venv --system-site-packages /tmp/fx456
    /tmp/fx456/bin/pip install --no-deps transformers==4.56.2 tokenizers==0.22.1 'huggingface_hub<1.0'
    /tmp/fx456/bin/python scripts/make_flax_fixtures.py            # writes tests/fixtures/flax/

Each fixture directory ``tests/fixtures/flax/<name>/`` holds what ``save_pretrained`` wrote
(``config.json`` and ``flax_model.msgpack``, its sharded form with
``flax_model.msgpack.index.json``, or a Flax-named ``model.safetensors``), ``reference.npz``
(``input_ids`` [2, 8] and the Flax model's own float32 ``logits`` [2, 8, vocab], computed from the
stored parameters widened to float32, so a bfloat16 / float16 fixture is compared on the same
rounded weights) and ``versions.json`` (transformers, jax, flax, numpy versions and the variant).
``generation_config.json`` is not kept. Models are tiny (2 layers, hidden 32, 4 heads, Llama and
Mistral with 2 key/value heads, vocabulary 64, 64 positions, intermediate 64) so all fixtures
together stay a few hundred KB; their parameters are redrawn (:func:`randomize`) so logits are O(1).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "flax"

SIZES = dict(vocab_size=64, layers=2, hidden=32, heads=4, kv_heads=2, positions=64, intermediate=64)


def configs():
    from transformers import GPT2Config, LlamaConfig, MistralConfig

    s = SIZES

    def gpt2(tied: bool):
        return GPT2Config(
            vocab_size=s["vocab_size"], n_positions=s["positions"], n_embd=s["hidden"], n_layer=s["layers"],
            n_head=s["heads"], n_inner=s["intermediate"], tie_word_embeddings=tied,
        )

    def llama(cls):
        return cls(
            vocab_size=s["vocab_size"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
            num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
            max_position_embeddings=s["positions"], tie_word_embeddings=False,
        )

    return {"gpt2": gpt2, "llama": lambda: llama(LlamaConfig), "mistral": lambda: llama(MistralConfig)}


VARIANTS = {
    # name: (family, storage dtype, how it is saved, tied embeddings)
    "gpt2_msgpack": ("gpt2", "float32", "msgpack", True),
    "gpt2_sharded": ("gpt2", "float32", "sharded", False),
    "gpt2_safetensors": ("gpt2", "float16", "safetensors", True),
    "llama_msgpack": ("llama", "float32", "msgpack", False),
    "llama_bf16": ("llama", "bfloat16", "msgpack", False),
    "mistral_fp16": ("mistral", "float16", "msgpack", False),
}
"""Flax Llama and Mistral always have their own ``lm_head`` (they ignore ``tie_word_embeddings``),
so the tied variants are GPT-2's; the tests build a tied Llama from ``llama_msgpack``."""


def model_class(family: str):
    import transformers

    return {
        "gpt2": transformers.FlaxGPT2LMHeadModel,
        "llama": transformers.FlaxLlamaForCausalLM,
        "mistral": transformers.FlaxMistralForCausalLM,
    }[family]


def cast(params, dtype: str):
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda x: jnp.asarray(x, getattr(jnp, dtype)), params)


def randomize(params, seed: int = 0):
    """Every leaf drawn afresh, so each one moves the logits: kernels and embeddings ~ N(0, 0.3²),
    norm weights ~ 1 + N(0, 0.2²), biases ~ N(0, 0.2²). (The models' own init leaves norms at one,
    biases at zero and logits near zero, where a wrong orientation could hide under a tolerance.)"""
    from flax.traverse_util import flatten_dict, unflatten_dict

    rng = np.random.default_rng(seed)
    out = {}
    for path, x in flatten_dict(params).items():
        noise = rng.normal(size=x.shape).astype(np.float32)
        if path[-1] in ("kernel", "embedding"):
            out[path] = 0.3 * noise
        elif path[-1] == "bias":
            out[path] = 0.2 * noise
        else:  # LayerNorm scale, RMSNorm weight
            out[path] = 1.0 + 0.2 * noise
    return unflatten_dict(out)


def write(name: str, family: str, dtype: str, how: str, tied: bool) -> None:
    import flax
    import jax
    import transformers

    cfg = configs()["gpt2"](tied) if family == "gpt2" else configs()[family]()
    model = model_class(family)(cfg, seed=0)
    params = cast(randomize(model.params), dtype)
    directory = OUT / name
    shutil.rmtree(directory, ignore_errors=True)
    kwargs = {"safe_serialization": True} if how == "safetensors" else {}
    if how == "sharded":
        kwargs["max_shard_size"] = "30KB"
    model.save_pretrained(directory, params=params, **kwargs)
    (directory / "generation_config.json").unlink(missing_ok=True)

    rng = np.random.default_rng(0)
    input_ids = rng.integers(0, SIZES["vocab_size"], size=(2, 8)).astype(np.int32)
    logits = model(input_ids, params=cast(params, "float32")).logits
    np.savez(directory / "reference.npz", input_ids=input_ids, logits=np.asarray(logits, np.float32))
    versions = {
        "transformers": transformers.__version__, "jax": jax.__version__, "flax": flax.__version__,
        "numpy": np.__version__, "python": sys.version.split()[0],
        "variant": {"family": family, "storage_dtype": dtype, "saved_as": how, "tied_embeddings": tied},
        "written_by": "scripts/make_flax_fixtures.py",
    }
    (directory / "versions.json").write_text(json.dumps(versions, indent=2, sort_keys=True) + "\n")
    files = sorted(p.name for p in directory.iterdir())
    size = sum(p.stat().st_size for p in directory.iterdir())
    print(f"{name}: {files} ({size / 1024:.0f} KB), logits std {float(np.std(logits)):.2f}")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (family, dtype, how, tied) in VARIANTS.items():
        write(name, family, dtype, how, tied)


if __name__ == "__main__":
    main()
