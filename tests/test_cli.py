"""The command line: outputs of ``analyze``, ``info``, and exit code 2 with one line for bad input."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fisherjax.cli import main

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_checkpoint(cli_checkpoint):
    return cli_checkpoint


def _analyze(root, out, *extra):
    return main(["analyze", "--model", str(root / "model"), "--task", f"add={root / 'add.jsonl'}",
                 "--task", f"words={root / 'words.txt'}", "--out", str(out), "--no-progress", "--batch-size", "8", *extra])


def test_analyze_writes_the_output_directory(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    # XLA reads its flags when the first backend starts (long before, in this process): the command
    # line adds its XLA:CPU flags to the user's before that, and records what the run used.
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    assert _analyze(tiny_checkpoint, out, "--phases", "fisher") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["layers"] == 2 and results["model"]["kv_heads"] == 2
    env = results["environment"]  # what the numbers were computed with
    assert env["xla_flags"] == "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
    assert {"fisherjax", "jax", "jaxlib", "flax", "transformers", "numpy"} <= set(env["versions"]) and env["backend"] == "cpu"
    assert env["devices"][0]["platform"] == "cpu" and (env["git"] is None or len(env["git"]["commit"]) == 40)
    assert results["fisher"]["add"]["samples"] == 12 and results["fisher"]["words"]["samples"] == 10
    assert list(results["phases"]) == ["load", "memory check", "collect", "fisher", "report", "total"]  # what each stretch cost
    assert set(results["phases"]["collect"]["tasks"]) == {"add", "words"}
    # Phase 1's matrix products as the plan counts them (fisherjax.work), over the batches as they ran, and their rate
    from fisherjax.pipeline import AnalysisConfig, load_inputs, task_batches
    from fisherjax.work import COLLECT_FORWARDS, forward_flops

    config = AnalysisConfig(model=tiny_checkpoint / "model", batch_size=8,
                            tasks=(("add", tiny_checkpoint / "add.jsonl"), ("words", tiny_checkpoint / "words.txt")))
    model, tasks = load_inputs(config)
    shapes = [np.shape(b.input_ids) for batches in task_batches(model, tasks, config).values() for b in batches]
    flops = sum(rows * COLLECT_FORWARDS * forward_flops(model.layout, length).total for rows, length in shapes)
    collect = results["phases"]["collect"]
    assert collect["work_tflop"] == pytest.approx(flops / 1e12) and collect["achieved_tflops"] * collect["seconds"] == pytest.approx(
        flops / 1e12, rel=0.06)  # "seconds" is rounded to 0.01 s
    assert "| stretch | seconds | TFLOP/s |" in (out / "report.md").read_text()
    assert 0 < results["fisher"]["add"]["loss_per_token"] < 10
    groups = np.load(out / "group_fisher.npz")
    assert groups["add|layers/self_attn/k_proj/kernel|head"].shape == (2, 2)
    assert groups["words|layers/mlp/down_proj/kernel|neuron"].shape == (2, 48)
    assert (out / "fisher_state" / "add").is_dir() and (out / "report.md").exists()
    restored = __import__("fisherjax").io.load_task_fisher(out / "fisher_state" / "add")
    np.testing.assert_array_equal(restored.group_fisher["layers/self_attn/k_proj/kernel"]["head"], groups["add|layers/self_attn/k_proj/kernel|head"])
    assert "add: 12 samples" in capsys.readouterr().out


def test_info(tiny_checkpoint, capsys):
    assert main(["info", str(tiny_checkpoint / "model")]) == 0
    text = capsys.readouterr().out
    assert "llama" in text and "kv heads" in text
    assert main(["info", str(tiny_checkpoint / "model"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["heads"], info["kv_heads"], info["head_dim"]) == (4, 2, 8)


@pytest.mark.parametrize(
    "task_arg, message",
    [
        ("add={root}/missing.jsonl", "missing.jsonl: task file does not exist"),
        ("add", "--task expects NAME=FILE"),
        ("bad={root}/bad.jsonl", r"bad.jsonl:2: malformed JSON"),
        ("dir={root}/model", "model: task file is a directory"),
        ("bin={root}/model/model.safetensors", r"model.safetensors: unsupported task file format '.safetensors'"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_checkpoint, tmp_path, capsys, task_arg, message):
    (tiny_checkpoint / "bad.jsonl").write_text('{"text": "ab"}\n{oops\n')
    out = tmp_path / "out"
    code = main(["analyze", "--model", str(tiny_checkpoint / "model"), "--task", task_arg.format(root=tiny_checkpoint),
                 "--out", str(out), "--no-progress", "--phases", "fisher"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fisherjax: error:") and "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--batch-size", "0"], r"batch size must be ≥ 1 \(--batch-size\), got 0"),
        (["--max-length", "1"], "max length must be ≥ 2 tokens"),
        (["--max-samples", "0"], "max samples must be ≥ 1"),
        (["--sparsity", "1.5"], r"sparsity must be in \[0, 1\] \(--sparsity\), got 1.5"),
        (["--top-k", "-1"], "top-k must be ≥ 0"),
        (["--head-samples", "0"], r"head samples must be ≥ 1 \(--head-samples\), got 0"),
        (["--ablation-heads", "-1"], r"ablation heads must be ≥ 0 \(--ablation-heads\)"),
        (["--head-threshold", "inductin=0.5"], r"unknown head threshold 'inductin' \(--head-threshold NAME=VALUE\); known: induction"),
        (["--head-threshold", "induction=1.5"], r"head threshold induction must be in \[0, 1\] \(--head-threshold\), got 1.5"),
        (["--head-threshold", "induction"], r"--head-threshold expects NAME=NUMBER, got 'induction'"),
        (["--probe-length", "1"], r"probe length must be ≥ 2 \(--probe-length\)"),
        (["--conflict-alpha", "1.5"], r"conflict alpha must lie in \(0, 1\) \(--conflict-alpha\), got 1.5"),
        (["--qkov-ridge-rel", "-1"], r"QK-OV relative ridge must be ≥ 0 \(--qkov-ridge-rel\), got -1"),
        (["--qkov-variant", "kfac", "--qkov-fisher-pool", "pooled"], r"--qkov-variant kfac .*--qkov-fisher-pool pooled has no meaning"),
        (["--max-length", "4", "--truncate"],  # the prompts fill the 4 positions: nothing left to predict, found before Phase 1
         r"add.jsonl: none of the 12 samples of task 'add' has a token to predict .*--truncate cut 12 of them to --max-length 4"),
        (["--sample-grads-budget-gb", "0"], r"sample-gradient budget must be > 0 GB \(--sample-grads-budget-gb\)"),
        (["--contribution-budget-gb", "0"], "sample-gradient budget must be > 0 GB"),  # the flag's former name still works
        (["--contribution-budget-gb", "1e-6", "--spill-dir", "{file}"], "--spill-dir exists and is not a directory"),
        (["--contribution-budget-gb", "1e-6", "--spill-dir", "{file}/sub"], "--spill-dir is inside .*a_file, which is not a directory"),
        (["--sample-grads-budget-gb", "1e-6"],  # found before Phase 1, not after a task's collection
         r"task 'add': its 12 samples' kept per-sample gradients would take .* GB .*, which holds not one of them; .*--spill-dir"),
    ],
)
def test_bad_options_exit_2_with_one_line_and_write_nothing(tiny_checkpoint, tmp_path, capsys, options, message):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "out"
    code = _analyze(tiny_checkpoint, out, "--phases", "fisher", *[o.format(file=tmp_path / "a_file") for o in options])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fisherjax: error:") and "Traceback" not in err, err
    assert re.search(message, err), err
    assert not out.exists()


def test_out_that_is_not_a_fisherjax_output_is_refused_not_replaced(tiny_checkpoint, tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    assert _analyze(tiny_checkpoint, project, "--phases", "fisher") == 2
    assert "that fisherjax did not write" in capsys.readouterr().err
    assert (project / "notes.txt").read_text() == "mine"
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    assert _analyze(tiny_checkpoint, a_file, "--phases", "fisher") == 2
    assert "exists and is not a directory" in capsys.readouterr().err and a_file.read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _analyze(tiny_checkpoint, empty, "--phases", "fisher") == 0
    assert _analyze(tiny_checkpoint, empty, "--phases", "fisher") == 0  # its own earlier output is replaced


def test_failed_run_keeps_the_previous_output(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "fisherjax-output.json").write_text('{"fisherjax": "0.1.0"}')  # an earlier run's output
    (out / "keep.txt").write_text("old")
    bad = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint / "model", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "rwkv"
    (bad / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-m", "fisherjax.cli", "analyze", "--model", str(bad), "--task",
                           f"add={tiny_checkpoint / 'add.jsonl'}", "--out", str(out), "--no-progress", "--phases", "fisher"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "unknown architecture model_type='rwkv'" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "keep.txt").read_text() == "old"


def test_analyze_without_arguments_runs_every_phase_on_the_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", "--no-progress"]) == 0
    out = tmp_path / "fisherjax-out"
    results = json.loads((out / "results.json").read_text())
    for phase in ("fisher", "heads", "importance", "masks", "natural", "conflicts", "qkov"):
        assert phase in results, phase
    assert set(results["fisher"]) == {"math", "copy"} and results["fisher"]["math"]["samples"] == 128
    for name in ("group_fisher.npz", "qkov.npz", "conflicts.json", "heads.json", "report.md"):
        assert (out / name).exists(), name
    assert len(list((out / "figures").glob("*.png"))) >= 11
    # What each stretch cost (fisherjax.telemetry): loading, Phase 1 per task, every phase, the figures.
    phases = results["phases"]
    assert list(phases) == ["load", "memory check", "collect", "heads (categories)", "fisher", "curvature", "heads", "importance", "masks",
                            "conflicts", "qkov", "natural", "report", "total"]
    assert set(phases["collect"]["tasks"]) == {"math", "copy"}
    for name, entry in [*phases.items(), *phases["collect"]["tasks"].items()]:
        assert {"seconds", "peak_rss_gb", "device_peak_gb", "compilations", "compile_seconds", "cache_hits"} <= set(entry), name
        assert entry["seconds"] >= 0 and entry["peak_rss_gb"] > 0, (name, entry)
        assert (entry["device_peak_gb"] is None) == (results["environment"]["backend"] == "cpu"), (name, entry)  # XLA:CPU reports none
    # (an executable another test of this run compiled may come from the run's shared cache: a hit)
    assert phases["collect"]["compilations"] + phases["collect"]["cache_hits"] >= 1
    assert phases["total"]["compilations"] >= phases["collect"]["compilations"]
    # one padded length for every batch of the run: the math task's at 16 positions and the copy
    # task's at 32 cost less padded to 64 than compiling the step, and every later phase, twice more
    from fisherjax.pipeline import AnalysisConfig, load_inputs, task_batches

    config = AnalysisConfig()
    assert {np.shape(b.input_ids) for bs in task_batches(*load_inputs(config), config).values() for b in bs} == {(16, 64)}
    assert phases["total"]["seconds"] >= sum(e["seconds"] for k, e in phases.items() if k != "total") - 0.1
    rated = {"collect", "heads", "masks", "conflicts", "qkov"}  # what fisherjax.work counts
    assert {k for k, e in phases.items() if "achieved_tflops" in e} == rated
    assert phases["heads"]["work_tflop"] > 0 and phases["heads"]["achieved_tflops"] > 0
    from fisherjax import demo
    from fisherjax.models.model import Model
    from fisherjax.plan import read_config
    from fisherjax.work import forward_flops

    experiment = results["masks"]["head_pruning"]  # the pruning experiment: a forward per gathered row and mask
    layout = Model.abstract(read_config(model_dir=demo.checkpoint_dir())).layout
    for r in experiment["tasks"].values():
        assert r["masks_evaluated"] == 2 + experiment["n_random"] + len(r.get("loss_extra", {})) + (r["loss_before_from"] != "phase 1")
        assert r["rows_evaluated"] % experiment["rows_per_batch"] == 0 and r["rows_evaluated"] >= r["n_samples"]
    assert phases["masks"]["work_tflop"] == pytest.approx(sum(
        r["rows_evaluated"] * r["masks_evaluated"] * forward_flops(layout, r["length"]).total for r in experiment["tasks"].values()) / 1e12)
    # the pair phases: their Grams' and score arrays' GEMMs over the kept attention gradients (and forming kept factors)
    from fisherjax.fisher.options import attention_paths
    from fisherjax.work import conflict_pair_flops, qkov_pair_flops

    features = sum(math.prod(layout.spec(p).shape) for p in attention_paths(layout))
    grams = conflict_pair_flops(128, 128, features, (128, 128))
    assert grams == 2 * features * 3 * 128 * 128 and phases["conflicts"]["work_tflop"] >= grams / 1e12 * (1 - 1e-9)
    assert phases["qkov"]["work_tflop"] >= 2 * qkov_pair_flops(128, 128, layout, True, 8) / 1e12 * (1 - 1e-9) > 0
    assert "## Where the time went" in (out / "report.md").read_text()
    qkov = np.load(out / "qkov.npz")
    assert qkov["math|copy|scores"].shape == (4, 2, 128, 128, 4)
    assert json.loads((out / "conflicts.json").read_text())["pairs"]["math|copy"]["n_pairs"] == 128 * 128
    # The Fisher method comparison on the first task's first 32 samples (tests/test_compare.py checks its numbers).
    comparison = results["method_comparison"]
    assert comparison["task"] == "math" and comparison["samples"] == 32 and comparison["recommended"] in ("diagonal", "kfac")
    assert set(comparison["methods"]) == {"diagonal", "kfac", "lanczos", "block_spectra"}
    assert len(comparison["methods"]["lanczos"]["top_eigenvalues"]) == 10 and (out / comparison["figures"][0]).exists()
    assert "| K-FAC |" in (out / "report.md").read_text()
    # Pruning the least important half of each layer's heads must hurt each task less than
    # pruning as many random heads (shipped demo model, 10 random draws).
    for task, r in results["masks"]["head_pruning"]["tasks"].items():
        assert r["loss_before"] < r["loss_fisher"] < r["loss_random_mean"], (task, r)
    # Head categories (tests/test_heads.py checks the scores): heads.json, and every phase names them.
    heads = json.loads((out / "heads.json").read_text())
    assert heads == {k: v for k, v in results["heads"].items() if k != "figures"} and np.shape(heads["labels"]) == (2, 4) and set(heads["tasks"]) == {"math", "copy"}
    labels = np.array(heads["labels"])
    assert np.shape(heads["tasks"]["copy"]["ablation"]["accuracy"]) == (2, 4) and heads["tasks"]["copy"]["ablation"]["n_samples"] == 32
    present = {f"{c}_heads" for c in labels.ravel()}
    groups = np.load(out / "group_fisher.npz")
    assert {k.split("|")[2] for k in groups.files if k.endswith("_heads")} == present
    top = results["importance"]["tasks"]["copy"]["heads"]["top"][0]
    assert top["category"] == labels[top["layer"], top["head"]]
    assert set(results["masks"]["head_pruning"]["tasks"]["copy"]["loss_extra"]) >= {f"without {c}" for c in labels.ravel()}
    strongest = results["qkov"]["pairs"]["math|copy"]["blocks"]["v"]["strongest"]
    assert strongest["category"] == labels[strongest["layer"], strongest["head"]]
    assert set(results["conflicts"]["pairs"]["math|copy"]["head_map"]["by_category"]["q"]) == set(labels.ravel())
    assert "| category |" in (out / "report.md").read_text()
    first = comparison["blocks"][0]
    assert first["category"] == labels[first["layer"], first["head"]] or first["block"] in ("k", "v")


@pytest.mark.slow  # the spill itself: tests/test_collect.py and tests/test_refuse_cli.py; the refusal: the bad-options test above
def test_contribution_budget_and_spill_from_the_command_line(tiny_checkpoint, tmp_path, capsys):
    code = _analyze(tiny_checkpoint, tmp_path / "a", "--phases", "fisher", "--contribution-budget-gb", "1e-6")
    assert code == 2 and "--spill-dir" in capsys.readouterr().err
    assert _analyze(tiny_checkpoint, tmp_path / "b", "--phases", "fisher,qkov", "--contribution-budget-gb", "1e-6",
                    "--spill-dir", str(tmp_path / "spill")) == 0
    assert not (tmp_path / "spill").exists()  # the run's spilled gradients went with it
    assert _analyze(tiny_checkpoint, tmp_path / "c", "--phases", "fisher,qkov") == 0  # the same run held in memory
    spilled, held = (np.load(tmp_path / name / "qkov.npz")["add|words|scores"] for name in ("b", "c"))
    assert spilled.shape[2:4] == (12, 10)
    np.testing.assert_array_equal(spilled, held)
    # 12 samples split in halves leave 6 for the fit half's Fisher: the test is skipped, with the reason.
    test = json.loads((tmp_path / "b" / "results.json").read_text())["qkov"]["pairs"]["add|words"]["permutation_test"]
    assert "fit half (6) needs at least 8" in test["skipped"]
    assert "permutation test skipped" in (tmp_path / "b" / "report.md").read_text()


def test_tasks_too_small_for_qkov_or_conflicts_are_skipped_with_the_reason(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert _analyze(tiny_checkpoint, out, "--phases", "fisher,qkov", "--max-samples", "4") == 0
    pairs = json.loads((out / "results.json").read_text())["qkov"]["pairs"]
    assert pairs["add|words"] == {"skipped": "add has 4 samples with active tokens; its Fisher needs at least 8"}
    assert "skipped: words has 4 samples" in (out / "report.md").read_text()
    # conflicts test each task against its own within-task cosines: 3 samples leave 2 per row, the pooled null needs 3
    # (the run used to end there with exit code 2 and no output)
    assert _analyze(tiny_checkpoint, tmp_path / "few", "--phases", "fisher,conflicts", "--max-samples", "3") == 0
    pair = json.loads((tmp_path / "few" / "results.json").read_text())["conflicts"]["pairs"]["add|words"]
    assert pair["skipped"].startswith("add has 3 samples with active tokens; its own cosines, the null it is tested against, need at least 4")
    assert "**add × words**: skipped: add has 3 samples" in (tmp_path / "few" / "report.md").read_text()
    assert _analyze(tiny_checkpoint, tmp_path / "four", "--phases", "fisher,conflicts", "--max-samples", "4") == 0
    assert "n_significant" in json.loads((tmp_path / "four" / "results.json").read_text())["conflicts"]["pairs"]["add|words"]


def test_qkov_options_from_the_command_line(tiny_checkpoint, tmp_path, capsys):
    """``--qkov-contraction``, ``--qkov-variant``, ``--qkov-fisher-pool``, ``--qkov-normalize-gj``,
    ``--qkov-aggregate`` and ``--qkov-ridge-rel`` reach the heatmap: the Pallas kernel (interpret mode
    here) writes the scores the library's default kernel gives with the same score options on the
    run's own saved Fisher states, up to rounding."""
    from fisherjax import io, load_pretrained, qkov

    out = tmp_path / "pallas"
    score = dict(variant="signed", fisher_pool="pooled", normalize_gj="per_token_mean", aggregate="sum", ridge_lambda_rel=0.01)
    flags = ["--qkov-variant", "signed", "--qkov-fisher-pool", "pooled", "--qkov-normalize-gj", "per_token_mean",
             "--qkov-aggregate", "sum", "--qkov-ridge-rel", "0.01"]
    assert _analyze(tiny_checkpoint, out, "--phases", "fisher,qkov", "--qkov-contraction", "pallas", "--save-sample-grads", *flags) == 0
    pair = json.loads((out / "results.json").read_text())["qkov"]["pairs"]["add|words"]
    assert pair["kernel"]["contraction"] == "pallas" and {k: pair["options"][k] for k in score} == score
    assert pair["both_directions_in_one_pass"] is True  # two small tasks on one device: the shared pass
    add, words = (io.load_task_fisher(out / "fisher_state" / name) for name in ("add", "words"))
    expected = qkov.heatmap(add, words, load_pretrained(tiny_checkpoint / "model").layout, progress=False, **score).scores
    found, expected = np.load(out / "qkov.npz")["add|words|scores"].astype(np.float64), np.asarray(expected, np.float64)
    # signed sums cancel: compare over the whole array (a few entries differ by 2e-4 of themselves)
    assert np.linalg.norm(found - expected) <= 1e-5 * np.linalg.norm(expected)
    with pytest.raises(SystemExit) as exit_info:
        _analyze(tiny_checkpoint, tmp_path / "bad", "--qkov-contraction", "tiled")
    assert exit_info.value.code == 2 and "invalid choice: 'tiled'" in capsys.readouterr().err


