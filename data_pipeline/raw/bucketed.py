"""Source-wide dedup split by hash prefix into buckets on disk, so one task's memory is its bucket's.

The in-memory generators of `data_pipeline.raw.dedup` (and CommonCrawl's `finalize`) define what is
kept: the first occurrence in input order wins. Here the same decisions are reached in three kinds of
tasks that run anywhere, in any number, and leave the same result for any number of buckets B:

1. scan (one task per part, i.e. per input file's documents): each document's keys, with its position
   (part index << 32 | document index in the part), go to the file of bucket `key % B`;
2. bucket (one task per bucket): the records of one bucket from every part, sorted; within a key the
   first position wins and the others are written down as losers (with the winner), sorted by position;
3. apply (one task per part): each part reads its own range of every bucket's losers and writes its
   documents without them, counting drops in a `Tally` with examples naming the document kept.

Three passes use this:
- `line`: CCNet's line dedup. Keys are the 8-byte SHA-1 of a line's normal form (as `LineDeduplicator`)
  and the line group (`line_dedup_group_docs`); losers are (document, line). A document that lost lines
  and is left shorter than `min_chars` is dropped (`short_after_line_dedup`).
- `exact`: the first 16 bytes of `dedup.content_key` (SHA-256 of the whitespace-normalised text).
- `near`: MinHash LSH. The scan writes each document's signature (`num_perm` uint32, as datasketch's
  MinHash with the same seed and permutations) and shingle count beside the part, and one record per
  LSH band (the band's hash); a bucket task verifies every pair sharing a band with the containment
  estimate of `dedup.near_dedup` and writes the pairs that pass (later, earlier); one task per source
  then walks those pairs in input order and drops a document when it overlaps one that is kept, which
  is `near_dedup`'s greedy rule; its memory is the number of such pairs, not the corpus.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

from data_pipeline.raw.common import Tally
from data_pipeline.raw.dedup import MinHasher, containment, content_key
from data_pipeline.raw.filters import normalize_line, too_short
from data_pipeline.shards import atomic_open

PART_SHIFT = 32  # a position is part << 32 | document index within the part

LINE_RECORD = np.dtype([("g", "<u8"), ("h", "<u8"), ("pos", "<u8"), ("line", "<u4")])
LINE_LOSER = np.dtype([("pos", "<u8"), ("line", "<u4")])
EXACT_RECORD = np.dtype([("h1", "<u8"), ("h2", "<u8"), ("pos", "<u8")])
BAND_RECORD = np.dtype([("h", "<u8"), ("pos", "<u8")])
PAIR = np.dtype([("pos", "<u8"), ("winner", "<u8")])  # a loser and the document it lost to


def position(part: int, index: int) -> int:
    """The global position of document `index` of part `part`."""
    return part << PART_SHIFT | index


def part_range(part: int) -> tuple[int, int]:
    return part << PART_SHIFT, (part + 1) << PART_SHIFT


def read_jsonl_gz(path: Path) -> Iterator[dict]:
    """The documents of a JSONL.gz file, in order."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


WORK_LEVEL = 1  # gzip level of the files between stages: deflate at 9 is ~10x the JSON cost, at 1 ~1x
OUTPUT_LEVEL = 6  # gzip level of the output shards (gzip's own default)


@contextmanager
def jsonl_gz(path: Path, level: int = WORK_LEVEL) -> Iterator[Callable[[dict], None]]:
    """A function writing documents to the JSONL.gz file `path`, put in place whole when the block ends
    (`shards.atomic_open`), with no time or name in the gzip header, so equal documents give equal bytes
    on every run and machine."""
    with (
        atomic_open(path) as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=level) as gz,
    ):
        yield lambda doc: gz.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))


def empty_gzip(fileobj: BinaryIO) -> None:
    """Write a gzip member with nothing in it (what an output shard without documents holds)."""
    gzip.GzipFile(filename="", mode="wb", fileobj=fileobj, mtime=0, compresslevel=OUTPUT_LEVEL).close()


def save_array(path: Path, array: np.ndarray) -> None:
    """`np.save` to `path`, put in place whole."""
    with atomic_open(path) as f:
        np.save(f, array, allow_pickle=False)


def split_by_bucket(records: np.ndarray, key: np.ndarray, buckets: int) -> list[np.ndarray]:
    """The records of each bucket (`key % buckets`), in their order."""
    which = key % np.uint64(buckets)
    return [records[which == b] for b in range(buckets)]


def write_buckets(folder: Path, part: int, records: np.ndarray, key: np.ndarray, buckets: int) -> None:
    """A part's records as one file per bucket: `folder/b<k>/<part>.npy`."""
    for b, chunk in enumerate(split_by_bucket(records, key, buckets)):
        (folder / f"b{b:05d}").mkdir(parents=True, exist_ok=True)
        save_array(folder / f"b{b:05d}" / f"{part:08d}.npy", chunk)


