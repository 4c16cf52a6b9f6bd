"""Pre-tokenised task files: ``{"input_ids": [...]}`` lines with optional Hugging Face ``labels``
(the id where scored, -100 where not), their refusals, and an end-to-end ``analyze`` on a
checkpoint without tokenizer files."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from fisherjax import DataError
from fisherjax.data import IGNORE, Example, MissingTokenizer, batches, load_task, make_batch, task_from_tokens

from refusals import assert_refused, run_cli


class CharTokenizer:
    """Bytes + 3 as ids, with BOS = 1 prepended when special tokens are asked for."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [b + 3 for b in text.encode()]}


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_input_ids_and_labels_become_the_batch_labels(tmp_path):
    f = _write(tmp_path / "t.jsonl", [
        {"input_ids": [5, 6, 7, 8]},
        "",
        {"input_ids": [9, 10, 11, 12, 13], "labels": [-100, -100, 11, -100, 13]},
    ])
    task = load_task(f, None, vocab_size=20)  # no tokenizer needed
    assert [e.sample_id for e in task.examples] == [0, 2] and task.source == str(f)
    assert task.examples[0] == Example((5, 6, 7, 8), 0, 0)
    assert task.examples[1].scored == (False, False, True, False, True)
    for side in ("left", "right"):
        batch = make_batch(task.examples, 2, 6, side=side)
        real = batch.attention_mask == 1
        assert batch.labels[0][real[0]].tolist() == [IGNORE, 6, 7, 8]  # every token after the first
        assert batch.labels[1][real[1]].tolist() == [IGNORE, IGNORE, 11, IGNORE, 13]  # a gap in the middle too
        assert (batch.labels[~real] == IGNORE).all()


def test_labels_masking_a_prefix_equal_a_prompt():
    """``labels`` = -100 on the first p tokens scores what ``prompt_len = p`` scores; the first
    token is never a target, even when its label is given."""
    tokens = [1, 40, 41, 42, 43, 44]
    as_prompt = Example(tuple(tokens), 3, 0)
    by_labels = task_from_tokens("t", [tokens], labels=[[-100, -100, -100, 42, 43, 44]]).examples[0]
    first_scored = task_from_tokens("t", [tokens], labels=[tokens]).examples[0]
    np.testing.assert_array_equal(make_batch([as_prompt], 1, 8).labels, make_batch([by_labels], 1, 8).labels)
    np.testing.assert_array_equal(make_batch([first_scored], 1, 8).labels, make_batch([Example(tuple(tokens), 0, 0)], 1, 8).labels)