def test_kfac_qkov_variant_from_the_command_line(tiny_checkpoint, tmp_path):
    """``--qkov-variant kfac``: analyze computes task A's K-FAC factors from its Phase 1 batches and
    writes the scores ``qkov.heatmap(..., variant="kfac", kfac=...)`` gives; the permutation test,
    whose null rests on the diagonal, is skipped with the reason."""
    from fisherjax import io, load_pretrained, qkov
    from fisherjax.curvature import kfac
    from fisherjax.data import batches, load_task

    out = tmp_path / "kfac"
    assert _analyze(tiny_checkpoint, out, "--phases", "fisher,qkov", "--save-sample-grads", "--qkov-variant", "kfac") == 0
    pair = json.loads((out / "results.json").read_text())["qkov"]["pairs"]["add|words"]
    assert pair["options"]["variant"] == "kfac" and "diagonal Fisher" in pair["permutation_test"]["skipped"]
    assert pair["both_directions_in_one_pass"] is False  # K-FAC scores each direction with its own task's factors
    model = load_pretrained(tiny_checkpoint / "model")
    add, words = (io.load_task_fisher(out / "fisher_state" / name) for name in ("add", "words"))
    task = load_task(tiny_checkpoint / "add.jsonl", model.tokenizer, name="add")
    factors = kfac.attention_factors(kfac.kfac_factors(model, model.params, list(batches(task, 8))), model.layout)
    expected = np.asarray(qkov.heatmap(add, words, model.layout, variant="kfac", kfac=factors, progress=False).scores, np.float64)
    found = np.load(out / "qkov.npz")["add|words|scores"].astype(np.float64)
    assert np.linalg.norm(found - expected) <= 1e-5 * np.linalg.norm(expected)


