"""``fisherjax analyze --config FILE`` and ``--print-config``: AnalysisConfig's fields from TOML or
JSON, flags on the command line over the file, one-line refusals naming the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fisherjax.cli import main


def _print(capsys, *argv) -> dict:
    assert main(["analyze", *argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_toml_file_sets_the_fields_and_flags_override_it(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    config = tmp_path / "sub" / "run.toml"
    config.write_text('batch_size = 8\nphases = ["fisher", "heads"]\nmax_samples = 16\nsparsities = [0.5, 0.8]\n'
                      'head_thresholds = [["induction", 0.5]]\ntasks = [["math", "math.jsonl"]]\nprogress = false\n')
    found = _print(capsys, "--config", str(config))
    assert found["batch_size"] == 8 and found["phases"] == ["fisher", "heads"] and found["max_samples"] == 16
    assert found["sparsities"] == [0.5, 0.8] and found["head_thresholds"] == [["induction", 0.5]] and found["progress"] is False
    assert found["tasks"] == [["math", str(tmp_path / "sub" / "math.jsonl")]]  # relative to the file's folder
    assert found["top_k"] == 20 and found["out"] == str(Path.cwd() / "fisherjax-out")  # untouched: the dataclass defaults
    # a flag given on the command line wins, even when it repeats the default's value
    found = _print(capsys, "--config", str(config), "--batch-size", "16", "--phases", "fisher")
    assert found["batch_size"] == 16 and found["phases"] == ["fisher"] and found["max_samples"] == 16
    # what --print-config prints, --config reads back to the same configuration
    echoed = tmp_path / "echo.json"
    echoed.write_text(json.dumps(found))
    assert _print(capsys, "--config", str(echoed)) == found


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("a.json", '{"batch_size": "x"}', "a.json: batch_size must be an integer, got 'x'"),
        ("b.toml", "bogus = 1", "b.toml: unknown key 'bogus'; the keys are AnalysisConfig's fields"),
        ("c.toml", "batch_size = 0", r"c.toml: batch size must be ≥ 1 \(--batch-size\), got 0"),
        ("d.toml", "batch_size = ", "d.toml: not valid TOML"),
        ("e.json", "[1, 2]", "e.json: a --config file holds a table of AnalysisConfig fields, not list"),
        ("f.toml", 'tasks = ["math.jsonl"]', r"f.toml: tasks must be a list of \[str, Path\] pairs"),
        ("g.toml", "diagonal = 1", "g.toml: diagonal must be true or false, got 1"),
        ("h.toml", 'qkov_variant = "diag"', "h.toml: qkov variant must be one of"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_key_and_writes_nothing(tmp_path, capsys, name, text, message):
    (tmp_path / name).write_text(text)
    out = tmp_path / "out"
    assert main(["analyze", "--config", str(tmp_path / name), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fisherjax: error: ")
    assert __import__("re").search(message, err), err
    assert not out.exists()
    assert main(["analyze", "--config", str(tmp_path / "missing.toml"), "--print-config"]) == 2
    assert "missing.toml: cannot read the --config file" in capsys.readouterr().err


def test_the_run_uses_the_file(cli_checkpoint, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": str(cli_checkpoint / "model"), "tasks": [["add", str(cli_checkpoint / "add.jsonl")]],
                                  "phases": ["fisher"], "batch_size": 4, "max_samples": 6, "progress": False}))
    out = tmp_path / "out"
    assert main(["analyze", "--config", str(config), "--out", str(out), "--no-compilation-cache"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["batch_size"] == 4 and results["config"]["phases"] == ["fisher"]
    assert results["fisher"]["add"]["samples"] == 6
