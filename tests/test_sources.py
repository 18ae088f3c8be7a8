"""Readers: JSONL (plain, .gz, .zst), Parquet through `datasets`, plain-text books; bad records named."""

import gzip
import json

import pytest
import zstandard

from data_pipeline.sources import DataError, read_documents

C4_ROWS = [
    {
        "text": "Beginners BBQ Class Taking Place in Missoula!",
        "url": "https://example.org/a",
        "timestamp": "2019-04-25",
    },
    {"text": "Discussion in 'Mac OS X Lion (10.7)' started", "url": "http://b.example", "timestamp": "2019-04-21"},
]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_plain_and_compressed(tmp_path, suffix):
    path = tmp_path / f"c4{suffix}"
    data = jsonl(C4_ROWS)
    compress = {".jsonl": lambda b: b, ".jsonl.gz": gzip.compress, ".jsonl.zst": zstandard.compress}[suffix]
    path.write_bytes(compress(data))
    docs = list(read_documents(path))
    assert [d.text for d in docs] == [r["text"] for r in C4_ROWS]
    assert [d.id for d in docs] == [f"{path}:1", f"{path}:2"]  # C4 has no id: named by file:line


def test_text_and_id_fields_are_configurable(tmp_path):
    path = tmp_path / "redpajama.jsonl"
    path.write_bytes(jsonl([{"raw_content": "body one", "doc_id": 7}, {"content": "x"}]))
    docs = list(read_documents(path, text_field="raw_content", id_field="doc_id"))
    assert (docs[0].text, docs[0].id) == ("body one", "7")
    assert docs[1].dropped == "missing_text" and docs[1].origin == f"{path}:2"


def test_parquet_through_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "slimpajama.parquet"
    rows = [{"text": "first document", "meta": "{}"}, {"text": " ", "meta": "{}"}, {"text": "third", "meta": "{}"}]
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    docs = list(read_documents(path))
    assert [d.text for d in docs if not d.dropped] == ["first document", "third"]
    assert docs[1].dropped == "empty_text" and docs[1].origin == f"{path}:row 2"


def test_plain_text_book_is_one_document(tmp_path):
    book = tmp_path / "pg1661.txt"
    book.write_text("To Sherlock Holmes she is always THE woman.\n\nChapter two.\n")
    (doc,) = read_documents(book)
    assert doc.id == "pg1661" and doc.text.startswith("To Sherlock")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    assert next(read_documents(bad)).dropped == "not_utf8"


def test_unknown_format_is_named(tmp_path):
    with pytest.raises(DataError, match=r"data.csv: unknown input format"):
        read_documents(tmp_path / "data.csv")
