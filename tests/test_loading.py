"""Checkpoint loading, export round trip, config fallbacks, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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


# ---- configs real checkpoints ship are accepted as they are ------------------------------------

REAL_CONFIGS = {
    # original LLaMA (transformers 4.28 conversion): pad_token_id -1, no max_position_embeddings
    "llama-1": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "bos_token_id": 0, "eos_token_id": 1,
                "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008, "initializer_range": 0.02,
                "max_sequence_length": 2048, "num_attention_heads": 32, "num_hidden_layers": 32, "pad_token_id": -1,
                "rms_norm_eps": 1e-06, "torch_dtype": "float16", "use_cache": True, "vocab_size": 32000},
    "llama-2": {"model_type": "llama", "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
                "intermediate_size": 11008, "max_position_embeddings": 4096, "num_attention_heads": 32,
                "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
                "rope_scaling": None, "tie_word_embeddings": False, "vocab_size": 32000},
    "llama-3.1": {"model_type": "llama", "attention_bias": False, "bos_token_id": 128000,
                  "eos_token_id": [128001, 128008, 128009], "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
                  "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
                  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
                  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                  "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256},
    "mistral-7b": {"model_type": "mistral", "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
                   "intermediate_size": 14336, "max_position_embeddings": 32768, "num_attention_heads": 32,
                   "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
                   "sliding_window": 4096, "tie_word_embeddings": False, "vocab_size": 32000},
    "qwen2-0.5b": {"model_type": "qwen2", "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu",
                   "hidden_size": 896, "intermediate_size": 4864, "max_position_embeddings": 131072,
                   "max_window_layers": 24, "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
                   "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": True,
                   "use_sliding_window": False, "vocab_size": 151936},
    "qwen2.5-yarn": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
                     "num_hidden_layers": 24, "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1000000.0,
                     "max_position_embeddings": 32768, "sliding_window": None, "use_sliding_window": False,
                     "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}},
    "pythia-70m": {"model_type": "gpt_neox", "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu", "hidden_size": 512,
                   "intermediate_size": 2048, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
                   "num_attention_heads": 8, "num_hidden_layers": 6, "rotary_emb_base": 10000, "rotary_pct": 0.25,
                   "tie_word_embeddings": False, "use_parallel_residual": True, "vocab_size": 50304},
    "gpt2": {"model_type": "gpt2", "activation_function": "gelu_new", "bos_token_id": 50256, "eos_token_id": 50256,
             "layer_norm_epsilon": 1e-05, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_inner": None, "n_layer": 12,
             "n_positions": 1024, "scale_attn_weights": True, "summary_activation": None, "vocab_size": 50257},
}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_configs_real_checkpoints_ship_are_accepted(name):
    config = from_hf_dict(REAL_CONFIGS[name])
    assert config.num_layers == REAL_CONFIGS[name].get("num_hidden_layers", REAL_CONFIGS[name].get("n_layer"))
    if name == "llama-1":
        assert config.pad_token_id is None and config.max_position_embeddings == 2048
    if name == "llama-3.1":
        assert config.rope.rope_type == "llama3" and dict(config.rope.scaling)["original_max_position_embeddings"] == 8192
        assert config.eos_token_id == 128001 and config.kv_groups == 4
    if name == "qwen2.5-yarn":
        assert config.rope.rope_type == "yarn" and config.sliding_windows == (0,) * 24
    if name == "pythia-70m":
        assert config.rope.rotary_dim == 16 and config.rope.theta == 10000.0 and config.parallel_residual


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral", "qwen2", "gpt_neox"])
def test_transformers_default_configs_are_accepted(kind):
    import transformers as tf

    classes = {"gpt2": tf.GPT2Config, "llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "gpt_neox": tf.GPTNeoXConfig}
    from_hf_dict(classes[kind]().to_dict())
    from_hf_dict(json.loads(classes[kind]().to_json_string(use_diff=True)) | {"model_type": kind})


def test_supported_activations_equal_transformers_own():
    """Every activation a config may name computes what transformers' ACT2FN computes."""
    from transformers.activations import ACT2FN

    from fisherjax.config import SUPPORTED_ACTIVATIONS
    from fisherjax.models.common import activation

    x = np.linspace(-6, 6, 97, dtype=np.float32)
    for name in SUPPORTED_ACTIVATIONS:
        expected = ACT2FN[name](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(np.asarray(activation(name)(x)), expected, rtol=1e-5, atol=1e-6, err_msg=name)


# ---- weights: floating dtypes are cast, links stay inside the checkpoint ------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_floating_dtypes_are_accepted_and_cast(hf_checkpoint, tmp_path, dtype):
    import copy

    _, torch_model = hf_checkpoint("qwen2")
    copy.deepcopy(torch_model).to(dtype).save_pretrained(tmp_path)
    model = fisherjax.load_pretrained(tmp_path)
    kernel = model.params["layers"]["self_attn"]["k_proj"]["kernel"]
    assert kernel.dtype == np.float32
    stored = torch_model.model.layers[1].self_attn.k_proj.weight.detach().to(dtype).to(torch.float32).numpy()
    np.testing.assert_array_equal(np.asarray(kernel[1]), stored.T)


def test_shards_in_a_subfolder_and_hub_cache_links_are_inside(hf_checkpoint, tmp_path):
    """Shards named by a relative path below the directory load; so does a Hugging Face hub
    snapshot, whose files are links into the hub's blobs/ folder."""
    source, torch_model = hf_checkpoint("llama")
    d = tmp_path / "sub"
    (d / "weights").mkdir(parents=True)
    shutil.copy(source / "config.json", d)
    shutil.copy(source / "model.safetensors", d / "weights" / "all.safetensors")
    from safetensors.numpy import load_file

    names = sorted(load_file(source / "model.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "weights/all.safetensors" for k in names}}))
    reference = fisherjax.load_pretrained(source)
    np.testing.assert_array_equal(fisherjax.load_pretrained(d).params["embed"]["embedding"], reference.params["embed"]["embedding"])

    hub = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = hub / "snapshots" / "0123abc", hub / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, blobs / f"sha-{name}")
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / f"sha-{name}")
    np.testing.assert_array_equal(fisherjax.load_pretrained(snapshot).params["embed"]["embedding"], reference.params["embed"]["embedding"])


def test_mistral_sliding_window_defaults_follow_transformers():
    """An absent sliding_window is transformers' default (4096); null means full attention."""
    import transformers as tf

    base = {"model_type": "mistral", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 16}
    for raw in (base, base | {"sliding_window": None}, base | {"sliding_window": 5}):
        reference = tf.MistralConfig(**{k: v for k, v in raw.items() if k != "model_type"}).sliding_window
        assert from_hf_dict(raw).sliding_windows == (reference or 0,)
