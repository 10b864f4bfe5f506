"""The corpus a run reads: train/val/test token files as memmaps, and which windows each update and evaluation takes.

Data: a corpus directory (`train.bin`, `val.bin`, `test.bin`: flat token ids, uint8 bytes or uint16 BPE; `meta.json`
{"vocab_size", "dtype", "sha256": {split: hex}, "source"}), read through np.memmap. The batch of update s is a
function of (seed, s) only: np.random.default_rng([seed, s]) draws the window offsets, so a resumed run reads the
same batches as an uninterrupted one without any saved data position. Evaluation uses fixed, contiguous,
non-overlapping windows from the start of val.bin covering eval_tokens.

Axis legend: B sequences per micro-batch, S positions (seq_len).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from hypermoe.train.config import TOKEN_DTYPES, TrainConfig
from ref.files import sha256_file

class Corpus(NamedTuple):
    train: np.ndarray  # (n_train,) memmap of token ids
    val: np.ndarray  # (n_val,)
    test: np.ndarray | None  # (n_test,); None where the corpus has no test.bin (evaluated once, at the end)
    vocab_size: int
    meta: dict[str, Any]


def open_corpus(path: str | os.PathLike, *, verify: bool = True) -> Corpus:
    """train.bin, val.bin (and test.bin where present) of a corpus directory as memmaps, after checking meta.json, each file's size (a
    multiple of the token size) and, when `verify`, its sha256. ValueError/FileNotFoundError naming the problem."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"corpus directory {path} does not exist (make one with scripts/fetch_corpus.py)")
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file}: no such file (a corpus directory holds meta.json, train.bin, val.bin)")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_file}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("dtype") not in TOKEN_DTYPES:
        raise ValueError(f"{meta_file}: 'dtype' must be one of {tuple(TOKEN_DTYPES)}")
    dtype = np.dtype(TOKEN_DTYPES[meta["dtype"]])
    vocab = meta.get("vocab_size")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or not 1 <= vocab <= np.iinfo(dtype).max + 1:
        raise ValueError(f"{meta_file}: 'vocab_size' must be an int in [1, {np.iinfo(dtype).max + 1}], got {vocab!r}")
    sha = meta.get("sha256") if isinstance(meta.get("sha256"), dict) else {}
    arrays = {}
    for split in ("train", "val", "test"):
        file = path / f"{split}.bin"
        if split == "test" and not file.is_file():
            arrays[split] = None
            continue
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file")
        size = file.stat().st_size
        if size % dtype.itemsize:
            raise ValueError(f"{file}: {size} bytes is not a multiple of {dtype.itemsize} ({meta['dtype']} tokens); "
                             f"the file is truncated or corrupt")
        if size == 0:
            raise ValueError(f"{file}: empty")
        if verify and split in sha and sha256_file(file) != sha[split]:
            raise ValueError(f"{file}: sha256 differs from meta.json's; the file is corrupt or was changed")
        arrays[split] = np.memmap(file, dtype=dtype, mode="r")  # (n,)
    return Corpus(arrays["train"], arrays["val"], arrays["test"], vocab, meta)


def batch(tokens: np.ndarray, offsets: np.ndarray, seq_len: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each (B, S) int64: tokens[o : o + S] and tokens[o + 1 : o + S + 1] for each offset o."""
    window = offsets[:, None] + np.arange(seq_len + 1)  # (B, S + 1)
    chunk = np.asarray(tokens[window], dtype=np.int64)  # (B, S + 1)
    if chunk.max() >= vocab_size:  # cheap here, and it catches a corpus tokenized for a larger vocabulary
        raise ValueError(f"corpus token id {int(chunk.max())} is ≥ the model's vocab_size ({vocab_size})")
    return chunk[:, :-1], chunk[:, 1:]


def train_offsets(cfg: TrainConfig, step: int, n_tokens: int) -> np.ndarray:
    """Window starts of update `step`: (grad_accum · B,) uniform in [0, n − S − 1], from (seed, step) only."""
    return np.random.default_rng([cfg.seed, step]).integers(0, n_tokens - cfg.seq_len, cfg.grad_accum * cfg.batch_size)


def eval_offsets(cfg: TrainConfig, n_tokens: int) -> np.ndarray:
    """Contiguous non-overlapping windows from the start of val.bin: min(eval_tokens, n − 1) // S of them."""
    windows = min(cfg.eval_tokens, n_tokens - 1) // cfg.seq_len
    return np.arange(windows) * cfg.seq_len  # (W,)