def test_cut_samples_cut_their_labels(tmp_path):
    f = _write(tmp_path / "t.jsonl", [{"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, 6, -100, 8, 9, 10]}])
    with pytest.warns(UserWarning, match="1 sample"):
        task = load_task(f, None, max_positions=4, truncate=True)
    assert task.examples[0].tokens == (5, 6, 7, 8) and task.examples[0].scored == (False, True, False, True)
    with pytest.raises(DataError, match=r"t\.jsonl:1: the sample has 6 tokens, more than the model's 4 positions"):
        load_task(f, None, max_positions=4)


REFUSED = {
    # name: (lines, message after "t.jsonl:")
    "id-outside-vocabulary": ([{"input_ids": [5, 6]}, {"input_ids": [5, 20, 3]}], r"2: input_ids\[1\] = 20 is outside the model's vocabulary \(ids 0\.\.19\)"),
    "negative-id": ([{"input_ids": [5, -1]}], r"1: input_ids\[1\] = -1 is outside the model's vocabulary"),
    "float-id": ([{"input_ids": [5, 6.0]}], r"1: input_ids\[1\] is 6\.0, not an integer token id"),
    "string-id": ([{"input_ids": ["5"]}], r"1: input_ids\[0\] is \"5\", not an integer token id"),
    "boolean-id": ([{"input_ids": [True]}], r"1: input_ids\[0\] is true, not an integer token id"),
    "empty-ids": ([{"input_ids": []}], r"1: field 'input_ids' must be a non-empty array of integer token ids, got an empty array"),
    "ids-not-a-list": ([{"input_ids": "5 6 7"}], r"1: field 'input_ids' must be a non-empty array of integer token ids, got str"),
    "labels-other-length": ([{"input_ids": [5, 6, 7], "labels": [-100, 6]}], r"1: 'labels' has 2 entries and 'input_ids' 3; give one label per input id"),
    "labels-shifted": ([{"input_ids": [5, 6, 7], "labels": [6, 7, -100]}], r"1: labels\[0\] is 6 but input_ids\[0\] is 5; .* unshifted"),
    "labels-not-a-list": ([{"input_ids": [5, 6], "labels": 6}], r"1: field 'labels' must be an array of token ids or -100, got a number"),
    "labels-without-ids": ([{"text": "ab", "labels": [1, 2]}], r"1: field 'labels' goes with pre-tokenised 'input_ids' only"),
    "ids-and-text-on-one-line": ([{"input_ids": [5, 6], "text": "ab"}], r"1: a line holds pre-tokenised 'input_ids' or text fields, not both \(it also has 'text'\)"),
    "ids-after-text": ([{"text": "ab"}, {"input_ids": [5, 6]}], r"2: a pre-tokenised line in a file of text lines \(line 1\); a task file holds one kind"),
    "text-after-ids": ([{"input_ids": [5, 6]}, "", {"prompt": "a", "completion": "b"}], r"3: a text line in a file of pre-tokenised lines \(line 1\)"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_pre_tokenised_lines_are_refused_in_one_line(tmp_path, case):
    lines, message = REFUSED[case]
    f = _write(tmp_path / "t.jsonl", lines)
    with pytest.raises(DataError, match=re.escape(str(f)) + ":" + message) as err:
        load_task(f, CharTokenizer(), vocab_size=20)
    assert "\n" not in str(err.value)


def test_text_without_a_tokenizer_is_refused_naming_the_line(tmp_path):
    for f in (_write(tmp_path / "t.jsonl", [{"text": "ab"}]), _write(tmp_path / "t.txt", ["ab"])):
        with pytest.raises(MissingTokenizer, match=re.escape(f"{f}:1: a text sample, but there is no tokenizer")) as err:
            load_task(f, None)
        assert err.value.where == f"{f}:1"


def test_labels_in_task_from_tokens_are_checked():
    with pytest.raises(DataError, match=r"task 't', sample 0: labels\[1\] is 9 but input_ids\[1\] is 6"):
        task_from_tokens("t", [[5, 6]], labels=[[5, 9]])
    task = task_from_tokens("t", [[5, 6, 7]], labels=[[-100, -100, 7]])
    (batch,) = batches(task, 1, vocab_size=10)
    assert batch.labels[0, :3].tolist() == [IGNORE, IGNORE, 7]


@pytest.fixture(scope="module")
def tokenless(cli_checkpoint, tmp_path_factory):
    """The CLI test checkpoint without its tokenizer files, and its two tasks pre-tokenised with
    that tokenizer (``add``: labels -100 on the prompt, as the text task masks it)."""
    from fisherjax.demo.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("tokenless")
    model = root / "model"
    shutil.copytree(cli_checkpoint / "model", model)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    tokenizer = build_tokenizer()
    records = []
    for line in (cli_checkpoint / "add.jsonl").read_text().splitlines():
        text = json.loads(line)
        prompt = tokenizer(text["prompt"])["input_ids"]
        completion = tokenizer(text["completion"], add_special_tokens=False)["input_ids"]
        records.append({"input_ids": prompt + completion, "labels": [IGNORE] * len(prompt) + completion})
    _write(root / "add.jsonl", records)
    return root


def test_analyze_runs_pre_tokenised_tasks_on_a_checkpoint_without_tokenizer(tokenless, cli_checkpoint, tmp_path):
    """End to end without a tokenizer: the pre-tokenised ``add`` task gives the Fisher and losses of
    the text task it was made from (same tokens, prompt masked by its labels)."""
    common = ["--phases", "fisher", "--no-progress", "--batch-size", "4", "--max-samples", "4", "--no-diagonal"]
    code, _, err = run_cli(["analyze", "--model", tokenless / "model", "--task", f"add={tokenless / 'add.jsonl'}",
                            "--out", tmp_path / "ids", *common])
    assert code == 0, err
    code, _, err = run_cli(["analyze", "--model", cli_checkpoint / "model", "--task", f"add={cli_checkpoint / 'add.jsonl'}",
                            "--out", tmp_path / "text", *common])
    assert code == 0, err
    ids, text = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("ids", "text"))
    assert ids["tasks"]["add"]["samples"] == 4 and ids["fisher"]["add"] == text["fisher"]["add"]
    by_ids, by_text = (np.load(tmp_path / run / "group_fisher.npz") for run in ("ids", "text"))
    assert set(by_ids) == set(by_text)
    for key in by_text:
        np.testing.assert_array_equal(by_ids[key], by_text[key])
    # the same text task with the tokenizer borrowed from another directory (--tokenizer) gives the same Fisher
    code, _, err = run_cli(["analyze", "--model", tokenless / "model", "--tokenizer", cli_checkpoint / "model", "--task",
                            f"add={cli_checkpoint / 'add.jsonl'}", "--out", tmp_path / "borrowed", *common])
    assert code == 0, err
    borrowed = np.load(tmp_path / "borrowed" / "group_fisher.npz")
    assert json.loads((tmp_path / "borrowed" / "results.json").read_text())["config"]["tokenizer"] == str(cli_checkpoint / "model")
    for key in by_text:
        np.testing.assert_array_equal(borrowed[key], by_text[key])
    (tmp_path / "tok").mkdir()
    assert_refused(["analyze", "--model", tokenless / "model", "--tokenizer", tokenless, "--task", f"add={cli_checkpoint / 'add.jsonl'}",
                    "--out", tmp_path / "tok" / "out", *common],
                   parent=tmp_path / "tok", names=r"no tokenizer files .* found for --tokenizer")
    # a text task on that checkpoint is still refused, naming the checkpoint and the line
    (tmp_path / "sub").mkdir()
    assert_refused(["analyze", "--model", tokenless / "model", "--task", f"add={cli_checkpoint / 'add.jsonl'}", "--out",
                    tmp_path / "sub" / "out", *common],
                   parent=tmp_path / "sub", names=r"model: the checkpoint has no tokenizer files, so text tasks cannot be encoded "
                                                  r"\(.*add\.jsonl:1 is text\)")


def test_probe_tokens_need_a_tokenizer(tokenless):
    from fisherjax import ConfigError, load_pretrained
    from fisherjax.pipeline import AnalysisConfig, categorise_heads

    model = load_pretrained(tokenless / "model")
    assert model.tokenizer is None
    config = AnalysisConfig(model=tokenless / "model", tasks=(("add", tokenless / "add.jsonl"),), probe_tokens="abc")
    with pytest.raises(ConfigError, match=r"--probe-tokens is a text, and the checkpoint has no tokenizer"):
        categorise_heads(model, config)
