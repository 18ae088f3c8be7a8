"""Checksums of checkpoint files, computed while the bytes pass by: as they are written, and as they are read.

A checkpoint's `checksums.json` lists the size and digest of every file. Digests are XXH3-128 (the `xxhash`
package): they are there to find accidental damage (a flipped bit, a truncated or half-copied file), not
tampering, and at ~10 GB/s per core they cost a few percent of writing the bytes, where sha256 (1.6 GB/s
with the CPU's SHA instructions) costs as much as writing them. Checkpoints listed with sha256 (written
before) are still checked with sha256.

`HashingFileSystem` is the file system torch.distributed.checkpoint's `FileSystemWriter`/`FileSystemReader`
write and read through: each file this rank owns is hashed in the thread that writes it (a background
writer for an async save) or while DCP reads it, so a save reads nothing back and a resume reads each file
once. A read that skips bytes (DCP reads the items a rank needs, out of order) hashes the skipped bytes at
that point, and closing the file hashes the rest: the digest is always that of the whole file, each byte
hashed once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
from pathlib import Path
from typing import Iterator, Optional

import xxhash
from torch.distributed.checkpoint.filesystem import FileSystem

ALGORITHM = "xxh3_128"  # what new checkpoints are listed with
CHUNK = 1 << 20


def new_digest(algorithm: str = ALGORITHM):
    """An empty hash object of `algorithm` (xxh3_128, or sha256 for checkpoints listed before)."""
    if algorithm == "xxh3_128":
        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown checksum algorithm {algorithm!r} (known: xxh3_128, sha256)")


def bytes_digest(data, algorithm: str = ALGORITHM) -> str:
    """Hex digest of bytes in memory."""
    digest = new_digest(algorithm)
    digest.update(data)
    return digest.hexdigest()


def file_digest(path: str | os.PathLike, algorithm: str = ALGORITHM) -> str:
    """Hex digest of a file's bytes, read from disk."""
    digest = new_digest(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _HashingWriter(io.RawIOBase):
    """A file being written that hashes every byte on its way to disk (DCP writes each file front to back)."""

    def __init__(self, f, done, algorithm: str):
        super().__init__()
        self.f, self.digest, self.size, self.done = f, new_digest(algorithm), 0, done

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.size += len(view)
        return self.f.write(view)

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()

    def finish(self) -> None:
        if self.f.tell() != self.size:  # something seeked and overwrote: the running digest is not the file's
            self.done(None, None)
        else:
            self.done(self.size, self.digest.hexdigest())


class _HashingReader(io.RawIOBase):
    """A file being read that hashes it front to back whatever order it is read in: bytes before the
    position read from are hashed first (read for that), bytes already hashed are not hashed again, and
    `finish` hashes what was never read."""

    def __init__(self, f, done, algorithm: str):
        super().__init__()
        self.f, self.digest, self.hashed, self.done = f, new_digest(algorithm), 0, done

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def fileno(self) -> int:
        return self.f.fileno()

    def _hash_up_to(self, position: int) -> None:
        """Hash the bytes from where hashing stopped up to `position` (a gap the reader skipped)."""
        back = self.f.tell()
        self.f.seek(self.hashed)
        while self.hashed < position:
            chunk = self.f.read(min(CHUNK, position - self.hashed))
            if not chunk:
                break
            self.digest.update(chunk)
            self.hashed += len(chunk)
        self.f.seek(back)

    def _saw(self, start: int, data) -> None:
        end = start + len(data)
        if end <= self.hashed:
            return
        if start > self.hashed:
            self._hash_up_to(start)
            if self.hashed != start:  # the file ended before `start`
                return
        self.digest.update(memoryview(data)[self.hashed - start :])
        self.hashed = end

    def read(self, size: int = -1) -> bytes:
        start = self.f.tell()
        data = self.f.read(size)
        self._saw(start, data)
        return data

    def readinto(self, buffer) -> int:
        start = self.f.tell()
        n = self.f.readinto(buffer)
        self._saw(start, memoryview(buffer).cast("B")[:n])
        return n

    def readline(self, size: int = -1) -> bytes:
        start = self.f.tell()
        data = self.f.readline(size)
        self._saw(start, data)
        return data

    def finish(self) -> None:
        self._hash_up_to(os.fstat(self.f.fileno()).st_size)
        self.done(self.hashed, self.digest.hexdigest())


class HashingFileSystem(FileSystem):
    """DCP's local file system, hashing (with `algorithm`) the files `owns(path)` accepts as they are written or
    read; `digests` maps each such path (as finally named: DCP writes `.metadata` under a temporary name and
    renames it) to [size, hex digest], or [None, None] when it could not be hashed on the way (then hash it
    from disk)."""

    def __init__(self, owns=lambda path: True, algorithm: str = ALGORITHM):
        super().__init__()
        self.owns, self.algorithm, self.digests = owns, algorithm, {}
        self._lock = threading.Lock()  # DCP may write with several threads

    def _record(self, path: Path):
        def done(size: Optional[int], digest: Optional[str]) -> None:
            with self._lock:
                self.digests[path] = [size, digest]

        return done

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        path = Path(path)
        if mode not in ("wb", "rb") or not self.owns(path):
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with path.open(mode) as f:
            stream = (_HashingWriter if mode == "wb" else _HashingReader)(f, self._record(path), self.algorithm)
            yield stream
            stream.finish()

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        with self._lock:
            if Path(path) in self.digests:
                self.digests[Path(new_path)] = self.digests.pop(Path(path))
