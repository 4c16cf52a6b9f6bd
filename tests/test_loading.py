"""Checkpoint loading, export round trip, config fallbacks, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import VOCAB, padded_batch

torch = pytest.importorskip("torch")

import fisherjax  # noqa: E402
from fisherjax import CheckpointError, ConfigError  # noqa: E402
from fisherjax.config import from_hf_dict  # noqa: E402
from fisherjax.models.hf import save_pretrained, to_hf_tensors  # noqa: E402


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _tokenizer(size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i + 3 for i in range(size - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gpt_neox"])
def test_export_round_trips_exactly(kind, hf_checkpoint, tmp_path):
    from safetensors.numpy import load_file

    directory, _ = hf_checkpoint(kind)
    model = fisherjax.load_pretrained(directory)
    out = save_pretrained(model, tmp_path / "export")
    original, exported = load_file(directory / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(original) == sorted(exported)
    for name in original:
        np.testing.assert_array_equal(original[name], exported[name], err_msg=name)
    again = fisherjax.load_pretrained(out)
    for a, b in zip(fisherjax.layout.flatten(model.params).values(), fisherjax.layout.flatten(again.params).values()):
        np.testing.assert_array_equal(a, b)
    assert set(to_hf_tensors(model)) == set(original)


def test_sharded_checkpoint_and_tokenizer(hf_checkpoint, tmp_path):
    _, torch_model = hf_checkpoint("llama")
    torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    _tokenizer(VOCAB).save_pretrained(tmp_path)
    model = fisherjax.load_pretrained(tmp_path)
    assert model.tokenizer is not None and len(model.tokenizer) == VOCAB
    ids, mask = padded_batch(np.random.default_rng(0), [6, 4], 6, "right")
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model.apply(model.params, ids, mask))[0], ref[0], atol=1e-4)


def test_pickle_weights_need_an_explicit_opt_in(hf_checkpoint, tmp_path):
    directory, torch_model = hf_checkpoint("gpt2")
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    torch.save(torch_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle-based weights are refused"):
        fisherjax.load_pretrained(tmp_path)
    model = fisherjax.load_pretrained(tmp_path, allow_pickle=True)
    reference = fisherjax.load_pretrained(directory)
    np.testing.assert_array_equal(model.params["layers"]["attn"]["c_attn"]["kernel"], reference.params["layers"]["attn"]["c_attn"]["kernel"])


def test_old_style_rope_keys_give_the_same_config():
    new = {
        "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 16, "max_position_embeddings": 32,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    }
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old.update(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    assert from_hf_dict(new) == from_hf_dict(old)
    neox_new = {"model_type": "gpt_neox", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
                "num_attention_heads": 2, "rope_parameters": {"rope_theta": 1000.0, "partial_rotary_factor": 0.5}}
    neox_old = {k: v for k, v in neox_new.items() if k != "rope_parameters"} | {"rotary_emb_base": 1000.0, "rotary_pct": 0.5}
    a, b = from_hf_dict(neox_new), from_hf_dict(neox_old)
    assert a == b and a.rope.rotary_dim == 2 and a.rope.theta == 1000.0


def test_rope_frequencies_match_transformers():
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for params in (
        {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ):
        hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=256, rope_parameters=dict(params))
        ref, ref_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf)
        ours, scale = from_hf_dict(hf.to_dict()).rope.inverse_frequencies()
        np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
        assert abs(scale - ref_scale) < 1e-6


# ---- bad checkpoints: one clear error each, naming the file and problem -----------------------


def test_unknown_architecture(hf_checkpoint, tmp_path):
    d = _copy(hf_checkpoint("gpt2")[0], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: unknown architecture model_type='mamba'"):
        fisherjax.load_pretrained(d)


def test_missing_and_truncated_weights(hf_checkpoint, tmp_path):
    d = _copy(hf_checkpoint("gpt2")[0], tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|cannot read)"):
        fisherjax.load_pretrained(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        fisherjax.load_pretrained(d)
    with pytest.raises(CheckpointError, match="not a directory"):
        fisherjax.load_pretrained(tmp_path / "nowhere")


def test_wrong_shape_and_config_disagreement(hf_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = hf_checkpoint("llama")[0]
    d = _copy(src, tmp_path / "shape")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:-1]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(23, 32\), config implies \(24, 32\)"):
        fisherjax.load_pretrained(d)

    d = _copy(src, tmp_path / "layers")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.2\."):
        fisherjax.load_pretrained(d)
    cfg["num_hidden_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensors the config does not account for: model\.layers\.1\."):
        fisherjax.load_pretrained(d)


def test_nan_weights_and_oversized_tokenizer(hf_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy(hf_checkpoint("qwen2")[0], tmp_path / "nan")
    tensors = load_file(d / "model.safetensors")
    tensors["model.norm.weight"][3] = np.nan
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="NaN or inf in parameters: final_norm/scale"):
        fisherjax.load_pretrained(d)

    d = _copy(hf_checkpoint("qwen2")[0], tmp_path / "tok")
    _tokenizer(VOCAB + 20).save_pretrained(d)
    with pytest.raises(CheckpointError, match=rf"tokenizer has 11\d tokens but the model.s vocabulary has {VOCAB}"):
        fisherjax.load_pretrained(d)
