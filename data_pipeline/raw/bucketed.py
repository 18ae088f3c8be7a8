"""Source-wide dedup split by hash prefix into buckets on disk, so one task's memory is its bucket's.

The in-memory generators of `data_pipeline.raw.dedup` (and CommonCrawl's `finalize`) define what is
kept: the first occurrence in input order wins. Here the same decisions are reached in three kinds of
tasks that run anywhere, in any number, and leave the same result for any number of buckets B:

1. scan (one task per part, i.e. per input file's documents): each document's keys, with its position
   (part index << 32 | document index in the part), streamed to one file per part: runs of at most
   `CHUNK_RECORDS` records, each sorted by bucket (`key % B`), and an index of where each bucket's
   records start in each run (`ScanWriter`); so a scan's memory is one run, whatever the part's size,
   and a pass leaves O(parts) files, not O(parts x B);
2. bucket (one task per group of buckets, `bucket_tasks`: at most one per part): for each of its buckets
   in turn, that bucket's records from every part's file (`ScanReader`), sorted; within a key the first
   position wins and the others are written down as losers (with the winner), sorted by position, in
   one file per task;
3. apply (one task per part): each part reads its own range of every bucket task's losers and writes its
   documents without them, counting drops in a `Tally` with examples naming the document kept.

Three passes use this:
- `line`: CCNet's line dedup. Keys are the 8-byte SHA-1 of a line's normal form (as `LineDeduplicator`)
  and the line group (`line_dedup_group_docs`); losers are (document, line). A document that lost lines
  and is left shorter than `min_chars` is dropped (`short_after_line_dedup`).
- `exact`: the first 16 bytes of `dedup.content_key` (SHA-256 of the whitespace-normalised text).
- `near`: MinHash LSH. The scan writes each document's signature (`num_perm` uint32, as datasketch's
  MinHash with the same seed and permutations) and shingle count beside the part, and one record per
  LSH band (the band's hash). A bucket task goes through the documents of each band in input order and
  verifies each against the band's representatives only (its first documents that overlap no earlier
  representative, at most `REPRESENTATIVES`) with the containment estimate of `dedup.near_dedup`,
  writing a pair (later, representative) for each that passes: at most `REPRESENTATIVES` verifications
  and pairs per document and band, so a cluster of N near copies costs O(N), not O(N^2). One task per
  source then walks the pairs in input order and drops a document when it overlaps one that is kept,
  which is `near_dedup`'s greedy rule. What differs from comparing with every kept document: a document
  kept although it overlaps an earlier representative (that representative was dropped) is not a
  representative itself, so a later document that overlaps only it is kept; and a band with more than
  `REPRESENTATIVES` documents that overlap none of the ones before them verifies its later documents
  against the first ones only. Both need chains of partial overlaps; copies of one page never do.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional

import numpy as np

from data_pipeline.raw.common import Tally
from data_pipeline.raw.dedup import MinHasher, containment, content_key
from data_pipeline.raw.filters import normalize_line, too_short
from data_pipeline.shards import atomic_open

PART_SHIFT = 32  # a position is part << 32 | document index within the part
CHUNK_RECORDS = 1 << 18  # a scan task sorts and writes its records in runs of this many (its memory bound)
REPRESENTATIVES = 32  # documents of one band that later ones are verified against (near: see `near_bucket`)
SIGNATURE_BLOCK = 4096  # signatures read at once by a near bucket task

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
def jsonl_gz(path: Path, level: int = WORK_LEVEL, durable: bool = True) -> Iterator[Callable[[dict], None]]:
    """A function writing documents to the JSONL.gz file `path`, put in place whole when the block ends
    (`shards.atomic_open`; `durable=False` for files between stages, whose task marker is the commit
    point), with no time or name in the gzip header, so equal documents give equal bytes on every run
    and machine."""
    with (
        atomic_open(path, durable=durable) as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=level) as gz,
    ):
        yield lambda doc: gz.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))


def empty_gzip(fileobj: BinaryIO) -> None:
    """Write a gzip member with nothing in it (what an output shard without documents holds)."""
    gzip.GzipFile(filename="", mode="wb", fileobj=fileobj, mtime=0, compresslevel=OUTPUT_LEVEL).close()


def bucket_tasks(buckets: int, parts: int) -> int:
    """How many tasks the bucket stage of a pass has: one per bucket, but no more than parts (each task
    then does its buckets one after the other, so its memory is still one bucket's)."""
    return max(1, min(buckets, parts))


def buckets_of(task: int, tasks: int, buckets: int) -> range:
    """The buckets bucket task `task` of `tasks` reduces (contiguous, all of them over all tasks)."""
    return range(task * buckets // tasks, (task + 1) * buckets // tasks)


class ScanWriter:
    """What a scan task writes for one part, streamed: `<part>.rec`, the records in runs of at most
    `chunk` sorted by bucket, then the index (runs x B+1 int64 record offsets: bucket b of run r is
    `[idx[r, b], idx[r, b+1])`) and its shape (two int64); and when asked the document ids (`<part>.ids.gz`)
    and the near pass's signatures and shingle counts (`<part>.sig`, `<part>.size`: raw uint32 / uint64)."""

    def __init__(
        self,
        folder: Path,
        part: int,
        dtype: np.dtype,
        key: str,
        buckets: int,
        ids: bool = False,
        signatures: bool = False,
        chunk: int = CHUNK_RECORDS,
    ) -> None:
        self.folder, self.part, self.dtype = folder, part, dtype
        self.key, self.buckets, self.chunk = key, buckets, chunk
        self.pending: list[np.ndarray] = []
        self.pending_rows = self.written = self.docs = 0
        self.index: list[np.ndarray] = []
        self.stack = ExitStack()
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / f"{part:08d}"
        self.records = self.stack.enter_context(atomic_open(stem.with_suffix(".rec"), durable=False))
        self.ids = self.sig = self.size = None
        if ids:
            raw = self.stack.enter_context(atomic_open(stem.with_suffix(".ids.gz"), durable=False))
            self.ids = self.stack.enter_context(
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=1)
            )
        if signatures:
            self.sig = self.stack.enter_context(atomic_open(stem.with_suffix(".sig"), durable=False))
            self.size = self.stack.enter_context(atomic_open(stem.with_suffix(".size"), durable=False))

    def __enter__(self) -> "ScanWriter":
        return self

    def add(
        self, records: np.ndarray, doc_id: Optional[str] = None, sig: Optional[np.ndarray] = None, size: int = 0
    ) -> None:
        """One document's records (and its id, signature and shingle count where this writer keeps them)."""
        self.docs += 1
        if len(records):
            self.pending.append(records)
            self.pending_rows += len(records)
            if self.pending_rows >= self.chunk:
                self._flush()
        if self.ids is not None:
            self.ids.write((json.dumps(doc_id) + "\n").encode("utf-8"))
        if self.sig is not None:
            self.sig.write(np.ascontiguousarray(sig, "<u4").tobytes())
            self.size.write(np.array([size], "<u8").tobytes())

    def _flush(self) -> None:
        run = np.concatenate(self.pending) if self.pending else np.zeros(0, self.dtype)
        self.pending, self.pending_rows = [], 0
        which = run[self.key] % np.uint64(self.buckets)
        order = np.argsort(which, kind="stable")  # input order kept within a bucket
        counts = np.bincount(which[order].astype(np.int64), minlength=self.buckets)
        self.index.append(self.written + np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
        self.records.write(run[order].tobytes())
        self.written += len(run)

    def __exit__(self, kind, error, trace) -> None:
        if kind is None and (self.pending or not self.index):
            self._flush()
        if kind is None:
            index = np.stack(self.index).astype("<i8")
            self.records.write(index.tobytes() + np.array(index.shape, "<i8").tobytes())
        self.stack.__exit__(kind, error, trace)


def _map(path: Path, dtype: np.dtype, count: Optional[int] = None) -> np.ndarray:
    """The first `count` records (all when None) of a raw file, memory-mapped (none: an empty array)."""
    if count == 0 or path.stat().st_size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=None if count is None else (count,))


def read_index(path: Path) -> np.ndarray:
    """The bucket index at the end of a scan file (`ScanWriter`)."""
    with open(path, "rb") as f:
        f.seek(-16, os.SEEK_END)
        runs, width = np.frombuffer(f.read(16), "<i8").tolist()
        f.seek(-16 - 8 * runs * width, os.SEEK_END)
        return np.frombuffer(f.read(8 * runs * width), "<i8").reshape(runs, width)


class ScanReader:
    """One bucket's records from every part's scan file at a time, in part order (`ScanWriter`'s files)."""

    def __init__(self, folder: Path, parts: int, dtype: np.dtype, buckets: int) -> None:
        self.folder, self.dtype = folder, dtype
        index = []
        for p in range(parts):
            runs = read_index(folder / f"{p:08d}.rec")
            if runs.shape[1] != buckets + 1:
                raise ValueError(f"{folder / f'{p:08d}.rec'}: {runs.shape[1] - 1} buckets, expected {buckets}")
            index.append(runs)
        self.index = np.concatenate(index)  # every run of every part, in order
        self.part = np.repeat(np.arange(parts), [len(runs) for runs in index])
        self.count = [int(runs[-1, -1]) for runs in index]
        self.maps: dict[int, np.ndarray] = {}

    def bucket(self, bucket: int) -> np.ndarray:
        starts, ends = self.index[:, bucket], self.index[:, bucket + 1]
        chunks = []
        for run in np.flatnonzero(ends > starts).tolist():
            p = int(self.part[run])
            if p not in self.maps:
                if len(self.maps) >= 4096:  # a bounded number of memory maps (each costs no file descriptor)
                    self.maps.clear()
                self.maps[p] = _map(self.folder / f"{p:08d}.rec", self.dtype, self.count[p])
            chunks.append(np.array(self.maps[p][starts[run] : ends[run]]))
        return np.concatenate(chunks) if chunks else np.zeros(0, self.dtype)


def save_losers(path: Path, losers: np.ndarray, parts: int) -> None:
    """Losers (any record with a `pos`), sorted, after a header of each part's first record (parts + 1
    int64), so a part's range is two small reads (`losers_of`)."""
    losers = np.sort(losers, order=list(losers.dtype.names))
    starts = np.searchsorted(losers["pos"], [part_range(p)[0] for p in range(parts + 1)]).astype("<i8")
    with atomic_open(path, durable=False) as f:
        f.write(starts.tobytes())
        f.write(losers.tobytes())


def losers_of(path: Path, dtype: np.dtype, parts: int, part: Optional[int] = None) -> np.ndarray:
    """The losers of one part (None: all) from a file of `save_losers`."""
    with open(path, "rb") as f:
        first, last = (0, parts) if part is None else (part, part + 1)
        f.seek(8 * first)
        start, end = np.frombuffer(f.read(8 * (last - first + 1)), "<i8")[[0, -1]].tolist()
        f.seek(8 * (parts + 1) + start * dtype.itemsize)
        return np.frombuffer(f.read((end - start) * dtype.itemsize), dtype).copy()


def losers_in(files: list[Path], dtype: np.dtype, parts: int, part: int) -> np.ndarray:
    """The losers of one part from each bucket task's loser file, sorted."""
    found = [losers_of(path, dtype, parts, part) for path in files]
    return np.sort(np.concatenate(found), order=list(dtype.names)) if found else np.zeros(0, dtype)


class IdLookup:
    """The id of the document at a position, from the scan's id files (each read once, when first asked)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.cache = folder, {}

    def __call__(self, pos: int) -> str:
        part, index = pos >> PART_SHIFT, pos & ((1 << PART_SHIFT) - 1)
        if part not in self.cache:
            if len(self.cache) >= 64:  # a bounded number of parts' ids held
                self.cache.clear()
            with gzip.open(self.folder / f"{part:08d}.ids.gz", "rt", encoding="utf-8") as f:
                self.cache[part] = [json.loads(line) for line in f]
        return self.cache[part][index]


# line: CCNet's line dedup


def line_scan(docs: Iterator[dict], part: int, first_doc: int, group_docs: int) -> Iterator[np.ndarray]:
    """Per document, a record for every line that normalises to something: (group, hash, position, line
    number). `first_doc` is the part's first document's number in the source (for `group_docs`)."""
    for i, doc in enumerate(docs):
        group = (first_doc + i) // group_docs if group_docs else 0
        pos = position(part, i)
        rows = []
        for n, line in enumerate(doc["text"].split("\n")):
            normal = normalize_line(line)
            if normal:
                h = int.from_bytes(hashlib.sha1(normal.encode("utf-8")).digest()[:8], "big")
                rows.append((group, h, pos, n))
        yield np.array(rows, dtype=LINE_RECORD)


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


def exact_scan(docs: Iterator[dict], part: int) -> Iterator[tuple[np.ndarray, str]]:
    """Per document, (its record: the first 16 bytes of its content key and its position, its id)."""
    for i, doc in enumerate(docs):
        key = content_key(doc["text"])
        record = np.zeros(1, EXACT_RECORD)
        record[0] = (int.from_bytes(key[:8], "big"), int.from_bytes(key[8:16], "big"), position(part, i))
        yield record, doc["id"]


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


def band_keys(hasher: MinHasher, signature: np.ndarray) -> np.ndarray:
    """The 64-bit key of each LSH band of one signature: a hash of the band's number and its rows."""
    keys = np.zeros(hasher.bands, np.uint64)
    for b in range(hasher.bands):
        band = signature[b * hasher.rows : (b + 1) * hasher.rows].tobytes()
        digest = hashlib.blake2b(band, digest_size=8, salt=b.to_bytes(16, "little")).digest()
        keys[b] = int.from_bytes(digest, "little")
    return keys


def near_scan(docs: Iterator[dict], part: int, hasher: MinHasher) -> Iterator[tuple[np.ndarray, str, np.ndarray, int]]:
    """Per document, (its band records, its id, its signature, its number of distinct shingles)."""
    for i, doc in enumerate(docs):
        sketch, size = hasher.sketch(doc["text"])
        signature = sketch.hashvalues.astype(np.uint32)  # datasketch keeps them below 2**32
        records = np.zeros(hasher.bands, BAND_RECORD)
        records["h"], records["pos"] = band_keys(hasher, signature), position(part, i)
        yield records, doc["id"], signature, size


class Signatures:
    """Random access to the scan's signature and shingle count files (memory-mapped, a bounded number
    open at once)."""

    def __init__(self, folder: Path, num_perm: int) -> None:
        self.folder, self.num_perm, self.open = folder, num_perm, {}

    def get(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sigs, sizes = np.zeros((len(positions), self.num_perm), np.uint32), np.zeros(len(positions), np.float64)
        for n, pos in enumerate(positions.tolist()):
            part, index = pos >> PART_SHIFT, pos & ((1 << PART_SHIFT) - 1)
            if part not in self.open:
                if len(self.open) >= 256:
                    self.open.clear()
                stem = self.folder / f"{part:08d}"
                sig = _map(stem.with_suffix(".sig"), np.dtype("<u4")).reshape(-1, self.num_perm)
                self.open[part] = (sig, _map(stem.with_suffix(".size"), np.dtype("<u8")))
            sigs[n], sizes[n] = self.open[part][0][index], self.open[part][1][index]
        return sigs, sizes


def near_bucket(
    records: np.ndarray, signatures: Signatures, threshold: float, representatives: int = REPRESENTATIVES
) -> np.ndarray:
    """(later, representative) pairs, sorted: within each band (records sharing a key), in input order,
    each document verified against the band's representatives so far (containment estimated from the
    MinHash Jaccard J and the shingle counts, as `dedup.near_dedup`); one that overlaps none becomes a
    representative while there are fewer than `representatives`. Time and memory are linear in the
    bucket's records whatever the size of a band."""
    records = records[np.lexsort((records["pos"], records["h"]))]
    starts = np.flatnonzero(np.r_[True, records["h"][1:] != records["h"][:-1]])
    ends = np.r_[starts[1:], len(records)]
    found: list[np.ndarray] = []
    perm = signatures.num_perm
    for start, end in zip(starts.tolist(), ends.tolist()):
        if end - start < 2:
            continue
        members = np.unique(records["pos"][start:end])
        rep_sigs = np.zeros((representatives, perm), np.uint32)
        rep_sizes, rep_pos = np.zeros(representatives, np.float64), np.zeros(representatives, np.uint64)
        reps = 0
        for block in range(0, len(members), SIGNATURE_BLOCK):
            chunk = members[block : block + SIGNATURE_BLOCK]
            sigs, sizes = signatures.get(chunk)
            later, earlier = [], []
            for k in range(len(chunk)):
                if reps:
                    jaccard = np.count_nonzero(rep_sigs[:reps] == sigs[k], axis=1) / np.float64(perm)
                    hits = np.flatnonzero(containment(jaccard, rep_sizes[:reps], sizes[k]) >= threshold)
                    if len(hits):
                        later += [k] * len(hits)
                        earlier += hits.tolist()
                        continue
                if reps < representatives:
                    rep_sigs[reps], rep_sizes[reps], rep_pos[reps] = sigs[k], sizes[k], chunk[k]
                    reps += 1
            if later:
                pairs = np.zeros(len(later), PAIR)
                pairs["pos"], pairs["winner"] = chunk[later], rep_pos[earlier]
                found.append(pairs)
    return np.unique(np.concatenate(found)) if found else np.zeros(0, PAIR)


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
