"""Tokenizer, token shards and the packed loader, on real text from the bundled corpus."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from data_pipeline.loader import BatchLoader, PackedSamples
from data_pipeline.shards import Manifest, ShardError, SourceShards
from data_pipeline.sources import DataError, read_jsonl
from data_pipeline.tokenize import TokenizeSettings, is_validation, tokenize_source
from data_pipeline.tokenizer import Tokenizer, file_sha256, train_tokenizer


def test_tokenizer_splits_digits_falls_back_to_bytes_and_has_llama_ids(tiny_data):
    tok = Tokenizer(tiny_data["tokenizer"])
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.sp.pad_id()) == (0, 1, 2, -1)
    assert tok.encode("hi", bos=True, eos=True)[0] == 1 and tok.encode("hi", bos=True, eos=True)[-1] == 2
    pieces = tok.sp.encode("year 20251987", out_type=str)
    digits = [p.lstrip("\u2581") for p in pieces if p.lstrip("\u2581").isdigit()]
    assert "".join(digits) == "20251987" and all(len(d) == 1 for d in digits)
    text = "emoji 🦙 and 漢字 survive"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert any(tok.sp.id_to_piece(i) == "<0xF0>" for i in ids)  # the llama's first UTF-8 byte
    spec = tok.sp.serialized_model_proto()
    assert b"identity" in spec  # normalization rule recorded in the model


def test_tokenizer_training_is_reproducible(tiny_data, tmp_path):
    lines = [d.text for d in read_jsonl(tiny_data["inputs"][tiny_data["sources"][0]]) if d.text][:50]
    sha = train_tokenizer(lines, tmp_path / "a.model", vocab_size=512, num_threads=1)
    train_tokenizer(lines, tmp_path / "b.model", vocab_size=512, num_threads=1)
    assert sha == file_sha256(tmp_path / "a.model")
    a, b = Tokenizer(tmp_path / "a.model").sp, Tokenizer(tmp_path / "b.model").sp
    assert [a.id_to_piece(i) for i in range(512)] == [b.id_to_piece(i) for i in range(512)]


def test_shards_hold_every_document_framed_by_bos_eos(tiny_data):
    tok = Tokenizer(tiny_data["tokenizer"])
    source = tiny_data["sources"][0]
    manifest = Manifest.load(tiny_data["root"] / source)
    assert manifest.dtype == "uint16" and manifest.tokenizer_sha256 == tok.sha256 and manifest.bos and manifest.eos
    docs = [d for d in read_jsonl(tiny_data["inputs"][source]) if d.text]
    stats = manifest.stats
    assert stats["documents_in"] == len(docs) == sum(stats["documents_written"].values())
    assert stats["documents_written"]["val"] > 0  # some documents are held out
    train = SourceShards(tiny_data["root"] / source, "train")
    shard = train.shards[0]
    first = shard.tokens[shard.offsets[0] : shard.offsets[1]]
    assert first[0] == 1 and first[-1] == 2
    first_train = next(d for d in docs if not is_validation(source, d.id, 0.1))
    assert tok.decode(first[1:-1].tolist()) == first_train.text
    starts = train.doc_starts(0, 200)
    assert starts[0] == 0 and all(train.read(int(s), 1)[0] == 1 for s in starts)


def test_bad_records_are_counted_with_their_line_or_stop_strict(tiny_data, tmp_path):
    src = tmp_path / "bad.jsonl"
    good = json.dumps({"id": "a", "text": "fine text"})
    src.write_bytes(
        "\n".join([good, "{broken", json.dumps({"id": "b", "body": "x"}), json.dumps({"text": "  "})]).encode()
        + b'\n{"text": "\xff\xfe"}\n'
        + (good + "\n").encode()
    )
    settings = TokenizeSettings(source="bad", tokenizer_path=str(tiny_data["tokenizer"]), val_fraction=0.0)
    stats = tokenize_source([src], tmp_path / "out", settings)
    assert stats.documents_in == 6 and stats.documents_written["train"] == 2
    assert dict(stats.dropped) == {"bad_json": 1, "missing_text": 1, "empty_text": 1, "not_utf8": 1}
    assert stats.examples["bad_json"] == [f"{src}:2"]
    with pytest.raises(DataError, match=rf"{src}:2: bad json"):
        tokenize_source([src], tmp_path / "strict", replace(settings, strict=True))


def test_loader_is_a_pure_function_of_seed_and_index(tiny_data):
    a = PackedSamples(tiny_data["root"], seq_len=32, seed=7)
    b = PackedSamples(tiny_data["root"], seq_len=32, seed=7)
    c = PackedSamples(tiny_data["root"], seq_len=32, seed=8)
    assert a.sources == sorted(tiny_data["sources"])
    for i in [0, 5, a.n_windows - 1, a.n_windows + 3, 3 * a.n_windows + 11]:  # epochs past the first too
        assert np.array_equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
        assert a[i][0].shape == (33,)
    assert any(not np.array_equal(a[i][0], c[i][0]) for i in range(10))
    # each source's first epoch visits every one of its windows exactly once, the next is reshuffled
    draws = {s: [] for s in range(len(a.sources))}
    for i in range(2 * a.n_windows + 10):
        source, window = a.locate(i)
        draws[source].append(window)
    for source, windows in draws.items():
        w = a.windows[source]
        assert sorted(windows[:w]) == list(range(w)) and sorted(windows[w : 2 * w]) == list(range(w))
        assert windows[:w] != windows[w : 2 * w]
    # consecutive windows share one token: the last of one is the first of the next
    stream = a.streams[0]
    assert np.array_equal(stream.read(32, 33)[0], stream.read(0, 33)[32])


def test_loader_state_dict_resumes_exactly(tiny_data):
    samples = PackedSamples(tiny_data["root"], seq_len=32, seed=1)
    straight = BatchLoader(samples, global_batch_size=8, micro_batch_size=2)
    batches = [straight.next_batch() for _ in range(6)]
    first = BatchLoader(samples, global_batch_size=8, micro_batch_size=2)
    for _ in range(3):
        first.next_batch()
    resumed = BatchLoader(PackedSamples(tiny_data["root"], seq_len=32, seed=1), global_batch_size=8, micro_batch_size=2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for expected in batches[3:]:
        got = resumed.next_batch()
        assert len(got) == 4
        for (x, y), (ex, ey) in zip(got, expected):
            assert x.equal(ex) and y.equal(ey)
            assert x[:, 1:].equal(y[:, :-1])  # targets are inputs shifted by one
    other_seed = BatchLoader(PackedSamples(tiny_data["root"], seq_len=32, seed=2), 8, 2)
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(first.state_dict())


def test_global_batch_is_the_same_for_any_world_size(tiny_data):
    samples = PackedSamples(tiny_data["root"], seq_len=32, seed=3)
    one = BatchLoader(samples, 8, 2).next_batch()
    whole = np.concatenate([x.numpy() for x, _ in one])
    parts = [
        np.concatenate([x.numpy() for x, _ in BatchLoader(samples, 8, 2, rank=r, world_size=2).next_batch()])
        for r in range(2)
    ]
    assert np.array_equal(np.concatenate(parts), whole)


def test_missing_data_folder_is_named(tmp_path):
    with pytest.raises(ShardError, match=rf"{tmp_path / 'nowhere'}: data folder not found"):
        PackedSamples(tmp_path / "nowhere", seq_len=32)


def test_shard_whose_size_disagrees_with_manifest_is_named(tiny_data, tmp_path):
    root = tmp_path / "tokens"
    shutil.copytree(tiny_data["root"], root)
    source = tiny_data["sources"][0]
    bin_path = root / source / "train-00000.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-6])  # truncated
    with pytest.raises(ShardError, match=rf"{bin_path}: .* bytes, but the manifest says"):
        PackedSamples(root, seq_len=32)


def test_corrupted_shard_fails_checksum(tiny_data, tmp_path):
    root = tmp_path / "tokens"
    shutil.copytree(tiny_data["root"], root)
    source = tiny_data["sources"][0]
    bin_path = root / source / "train-00000.bin"
    data = bytearray(bin_path.read_bytes())
    data[10] ^= 0xFF
    bin_path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{bin_path}: sha256 differs"):
        SourceShards(root / source, "train", verify_checksum=True)


def test_tokenizer_hash_mismatch_is_refused(tiny_data, tmp_path):
    other = tmp_path / "other.model"
    lines = [d.text for d in read_jsonl(tiny_data["inputs"][tiny_data["sources"][0]]) if d.text][:40]
    train_tokenizer(lines, other, vocab_size=512, num_threads=1)
    with pytest.raises(ShardError, match=r"manifest.json: shards were made with tokenizer sha256"):
        PackedSamples(tiny_data["root"], seq_len=32, tokenizer_sha256=file_sha256(other))


def test_prepare_cli_runs_and_skips_finished_work(tmp_path, tiny_data, capsys):
    from data_pipeline.__main__ import main

    src = tiny_data["inputs"][tiny_data["sources"][0]]
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text(
        f"sources:\n  - name: one\n    files: [{src}]\ntokenizer:\n  path: {tmp_path}/tok.model\n  vocab_size: 400\n"
        f"tokenize:\n  output: {tmp_path}/tokens\n"
    )
    assert main(["prepare", str(cfg)]) == 0
    shard = tmp_path / "tokens" / "one" / "train-00000.bin"
    mtime = shard.stat().st_mtime_ns
    assert main(["prepare", str(cfg)]) == 0
    assert shard.stat().st_mtime_ns == mtime  # skipped, not rewritten
    assert main(["verify", str(tmp_path / "tokens"), "--tokenizer", str(tmp_path / "tok.model")]) == 0
    assert main(["prepare", str(cfg), "sources=[{name: two, files: [nowhere.jsonl]}]"]) == 2
    assert "input file not found: nowhere.jsonl" in capsys.readouterr().err


def test_tokenizer_sample_is_weighted_by_source_and_recorded(tiny_data, tmp_path):
    from data_pipeline.__main__ import main

    a, b = (tiny_data["inputs"][s] for s in tiny_data["sources"])
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text(
        f"sources:\n  - name: a\n    files: [{a}]\n    weight: 3\n  - name: b\n    files: [{b}]\n    weight: 1\n"
        f"tokenizer:\n  path: {tmp_path}/tok.model\n  vocab_size: 400\n  sample_bytes: 40000\n"
    )
    assert main(["train-tokenizer", str(cfg)]) == 0
    record = json.loads((tmp_path / "tok.json").read_text())
    assert record["sha256"] == file_sha256(tmp_path / "tok.model")
    taken = record["sample_bytes"]
    assert 30000 <= taken["a"] < 30000 + 20000 and 10000 <= taken["b"] < 10000 + 20000
    assert taken["a"] > 2 * taken["b"]
    assert record["trainer_spec"]["byte_fallback"] is True


def test_prefetching_gives_the_same_batches_and_positions(tiny_data):
    from data_pipeline.loader import PrefetchLoader

    samples = PackedSamples(tiny_data["root"], seq_len=32, seed=4)
    plain = BatchLoader(samples, 8, 4)
    ahead = PrefetchLoader(BatchLoader(samples, 8, 4), depth=3)
    for _ in range(5):
        for (x, y), (px, py) in zip(plain.next_batch(), ahead.next_batch()):
            assert x.equal(px) and y.equal(py)
        assert ahead.state_dict() == plain.state_dict()  # handed out, not built ahead
    ahead.close()
    resumed = PrefetchLoader(BatchLoader(samples, 8, 4))
    resumed.load_state_dict(plain.state_dict())
    assert resumed.next_batch()[0][0].equal(plain.next_batch()[0][0])
    resumed.close()


def test_document_boundaries_as_reset_positions_and_cu_seqlens(tiny_data):
    from data_pipeline.loader import cu_seqlens, document_positions

    assert document_positions(np.array([0, 3, 7]), 10).tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2]
    assert document_positions(np.array([4]), 6).tolist() == [0, 1, 2, 3, 0, 1]  # a document began earlier
    assert cu_seqlens(np.array([0, 1, 2, 0, 1, 0])).tolist() == [0, 3, 5, 6]
    samples = PackedSamples(tiny_data["root"], seq_len=256, seed=0)
    found = 0
    for i in range(20):
        tokens, _ = samples[i]
        positions = samples.positions(i)
        bos = np.flatnonzero(tokens[:-1] == 1)  # every document starts with BOS (id 1)
        assert set(bos.tolist()) <= set(np.flatnonzero(positions == 0).tolist())
        assert np.all(positions[bos] == 0) and np.all(np.diff(positions)[positions[1:] != 0] == 1)
        found += len(bos)
    assert found > 0
    inputs, _, positions = BatchLoader(samples, 4, 2, with_positions=True).next_batch()[0]
    assert positions.shape == inputs.shape and positions[0].tolist() == samples.positions(0).tolist()
