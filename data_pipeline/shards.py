"""Token shard format: write, read and verify.

One folder per source holds, for each shard `<name>`:
- `<name>.bin`: a flat little-endian token stream (`uint16` when the vocabulary fits, else `uint32`);
  each document is written as `[BOS] tokens [EOS]` (the policy is recorded in the manifest);
- `<name>.idx`: `uint64` token offsets of the documents, n_docs + 1 of them (first 0, last n_tokens);
- `<name>.mask`, in shards of supervised finetuning examples only (`data_pipeline.sft`): one `uint8` per
  token, 1 where the token counts in the loss (a response), 0 where it does not (a prompt); a shard
  without one counts every token;
and one `manifest.json` describing every shard: format version, dtype, tokenizer path and sha256,
per-shard split, token and document counts, byte sizes and sha256 checksums (of the mask too), the input
files and the config that made them. Files are written under a temporary name then renamed, so a crash never leaves
a half-written shard under its final name.

Reading checks what is cheap every time (sizes against the manifest, token ids below the vocabulary
size) and the sha256 of each shard once per run, in a background thread (`ShardVerifier`), each shard
by one data-parallel rank; `python -m data_pipeline verify` checks every shard at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ShardError(ValueError):
    """Token shards that disagree with their manifest or with the tokenizer; names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class ShardInfo:
    """One shard's entry in the manifest."""

    name: str
    split: str  # "train" or "val"
    tokens: int
    documents: int
    bin_bytes: int
    bin_sha256: str
    idx_sha256: str
    inputs: list[str] = field(default_factory=list)
    mask_sha256: Optional[str] = None  # of `<name>.mask`, the loss mask; None: no mask, every token counts


@dataclass
class Manifest:
    """What a source folder of token shards holds and how it was made."""

    source: str
    dtype: str
    tokenizer_path: str
    tokenizer_sha256: str
    vocab_size: int
    bos: bool
    eos: bool
    shards: list[ShardInfo] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def save(self, folder: str | os.PathLike) -> None:
        """Write manifest.json atomically."""
        atomic_write_bytes(Path(folder) / MANIFEST, json.dumps(asdict(self), indent=2).encode())

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Manifest":
        """Read manifest.json of a source folder, with a clear error when missing or malformed."""
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise ShardError(f"{path}: no manifest; run `python -m data_pipeline tokenize` for this source")
        try:
            raw = json.loads(path.read_text())
            raw["shards"] = [ShardInfo(**s) for s in raw["shards"]]
            manifest = cls(**raw)
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise ShardError(f"{path}: malformed manifest ({e})") from None
        if manifest.format_version != FORMAT_VERSION:
            raise ShardError(f"{path}: format version {manifest.format_version}, this code reads {FORMAT_VERSION}")
        return manifest


STALE_TMP_SECONDS = 3600  # a temporary file untouched this long is a dead writer's (a live one writes)
_TEMPORARY = re.compile(r".+\.\d+\.[0-9a-f]{8}\.tmp")  # `atomic_open`'s `<name>.<pid>.<random>.tmp`