def test_conflict_options_from_the_command_line(tiny_checkpoint, tmp_path):
    """``--conflict-scope`` and ``--conflict-alpha`` reach Phase 5 (its settings in conflicts.json)."""
    out = tmp_path / "out"
    assert _analyze(tiny_checkpoint, out, "--phases", "fisher,conflicts", "--conflict-scope", "overall", "--conflict-alpha", "0.2") == 0
    settings = json.loads((out / "conflicts.json").read_text())["pairs"]["add|words"]["settings"]
    assert settings["scope"] == "overall" and settings["alpha"] == 0.2


def test_conflict_scope_auto_tests_per_group_only_where_the_tests_fit(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """``--conflict-scope auto`` (the default) tests per group when its tests fit half the host
    memory available, else on the whole gradient, saying why in conflicts.json, the report and a
    warning; ``groups`` asked for where they cannot fit at all is refused before Phase 1."""
    from fisherjax import backend
    from fisherjax.analysis import conflicts
    from fisherjax.pipeline import conflict_scope

    need = conflicts.group_scope_bytes(12, 10, 5)
    assert need == pytest.approx(conflicts.GROUP_GRAM_BYTES * 5 * (12 * 10 + 144 + 100) + conflicts.KEPT_TEST_BYTES * conflicts.KEPT_SHARE * 5 * 120
                                 + conflicts.NULL_TAIL_BYTES * 0.05 * 5 * (144 + 100) + conflicts.GROUP_TEST_STEP_BYTES * 5 * (120 + 244))
    # the steps' arrays stop growing: a large test counts them once
    assert conflicts.group_scope_bytes(1000, 1000, 576) - conflicts.group_scope_bytes(1000, 1000, 576, 0.0) == pytest.approx(
        conflicts.KEPT_TEST_BYTES * conflicts.KEPT_SHARE * 576e6)
    assert conflicts.group_scope_bytes(1000, 1000, 576, 0.0) == pytest.approx(
        conflicts.GROUP_GRAM_BYTES * 576 * 3e6 + conflicts.NULL_TAIL_BYTES * 0.05 * 576 * 2e6 + conflicts.GROUP_TEST_FIXED_BYTES)
    # per group, the tests kept are bounded by the memory's share: the share counted, and more with more memory
    assert conflict_scope("auto", 12, 10, 5, 2 * need) == ("groups", None, round(conflicts.KEPT_SHARE * 5 * 120))
    assert conflict_scope("auto", 12, 10, 5, 4 * need).max_kept == conflicts.max_kept_tests(12, 10, 5, 2 * need) > 5 * 120
    assert conflict_scope("auto", 12, 10, 5, None) == ("groups", None, None)
    # references streamed into their nulls: the within-task Grams of the groups held at once, and each side's figure sample
    streamed = conflicts.group_scope_bytes(12, 10, 5, open_groups=2)
    assert need - streamed == pytest.approx(conflicts.GROUP_GRAM_BYTES * 3 * 244 - conflicts.HOT_NULL_BYTES * 5 * (66 + 45))
    assert conflict_scope("auto", 12, 10, 5, 2 * streamed, open_groups=2).scope == "groups"
    scope, why, _ = conflict_scope("auto", 12, 10, 5, 2 * need - 1)
    assert scope == "overall" and "12 × 10 samples over 5 groups" in why and "--conflict-scope groups" in why
    assert conflict_scope("groups", 12, 10, 5, 1.0) == ("groups", None, None)  # a scope given is kept (refused earlier: below)

    monkeypatch.setattr(backend, "host_available_bytes", lambda: 1000)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="conflicts add × words: tested on the whole gradient"):
        assert _analyze(tiny_checkpoint, out, "--phases", "fisher,conflicts") == 0
    pair = json.loads((out / "conflicts.json").read_text())["pairs"]["add|words"]
    assert pair["settings"]["scope"] == "overall" and "per-group tests of 12 × 10 samples" in pair["scope_note"]
    assert "**add × words**: tested on the whole gradient" in (out / "report.md").read_text()

    refused = tmp_path / "refused"
    assert _analyze(tiny_checkpoint, refused, "--phases", "fisher,conflicts", "--conflict-scope", "groups") == 2
    err = capsys.readouterr().err
    assert re.search(r"--conflict-scope groups: per-group tests of tasks 'add' × 'words' \(12 × 10 samples, \d+ groups\) would take", err), err
    assert "--conflict-scope auto" in err and not refused.exists()
    monkeypatch.undo()
    assert _analyze(tiny_checkpoint, tmp_path / "grouped", "--phases", "fisher,conflicts") == 0
    assert json.loads((tmp_path / "grouped" / "conflicts.json").read_text())["pairs"]["add|words"]["settings"]["scope"] == "groups"

    # tasks keeping more tests than the memory's share allows: tested on the whole gradient after all, saying why
    monkeypatch.setattr(conflicts, "max_kept_tests", lambda *args, **kwargs: 0)
    with pytest.warns(UserWarning, match=r"conflicts add × words: tested on the whole gradient, not per group: \d+ of the \d+ \(group, pair\)"):
        assert _analyze(tiny_checkpoint, tmp_path / "kept", "--phases", "fisher,conflicts") == 0
    pair = json.loads((tmp_path / "kept" / "conflicts.json").read_text())["pairs"]["add|words"]
    assert pair["settings"]["scope"] == "overall" and "more than the 0 the per-group tests may keep" in pair["scope_note"]


