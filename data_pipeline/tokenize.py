"""Documents (JSONL) -> token shards of one source, with a manifest and a count of what was dropped.

Each input file (or shard of a Hugging Face dataset, `DatasetShard`) becomes one shard per split
(`train-00000`, `val-00000`, ... by input index), so a source split across files gives stable shard
names. A document goes to the validation split when a hash of its id falls under `val_fraction`:
held-out documents, never trained on, the same on every rerun. Nothing is dropped silently:
documents in = documents written + documents dropped (by reason).

A source of `format` `sft` holds supervised finetuning examples (`data_pipeline.sft`): each is rendered
by its chat template and written as one document with a loss mask (`<name>.mask`) that is 1 on the
response tokens only; a bad record stops the run with an error naming its file and line.

Files are independent: N worker processes take them in parallel (and end with the process that
started them, even when it is killed), K machines split them by index, and a rerun skips the files
whose part record exists, so a killed job resumes where it stopped and gives the same bytes as an
unbroken one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional

import numpy as np

from data_pipeline.progress import Progress
from data_pipeline.sft import TEMPLATES, encode_examples, read_examples
from data_pipeline.shards import (
    Manifest,
    ShardInfo,
    ShardWriter,
    atomic_write_bytes,
    remove_stale_temporaries,
    token_dtype,
)
from data_pipeline.sources import DataError, Document, Input, input_bytes, read_documents
from data_pipeline.tally import Tally
from data_pipeline.tokenizer import Tokenizer


@dataclass
class TokenizeStats(Tally):
    """A `Tally` of one input file or a whole source that also counts the documents and tokens each
    split received. Part records and manifests keep their field names (`documents_in`, `dropped_examples`)."""

    documents_written: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    tokens_written: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})

    examples_per_reason: ClassVar[int] = 5

    @property
    def documents_in(self) -> int:
        """Documents read, written or dropped."""
        return self.docs_in

    def merge(self, other: "TokenizeStats") -> "TokenizeStats":
        """Add another file's counts to these; returns self."""
        super().merge(other)
        for split in ("train", "val"):
            self.documents_written[split] += other.documents_written[split]
            self.tokens_written[split] += other.tokens_written[split]
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able counts, as part records and manifests hold them."""
        return {
            "documents_in": self.docs_in,
            "documents_written": self.documents_written,
            "tokens_written": self.tokens_written,
            "bytes_in": self.bytes_in,
            "dropped": dict(sorted(self.dropped.items())),
            "dropped_examples": self.examples,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenizeStats":
        """Inverse of `to_dict` (reasons in the order their first examples came, as they were counted)."""
        examples = {reason: list(found) for reason, found in d["dropped_examples"].items()}
        return cls(
            docs_in=d["documents_in"],
            docs_out=sum(d["documents_written"].values()),
            bytes_in=d["bytes_in"],
            dropped={reason: d["dropped"][reason] for reason in [*examples, *d["dropped"]]},
            examples=examples,
            documents_written=dict(d["documents_written"]),
            tokens_written=dict(d["tokens_written"]),
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
    format: str = "text"  # text: documents; sft: prompt/response or chat records (`data_pipeline.sft`)
    template: Optional[str] = None  # format sft: the chat template (a name in `sft.TEMPLATES`)
    batch_docs: int = 512  # documents encoded at a time
    batch_bytes: int = 1 << 23  # ... or this much text, whichever comes first (bounds a worker's memory)
    threads: int = 1  # SentencePiece threads per worker

    def __post_init__(self) -> None:
        """Refuse an unknown format or template, and SFT examples without their BOS and EOS."""
        if self.format not in ("text", "sft"):
            raise ValueError(f"source {self.source}: format {self.format!r} is not one of text, sft")
        if self.format == "sft" and self.template not in TEMPLATES:
            raise ValueError(f"source {self.source}: template {self.template!r} is not one of {', '.join(TEMPLATES)}")
        if self.format == "sft" and not (self.bos and self.eos):
            raise ValueError(f"source {self.source}: SFT examples are BOS ... EOS by their template; keep bos and eos")


def source_documents(path: Input, settings: TokenizeSettings) -> Iterator[Document]:
    """The documents of one input: its texts, or its SFT examples rendered by the template."""
    if settings.format == "sft":
        return read_examples(path, settings.template, settings.id_field)
    return read_documents(path, settings.text_field, settings.id_field)


def part_path(output: Path, index: int) -> Path:
    """The record that input file `index` is done: its shards' manifest entries and counts."""
    return output / f"part-{index:05d}.json"


