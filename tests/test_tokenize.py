"""Tokenization at scale: per-file shards, resume after a kill, machines and workers splitting a source."""

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

import data_pipeline.tokenize as tok_mod
from data_pipeline.shards import STALE_TMP_SECONDS, Manifest
from data_pipeline.sources import DataError
from data_pipeline.tokenize import TokenizeSettings, tokenize_source


@pytest.fixture(scope="module")
def four_files(tiny_data, tmp_path_factory) -> list[Path]:
    """One source in four input files."""
    base = tmp_path_factory.mktemp("four")
    lines = [ln for p in tiny_data["inputs"].values() for ln in p.read_text().split("\n") if ln]
    files = []
    for k in range(4):
        path = base / f"part{k}.jsonl"
        path.write_text("".join(line + "\n" for line in lines[k::4]))
        files.append(path)
    return files


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def settings(tiny_data) -> TokenizeSettings:
    return TokenizeSettings(source="src", tokenizer_path=str(tiny_data["tokenizer"]), val_fraction=0.1)


def test_one_shard_pair_per_input_and_counts_add_up(tiny_data, four_files, tmp_path):
    stats = tokenize_source(four_files, tmp_path / "out", settings(tiny_data))
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert [n for n in names if n.endswith(".bin")] == [f"{s}-{i:05d}.bin" for s in ("train", "val") for i in range(4)]
    lines = sum(len(p.read_text().splitlines()) for p in four_files)
    assert stats.documents_in == lines == sum(stats.documents_written.values()) + sum(stats.dropped.values())
    manifest = Manifest.load(tmp_path / "out")
    assert manifest.stats["documents_in"] == lines and len(manifest.shards) == 8


def test_killed_run_resumes_to_byte_identical_shards(tiny_data, four_files, tmp_path, monkeypatch):
    tokenize_source(four_files, tmp_path / "whole", settings(tiny_data))
    real = tok_mod.tokenize_file

    def dies_on_third_file(index, path, output, s):
        if index == 2:
            half = output / "train-00002.bin.4242.0badcafe.tmp"  # killed mid-write, long ago
            half.write_bytes(b"half a shard")
            os.utime(half, (time.time() - 2 * STALE_TMP_SECONDS,) * 2)
            raise KeyboardInterrupt
        return real(index, path, output, s)

    monkeypatch.setattr(tok_mod, "tokenize_file", dies_on_third_file)
    with pytest.raises(KeyboardInterrupt):
        tokenize_source(four_files, tmp_path / "broken", settings(tiny_data))
    assert not (tmp_path / "broken" / "manifest.json").exists()
    done = sorted(p.name for p in (tmp_path / "broken").glob("part-*.json"))
    assert done == ["part-00000.json", "part-00001.json"]
    monkeypatch.setattr(tok_mod, "tokenize_file", real)
    calls = []
    monkeypatch.setattr(tok_mod, "tokenize_file", lambda *a: calls.append(a[0]) or real(*a))
    tokenize_source(four_files, tmp_path / "broken", settings(tiny_data))
    assert calls == [2, 3]  # finished files are skipped
    assert folder_bytes(tmp_path / "broken") == folder_bytes(tmp_path / "whole")  # the stale temporary removed


def test_two_machines_and_two_workers_give_the_shards_of_one(tiny_data, four_files, tmp_path):
    tokenize_source(four_files, tmp_path / "one", settings(tiny_data))
    first = tokenize_source(four_files, tmp_path / "split", settings(tiny_data), machine=(1, 2))
    assert first is None and not (tmp_path / "split" / "manifest.json").exists()
    assert sorted(p.name for p in (tmp_path / "split").glob("part-*")) == ["part-00001.json", "part-00003.json"]
    tokenize_source(four_files, tmp_path / "split", settings(tiny_data), machine=(0, 2))
    assert folder_bytes(tmp_path / "split") == folder_bytes(tmp_path / "one")
    tokenize_source(four_files, tmp_path / "workers", settings(tiny_data), workers=2)
    assert folder_bytes(tmp_path / "workers") == folder_bytes(tmp_path / "one")


def test_a_changed_tokenizer_redoes_the_files(tiny_data, four_files, tmp_path):
    out = tmp_path / "out"
    tokenize_source(four_files, out, settings(tiny_data))
    part = json.loads((out / "part-00000.json").read_text())
    part["tokenizer_sha256"] = "0" * 64
    (out / "part-00000.json").write_text(json.dumps(part))
    before = (out / "train-00001.bin").stat().st_mtime_ns
    tokenize_source(four_files, out, settings(tiny_data))
    assert json.loads((out / "part-00000.json").read_text())["tokenizer_sha256"] != "0" * 64
    assert (out / "train-00001.bin").stat().st_mtime_ns == before


def test_documents_stream_to_the_shard_before_the_file_ends(tiny_data, four_files, tmp_path, monkeypatch):
    real = tok_mod.read_documents
    seen = []

    def watched(path, *args):
        for n, doc in enumerate(real(path, *args)):
            if n == 20:  # after 20 documents, batches of 2 are already on disk, not held in memory
                (partial,) = (tmp_path / "small").glob("train-00000.bin.*.tmp")
                seen.append(partial.stat().st_size)
            yield doc

    monkeypatch.setattr(tok_mod, "read_documents", watched)
    tokenize_source(four_files[:1], tmp_path / "small", replace(settings(tiny_data), batch_docs=2))
    assert seen and seen[0] > 0
    monkeypatch.setattr(tok_mod, "read_documents", real)
    tokenize_source(four_files[:1], tmp_path / "whole", settings(tiny_data))
    tokenize_source(four_files[:1], tmp_path / "bytes", replace(settings(tiny_data), batch_bytes=1))
    # chunked writing gives the bytes of one write, and leaves no temporary file
    assert folder_bytes(tmp_path / "small") == folder_bytes(tmp_path / "whole") == folder_bytes(tmp_path / "bytes")


def test_a_failed_file_leaves_no_temporary_shard(tiny_data, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"id": "a", "text": "fine text"}) + "\n{broken\n")
    with pytest.raises(DataError, match="bad json"):
        tokenize_source([src], tmp_path / "out", replace(settings(tiny_data), strict=True))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_is_a_plain_line_off_a_terminal(tiny_data, four_files, tmp_path, capsys, monkeypatch, workers):
    monkeypatch.setenv("LLAMA_PROGRESS_EVERY", "0")
    stats = tokenize_source(four_files, tmp_path / "out", settings(tiny_data), workers=workers, progress=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tokenize src: ")]
    assert len(lines) >= 4 and "\r" not in err  # a line per update (interval 0), no bar
    total = sum(p.stat().st_size for p in four_files)
    assert lines[-1].startswith(f"tokenize src: 4/4 files (100.0%), {stats.documents_in:,} docs")
    assert f"{total / 1e6:.1f} MB" in lines[-1] or f"{total / 1e3:.1f} kB" in lines[-1]
