"""Task data → padded :class:`Batch` arrays.

A task is a list of :class:`Example` (token ids, how many leading tokens are prompt, a stable
sample id). Sources: a list of texts, a ``.jsonl`` file (field ``text``, or ``prompt`` +
``completion`` with the prompt's labels masked), a ``.txt`` file (one text per line), or token
arrays. Sample ids are the 0-based line numbers of the file (or list indices), so they survive
filtering and reordering.

Labels follow Hugging Face's convention: ``labels`` is aligned with ``input_ids`` and the loss
shifts by one (position ``t`` predicts ``labels[t + 1]``); ``-100`` marks tokens that are not
predicted (prompt and padding). Sequences are padded to a few fixed bucket lengths and every
batch to the full batch size with filler rows (``sample_id = -1``, no real tokens), so a jitted
function sees a handful of shapes, not one per length.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fisherjax.errors import DataError

IGNORE = -100
"""Label value of tokens that carry no loss."""

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Batch(NamedTuple):
    """One padded batch (host numpy arrays).

    input_ids, attention_mask, labels: ``[batch, seq]`` int32; sample_ids: ``[batch]`` int64,
    ``-1`` on filler rows.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    sample_ids: np.ndarray

    @property
    def num_real(self) -> int:
        return int((self.sample_ids >= 0).sum())


@dataclasses.dataclass(frozen=True)
class Example:
    """One sample: its tokens, the number of leading prompt tokens (not predicted), its id."""

    tokens: tuple[int, ...]
    prompt_len: int
    sample_id: int


@dataclasses.dataclass(frozen=True)
class Task:
    """A named list of examples, with the file it came from (for error messages)."""

    name: str
    examples: tuple[Example, ...]
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(self.examples)

    def subset(self, sample_ids: Sequence[int], name: str | None = None) -> Task:
        """The examples with the given sample ids, in that order."""
        by_id = {e.sample_id: e for e in self.examples}
        missing = [i for i in sample_ids if i not in by_id]
        if missing:
            raise DataError(f"{self.source}: no samples with ids {missing[:5]}")
        return Task(name or self.name, tuple(by_id[i] for i in sample_ids), self.source)

    def split(self, fraction: float = 0.5, seed: int = 0) -> tuple[Task, Task]:
        """Two disjoint random halves (for reference splits and null distributions)."""
        order = np.random.default_rng(seed).permutation(len(self.examples))
        cut = int(round(fraction * len(order)))
        pick = lambda idx, suffix: Task(  # noqa: E731
            f"{self.name}{suffix}", tuple(self.examples[i] for i in sorted(idx)), self.source
        )
        return pick(order[:cut], "_a"), pick(order[cut:], "_b")


