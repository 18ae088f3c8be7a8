"""Progress of a long data step that a person or a batch log can read.

On a terminal it is a tqdm bar; anywhere else (a Slurm or Ray log, a pipe) it is one plain line every
`every` seconds (and one at the end): files, documents and bytes done, the rate and the time left, e.g.

    recipe commoncrawl: 120/4,000 files (3.0%), 1,234,567 docs, 12.3 GB, 41.2 MB/s, ETA 26:10:03

The interval is `every` (default: the `LLAMA_PROGRESS_EVERY` environment variable, else 30 s).
The time left is estimated from bytes when the total bytes are known, else from files. Documents and
bytes appear once counted (a step that only counts tasks, e.g. a dedup bucket stage, shows no
`0 docs, 0 B`), the rate in documents when there are no bytes; the last line is never repeated.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Optional


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


class Progress:
    """Counts files, documents and bytes done and shows them (a bar on a terminal, else a line every N s)."""

    def __init__(
        self,
        desc: str,
        total_files: Optional[int] = None,
        total_bytes: Optional[int] = None,
        every: Optional[float] = None,
        stream: Optional[IO[str]] = None,
        unit: str = "files",
    ) -> None:
        self.desc, self.total_files, self.total_bytes, self.unit = desc, total_files, total_bytes, unit
        self.every = float(os.environ.get("LLAMA_PROGRESS_EVERY", 30)) if every is None else every
        self.stream = stream if stream is not None else sys.stderr
        self.files = self.docs = self.bytes = 0
        self.start = self.last = time.monotonic()
        self.shown: Optional[tuple[int, int, int]] = None  # the counts of the last line printed
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            by_bytes = total_bytes is not None
            self.bar = tqdm(
                total=total_bytes if by_bytes else total_files,
                desc=desc,
                unit="B" if by_bytes else unit.rstrip("s"),
                unit_scale=by_bytes,
                file=self.stream,
                dynamic_ncols=True,
            )

    def update(self, files: int = 0, docs: int = 0, nbytes: int = 0) -> None:
        """Add what was just done; shows it when the interval has passed."""
        self.files += files
        self.docs += docs
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.update(nbytes if self.total_bytes is not None else files)
            self.bar.set_postfix_str(f"{self.files:,} {self.unit}, {self.docs:,} docs", refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._print(now)

    def _print(self, now: Optional[float] = None) -> None:
        self.shown = (self.files, self.docs, self.bytes)
        print(self.line(now), file=self.stream, flush=True)

    def line(self, now: Optional[float] = None) -> str:
        """The plain progress line."""
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        files = f"{self.files:,}"
        if self.total_files:
            files += f"/{self.total_files:,} {self.unit} ({100 * self.files / self.total_files:.1f}%)"
        else:
            files += f" {self.unit}"
        parts = [files]
        if self.docs:
            parts.append(f"{self.docs:,} docs")
        if self.bytes or self.total_bytes:
            parts += [_size(self.bytes), f"{_size(self.bytes / elapsed)}/s"]
        elif self.docs:
            parts.append(f"{self.docs / elapsed:,.0f} docs/s")
        done, total = (self.bytes, self.total_bytes) if self.total_bytes else (self.files, self.total_files)
        if total and done:
            parts.append(f"ETA {_duration(elapsed * max(total - done, 0) / done)}")
        return f"{self.desc}: {', '.join(parts)}"

    def close(self) -> None:
        """The last line, unless the last one printed already says it all (or closes the bar)."""
        if self.bar is not None:
            self.bar.close()
        elif self.shown != (self.files, self.docs, self.bytes):
            self._print()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ReadProgress:
    """Progress from inside one task that reads one input, perhaps for hours (a recipe's step 1 on a
    whole-language Wikipedia dump): every `every` seconds (as `Progress`), one plain line of the
    documents and bytes read so far and the rate, e.g.

        recipe wikipedia: /data/enwiki-pages-articles.xml.bz2: 1,234,567 docs, 12.3 GB read, 41.2 MB/s, 0:05:00

    to the task's own stderr (a Slurm array task's log, a Ray worker's forwarded output). `read` looks
    at the clock once every `check` documents, so a document costs a counter; a task that ends before
    the first interval prints nothing (its stage's progress line counts it)."""

    def __init__(
        self, desc: str, every: Optional[float] = None, stream: Optional[IO[str]] = None, check: int = 100
    ) -> None:
        self.desc, self.check = desc, max(1, check)
        self.every = float(os.environ.get("LLAMA_PROGRESS_EVERY", 30)) if every is None else every
        self.stream = stream
        self.start = self.last = time.monotonic()
        self.unseen = 0  # documents read since the clock was last looked at

    def read(self, docs: int, nbytes: int) -> None:
        """The documents and bytes read so far (totals); prints a line when the interval has passed."""
        self.unseen += 1
        if self.unseen < self.check:
            return
        self.unseen = 0
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            line = (
                f"{self.desc}: {docs:,} docs, {_size(nbytes)} read, {_size(nbytes / elapsed)}/s, "
                f"{docs / elapsed:,.0f} docs/s, {_duration(elapsed)}"
            )
            print(line, file=self.stream if self.stream is not None else sys.stderr, flush=True)
