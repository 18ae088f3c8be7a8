"""Books: one Project Gutenberg plain-text book -> one document, licence header and footer removed.

LLaMA-1 (§2.1) took the Gutenberg Project's public-domain books (and Books3) and removed books with
more than 90% content overlap; that near-dedup is the runner's (`near_dedup`, threshold 0.9). Here each
book's text is cut out of the boilerplate Gutenberg wrapped it in, in every style it used over the
years:

- modern (2000s on): `*** START OF THE|THIS PROJECT GUTENBERG EBOOK ... ***` ... `*** END OF ...`,
  with `End of the Project Gutenberg EBook of ...` before the end marker and the full licence after it;
- the 1990s "small print": a preamble (`*****The Project Gutenberg Etext of ...*****`) and a licence
  ending `*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*...*END*`, then the book, then
  `End of (the) Project Gutenberg Etext of ...`;
- the early one-line or one-page notes (`The Project Gutenberg Etext of ...`, `This is the February
  1992 Project Gutenberg release of: ...`): the opening paragraphs that speak of Project Gutenberg or
  the etext are the header.

The producer credits right after the start (`Produced by ...`) go too. Input: a `.txt` (plain, .gz,
.bz2, .xz, .zst) or a `.zip` of it as Gutenberg distributes them (each `.txt` member is a book). Text
is decoded as UTF-8, else cp1252, else latin-1 (`meta.encoding` says which); line endings become `\\n`.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from data_pipeline.raw.common import CorruptInput, Tally, make_doc, stream_errors
from data_pipeline.sources import open_text

SOURCE = "gutenberg"
HEAD_CHARS = 12_000  # an early etext's notes (no markers) sit within this many characters of the start

_START = re.compile(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_SMALL_PRINT_END = re.compile(r"^\*\s*END\*?\s*THE SMALL PRINT.*$", re.I | re.M)
_SMALL_PRINT_START = re.compile(r"^\*{3}\s*START\**\s*THE SMALL PRINT.*$", re.I | re.M)
_END = re.compile(r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END_OF = re.compile(r"^\**\s*End of (?:the |this )?Project Gutenberg.*$", re.I | re.M)
_NOTE = re.compile(r"project gutenberg|\be-?texts?\b", re.I)
_CREDITS = re.compile(
    r"^(?:produced|prepared|transcribed|scanned|proofread|updated|converted|e-?text (?:was )?prepared|"
    r"this (?:e-?text|e-?book|file) was (?:prepared|produced|created|transcribed))\b[^\n]*\bby\b",
    re.I,
)
_EBOOK = re.compile(r"\[\s*e-?(?:book|text)\s*#\s*(\d+)\s*\]|#(\d+) in our series", re.I)
_BLANK_START = re.compile(r"^\s*\n")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_PARAGRAPH = re.compile(r"(?:[^\n]*\S[^\n]*\n?)+")
_FIELD = r"^{}:[ \t]*(.+(?:\n[ \t]+\S.*)*)"


@dataclass
class Options:
    require_markers: bool = False  # drop books with no Gutenberg header (`no_gutenberg_markers`); else keep all
    min_chars: int = 1000  # books shorter than this after cleaning are dropped (`too_short`)


@dataclass
class Book:
    """A Gutenberg file split into the book and what its header said."""

    text: str
    header: str  # the style of header found: modern, small_print, etext_note or none
    footer: bool  # whether a footer was found and cut
    title: Optional[str] = None
    author: Optional[str] = None
    language: Optional[str] = None
    ebook: Optional[int] = None


def decode(data: bytes) -> tuple[str, str]:
    """Text and encoding of a file: UTF-8 (BOM dropped), else cp1252, else latin-1."""
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return data.decode(encoding), encoding.removesuffix("-sig")
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1"), "latin-1"


def _paragraph_end(text: str, pos: int) -> int:
    """Where the paragraph holding `pos` ends (the start of the blank line after it, or the end)."""
    match = _BLANK_LINE.search(text, pos)
    return match.start() if match else len(text)


def _header_end(text: str) -> tuple[int, str]:
    """The offset where the book starts and the header style found."""
    end = _END.search(text)
    limit = end.start() if end else len(text)
    start = _START.search(text, 0, limit)
    if start:
        return start.end(), "modern"
    small_print = _SMALL_PRINT_END.search(text, 0, limit)
    if small_print:
        return small_print.end(), "small_print"
    # early etexts: the opening paragraphs that talk about Project Gutenberg or the etext are the header
    cut = 0
    for paragraph in _PARAGRAPH.finditer(text[: min(HEAD_CHARS, len(text) // 4)]):
        if _NOTE.search(paragraph.group()):
            cut = _paragraph_end(text, paragraph.start())
    return (cut, "etext_note") if cut else (0, "none")


def _footer_start(text: str, begin: int) -> Optional[int]:
    """Where the footer starts (at or after `begin`), or None when there is none."""
    end = _END.search(text, begin)
    limit = end.start() if end else len(text)
    ends = list(_END_OF.finditer(text, begin, limit))
    small_print = _SMALL_PRINT_START.search(text, begin, limit)
    candidates = [m.start() for m in (ends[-1] if ends else None, small_print) if m] + ([limit] if end else [])
    return min(candidates) if candidates else None


def _strip_credits(body: str) -> str:
    """The body without the producer credits paragraphs at its start."""
    body = _BLANK_START.sub("", body)
    while _CREDITS.match(body):
        body = _BLANK_START.sub("", body[_paragraph_end(body, 0) :])
    return body


def _field(header: str, name: str) -> Optional[str]:
    match = re.search(_FIELD.format(name), header, re.M | re.I)
    return " ".join(match.group(1).split()) if match else None


def _header_meta(header: str) -> dict:
    """Title, author, language and ebook number, as far as the header says them."""
    title, author = _field(header, "Title"), _field(header, "Author")
    if not title:
        match = re.search(
            r"Project Gutenberg(?:'s| E-?(?:Book|text) of| release of:?)\s+(.+?)(?:,? by (.+?))?\s*\**\s*$",
            header,
            re.I | re.M,
        )
        if match and match.group(1).strip():
            title, author = match.group(1).strip(" *"), author or (match.group(2) or "").strip(" *") or None
    series = re.search(r"in our series,? by (.+?)\s*$", header, re.I | re.M)
    author = author or (series.group(1) if series else None)
    ebook = _EBOOK.search(header)
    return {
        "title": title,
        "author": author,
        "language": _field(header, "Language"),
        "ebook": int(ebook.group(1) or ebook.group(2)) if ebook else None,
    }


def normalize(text: str) -> str:
    """`\\n` line endings, no trailing spaces or DOS end-of-file marks (^Z), at most two blank lines in a
    row, no blank lines at the start or end (the first line's indentation is kept)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x1a", "")
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)
    return re.sub(r"\n{4,}", "\n\n\n", text).strip("\n")


