"""Task data → padded :class:`Batch` arrays.

A task is a list of :class:`Example` (token ids, how many leading tokens are prompt, a stable
sample id). Sources: a list of texts, a ``.jsonl`` file (field ``text``, or ``prompt`` +
``completion`` with the prompt's labels masked, or pre-tokenised ``input_ids`` with optional
Hugging Face ``labels``), a ``.txt`` file (one text per line), or token arrays. Sample ids are the 0-based line numbers of the file (or list indices), so they survive
filtering and reordering.

Labels follow Hugging Face's convention: ``labels`` is aligned with ``input_ids`` and the loss
shifts by one (position ``t`` predicts ``labels[t + 1]``); ``-100`` marks tokens that are not
predicted (prompt and padding). A label counts only when the position that predicts it is a real
token (:func:`predicted_labels`), so the first token of a sample is never a target and left
padding, right padding and no padding give the same losses, ``T_i`` and Fisher. Sequences are
padded to a few fixed bucket lengths and every batch to the full batch size with filler rows
(``sample_id = -1``, no real tokens), so a jitted function sees a handful of shapes, not one per
length.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fisherjax.errors import ConfigError, DataError

IGNORE = -100
"""Label value of tokens that carry no loss."""

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

TASK_FORMATS = (".jsonl", ".txt")
"""Suffixes of task files :func:`load_task` reads (in any case)."""


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

    def pieces(self, rows: int) -> list[Batch]:
        """The batch cut into consecutive pieces of ``rows`` rows (the last one shorter), in order."""
        return [Batch(*(np.asarray(x)[first : first + rows] for x in self)) for first in range(0, len(self.sample_ids), rows)]


@dataclasses.dataclass(frozen=True)
class Example:
    """One sample: its tokens, the number of leading prompt tokens (not predicted), its id,
    whether its tokens were cut to a length limit (:func:`load_task`), and ``scored``: per token,
    whether it is a target (a pre-tokenised sample's ``labels ≠ -100``), aligned with ``tokens``;
    None means every token after the prompt. The first token is never a target either way."""

    tokens: tuple[int, ...]
    prompt_len: int
    sample_id: int
    truncated: bool = False
    scored: tuple[bool, ...] | None = None

    @property
    def num_targets(self) -> int:
        """Tokens the loss predicts: positions from ``max(prompt_len, 1)`` on, those ``scored``."""
        first = max(self.prompt_len, 1)
        if self.scored is None:
            return max(len(self.tokens) - first, 0)
        return sum(bool(x) for x in self.scored[first:])


@dataclasses.dataclass(frozen=True)
class Task:
    """A named list of examples, with the file it came from (for error messages)."""

    name: str
    examples: tuple[Example, ...]
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def truncated(self) -> tuple[int, ...]:
        """Sample ids of the examples whose tokens were cut to a length limit (for results.json)."""
        return tuple(e.sample_id for e in self.examples if e.truncated)

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


_LINE_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f]")
"""C0 control characters a line of a task file may not hold (tab is text)."""
_STRING_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
"""C0 control characters a JSON string may not hold (tab, newline and carriage return are text)."""


def _check_controls(text: str, pattern: re.Pattern, where: str, what: str, allowed: str) -> None:
    found = pattern.search(text)
    if found is None:
        return
    char = found.group()
    kind = "a NUL byte" if char == "\x00" else f"control character U+{ord(char):04X}"
    raise DataError(f"{where}: {what} contains {kind} (character {found.start() + 1}); task text may hold no control characters but {allowed}, so remove it")


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _string_field(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {_json_type(value)}; write it as a JSON string")
    _check_controls(value, _STRING_CONTROL, where, f"field {key!r}", "tab, newline and carriage return")
    return value


def _check_limits(max_length: int | None, max_positions: int | None) -> None:
    for option, value in (("max_length", max_length), ("max_positions", max_positions)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ConfigError(f"{option} must be a positive number of tokens, got {value!r}")


def _fit(tokens: list[int], where: str, *, max_length: int | None, max_positions: int | None, truncate: bool) -> tuple[list[int], bool]:
    """``tokens`` cut to ``max_length``, then checked against ``max_positions`` (see :func:`load_task`);
    returns the tokens and whether they were cut."""
    cut = False
    if max_length is not None and len(tokens) > max_length:
        tokens, cut = tokens[:max_length], True
    if max_positions is not None and len(tokens) > max_positions:
        if not truncate:
            raise DataError(
                f"{where}: the sample has {len(tokens)} tokens, more than the model's {max_positions} positions; "
                "shorten it, or allow cutting it (--truncate, truncate=True)"
            )
        tokens, cut = tokens[:max_positions], True
    return tokens, cut


def _warn_truncated(source: str, examples: Sequence[Example]) -> None:
    ids = [e.sample_id for e in examples if e.truncated]
    if ids:
        more = ", ..." if len(ids) > 10 else ""
        warnings.warn(f"{source}: {len(ids)} sample(s) cut to the length limit (ids {', '.join(map(str, ids[:10]))}{more})", stacklevel=3)


def task_from_texts(
    name: str,
    texts: Sequence[str],
    tokenizer,
    *,
    max_length: int | None = None,
    max_positions: int | None = None,
    truncate: bool = False,
) -> Task:
    """A task whose every token after the first is predicted; lengths as in :func:`load_task`."""
    _check_limits(max_length, max_positions)
    if not texts:
        raise DataError(f"task {name!r} is empty")
    examples = []
    for i, text in enumerate(texts):
        where = f"task {name!r}, text {i}"
        if not isinstance(text, str):
            raise DataError(f"{where}: must be a string, got {type(text).__name__}")
        _check_controls(text, _STRING_CONTROL, where, "the text", "tab, newline and carriage return")
        tokens, cut = _fit(_encode(tokenizer, text, special=True), where, max_length=max_length, max_positions=max_positions, truncate=truncate)
        examples.append(Example(tuple(tokens), 0, i, cut))
    _warn_truncated(f"task {name!r}", examples)
    return Task(name, tuple(examples))


def task_from_tokens(name: str, tokens: Sequence[Sequence[int]], *, prompt_lens: Sequence[int] | None = None,
                     labels: Sequence[Sequence[int]] | None = None) -> Task:
    """A task from token id arrays (ids 0..n-1); ``labels``: per sample, Hugging Face labels as
    in a pre-tokenised task file (:func:`load_task`: the token id where scored, ``-100`` elsewhere)."""
    if len(tokens) == 0:
        raise DataError(f"task {name!r} is empty")
    prompt_lens = prompt_lens if prompt_lens is not None else [0] * len(tokens)
    labels = labels if labels is not None else [None] * len(tokens)
    examples = []
    for i, (seq, p, lab) in enumerate(zip(tokens, prompt_lens, labels, strict=True)):
        seq = [int(t) for t in seq]
        scored = None if lab is None else tuple(scored_tokens(seq, list(lab), f"task {name!r}, sample {i}"))
        examples.append(Example(tuple(seq), int(p), i, scored=scored))
    return Task(name, tuple(examples))


class MissingTokenizer(DataError):
    """A text sample met without a tokenizer to encode it; ``where`` names its ``file:line``."""

    def __init__(self, where: str):
        self.where = where
        super().__init__(f"{where}: a text sample, but there is no tokenizer to encode it; give pre-tokenised "
                         "'input_ids' or a tokenizer")


TEXT_FIELDS = ("text", "prompt", "completion")
"""The fields of a text sample in a ``.jsonl`` task file (a pre-tokenised one has ``input_ids``)."""


def _token_ids(value, where: str, vocab_size: int | None) -> list[int]:
    """``input_ids`` of a line checked: a non-empty array of integer ids in the vocabulary."""
    if not isinstance(value, list) or not value:
        got = "an empty array" if value == [] else _json_type(value)
        raise DataError(f"{where}: field 'input_ids' must be a non-empty array of integer token ids, got {got}")
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int):
            raise DataError(f"{where}: input_ids[{i}] is {json.dumps(t)}, not an integer token id")
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            bound = f"0..{vocab_size - 1}" if vocab_size is not None else "≥ 0"
            raise DataError(f"{where}: input_ids[{i}] = {t} is outside the model's vocabulary (ids {bound})")
    return value


def scored_tokens(ids: Sequence[int], labels, where: str) -> list[bool]:
    """Which tokens Hugging Face ``labels`` score: ``labels[t] == ids[t]`` (scored) or ``-100`` (not).

    The labels are aligned with the ids, unshifted (the model shifts: position ``t − 1`` predicts
    ``labels[t]``), as ``labels = input_ids`` with ``-100`` masking in Hugging Face's causal LMs.
    Any other value — a label shifted by one already, another token — is refused, since it would
    silently score the wrong targets.
    """
    if not isinstance(labels, list):
        raise DataError(f"{where}: field 'labels' must be an array of token ids or -100, got {_json_type(labels)}")
    if len(labels) != len(ids):
        raise DataError(f"{where}: 'labels' has {len(labels)} entries and 'input_ids' {len(ids)}; give one label per input id "
                        "(the id itself where scored, -100 where not)")
    for t, (label, token) in enumerate(zip(labels, ids)):
        if isinstance(label, bool) or not isinstance(label, int) or label not in (token, IGNORE):
            raise DataError(f"{where}: labels[{t}] is {json.dumps(label)} but input_ids[{t}] is {token}; a label is the input id "
                            "(scored) or -100 (not scored), unshifted: the model shifts, as in Hugging Face's labels")
    return [label != IGNORE for label in labels]


def _token_record(record: dict, where: str, vocab_size: int | None) -> tuple[list[int], list[bool] | None]:
    """A pre-tokenised line's ids and which of them are scored (None: every one after the first)."""
    mixed = [k for k in TEXT_FIELDS if k in record]
    if mixed:
        raise DataError(f"{where}: a line holds pre-tokenised 'input_ids' or text fields, not both (it also has {mixed[0]!r})")
    ids = _token_ids(record["input_ids"], where, vocab_size)
    return ids, (scored_tokens(ids, record["labels"], where) if "labels" in record else None)


def _read_lines(path: Path) -> list[str]:
    """The file's lines (split at ``\\n`` only, a trailing ``\\r`` dropped, a UTF-8 BOM ignored)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read the task file ({err.strerror}); check its permissions") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {err.start}); save the task file as UTF-8") from None
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def load_task(
    path: str | Path,
    tokenizer,
    *,
    name: str | None = None,
    max_length: int | None = None,
    max_positions: int | None = None,
    truncate: bool = False,
    vocab_size: int | None = None,
) -> Task:
    """Read a task file: ``.jsonl`` or ``.txt`` (suffix in any case); nothing else is accepted.

    ``.jsonl``: one JSON object per line with a ``text`` string, or ``prompt`` and ``completion``
    strings (the prompt encoded with special tokens and not predicted, the completion without), or
    pre-tokenised ``input_ids`` (integer ids, used as they are: no special tokens are added) with
    optional ``labels`` of the same length, Hugging Face's: the id where the token is scored,
    ``-100`` where not (:func:`scored_tokens`; without ``labels`` every token after the first is
    scored). A file holds text lines or pre-tokenised lines, not both. ``tokenizer`` may be None
    when every line is pre-tokenised; ``vocab_size`` (the model's) bounds the ids.
    ``.txt``: one text per line. Lines are split at ``\\n`` only (``\\r\\n`` endings and a UTF-8
    BOM are accepted); blank lines are skipped; sample ids are 0-based line numbers.

    Lengths: a sample is first cut to ``max_length`` tokens (the user's own limit,
    ``--max-length``). If it is then still longer than ``max_positions`` (the model's maximum
    positions, ``model.config.max_position_embeddings``), it is refused naming its line, unless
    ``truncate=True``, which cuts it to ``max_positions``. So ``max_length`` never hides the
    model's limit; samples cut by either rule are marked (``Example.truncated``,
    :attr:`Task.truncated` lists their ids) and a warning counts them.

    Raises:
      DataError: with a one-line message naming the file (and ``file:line``): a missing,
        unreadable or non-UTF-8 file; another suffix; malformed JSON, a line that is not an
        object, a missing field, a field that is not a string; ``input_ids`` that are not a
        non-empty array of integers in the vocabulary, ``labels`` of another length or with a value
        other than the id or -100, a line with both ids and text, a file mixing the two kinds; a
        text sample without a tokenizer (:class:`MissingTokenizer`); a NUL byte or another C0 control
        character (tab is allowed, and newline and carriage return inside JSON strings); a sample
        longer than ``max_positions`` without ``truncate``; a file with no samples.
      ConfigError: ``max_length`` or ``max_positions`` not a positive integer.
    """
    _check_limits(max_length, max_positions)
    path = Path(path)
    name = name or path.stem
    if not path.exists():
        raise DataError(f"{path}: task file does not exist; check the path")
    if path.is_dir():
        raise DataError(f"{path}: task file is a directory; give a .jsonl or .txt file")
    suffix = path.suffix.lower()
    if suffix not in TASK_FORMATS:
        raise DataError(
            f"{path}: unsupported task file format {repr(path.suffix) if path.suffix else '(no suffix)'}; use .jsonl (one JSON object per line "
            "with 'text', or 'prompt' and 'completion') or .txt (one text per line)"
        )
    examples = []
    first_of_kind: dict[bool, int] = {}  # pre-tokenised? → the first line of that kind
    for number, line in enumerate(_read_lines(path)):
        where = f"{path}:{number + 1}"
        _check_controls(line, _LINE_CONTROL, where, "the line", "tab")
        if not line.strip():
            continue
        scored = None
        if suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON ({err.msg}, column {err.colno}); write one JSON object per line") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {_json_type(record)}; write one object per line")
            tokenised = "input_ids" in record
            other = first_of_kind.get(not tokenised)
            if other is not None:
                kinds = ("text", "pre-tokenised") if tokenised else ("pre-tokenised", "text")
                raise DataError(f"{where}: a {kinds[1]} line in a file of {kinds[0]} lines (line {other}); a task file holds one kind")
            first_of_kind.setdefault(tokenised, number + 1)
            if not tokenised and "labels" in record:
                raise DataError(f"{where}: field 'labels' goes with pre-tokenised 'input_ids' only")
            if not tokenised and tokenizer is None:
                raise MissingTokenizer(where)
            if tokenised:
                tokens, scored = _token_record(record, where, vocab_size)
                prompt_len = 0
            elif "prompt" in record and "completion" in record:
                prompt = _encode(tokenizer, _string_field(record, "prompt", where), special=True)
                completion = _encode(tokenizer, _string_field(record, "completion", where), special=False)
                tokens, prompt_len = prompt + completion, len(prompt)
            elif "text" in record:
                tokens, prompt_len = _encode(tokenizer, _string_field(record, "text", where), special=True), 0
            else:
                raise DataError(f"{where}: needs a 'text' field or 'prompt' and 'completion' fields (or pre-tokenised 'input_ids')")
        else:
            if tokenizer is None:
                raise MissingTokenizer(where)
            tokens, prompt_len = _encode(tokenizer, line, special=True), 0
        tokens, cut = _fit(tokens, where, max_length=max_length, max_positions=max_positions, truncate=truncate)
        scored = None if scored is None else tuple(scored[: len(tokens)])
        examples.append(Example(tuple(tokens), min(prompt_len, len(tokens)), number, cut, scored))
    if not examples:
        raise DataError(f"{path}: task file is empty (no non-blank lines); add one sample per line")
    _warn_truncated(str(path), examples)
    return Task(name, tuple(examples), str(path))


def check_targets(task: Task, max_length: int | None = None) -> None:
    """Refuse a task none of whose samples has a token to predict (every token prompt or masked),
    before any compute: naming the file, and ``--max-length`` (``max_length``) when ``--truncate``
    cut the samples. Called on the samples a command will use (after ``--max-samples``)."""
    if any(e.num_targets for e in task.examples):
        return
    cut = len(task.truncated)
    hint = (f"; --truncate cut {cut} of them to --max-length {max_length} (or the model's positions): raise --max-length"
            if cut else ": give each sample a completion, or labels other than -100")
    raise DataError(f"{task.source}: none of the {len(task)} samples of task {task.name!r} has a token to predict "
                    f"(every token is prompt or masked){hint}")


def bucket_length(length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket ≥ ``length`` (or ``length`` itself beyond the largest bucket)."""
    for b in sorted(buckets):
        if b >= length:
            return b
    return length


def even_rows(n: int, most: int) -> int:
    """Rows of each of the fewest batches of at most ``most`` rows that hold ``n`` rows, as even
    as they can be, ``⌈n / ⌈n / most⌉⌉``: 16 rows at most 9 a batch go as 8 + 8, not as 9 and 7
    padded to 9."""
    return -(-n // -(-n // max(1, min(most, n))))


def micro_batch_rows(n: int, size: int, multiple: int = 1) -> int:
    """Rows of every micro-batch :func:`micro_batches` cuts a batch of ``n`` rows into: the fewest
    of at most ``size`` rows, made even (:func:`even_rows`), rounded up to a multiple of
    ``multiple``."""
    return -(-even_rows(n, size) // multiple) * multiple


def micro_batches(batch: Batch, size: int, multiple: int = 1) -> Iterator[Batch]:
    """Split a batch into consecutive micro-batches of :func:`micro_batch_rows` rows (at most
    ``size``, unless ``multiple`` rounds them up), the last one padded with filler (sample id −1,
    labels ignored, no tokens) to the same width, as is a batch smaller than ``multiple`` (a
    mesh's ``"data"`` size); micro-batches of filler alone are left out."""
    n = batch.input_ids.shape[0]
    width = micro_batch_rows(n, size, multiple)
    if width == n:
        yield batch
        return
    for start in range(0, n, width):
        rows = np.arange(start, min(start + width, n))
        if np.all(batch.sample_ids[rows] < 0):
            continue
        pad = width - len(rows)
        take = lambda x, fill: np.concatenate([x[rows], np.full((pad, *x.shape[1:]), fill, x.dtype)])  # noqa: E731
        yield Batch(take(batch.input_ids, 0), take(batch.attention_mask, 0), take(batch.labels, IGNORE), take(batch.sample_ids, -1))


def batch_chunks(task: Task, batch_size: int) -> Iterator[tuple[tuple[Example, ...], int]]:
    """``(examples, longest)`` of each batch as :func:`batches` cuts a task: consecutive
    ``batch_size`` samples and the token count of the longest (at least 1)."""
    for start in range(0, len(task), batch_size):
        chunk = task.examples[start : start + batch_size]
        yield chunk, max(max(len(ex.tokens) for ex in chunk), 1)


def run_buckets(tasks: Iterable[Task], batch_size: int, buckets: Sequence[int] = DEFAULT_BUCKETS, *,
                row_cost: Callable[[int], float] = float, free: float = 0.0) -> tuple[int, ...]:
    """The lengths a run pads its batches to (``batches(..., buckets=run_buckets(...))``): each
    batch's own bucket, except that a length ``L`` held by ``n_L`` batches (with those of the
    smaller lengths folded into it) is folded into the next larger length in use, ``L'``, when the
    work that adds is at most one batch's at ``L'``, or at most ``free``:
    ``n_L · B · (c(L') − c(L)) ≤ max(B · c(L'), free)``, ``B = batch_size``, ``c = row_cost`` (a
    row's work at a length; by default its positions, with ``free`` 0).

    Every length is a shape that every phase reading the batches compiles, and XLA takes many
    times longer to compile a step than to run it, so one more step at a shape compiled anyway is
    the cheaper side of the trade; ``free`` is work cheaper than any compilation (on a small model
    a batch's work is far below its compile time). A length is folded only into a larger one in
    use, so the longest batch, and with it the memory of the largest step, stay as they were.
    ``tasks``: the run's tasks in the order of their batches (consecutive ``batch_size`` samples,
    as :func:`batches` cuts them)."""
    counts: dict[int, int] = {}
    for task in tasks:
        for _, longest in batch_chunks(task, batch_size):
            length = bucket_length(longest, buckets)
            counts[length] = counts.get(length, 0) + 1
    lengths, kept, carried = sorted(counts), [], 0
    for length, larger in zip(lengths, lengths[1:] + [None]):
        held = counts[length] + carried
        folds = larger is not None and held * batch_size * (row_cost(larger) - row_cost(length)) <= max(batch_size * row_cost(larger), free)
        carried = held if folds else 0
        if not folds:
            kept.append(length)
    return tuple(kept)


def make_batch(examples: Sequence[Example], batch_size: int, seq_len: int, *, pad_id: int = 0, side: str = "right") -> Batch:
    """Pad examples to ``[batch_size, seq_len]``; rows beyond ``len(examples)`` are filler.

    The labels of a sample are its tokens after the prompt (or those :attr:`Example.scored` marks),
    except its first token, which no real token predicts: the labels are the same whichever
    ``side`` the padding is on.
    """
    if side not in ("left", "right"):
        raise ValueError("side must be 'left' or 'right'")
    if len(examples) > batch_size:
        raise ValueError(f"{len(examples)} examples do not fit a batch of {batch_size}")
    ids = np.full((batch_size, seq_len), pad_id, np.int32)
    mask = np.zeros((batch_size, seq_len), np.int32)
    labels = np.full((batch_size, seq_len), IGNORE, np.int32)
    sample_ids = np.full((batch_size,), -1, np.int64)
    for row, ex in enumerate(examples):
        n = len(ex.tokens)
        if n > seq_len:
            raise ValueError(f"sample {ex.sample_id} has {n} tokens, more than the batch's {seq_len} positions")
        start = seq_len - n if side == "left" else 0
        first = max(ex.prompt_len, 1)
        ids[row, start : start + n] = ex.tokens
        mask[row, start : start + n] = 1
        if ex.scored is None:
            labels[row, start + first : start + n] = ex.tokens[first:]
        else:
            labels[row, start + 1 : start + n] = np.where(ex.scored[1:], ex.tokens[1:], IGNORE)
        sample_ids[row] = ex.sample_id
    return Batch(ids, mask, labels, sample_ids)


def batches(
    task: Task,
    batch_size: int,
    *,
    buckets: Sequence[int] | None = None,
    pad_id: int = 0,
    side: str = "right",
    vocab_size: int | None = None,
) -> Iterator[Batch]:
    """Consecutive batches of a task, each padded to its bucket length and to ``batch_size``.

    ``buckets``: the lengths a batch may be padded to (the smallest one at least its longest
    sample); None for :func:`run_buckets` of this task alone — :data:`DEFAULT_BUCKETS`, with a
    length few batches hold folded into the next (a compiled shape fewer).

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
    lengths = run_buckets([task], batch_size) if buckets is None else buckets
    for chunk, longest in batch_chunks(task, batch_size):
        yield make_batch(chunk, batch_size, bucket_length(longest, lengths), pad_id=pad_id, side=side)


def predicted_labels(labels, attention_mask):
    """The labels that count: ``labels[t]`` where positions ``t − 1`` and ``t`` are both real tokens
    (``attention_mask`` 1), ``IGNORE`` elsewhere (so always at ``t = 0``).

    A target predicted from a padding position, or a label on a padding position, never counts;
    this makes left, right and no padding give the same losses, ``T_i`` and Fisher, also for a
    :class:`Batch` built by hand. ``labels``, ``attention_mask``: ``[..., seq]`` numpy or jax arrays
    (inside ``jit`` too); the result has the type and dtype of ``labels``.
    """
    xp = jnp if isinstance(labels, jax.Array) or isinstance(attention_mask, jax.Array) else np
    labels = xp.asarray(labels)
    real = xp.asarray(attention_mask) != 0
    keep = xp.concatenate([xp.zeros_like(real[..., :1]), real[..., 1:] & real[..., :-1]], axis=-1)
    return xp.where(keep, labels, xp.full_like(labels, IGNORE))


def num_active_tokens(labels, attention_mask=None):
    """``T_i``: predicted tokens per sample, i.e. labels ≠ -100 after the one-token shift.

    With ``attention_mask``, only the labels that count (:func:`predicted_labels`); without it the
    labels are taken as they are (e.g. already masked, or from :func:`make_batch`). Numpy or jax
    arrays (inside ``jit`` too).
    """
    if attention_mask is not None:
        labels = predicted_labels(labels, attention_mask)
    elif not isinstance(labels, jax.Array):
        labels = np.asarray(labels)
    return (labels[..., 1:] != IGNORE).sum(-1)