def _encode(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _truncate(tokens: list[int], max_length: int | None) -> list[int]:
    return tokens if max_length is None else tokens[:max_length]


def task_from_texts(name: str, texts: Sequence[str], tokenizer, *, max_length: int | None = None) -> Task:
    """A task whose every token after the first is predicted."""
    if not texts:
        raise DataError(f"task {name!r} is empty")
    examples = tuple(
        Example(tuple(_truncate(_encode(tokenizer, t, special=True), max_length)), 0, i) for i, t in enumerate(texts)
    )
    return Task(name, examples)


def task_from_tokens(name: str, tokens: Sequence[Sequence[int]], *, prompt_lens: Sequence[int] | None = None) -> Task:
    """A task from token id arrays (ids 0..n-1)."""
    if len(tokens) == 0:
        raise DataError(f"task {name!r} is empty")
    prompt_lens = prompt_lens if prompt_lens is not None else [0] * len(tokens)
    return Task(name, tuple(Example(tuple(int(t) for t in seq), int(p), i) for i, (seq, p) in enumerate(zip(tokens, prompt_lens))))


def load_task(path: str | Path, tokenizer, *, name: str | None = None, max_length: int | None = None) -> Task:
    """Read a ``.jsonl`` (``text`` or ``prompt`` + ``completion`` per line) or ``.txt`` task file.

    Blank lines are skipped; sample ids are 0-based line numbers. A malformed line, a record
    without usable fields, or a file with no samples raises :class:`DataError` naming the file
    and line.
    """
    path = Path(path)
    name = name or path.stem
    if not path.exists():
        raise DataError(f"{path}: task file does not exist")
    if not path.is_file():
        raise DataError(f"{path}: task file is a directory, not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: task file is not UTF-8 text (byte {err.start})") from None
    examples, truncated = [], 0
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number + 1}: malformed JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number + 1}: expected a JSON object, got {type(record).__name__}")
            if "prompt" in record and "completion" in record:
                prompt = _encode(tokenizer, str(record["prompt"]), special=True)
                completion = _encode(tokenizer, str(record["completion"]), special=False)
                tokens, prompt_len = prompt + completion, len(prompt)
            elif "text" in record:
                tokens, prompt_len = _encode(tokenizer, str(record["text"]), special=True), 0
            else:
                raise DataError(f"{path}:{number + 1}: needs a 'text' field or 'prompt' and 'completion' fields")
        else:
            tokens, prompt_len = _encode(tokenizer, line, special=True), 0
        if max_length is not None and len(tokens) > max_length:
            truncated += 1
            tokens = tokens[:max_length]
        examples.append(Example(tuple(tokens), min(prompt_len, len(tokens)), number))
    if not examples:
        raise DataError(f"{path}: task file is empty")
    if truncated:
        warnings.warn(f"{path}: {truncated} samples truncated to {max_length} tokens", stacklevel=2)
    return Task(name, tuple(examples), str(path))


def bucket_length(length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket ≥ ``length`` (or ``length`` itself beyond the largest bucket)."""
    for b in sorted(buckets):
        if b >= length:
            return b
    return length


def make_batch(examples: Sequence[Example], batch_size: int, seq_len: int, *, pad_id: int = 0, side: str = "right") -> Batch:
    """Pad examples to ``[batch_size, seq_len]``; rows beyond ``len(examples)`` are filler."""
    if side not in ("left", "right"):
        raise ValueError("side must be 'left' or 'right'")
    ids = np.full((batch_size, seq_len), pad_id, np.int32)
    mask = np.zeros((batch_size, seq_len), np.int32)
    labels = np.full((batch_size, seq_len), IGNORE, np.int32)
    sample_ids = np.full((batch_size,), -1, np.int64)
    for row, ex in enumerate(examples):
        n = len(ex.tokens)
        start = seq_len - n if side == "left" else 0
        ids[row, start : start + n] = ex.tokens
        mask[row, start : start + n] = 1
        labels[row, start + ex.prompt_len : start + n] = ex.tokens[ex.prompt_len :]
        sample_ids[row] = ex.sample_id
    return Batch(ids, mask, labels, sample_ids)


def batches(
    task: Task,
    batch_size: int,
    *,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    pad_id: int = 0,
    side: str = "right",
    vocab_size: int | None = None,
) -> Iterator[Batch]:
    """Consecutive batches of a task, each padded to its bucket length and to ``batch_size``.

    When ``vocab_size`` is given, token ids outside it raise :class:`DataError` naming the file
    and sample.
    """
    if len(task) == 0:
        raise DataError(f"task {task.name!r} ({task.source}) has no samples")
    if vocab_size is not None:
        for ex in task.examples:
            if ex.tokens and (max(ex.tokens) >= vocab_size or min(ex.tokens) < 0):
                bad = next(t for t in ex.tokens if t >= vocab_size or t < 0)
                raise DataError(
                    f"{task.source}: sample {ex.sample_id} has token id {bad}, outside the model's vocabulary "
                    f"(size {vocab_size})"
                )
    for start in range(0, len(task), batch_size):
        chunk = task.examples[start : start + batch_size]
        longest = max(max(len(ex.tokens) for ex in chunk), 1)
        yield make_batch(chunk, batch_size, bucket_length(longest, buckets), pad_id=pad_id, side=side)


def num_active_tokens(labels: np.ndarray) -> np.ndarray:
    """``T_i``: predicted tokens per sample, i.e. labels ≠ -100 after the one-token shift."""
    return (np.asarray(labels)[..., 1:] != IGNORE).sum(-1)
