"""Exports in Hugging Face names, and the merged and pruned checkpoints transformers loads
(fisherjax.export; ``fisherjax export | merge | prune``).

References are independent of the export: the checkpoint transformers wrote (names, shapes and,
for an exported parameter tree, values), group sums formed from the exported diagonal in the
Hugging Face orientation, ``fisher_merge`` / ``apply_mask`` on the Fishers collected here, and the
logits of ``transformers.AutoModelForCausalLM`` loading what the command line wrote.
"""

from __future__ import annotations

import dataclasses
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
from refusals import assert_refused, run_cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fisherjax  # noqa: E402
from fisherjax.analysis.masks import apply_mask, structured_mask  # noqa: E402
from fisherjax.analysis.natural import fisher_merge  # noqa: E402
from fisherjax.data import batches, load_task  # noqa: E402
from fisherjax.export import export_fisher, read_export, standard_masks  # noqa: E402
from fisherjax.fisher.groups import group_sizes, groups_of_elementwise  # noqa: E402
from fisherjax.fisher.state import TaskFisher  # noqa: E402
from fisherjax.layout import flatten  # noqa: E402
from torch_reference import our_location, reference_groups, torch_per_sample_grads  # noqa: E402

BATCH = 8


def _gpt2(vocab: int, seed: int, n_embd: int = 32):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_layer=2, n_embd=n_embd, n_head=4, n_positions=64, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # biases and norms away from 0 / 1, so a wrong mapping shows in the logits
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def reference_fisher(torch_model, chosen) -> tuple[dict[str, np.ndarray], int, int]:
    """``({hf_name: Î}, n, tokens)``: ``Î = (1/n) Σ_i g_i² / T_i`` from torch.func per-sample gradients."""
    sums, n, tokens = {}, 0, 0
    for batch in chosen:
        real = batch.sample_ids >= 0
        ids, labels = batch.input_ids[real], batch.labels[real]
        counts = (labels[:, 1:] != -100).sum(1).astype(np.float64)
        for name, g in torch_per_sample_grads(torch_model, ids, labels).items():
            sums[name] = sums.get(name, 0.0) + np.einsum("i...,i->...", g**2, 1.0 / counts)
        n, tokens = n + int(real.sum()), tokens + int(counts.sum())
    return {name: s / n for name, s in sums.items()}, n, tokens


