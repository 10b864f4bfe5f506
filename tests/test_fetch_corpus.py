"""scripts/fetch_corpus.py's offline parts: the normalisation and the deterministic per-work split (the download
itself needs the network and is run by hand; its sha256 pin is checked there)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "fetch_corpus", Path(__file__).resolve().parents[1] / "scripts" / "fetch_corpus.py")
fetch_corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fetch_corpus)


def test_normalise_line_endings_and_blank_edges():
    assert fetch_corpus.normalise(b"\n\nA  \r\nB\rC\t\n\n\n", "x") == "A\nB\nC\n"
    with pytest.raises(ValueError, match="x: not UTF-8 at byte 1"):
        fetch_corpus.normalise(b"A\xff", "x")


def test_cut_at_line_breaks_covers_the_text():
    text = "".join(f"line {i:03d}\n" for i in range(200))  # 1800 bytes
    parts = fetch_corpus.cut(text, [0.90, 0.05, 0.05])
    assert "".join(parts) == text
    assert all(part.endswith("\n") for part in parts)
    assert [len(part) for part in parts] == [1629, 90, 81]  # each cut after the line holding byte 1620, 1710
    assert fetch_corpus.cut("one line\n", [0.9, 0.05, 0.05]) == ["one line\n", "", ""]


TEXT = "".join(f"ROMEO: what light through yonder window {i} breaks?\nJULIET: ay me, sweet {i % 7}!\n" for i in range(60))


def test_bpe_is_deterministic_trained_on_train_only_and_round_trips():
    pytest.importorskip("tokenizers")
    splits = {"train": TEXT.encode(), "val": "ROMEO: zebra quartz\n".encode(), "test": "é ü\n".encode()}
    arrays, fields = fetch_corpus.tokenize(splits, "bpe", 300)
    again, fields2 = fetch_corpus.tokenize(splits, "bpe", 300)
    assert fields["tokenizer"]["json"] == fields2["tokenizer"]["json"]  # the same tokenizer.json, byte for byte
    assert all(np.array_equal(arrays[k], again[k]) and arrays[k].dtype == np.uint16 for k in arrays)
    assert (fields["vocab_size"], fields["dtype"], fields["tokenizer"]["trained_on"]) == (300, "uint16", "train")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(fields["tokenizer"]["json"])
    assert tok.get_vocab_size() == 300 and max(int(a.max()) for a in arrays.values()) < 300
    for name, data in splits.items():  # every split decodes back to its text (byte-level: nothing is unknown)
        assert tok.decode(arrays[name].tolist()) == data.decode()
    other, _ = fetch_corpus.tokenize({**splits, "val": TEXT.encode()}, "bpe", 300)  # val's text changes no merge
    assert np.array_equal(other["train"], arrays["train"])
    assert len(arrays["train"]) < len(splits["train"]) / 2  # merges learnt from train compress it


@pytest.mark.parametrize("tokenizer, vocab, match", [
    ("bpe", None, "needs --vocab-size"), ("bpe", 256, r"must be in \(256, 65536\]"), ("bpe", 70000, "65536"),
    ("byte", 512, "byte tokenizer's vocabulary is 256"),
])
def test_tokenizer_arguments_refused(tokenizer, vocab, match):
    with pytest.raises(ValueError, match=match):
        fetch_corpus.check_tokenizer(tokenizer, vocab)
