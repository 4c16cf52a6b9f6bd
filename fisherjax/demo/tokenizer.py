"""The demo's character-level tokenizer, built with the ``tokenizers`` library.

Every character of :data:`ALPHABET` is one token and one token is one character, so a prompt
encoded with ``add_special_tokens=True`` (which prepends ``<bos>``) followed by a completion
encoded with ``add_special_tokens=False`` is exactly the token sequence of the concatenated
text: no normaliser, no whitespace stripping, no merges. Special tokens come first:
``<pad>=0, <bos>=1, <eos>=2, <unk>=3``; unknown characters become ``<unk>``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
ALPHABET = string.digits + string.ascii_lowercase + "+=| \n"
"""Ordinary tokens, in id order after the special tokens."""


def vocabulary() -> dict[str, int]:
    """``{token: id}``: the special tokens, then one token per character of :data:`ALPHABET`."""
    return {token: index for index, token in enumerate((*SPECIAL_TOKENS, *ALPHABET))}


def build_tokenizer():
    """A ``transformers`` fast tokenizer with pad/bos/eos/unk set (not yet saved).

    The backend is a ``tokenizers`` WordLevel model behind a pre-tokenizer that isolates every
    character (``[\\s\\S]`` so that spaces and newlines are tokens too), a ``Fuse`` decoder (so
    ``decode`` joins characters without spaces) and a template post-processor that prepends
    ``<bos>`` when ``add_special_tokens=True``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=64,
    )


def save_tokenizer(directory: str | Path):
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` to ``directory``; returns the tokenizer.

    ``tokenizer_class`` is written as ``PreTrainedTokenizerFast`` (transformers 5 writes its new
    backend name, which transformers 4 cannot resolve); both versions load it from ``tokenizer.json``.
    """
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(directory))
    config_file = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return tokenizer