def parse_gutenberg(text: str) -> Book:
    """The book inside a Gutenberg file's text, with what its header says about it."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    begin, style = _header_end(text)
    footer = _footer_start(text, begin)
    body = _strip_credits(text[begin:footer])
    return Book(text=normalize(body), header=style, footer=footer is not None, **_header_meta(text[:begin]))


def strip_gutenberg(text: str) -> str:
    """The book inside a Gutenberg file's text: licence header, producer credits and footer removed."""
    return parse_gutenberg(text).text


def _read(path: Path) -> Iterator[tuple[str, bytes]]:
    """(origin, raw bytes) of each book in the input file."""
    try:
        if path.suffix.lower() == ".zip":
            with zipfile.ZipFile(path) as archive:
                members = [m for m in archive.namelist() if m.lower().endswith(".txt") and "__MACOSX" not in m]
                if not members:
                    raise CorruptInput(f"{path}: no .txt member in the zip")
                for member in members:
                    yield f"{path}:{member}", archive.read(member)
            return
        with open_text(path) as f:
            data = f.read()
    except zipfile.BadZipFile as e:
        raise CorruptInput(f"{path}: {e}") from None
    except stream_errors() as e:  # truncated or corrupt compressed stream, unreadable file
        raise CorruptInput(f"{path}: {type(e).__name__}: {e}") from None
    yield str(path), data


def documents(path: Path, options: Options, tally: Tally) -> Iterator[dict]:
    """The book(s) of one Gutenberg file as cleaned documents."""
    path = Path(path)
    stem = Path(re.sub(r"\.(gz|bz2|xz|zst)$", "", path.name)).stem
    for origin, data in _read(path):
        text, encoding = decode(data)
        tally.read(text)
        book = parse_gutenberg(text)
        if book.header == "none" and options.require_markers:
            tally.drop("no_gutenberg_markers", origin, text)
            continue
        if len(book.text) < options.min_chars:
            tally.drop("too_short", origin, book.text or text)
            continue
        member = origin[len(str(path)) + 1 :]
        doc_id = f"{SOURCE}/{stem}" + (f"/{Path(member).stem}" if member else "")
        meta = {k: getattr(book, k) for k in ("title", "author", "language", "ebook") if getattr(book, k)}
        yield make_doc(SOURCE, doc_id, book.text, **meta, header=book.header, footer=book.footer, encoding=encoding)
