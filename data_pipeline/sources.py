"""Readers for the formats users hold, all yielding the same `Document`s.

- JSONL, optionally `.gz` or `.zst` compressed: one JSON object per line (RedPajama, SlimPajama, C4's
  `{"text", "url", "timestamp"}`), the text and id under configurable fields;
- Parquet through Hugging Face `datasets` (streamed, nothing cached), same fields;
- plain text (`.txt`, e.g. books): one document per file, its name as id;
- a Hugging Face dataset by name (`wikimedia/wikipedia`) or local folder, streamed: each of its shards
  (`n_shards`, one per data file) is a `DatasetShard`, an input read like one file.
  Parquet and JSON data are read for their text and id columns only, so other columns may differ
  between files; an error while reading (pyarrow's `Couldn't cast`, a damaged file) is one DataError
  naming the file (and the dataset shard).

A record that cannot be used is yielded with the reason (`bad_json`, `not_utf8`, `bad_unicode`: a text
or id holding a lone surrogate such as JSON's `"\\ud800"`, which no UTF-8 can hold; `missing_text`,
`empty_text`) and its `file:line` (or `file:row N`, `<dataset shard>:row N`), never skipped silently.
A UTF-8 byte-order mark opening a file is not part of its first record.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Optional, Union


class DataError(ValueError):
    """A bad input record in strict mode, or an unreadable input; names the file and line."""


@dataclass
class Document:
    """A document read from an input file, or the reason it cannot be used."""

    origin: str  # file:line
    id: Optional[str] = None
    text: Optional[str] = None
    dropped: Optional[str] = None  # reason: bad_json | not_utf8 | bad_unicode | missing_text | empty_text
    segments: Optional[list] = None  # an SFT example rendered by its template (`data_pipeline.sft.Segment`s)


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


def jsonl_records(path: Path) -> Iterator[tuple[str, Any, Optional[str]]]:
    """(`file:line`, parsed record, None) for every non-blank line of a JSONL file, or (`file:line`, None,
    reason) for a line that is not one (`not_utf8`, `bad_json`)."""
    with open_text(path) as f:
        for line_no, raw in enumerate(f, start=1):
            origin = f"{path}:{line_no}"
            if line_no == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield origin, None, "not_utf8"
                continue
            if not line.strip():
                continue  # blank separator lines are not documents
            try:
                yield origin, json.loads(line), None
            except json.JSONDecodeError:
                yield origin, None, "bad_json"


def read_jsonl(path: Path, text_field: str = "text", id_field: str = "id") -> Iterator[Document]:
    """Every line of a JSONL file as a Document (usable, or with the reason it is not)."""
    for origin, record, reason in jsonl_records(path):
        yield Document(origin, dropped=reason) if reason else _from_record(record, origin, text_field, id_field)


def _from_record(record: object, origin: str, text_field: str, id_field: str) -> Document:
    """A Document from a parsed record (a dict), or the reason it has no usable text."""
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        return Document(origin, dropped="missing_text")
    if not text.strip():
        return Document(origin, dropped="empty_text")
    doc_id = record.get(id_field)
    doc_id = str(doc_id) if doc_id is not None else origin
    if not encodable(text) or not encodable(doc_id):
        return Document(origin, dropped="bad_unicode")
    return Document(origin, id=doc_id, text=text)


def encodable(text: str) -> bool:
    """Whether `text` is valid Unicode, which UTF-8 can hold: no lone surrogate (`"\\ud800"` in JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _import_datasets(what: str, offline: bool) -> Any:
    """Hugging Face `datasets`, or a DataError saying how to install it. With `offline` (local inputs),
    the hub is off unless the environment says otherwise (read when `datasets` is first imported)."""
    if offline:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what} needs Hugging Face datasets: pip install -e '.[data]'") from None
    return datasets


def keep_hub_on() -> None:
    """Let this process reach the hub (a source is a hub dataset) unless the environment says otherwise;
    called before `datasets` is imported, so that a local input read first does not turn it off."""
    hub_offline = os.environ.setdefault("HF_HUB_OFFLINE", "0")
    os.environ.setdefault("HF_DATASETS_OFFLINE", hub_offline)  # `datasets` reads this one first


def _one_line(error: BaseException) -> str:
    """An error of a reader (pyarrow's `Couldn't cast ...` spans lines) as one short line, class named;
    `datasets`' DatasetGenerationError by its cause."""
    if type(error).__name__ == "DatasetGenerationError" and error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split())
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _read_rows(
    open_rows: Callable[[], Iterable[dict]], where: str, origin: str, text_field: str, id_field: str
) -> Iterator[Document]:
    """The rows `open_rows()` streams, as Documents (`origin:row N`); any error while opening or reading
    them (pyarrow's ArrowInvalid or `Couldn't cast`, a DatasetGenerationError) is one DataError naming
    `where` (the file, or the dataset shard) and the cause."""
    try:
        rows = iter(open_rows())
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{where}: cannot read: {_one_line(e)}") from None
    n = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:
            raise DataError(f"{where}: cannot read at row {n + 1}: {_one_line(e)}") from None
        n += 1
        yield _from_record(row, f"{origin}:row {n}", text_field, id_field)


def _only_used_columns(builder: Optional[str], features: Any, text_field: str, id_field: str) -> dict:
    """`load_dataset` arguments that read only the text and id columns, so that other columns (a `meta`
    that is a struct in one file and a string in another) cannot fail a read: Parquet loads only them
    (`columns=`); JSON, which has no such option, reads the others as JSON values (`Json()`), whatever
    their type in each file. Nothing for other builders, or when the columns are not known."""
    if not features:
        return {}
    used = [c for c in dict.fromkeys((text_field, id_field)) if c in features]
    if not used or len(used) == len(features):
        return {}
    if builder == "parquet":
        return {"columns": used}
    if builder == "json":
        from datasets import Features, Json

        return {"features": Features({c: f if c in used else Json() for c, f in features.items()})}
    return {}