def test_pair_phases_hold_one_pair_at_a_time(tiny_checkpoint, tmp_path, monkeypatch):
    """With three tasks, Phases 5 and 6 turn each pair's result into its output (conflicts.json or
    qkov.npz entries, report lines, figures) before computing the next pair's: no earlier pair's
    ``[G, n_a, n_b]`` report or ``[block, layer, n_a, n_b, head]`` scores are alive while a later
    pair is computed (Phase 6 computes a pair's two directions together, ``qkov.both_ways``), and
    every pair is written."""
    import gc
    import weakref

    from fisherjax.analysis import conflicts, qkov

    earlier = {"conflicts": [], "qkov": []}

    def watched(module, name):
        compute = getattr(module, name)

        def run(*args, **kwargs):
            gc.collect()
            assert all(ref() is None for ref in earlier[module.__name__.rsplit(".", 1)[-1]]), f"an earlier pair's {name} is still alive"
            found = compute(*args, **kwargs)
            earlier[module.__name__.rsplit(".", 1)[-1]].append(weakref.ref(found))
            return found

        monkeypatch.setattr(module, name, run)

    watched(conflicts, "detect")
    both_ways = qkov.both_ways

    def ways(*args, **kwargs):
        gc.collect()
        assert all(ref() is None for ref in earlier["qkov"]), "an earlier pair's heatmap is still alive"
        for way in both_ways(*args, **kwargs):
            earlier["qkov"].append(weakref.ref(way.heatmap))
            yield way

    monkeypatch.setattr(qkov, "both_ways", ways)
    out = tmp_path / "out"
    # the third task is the second's file again: its pairs' shapes are those of the other pairs (12 × 10) or
    # 10 × 10, and fewer shapes are fewer compilations
    assert _analyze(tiny_checkpoint, out, "--phases", "fisher,conflicts,qkov", "--task", f"again={tiny_checkpoint / 'words.txt'}") == 0
    assert (len(earlier["conflicts"]), len(earlier["qkov"])) == (3, 6)
    pairs = json.loads((out / "conflicts.json").read_text())["pairs"]
    assert set(pairs) == {"add|words", "add|again", "words|again"} and all("top_pairs" in entry for entry in pairs.values())
    scores = np.load(out / "qkov.npz")
    assert {key.rsplit("|", 1)[0] for key in scores.files} == {f"{a}|{b}" for a in ("add", "words", "again") for b in ("add", "words", "again") if a != b}
    assert scores["add|again|scores"].shape[2:4] == (12, 10) and np.isfinite(scores["add|again|scores"]).all()
    assert scores["again|words|scores"].shape[2:4] == (10, 10) and np.isfinite(scores["again|words|scores"]).all()
    assert (out / "figures").is_dir() and "again" in (out / "report.md").read_text()