def read_bucket(folder: Path, bucket: int, parts: int, dtype: np.dtype) -> np.ndarray:
    """Every part's records of one bucket, in part order."""
    chunks = [np.load(folder / f"b{bucket:05d}" / f"{p:08d}.npy") for p in range(parts)]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype)


def losers_in(files: list[Path], part: int) -> np.ndarray:
    """The losers of one part from each bucket's sorted loser file (only that range is read)."""
    lo, hi = part_range(part)
    found = []
    for path in files:
        losers = np.load(path, mmap_mode="r")
        start, end = np.searchsorted(losers["pos"], [lo, hi])
        found.append(np.array(losers[start:end]))
    return np.sort(np.concatenate(found), order=list(found[0].dtype.names)) if found else np.zeros(0)


def write_ids(path: Path, docs_ids: list[str]) -> None:
    """The part's document ids in order (to name the document kept in a drop's example)."""
    with atomic_open(path) as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=1) as f:
        f.write("".join(json.dumps(i) + "\n" for i in docs_ids).encode("utf-8"))


class IdLookup:
    """The id of the document at a position, from the scan's id files (each read once, when first asked)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.cache = folder, {}

    def __call__(self, pos: int) -> str:
        part, index = pos >> PART_SHIFT, pos & ((1 << PART_SHIFT) - 1)
        if part not in self.cache:
            with gzip.open(self.folder / f"{part:08d}.ids.gz", "rt", encoding="utf-8") as f:
                self.cache[part] = [json.loads(line) for line in f]
        return self.cache[part][index]


# line: CCNet's line dedup


def line_scan(docs: Iterator[dict], part: int, first_doc: int, group_docs: int) -> np.ndarray:
    """A record for every line that normalises to something: (group, hash, position, line number).
    `first_doc` is the part's first document's number in the source (for `group_docs`)."""
    rows = []
    for i, doc in enumerate(docs):
        group = (first_doc + i) // group_docs if group_docs else 0
        pos = position(part, i)
        for n, line in enumerate(doc["text"].split("\n")):
            normal = normalize_line(line)
            if normal:
                h = int.from_bytes(hashlib.sha1(normal.encode("utf-8")).digest()[:8], "big")
                rows.append((group, h, pos, n))
    return np.array(rows, dtype=LINE_RECORD)


def line_bucket(records: np.ndarray) -> np.ndarray:
    """The (position, line) of every line seen before in its group, sorted."""
    records = records[np.lexsort((records["line"], records["pos"], records["h"], records["g"]))]
    repeat = np.zeros(len(records), bool)
    repeat[1:] = (records["g"][1:] == records["g"][:-1]) & (records["h"][1:] == records["h"][:-1])
    losers = np.zeros(int(repeat.sum()), LINE_LOSER)
    losers["pos"], losers["line"] = records["pos"][repeat], records["line"][repeat]
    return np.sort(losers, order=["pos", "line"])


def line_apply(docs: Iterator[dict], part: int, losers: np.ndarray, min_chars: int, tally: Tally) -> Iterator[dict]:
    """The part's documents without their repeated lines; those left too short are dropped."""
    removed: dict[int, set[int]] = {}
    for pos, line in zip(losers["pos"].tolist(), losers["line"].tolist()):
        removed.setdefault(pos, set()).add(line)
    for i, doc in enumerate(docs):
        gone = removed.get(position(part, i))
        if not gone:
            yield doc
            continue
        text = "\n".join(line for n, line in enumerate(doc["text"].split("\n")) if n not in gone)
        if too_short(text, min_chars):
            tally.drop("short_after_line_dedup", doc["meta"].get("url") or doc["id"], doc["text"])
        else:
            yield {**doc, "text": text}


# exact: content hash


def exact_scan(docs: Iterator[dict], part: int, ids: list[str]) -> np.ndarray:
    """A record per document: (the first 16 bytes of its content key, its position); ids appended to `ids`."""
    rows = []
    for i, doc in enumerate(docs):
        key = content_key(doc["text"])
        rows.append((int.from_bytes(key[:8], "big"), int.from_bytes(key[8:16], "big"), position(part, i)))
        ids.append(doc["id"])
    return np.array(rows, dtype=EXACT_RECORD)


def exact_bucket(records: np.ndarray) -> np.ndarray:
    """(position, first position with the same key) for every later copy, sorted by position."""
    records = records[np.lexsort((records["pos"], records["h2"], records["h1"]))]
    if not len(records):
        return np.zeros(0, PAIR)
    new = np.ones(len(records), bool)
    new[1:] = (records["h1"][1:] != records["h1"][:-1]) | (records["h2"][1:] != records["h2"][:-1])
    first = records["pos"][np.maximum.accumulate(np.where(new, np.arange(len(records)), 0))]
    pairs = np.zeros(int((~new).sum()), PAIR)
    pairs["pos"], pairs["winner"] = records["pos"][~new], first[~new]
    return np.sort(pairs, order="pos")


