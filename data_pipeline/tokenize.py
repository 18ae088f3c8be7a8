"""Documents (JSONL) -> token shards of one source, with a manifest and a count of what was dropped.

Each input file becomes one shard per split (`train-00000`, `val-00000`, ... by input index), so a
source split across files gives stable shard names. A document goes to the validation split when a
hash of its id falls under `val_fraction`: held-out documents, never trained on, the same on every
rerun. Nothing is dropped silently: documents in = documents written + documents dropped (by reason).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Optional

from data_pipeline.shards import Manifest, token_dtype, write_shard
from data_pipeline.tokenizer import Tokenizer


class DataError(ValueError):
    """A bad input record in strict mode; names the file and line."""


@dataclass
class Document:
    """A document read from an input file, or the reason it cannot be used."""

    origin: str  # file:line
    id: Optional[str] = None
    text: Optional[str] = None
    dropped: Optional[str] = None  # reason: bad_json | not_utf8 | missing_text | empty_text


@dataclass
class TokenizeStats:
    """Counts for one source: what came in, what was written, what was dropped and why."""

    documents_in: int = 0
    documents_written: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    tokens_written: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    bytes_in: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> a few file:line

    def drop(self, doc: Document) -> None:
        """Count a dropped document and keep its origin as an example."""
        self.dropped[doc.dropped] += 1
        examples = self.examples.setdefault(doc.dropped, [])
        if len(examples) < 5:
            examples.append(doc.origin)


def open_text(path: Path) -> IO[bytes]:
    """Open a plain, .gz or .zst file for reading bytes."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
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
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                yield Document(origin, dropped="missing_text")
            elif not text.strip():
                yield Document(origin, dropped="empty_text")
            else:
                yield Document(origin, id=str(record.get(id_field, origin)), text=text)


def is_validation(source: str, doc_id: str, val_fraction: float) -> bool:
    """Whether a document is held out: a stable hash of (source, id) below the fraction."""
    h = int.from_bytes(hashlib.sha256(f"{source}/{doc_id}".encode()).digest()[:8], "little")
    return h < val_fraction * 2**64


def _encode(
    pending: list[Document],
    docs: dict[str, list[list[int]]],
    tokenizer: Tokenizer,
    source: str,
    val_fraction: float,
    bos: bool,
    eos: bool,
) -> None:
    """Encode the pending documents into their split's list, framed by BOS/EOS; empty `pending`."""
    for doc, ids in zip(pending, tokenizer.encode_batch([d.text for d in pending], os.cpu_count() or 1)):
        split = "val" if is_validation(source, doc.id, val_fraction) else "train"
        docs[split].append(([tokenizer.bos_id] if bos else []) + ids + ([tokenizer.eos_id] if eos else []))
    pending.clear()


def tokenize_source(
    source: str,
    inputs: list[Path],
    output: Path,
    tokenizer: Tokenizer,
    val_fraction: float = 0.01,
    bos: bool = True,
    eos: bool = True,
    strict: bool = False,
    text_field: str = "text",
    batch_docs: int = 512,
    config: Optional[dict] = None,
) -> TokenizeStats:
    """Tokenize `inputs` into shards under `output/` and write its manifest last."""
    output.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    stats = TokenizeStats()
    manifest = Manifest(
        source=source,
        dtype=dtype.name,
        tokenizer_path=str(tokenizer.path),
        tokenizer_sha256=tokenizer.sha256,
        vocab_size=tokenizer.vocab_size,
        bos=bos,
        eos=eos,
        config=config or {},
    )
    for index, path in enumerate(inputs):
        docs: dict[str, list[list[int]]] = {"train": [], "val": []}
        pending: list[Document] = []
        for doc in read_jsonl(path, text_field):
            stats.documents_in += 1
            if doc.dropped:
                if strict:
                    raise DataError(f"{doc.origin}: {doc.dropped.replace('_', ' ')} (strict mode)")
                stats.drop(doc)
                continue
            stats.bytes_in += len(doc.text.encode())
            pending.append(doc)
            if len(pending) >= batch_docs:
                _encode(pending, docs, tokenizer, source, val_fraction, bos, eos)
        _encode(pending, docs, tokenizer, source, val_fraction, bos, eos)
        for split, split_docs in docs.items():
            info = write_shard(output, f"{split}-{index:05d}", split, split_docs, dtype, [str(path)])
            manifest.shards.append(info)
            stats.documents_written[split] += info.documents
            stats.tokens_written[split] += info.tokens
    assert stats.documents_in == sum(stats.documents_written.values()) + sum(stats.dropped.values())
    manifest.stats = {
        "documents_in": stats.documents_in,
        "documents_written": stats.documents_written,
        "tokens_written": stats.tokens_written,
        "bytes_in": stats.bytes_in,
        "dropped": dict(stats.dropped),
        "dropped_examples": stats.examples,
    }
    manifest.save(output)
    return stats
