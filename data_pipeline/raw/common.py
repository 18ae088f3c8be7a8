"""What every raw-source module shares: the output record, the tally of what came in and what was
dropped (`data_pipeline.tally.Tally`: by reason, with examples), and the error for a damaged input file.

A source module (`stackexchange.py`, `wikipedia.py`, ...) has an `Options` dataclass (its settings in
the recipe config) and `documents(path, options, tally)`, which reads one raw input file and yields
cleaned documents (`make_doc`), calling `tally.read` for every document it reads and `tally.drop` for
every one it drops. A file that turns out damaged (a truncated gzip/bz2 stream, broken XML, a bad
archive member) raises `CorruptInput` naming the file; what was yielded before stays.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional

from data_pipeline.sources import DataError
from data_pipeline.tally import Tally

__all__ = ["CorruptInput", "Tally", "byte_range", "make_doc", "range_lines", "stream_errors", "with_range"]

SPLITTABLE = (".jsonl", ".ndjson")  # uncompressed line formats a huge input is split into byte ranges of
_RANGE = re.compile(r"(.+)#bytes=(\d+)-(\d+)")


class CorruptInput(DataError):
    """An input file that cannot be read to its end (truncated, corrupt, not what its name says)."""


def stream_errors() -> tuple[type[Exception], ...]:
    """What reading a truncated or corrupt plain/.gz/.bz2/.xz/.zst stream raises."""
    import lzma
    import zlib

    errors: tuple[type[Exception], ...] = (OSError, EOFError, zlib.error, lzma.LZMAError)
    try:
        import zstandard
    except ImportError:
        return errors
    return errors + (zstandard.ZstdError,)


def make_doc(source: str, doc_id: str, text: str, **meta: Any) -> dict:
    """A cleaned document in the data contract's layout: `{"id", "text", "meta": {"source", ...}}`."""
    return {"id": doc_id, "text": text, "meta": {"source": source, **meta}}


def with_range(path: str, start: int, end: int) -> str:
    """The input entry of bytes [start, end) of a file: `path#bytes=start-end` (a part of its own)."""
    return f"{path}#bytes={start}-{end}"


def byte_range(entry: str) -> tuple[str, Optional[tuple[int, int]]]:
    """(the file, its byte range) of an input entry; no range: (entry, None)."""
    match = _RANGE.fullmatch(entry)
    return (match.group(1), (int(match.group(2)), int(match.group(3)))) if match else (entry, None)


def split_ranges(path: Path, split_bytes: int) -> list[str]:
    """The entries of a local file: itself, or byte ranges of `split_bytes` when it is an uncompressed
    line format (`SPLITTABLE`) larger than that (0: never split)."""
    size = path.stat().st_size
    if not split_bytes or size <= split_bytes or path.suffix not in SPLITTABLE:
        return [str(path)]
    return [with_range(str(path), a, min(a + split_bytes, size)) for a in range(0, size, split_bytes)]


def range_lines(f: BinaryIO, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for every line of an open file whose first byte lies in [start, end): each line of
    the file falls in exactly one range, whole, wherever the ranges cut."""
    if start > 0:
        f.seek(start - 1)
        f.readline()  # the end of the line that holds byte start-1: its owner is the range before
    offset = f.tell()
    while offset < end:
        line = f.readline()
        if not line:
            return
        yield offset, line
        offset += len(line)
