"""Probe batches for the head scores, drawn from the model's own vocabulary (no external data).

* :func:`random_probe` — ``n`` sequences of uniformly random ordinary tokens, all the same length
  (previous-token, current-token, first-position and positional scores);
* :func:`induction_probe` — ``n`` sequences of random tokens repeated once,
  ``[BOS] t_1 … t_L t_1 … t_L`` (duplicate and induction scores, and the induction loss);
* :func:`ordinary_tokens` — the token ids they draw from (also the copying score's probe tokens).

Ordinary tokens are the ids below both the model's and the tokenizer's vocabulary size that are
not special tokens of the tokenizer; for a model without a tokenizer, every id of the model's
vocabulary except the config's pad / bos / eos ids. A BOS token (the tokenizer's, else the
config's) is prepended when there is one. Sequences never exceed the model's
``max_position_embeddings``: a longer request is shortened to fit. Every probe is seeded; a user
can pass their own :class:`~fisherjax.data.Batch` instead.
"""

from __future__ import annotations

import numpy as np

from fisherjax.data import IGNORE, Batch
from fisherjax.errors import ConfigError


def ordinary_tokens(model) -> np.ndarray:
    """Sorted ids of the tokens a probe may use (see the module docstring)."""
    vocab = model.config.vocab_size
    tokenizer = model.tokenizer
    if tokenizer is not None:
        vocab = min(vocab, len(tokenizer))
        special = set(int(i) for i in tokenizer.all_special_ids)
    else:
        cfg = model.config
        special = {i for i in (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) if i is not None}
    ids = np.setdiff1d(np.arange(vocab), np.fromiter(special, np.int64, len(special)))
    if ids.size < 2:
        raise ConfigError(f"the vocabulary has {ids.size} ordinary token(s); a head probe needs at least 2")
    return ids


def bos_token(model) -> int | None:
    """The id prepended to every probe: the tokenizer's BOS, else the config's, else None."""
    tokenizer = model.tokenizer
    bos = tokenizer.bos_token_id if tokenizer is not None else model.config.bos_token_id
    return None if bos is None or not 0 <= int(bos) < model.config.vocab_size else int(bos)


def probe_tokens(model, tokens=None) -> np.ndarray:
    """The ids a probe draws from: ``tokens`` (checked against the vocabulary; e.g. the tokens a
    toy model was trained on) or, by default, :func:`ordinary_tokens`."""
    if tokens is None:
        return ordinary_tokens(model)
    ids = np.unique(np.asarray(tokens, np.int64).ravel())
    if ids.size < 2:
        raise ConfigError(f"head probes need at least 2 distinct tokens, got {ids.size}")
    if ids.min() < 0 or ids.max() >= model.config.vocab_size:
        raise ConfigError(f"probe token ids must lie in [0, {model.config.vocab_size}), got {int(ids.min())}..{int(ids.max())}")
    return ids


def random_probe(model, *, n: int = 16, length: int = 64, seed: int = 0, tokens=None) -> Batch:
    """``n`` sequences ``[BOS] x_1 … x_length`` with ``x_i`` uniform over :func:`probe_tokens`
    (independent, with replacement), no padding. Labels are the input ids."""
    tokens = probe_tokens(model, tokens)
    bos = bos_token(model)
    length = _fit(model, length, copies=1, bos=bos)
    rng = np.random.default_rng([seed, 0])
    body = rng.choice(tokens, size=(n, length))
    ids = _with_bos(body, bos)
    return Batch(ids, np.ones_like(ids), ids.copy(), np.arange(n, dtype=np.int64))


def induction_probe(model, *, n: int = 16, length: int = 32, seed: int = 0, tokens=None) -> Batch:
    """``n`` sequences ``[BOS] t_1 … t_L t_1 … t_L`` of random ordinary tokens, no padding.

    The ``L = length`` tokens of a sequence are distinct when the vocabulary has that many ordinary
    tokens (else drawn with replacement). Labels are the second copy from its second token on —
    what an induction mechanism predicts — and :data:`~fisherjax.data.IGNORE` before. ``tokens``:
    the ids to draw from (:func:`probe_tokens`).
    """
    tokens = probe_tokens(model, tokens)
    bos = bos_token(model)
    length = _fit(model, length, copies=2, bos=bos)
    rng = np.random.default_rng([seed, 1])
    if tokens.size >= length:
        order = np.argsort(rng.random((n, tokens.size)), axis=1)[:, :length]
        body = tokens[order]
    else:
        body = rng.choice(tokens, size=(n, length))
    ids = _with_bos(np.concatenate([body, body], axis=1), bos)
    labels = np.where(np.arange(ids.shape[1]) >= ids.shape[1] - length + 1, ids, IGNORE).astype(np.int32)
    return Batch(ids, np.ones_like(ids), labels, np.arange(n, dtype=np.int64))


def _fit(model, length: int, *, copies: int, bos: int | None) -> int:
    """``length`` shortened so that ``copies`` copies plus BOS fit in the model's positions."""
    room = (model.config.max_position_embeddings - (bos is not None)) // copies
    length = min(int(length), room)
    if length < 2:
        raise ConfigError(f"a head probe needs sequences of at least 2 tokens (the model has room for {room})")
    return length


def _with_bos(body: np.ndarray, bos: int | None) -> np.ndarray:
    body = body.astype(np.int32)
    if bos is None:
        return body
    return np.concatenate([np.full((body.shape[0], 1), bos, np.int32), body], axis=1)
