"""What every raw-source module shares: the output record, the tally of what came in and what was
dropped (`data_pipeline.tally.Tally`: by reason, with examples), and the error for a damaged input file.

A source module (`stackexchange.py`, `wikipedia.py`, ...) has an `Options` dataclass (its settings in
the recipe config) and `documents(path, options, tally)`, which reads one raw input file and yields
cleaned documents (`make_doc`), calling `tally.read` for every document it reads and `tally.drop` for
every one it drops. A file that turns out damaged (a truncated gzip/bz2 stream, broken XML, a bad
archive member) raises `CorruptInput` naming the file; what was yielded before stays.
"""

from __future__ import annotations

import io
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
    """The entries of a local file: itself, or byte ranges of `split_bytes` when it is of a format that
    can be cut (`SPLITTABLE` lines; `.warc.gz`, at record boundaries) and larger than that (0: never)."""
    size = path.stat().st_size
    cuttable = path.suffix in SPLITTABLE or path.name.endswith(".warc.gz")
    if not split_bytes or size <= split_bytes or not cuttable:
        return [str(path)]
    return [with_range(str(path), a, min(a + split_bytes, size)) for a in range(0, size, split_bytes)]


GZIP_MAGIC = b"\x1f\x8b\x08"


def warc_member_start(f: BinaryIO, offset: int) -> int:
    """The offset of the first gzip member at or after `offset` of an open `.warc.gz` that starts a WARC
    record (the file's size when none does). Common Crawl's WARC files compress each record as a member
    of its own; a candidate is taken only when it inflates to a record header, so the bytes 1f 8b 08
    inside compressed data are passed over. Two ranges that meet at a byte agree on where it lands."""
    import zlib

    size = f.seek(0, 2)
    block = 1 << 20
    while offset < size:
        f.seek(offset)
        data = f.read(block + len(GZIP_MAGIC) - 1)
        at = data.find(GZIP_MAGIC)
        while at != -1:
            f.seek(offset + at)
            head = f.read(1 << 16)
            try:
                if zlib.decompressobj(31).decompress(head, 16).startswith(b"WARC/"):
                    return offset + at
            except zlib.error:
                pass
            at = data.find(GZIP_MAGIC, at + 1)
        offset += block
    return size


class FileSlice(io.RawIOBase):
    """Bytes [start, end) of an open binary file, read as a stream of their own."""

    def __init__(self, f: BinaryIO, start: int, end: int) -> None:
        self.f, self.position, self.end = f, start, end
        f.seek(start)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.end - self.position)
        if n <= 0:
            return 0
        self.f.seek(self.position)
        data = self.f.read(n)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)

    def close(self) -> None:
        self.f.close()
        super().close()


def open_warc_range(path: Path, lines: tuple[int, int]) -> BinaryIO:
    """The records of a `.warc.gz` that start in byte range `lines` (a member starting there), inflated."""
    import gzip

    f = open(path, "rb")
    start, end = warc_member_start(f, lines[0]), warc_member_start(f, lines[1])
    return gzip.GzipFile(fileobj=io.BufferedReader(FileSlice(f, start, end)), mode="rb")


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
