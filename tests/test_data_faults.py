"""Faults the data pipeline meets in production, each refused or counted by name: text no UTF-8 can hold,
a byte-order mark, a lost manifest, flipped shard bytes (training and held-out), two writers of one file,
a killed tokenize job, a damaged or changed loader state."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.__main__ import main
from data_pipeline.loader import BatchLoader, PackedSamples, PrefetchLoader
from data_pipeline.shards import (
    STALE_TMP_SECONDS,
    Manifest,
    ShardError,
    ShardWriter,
    SourceShards,
    atomic_open,
    remove_stale_temporaries,
)
from data_pipeline.sources import read_documents, read_jsonl
from data_pipeline.tally import Tally
from data_pipeline.tokenize import TokenizeSettings, TokenizeStats, tokenize_source

ROOT = Path(__file__).resolve().parent.parent


def copy_tokens(tiny_data: dict, tmp_path: Path) -> Path:
    """A private copy of the tiny token root, to damage."""
    root = tmp_path / "tokens"
    shutil.copytree(tiny_data["root"], root)
    return root


# --- records no UTF-8 can hold, and a byte-order mark ---------------------------------------------


def test_lone_surrogate_is_a_bad_record_with_its_line_and_the_rest_is_tokenized(tiny_data, tmp_path, capsys):
    src = tmp_path / "surrogates.jsonl"
    lines = [
        json.dumps({"id": "a", "text": "fine text"}),
        '{"id": "b", "text": "half a pair \\ud800 here"}',  # valid JSON, not valid Unicode
        '{"id": "c\\udfff", "text": "an id no UTF-8 can hold"}',
        json.dumps({"id": "d", "text": "more fine text"}),
    ]
    src.write_text("\n".join(lines) + "\n")
    settings = TokenizeSettings(source="s", tokenizer_path=str(tiny_data["tokenizer"]), val_fraction=0.0)
    stats = tokenize_source([src], tmp_path / "out", settings)
    assert stats.documents_in == 4 and stats.documents_written["train"] == 2
    assert stats.dropped == {"bad_unicode": 2} and stats.examples["bad_unicode"] == [f"{src}:2", f"{src}:3"]

    # the CLI trains a tokenizer on the same file, then tokenizes it, naming the lines
    cfg = tmp_path / "pipe.yaml"
    good = tiny_data["inputs"][tiny_data["sources"][0]]
    cfg.write_text(
        f"sources:\n  - name: one\n    files: [{good}, {src}]\n"
        f"tokenizer:\n  path: {tmp_path}/tok.model\n  vocab_size: 400\n"
        f"tokenize:\n  output: {tmp_path}/tokens\n"
    )
    assert main(["prepare", str(cfg)]) == 0
    assert f"one: dropped 2 (bad_unicode), e.g. {src}:2, {src}:3" in capsys.readouterr().out


def test_a_byte_order_mark_does_not_cost_the_first_record(tmp_path):
    src = tmp_path / "bom.jsonl"
    records = [{"id": str(i), "text": f"document {i}"} for i in range(3)]
    src.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in records).encode())
    docs = list(read_jsonl(src))
    assert [d.text for d in docs] == ["document 0", "document 1", "document 2"]
    assert not any(d.dropped for d in docs)
    book = tmp_path / "book.txt"
    book.write_bytes(b"\xef\xbb\xbfCall me Ishmael.")
    assert next(read_documents(book)).text == "Call me Ishmael."


# --- one drop counter --------------------------------------------------------------------------------


def test_tokenize_stats_count_drops_as_a_tally_and_keep_their_order_through_part_records(tiny_data, tmp_path):
    assert issubclass(TokenizeStats, Tally)
    first = tmp_path / "first.jsonl"  # not_utf8 before bad_json: the examples keep that order
    first.write_bytes(b'{"text": "\xff"}\n{broken\n' + json.dumps({"id": "x", "text": "fine"}).encode() + b"\n")
    second = tmp_path / "second.jsonl"
    second.write_text(json.dumps({"text": ""}) + "\n" + "{broken\n" * 6)
    settings = TokenizeSettings(source="s", tokenizer_path=str(tiny_data["tokenizer"]), val_fraction=0.0)
    stats = tokenize_source([first, second], tmp_path / "out", settings)
    assert stats.to_dict() == Manifest.load(tmp_path / "out").stats
    assert list(stats.examples) == ["not_utf8", "bad_json", "empty_text"]
    assert stats.examples["bad_json"] == [f"{first}:2", *(f"{second}:{line}" for line in range(2, 6))]  # five
    assert stats.dropped == {"not_utf8": 1, "bad_json": 7, "empty_text": 1} and stats.docs_out == 1
    assert TokenizeStats.from_dict(stats.to_dict()).to_dict() == stats.to_dict()


# --- a lost manifest ---------------------------------------------------------------------------------


def test_a_folder_of_shards_without_its_manifest_is_named_by_training_and_verify(tiny_data, tmp_path, capsys):
    root = copy_tokens(tiny_data, tmp_path)
    lost = root / tiny_data["sources"][1]
    (lost / "manifest.json").unlink()
    with pytest.raises(ShardError, match=rf"{lost}: token shards without a manifest.json"):
        PackedSamples(root, seq_len=32)
    assert main(["verify", str(root)]) == 2
    assert f"{lost}: token shards without a manifest.json" in capsys.readouterr().err
    assert main(["verify", str(root / tiny_data["sources"][0])]) == 0  # a source folder itself


def test_verify_refuses_a_shard_left_out_of_the_manifest(tiny_data, tmp_path, capsys):
    root = copy_tokens(tiny_data, tmp_path)
    folder = root / tiny_data["sources"][0]
    manifest = Manifest.load(folder)
    manifest.shards = [s for s in manifest.shards if s.name != "val-00000"]
    manifest.save(folder)
    assert main(["verify", str(root)]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'val-00000.bin'}, {folder / 'val-00000.idx'}: not listed in {folder / 'manifest.json'}" in err
    assert "1 of 2 source folders" in err


def test_verify_refuses_a_root_without_any_manifest(tmp_path, capsys):
    (tmp_path / "tokens" / "notes").mkdir(parents=True)
    assert main(["verify", str(tmp_path / "tokens")]) == 2
    assert f"{tmp_path / 'tokens'}: no source folder with a manifest.json inside" in capsys.readouterr().err


# --- flipped shard bytes -----------------------------------------------------------------------------


def set_token(bin_path: Path, offset: int, value: int) -> None:
    """Overwrite one uint16 token in place (the file keeps its size)."""
    data = bytearray(bin_path.read_bytes())
    data[2 * offset : 2 * offset + 2] = value.to_bytes(2, "little")
    bin_path.write_bytes(bytes(data))


def test_a_token_id_beyond_the_vocabulary_names_the_shard_and_offset(tiny_data, tmp_path):
    root = copy_tokens(tiny_data, tmp_path)
    bin_path = root / tiny_data["sources"][0] / "train-00000.bin"
    set_token(bin_path, 1000, 0xFFFF)
    samples = PackedSamples(root, seq_len=32)  # sizes agree: opening does not notice
    expected = rf"{bin_path}: token id 65535 at token offset 1000 \(byte 2000\) is not below the vocabulary size 512"
    with pytest.raises(ShardError, match=expected):
        samples.batch(range(2 * samples.n_windows))  # every window of every source


def test_flipped_bytes_are_caught_by_one_ranks_background_checksum(tiny_data, tmp_path):
    root = copy_tokens(tiny_data, tmp_path)
    bin_path = root / tiny_data["sources"][1] / "train-00000.bin"
    data = bin_path.read_bytes()
    set_token(bin_path, 10, 3 if data[20:22] != b"\x03\x00" else 4)  # still a valid id: only a checksum sees it
    samples = PackedSamples(root, seq_len=32)
    failed, checked = [], []
    for rank in range(2):
        loader = BatchLoader(samples, 8, 2, rank=rank, world_size=2)
        checked += [shard.bin_path for shard in loader.verifier.shards]
        try:
            loader.verifier.wait()
        except ShardError as e:
            failed.append(str(e))
            with pytest.raises(ShardError, match=rf"{bin_path}: sha256 differs"):
                PrefetchLoader(loader).next_batch()  # raised in the training thread
    assert sorted(checked) == sorted(s.bin_path for st in samples.streams for s in st.shards)  # each once
    assert len(failed) == 1 and failed[0].startswith(f"{bin_path}: sha256 differs")
    unchecked = BatchLoader(samples, 8, 2, verify_shards=False)
    unchecked.verifier.wait()
    unchecked.next_batch()


def test_training_on_flipped_shards_stops_naming_the_shard(tiny_data, tmp_path):
    from conftest import tiny_config
    from pretrain.trainer import train

    root = copy_tokens(tiny_data, tmp_path)
    for source in tiny_data["sources"]:
        bin_path = root / source / "train-00000.bin"
        tokens = np.fromfile(bin_path, dtype="<u2")
        tokens[::16] = 0xFFFF  # every sample holds one; the file keeps its size
        tokens.tofile(bin_path)
    expected = r"train-00000.bin: (token id 65535 at token offset \d+|sha256 differs)"  # whichever comes first
    with pytest.raises(ShardError, match=expected):
        train(tiny_config(tiny_data, tmp_path / "run", f"data.root={root}", "train.steps=2"))


def test_flipped_bytes_in_a_held_out_shard_stop_the_evaluation_naming_the_shard(tiny_data, tmp_path):
    from conftest import tiny_config
    from pretrain.trainer import train

    root = copy_tokens(tiny_data, tmp_path)
    bin_path = root / tiny_data["sources"][0] / "val-00000.bin"
    data = bin_path.read_bytes()
    set_token(bin_path, 10, 3 if data[20:22] != b"\x03\x00" else 4)  # still a valid id: only a checksum sees it
    with pytest.raises(ShardError, match=rf"{bin_path}: sha256 differs"):
        train(tiny_config(tiny_data, tmp_path / "run", f"data.root={root}", "train.steps=2", "train.eval_every=1"))


@pytest.mark.parametrize("suffix", ["idx", "mask"])
def test_a_flipped_byte_in_the_offsets_or_the_loss_mask_is_caught_by_the_checksum(tiny_data, tmp_path, capsys, suffix):
    """The manifest's sha256 covers each shard's `.idx` (document offsets) and `.mask` (loss mask), not only
    its `.bin`: a flipped byte that leaves the sizes and the last offset as they were is caught by
    `verify`, by the shard check of a source and by the training loader's background check."""
    from test_loader_shards import write_source

    root = copy_tokens(tiny_data, tmp_path)
    folder = root / tiny_data["sources"][0]
    if suffix == "mask":
        folder = root / "sft"
        docs = [np.arange(1, 60), np.arange(100, 190)]
        write_source(folder, root / tiny_data["sources"][0], {"train-00000": docs, "val-00000": docs}, masked=True)
    path = folder / f"train-00000.{suffix}"
    data = bytearray(path.read_bytes())
    data[8] ^= 1  # .idx: the low byte of the first document's end offset; .mask: token 8's flag
    path.write_bytes(bytes(data))
    samples = PackedSamples(root, seq_len=32)  # sizes agree: opening does not notice
    with pytest.raises(ShardError, match=rf"{path}: sha256 differs"):
        SourceShards(folder, "train", verify_checksum=True)
    assert main(["verify", str(root)]) == 2
    assert f"{path}: sha256 differs" in capsys.readouterr().err
    loader = BatchLoader(samples, 8, 2)
    with pytest.raises(ShardError, match=rf"{path}: sha256 differs"):
        loader.verifier.wait()
    loader.close()