def read_parquet(path: Path, text_field: str = "text", id_field: str = "id") -> Iterator[Document]:
    """Every row of a Parquet file, streamed through Hugging Face `datasets` (offline, no cache), only
    its text and id columns read; an unreadable file is a DataError naming it."""
    datasets = _import_datasets(f"{path}: reading Parquet", offline=True)

    def open_rows() -> Any:
        rows = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
        only = _only_used_columns("parquet", rows.features, text_field, id_field)
        return datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True, **only)

    return _read_rows(open_rows, str(path), str(path), text_field, id_field)


def read_text_file(path: Path) -> Iterator[Document]:
    """A whole plain-text file (a book) as one document, its file name as id."""
    origin = f"{path}:1"
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        yield Document(origin, dropped="not_utf8")
        return
    yield _from_record({"text": text, "id": path.stem}, origin, "text", "id")


@dataclass(frozen=True)
class DatasetShard:
    """Shard `index` of the `n_shards` of a Hugging Face dataset split: a unit of work, read like a file."""

    dataset: str  # a hub name, or a local folder (or loading script) `datasets.load_dataset` reads
    config: Optional[str]  # load_dataset's `name`
    split: str
    index: int
    n_shards: int

    def __str__(self) -> str:
        config = f"{self.config}, " if self.config else ""
        return f"{self.dataset} ({config}{self.split} shard {self.index}/{self.n_shards})"


Input = Union[Path, DatasetShard]  # what `read_documents` reads: a file or a dataset shard


@functools.lru_cache(maxsize=16)
def _streaming_dataset(dataset: str, config: Optional[str], split: str) -> Any:
    """`datasets.load_dataset(dataset, config, split=split, streaming=True)`, once per process."""
    local = Path(dataset).exists()
    datasets = _import_datasets(f"dataset {dataset}", offline=local)
    try:
        return datasets.load_dataset(dataset, config, split=split, streaming=True)
    except (OSError, ValueError) as e:  # not found (or offline), no such config or split
        offline = not local and datasets.config.HF_HUB_OFFLINE
        hint = " (hub offline; HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0 to reach it)" if offline else ""
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"dataset {dataset} ({config or 'default'}, {split}): cannot load: {reason}{hint}") from None


def dataset_shards(dataset: str, config: Optional[str] = None, split: str = "train") -> list[DatasetShard]:
    """The units of work of a dataset split: one per shard it streams (`n_shards`, its data files)."""
    n_shards = _streaming_dataset(dataset, config, split).n_shards
    return [DatasetShard(dataset, config, split, i, n_shards) for i in range(n_shards)]


@functools.lru_cache(maxsize=16)
def _dataset_for_reading(dataset: str, config: Optional[str], split: str, text_field: str, id_field: str) -> Any:
    """The streaming dataset, loaded to read only its text and id columns (`_only_used_columns`)."""
    rows = _streaming_dataset(dataset, config, split)
    only = _only_used_columns(rows.info.builder_name, rows.features, text_field, id_field)
    if not only:
        return rows
    datasets = _import_datasets(f"dataset {dataset}", offline=Path(dataset).exists())
    try:
        return datasets.load_dataset(dataset, config, split=split, streaming=True, **only)
    except Exception as e:
        raise DataError(f"dataset {dataset} ({config or 'default'}, {split}): cannot load: {_one_line(e)}") from None


def _shard_file(rows: Any) -> Optional[str]:
    """The data file a streamed shard reads, where `datasets` says it (a shard is one file), else None."""
    kwargs = getattr(getattr(rows, "_ex_iterable", None), "kwargs", None) or {}
    files = kwargs.get("original_files") or kwargs.get("files")
    return str(files[0]) if isinstance(files, list) and len(files) == 1 else None


def read_dataset_shard(shard: DatasetShard, text_field: str = "text", id_field: str = "id") -> Iterator[Document]:
    """Every row of one dataset shard, streamed, in the dataset's order, only its text and id columns
    read; an error while reading is a DataError naming the shard and its file."""
    rows = _dataset_for_reading(shard.dataset, shard.config, shard.split, text_field, id_field)
    if rows.n_shards != shard.n_shards:
        raise DataError(f"{shard}: the dataset now has {rows.n_shards} shards; its shards changed since listed")
    rows = rows.shard(shard.n_shards, shard.index)
    file = _shard_file(rows)
    where = f"{shard} file {file}" if file else str(shard)
    yield from _read_rows(lambda: rows, where, str(shard), text_field, id_field)


def input_bytes(path: Input) -> Optional[int]:
    """The size of an input file; None for a dataset shard (not known before it is read)."""
    return None if isinstance(path, DatasetShard) else Path(path).stat().st_size


def read_documents(path: Input, text_field: str = "text", id_field: str = "id") -> Iterator[Document]:
    """Documents of any supported input: a dataset shard, or a file by its suffix."""
    if isinstance(path, DatasetShard):
        return read_dataset_shard(path, text_field, id_field)
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes[-1:] == [".parquet"]:
        return read_parquet(path, text_field, id_field)
    if suffixes[-1:] == [".txt"]:
        return read_text_file(path)
    if any(s in (".jsonl", ".json", ".ndjson") for s in suffixes):
        return read_jsonl(path, text_field, id_field)
    raise DataError(f"{path}: unknown input format (expected .jsonl[.gz|.zst], .parquet or .txt)")
