"""``analyze``'s Phase 1 saves (``--checkpoint-dir``, ``--resume``, ``--checkpoint-every``) and mask
options (``--mask-unit``, ``--mask-scope``): each reaches what it configures (in results.json's
config, and in the result where it should), works from ``--config`` and ``--print-config``, and
a bad value is one line naming the flag."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from refusals import assert_refused, run_cli

torch = pytest.importorskip("torch")


def _analyze(root, out, *extra):
    code, _, err = run_cli(["analyze", "--model", root / "model", "--task", f"add={root / 'add.jsonl'}", "--out", out, "--no-progress",
                            "--batch-size", "4", "--max-samples", "8", "--no-diagonal", *extra])
    assert code == 0, err
    return json.loads((out / "results.json").read_text())


def test_checkpoint_dir_saves_phase_one_and_resume_continues_it(cli_checkpoint, tmp_path):
    """Saves after each of the two batches; a resumed run from the first save collects the second
    batch only and writes the same numbers; saves without --resume are refused, not overwritten."""
    saves = tmp_path / "saves"
    first = _analyze(cli_checkpoint, tmp_path / "first", "--phases", "fisher", "--checkpoint-dir", str(saves), "--checkpoint-every", "1")
    assert first["config"]["checkpoint_dir"] == str(saves) and first["config"]["checkpoint_every"] == 1
    assert first["config"]["resume"] is False and first["tasks"]["add"]["resumed_batches"] == 0
    assert sorted(p.name for p in (saves / "add").iterdir()) == ["1", "2"]
    shutil.rmtree(saves / "add" / "2")  # as if the run had been killed during its second batch
    resumed = _analyze(cli_checkpoint, tmp_path / "resumed", "--phases", "fisher", "--checkpoint-dir", str(saves), "--resume",
                       "--checkpoint-every", "1")
    assert resumed["config"]["resume"] is True and resumed["tasks"]["add"]["resumed_batches"] == 1
    assert resumed["fisher"]["add"] == first["fisher"]["add"]
    before, after = (np.load(tmp_path / run / "group_fisher.npz") for run in ("first", "resumed"))
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
    (tmp_path / "sub").mkdir()
    assert_refused(["analyze", "--model", cli_checkpoint / "model", "--task", f"add={cli_checkpoint / 'add.jsonl'}",
                    "--out", tmp_path / "sub" / "out", "--phases", "fisher", "--checkpoint-dir", saves],
                   parent=tmp_path / "sub", names=r"saves/add: holds Phase 1's progress of task 'add' \(after batch 2\); pass --resume")


def test_mask_units_and_scope_reach_the_masks_phase(cli_checkpoint, tmp_path):
    """Neuron and channel masks ranked within each layer: they replace the default units in
    results.json and the report, and each layer loses exactly half of its units."""
    out = tmp_path / "out"
    results = _analyze(cli_checkpoint, out, "--phases", "fisher,masks", "--mask-unit", "neuron", "--mask-unit", "channel",
                       "--mask-scope", "layer", "--sparsity", "0.5", "--pruning-samples", "4")
    assert results["config"]["mask_units"] == ["neuron", "channel"] and results["config"]["mask_scope"] == "layer"
    summary = results["masks"]["masks"]
    assert summary["units"] == ["neuron", "channel"] and summary["scope"] == "layer"
    per_task = summary["tasks"]["add"]
    assert set(per_task) == {"neuron", "channel"}  # no head masks: not asked for
    neuron, channel = per_task["neuron"]["0.5"], per_task["channel"]["0.5"]
    assert neuron["scope"] == "layer" and neuron["units_pruned_per_layer"] == [24, 24]  # 48 neurons per layer
    assert channel["units_pruned_per_layer"] == [64, 64]  # gate, up (48 channels each) and down (32) per layer
    assert "| add | neuron | 0.5 | 48 of 96 |" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--resume"], r"--resume needs --checkpoint-dir DIR"),
        (["--checkpoint-dir", "{tmp}/sub/out/saves"], r"--checkpoint-dir must lie outside --out \(.*\) and not contain it"),
        (["--checkpoint-dir", "{tmp}"], r"--checkpoint-dir must lie outside --out"),
        (["--checkpoint-dir", "{tmp}/saves", "--spill-dir", "{tmp}/spill"], r"--checkpoint-dir cannot be combined with --spill-dir"),
        (["--checkpoint-dir", "{tmp}/saves", "--checkpoint-every", "0"], r"checkpoint every must be ≥ 1 batch \(--checkpoint-every\), got 0"),
        (["--mask-unit", "head", "--mask-unit", "head"], r"mask units repeat \(--mask-unit\): head, head"),
        (["--mask-unit", "parameter"], r"--mask-unit: invalid choice: 'parameter'"),
        (["--mask-scope", "block"], r"--mask-scope: invalid choice: 'block'"),
    ],
)
def test_bad_options_are_one_line_naming_the_flag(cli_checkpoint, tmp_path, flags, message):
    (tmp_path / "sub").mkdir()
    argv = ["analyze", "--model", cli_checkpoint / "model", "--task", f"add={cli_checkpoint / 'add.jsonl'}", "--out",
            tmp_path / "sub" / "out", "--phases", "fisher", "--no-progress", *(f.format(tmp=tmp_path) for f in flags)]
    assert_refused(argv, parent=tmp_path / "sub", names=message)
    assert not (tmp_path / "saves").exists()


def test_the_new_fields_in_config_files_and_print_config(tmp_path):
    """The fields read from a file, flags over them (checked together: --resume on the command line
    with the file's checkpoint_dir), and --print-config's JSON read back."""
    config = tmp_path / "run.toml"
    config.write_text('checkpoint_dir = "saves"\ncheckpoint_every = 3\nmask_units = ["kv_head"]\nmask_scope = "layer"\n')
    code, printed, err = run_cli(["analyze", "--config", config, "--resume", "--sparsity", "0.6", "--print-config"])
    assert code == 0, err
    found = json.loads(printed)
    assert found["checkpoint_dir"] == str(tmp_path / "saves") and found["resume"] is True and found["checkpoint_every"] == 3
    assert found["mask_units"] == ["kv_head"] and found["mask_scope"] == "layer" and found["sparsities"] == [0.6]
    code, printed, err = run_cli(["analyze", "--config", config, "--mask-unit", "neuron", "--mask-unit", "head", "--print-config"])
    assert code == 0 and json.loads(printed)["mask_units"] == ["neuron", "head"] and json.loads(printed)["resume"] is False
    echoed = tmp_path / "echo.json"
    echoed.write_text(json.dumps(found))
    code, again, _ = run_cli(["analyze", "--config", echoed, "--print-config"])
    assert code == 0 and json.loads(again) == found
    (tmp_path / "bad.toml").write_text('mask_units = "head"\n')
    code, _, err = run_cli(["analyze", "--config", tmp_path / "bad.toml", "--print-config"])
    assert code == 2 and "bad.toml: mask_units must be a list, got 'head'" in err
    code, _, err = run_cli(["analyze", "--config", config, "--checkpoint-every", "0", "--print-config"])
    assert code == 2 and "run.toml" not in err and "(--checkpoint-every), got 0" in err  # the flag's fault, not the file's


RUNTIME_FLAGS = {"config", "print_config", "compilation_cache", "no_compilation_cache", "coordinator", "num_processes", "process_id"}
"""analyze's flags that choose how this process runs, not what it computes (not AnalysisConfig fields)."""

ALONE = {"spill_dir": [], "resume": ["--checkpoint-dir", "saves"]}
"""Flags that the others exclude (a spill directory with Phase 1 saves), given in separate runs with what they need."""


def _non_default_flags(tmp_path) -> dict[str, list[str]]:
    """``{dest: [flag, value]}``: every analyze flag that sets an AnalysisConfig field, each with a
    value other than its default (a choice, a number, a path, a switch)."""
    from fisherjax.cli import build_parser

    flags = {}
    for action in build_parser().analyze._actions:
        if action.dest in RUNTIME_FLAGS or action.dest == "help" or not action.option_strings:
            continue
        flag = action.option_strings[0]
        if action.nargs == 0:  # a switch
            value = []
        elif action.choices:
            value = [next(c for c in action.choices if c != action.default and c != "kfac")]
        else:
            value = {"task": [f"t={tmp_path / 't.jsonl'}"], "head_threshold": ["induction=0.5"], "phases": ["fisher,masks"],
                     "sparsity": ["0.25"], "conflict_alpha": ["0.25"], "qkov_ridge_rel": ["0.25"], "probe_tokens": ["xyz"]}.get(action.dest)
            if value is None and action.type is int:
                value = [str((action.default or 2) + 1)]
            elif value is None and action.type is float:
                value = ["3.5"]
            elif value is None:  # a path
                value = [str(tmp_path / action.dest)]
        flags[action.dest] = [flag, *value]
    return flags


def test_every_analyze_flag_reaches_its_config_field(tmp_path):
    """Each flag given a non-default value changes exactly the AnalysisConfig field it names, as
    --print-config shows (the config that results.json records), and every field has a flag."""
    import dataclasses

    from fisherjax.cli import FLAG_FIELDS
    from fisherjax.pipeline import AnalysisConfig

    field = lambda dest: FLAG_FIELDS.get(dest, dest)  # noqa: E731
    defaults = json.loads(run_cli(["analyze", "--print-config"])[1])
    flags = _non_default_flags(tmp_path)
    assert {field(d) for d in flags} == {f.name for f in dataclasses.fields(AnalysisConfig)}, "a field without a flag, or the reverse"
    runs = [{d: v for d, v in flags.items() if d not in ALONE}] + [{d: flags[d]} for d in ALONE]
    for run in runs:
        extra = [a for d in run for a in ALONE.get(d, [])]
        code, printed, err = run_cli(["analyze", *[a for v in run.values() for a in v], *extra, "--print-config"])
        assert code == 0, err
        given = json.loads(printed)
        changed = {name for name in given if given[name] != defaults[name]}
        expected = {field(d) for d in run} | ({"checkpoint_dir"} if extra else set())
        assert changed == expected, (sorted(expected - changed), sorted(changed - expected))


def test_the_kfac_variant_keeps_float32_gradients_unless_told_otherwise(cli_checkpoint, tmp_path):
    """Unset, the kept gradients' storage is bfloat16, and float32 with the signed variants: kfac
    (whose scores bfloat16's rounding can decide where the damping is far below the K-FAC
    spectrum) and signed (its sums of either sign magnify the rounding);
    --sample-grads-dtype bfloat16 with kfac is kept as asked and warned about when its heatmap is prepared."""
    import warnings

    from fisherjax.pipeline import AnalysisConfig, default_storage

    def dtype(*flags):
        code, printed, err = run_cli(["analyze", *flags, "--print-config"])
        assert code == 0, err
        return json.loads(printed)["sample_grads_dtype"]

    assert dtype() == "bfloat16" and dtype("--qkov-variant", "kfac") == "float32" == dtype("--qkov-variant", "signed")
    assert dtype("--qkov-variant", "symmetric") == dtype("--qkov-variant", "natural") == "bfloat16"
    assert dtype("--qkov-variant", "kfac", "--sample-grads-dtype", "bfloat16") == "bfloat16"
    assert AnalysisConfig(qkov_variant="kfac").sample_grads_dtype == default_storage("kfac") == "float32"
    argv = ["analyze", "--model", cli_checkpoint / "model", "--no-progress", "--phases", "fisher,qkov", "--qkov-variant", "kfac",
            "--task", f"add={cli_checkpoint / 'add.jsonl'}", "--task", f"words={cli_checkpoint / 'words.txt'}"]
    for extra, warned in (([], False), (["--sample-grads-dtype", "bfloat16"], True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, _, err = run_cli([*argv, *extra, "--out", tmp_path / f"out{len(extra)}"])
        assert code == 0, err
        assert any("keeps its gradients in bfloat16" in str(w.message) for w in caught) == warned
        assert json.loads((tmp_path / f"out{len(extra)}" / "results.json").read_text())["config"]["sample_grads_dtype"] == (
            "bfloat16" if warned else "float32")