def test_compiler_flags_are_added_unless_the_user_set_them():
    from fisherjax.backend import with_compiler_flags

    assert with_compiler_flags("") == "--xla_cpu_use_fusion_emitters=false"
    assert with_compiler_flags("--xla_cpu_use_fusion_emitters=true --a=1") == "--xla_cpu_use_fusion_emitters=true --a=1"
    once = with_compiler_flags("--xla_force_host_platform_device_count=4")
    assert with_compiler_flags(once) == once == "--xla_force_host_platform_device_count=4 --xla_cpu_use_fusion_emitters=false"


def test_the_looped_kernel_keeps_the_fusion_emitters_unless_the_user_set_them():
    from fisherjax import backend

    assert backend.looped_compiler_options("") == {"xla_cpu_use_fusion_emitters": True}
    assert backend.looped_compiler_options("--xla_backend_optimization_level=0") == {"xla_cpu_use_fusion_emitters": True}
    assert backend.looped_compiler_options("--a=1 --xla_cpu_use_fusion_emitters=false") is None
    assert backend.LOOPED_COMPILER_OPTIONS is None  # conftest's XLA_FLAGS set the option: the tests keep it
    # the command line's own flag, added after import, is not the user's: its kernel keeps the fusion emitters
    code = ("from fisherjax import backend; backend.use_compiler_flags(); import os; "
            "print(backend.LOOPED_COMPILER_OPTIONS, os.environ['XLA_FLAGS'])")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "{'xla_cpu_use_fusion_emitters': True} --xla_cpu_use_fusion_emitters=false"
