"""Task files → padded batches: labels, sample ids, buckets and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fisherjax import DataError
from fisherjax.data import (
    IGNORE,
    batches,
    bucket_length,
    load_task,
    num_active_tokens,
    task_from_texts,
    task_from_tokens,
)


class CharTokenizer:
    """Bytes + 1 as ids, with BOS = 1 prepended when special tokens are asked for."""

    def __call__(self, text, add_special_tokens=True):
        ids = [b + 3 for b in text.encode()]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_prompt_completion_masks_the_prompt(tmp_path):
    f = _write(tmp_path / "t.jsonl", [json.dumps({"prompt": "12+3=", "completion": "15"}), "", json.dumps({"text": "abc"})])
    task = load_task(f, CharTokenizer())
    assert [e.sample_id for e in task.examples] == [0, 2]  # line numbers; the blank line keeps its number
    first = task.examples[0]
    assert first.prompt_len == 6 and len(first.tokens) == 8
    batch = next(batches(task, 4))
    assert batch.input_ids.shape == (4, 16)
    np.testing.assert_array_equal(batch.sample_ids, [0, 2, -1, -1])
    np.testing.assert_array_equal(batch.labels[0, :8], [IGNORE] * 6 + [ord("1") + 3, ord("5") + 3])
    assert (batch.labels[0, 8:] == IGNORE).all() and (batch.labels[2:] == IGNORE).all()
    np.testing.assert_array_equal(num_active_tokens(batch.labels), [2, 3, 0, 0])
    np.testing.assert_array_equal(batch.attention_mask.sum(1), [8, 4, 0, 0])


def test_left_padding_and_buckets():
    task = task_from_tokens("t", [[5, 6, 7], list(range(3, 40))])
    left = list(batches(task, 1, side="left", buckets=(8, 64)))
    assert [b.input_ids.shape[1] for b in left] == [8, 64]
    np.testing.assert_array_equal(left[0].input_ids[0, -3:], [5, 6, 7])
    np.testing.assert_array_equal(left[0].attention_mask[0], [0] * 5 + [1] * 3)
    assert bucket_length(17) == 32 and bucket_length(10_000, (16, 32)) == 10_000


def test_texts_and_txt_files(tmp_path):
    task = task_from_texts("x", ["hi", "there"], CharTokenizer())
    assert task.examples[1].tokens[0] == 1 and len(task.examples[1].tokens) == 6
    f = _write(tmp_path / "t.txt", ["one", "two"])
    assert [e.sample_id for e in load_task(f, CharTokenizer()).examples] == [0, 1]


def test_split_and_subset_keep_sample_ids():
    task = task_from_tokens("t", [[i + 3, i + 4] for i in range(10)])
    a, b = task.split(0.5, seed=1)
    assert sorted(e.sample_id for e in a.examples + b.examples) == list(range(10))
    assert [e.sample_id for e in task.subset([7, 2]).examples] == [7, 2]
    with pytest.raises(DataError, match="no samples with ids"):
        task.subset([42])


@pytest.mark.parametrize(
    "lines, message",
    [
        (["{\"text\": \"ok\"}", "{not json"], r"t\.jsonl:2: malformed JSON"),
        (["{\"prompt\": \"only a prompt\"}"], r"t\.jsonl:1: needs a 'text' field or 'prompt' and 'completion'"),
        (["[1, 2]"], r"t\.jsonl:1: expected a JSON object"),
        (["", "  "], r"t\.jsonl: task file is empty"),
    ],
)
def test_bad_task_files(tmp_path, lines, message):
    with pytest.raises(DataError, match=message):
        load_task(_write(tmp_path / "t.jsonl", lines), CharTokenizer())


def test_token_ids_outside_the_vocabulary(tmp_path):
    f = _write(tmp_path / "t.jsonl", [json.dumps({"text": "a"}), json.dumps({"text": "~"})])
    task = load_task(f, CharTokenizer())
    with pytest.raises(DataError, match=r"t\.jsonl: sample 1 has token id 129, outside the model's vocabulary \(size 120\)"):
        list(batches(task, 2, vocab_size=120))
    with pytest.raises(DataError, match="does not exist"):
        load_task(tmp_path / "missing.jsonl", CharTokenizer())
    with pytest.raises(DataError, match="is empty"):
        task_from_texts("x", [], CharTokenizer())
