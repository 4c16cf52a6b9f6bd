"""Bad checkpoints, configs, shard indexes, pickles, tokenizers and saved Fisher states: each is
refused with exit code 2 and one line that names the file and the problem, nothing changes next to
--out (or inside the checkpoint), and no payload in a pickle ever runs.

Each case copies a good tiny checkpoint, breaks one thing, and runs ``fisherjax info`` or
``fisherjax analyze`` on it (loading fails before any collection, so a case takes well under a
second).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shlex
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from refusals import assert_refused, run_cli

torch = pytest.importorskip("torch")

import fisherjax  # noqa: E402
from fisherjax import CheckpointError, ConfigError  # noqa: E402
from fisherjax.config import from_hf_dict  # noqa: E402

DROP = object()
"""A config value meaning "remove this key"."""


# ---- how to break a checkpoint -----------------------------------------------------------------


def edit_config(**changes) -> Callable[[Path], None]:
    """Set (or, with DROP, remove) top-level keys of config.json."""

    def mutate(d: Path):
        cfg = json.loads((d / "config.json").read_text())
        for key, value in changes.items():
            if value is DROP:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))

    return mutate


def write(name: str, data: bytes | str) -> Callable[[Path], None]:
    def mutate(d: Path):
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())

    return mutate


def remove(*names: str) -> Callable[[Path], None]:
    def mutate(d: Path):
        for name in names:
            (d / name).unlink()

    return mutate


def tensors(d: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(d / "model.safetensors")


def save(d: Path, values: dict[str, np.ndarray], name: str = "model.safetensors") -> None:
    from safetensors.numpy import save_file

    save_file(values, str(d / name))


def retype(name: str, dtype) -> Callable[[Path], None]:
    """Store one tensor with another numpy dtype (a real integer or boolean tensor)."""

    def mutate(d: Path):
        values = tensors(d)
        values[name] = values[name].astype(dtype)
        save(d, values)

    return mutate


def header_dtype(name: str, dtype: str) -> Callable[[Path], None]:
    """Rewrite the safetensors header so it declares ``dtype`` for ``name``, bytes unchanged (F32
    and I32 have the same size, so the file stays valid and only the meaning changes)."""

    def mutate(d: Path):
        file = d / "model.safetensors"
        data = file.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        header[name]["dtype"] = dtype
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= n
        file.write_bytes(data[:8] + text.ljust(n) + data[8 + n :])

    return mutate


def float8(name: str) -> Callable[[Path], None]:
    def mutate(d: Path):
        from safetensors.torch import load_file, save_file

        values = load_file(d / "model.safetensors")
        values[name] = values[name].to(torch.float8_e4m3fn)
        save_file(values, str(d / "model.safetensors"))

    return mutate


def poison(name: str) -> Callable[[Path], None]:
    def mutate(d: Path):
        values = tensors(d)
        values[name][0] = np.nan
        save(d, values)

    return mutate


def truncate(d: Path):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def elsewhere(d: Path) -> Path:
    """A folder beside the checkpoint (outside it), holding a copy of its weights."""
    out = d.parent / "elsewhere"
    out.mkdir(exist_ok=True)
    shutil.copy(d / "model.safetensors", out / "model.safetensors")
    return out


def weights_linked_outside(d: Path):
    other = elsewhere(d)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to(other / "model.safetensors")


def split_twice(d: Path):
    """Two loose *.safetensors files (no index) that both hold model.norm.weight."""
    values = tensors(d)
    (d / "model.safetensors").unlink()
    names = sorted(values)
    save(d, {k: values[k] for k in names[: len(names) // 2]} | {"model.norm.weight": values["model.norm.weight"]}, "a.safetensors")
    save(d, {k: values[k] for k in names[len(names) // 2 :]}, "b.safetensors")


def index(shard_of: Callable[[Path], str] | None = None, *, raw=None) -> Callable[[Path], None]:
    """Replace model.safetensors by a sharded index; ``shard_of(d)`` names the one shard, or ``raw``
    is the whole index document."""

    def mutate(d: Path):
        names = sorted(tensors(d))
        if raw is not None:
            document = raw
        else:
            shard = shard_of(d)
            if shard != "model.safetensors":
                (d / "model.safetensors").unlink(missing_ok=True)
            document = {"metadata": {}, "weight_map": {k: shard for k in names}}
        text = document if isinstance(document, str) else json.dumps(document)
        (d / "model.safetensors.index.json").write_text(text)

    return mutate


def shard_link_outside(d: Path) -> str:
    other = elsewhere(d)
    (d / "model.safetensors").unlink()
    (d / "model-00001-of-00001.safetensors").symlink_to(other / "model.safetensors")
    return "model-00001-of-00001.safetensors"


def pickled(obj_of: Callable[[Path], object] | None = None, *, data: bytes | None = None, truncated: bool = False):
    """Replace the weights by a pytorch_model.bin holding ``obj_of(d)`` (torch.save) or ``data``."""

    def mutate(d: Path):
        obj = obj_of(d) if obj_of else state_dict(d)
        (d / "model.safetensors").unlink()
        target = d / "pytorch_model.bin"
        if data is not None:
            target.write_bytes(data)
            return
        torch.save(obj, target)
        if truncated:
            target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])

    return mutate


def state_dict(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(d / "model.safetensors")


class Payload:
    """A pickle payload that would create ``marker`` when unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