@contextmanager
def atomic_open(path: Path, durable: bool = True) -> Iterator[BinaryIO]:
    """A file to write `path` through, renamed to `path` when the block ends, removed when it raises; so
    `path` is either absent or complete.

    The temporary file is `<name>.<pid>.<random>.tmp` beside `path`, one per writer: two live copies of
    a task (a requeue while the first runs) each write their own and the last rename wins, both whole.
    `durable` fsyncs the file before the rename and the folder after it; intermediate files whose task
    marker (written durably) is the commit point skip both. A killed writer's temporary stays behind
    until `remove_stale_temporaries` sweeps its folder.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    if durable:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def remove_stale_temporaries(folder: Path, older_than: float = STALE_TMP_SECONDS) -> int:
    """Remove the temporaries of `atomic_open` in `folder` untouched for `older_than` seconds (killed
    writers'; a live writer keeps writing to its own); returns how many. One listing of the folder: call
    it once per run, not per file."""
    cutoff, removed = time.time() - older_than, 0
    if not folder.is_dir():
        return 0
    for entry in os.scandir(folder):
        if _TEMPORARY.fullmatch(entry.name):
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:  # renamed or removed by its writer meanwhile
                pass
    return removed


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    with atomic_open(path) as f:
        f.write(data)


class ShardWriter:
    """Writes one shard as its documents arrive, in memory bounded by one `write`, never by the shard.

    Tokens stream to a temporary `<name>.bin.<pid>.<random>.tmp`, offsets to its `.idx` twin and, with
    `masked`, the loss mask to its `.mask` twin (`atomic_open`), each hashed as written; leaving the `with`
    block renames them (`.bin` last), and an error removes them. `info` is then its manifest entry. The
    bytes are those of the whole shard written at once.
    """

    def __init__(self, folder: Path, name: str, split: str, dtype: np.dtype, inputs: list[str], masked: bool = False):
        self.folder, self.name, self.split, self.inputs = Path(folder), name, split, inputs
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.tokens = self.documents = 0
        self._hashes = {"bin": hashlib.sha256(), "idx": hashlib.sha256()}
        if masked:
            self._hashes["mask"] = hashlib.sha256()
        self._files = ExitStack()

    def __enter__(self) -> "ShardWriter":
        self._out = {
            kind: self._files.enter_context(atomic_open(self.folder / f"{self.name}.{kind}")) for kind in self._hashes
        }
        self._put("idx", np.zeros(1, dtype="<u8"))
        return self

    def write(self, tokens: np.ndarray, lengths: np.ndarray, mask: Optional[np.ndarray] = None) -> None:
        """Append whole documents: their tokens concatenated, each one's length in tokens and, in a masked
        shard, their loss mask (one 0/1 per token)."""
        assert int(np.sum(lengths)) == len(tokens), "document lengths must add up to the tokens"
        assert (mask is not None) == ("mask" in self._hashes), "a masked shard takes a mask with every write"
        self._put("bin", tokens.astype(self.dtype, copy=False))
        if mask is not None:
            assert len(mask) == len(tokens), "one mask value per token"
            self._put("mask", mask.astype(np.uint8, copy=False))
        self._put("idx", (self.tokens + np.cumsum(lengths, dtype=np.uint64)).astype("<u8", copy=False))
        self.tokens += len(tokens)
        self.documents += len(lengths)

    def _put(self, kind: str, values: np.ndarray) -> None:
        data = values.tobytes()
        self._hashes[kind].update(data)
        self._out[kind].write(data)

    def __exit__(self, *exc) -> None:
        self._files.__exit__(*exc)

    @property
    def info(self) -> ShardInfo:
        """The shard's manifest entry."""
        return ShardInfo(
            name=self.name,
            split=self.split,
            tokens=self.tokens,
            documents=self.documents,
            bin_bytes=self.tokens * self.dtype.itemsize,
            bin_sha256=self._hashes["bin"].hexdigest(),
            idx_sha256=self._hashes["idx"].hexdigest(),
            inputs=self.inputs,
            mask_sha256=self._hashes["mask"].hexdigest() if "mask" in self._hashes else None,
        )


class ShardReader:
    """Memory-mapped tokens, document offsets and loss mask (None: the shard has none) of one shard,
    checked against its manifest entry."""

    def __init__(self, folder: Path, info: ShardInfo, dtype: np.dtype, verify_checksum: bool = False):
        self.info = info
        self.bin_path = bin_path = folder / f"{info.name}.bin"
        self.idx_path = idx_path = folder / f"{info.name}.idx"
        self.mask_path = mask_path = folder / f"{info.name}.mask" if info.mask_sha256 else None
        self.verified = False
        for path in (bin_path, idx_path, mask_path):
            if path is not None and not path.is_file():
                raise ShardError(f"{path}: missing, but listed in {folder / MANIFEST}")
        expected = info.tokens * dtype.itemsize
        if bin_path.stat().st_size != expected:
            raise ShardError(
                f"{bin_path}: {bin_path.stat().st_size} bytes, but the manifest says {info.tokens} "
                f"tokens of {dtype.name} = {expected} bytes (truncated or from another run?)"
            )
        if idx_path.stat().st_size != (info.documents + 1) * 8:
            raise ShardError(f"{idx_path}: size disagrees with the manifest's {info.documents} documents")
        if mask_path is not None and mask_path.stat().st_size != info.tokens:
            raise ShardError(
                f"{mask_path}: {mask_path.stat().st_size} bytes, but the manifest says {info.tokens} tokens "
                "of one uint8 each (truncated or from another run?)"
            )
        if verify_checksum:
            self.verify()
        little = dtype.newbyteorder("<")
        self.tokens = np.memmap(bin_path, dtype=little, mode="r") if info.tokens else np.zeros(0, little)
        self.offsets = np.fromfile(idx_path, dtype="<u8")
        self.mask: Optional[np.ndarray] = None  # (tokens,) uint8
        if mask_path is not None:
            self.mask = np.memmap(mask_path, dtype=np.uint8, mode="r") if info.tokens else np.zeros(0, np.uint8)
        if self.offsets[-1] != info.tokens:
            raise ShardError(f"{idx_path}: last offset {self.offsets[-1]} != {info.tokens} tokens")

    def verify(self) -> None:
        """Check the files' sha256 (tokens, offsets, mask) against the manifest (once: later calls return at once)."""
        if self.verified:
            return
        from data_pipeline.tokenizer import file_sha256

        files = [(self.bin_path, self.info.bin_sha256), (self.idx_path, self.info.idx_sha256)]
        if self.mask_path is not None:
            files.append((self.mask_path, self.info.mask_sha256))
        for path, want in files:
            if file_sha256(path) != want:
                raise ShardError(
                    f"{path}: sha256 differs from {path.parent / MANIFEST} (corrupted?); "
                    "retokenize this source (`python -m data_pipeline tokenize --force`)"
                )
        self.verified = True


class ShardVerifier:
    """Checks shards' sha256 against their manifest, one after another, in a background thread.

    Reading goes on meanwhile (every batch's token ids are range-checked anyway, `SourceShards.check_ids`);
    the first mismatch is kept and raised, naming the file, by the next `check()`. Hashing reads each
    listed file once: one pass over the data per run, which callers share out between ranks.
    """

    def __init__(self, shards: list[ShardReader]):
        self.shards = shards
        self.error: Optional[ShardError] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shard-verify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for shard in self.shards:
            if self._stop.is_set():
                return
            try:
                shard.verify()
            except ShardError as e:
                self.error = e
                return
            except OSError as e:
                self.error = ShardError(f"{e.filename}: cannot be read to check its sha256 ({e.strerror})")
                return

    def check(self) -> None:
        """Raise the mismatch found so far, if any."""
        if self.error is not None:
            raise ShardError(*self.error.args)

    def wait(self) -> None:
        """Wait until every shard is checked (or one failed); raise the mismatch, if any."""
        self._thread.join()
        self.check()

    def close(self) -> None:
        """Stop after the shard being hashed."""
        self._stop.set()


def _holds_shards(folder: Path) -> bool:
    """Whether a folder holds token shards or tokenize's part records."""
    return any(next(folder.glob(pattern), None) for pattern in ("*.bin", "*.idx", "part-*.json"))


def source_folders(root: str | os.PathLike) -> list[Path]:
    """The source folders under a token root: those holding a manifest.json, sorted by name.

    A folder that holds shards or part records but no manifest is refused by name, never skipped:
    its tokenization is unfinished (other machines still at work, or a killed run) or the manifest
    was deleted. A root without any source folder is refused too.
    """
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"{root}: data folder not found (run `python -m data_pipeline prepare`?)")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    orphans = [p for p in folders if not (p / MANIFEST).is_file() and _holds_shards(p)]
    if orphans:
        raise ShardError(
            f"{', '.join(map(str, orphans))}: token shards without a {MANIFEST} (tokenization unfinished, or "
            "the manifest deleted); rerun `python -m data_pipeline tokenize` for the source, which writes "
            "it once every input is done, or remove the folder"
        )
    sources = [p for p in folders if (p / MANIFEST).is_file()]
    if not sources:
        raise ShardError(f"{root}: no source folder with a {MANIFEST} inside")
    return sources


