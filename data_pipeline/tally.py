"""The one drop counter: documents and bytes in and out of a step, documents dropped by reason with a
few examples each (`file:line`, and a snippet of the text when there is one), and damaged inputs.

The recipe's stages (`data_pipeline.raw`) count in a `Tally`; tokenizing counts in a `TokenizeStats`
(`data_pipeline.tokenize`), a `Tally` that also counts what each split received.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar, Optional

EXAMPLE_CHARS = 160


def _example(origin: str, text: Optional[str]) -> str:
    snippet = " ".join((text or "").split())[:EXAMPLE_CHARS]
    return f"{origin}: {snippet}" if snippet else origin


@dataclass
class Tally:
    """Documents and bytes in and out of one step, drops by reason with a few examples, bad files."""

    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0  # UTF-8 bytes of the documents' text as read (after extraction, before cleaning)
    bytes_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    failed_files: list[dict[str, str]] = field(default_factory=list)  # {"file", "error"}
    empty_files: list[str] = field(default_factory=list)  # inputs read to their end that held no document
    seconds: float = 0.0
    input_bytes: int = 0  # size on disk of the raw files read
    retries: int = 0  # remote reads tried again after a transient error (HTTP 5xx or 429, a lost connection)

    examples_per_reason: ClassVar[int] = 3

    def read(self, text: str) -> None:
        """Count a document read (its text before cleaning)."""
        self.docs_in += 1
        self.bytes_in += len(text.encode("utf-8", "replace"))

    def drop(self, reason: str, origin: str, text: Optional[str] = None) -> None:
        """Count a dropped document under `reason`, keeping the first few as examples."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.examples_per_reason:
            examples.append(_example(origin, text))

    def keep(self, doc: dict) -> dict:
        """Count a document written; returns it."""
        self.docs_out += 1
        self.bytes_out += len(doc["text"].encode("utf-8"))
        return doc

    def fail(self, path: str, error: str) -> None:
        """Record an input file that could not be read to its end."""
        self.failed_files.append({"file": path, "error": error})

    def empty(self, path: str) -> None:
        """Record an input that was read whole and held nothing to read."""
        self.empty_files.append(path)

    def merge(self, other: "Tally") -> "Tally":
        """Add `other`'s counts into this one (examples kept up to the limit); returns self."""
        for name in ("docs_in", "docs_out", "bytes_in", "bytes_out", "seconds", "input_bytes", "retries"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for reason, n in other.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + n
            mine = self.examples.setdefault(reason, [])
            mine.extend(other.examples.get(reason, [])[: self.examples_per_reason - len(mine)])
        self.failed_files.extend(other.failed_files)
        self.empty_files.extend(other.empty_files)
        return self

    def to_dict(self) -> dict:
        """Plain JSON-able counts."""
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict) -> "Tally":
        """Inverse of `to_dict`."""
        return cls(**value)