MARKER = "PAYLOAD-RAN"


def malicious(d: Path):
    """A state dict with one honest tensor and a payload that would run a shell command."""
    return {"model.norm.weight": state_dict(d)["model.norm.weight"], "evil": Payload(d.parent / MARKER)}


def malicious_plain_pickle(d: Path):
    """The same payload as a bare pickle (not torch's zip format), protocol 2."""
    (d / "model.safetensors").unlink()
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"evil": Payload(d.parent / MARKER)}, f, protocol=2)


def bigger_tokenizer(d: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    size = json.loads((d / "config.json").read_text())["vocab_size"] + 20
    vocab = {"<pad>": 0, **{f"w{i}": i + 1 for i in range(size - 1)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>").save_pretrained(d)


# ---- the corpus --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: the checkpoint it starts from ("cli": the Llama with a tokenizer, else a
    family), how it is broken, the regex the error line must match, and the command that meets it."""

    base: str
    mutate: Callable[[Path], None]
    names: str
    command: str = "info"
    allow_pickle: bool = False


LLAMA3_NO_FREQS = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}

CASES = {
    # config.json: the file itself
    "config-missing": Case("cli", remove("config.json"), r"config\.json: no config\.json found"),
    "config-not-utf8": Case("cli", write("config.json", b'\xff\xfe{"model_type": "llama"}'), r"config\.json: not UTF-8 text \(byte 0xff"),
    "config-not-json": Case("cli", write("config.json", '{"model_type": "llama",'), r"config\.json: not valid JSON", "analyze"),
    "config-a-list": Case("cli", write("config.json", "[1, 2]"), r"config\.json: not a JSON object \(it holds a list\)"),
    "config-a-number": Case("cli", write("config.json", "3"), r"config\.json: not a JSON object \(it holds a number\)"),
    "config-unknown-architecture": Case("gpt2", edit_config(model_type="mamba"), r"config\.json: unknown architecture model_type='mamba'"),
    "config-no-model-type": Case("cli", edit_config(model_type=DROP), r"config\.json: unknown architecture model_type=None"),
    # config.json: types
    "config-size-as-string": Case("cli", edit_config(hidden_size="32"), r'config\.json: hidden_size must be a positive integer, got "32"; fix the file', "analyze"),
    "config-count-as-float": Case("cli", edit_config(num_hidden_layers=2.0), r"config\.json: num_hidden_layers must be a positive integer, got 2\.0"),
    "config-count-as-bool": Case("cli", edit_config(num_attention_heads=True), r"config\.json: num_attention_heads must be a positive integer, got true"),
    "config-flag-as-string": Case("cli", edit_config(tie_word_embeddings="yes"), r'config\.json: tie_word_embeddings must be true or false, got "yes"'),
    "config-eps-nan": Case("cli", edit_config(rms_norm_eps=float("nan")), r"config\.json: rms_norm_eps must be a finite number > 0, got NaN"),
    "config-pad-id-as-string": Case("cli", edit_config(pad_token_id="0"), r'config\.json: pad_token_id must be an integer, a list of integers or null, got "0"'),
    "config-required-null": Case("cli", edit_config(intermediate_size=None), r"config\.json: intermediate_size must be set, got null"),
    "config-required-missing": Case("gpt_neox", edit_config(vocab_size=DROP), r"config\.json: vocab_size is missing"),
    # config.json: ranges
    "config-zero-layers": Case("cli", edit_config(num_hidden_layers=0), r"config\.json: num_hidden_layers must be a positive integer, got 0", "analyze"),
    "config-negative-heads-gpt2": Case("gpt2", edit_config(n_head=-4), r"config\.json: n_head must be a positive integer, got -4"),
    "config-zero-vocab": Case("qwen2", edit_config(vocab_size=0), r"config\.json: vocab_size must be a positive integer, got 0"),
    "config-negative-intermediate": Case("mistral", edit_config(intermediate_size=-48), r"config\.json: intermediate_size must be a positive integer, got -48"),
    "config-zero-max-positions": Case("gpt2", edit_config(n_positions=0), r"config\.json: n_positions must be a positive integer, got 0"),
    "config-zero-head-dim": Case("llama", edit_config(head_dim=0), r"config\.json: head_dim must be a positive integer, got 0"),
    "config-huge-layer-count": Case("cli", edit_config(num_hidden_layers=10**9), r"config\.json: num_hidden_layers must be a positive integer ≤ 65536, got 1000000000"),
    "config-negative-sliding-window": Case("mistral", edit_config(sliding_window=-1), r"config\.json: sliding_window must be an integer ≥ 0, got -1"),
    "config-sliding-window-as-string": Case("qwen2", edit_config(use_sliding_window=True, sliding_window="4096"), r'config\.json: sliding_window must be an integer ≥ 0, got "4096"'),
    "config-layer-types-too-short": Case("qwen2", edit_config(layer_types=["full_attention"]), r"config\.json: layer_types must be a list of 2 entries"),
    "config-three-problems": Case(
        "cli",
        edit_config(num_attention_heads="4", intermediate_size=-1, rms_norm_eps=0),
        r'config\.json: 3 problems: num_attention_heads must be a positive integer, got "4"; intermediate_size must be a '
        r"positive integer, got -1; rms_norm_eps must be a finite number > 0, got 0; fix the file$",
    ),
    # config.json: how fields fit together
    "config-kv-heads-not-dividing": Case("cli", edit_config(num_key_value_heads=3), r"config\.json: num_attention_heads=4 is not a multiple of num_key_value_heads=3", "analyze"),
    "config-n-head-not-dividing": Case("gpt2", edit_config(n_head=5), r"config\.json: n_embd=32 is not a multiple of n_head=5"),
    "config-neox-heads-not-dividing": Case("gpt_neox", edit_config(num_attention_heads=5), r"config\.json: hidden_size=32 is not a multiple of num_attention_heads=5"),
    "config-unknown-hidden-act": Case("cli", edit_config(hidden_act="tanhx"), r'config\.json: hidden_act "tanhx" is not supported \(supported: gelu, .*silu'),
    "config-unknown-gpt2-activation": Case("gpt2", edit_config(activation_function="swiglu"), r'config\.json: activation_function "swiglu" is not supported'),
    "config-cross-attention": Case("gpt2", edit_config(add_cross_attention=True), r"config\.json: add_cross_attention=true: GPT-2 with cross-attention"),
    # config.json: rope
    "rope-linear-without-factor": Case(
        "cli", edit_config(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0}),
        r"config\.json: rope_parameters\.factor is missing; fix the file$", "analyze",
    ),
    "rope-old-style-linear-without-factor": Case(
        "cli", edit_config(rope_parameters=DROP, rope_theta=10000.0, rope_scaling={"type": "linear"}),
        r"config\.json: rope_scaling\.factor is missing",
    ),
    "rope-llama3-without-frequency-factors": Case(
        "llama", edit_config(rope_parameters=LLAMA3_NO_FREQS),
        r"config\.json: 2 problems: rope_parameters\.low_freq_factor is missing; rope_parameters\.high_freq_factor is missing",
    ),
    "rope-llama3-frequency-factors-reversed": Case(
        "llama", edit_config(rope_parameters=LLAMA3_NO_FREQS | {"low_freq_factor": 4.0, "high_freq_factor": 1.0}),
        r"config\.json: rope_parameters\.high_freq_factor=1 must be greater than low_freq_factor=4",
    ),
    "rope-yarn-without-factor": Case("qwen2", edit_config(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0}), r"config\.json: rope_parameters\.factor is missing"),
    "rope-unsupported-type": Case(
        "cli", edit_config(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
        r'config\.json: rope_parameters\.rope_type "dynamic" is not supported \(supported: default, linear, llama3, yarn\)',
    ),
    "rope-theta-as-string": Case("mistral", edit_config(rope_parameters={"rope_type": "default", "rope_theta": "10000"}), r'config\.json: rope_parameters\.rope_theta must be a finite number > 1, got "10000"'),
    "rope-not-an-object": Case("cli", edit_config(rope_parameters=[10000.0]), r"config\.json: rope_parameters must be an object or null, got \[10000\.0\]"),
    "rope-neox-rotary-pct-zero": Case("gpt_neox", edit_config(rope_parameters=DROP, rotary_pct=0), r"config\.json: rotary_pct must be a finite number in \(0, 1\], got 0"),
    "rope-odd-rotary-dim": Case(
        "gpt_neox", edit_config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.375}),
        r"config\.json: rotary dimension int\(head_dim × partial_rotary_factor\) = int\(8 × 0\.375\) = 3 must be a positive even number",
    ),
    # weights: the config and the tensors disagree
    "weights-fewer-layers-than-config": Case(
        "cli", edit_config(num_hidden_layers=3),
        r"model: checkpoint and config\.json disagree \(10 problems\): config\.json asks for 3 layers, the checkpoint holds 2; "
        r"missing tensor model\.layers\.2\.\S+ .* and 5 more; check that config\.json belongs to these weights$",
        "analyze",
    ),
    "weights-wrong-intermediate-size": Case(
        "cli", edit_config(intermediate_size=40),
        r"model: checkpoint and config\.json disagree \(6 problems\): tensor model\.layers\.0\.mlp\.\w+\.weight has shape .* and 1 more;",
    ),
    "weights-truncated": Case("cli", truncate, r"model\.safetensors: cannot read safetensors file"),
    "weights-missing": Case("cli", remove("model.safetensors"), r"model: no model\.safetensors, sharded index or \*\.safetensors file found", "analyze"),
    "weights-nan": Case("qwen2", poison("model.norm.weight"), r": NaN or inf in parameters: final_norm/scale"),
    "weights-linked-outside": Case("cli", weights_linked_outside, r"model\.safetensors: links to \S+/elsewhere/model\.safetensors, outside the checkpoint directory", "analyze"),
    "weights-stored-twice": Case("cli", split_twice, r"model: tensor model\.norm\.weight is stored twice, in a\.safetensors and b\.safetensors"),
    # weights: non-floating dtypes for floating parameters
    "dtype-header-says-i32": Case(
        "cli", header_dtype("model.norm.weight", "I32"),
        r"model\.safetensors: parameters stored with a non-floating dtype: model\.norm\.weight is I32; parameters must be F16, BF16, F32, F64",
        "analyze",
    ),
    "dtype-int64-tensor": Case("gpt2", retype("transformer.wte.weight", np.int64), r"model\.safetensors: parameters stored with a non-floating dtype: transformer\.wte\.weight is I64"),
    "dtype-bool-tensor": Case("cli", retype("model.layers.1.input_layernorm.weight", np.bool_), r"model\.safetensors: .*model\.layers\.1\.input_layernorm\.weight is BOOL"),
    "dtype-uint8-tensor": Case("gpt_neox", retype("gpt_neox.final_layer_norm.bias", np.uint8), r"model\.safetensors: .*gpt_neox\.final_layer_norm\.bias is U8"),
    "dtype-float8-tensor": Case("cli", float8("model.norm.weight"), r"model\.safetensors: .*model\.norm\.weight is F8_E4M3"),
    # sharded index
    "index-shard-in-parent-folder": Case(
        "cli", index(lambda d: (elsewhere(d), "../elsewhere/model.safetensors")[1]),
        r"model\.safetensors\.index\.json: names shard\(s\) outside the checkpoint directory: \.\./elsewhere/model\.safetensors",
        "analyze",
    ),
    "index-shard-absolute-path": Case(
        "cli", index(lambda d: str(elsewhere(d) / "model.safetensors")),
        r"model\.safetensors\.index\.json: names shard\(s\) outside the checkpoint directory: /\S+/elsewhere/model\.safetensors",
    ),
    "index-shard-links-outside": Case(
        "cli", index(shard_link_outside),
        r"model\.safetensors\.index\.json: names shard\(s\) outside the checkpoint directory: model-00001-of-00001\.safetensors \(resolves to",
    ),
    "index-missing-shard": Case("cli", index(lambda d: "model-00002.safetensors"), r"model\.safetensors\.index\.json: names shard\(s\) that do not exist: model-00002\.safetensors"),
    "index-weight-map-a-list": Case("cli", index(raw={"weight_map": ["model.safetensors"]}), r"model\.safetensors\.index\.json: not a valid safetensors index \(weight_map=\["),
    "index-weight-map-values-not-strings": Case("cli", index(raw={"weight_map": {"model.norm.weight": 1}}), r"model\.safetensors\.index\.json: weight_map values must be shard file names, got 'model\.norm\.weight': 1"),
    "index-without-weight-map": Case("cli", index(raw={"metadata": {}}), r"model\.safetensors\.index\.json: not a valid safetensors index \(no weight_map\)"),
    "index-not-json": Case("cli", index(raw="{oops"), r"model\.safetensors\.index\.json: not a readable safetensors index"),
    # pickle-based weights
    "pickle-without-opt-in": Case("cli", pickled(), r"pytorch_model\.bin: pickle-based weights are refused .*--allow-pickle", "analyze"),
    "pickle-corrupt": Case("cli", pickled(data=b"garbage" * 100), r"pytorch_model\.bin: cannot be read as PyTorch weights \(Unsupported operand", allow_pickle=True),
    "pickle-empty": Case("cli", pickled(data=b""), r"pytorch_model\.bin: cannot be read as PyTorch weights \(empty or truncated file\)", allow_pickle=True),
    "pickle-truncated": Case("cli", pickled(truncated=True), r"pytorch_model\.bin: cannot be read as PyTorch weights \(.*\); the file is corrupt", "analyze", allow_pickle=True),
    "pickle-holds-a-list": Case("cli", pickled(lambda d: [torch.zeros(3)]), r"pytorch_model\.bin: holds a list, not a state dict of named tensors", allow_pickle=True),
    "pickle-nested-state-dict": Case(
        "cli", pickled(lambda d: {"model": state_dict(d)}),
        r"pytorch_model\.bin: not a flat state dict of named tensors: 'model' \(dict\)", allow_pickle=True,
    ),
    "pickle-integer-weights": Case(
        "cli", pickled(lambda d: state_dict(d) | {"model.norm.weight": torch.ones(32, dtype=torch.int32)}),
        r"pytorch_model\.bin: parameters stored with a non-floating dtype: model\.norm\.weight is I32", allow_pickle=True,
    ),
    "pickle-malicious": Case(
        "cli", pickled(malicious),
        r"pytorch_model\.bin: refused to unpickle: it asks to call \w+\.system, which plain weights never do", "analyze", allow_pickle=True,
    ),
    "pickle-malicious-plain-pickle": Case(
        "cli", malicious_plain_pickle, r"pytorch_model\.bin: (refused to unpickle|cannot be read as PyTorch weights)", allow_pickle=True,
    ),
    # tokenizer
    "tokenizer-not-json": Case("cli", write("tokenizer.json", "{oops"), r"model: tokenizer files present but transformers cannot load them"),
    "tokenizer-larger-than-vocabulary": Case("cli", bigger_tokenizer, r"model: tokenizer has \d+ tokens but the model's vocabulary has \d+", "analyze"),
    "tokenizer-missing-for-analyze": Case("cli", remove("tokenizer.json", "tokenizer_config.json"), r"model: the checkpoint has no tokenizer files", "analyze"),
}


@pytest.fixture
def breakable(cli_checkpoint, hf_checkpoint, tmp_path):
    """``breakable(base) -> Path``: a fresh copy of a good checkpoint under ``tmp_path/model``."""

    def copy(base: str) -> Path:
        source = cli_checkpoint / "model" if base == "cli" else hf_checkpoint(base)[0]
        return Path(shutil.copytree(source, tmp_path / "model"))

    return copy


@pytest.mark.parametrize("name", list(CASES))
def test_bad_checkpoint_is_refused_in_one_line(name, breakable, cli_checkpoint, tmp_path):
    case = CASES[name]
    d = breakable(case.base)
    case.mutate(d)
    pickle_flag = ["--allow-pickle"] if case.allow_pickle else []
    if case.command == "info":
        argv, parent = ["info", d, *pickle_flag], d  # loading writes nothing into the checkpoint either
    else:
        parent = tmp_path / "sub"
        parent.mkdir()
        argv = ["analyze", "--model", d, "--task", f"add={cli_checkpoint / 'add.jsonl'}", "--out", parent / "out",
                "--phases", "fisher", "--no-progress", *pickle_flag]
    line = assert_refused(argv, parent=parent, names=case.names)
    assert "Traceback" not in line and "weights_only` set to `False`" not in line
    assert not (tmp_path / MARKER).exists(), "the pickle's payload ran"


@pytest.mark.parametrize("base", ["cli", "gpt2", "llama", "mistral", "qwen2", "gpt_neox"])
def test_the_unbroken_checkpoints_load(base, breakable):
    """The control: every checkpoint the corpus starts from loads, so each refusal is its breakage's."""
    code, out, err = run_cli(["info", breakable(base), "--json"])
    assert code == 0 and json.loads(out)["layers"] == 2, err


def test_corpus_is_large_and_covers_every_category():
    assert len(CASES) >= 25
    prefixes = {name.split("-")[0] for name in CASES}
    assert {"config", "rope", "weights", "dtype", "index", "pickle", "tokenizer"} <= prefixes


# ---- the malicious pickle: its payload is live, and loading never runs it ----------------------


def test_malicious_pickle_payload_is_live_but_never_runs(breakable, tmp_path):
    d = breakable("cli")
    malicious_plain_pickle(d)
    # control: an ordinary unpickler does run the payload (into a different marker)
    control = tmp_path / "control"
    control.mkdir()
    assert pickle.loads(pickle.dumps(Payload(control / MARKER), protocol=2)) == 0 and (control / MARKER).exists()
    for load in (malicious_plain_pickle, pickled(malicious)):
        shutil.rmtree(d)
        d = breakable("cli")
        load(d)
        with pytest.raises(CheckpointError) as err:
            fisherjax.load_pretrained(d, allow_pickle=True)
        assert "\n" not in str(err.value) and str(d / "pytorch_model.bin") in str(err.value)
        assert not (tmp_path / MARKER).exists()


# ---- library level: the same refusals from Python, one line each ------------------------------


LLAMA = {
    "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
    "intermediate_size": 16, "max_position_embeddings": 32,
}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_size": "8"}, r'^cfg: hidden_size must be a positive integer, got "8"; fix the file$'),
        ({"num_hidden_layers": 0, "num_attention_heads": 2.0, "hidden_act": 3},
         r"^cfg: 3 problems: num_attention_heads .* got 2\.0; num_hidden_layers .* got 0; hidden_act 3 is not supported"),
        ({"num_key_value_heads": 0}, r"num_key_value_heads must be a positive integer, got 0; fix the file$"),
        ({"num_attention_heads": 0}, r"^cfg: num_attention_heads must be a positive integer, got 0; fix the file$"),
        ({"rope_scaling": {"rope_type": "linear"}}, r"^cfg: rope_scaling\.factor is missing"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "beta_fast": "32"}}, r'rope_parameters\.beta_fast must be a finite number > 0, got "32"'),
        ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, r"rope_parameters per layer type \(full_attention\) are not supported"),
        ({"rope_theta": 1.0}, r"rope_theta must be a finite number > 1, got 1\.0"),
        ({"eos_token_id": [2, "3"]}, r"eos_token_id must be an integer, a list of integers or null"),
    ],
)
def test_config_problems_are_listed_in_one_line(changes, message):
    with pytest.raises(ConfigError, match=message) as err:
        from_hf_dict(LLAMA | changes, source="cfg")
    assert "\n" not in str(err.value)


