"""Checkpoints of transformers 4.x's Flax classes (flax_model.msgpack, sharded, Flax-named safetensors)
and a tokenizer borrowed from another directory.

The fixtures under tests/fixtures/flax/ were written by transformers 4.56's own FlaxGPT2LMHeadModel,
FlaxLlamaForCausalLM and FlaxMistralForCausalLM (scripts/make_flax_fixtures.py, which also records
how to rebuild them); their reference.npz holds the Flax model's own logits, an independent reference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax.serialization import msgpack_restore, msgpack_serialize

import fisherjax
from fisherjax import CheckpointError, ConfigError
from fisherjax.models.hf import save_pretrained

FIXTURES = Path(__file__).parent / "fixtures" / "flax"


def _copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def _rewrite(file: Path, edit) -> None:
    """Restore a msgpack file's tree, let ``edit`` change it in place, write it back."""
    tree = msgpack_restore(file.read_bytes())
    edit(tree)
    file.write_bytes(msgpack_serialize(tree))


def _one_line_error(err: pytest.ExceptionInfo, *parts: str) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    for part in parts:
        assert part in text, text
    return text


@pytest.mark.parametrize(
    "name",
    [
        "gpt2_msgpack",
        "gpt2_safetensors",
        "llama_msgpack",
        pytest.param("gpt2_sharded", marks=pytest.mark.slow),
        pytest.param("llama_bf16", marks=pytest.mark.slow),
        pytest.param("mistral_fp16", marks=pytest.mark.slow),
    ],
)
def test_logits_equal_the_flax_models(name):
    """Our forward pass on the loaded parameters gives transformers' Flax logits.

    Tolerance 1e-4 (logits are O(1)) for every storage dtype: the reference was computed by the
    Flax model from the stored parameters widened to float32 — the cast load_pretrained makes — so
    a bfloat16 / float16 fixture differs from ours only by float32 rounding, not by its storage.
    """
    directory = FIXTURES / name
    variant = json.loads((directory / "versions.json").read_text())["variant"]
    model = fisherjax.load_pretrained(directory)
    assert model.tokenizer is None
    assert model.config.tie_word_embeddings == variant["tied_embeddings"]
    assert ("lm_head" in model.params) != variant["tied_embeddings"]
    ref = np.load(directory / "reference.npz")
    logits = np.asarray(model.apply(model.params, ref["input_ids"]))
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=1e-4)


