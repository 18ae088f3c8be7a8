"""Reusable text filters for web-like sources: C4's line and page heuristics, a length floor, a bad-words
list, and CCNet's normalised line hashes for line-level deduplication.

C4 (Raffel et al. 2020, §2.2) keeps only lines that end in terminal punctuation and have at least a few
words, drops lines that mention "javascript", and drops pages with "lorem ipsum", a curly brace (code),
a bad word, or too few sentences. The paper's text says lines of at least 3 words and pages of at least
5 sentences (our defaults); the released TFDS code used 5 and 3, so both are settings. CCNet (Wenzek et
al. 2019, §3.1) removes a line whose normalised form (lowercase, digits -> 0, no punctuation or accents,
whitespace collapsed) was already seen in the group, hashing it with the first 8 bytes of SHA-1.
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

TERMINAL_PUNCTUATION = (".", "!", "?", '"', "\u201d")  # C4's marks, and the typographic closing quote
ELLIPSIS = "..."
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s|$)")
_DIGITS = re.compile(r"\d")
_ASCII_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass
class C4Rules:
    """C4's heuristics as settings (defaults: the paper's numbers)."""

    min_words_per_line: int = 3  # shorter lines are removed
    min_sentences: int = 5  # pages with fewer sentences (after line filtering) are dropped
    drop_curly_brace: bool = True  # C4 dropped any page with "{" (likely code)
    drop_javascript_lines: bool = True
    drop_lorem_ipsum: bool = True


def count_sentences(text: str) -> int:
    """Sentences in `text`, counted as runs of terminal punctuation followed by a space or the end.

    C4 used NLTK's punkt tokenizer; this counts the same sentence ends without the dependency (it does
    not know abbreviations, so "e.g. this" counts one more).
    """
    return len(_SENTENCE_END.findall(text))


def c4_clean(text: str, rules: C4Rules) -> tuple[str, Optional[str]]:
    """C4's line filter then page checks: `(kept lines joined by "\\n", None)` or `("", drop reason)`.

    A line is kept when it has at least `min_words_per_line` words, ends in terminal punctuation (not an
    ellipsis) and does not mention javascript. Among kept lines, "lorem ipsum" or "{" drops the page, as
    in C4 (`lorem_ipsum`, `curly_brace`); so does having fewer than `min_sentences` sentences left
    (`too_few_sentences`).
    """
    kept = []
    for raw in text.splitlines():
        line = raw.strip()
        if len(line.split()) < rules.min_words_per_line:
            continue
        if not line.endswith(TERMINAL_PUNCTUATION) or line.endswith(ELLIPSIS):
            continue
        lower = line.lower()
        if rules.drop_javascript_lines and "javascript" in lower:
            continue
        if rules.drop_lorem_ipsum and "lorem ipsum" in lower:
            return "", "lorem_ipsum"
        if rules.drop_curly_brace and "{" in line:
            return "", "curly_brace"
        kept.append(line)
    cleaned = "\n".join(kept)
    if count_sentences(cleaned) < rules.min_sentences:
        return "", "too_few_sentences"
    return cleaned, None


def too_short(text: str, min_chars: int) -> bool:
    """Whether `text` has fewer than `min_chars` characters once surrounding whitespace is removed."""
    return len(text.strip()) < min_chars


class BadWords:
    """A bad-words list (one word or phrase a line, `#` comments and blank lines ignored), matched as whole
    words, case-insensitively, as C4 did with the LDNOOBW list."""

    def __init__(self, words: Iterable[str]) -> None:
        words = sorted({w.strip().lower() for w in words if w.strip() and not w.startswith("#")}, key=len)
        if not words:
            raise ValueError("the bad-words list is empty")
        alternatives = "|".join(re.escape(w) for w in reversed(words))
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")

    @classmethod
    def from_file(cls, path: str) -> "BadWords":
        """The list in `path` (UTF-8); a clear error if the file is missing or empty."""
        return _load_bad_words(str(Path(path).resolve()))

    def first_match(self, text: str) -> Optional[str]:
        """The first bad word in `text`, or None."""
        match = self._pattern.search(text.lower())
        return match.group(0) if match else None


@lru_cache(maxsize=4)
def _load_bad_words(path: str) -> BadWords:
    if not Path(path).is_file():
        raise ValueError(f"bad_words_file: {path} does not exist; give a text file with one word a line")
    try:
        return BadWords(Path(path).read_text(encoding="utf-8").splitlines())
    except ValueError as e:
        raise ValueError(f"bad_words_file: {path}: {e}") from None


def normalize_line(line: str) -> str:
    """CCNet's normal form of a line: lowercase, digits -> 0, accents, punctuation and symbols (Unicode
    categories M, P, S) removed, whitespace collapsed."""
    line = _DIGITS.sub("0", line.lower())
    if line.isascii():  # fast path: string.punctuation is exactly ASCII's P and S characters
        return " ".join(line.translate(_ASCII_PUNCTUATION).split())
    decomposed = unicodedata.normalize("NFD", line)
    kept = "".join(c for c in decomposed if not unicodedata.category(c).startswith(("M", "P", "S")))
    return " ".join(kept.split())


def line_hash(line: str) -> bytes:
    """The first 8 bytes of the SHA-1 of the line's normal form."""
    return _hash(normalize_line(line))


def _hash(normal: str) -> bytes:
    return hashlib.sha1(normal.encode("utf-8")).digest()[:8]


class LineDeduplicator:
    """Removes, from each document in turn, every line already seen in an earlier document or earlier in
    the same one (compared in normal form); lines that normalise to nothing are kept."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def __call__(self, text: str) -> tuple[str, int]:
        """`(text without repeated lines, number of lines removed)`; the lines are remembered."""
        kept, removed = [], 0
        for line in text.split("\n"):
            normal = normalize_line(line)
            if not normal:
                kept.append(line)
                continue
            digest = _hash(normal)
            if digest in self.seen:
                removed += 1
                continue
            self.seen.add(digest)
            kept.append(line)
        return "\n".join(kept), removed

    def reset(self) -> None:
        """Forget every line (start a new group)."""
        self.seen.clear()