def test_a_zero_head_count_is_one_problem_not_two():
    """A cross-check between fields is skipped when one of them is already wrong."""
    with pytest.raises(ConfigError) as err:
        from_hf_dict(LLAMA | {"num_attention_heads": 0, "num_key_value_heads": 2}, source="cfg")
    assert str(err.value) == "cfg: num_attention_heads must be a positive integer, got 0; fix the file"


def test_out_of_range_token_ids_mean_none():
    """Old LLaMA configs write pad_token_id -1; such an id only picks the filler of padding."""
    config = from_hf_dict(LLAMA | {"pad_token_id": -1, "bos_token_id": 10, "eos_token_id": [2, 3]})
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (None, None, 2)


@pytest.mark.parametrize(
    "name",
    ["config-a-list", "config-three-problems", "rope-linear-without-factor", "dtype-header-says-i32",
     "index-shard-in-parent-folder", "index-weight-map-a-list", "pickle-corrupt", "pickle-holds-a-list",
     "weights-fewer-layers-than-config"],
)
def test_load_pretrained_raises_one_line_errors(name, breakable):
    case = CASES[name]
    d = breakable(case.base)
    case.mutate(d)
    kind = ConfigError if name.startswith(("config", "rope")) else CheckpointError
    with pytest.raises(kind) as err:
        fisherjax.load_pretrained(d, allow_pickle=case.allow_pickle)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(d))


