"""Documents (JSONL) -> token shards of one source, with a manifest and a count of what was dropped.

Each input file becomes one shard per split (`train-00000`, `val-00000`, ... by input index), so a
source split across files gives stable shard names. A document goes to the validation split when a
hash of its id falls under `val_fraction`: held-out documents, never trained on, the same on every
rerun. Nothing is dropped silently: documents in = documents written + documents dropped (by reason).

Files are independent: N worker processes take them in parallel, K machines split them by index, and
a rerun skips the files whose part record exists, so a killed job resumes where it stopped and gives
the same bytes as an unbroken one.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from data_pipeline.shards import Manifest, ShardInfo, atomic_write_bytes, token_dtype, write_shard
from data_pipeline.sources import DataError, Document, read_documents
from data_pipeline.tokenizer import Tokenizer


@dataclass
class TokenizeStats:
    """Counts for one input file or a whole source: what came in, what was written, what was dropped."""

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

    def add(self, other: "TokenizeStats") -> None:
        """Add another file's counts to these."""
        self.documents_in += other.documents_in
        self.bytes_in += other.bytes_in
        for split in ("train", "val"):
            self.documents_written[split] += other.documents_written[split]
            self.tokens_written[split] += other.tokens_written[split]
        self.dropped.update(other.dropped)
        for reason, examples in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine += examples[: 5 - len(mine)]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able counts."""
        return {
            "documents_in": self.documents_in,
            "documents_written": self.documents_written,
            "tokens_written": self.tokens_written,
            "bytes_in": self.bytes_in,
            "dropped": dict(sorted(self.dropped.items())),
            "dropped_examples": self.examples,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenizeStats":
        """Inverse of `to_dict`."""
        return cls(
            d["documents_in"],
            dict(d["documents_written"]),
            dict(d["tokens_written"]),
            d["bytes_in"],
            Counter(d["dropped"]),
            {k: list(v) for k, v in d["dropped_examples"].items()},
        )


def is_validation(source: str, doc_id: str, val_fraction: float) -> bool:
    """Whether a document is held out: a stable hash of (source, id) below the fraction."""
    h = int.from_bytes(hashlib.sha256(f"{source}/{doc_id}".encode()).digest()[:8], "little")
    return h < val_fraction * 2**64


@dataclass(frozen=True)
class TokenizeSettings:
    """How documents of one source become tokens (the same for every input file)."""

    source: str
    tokenizer_path: str
    val_fraction: float = 0.01
    bos: bool = True
    eos: bool = True
    strict: bool = False
    text_field: str = "text"
    id_field: str = "id"
    batch_docs: int = 512
    threads: int = 1  # SentencePiece threads per worker


def part_path(output: Path, index: int) -> Path:
    """The record that input file `index` is done: its shards' manifest entries and counts."""
    return output / f"part-{index:05d}.json"


def tokenize_file(index: int, path: Path, output: Path, settings: TokenizeSettings) -> dict[str, Any]:
    """Tokenize one input file into `train-<index>` and `val-<index>` shards, then write its part record.

    The part record is written last and atomically: its presence means both shards are complete.
    """
    tokenizer = Tokenizer(settings.tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size)
    stats = TokenizeStats()
    docs: dict[str, list[list[int]]] = {"train": [], "val": []}
    pending: list[Document] = []
    for doc in read_documents(path, settings.text_field, settings.id_field):
        stats.documents_in += 1
        if doc.dropped:
            if settings.strict:
                raise DataError(f"{doc.origin}: {doc.dropped.replace('_', ' ')} (strict mode)")
            stats.drop(doc)
            continue
        stats.bytes_in += len(doc.text.encode())
        pending.append(doc)
        if len(pending) >= settings.batch_docs:
            _encode(pending, docs, tokenizer, settings)
    _encode(pending, docs, tokenizer, settings)
    shards = []
    for split, split_docs in docs.items():
        info = write_shard(output, f"{split}-{index:05d}", split, split_docs, dtype, [str(path)])
        shards.append(asdict(info))
        stats.documents_written[split] += info.documents
        stats.tokens_written[split] += info.tokens
    assert stats.documents_in == sum(stats.documents_written.values()) + sum(stats.dropped.values())
    part = {
        "index": index,
        "input": str(path),
        "tokenizer_sha256": tokenizer.sha256,
        "shards": shards,
        "stats": stats.to_dict(),
    }
    atomic_write_bytes(part_path(output, index), json.dumps(part, indent=1).encode())
    return part


