"""What every raw-source module shares: the output record, the tally of what came in and what was
dropped (`data_pipeline.tally.Tally`: by reason, with examples), and the error for a damaged input file.

A source module (`stackexchange.py`, `wikipedia.py`, ...) has an `Options` dataclass (its settings in
the recipe config) and `documents(path, options, tally)`, which reads one raw input file and yields
cleaned documents (`make_doc`), calling `tally.read` for every document it reads and `tally.drop` for
every one it drops. A file that turns out damaged (a truncated gzip/bz2 stream, broken XML, a bad
archive member) raises `CorruptInput` naming the file; what was yielded before stays.
"""

from __future__ import annotations

from typing import Any

from data_pipeline.sources import DataError
from data_pipeline.tally import Tally

__all__ = ["CorruptInput", "Tally", "make_doc", "stream_errors"]


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