# ---- saved Fisher states ------------------------------------------------------------------------


def _foreign_orbax(directory: Path):
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        ckpt.save(directory.absolute(), args=ocp.args.Composite(arrays=ocp.args.StandardSave({"x": np.zeros(3)}),
                                                               meta=ocp.args.JsonSave({"hello": 1})))


def _damaged_meta(directory: Path):
    from fisherjax import io
    from fisherjax.fisher.state import TaskFisher

    group = {"layers/mlp/down_proj/kernel": {"neuron": np.ones((2, 3), np.float32)}}
    io.save_task_fisher(TaskFisher(task="t", group_fisher=group, group_sizes=group, n_samples=1), directory)
    assert io.load_task_fisher(directory).task == "t"  # the undamaged state loads
    (directory / "meta" / "metadata").write_text("{oops")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: None, r"no saved Fisher state"),
        (lambda d: d.mkdir(), r"not a saved Fisher state \(no orbax 'arrays' and 'meta' items\); pass a directory written by save_task_fisher"),
        (lambda d: (d.mkdir(), (d / "notes.txt").write_text("hi"), (d / "arrays").write_text("x")), r"not a saved Fisher state"),
        (lambda d: d.write_text("a file"), r"not a saved Fisher state"),
        (lambda d: shutil.copytree(Path(fisherjax.__file__).parent / "demo" / "checkpoint", d), r"not a saved Fisher state"),
        (_foreign_orbax, r"not a usable saved Fisher state \(no group_fisher, group_sizes, task, n_samples\)"),
        (_damaged_meta, r"not a usable saved Fisher state \(orbax cannot restore it: JSONDecodeError"),
    ],
    ids=["missing", "empty", "random-files", "a-file", "a-model-checkpoint", "another-orbax-checkpoint", "damaged-metadata"],
)
def test_load_task_fisher_refuses_what_save_task_fisher_did_not_write(tmp_path, make, message):
    from fisherjax import io

    target = tmp_path / "state"
    make(target)
    with pytest.raises(CheckpointError, match=message) as err:
        io.load_task_fisher(target)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(target.absolute()))