def unlisted_files(folder: Path, manifest: Manifest) -> list[Path]:
    """Shard files (`.bin`, `.idx`, `.mask`) in a source folder that its manifest does not list."""
    listed = {f"{s.name}{suffix}" for s in manifest.shards for suffix in (".bin", ".idx")}
    listed |= {f"{s.name}.mask" for s in manifest.shards if s.mask_sha256}
    return sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".idx", ".mask") and p.name not in listed)


class SourceShards:
    """All shards of one source and split, read as one token stream."""

    def __init__(
        self,
        folder: str | os.PathLike,
        split: str,
        tokenizer_sha256: Optional[str] = None,
        verify_checksum: bool = False,
    ):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ShardError(f"{self.folder}: data folder not found (run `python -m data_pipeline prepare`?)")
        self.manifest = Manifest.load(self.folder)
        if tokenizer_sha256 is not None and tokenizer_sha256 != self.manifest.tokenizer_sha256:
            raise ShardError(
                f"{self.folder / MANIFEST}: shards were made with tokenizer sha256 "
                f"{self.manifest.tokenizer_sha256[:12]}... ({self.manifest.tokenizer_path}), but the "
                f"configured tokenizer has {tokenizer_sha256[:12]}...; retokenize or fix data.tokenizer"
            )
        dtype = np.dtype(self.manifest.dtype)
        self.shards = [
            ShardReader(self.folder, s, dtype, verify_checksum) for s in self.manifest.shards if s.split == split
        ]
        self.starts = np.cumsum([0] + [s.info.tokens for s in self.shards])
        self.n_tokens = int(self.starts[-1])
        self.vocab_size = self.manifest.vocab_size
        self.masked = any(s.mask_sha256 for s in self.manifest.shards)  # a loss mask (SFT examples)

    def read(self, start: int, length: int) -> np.ndarray:
        """`length` tokens (int64) from global position `start` of the concatenated stream (crossing shards)."""
        return self._gather(start, length, "tokens", np.dtype(np.int64))

    def read_mask(self, start: int, length: int) -> np.ndarray:
        """The loss mask (bool) of `length` tokens from global position `start`: True where the token counts
        in the loss; all True in a shard without a mask."""
        return self._gather(start, length, "mask", np.dtype(bool))

    def _gather(self, start: int, length: int, column: str, dtype: np.dtype) -> np.ndarray:
        """`length` values of the shards' `column` (`tokens` or `mask`, 1 where a shard has none) from
        global position `start`, crossing shards."""
        out = np.empty(length, dtype=dtype)
        filled = 0
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while filled < length:
            shard, offset = self.shards[i], start + filled - int(self.starts[i])
            take = min(length - filled, shard.info.tokens - offset)
            values = getattr(shard, column)
            out[filled : filled + take] = 1 if values is None else values[offset : offset + take]
            filled += take
            i += 1
        return out

    def check_ids(self, start: int, tokens: np.ndarray) -> None:
        """Refuse tokens read from position `start` that hold an id >= the vocabulary size, naming the
        shard and offset: bytes changed on disk, which would otherwise fail in the model's embedding."""
        bad = np.flatnonzero(tokens >= self.vocab_size)
        if not len(bad):
            return
        position = start + int(bad[0])
        i = int(np.searchsorted(self.starts, position, side="right")) - 1
        shard, offset = self.shards[i], position - int(self.starts[i])
        raise ShardError(
            f"{shard.bin_path}: token id {int(tokens[bad[0]])} at token offset {offset} (byte "
            f"{offset * shard.tokens.dtype.itemsize}) is not below the vocabulary size {self.vocab_size}: "
            f"the shard is corrupted; `python -m data_pipeline verify {self.folder.parent}` checks every "
            "shard, and retokenizing the source (`tokenize --force`) rewrites it"
        )

    def doc_starts(self, start: int, length: int) -> np.ndarray:
        """Positions (relative to `start`) where a document begins inside [start, start + length).

        Only the shards that overlap the range are looked at (found by bisection), so the cost does
        not grow with the number of shards.
        """
        found = []
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while i < len(self.shards) and self.starts[i] < start + length:
            shard, base = self.shards[i], int(self.starts[i])
            lo, hi = max(start - base, 0), min(start + length - base, shard.info.tokens)
            offs = shard.offsets[np.searchsorted(shard.offsets, lo) : np.searchsorted(shard.offsets, hi)]
            found.append(offs.astype(np.int64) + base - start)
            i += 1
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
