"""scripts/fetch_corpus.py's offline parts: the normalisation and the deterministic per-work split (the download
itself needs the network and is run by hand; its sha256 pin is checked there)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
