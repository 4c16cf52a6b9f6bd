"""Deterministic generators of the demo's two tasks, written as ``{"prompt", "completion"}`` jsonl.

- ``math``: multi-digit addition. Each operand independently has 1, 2 or 3 digits (uniform),
  then a uniform value with that many digits (1 digit: 0–9); prompt ``"a+b="``, completion the
  decimal sum (1–4 digits). Carries must be computed before the leading digits are written, so
  the model needs an arithmetic circuit.
- ``copy``: a segment of 6–16 *distinct* lowercase letters (uniform length), then ``"|"``;
  completion the same segment. Distinct letters make the next token a pure look-up — find the
  current letter in the first copy and read the one after it — which is what induction heads do.

Samples are drawn with ``numpy.random.default_rng(seed)`` in vectorised batches; duplicates and
prompts in ``exclude`` are dropped, so a training set can be made disjoint from a held-out set.
"""

from __future__ import annotations

import functools
import json
import string
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from fisherjax.errors import DataError

MAX_OPERAND_DIGITS = 3
COPY_LENGTHS = (6, 16)
SEPARATOR = "|"
LETTERS = np.array(list(string.ascii_lowercase))


def _math_draw(rng: np.random.Generator, n: int) -> list[dict]:
    digits = rng.integers(1, MAX_OPERAND_DIGITS + 1, size=(n, 2))
    low = np.where(digits == 1, 0, 10 ** (digits - 1))
    operands = rng.integers(low, 10**digits)
    return [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in operands.tolist()]


def _copy_draw(rng: np.random.Generator, n: int, lengths: tuple[int, int] = COPY_LENGTHS) -> list[dict]:
    lengths = rng.integers(lengths[0], lengths[1] + 1, size=n)
    # A random permutation of the alphabet per row; its first `length` letters are distinct.
    order = rng.permuted(np.tile(np.arange(len(LETTERS)), (n, 1)), axis=1)
    segments = ["".join(LETTERS[row[:length]]) for row, length in zip(order, lengths)]
    return [{"prompt": segment + SEPARATOR, "completion": segment} for segment in segments]


GENERATORS: dict[str, Callable[[np.random.Generator, int], list[dict]]] = {"math": _math_draw, "copy": _copy_draw}


def generate(
    task: str,
    n: int,
    seed: int,
    *,
    exclude: Iterable[str] = (),
    distinct: bool = True,
    copy_lengths: tuple[int, int] = COPY_LENGTHS,
) -> list[dict]:
    """``n`` records of ``task`` whose prompts are not in ``exclude``; deterministic in ``seed``.

    With ``distinct`` every prompt occurs once (a held-out file); without it, prompts repeat at
    their natural rate (a training stream: 1-digit sums are common, there being only 100).
    ``copy_lengths``: the (min, max) segment length of ``copy`` (at most 26, the letters being distinct).
    """
    if task not in GENERATORS:
        raise DataError(f"unknown demo task {task!r} (known: {', '.join(GENERATORS)})")
    if not 1 <= copy_lengths[0] <= copy_lengths[1] <= len(LETTERS):
        raise DataError(f"copy lengths {copy_lengths} must satisfy 1 ≤ min ≤ max ≤ {len(LETTERS)}")
    draw = functools.partial(_copy_draw, lengths=copy_lengths) if task == "copy" else GENERATORS[task]
    rng = np.random.default_rng(seed)
    seen = set(exclude)
    records: list[dict] = []
    for _attempt in range(1000):
        for record in draw(rng, max(2 * (n - len(records)), 64)):
            if record["prompt"] not in seen:
                if distinct:
                    seen.add(record["prompt"])
                records.append(record)
                if len(records) == n:
                    return records
    raise DataError(f"demo task {task!r} cannot yield {n} samples outside the excluded set")


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """One JSON object per line (``prompt`` and ``completion``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a jsonl file (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