# --- two writers of one file -------------------------------------------------------------------------


def test_two_live_writers_of_one_file_both_finish_and_leave_one_whole_copy(tmp_path):
    """Two copies of a task (a requeue while the first still runs) write the same path at once: each
    through its own temporary file, so both renames succeed and the file is one writer's bytes, whole."""
    import threading

    target = tmp_path / "part.bin"
    inside = threading.Barrier(2)
    errors: list[BaseException] = []
    payloads, chunk = {0: bytes(range(256)) * 4096, 1: bytes(reversed(range(256))) * 4096}, 1 << 14

    def write(k: int) -> None:
        try:
            with atomic_open(target, durable=k == 0) as f:
                inside.wait(timeout=10)  # both temporaries open before either is renamed
                for i in range(0, len(payloads[k]), chunk):
                    f.write(payloads[k][i : i + chunk])
                inside.wait(timeout=10)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_bytes() in payloads.values()
    assert [p.name for p in tmp_path.iterdir()] == ["part.bin"]  # no temporary left


def test_a_killed_writers_temporary_is_swept_once_stale(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"done")
    dead, live = tmp_path / "a.bin.4242.0badcafe.tmp", tmp_path / "a.bin.4343.12345678.tmp"
    for path in (dead, live):
        path.write_bytes(b"half")
    os.utime(dead, (time.time() - 2 * STALE_TMP_SECONDS,) * 2)
    (tmp_path / "notes.tmp").write_bytes(b"not ours")
    assert remove_stale_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", live.name, "notes.tmp"]