def drop_pairs(
    docs: Iterator[dict], part: int, pairs: np.ndarray, reason: str, how: str, name: IdLookup, tally: Tally
) -> Iterator[dict]:
    """The part's documents except the losers of `pairs`, each counted under `reason` naming its winner."""
    winners = dict(zip(pairs["pos"].tolist(), pairs["winner"].tolist()))
    for i, doc in enumerate(docs):
        winner = winners.get(position(part, i))
        if winner is None:
            yield doc
        else:
            tally.drop(reason, f"{doc['id']} ({how} {name(winner)})", doc["text"])


# near: MinHash LSH with containment


def band_keys(hasher: MinHasher, signatures: np.ndarray) -> np.ndarray:
    """(documents, bands) 64-bit keys: a hash of the band's number and its rows of the signature."""
    keys = np.zeros((len(signatures), hasher.bands), np.uint64)
    for d, sig in enumerate(signatures):
        for b in range(hasher.bands):
            band = sig[b * hasher.rows : (b + 1) * hasher.rows].tobytes()
            digest = hashlib.blake2b(band, digest_size=8, salt=b.to_bytes(16, "little")).digest()
            keys[d, b] = int.from_bytes(digest, "little")
    return keys


def near_scan(docs: Iterator[dict], part: int, hasher: MinHasher, ids: list[str]) -> tuple[np.ndarray, ...]:
    """(signatures, shingle counts, band records) of the part's documents; ids appended to `ids`."""
    sigs, sizes = [], []
    for doc in docs:
        sketch, size = hasher.sketch(doc["text"])
        sigs.append(sketch.hashvalues.astype(np.uint32))  # datasketch keeps them below 2**32
        sizes.append(size)
        ids.append(doc["id"])
    signatures = np.array(sigs, np.uint32).reshape(len(sigs), hasher.num_perm)
    keys = band_keys(hasher, signatures)
    records = np.zeros(keys.size, BAND_RECORD)
    records["h"] = keys.reshape(-1)
    records["pos"] = np.repeat([position(part, i) for i in range(len(sigs))], hasher.bands).astype(np.uint64)
    return signatures, np.array(sizes, np.uint64), records


class Signatures:
    """Random access to the scan's signature and size files (memory-mapped, opened once per part)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.open = folder, {}

    def get(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sigs, sizes = [], []
        for pos in positions.tolist():
            part, index = pos >> PART_SHIFT, pos & ((1 << PART_SHIFT) - 1)
            if part not in self.open:
                if len(self.open) >= 256:  # a bounded number of open memory maps
                    self.open.clear()
                self.open[part] = (
                    np.load(self.folder / f"{part:08d}.sig.npy", mmap_mode="r"),
                    np.load(self.folder / f"{part:08d}.size.npy", mmap_mode="r"),
                )
            sigs.append(self.open[part][0][index])
            sizes.append(self.open[part][1][index])
        return np.array(sigs), np.array(sizes, np.float64)


def near_bucket(records: np.ndarray, signatures: Signatures, threshold: float) -> np.ndarray:
    """(later, earlier) for every pair of documents that share a band and overlap by `threshold` or more
    (containment estimated from the MinHash Jaccard J and the shingle counts, as `dedup.near_dedup`)."""
    records = records[np.lexsort((records["pos"], records["h"]))]
    starts = np.flatnonzero(np.r_[True, records["h"][1:] != records["h"][:-1]])
    ends = np.r_[starts[1:], len(records)]
    pairs = []
    for start, end in zip(starts.tolist(), ends.tolist()):
        if end - start < 2:
            continue
        members = np.unique(records["pos"][start:end])
        sigs, sizes = signatures.get(members)
        for j in range(1, len(members)):
            jaccard = np.count_nonzero(sigs[:j] == sigs[j], axis=1).astype(np.float64) / np.float64(sigs.shape[1])
            for i in np.flatnonzero(containment(jaccard, sizes[:j], sizes[j]) >= threshold).tolist():
                pairs.append((members[j], members[i]))
    return np.unique(np.array(pairs, PAIR)) if pairs else np.zeros(0, PAIR)


def near_greedy(pairs: np.ndarray) -> np.ndarray:
    """In input order, a document overlapping any kept earlier one is dropped: (dropped, the first kept
    earlier one it overlaps), sorted by position."""
    pairs = np.unique(pairs)  # sorted by (later, earlier)
    dropped: dict[int, int] = {}
    later, earlier = pairs["pos"].tolist(), pairs["winner"].tolist()
    for j, i in zip(later, earlier):
        if j not in dropped and i not in dropped:
            dropped[j] = i
    out = np.zeros(len(dropped), PAIR)
    out["pos"], out["winner"] = list(dropped), list(dropped.values())
    return np.sort(out, order="pos")