def _encode(
    pending: list[Document], docs: dict[str, list[list[int]]], tokenizer: Tokenizer, settings: TokenizeSettings
) -> None:
    """Encode the pending documents into their split's list, framed by BOS/EOS; empty `pending`."""
    bos, eos = [tokenizer.bos_id] if settings.bos else [], [tokenizer.eos_id] if settings.eos else []
    for doc, ids in zip(pending, tokenizer.encode_batch([d.text for d in pending], settings.threads)):
        split = "val" if is_validation(settings.source, doc.id, settings.val_fraction) else "train"
        docs[split].append(bos + ids + eos)
    pending.clear()


def _finished(output: Path, index: int, path: Path, tokenizer_sha256: str) -> Optional[dict[str, Any]]:
    """The part record of input `index` if it is complete and made from this input and tokenizer."""
    record = part_path(output, index)
    if not record.is_file():
        return None
    part = json.loads(record.read_text())
    if part["input"] != str(path) or part["tokenizer_sha256"] != tokenizer_sha256:
        return None
    return part


def _run_file(job: tuple[int, Path, Path, TokenizeSettings]) -> dict[str, Any]:
    """Worker entry point (a top-level function, so it pickles)."""
    return tokenize_file(*job)


def tokenize_source(
    inputs: list[Path],
    output: Path,
    settings: TokenizeSettings,
    workers: int = 1,
    machine: tuple[int, int] = (0, 1),
    config: Optional[dict] = None,
    progress: bool = False,
) -> Optional[TokenizeStats]:
    """Tokenize a source's input files into shards under `output/`; resumable and splittable.

    Input `i` always becomes shards `train-<i>`/`val-<i>`. Files already done (a part record made
    from the same input and tokenizer) are skipped, so a killed run resumes. Machine `k` of `K` takes
    the inputs with `i % K == k`. Whoever finds every input done writes `manifest.json`, last; the
    merged counts are returned then, else None.
    """
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(settings.tokenizer_path)
    k, n_machines = machine
    todo = [
        (i, p, output, settings)
        for i, p in enumerate(inputs)
        if i % n_machines == k and _finished(output, i, p, tokenizer.sha256) is None
    ]
    bar = _progress_bar(settings.source, len(todo)) if progress else None
    if workers > 1 and len(todo) > 1:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(todo))) as pool:
            for part in pool.imap_unordered(_run_file, todo):
                _advance(bar, part)
    else:
        for job in todo:
            _advance(bar, _run_file(job))
    if bar is not None:
        bar.close()
    parts = [_finished(output, i, p, tokenizer.sha256) for i, p in enumerate(inputs)]
    if any(part is None for part in parts):
        return None  # other machines still have inputs to do
    stats = TokenizeStats()
    manifest = Manifest(
        source=settings.source,
        dtype=token_dtype(tokenizer.vocab_size).name,
        tokenizer_path=str(tokenizer.path),
        tokenizer_sha256=tokenizer.sha256,
        vocab_size=tokenizer.vocab_size,
        bos=settings.bos,
        eos=settings.eos,
        config=config or {},
    )
    for part in parts:
        manifest.shards += [ShardInfo(**s) for s in part["shards"]]
        stats.add(TokenizeStats.from_dict(part["stats"]))
    manifest.stats = stats.to_dict()
    manifest.save(output)
    return stats


def _progress_bar(source: str, files: int):
    """A tqdm bar over input files that also shows documents/s and tokens/s."""
    from tqdm import tqdm

    bar = tqdm(total=files, desc=f"tokenize {source}", unit="file", dynamic_ncols=True)
    bar.docs, bar.tokens = 0, 0
    return bar


def _advance(bar, part: dict[str, Any]) -> None:
    """Count a finished file on the progress bar."""
    if bar is None:
        return
    stats = part["stats"]
    bar.docs += stats["documents_in"]
    bar.tokens += sum(stats["tokens_written"].values())
    elapsed = max(bar.format_dict["elapsed"], 1e-9)
    bar.set_postfix_str(f"{bar.docs / elapsed:,.0f} docs/s, {bar.tokens / elapsed:,.0f} tokens/s")
    bar.update(1)