# --- a killed tokenize job ---------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state != "Z":
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
def test_tokenize_workers_die_with_their_killed_parent(tiny_data, tmp_path):
    inputs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for path in inputs:
        os.mkfifo(path)  # a worker reading one waits for its writer: busy until the test lets go
    script = (
        "import sys; from pathlib import Path; from data_pipeline.tokenize import TokenizeSettings, tokenize_source;"
        "tokenize_source([Path(p) for p in sys.argv[3:]], Path(sys.argv[1]),"
        " TokenizeSettings(source='s', tokenizer_path=sys.argv[2]), workers=2)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "out"), str(tiny_data["tokenizer"]), *map(str, inputs)],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    writers, workers = [], []
    try:
        deadline = time.monotonic() + 120
        for path in inputs:  # opening a FIFO to write succeeds once a worker has it open to read
            while True:
                try:
                    writers.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                    break
                except OSError:
                    assert time.monotonic() < deadline and parent.poll() is None, "workers never opened inputs"
                    time.sleep(0.05)
        workers = children(parent.pid)
        assert len(workers) >= 2  # the two pool workers (and multiprocessing's resource tracker)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while any(map(alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(alive, workers)), "tokenize workers outlived their killed parent"
    finally:
        for fd in writers:
            os.close(fd)
        if parent.poll() is None:
            parent.kill()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# --- loader resume: exact, or refused ----------------------------------------------------------------


def through_a_checkpoint(state: dict) -> dict:
    """A loader state as a checkpoint gives it back (torch.save, torch.load)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


WEIGHTS = {"gutenberg": 0.7, "python_docs": 0.3}


def mixed(root: Path, seed: int = 1, weights: dict | None = None, **kw) -> PackedSamples:
    return PackedSamples(root, seq_len=32, seed=seed, weights=weights or WEIGHTS, **kw)


def test_resume_continues_the_batches_and_the_tokens_seen_per_source(tiny_data):
    assert list(WEIGHTS) == tiny_data["sources"]
    straight = PrefetchLoader(BatchLoader(mixed(tiny_data["root"]), 8, 2))
    expected = [straight.next_batch() for _ in range(6)]
    first = PrefetchLoader(BatchLoader(mixed(tiny_data["root"]), 8, 2))
    for _ in range(2):
        first.next_batch()
    state = through_a_checkpoint(first.state_dict())
    resumed = PrefetchLoader(BatchLoader(mixed(tiny_data["root"]), 8, 2))
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    for batch in expected[2:]:
        assert all(x.equal(rx) and y.equal(ry) for (x, y), (rx, ry) in zip(batch, resumed.next_batch()))
    counts = resumed.tokens_per_source
    assert counts.tolist() == straight.tokens_per_source.tolist() and counts.sum() == 6 * 8 * 32
    assert counts[0] > 2 * counts[1] > 0  # both sources, by weight
    assert resumed.state_dict() == straight.state_dict()
    for loader in (straight, first, resumed):
        loader.close()


def shortened(tiny_data: dict, tmp_path: Path) -> Path:
    """The tiny token root with the first source's train stream cut to half its documents."""
    root = copy_tokens(tiny_data, tmp_path)
    folder = root / tiny_data["sources"][0]
    manifest = Manifest.load(folder)
    shard = SourceShards(folder, "train").shards[0]
    half = shard.offsets[: len(shard.offsets) // 2 + 1].astype(np.int64)
    tokens = np.array(shard.tokens[: half[-1]])
    with ShardWriter(folder, shard.info.name, "train", np.dtype(manifest.dtype), shard.info.inputs) as writer:
        writer.write(tokens, np.diff(half))
    manifest.shards = [writer.info if s.name == writer.name else s for s in manifest.shards]
    manifest.save(folder)
    return root


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(weights={"gutenberg": 0.5, "python_docs": 0.5}), "weights"),
        (dict(weights={"python_docs": 0.3, "gutenberg": 0.7}), "sources"),
        (dict(weights={"gutenberg": 1.0}), "sources"),
        (dict(seed=2), "seed"),
        (dict(data="shortened"), "n_windows"),
    ],
)
def test_resume_with_another_mixture_order_or_data_is_refused(tiny_data, tmp_path, change, key):
    loader = BatchLoader(mixed(tiny_data["root"]), 8, 2)
    loader.next_batch()
    state = through_a_checkpoint(loader.state_dict())
    root = shortened(tiny_data, tmp_path) if change.pop("data", None) else tiny_data["root"]
    other = BatchLoader(mixed(root, **change), 8, 2)
    with pytest.raises(ValueError, match=rf"data loader state was saved with {key}="):
        other.load_state_dict(state)
    BatchLoader(mixed(tiny_data["root"]), 8, 2).load_state_dict(state)  # the same run resumes


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda s: s.pop("tokens_per_source"), r"lacks \['tokens_per_source'\]"),
        (lambda s: s.pop("weights"), r"lacks \['weights'\]"),
        (lambda s: s.update(index=-8), r"index=-8 is not a sample index"),
        (lambda s: s.update(index="16"), r"index='16' is not a sample index"),
        (lambda s: s.update(index=0), r"tokens_per_source=.* within the 0 samples read"),
        (lambda s: s.update(tokens_per_source=[256]), r"tokens_per_source=\[256\] is not one count per source"),
        (lambda s: s.update(tokens_per_source=[300, -44]), r"tokens_per_source=\[300, -44\]"),
        (lambda s: s.update(tokens_per_source=None), r"tokens_per_source=None"),
    ],
)
def test_a_damaged_loader_state_is_refused(tiny_data, damage, match):
    loader = BatchLoader(mixed(tiny_data["root"]), 8, 2)
    loader.next_batch()
    state = through_a_checkpoint(loader.state_dict())
    damage(state)
    fresh = BatchLoader(mixed(tiny_data["root"]), 8, 2)
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(state)
    assert fresh.index == 0 and not fresh.tokens_per_source.any()  # nothing half-restored