def test_sharded_msgpack_index_is_read():
    """Every tensor of the four shards the index names becomes a parameter (nothing left over, none
    read twice), the Flax Dense lm_head kernel [in, out] as ours is."""
    directory = FIXTURES / "gpt2_sharded"
    model = fisherjax.load_pretrained(directory)
    index = json.loads((directory / "flax_model.msgpack.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 4
    sizes = [x.size for f in shards for x in jax.tree.leaves(msgpack_restore((directory / f).read_bytes()))]
    assert sum(sizes) == model.num_params
    kernel = msgpack_restore((directory / index["weight_map"]["lm_head/kernel"]).read_bytes())["lm_head"]["kernel"]
    np.testing.assert_array_equal(model.params["lm_head"]["kernel"], kernel)


def test_sharded_index_refuses_missing_or_outside_shards(tmp_path):
    directory = _copy("gpt2_sharded", tmp_path)
    (directory / "flax_model-00003-of-00004.msgpack").unlink()
    with pytest.raises(CheckpointError) as err:
        fisherjax.load_pretrained(directory)
    _one_line_error(err, "flax_model.msgpack.index.json", "do not exist", "flax_model-00003-of-00004.msgpack")

    (tmp_path / "outside.msgpack").write_bytes(b"")
    index = directory / "flax_model.msgpack.index.json"
    raw = json.loads(index.read_text())
    raw["weight_map"] = {k: "../outside.msgpack" if v.endswith("00003-of-00004.msgpack") else v for k, v in raw["weight_map"].items()}
    index.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as err:
        fisherjax.load_pretrained(directory)
    _one_line_error(err, "flax_model.msgpack.index.json", "outside the checkpoint directory", "../outside.msgpack")


@pytest.mark.parametrize(
    "content, says",
    [
        (b"\xc1\xc1\xc1 not msgpack", "not a readable Flax msgpack checkpoint"),
        ("truncated", "not a readable Flax msgpack checkpoint"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n", "Git LFS pointer"),
        (msgpack_serialize([1, 2, 3]), "holds a list, not a Flax parameter dict"),
        (msgpack_serialize({"transformer": {"wte": {"embedding": [1.0, 2.0]}, "ln_f": 3}}),
         "transformer.ln_f is a int, transformer.wte.embedding is a list"),
    ],
    ids=["garbage", "truncated", "lfs-pointer", "a-list", "not-arrays"],
)
def test_bad_msgpack_is_refused_naming_the_file(tmp_path, content, says):
    directory = _copy("gpt2_msgpack", tmp_path)
    file = directory / "flax_model.msgpack"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2] if content == "truncated" else content)
    with pytest.raises(CheckpointError) as err:
        fisherjax.load_pretrained(directory)
    assert str(err.value).startswith(str(file) + ":")
    _one_line_error(err, says)


def test_flax_checkpoint_disagreeing_with_config_names_flax_tensors(tmp_path):
    """Missing, mis-shaped and non-float tensors are named as the Flax file names them, in its own
    orientation, and the message says the checkpoint is a Flax one."""
    directory = _copy("gpt2_msgpack", tmp_path)

    def edit(tree):
        block = tree["transformer"]["h"]
        del block["1"]["ln_2"]["scale"]
        block["0"]["mlp"]["c_fc"]["bias"] = block["0"]["mlp"]["c_fc"]["bias"].astype(np.int32)

    _rewrite(directory / "flax_model.msgpack", edit)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "n_inner": 48}))
    with pytest.raises(CheckpointError) as err:
        fisherjax.load_pretrained(directory)
    _one_line_error(
        err,
        "Flax checkpoint (flax_model.msgpack) and config.json disagree",
        "missing tensor transformer.h.1.ln_2.scale (for layers/ln_2/scale)",
        "tensor transformer.h.0.mlp.c_fc.kernel has shape (64, 32), config implies (48, 32)",  # Flax GPT-2: [out, in]
    )

    (directory / "config.json").write_text(json.dumps(config))
    _rewrite(directory / "flax_model.msgpack", lambda tree: tree["transformer"]["h"]["1"]["ln_2"].update(
        scale=np.ones(32, np.float32)))
    with pytest.raises(CheckpointError) as err:
        fisherjax.load_pretrained(directory)
    _one_line_error(err, "non-floating dtype", "transformer.h.0.mlp.c_fc.bias is I32")