def tokenize_file(index: int, path: Input, output: Path, settings: TokenizeSettings) -> dict[str, Any]:
    """Tokenize one input (a file or dataset shard) into `train-<index>` and `val-<index>` shards, then
    write its part record.

    Documents are encoded a batch at a time (`batch_docs` documents or `batch_bytes` of text) and
    streamed to the shards, so a worker's memory does not grow with the file. The part record is
    written last and atomically: its presence means both shards are complete.
    """
    tokenizer = Tokenizer(settings.tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size)
    stats = TokenizeStats()
    pending: list[Document] = []
    pending_bytes = reported = 0
    masked = settings.format == "sft"
    with (
        ShardWriter(output, f"train-{index:05d}", "train", dtype, [str(path)], masked) as train,
        ShardWriter(output, f"val-{index:05d}", "val", dtype, [str(path)], masked) as val,
    ):
        shards = {"train": train, "val": val}
        for doc in source_documents(path, settings):
            stats.read(doc.text or "")
            if doc.dropped:
                if settings.strict:
                    raise DataError(f"{doc.origin}: {doc.dropped.replace('_', ' ')} (strict mode)")
                stats.drop(doc.dropped, doc.origin)
                continue
            pending_bytes += len(doc.text.encode())
            pending.append(doc)
            if len(pending) >= settings.batch_docs or pending_bytes >= settings.batch_bytes:
                _encode(pending, shards, tokenizer, settings)
                pending_bytes = 0
                _report_documents(stats.docs_in - reported)
                reported = stats.docs_in
        _encode(pending, shards, tokenizer, settings)
        _report_documents(stats.docs_in - reported)
    for split, shard in shards.items():
        stats.documents_written[split] += shard.documents
        stats.tokens_written[split] += shard.tokens
    stats.docs_out = sum(stats.documents_written.values())
    assert stats.docs_in == stats.docs_out + sum(stats.dropped.values())
    part = {
        "index": index,
        "input": str(path),
        "tokenizer_sha256": tokenizer.sha256,
        "shards": [asdict(shard.info) for shard in shards.values()],
        "stats": stats.to_dict(),
    }
    atomic_write_bytes(part_path(output, index), json.dumps(part, indent=1).encode())
    return part


def _encode(
    pending: list[Document], shards: dict[str, ShardWriter], tokenizer: Tokenizer, settings: TokenizeSettings
) -> None:
    """Encode the pending documents, framed by BOS/EOS (SFT examples: with their loss mask), onto their
    split's shard; empty `pending`."""
    if not pending:
        return
    held_out = [is_validation(settings.source, d.id, settings.val_fraction) for d in pending]
    for split, shard in shards.items():
        docs = [doc for doc, val in zip(pending, held_out) if val == (split == "val")]
        if not docs:
            continue
        if settings.format == "sft":
            shard.write(*encode_examples([d.segments for d in docs], tokenizer, settings.threads))
        else:
            ids = tokenizer.encode_batch([d.text for d in docs], settings.threads)
            shard.write(*_framed(ids, tokenizer, settings, shard.dtype))
    pending.clear()


def _framed(
    docs: list[list[int]], tokenizer: Tokenizer, settings: TokenizeSettings, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """The documents as one array, each `[BOS] ids [EOS]`, and each one's length."""
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs)) + settings.bos + settings.eos
    ends = np.cumsum(lengths)
    tokens = np.empty(int(ends[-1]), dtype=dtype)
    body = np.ones(len(tokens), dtype=bool)
    if settings.bos:
        tokens[ends - lengths] = tokenizer.bos_id
        body[ends - lengths] = False
    if settings.eos:
        tokens[ends - 1] = tokenizer.eos_id
        body[ends - 1] = False
    tokens[body] = np.fromiter(itertools.chain.from_iterable(docs), dtype=dtype, count=int(body.sum()))
    return tokens, lengths


def _finished(output: Path, index: int, path: Input, tokenizer_sha256: str) -> Optional[dict[str, Any]]:
    """The part record of input `index` if it is complete and made from this input and tokenizer."""
    record = part_path(output, index)
    if not record.is_file():
        return None
    part = json.loads(record.read_text())
    if part["input"] != str(path) or part["tokenizer_sha256"] != tokenizer_sha256:
        return None
    return part