def to_ours(kind: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF-named tensors as fisherjax's flat tree (Flax orientation, layers stacked), by torch_reference's own table."""
    out, layered = {}, {}
    for name, value in tensors.items():
        path, layer, transposed = our_location(kind, name)
        value = value.T if transposed else value
        if layer is None:
            out[path] = value
        else:
            layered.setdefault(path, {})[layer] = value
    out.update({p: np.stack([v[i] for i in sorted(v)]) for p, v in layered.items()})
    return out


def task_fisher(name: str, model, kind: str, diagonal_hf: dict[str, np.ndarray], n: int, tokens: int) -> TaskFisher:
    """A TaskFisher holding a reference diagonal and its group sums."""
    diagonal = {p: v.astype(np.float32) for p, v in to_ours(kind, diagonal_hf).items()}
    groups = {p: {g: np.asarray(v, np.float32) for g, v in groups_of_elementwise(model.layout, p, d.astype(np.float64)).items()}
              for p, d in diagonal.items()}
    sizes = {p: group_sizes(model.layout, p) for p in diagonal}
    return TaskFisher(name, groups, sizes, n, n_tokens=tokens, diagonal=diagonal)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A GPT-2 base with the demo's character tokenizer, two "finetuned" copies (perturbed), two task
    files of 6 lines; each task's reference diagonal Fisher on the base and on its finetuned model."""
    from fisherjax.demo.tokenizer import build_tokenizer, vocabulary

    root = tmp_path_factory.mktemp("export")
    vocab = len(vocabulary())
    base = _gpt2(vocab, 0)
    base.save_pretrained(root / "base")
    build_tokenizer().save_pretrained(root / "base")
    tuned_torch = {}
    for k, name in enumerate("ab"):
        tuned_torch[name] = _gpt2(vocab, 0)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(10 + k)
            for p in tuned_torch[name].parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        tuned_torch[name].save_pretrained(root / f"ft_{name}")
    rng = np.random.default_rng(0)
    for name, letters in (("a", "abcd"), ("b", "efgh")):
        lines = ["".join(rng.choice(list(letters), size=rng.integers(4, 10))) for _ in range(6)]
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")

    model = fisherjax.load_pretrained(root / "base")
    chosen = {n: list(batches(load_task(root / f"{n}.txt", model.tokenizer, name=n), BATCH, vocab_size=model.config.vocab_size))
              for n in "ab"}
    on_base = {n: reference_fisher(base, chosen[n]) for n in "ab"}
    return SimpleNamespace(
        root=root, model=model, torch_base=base,
        tuned={n: fisherjax.load_pretrained(root / f"ft_{n}", load_tokenizer=False) for n in "ab"},
        on_tuned={n: reference_fisher(tuned_torch[n], chosen[n])[0] for n in "ab"},
        on_base={n: d for n, (d, _, _) in on_base.items()},
        fishers={n: task_fisher(n, model, "gpt2", *on_base[n]) for n in "ab"},
    )


def _torch_logits(directory, ids: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


def _ids(vocab: int) -> np.ndarray:
    return np.random.default_rng(1).integers(3, vocab, size=(2, 12))


def _close(actual, expected, rtol=1e-5, atol=1e-7):
    actual, expected = flatten(actual), flatten(expected)
    assert sorted(actual) == sorted(expected)
    for path in expected:
        np.testing.assert_allclose(np.asarray(actual[path]), np.asarray(expected[path]), rtol=rtol, atol=atol, err_msg=path)


def _base_cli(tiny, command: str, out, *extra) -> list[str]:
    return [command, "--model", str(tiny.root / "base"), "--task", f"a={tiny.root / 'a.txt'}", "--task", f"b={tiny.root / 'b.txt'}",
            "--out", str(out), "--no-progress", "--batch-size", str(BATCH), *extra]


# ---- export -------------------------------------------------------------------------------------


def _check_export(back, fisher: TaskFisher, reference: dict[str, np.ndarray], checkpoint: dict[str, np.ndarray], kind: str, cfg):
    """The export read back: the checkpoint's names and shapes; per layer the TaskFisher's diagonal and
    groups; the groups equal to the reference group sums of the reference diagonal (HF index arithmetic)."""
    assert sorted(back.diagonal) == sorted(checkpoint) == sorted(reference)
    assert all(back.diagonal[n].shape == t.shape for n, t in checkpoint.items())
    for name, value in back.diagonal.items():
        path, layer, transposed = our_location(kind, name)
        ours = fisher.diagonal[path] if layer is None else fisher.diagonal[path][layer]
        np.testing.assert_array_equal(value, ours.T if transposed else ours, err_msg=name)
        np.testing.assert_allclose(value, reference[name], rtol=1e-6, err_msg=name)
        expected = reference_groups(kind, name, reference[name], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        assert sorted(back.group_fisher[name]) == sorted(expected), name
        for group_type, values in expected.items():
            ours = fisher.group_fisher[path][group_type]
            np.testing.assert_array_equal(back.group_fisher[name][group_type], ours if layer is None else ours[layer])
            np.testing.assert_allclose(back.group_fisher[name][group_type], values, rtol=1e-5, err_msg=f"{name}|{group_type}")
    assert len(back.group_fisher) == len(checkpoint)


def test_export_round_trips_in_the_checkpoints_own_names(tiny, tmp_path):
    from safetensors.numpy import load_file

    model, fisher = tiny.model, tiny.fishers["a"]
    masks = standard_masks(fisher, model.layout, ["head", "parameter"], [0.5])
    back = read_export(export_fisher(model, fisher, tmp_path, masks=masks))
    checkpoint = load_file(tiny.root / "base" / "model.safetensors")
    _check_export(back, fisher, tiny.on_base["a"], checkpoint, "gpt2", model.config)
    state = tiny.torch_base.state_dict()  # what a torch script looks the names up in
    assert all(tuple(state[n].shape) == v.shape for n, v in back.diagonal.items())
    # an exported parameter tree reads back as the checkpoint transformers wrote, value for value
    weights = dataclasses.replace(fisher, task="weights", diagonal=flatten(model.params))
    as_exported = read_export(export_fisher(model, weights, tmp_path)).diagonal
    for name, tensor in checkpoint.items():
        np.testing.assert_array_equal(as_exported[name], tensor, err_msg=name)
    assert back.group_sizes["transformer.h.1.attn.c_attn.weight"]["head_q"].tolist() == [32 * 8] * 4

    assert back.metadata["task"] == "a" and back.metadata["fisher_type"] == "empirical"
    assert back.metadata["n_samples"] == "6" and back.metadata["n_tokens"] == str(fisher.n_tokens) != "0"
    assert back.metadata["fisherjax"] == fisherjax.__version__ and "g_i^2 / T_i" in back.metadata["normaliser"]

    # masks: 1 = keep, per parameter, only where something is pruned
    head_keep = masks["head@0.5"].keep["head"]
    assert back.mask_info["head@0.5"]["unit"] == "head" and back.mask_info["head@0.5"]["sparsity"] == 0.5
    for layer in range(2):
        name = f"transformer.h.{layer}"
        q = back.masks["head@0.5"].get(f"{name}.attn.c_attn.weight", np.ones((32, 96), bool)).reshape(32, 3, 4, 8)[:, 0]
        o = back.masks["head@0.5"].get(f"{name}.attn.c_proj.weight", np.ones((32, 32), bool)).reshape(4, 8, 32)
        for h in range(4):
            assert np.all(q[:, h] == head_keep[layer, h]) and np.all(o[h] == head_keep[layer, h])
    pruned = sum(int((~m).sum()) for m in back.masks["parameter@0.5"].values())
    assert pruned == sum(int((~np.asarray(m)).sum()) for m in flatten(masks["parameter@0.5"].tree).values()) > 0
    assert all(not m.all() for m in back.masks["parameter@0.5"].values())


def test_export_command_reads_an_analyze_output(tiny, tmp_path):
    """``fisherjax export --from RUN`` on a directory laid out as analyze writes it (fisher_state/ and
    the marker naming the model); the slow test below runs analyze itself."""
    from fisherjax import io, outdir

    run = tmp_path / "run"
    for name in "ab":
        io.save_task_fisher(tiny.fishers[name], run / "fisher_state" / name)
    outdir.write_marker(run, {"fisherjax": fisherjax.__version__, "config": {"model": str(tiny.root / "base"), "sparsities": [0.5]}})
    code, _, err = run_cli(["export", "--from", run, "--to", tmp_path / "exported", "--unit", "head", "--unit", "parameter"])
    assert code == 0, err
    for name in "ab":
        back = read_export(tmp_path / "exported" / name)
        for hf_name, value in back.diagonal.items():
            np.testing.assert_allclose(value, tiny.on_base[name][hf_name], rtol=1e-6, err_msg=hf_name)
        assert sorted(back.mask_info) == ["head@0.5", "parameter@0.5"] and back.metadata["task"] == name
    # a second export replaces the first (the marker says fisherjax wrote it)
    assert run_cli(["export", "--from", run, "--to", tmp_path / "exported", "--unit", "neuron", "--sparsity", "0.25"])[0] == 0
    assert sorted(read_export(tmp_path / "exported" / "a").mask_info) == ["neuron@0.25"]
    # a run without the per-parameter diagonal (analyze --no-diagonal) has no parameter masks: refused, naming both options
    for name in "ab":
        io.save_task_fisher(dataclasses.replace(tiny.fishers[name], diagonal=None, diagonal_variance=None), run / "no_diag" / "fisher_state" / name)
    outdir.write_marker(run / "no_diag", {"fisherjax": fisherjax.__version__, "config": {"model": str(tiny.root / "base")}})
    code, _, err = run_cli(["export", "--from", run / "no_diag", "--to", tmp_path / "nd", "--unit", "parameter"])
    assert code == 2 and re.search(r"--unit parameter needs the per-parameter diagonal .* task\(s\) a, b \(analyzed with --no-diagonal\)", err), err
    assert not (tmp_path / "nd").exists()


# ---- merge and prune ----------------------------------------------------------------------------


def test_merge_writes_a_checkpoint_transformers_loads(tiny, tmp_path):
    out = tmp_path / "merged"
    code, _, err = run_cli(_base_cli(tiny, "merge", out, "--finetuned", f"a={tiny.root / 'ft_a'}", "--finetuned",
                                     f"b={tiny.root / 'ft_b'}"))
    assert code == 0, err
    tuned = [tiny.tuned[n].params for n in "ab"]
    expected = fisher_merge(tuned, [to_ours("gpt2", tiny.on_tuned[n]) for n in "ab"], layout=tiny.model.layout)
    written = fisherjax.load_pretrained(out).params
    _close(written, expected, rtol=1e-4, atol=1e-6)  # a float32 Fisher against a float64 reference
    plain = flatten(tuned[0])  # the Fisher weights matter: not model a, not the plain average
    average = {p: (np.asarray(v) + np.asarray(flatten(tuned[1])[p])) / 2 for p, v in plain.items()}
    assert any(not np.allclose(flatten(expected)[p], average[p], atol=1e-4) for p in plain)
    ids = _ids(tiny.model.config.vocab_size)
    np.testing.assert_allclose(_torch_logits(out, ids), np.asarray(tiny.model.apply(expected, ids)), atol=1e-4, rtol=0)


def _mean_of_tasks(tiny) -> TaskFisher:
    """The reference Fisher of both tasks on the base, each task weighted equally."""
    fa, fb = (tiny.on_base[n] for n in "ab")
    return task_fisher("a+b", tiny.model, "gpt2", {name: (fa[name] + fb[name]) / 2 for name in fa}, 12, 1)


def test_prune_heads_writes_a_checkpoint_transformers_loads(tiny, tmp_path):
    out = tmp_path / "pruned"
    code, stdout, err = run_cli(_base_cli(tiny, "prune", out, "--sparsity", "0.625", "--unit", "head"))
    assert code == 0, err
    model = tiny.model
    mask = structured_mask(_mean_of_tasks(tiny), model.layout, 0.625, unit="head")
    alone = structured_mask(tiny.fishers["a"], model.layout, 0.625, unit="head")
    assert (alone.keep["head"] != mask.keep["head"]).any()  # so task b's Fisher must have counted
    expected = apply_mask(model.params, mask)
    _close(fisherjax.load_pretrained(out).params, expected)
    keep = mask.keep["head"]
    assert keep.sum() == 3 and "pruned 5 of 8 head units" in stdout
    state = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    for layer, h in zip(*np.nonzero(~keep)):  # Conv1D [in, Q|K|V]; without GQA a head's K and V go with its Q
        qkv = state[f"transformer.h.{layer}.attn.c_attn.weight"].numpy().reshape(32, 3, 4, 8)[:, :, h]
        o = state[f"transformer.h.{layer}.attn.c_proj.weight"].numpy()[h * 8:(h + 1) * 8]
        assert not qkv.any() and not o.any()
    for layer in range(2):
        assert state[f"transformer.h.{layer}.attn.c_attn.weight"].numpy().any(axis=0).sum() == 96 - 24 * int((~keep[layer]).sum())
    ids = _ids(model.config.vocab_size)
    np.testing.assert_allclose(_torch_logits(out, ids), np.asarray(model.apply(expected, ids)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("unit", ["neuron", "parameter"])
def test_prune_checkpoint_ranks_by_the_mean_of_the_tasks(tiny, tmp_path, unit):
    from fisherjax.analysis.masks import unstructured_mask

    model, fishers = tiny.model, [tiny.fishers[n] for n in "ab"]
    pruned, mask = fisherjax.prune_checkpoint(model, fishers, tmp_path / unit, sparsity=0.5, unit=unit)

    def made(fisher):
        return unstructured_mask(fisher, model.layout, 0.5) if unit == "parameter" else structured_mask(fisher, model.layout, 0.5, unit=unit)

    expected = made(_mean_of_tasks(tiny))
    for alone in fishers:  # the mean is neither task's ranking
        assert any((~np.equal(k, expected.keep[p])).any() for p, k in made(alone).keep.items())
    for path, keep in expected.keep.items():
        np.testing.assert_array_equal(mask.keep[path], keep)
    _close(pruned, apply_mask(model.params, expected), rtol=0, atol=0)
    _close(fisherjax.load_pretrained(tmp_path / unit).params, pruned, rtol=0, atol=0)


# ---- refusals -----------------------------------------------------------------------------------


def test_refusals(tiny, tmp_path):
    root, out = tiny.root, tmp_path / "out"
    finetuned = ["--finetuned", f"a={root / 'ft_a'}", "--finetuned", f"b={root / 'ft_b'}"]
    other = tmp_path / "other"
    _gpt2(45, 0, n_embd=16).save_pretrained(other)
    assert_refused(_base_cli(tiny, "merge", out, "--finetuned", f"a={root / 'ft_a'}", "--finetuned", f"b={other}"),
                   parent=tmp_path, names=r"other \(--finetuned b\): not the base model's architecture: hidden_size 16")
    assert_refused(_base_cli(tiny, "merge", out, *finetuned, "--finetuned", f"c={root / 'ft_b'}"), parent=tmp_path,
                   names=r"--finetuned c has no --task c=FILE")
    assert_refused(_base_cli(tiny, "merge", out, "--finetuned", f"a={root / 'ft_a'}"), parent=tmp_path,
                   names=r"--task b has no --finetuned b=DIR")
    assert_refused(_base_cli(tiny, "merge", out, *finetuned, "--finetuned", f"a={root / 'ft_b'}"), parent=tmp_path,
                   names=r"repeated: a")
    assert_refused(_base_cli(tiny, "merge", root / "ft_a", *finetuned), parent=tmp_path, names=r"--out is or contains --finetuned a")
    # prompts that fill --max-length leave nothing to predict: refused before any compute, as analyze refuses it
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"prompt": "abcdefgh", "completion": "ab"}) + "\n" for _ in range(4)))
    assert_refused(["prune", "--model", str(root / "base"), "--task", f"a={tmp_path / 'long.jsonl'}", "--out", str(out), "--no-progress",
                    "--sparsity", "0.5", "--max-length", "4", "--truncate"], parent=tmp_path,
                   names=r"long.jsonl: none of the 4 samples of task 'a' has a token to predict .*--max-length 4")
    for bad in ("1.5", "-0.1"):
        assert_refused(_base_cli(tiny, "prune", out, "--sparsity", bad), parent=tmp_path, names=r"sparsity must be in \[0, 1\] \(--sparsity\)")
    assert_refused(_base_cli(tiny, "prune", out, "--sparsity", "half"), parent=tmp_path, names=r"--sparsity: invalid float value")
    assert_refused(_base_cli(tiny, "prune", out, "--sparsity", "0.5", "--unit", "layer"), parent=tmp_path, names=r"--unit")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert_refused(_base_cli(tiny, "prune", tmp_path / "mine", "--sparsity", "0.5"), parent=tmp_path,
                   names=r"mine: --out is a non-empty directory that fisherjax did not write")
    assert_refused(["export", "--from", root, "--to", out], parent=tmp_path, names=r"--from has no fisher_state/")
    assert not out.exists()


# ---- slow: a Llama (GQA, [out, in] weights) end to end, and export after a real analyze run -------


@pytest.mark.slow
def test_llama_export_names_and_head_pruning(cli_checkpoint, tmp_path):
    """GQA and Linear [out, in] weights: export names, orientation and groups; head pruning removes a kv head
    only with every query head reading it."""
    from safetensors.numpy import load_file

    directory = cli_checkpoint / "model"
    model = fisherjax.load_pretrained(directory)
    cfg = model.config
    heads, kv, hd, hidden = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    task = load_task(cli_checkpoint / "words.txt", model.tokenizer, name="words")
    reference = reference_fisher(torch_model, list(batches(task, BATCH, vocab_size=cfg.vocab_size)))
    fisher = task_fisher("words", model, "llama", *reference)
    back = read_export(export_fisher(model, fisher, tmp_path / "export"))
    _check_export(back, fisher, reference[0], load_file(directory / "model.safetensors"), "llama", cfg)
    assert back.group_fisher["model.layers.0.self_attn.k_proj.weight"]["head"].shape == (kv,)

    out = tmp_path / "pruned"
    code, _, err = run_cli(["prune", "--model", directory, "--task", f"words={cli_checkpoint / 'words.txt'}", "--sparsity", "0.75",
                            "--unit", "head", "--out", out, "--no-progress", "--batch-size", str(BATCH)])
    assert code == 0, err
    mask = structured_mask(fisher, model.layout, 0.75, unit="head")
    expected = apply_mask(model.params, mask)
    _close(fisherjax.load_pretrained(out).params, expected)
    keep = mask.keep["head"]
    state = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    for layer in range(cfg.num_layers):
        q = state[f"model.layers.{layer}.self_attn.q_proj.weight"].numpy().reshape(heads, hd, hidden)
        k = state[f"model.layers.{layer}.self_attn.k_proj.weight"].numpy().reshape(kv, hd, hidden)
        o = state[f"model.layers.{layer}.self_attn.o_proj.weight"].numpy().reshape(hidden, heads, hd)
        for h in range(heads):
            assert q[h].any() == o[:, h].any() == keep[layer, h]
        for j in range(kv):  # a kv head goes only with every query head that reads it
            assert k[j].any() == keep[layer, j * (heads // kv):(j + 1) * (heads // kv)].any()
    assert (~keep).sum() == 6
    ids = _ids(cfg.vocab_size)
    np.testing.assert_allclose(_torch_logits(out, ids), np.asarray(model.apply(expected, ids)), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_export_after_analyze(tiny, tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli(["analyze", "--model", tiny.root / "base", "--task", f"a={tiny.root / 'a.txt'}", "--out", run,
                            "--phases", "fisher", "--no-progress", "--batch-size", str(BATCH), "--sparsity", "0.5"])
    assert code == 0, err
    code, _, err = run_cli(["export", "--from", run, "--to", tmp_path / "exported"])
    assert code == 0, err
    back = read_export(tmp_path / "exported" / "a")
    units = json.loads((run / "results.json").read_text())["config"].get("mask_units") or ["head"]
    assert sorted(back.mask_info) == sorted(f"{u}@0.5" for u in units)  # by default the run's masks
    for name, value in back.diagonal.items():
        np.testing.assert_allclose(value, tiny.on_base["a"][name], rtol=1e-4, atol=1e-12, err_msg=name)
    assert json.loads((tmp_path / "exported" / "fisherjax-output.json").read_text())["command"] == "export"
