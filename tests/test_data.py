"""Task files → padded batches: labels, sample ids, buckets and clear errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from fisherjax import ConfigError, DataError
from fisherjax.data import (
    IGNORE,
    Batch,
    Example,
    batches,
    bucket_length,
    load_task,
    make_batch,
    num_active_tokens,
    predicted_labels,
    run_buckets,
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


def _lengths(*sizes):
    """A task of samples of these token counts (ids 3, 4, ...)."""
    return task_from_tokens("t", [list(range(3, 3 + n)) for n in sizes])


def test_a_run_folds_a_length_into_the_next_when_that_adds_at_most_one_batch_of_positions():
    # one batch at 16 beside three at 64: 48 positions more ≤ 64, so one length, 64
    assert run_buckets([_lengths(10, 50, 60, 40)], 1) == (64,)
    # eight batches at 16 would add 8 · 48 = 384 positions > 64: both lengths stay
    assert run_buckets([_lengths(*[10] * 8, 50)], 1) == (16, 64)
    # folded batches count at the length they join: 16 → 32 (16 ≤ 32), then 32 → 64 with two (2 · 32
    # ≤ 64) but not with three (96); lengths of every task count together, the largest is never
    # folded, and batches are cut as batches() cuts them
    assert run_buckets([_lengths(10, 20), _lengths(60)], 1) == (64,)
    assert run_buckets([_lengths(10, 20, 20), _lengths(60)], 1) == (32, 64) == run_buckets([_lengths(10, 20, 20, 60)], 1)
    assert run_buckets([_lengths(10, 20, 20, 25, 60)], 2) == (64,)  # batches [10, 20] [20, 25] [60]: 2 · 32 ≤ 64
    assert run_buckets([_lengths(9000)], 1) == (9000,)  # beyond the largest bucket: the length itself
    # the work of a row at a length (2 · (64² − 32²) > 64², where 2 · 32 ≤ 64), and work up to `free` folds whatever it adds
    assert run_buckets([_lengths(*[10] * 8, 50)], 1, row_cost=lambda n: n * n) == (16, 64)  # 8 · (64² − 16²) > 64²
    assert run_buckets([_lengths(20, 20, 50)], 1) == (64,) != run_buckets([_lengths(20, 20, 50)], 1, row_cost=lambda n: n * n)
    assert run_buckets([_lengths(*[10] * 8, 50)], 1, free=384) == (64,) != run_buckets([_lengths(*[10] * 8, 50)], 1, free=383)
    # every batch is padded to the smallest kept length at least its own bucket: none gets longer
    # than the longest batch, and lengths not kept are never used
    task = _lengths(10, 20, 20, 25, 30, 30, 60, 5, 3)
    kept = run_buckets([task], 2)
    shapes = [b.input_ids.shape[1] for b in batches(task, 2, buckets=kept)]
    assert kept == (32, 64) and shapes == [32, 32, 32, 64, 32] and set(shapes) == set(kept)


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


# --- targets predicted from padding ---------------------------------------------------------------


def test_the_first_token_is_never_a_target_whatever_the_side():
    examples = [Example((5, 6, 7), 0, 0), Example((9,), 0, 1)]
    for side in ("right", "left"):
        batch = make_batch(examples, 2, 6, side=side)
        np.testing.assert_array_equal(num_active_tokens(batch.labels), [2, 0], err_msg=side)
        np.testing.assert_array_equal(num_active_tokens(batch.labels, batch.attention_mask), [2, 0], err_msg=side)
        real = batch.labels[batch.labels != IGNORE]
        np.testing.assert_array_equal(real, [6, 7])
    right, left = (make_batch(examples, 2, 6, side=s) for s in ("right", "left"))
    np.testing.assert_array_equal(right.labels[0, :3], left.labels[0, 3:])


def test_predicted_labels_need_a_real_token_before_them():
    labels = np.array([[4, 5, 6, 7, 8, 9], [4, 5, 6, 7, 8, 9]], np.int32)
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0]], np.int32)  # left padding; a hole and right padding
    want = np.array([[IGNORE, IGNORE, IGNORE, 7, 8, 9], [IGNORE, 5, IGNORE, IGNORE, 8, IGNORE]], np.int32)
    ours = predicted_labels(labels, mask)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.int32
    np.testing.assert_array_equal(ours, want)
    in_jit = jax.jit(predicted_labels)(labels, mask)
    assert isinstance(in_jit, jax.Array) and in_jit.dtype == np.int32
    np.testing.assert_array_equal(in_jit, want)
    np.testing.assert_array_equal(num_active_tokens(labels, mask), [3, 2])
    np.testing.assert_array_equal(jax.jit(num_active_tokens)(labels, mask), [3, 2])


# --- task files -----------------------------------------------------------------------------------


def test_suffix_in_any_case_and_line_endings(tmp_path):
    f = tmp_path / "T.JSONL"
    f.write_bytes(b'\xef\xbb\xbf{"text": "ab"}\r\n{"prompt": "1+1=", "completion": "2\\n"}\r\n')
    task = load_task(f, CharTokenizer())
    assert task.name == "T" and [len(e.tokens) for e in task.examples] == [3, 7] and task.examples[1].prompt_len == 5
    assert task.examples[1].tokens[-1] == ord("\n") + 3  # an escaped newline inside a JSON string is text
    g = tmp_path / "t.TXT"
    g.write_bytes(b"a\tb\r\n\r\nc\n")
    assert [(e.tokens, e.sample_id) for e in load_task(g, CharTokenizer()).examples] == [
        ((1, ord("a") + 3, ord("\t") + 3, ord("b") + 3), 0),
        ((1, ord("c") + 3), 2),
    ]


@pytest.mark.parametrize(
    "file, content, message",
    [
        ("t.json", b'{"text": "a"}\n', r"t\.json: unsupported task file format '\.json'; use \.jsonl .* or \.txt"),
        ("t", b"abc\n", r"t: unsupported task file format \(no suffix\)"),
        ("t.jsonl", b'{"text": null}\n', r"t\.jsonl:1: field 'text' must be a string, got null"),
        ("t.jsonl", b'{"text": 12345}\n', r"t\.jsonl:1: field 'text' must be a string, got a number"),
        ("t.jsonl", b'{"text": "a"}\n{"prompt": "x", "completion": ["a"]}\n', r"t\.jsonl:2: field 'completion' must be a string, got an array"),
        ("t.jsonl", b'{"text": "a\\u0000b"}\n', r"t\.jsonl:1: field 'text' contains a NUL byte"),
        ("t.txt", b"ok\nx\x00y\n", r"t\.txt:2: the line contains a NUL byte"),
        ("t.txt", b"a\x0bb\n", r"t\.txt:1: the line contains control character U\+000B"),
        ("t.txt", b"ok\n\xff\n", r"t\.txt:2: not UTF-8 text \(byte 3\)"),
    ],
)
def test_refused_task_files(tmp_path, file, content, message):
    (tmp_path / file).write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        load_task(tmp_path / file, CharTokenizer())
    assert "\n" not in str(err.value)


def test_longer_than_the_model_is_refused_unless_truncating(tmp_path):
    f = _write(tmp_path / "t.jsonl", [json.dumps({"text": "abc"}), json.dumps({"text": "x" * 20}), json.dumps({"prompt": "p" * 9, "completion": "c" * 3})])
    with pytest.raises(DataError, match=r"t\.jsonl:2: the sample has 21 tokens, more than the model's 10 positions; .*--truncate"):
        load_task(f, CharTokenizer(), max_positions=10)
    with pytest.raises(DataError, match=r"t\.jsonl:2: .* 12 tokens, more than the model's 10"):  # max_length hides nothing
        load_task(f, CharTokenizer(), max_positions=10, max_length=12)
    with pytest.warns(UserWarning, match=r"t\.jsonl: 2 sample\(s\) cut to the length limit \(ids 1, 2\)"):
        task = load_task(f, CharTokenizer(), max_positions=10, truncate=True)
    assert [len(e.tokens) for e in task.examples] == [4, 10, 10] and task.truncated == (1, 2)
    assert [e.prompt_len for e in task.examples] == [0, 0, 10]  # all prompt after the cut: skipped when collected
    with pytest.warns(UserWarning, match="2 sample"):
        cut = load_task(f, CharTokenizer(), max_positions=10, max_length=8)  # the user's own cut, within the model
    assert [len(e.tokens) for e in cut.examples] == [4, 8, 8] and cut.truncated == (1, 2)
    assert cut.subset([2, 0]).truncated == (2,)
    assert load_task(f, CharTokenizer(), max_positions=21).truncated == ()
    with pytest.raises(ConfigError, match="max_positions must be a positive number"):
        load_task(f, CharTokenizer(), max_positions=0)


def test_an_example_counts_the_tokens_its_loss_predicts():
    """The first token is never predicted, nor the prompt; pre-tokenised ``labels`` (``scored``) pick the rest."""
    from fisherjax.data import Example

    assert Example((5, 6, 7, 8), prompt_len=0, sample_id=0).num_targets == 3
    assert Example((5, 6, 7, 8), prompt_len=2, sample_id=0).num_targets == 2
    assert Example((5, 6, 7, 8), prompt_len=4, sample_id=0).num_targets == 0
    assert Example((5, 6, 7, 8), prompt_len=0, sample_id=0, scored=(True, False, True, True)).num_targets == 2
    assert Example((5,), prompt_len=0, sample_id=0).num_targets == 0


def test_a_batch_cut_into_pieces_keeps_its_rows_in_order():
    ids = np.arange(5 * 3, dtype=np.int32).reshape(5, 3)
    batch = Batch(ids, np.ones_like(ids), ids + 1, np.array([4, 7, 9, -1, -1]))
    pieces = batch.pieces(2)
    assert [len(p.sample_ids) for p in pieces] == [2, 2, 1] and [p.num_real for p in pieces] == [2, 1, 0]
    for field in range(4):
        np.testing.assert_array_equal(np.concatenate([p[field] for p in pieces]), batch[field])
    assert [p.sample_ids.tolist() for p in batch.pieces(5)] == [[4, 7, 9, -1, -1]]