def _run_file(job: tuple[int, Input, Path, TokenizeSettings]) -> dict[str, Any]:
    """Worker entry point (a top-level function, so it pickles)."""
    return tokenize_file(*job)


_document_sink: Optional[Callable[[int], None]] = None  # where this process reports documents read


def _report_documents(n: int) -> None:
    """Tell the progress display that `n` more documents were read (a no-op without one)."""
    if _document_sink is not None and n:
        _document_sink(n)


def _set_document_sink(sink: Optional[Callable[[int], None]]) -> None:
    """Route this process's document counts to `sink`."""
    global _document_sink
    _document_sink = sink


def _start_worker(sink: Optional[Callable[[int], None]], parent: int) -> None:
    """A pool worker's initializer: report documents to `sink`, and exit as soon as process `parent`
    (the one running `tokenize_source`) is gone. A killed parent closes nothing the workers wait on
    (each holds both ends of the pool's queues), so without this they would wait forever."""
    _set_document_sink(sink)
    threading.Thread(target=_exit_with_parent, args=(parent,), name="exit-with-parent", daemon=True).start()


def _exit_with_parent(parent: int, every: float = 0.2) -> None:
    """End this process when its parent is no longer `parent` (it died and this one was adopted)."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def tokenize_source(
    inputs: list[Input],
    output: Path,
    settings: TokenizeSettings,
    workers: int = 1,
    machine: tuple[int, int] = (0, 1),
    config: Optional[dict] = None,
    progress: bool = False,
) -> Optional[TokenizeStats]:
    """Tokenize a source's input files (or dataset shards) into shards under `output/`; resumable and splittable.

    Input `i` always becomes shards `train-<i>`/`val-<i>`. Files already done (a part record made
    from the same input and tokenizer) are skipped, so a killed run resumes. Machine `k` of `K` takes
    the inputs with `i % K == k`. Whoever finds every input done writes `manifest.json`, last; the
    merged counts are returned then, else None. With `progress`, files, documents and input bytes
    done are shown as they go (`data_pipeline.progress`: a bar on a terminal, else a line every N s);
    a dataset shard's size is not known before it is read, so its text bytes count once it is done.
    """
    output.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output)  # what writers killed in an earlier run left
    tokenizer = Tokenizer(settings.tokenizer_path)
    k, n_machines = machine
    todo = [
        (i, p, output, settings)
        for i, p in enumerate(inputs)
        if i % n_machines == k and _finished(output, i, p, tokenizer.sha256) is None
    ]
    sizes = {i: input_bytes(p) for i, p, _, _ in todo}
    known = None not in sizes.values()
    shown = None
    if progress:
        total = sum(sizes.values()) if known else None
        shown = Progress(f"tokenize {settings.source}", len(todo), total, unit="files" if known else "shards")
    try:
        if workers > 1 and len(todo) > 1:
            _run_pool(todo, min(workers, len(todo)), shown, sizes)
        else:
            _set_document_sink(None if shown is None else lambda n: shown.update(docs=n))
            for job in todo:
                part = _run_file(job)
                if shown is not None:
                    shown.update(files=1, nbytes=_bytes_done(part, sizes))
    finally:
        _set_document_sink(None)
        if shown is not None:
            shown.close()
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
        stats.merge(TokenizeStats.from_dict(part["stats"]))
    manifest.stats = stats.to_dict()
    manifest.save(output)
    return stats


def _bytes_done(part: dict[str, Any], sizes: dict[int, Optional[int]]) -> int:
    """The input bytes a finished part adds to the progress: its file's size, else the text it read."""
    size = sizes[part["index"]]
    return part["stats"]["bytes_in"] if size is None else size


def _run_pool(todo: list, workers: int, shown: Optional[Progress], sizes: dict[int, Optional[int]]) -> None:
    """Tokenize the files of `todo` in `workers` processes; their document counts reach `shown` as they go."""
    ctx = multiprocessing.get_context("spawn")
    counts = ctx.SimpleQueue() if shown is not None else None
    with ctx.Pool(workers, _start_worker, (None if counts is None else counts.put, os.getpid())) as pool:
        results = pool.imap_unordered(_run_file, todo)
        while True:
            try:
                part = results.next(timeout=1.0)
            except multiprocessing.TimeoutError:
                part = None
            except StopIteration:
                break
            if shown is not None:
                while not counts.empty():
                    shown.update(docs=counts.get())
                if part is not None:
                    shown.update(files=1, nbytes=_bytes_done(part, sizes))