def test_tied_config_with_a_different_flax_lm_head_is_refused(tmp_path):
    """Flax Llama computes logits with its own lm_head whatever tie_word_embeddings says; loading it
    as tied would silently change the logits, so it is refused unless the head equals the embedding."""
    directory = _copy("llama_msgpack", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(CheckpointError) as err:
        fisherjax.load_pretrained(directory)
    _one_line_error(err, "lm_head.kernel", "tie_word_embeddings", "false")

    def tie(tree):
        tree["lm_head"]["kernel"] = tree["model"]["embed_tokens"]["embedding"].T.copy()

    _rewrite(directory / "flax_model.msgpack", tie)
    model = fisherjax.load_pretrained(directory)
    assert "lm_head" not in model.params


def test_export_of_a_flax_checkpoint_round_trips(tmp_path):
    """save_pretrained writes PyTorch-named safetensors in PyTorch orientation; reading them back
    gives the same parameters, and transformers' PyTorch GPT-2 accepts the file."""
    from safetensors.numpy import load_file

    model = fisherjax.load_pretrained(FIXTURES / "gpt2_msgpack")
    out = save_pretrained(model, tmp_path / "export")
    tensors = load_file(out / "model.safetensors")
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # PyTorch Conv1D: [in, out]
    flax = msgpack_restore((FIXTURES / "gpt2_msgpack" / "flax_model.msgpack").read_bytes())
    np.testing.assert_array_equal(tensors["transformer.h.0.attn.c_attn.weight"],
                                  flax["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"].T)
    again = fisherjax.load_pretrained(out)
    for a, b in zip(fisherjax.layout.flatten(model.params).values(), fisherjax.layout.flatten(again.params).values()):
        np.testing.assert_array_equal(a, b)


def test_info_reads_a_flax_checkpoint(capsys):
    from fisherjax.cli import main

    assert main(["info", str(FIXTURES / "llama_msgpack")]) == 0
    out = capsys.readouterr().out
    assert "llama" in out and "layers" in out


def _tokenizer(size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i + 3 for i in range(size - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def test_borrowed_tokenizer(tmp_path):
    from fisherjax.pipeline import AnalysisConfig, load_inputs

    small, large, empty = tmp_path / "small", tmp_path / "large", tmp_path / "empty"
    _tokenizer(40).save_pretrained(small)
    _tokenizer(65).save_pretrained(large)
    empty.mkdir()
    directory = FIXTURES / "gpt2_msgpack"  # vocabulary 64, no tokenizer of its own

    model = fisherjax.load_pretrained(directory, tokenizer=small)
    assert len(model.tokenizer) == 40
    assert model.tokenizer("w0 w5")["input_ids"] == [3, 8]

    with pytest.raises(ConfigError) as err:
        fisherjax.load_pretrained(directory, tokenizer=large)
    _one_line_error(err, str(large), "65 tokens", "vocabulary of 64")
    with pytest.raises(ConfigError) as err:
        fisherjax.load_pretrained(directory, tokenizer=empty)
    _one_line_error(err, str(empty), "no tokenizer files")
    with pytest.raises(ConfigError) as err:
        fisherjax.load_pretrained(directory, tokenizer=tmp_path / "nowhere")
    _one_line_error(err, "nowhere", "not a directory")

    task = tmp_path / "task.txt"
    task.write_text("w0 w1 w2 w3\nw4 w5 w6\n")
    model, tasks = load_inputs(AnalysisConfig(model=directory, tasks=(("t", task),), tokenizer=small))
    assert len(model.tokenizer) == 40 and len(tasks["t"].examples) == 2


def test_flax_names_are_recognised_without_metadata(tmp_path):
    """A safetensors file of Flax names whose metadata lost ``format: flax`` is still read as Flax
    (``.kernel`` / ``.embedding`` never occur in PyTorch names), to the same parameters."""
    from safetensors.numpy import load_file, save_file

    directory = _copy("gpt2_safetensors", tmp_path)
    file = directory / "model.safetensors"
    save_file(load_file(file), str(file))
    with_metadata = fisherjax.load_pretrained(FIXTURES / "gpt2_safetensors", load_tokenizer=False)
    without = fisherjax.load_pretrained(directory)
    for a, b in zip(fisherjax.layout.flatten(with_metadata.params).values(), fisherjax.layout.flatten(without.params).values()):
        np.testing.assert_array_equal(a, b)


def test_analyze_runs_on_a_flax_checkpoint(tmp_path):
    """``fisherjax analyze --model`` on transformers 4.x's Flax Llama (no tokenizer files, so the
    task is pre-tokenised with the reference's token ids): Phase 1's loss per token is the
    cross-entropy of the Flax model's own logits."""
    import json

    from scipy.special import log_softmax

    from fisherjax.cli import main

    ref = np.load(FIXTURES / "llama_msgpack" / "reference.npz")
    ids, logits = ref["input_ids"].astype(np.int64), ref["logits"].astype(np.float64)
    task = tmp_path / "ids.jsonl"
    task.write_text("".join(json.dumps({"input_ids": row.tolist()}) + "\n" for row in ids) * 4)  # 8 samples
    out = tmp_path / "out"
    assert main(["analyze", "--model", str(FIXTURES / "llama_msgpack"), "--task", f"ids={task}", "--out", str(out),
                 "--phases", "fisher", "--no-progress", "--no-diagonal", "--batch-size", "4"]) == 0
    found = json.loads((out / "results.json").read_text())["fisher"]["ids"]
    nll = -np.take_along_axis(log_softmax(logits[:, :-1], axis=-1), ids[:, 1:, None], axis=-1)
    assert found["samples"] == 8 and found["loss_per_token"] == pytest.approx(nll.mean(), rel=1e-4)
