"""The loader over a source cut into many shards: batches equal a plain read of the whole stream."""

from pathlib import Path

import numpy as np
import pytest

from data_pipeline.loader import BatchLoader, PackedSamples
from data_pipeline.shards import Manifest, ShardWriter, SourceShards


@pytest.fixture(scope="module")
def many_shards(tiny_data, tmp_path_factory) -> Path:
    """Each tiny source's train stream cut into 40 shards of 0 to a few documents (empty ones too)."""
    root = tmp_path_factory.mktemp("many_shards")
    rng = np.random.default_rng(0)
    for source in tiny_data["sources"]:
        stream = SourceShards(tiny_data["root"] / source, "train")
        bounds = stream.shards[0].offsets.astype(np.int64)
        assert len(stream.shards) == 1
        cuts = np.sort(np.concatenate([[0, len(bounds) - 1], rng.integers(0, len(bounds), 38)]))
        folder = root / source
        folder.mkdir()
        manifest = Manifest(**{k: v for k, v in vars(stream.manifest).items() if k not in ("shards", "stats")})
        for k, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
            with ShardWriter(folder, f"train-{k:05d}", "train", np.dtype(manifest.dtype), []) as shard:
                shard.write(stream.read(bounds[lo], bounds[hi] - bounds[lo]), np.diff(bounds[lo : hi + 1]))
            manifest.shards.append(shard.info)
        assert any(s.documents == 0 for s in manifest.shards) and len(manifest.shards) == 39
        manifest.save(folder)
    return root


def test_batches_equal_a_plain_read_of_the_concatenated_stream(tiny_data, many_shards):
    seq_len = 48
    samples = PackedSamples(many_shards, seq_len=seq_len, seed=3, weights={s: 1.0 for s in tiny_data["sources"]})
    whole = {}
    for number, source in enumerate(samples.sources):
        stream = SourceShards(tiny_data["root"] / source, "train")
        whole[number] = (stream.shards[0].tokens.astype(np.int64), stream.shards[0].offsets[:-1].astype(np.int64))
    loader = BatchLoader(samples, global_batch_size=12, micro_batch_size=3, with_positions=True, start_index=50)
    index = 50
    for _ in range(2 * sum(samples.windows) // 12):  # about two epochs: every window, many crossing shards
        for inputs, targets, positions in loader.next_batch():
            sources, windows, _ = samples.mixture.locate_many(np.arange(index, index + len(inputs)))
            for row, (source, window) in enumerate(zip(sources, windows)):
                tokens, doc_starts = whole[int(source)]
                start = int(window) * seq_len
                expected = tokens[start : start + seq_len + 1]
                assert inputs[row].tolist() == expected[:-1].tolist() and targets[row].tolist() == expected[1:].tolist()
                at = np.arange(start, start + seq_len)  # each token: how far since its document began (or the sample)
                began = np.maximum(doc_starts[np.searchsorted(doc_starts, at, side="right") - 1], start)
                assert positions[row].tolist() == (at - began).tolist()
            index += len(inputs)


def write_source(folder: Path, like: Path, shards: dict[str, list[np.ndarray]], masked: bool = False) -> None:
    """A source folder of `shards` (a name such as "train-00000" -> its documents' tokens, one array each;
    with `masked`, a loss mask: each token's id parity), its manifest's tokenizer that of source folder `like`."""
    folder.mkdir(parents=True)
    base = Manifest.load(like)
    manifest = Manifest(**{k: v for k, v in vars(base).items() if k not in ("shards", "stats")})
    for name, docs in shards.items():
        tokens = np.concatenate(docs)
        with ShardWriter(folder, name, name.split("-")[0], np.dtype(manifest.dtype), [], masked) as shard:
            shard.write(tokens, np.array([len(d) for d in docs]), tokens % 2 if masked else None)
        manifest.shards.append(shard.info)
    manifest.save(folder)


@pytest.mark.parametrize("n_tokens, windows", [(5 * 16, 4), (5 * 16 + 1, 5)], ids=["5-seq-len", "5-seq-len-plus-1"])
def test_a_stream_of_whole_windows_counts_those_that_fit_and_reads_each(tiny_data, tmp_path, n_tokens, windows):
    """A sample is seq_len + 1 tokens and windows start every seq_len: a stream of exactly 5 x seq_len tokens
    holds 4 windows (a fifth would need the token after the end), one token more makes 5."""
    seq_len = 16
    stream = np.random.default_rng(0).integers(0, 512, n_tokens)
    docs = np.split(stream, [7, 30, 50])  # in two shards, cut at token 30
    like = tiny_data["root"] / tiny_data["sources"][0]
    write_source(tmp_path / "exact", like, {"train-00000": docs[:2], "train-00001": docs[2:]})
    samples = PackedSamples(tmp_path, seq_len=seq_len)
    assert samples.windows == [windows] and samples.n_windows == windows
    tokens, _, _, _ = samples.batch(range(2 * windows))  # two epochs: every window twice, the last one included
    read = {}
    for index, row in enumerate(tokens):
        window = samples.locate(index)[1]
        assert row.tolist() == stream[window * seq_len : (window + 1) * seq_len + 1].tolist()
        read[window] = read.get(window, 0) + 1
    assert read == {w: 2 for w in range(windows)}
