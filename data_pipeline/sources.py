"""Readers for the formats users hold, all yielding the same `Document`s.

- JSONL, optionally `.gz` or `.zst` compressed: one JSON object per line (RedPajama, SlimPajama, C4's
  `{"text", "url", "timestamp"}`), the text and id under configurable fields;
- Parquet through Hugging Face `datasets` (streamed, nothing cached), same fields;
- plain text (`.txt`, e.g. books): one document per file, its name as id.

A record that cannot be used is yielded with the reason (`bad_json`, `not_utf8`, `missing_text`,
`empty_text`) and its `file:line` (or `file:row N`), never skipped silently.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Optional


class DataError(ValueError):
    """A bad input record in strict mode, or an unreadable input; names the file and line."""


@dataclass
class Document:
    """A document read from an input file, or the reason it cannot be used."""

    origin: str  # file:line
    id: Optional[str] = None
    text: Optional[str] = None
    dropped: Optional[str] = None  # reason: bad_json | not_utf8 | missing_text | empty_text


def open_text(path: Path) -> IO[bytes]:
    """Open a plain, .gz, .bz2, .xz or .zst file for reading bytes (streamed)."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".bz2":
        import bz2

        return bz2.open(path, "rb")
    if path.suffix == ".xz":
        import lzma

        return lzma.open(path, "rb")
    if path.suffix == ".zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def read_jsonl(path: Path, text_field: str = "text", id_field: str = "id") -> Iterator[Document]:
    """Every line of a JSONL file as a Document (usable, or with the reason it is not)."""
    with open_text(path) as f:
        for line_no, raw in enumerate(f, start=1):
            origin = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield Document(origin, dropped="not_utf8")
                continue
            if not line.strip():
                continue  # blank separator lines are not documents
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                yield Document(origin, dropped="bad_json")
                continue
            yield _from_record(record, origin, text_field, id_field)


def _from_record(record: object, origin: str, text_field: str, id_field: str) -> Document:
    """A Document from a parsed record (a dict), or the reason it has no usable text."""
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        return Document(origin, dropped="missing_text")
    if not text.strip():
        return Document(origin, dropped="empty_text")
    doc_id = record.get(id_field)
    return Document(origin, id=str(doc_id) if doc_id is not None else origin, text=text)


def read_parquet(path: Path, text_field: str = "text", id_field: str = "id") -> Iterator[Document]:
    """Every row of a Parquet file, streamed through Hugging Face `datasets` (offline, no cache)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs Hugging Face datasets: pip install -e '.[data]'") from None
    rows = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
    for n, row in enumerate(rows, start=1):
        yield _from_record(row, f"{path}:row {n}", text_field, id_field)


def read_text_file(path: Path) -> Iterator[Document]:
    """A whole plain-text file (a book) as one document, its file name as id."""
    origin = f"{path}:1"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        yield Document(origin, dropped="not_utf8")
        return
    yield _from_record({"text": text, "id": path.stem}, origin, "text", "id")


def read_documents(path: Path, text_field: str = "text", id_field: str = "id") -> Iterator[Document]:
    """Documents of any supported file, chosen by its suffix."""
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes[-1:] == [".parquet"]:
        return read_parquet(path, text_field, id_field)
    if suffixes[-1:] == [".txt"]:
        return read_text_file(path)
    if any(s in (".jsonl", ".json", ".ndjson") for s in suffixes):
        return read_jsonl(path, text_field, id_field)
    raise DataError(f"{path}: unknown input format (expected .jsonl[.gz|.zst], .parquet or .txt)")
