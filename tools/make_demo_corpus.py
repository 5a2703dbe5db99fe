#!/usr/bin/env python3
"""Regenerate lorif_stream/data/fortunes.jsonl.gz, the corpus bundled for `lorif-stream demo`.

Source: the Debian packages `fortunes-min` and `fortunes` (fortune-mod 1.99.1, the BSD
fortune(6) databases; license: BSD, see /usr/share/doc/fortunes/copyright). Only the
inoffensive collections are used (`fortunes-off` is never read). Install them and run:

    apt-get install -y fortunes-min fortunes
    python tools/make_demo_corpus.py            # writes lorif_stream/data/fortunes.jsonl.gz

Each line of the output is {"id": "<collection>-<number>", "text": ..., "source": <collection>}:
one fortune with its whitespace collapsed to single spaces, 24 to 280 characters long, mostly
letters (no ASCII art). Duplicates are dropped, also the near ones that differ only in case,
punctuation or attribution (the demo plants its own near-duplicate, whose twin must be unique).
The output is byte-for-byte deterministic.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import sys
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")
COLLECTIONS = (
    "wisdom", "science", "computers", "literature", "people", "education", "humorists", "platitudes",
    "fortunes", "miscellaneous", "work", "art", "kids", "food", "pets", "paradoxum", "goedel",
)
MIN_CHARS, MAX_CHARS = 24, 280
OUT = Path(__file__).resolve().parent.parent / "lorif_stream" / "data" / "fortunes.jsonl.gz"


def clean(entry: str) -> str:
    entry = re.sub(r".\x08", "", entry)          # overstrike (bold/underline) sequences
    entry = "".join(ch for ch in entry if ch.isprintable() or ch.isspace())
    return " ".join(entry.split())


def usable(text: str) -> bool:
    if not MIN_CHARS <= len(text) <= MAX_CHARS:
        return False
    letters = sum(ch.isalpha() for ch in text)
    return letters >= 0.7 * sum(not ch.isspace() for ch in text) and not re.search(r"(.)\1{5,}", text)


def dedup_key(text: str) -> str:
    """The quote without its trailing attribution, letters only, lower case."""
    body = text.rsplit(" -- ", 1)[0] if " -- " in text else text
    return re.sub(r"[^a-z]", "", body.lower())


def records(directory: Path):
    seen = set()
    for name in COLLECTIONS:
        raw = (directory / name).read_bytes().decode("utf-8", errors="replace")
        for number, entry in enumerate(raw.split("\n%\n")):
            text = clean(entry.strip("%\n"))
            key = dedup_key(text)
            if usable(text) and key not in seen:
                seen.add(key)
                yield {"id": f"{name}-{number:04d}", "text": text, "source": name}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fortunes-dir", type=Path, default=FORTUNES_DIR)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if not (args.fortunes_dir / "wisdom").is_file():
        print(f"no fortune files in {args.fortunes_dir}: apt-get install -y fortunes-min fortunes", file=sys.stderr)
        return 1
    rows = list(records(args.fortunes_dir))
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(buffer.getvalue())
    print(f"{len(rows):,} fortunes, {sum(len(r['text']) for r in rows):,} characters -> {args.out} "
          f"({args.out.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
