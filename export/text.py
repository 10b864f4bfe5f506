"""Prompts and tokenizers of `hypermoe generate` (export/generate.py runs the graph): a Hugging Face tokenizer.json read
by the `tokenizers` package (optional extra `serve`), or UTF-8 bytes for a model whose vocabulary is the 256 bytes,
and token ids given as text."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

MAX_TOKENIZER_BYTES = 256 << 20  # tokenizer.json files run to tens of MB (large vocabularies); refuse more
TOKENIZER_FILE = "tokenizer.json"  # Hugging Face's name, in a model or export folder
BYTE_VOCAB = 256  # a vocabulary of UTF-8 bytes: the only one the byte tokenizer fits


class ByteTokenizer:
    """Text ↔ ids as UTF-8 bytes (ids 0..255): the vocabulary `hypermoe train` models. An id ≥ 256 (a model
    with a larger vocabulary) and a partial UTF-8 sequence decode to U+FFFD, never an error."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(bytes([i]) if 0 <= i < 256 else "\ufffd".encode() for i in ids).decode("utf-8", errors="replace")


class FileTokenizer:
    """A Hugging Face tokenizer.json, read by the `tokenizers` package (no Python code runs from the file)."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_dir():  # a model's folder: its tokenizer.json
            if not (path / TOKENIZER_FILE).is_file():
                raise ValueError(f"{path} is a directory without a {TOKENIZER_FILE} (--tokenizer takes a "
                                 f"{TOKENIZER_FILE}, or a directory holding one)")
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (--tokenizer takes a tokenizer.json)")
        if path.stat().st_size > MAX_TOKENIZER_BYTES:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, more than a tokenizer.json "
                             f"({MAX_TOKENIZER_BYTES >> 20} MiB at most)")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError("--tokenizer needs the tokenizers package: pip install 'hypermoe[serve]'") from None
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception with serde's message
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path}: not a tokenizer.json the tokenizers package can read ({message})") from None
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.path = path

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)



def model_tokenizer(model: str | os.PathLike, vocab_size: int):
    """The tokenizer of MODEL when none is given: the tokenizer.json in its folder (a model or export directory,
    or the folder of an .onnx), else the byte tokenizer where the model's vocabulary is the 256 bytes; None
    otherwise (token ids only: byte ids fed to another vocabulary would give plausible garbage)."""
    path = Path(model)
    found = (path if path.is_dir() else path.parent) / TOKENIZER_FILE
    if found.is_file():
        return FileTokenizer(found)
    return ByteTokenizer() if vocab_size == BYTE_VOCAB else None


def encode_prompt(tokenizer, text: str, vocab_size: int) -> list[int]:
    """The ids of a prompt text; a one-line ValueError when there is no tokenizer (model_tokenizer's None) or the
    text encodes to no tokens."""
    if tokenizer is None:
        raise ValueError(f"this model's vocabulary has {vocab_size} ids, not the {BYTE_VOCAB} bytes of the "
                         f"byte tokenizer, and its folder holds no {TOKENIZER_FILE}: give --tokenizer "
                         f"{TOKENIZER_FILE} (the model's own), or --prompt-ids")
    prompt = tokenizer.encode(text)
    if not prompt:
        raise ValueError("the prompt encodes to no tokens: give a non-empty --prompt")
    return prompt


def parse_ids(text: str, what: str) -> list[int]:
    """'1,2,3' → [1, 2, 3]; a one-line ValueError naming `what` otherwise."""
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",")]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if any(i < 0 for i in ids):
        raise ValueError(f"{what} must be token ids ≥ 0, got {text!r}")
    return ids
