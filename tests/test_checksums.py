"""Checkpoint checksums taken as the files are written and read (pretrain/digests.py): the digest of a file
read in any order is the file's, a save reads none of DCP's data back and a resume reads each once, and a
checkpoint listed with sha256 (before XXH3) is still checked."""

from __future__ import annotations

import hashlib
import json
import os
import random

import pytest
import torch

from conftest import ROOT
from pretrain import checkpoint
from pretrain.checkpoint import CHECKSUMS, CheckpointError, CheckpointManager
from pretrain.config import load_config
from pretrain.digests import HashingFileSystem, file_digest
from pretrain.parallel import build_strategy


def test_a_file_read_in_any_order_is_hashed_as_a_whole(tmp_path):
    """Forward jumps, backward re-reads, overlaps, readinto, readline, the end never read: the digest when the
    file is closed is the whole file's, each byte hashed once."""
    path = tmp_path / "data.bin"
    data = random.Random(0).randbytes(3 * (1 << 20) + 12345).replace(b"\n", b"x")
    data = data[:1000] + b"\n" + data[1001:]
    path.write_bytes(data)
    files = HashingFileSystem()
    with files.create_stream(path, "rb") as f:
        f.seek(2_000_000)
        assert f.read(100) == data[2_000_000:2_000_100]  # a jump: bytes before it hashed first
        f.seek(10)
        assert f.read(50) == data[10:60]  # back: already hashed
        f.seek(1_999_950)
        buffer = bytearray(200)  # overlaps what was hashed and what was not
        assert f.readinto(buffer) == 200 and bytes(buffer) == data[1_999_950:2_000_150]
        f.seek(990)
        assert f.readline() == data[990:1001]
    assert files.digests[path] == [len(data), file_digest(path)]
    untouched = HashingFileSystem()
    with untouched.create_stream(path, "rb"):
        pass
    assert untouched.digests[path] == [len(data), file_digest(path)]


def test_a_written_file_is_hashed_as_written_and_follows_a_rename(tmp_path):
    files = HashingFileSystem()
    with files.create_stream(tmp_path / "a.tmp", "wb") as f:
        f.write(b"hello ")
        f.write(memoryview(torch.arange(10, dtype=torch.float32).numpy()))
    files.rename(tmp_path / "a.tmp", tmp_path / "a")
    assert files.digests == {tmp_path / "a": [(tmp_path / "a").stat().st_size, file_digest(tmp_path / "a")]}


@pytest.fixture
def tiny_run():
    """A debug model and its AdamW with moments, under `single` on the CPU."""
    cfg = load_config(
        ROOT / "configs/model/debug.yaml",
        ["model.dim=64", "model.n_layers=2", "model.vocab_size=512", "train.device=cpu", "train.precision=fp32"],
    )
    strategy = build_strategy(cfg)
    model, optimizer = strategy.setup(cfg)
    tokens = torch.randint(0, 512, (2, 16))
    model(tokens, tokens).backward()
    optimizer.step()
    return strategy, model, optimizer


COMMON = {"scheduler": {}, "data": {}, "config": {"model": {}}}


@pytest.mark.parametrize("asynchronous", [False, True])
def test_no_dcp_file_is_read_back_to_checksum_a_save_or_a_resume(tmp_path, tiny_run, monkeypatch, asynchronous):
    """Checksums of DCP's files come from the bytes as they pass: hashing one from disk (reading it a second
    time) fails this test; the listing still equals the files, and a resume restores the values."""
    strategy, model, optimizer = tiny_run
    from_disk = []
    real = checkpoint.file_digest
    monkeypatch.setattr(checkpoint, "file_digest", lambda path, *a: from_disk.append(str(path)) or real(path, *a))
    manager = CheckpointManager(tmp_path, strategy, keep_last=2)
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    folder = manager.save(1, model, optimizer, COMMON, asynchronous)
    manager.wait()
    listing = json.loads((folder / CHECKSUMS).read_text())
    assert listing["algorithm"] == "xxh3_128"
    assert {name: entry[1] for name, entry in listing["files"].items()} == {
        name: real(folder / name) for name in listing["files"]
    }
    assert any(name.endswith(".distcp") for name in listing["files"])
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    CheckpointManager(tmp_path, strategy, keep_last=2).load(folder, model, optimizer)
    assert all(torch.equal(p, saved[name]) for name, p in model.named_parameters())
    assert [p for p in from_disk if p.endswith(".distcp")] == [], from_disk


def test_a_checkpoint_listed_with_sha256_is_still_checked(tmp_path, tiny_run):
    """checksums.json written before XXH3 (no "algorithm", sha256 digests): read and compared with sha256."""
    strategy, model, optimizer = tiny_run
    folder = CheckpointManager(tmp_path, strategy, keep_last=2).save(1, model, optimizer, COMMON)
    listing = json.loads((folder / CHECKSUMS).read_text())
    old = {
        n: [size, hashlib.sha256((folder / n).read_bytes()).hexdigest()] for n, (size, _) in listing["files"].items()
    }
    (folder / CHECKSUMS).write_text(json.dumps({"files": old}))
    CheckpointManager(tmp_path, strategy, keep_last=2).load(folder, model, optimizer)
    shard = next(folder.glob("dcp/*.distcp"))
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CheckpointError, match=f"{shard} does not match the checksum it was written with"):
        CheckpointManager(tmp_path, strategy, keep_last=2).load(folder, model, optimizer)


def test_each_rank_checksums_its_own_files_and_every_file_has_one_rank():
    from pretrain.checkpoint import owned

    names = sorted(
        ["dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "rng-rank00000.pt", "rng-rank00001.pt"]
        + ["trainer.pt", "deepspeed/a.pt", "deepspeed/b.pt"]
    )
    shares = [owned(names, rank, 2) for rank in (0, 1)]
    assert {"dcp/__0_0.distcp", "rng-rank00000.pt", "dcp/.metadata", "trainer.pt"} <= set(shares[0])
    assert {"dcp/__1_0.distcp", "rng-rank00001.pt"} <= set(shares[1])
    assert sorted(shares[0] + shares[1]) == names  # each file once
    assert owned(names, 0, 1) == names  # one process: all
    assert sorted(owned(names, 0, 4) + owned(names, 1, 4) + owned(names, 2, 4) + owned(names, 3, 4)) == names
