"""Build `data_pipeline/sample_corpus/`: a few MB of real text, one JSONL file per kind of source.

Nobody on this project wrote any of it. The raw inputs come from packages (fetch them once):

    apt-get download golang-github-pierrec-lz4-dev   # testdata/pg1661.txt: Project Gutenberg #1661
    pip download --no-deps gensim==4.4.0             # test_data/enwiki-...-shortened.bz2: Wikipedia XML
    pip install mwparserfromhell                     # wikitext -> plain text (this script only)

and then, from the repository root:

    python scripts/make_sample_corpus.py --gutenberg PATH/pg1661.txt --wikipedia PATH/enwiki-...bz2 \\
        [--stackexchange ../shared/data/stackexchange/cstheory.meta/Posts.xml]

The Python documentation comes from `pydoc_data.topics`, which ships with CPython. Each output line is
`{"id", "text", "meta": {"source", "title", "origin", "license"}}`, the RedPajama document layout.
"""

from __future__ import annotations

import argparse
import bz2
import html
import json
import re
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

OUT = Path(__file__).resolve().parent.parent / "data_pipeline" / "sample_corpus"
CC_BY_SA = "CC BY-SA 4.0"


class _TextExtractor(HTMLParser):
    """Collects the text of an HTML fragment, with paragraph breaks and code blocks kept."""

    BREAKS = {"p", "pre", "li", "blockquote", "h1", "h2", "h3", "h4", "br", "hr", "ul", "ol"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in self.BREAKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.BREAKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def html_to_text(fragment: str) -> str:
    """Plain text of an HTML fragment; runs of blank lines collapsed."""
    parser = _TextExtractor()
    parser.feed(fragment)
    return re.sub(r"\n{3,}", "\n\n", "".join(parser.parts)).strip()


def stackexchange(posts_xml: Path) -> Iterator[dict]:
    """One document per question, with its answers after it (Posts.xml of a StackExchange dump)."""
    questions: dict[str, dict] = {}
    answers: dict[str, list[str]] = {}
    for _, row in ET.iterparse(posts_xml):
        if row.tag != "row":
            continue
        kind, body = row.get("PostTypeId"), html_to_text(row.get("Body", ""))
        if kind == "1":
            questions[row.get("Id")] = {"title": html.unescape(row.get("Title", "")), "body": body}
        elif kind == "2" and body:
            answers.setdefault(row.get("ParentId"), []).append(body)
        row.clear()
    for qid, q in questions.items():
        text = "\n\n".join([q["title"], q["body"], *answers.get(qid, [])]).strip()
        if text:
            yield {
                "id": f"stackexchange-cstheory.meta-{qid}",
                "text": text,
                "meta": {
                    "source": "stackexchange",
                    "title": q["title"],
                    "license": CC_BY_SA,
                    "origin": f"cstheory.meta.stackexchange.com/questions/{qid}",
                },
            }


def python_docs() -> Iterator[dict]:
    """One document per topic of the Python reference, as `help()` shows it (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    version = ".".join(map(str, sys.version_info[:2]))
    for name in sorted(topics):
        yield {
            "id": f"python_docs-{name}",
            "text": topics[name].strip(),
            "meta": {
                "source": "python_docs",
                "title": name,
                "license": "PSF-2.0",
                "origin": f"CPython {version} pydoc_data/topics.py",
            },
        }


def gutenberg(book: Path) -> Iterator[dict]:
    """The book between Project Gutenberg's START/END markers (licence header and footer removed),
    one document per story: a line in Roman numerals followed by a title starts a new one."""
    text = book.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    start = re.search(r"^\*\*\* ?START OF.*$", text, re.M)
    end = re.search(r"^\*\*\* ?END OF.*$", text, re.M)
    if not (start and end):
        raise ValueError(f"{book}: no Project Gutenberg START/END markers")
    body = re.sub(r"\n\s*End of (the )?Project Gutenberg.*$", "", text[start.end() : end.start()], flags=re.S | re.I)
    title = re.search(r"^Title: (.*)$", text[: start.start()], re.M)
    parts = re.split(r"\n(?=(?:ADVENTURE )?[IVX]+\. [A-Z][A-Z .'-]+\n)", body)
    stories = [p.strip() for p in parts if p.strip()]
    for n, story in enumerate(stories[1:], start=1):  # part 0 is the table of contents
        yield {
            "id": f"gutenberg-{book.stem}-{n:02d}",
            "text": story,
            "meta": {
                "source": "gutenberg",
                "title": f"{title.group(1) if title else book.stem}: {story.splitlines()[0].strip()}",
                "license": "Public domain (Project Gutenberg)",
                "origin": f"gutenberg.org ebook {book.stem}",
            },
        }


def wikipedia(dump: Path, max_bytes: int) -> Iterator[dict]:
    """Main-namespace articles without redirects, wikitext stripped to text by mwparserfromhell."""
    import mwparserfromhell

    ns = "{http://www.mediawiki.org/xml/export-0.10/}"
    total = 0
    with bz2.open(dump) as f:
        for _, page in ET.iterparse(f):
            if page.tag != f"{ns}page":
                continue
            title = page.findtext(f"{ns}title")
            wikitext = page.findtext(f"{ns}revision/{ns}text") or ""
            is_article = page.findtext(f"{ns}ns") == "0" and page.find(f"{ns}redirect") is None
            page.clear()
            if not is_article:
                continue
            code = mwparserfromhell.parse(wikitext)
            for node in code.filter_tags(recursive=False):  # references, tables, galleries
                if str(node.tag).strip().lower() in {"ref", "table", "gallery", "math"}:
                    code.remove(node)
            text = code.strip_code(normalize=True, collapse=True)
            text = re.sub(r"\n{3,}", "\n\n", re.sub(r"^\s*(thumb|left|right)\|.*$", "", text, flags=re.M)).strip()
            if len(text) < 500:
                continue
            yield {
                "id": f"wikipedia-en-{title}",
                "text": text,
                "meta": {
                    "source": "wikipedia",
                    "title": title,
                    "license": CC_BY_SA,
                    "origin": f"en.wikipedia.org/wiki/{title.replace(' ', '_')}",
                },
            }
            total += len(text.encode())
            if total >= max_bytes:
                return


def write(name: str, docs: Iterator[dict]) -> None:
    """Write documents to OUT/<name>.jsonl and say how many."""
    path = OUT / f"{name}.jsonl"
    n = size = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            line = json.dumps(doc, ensure_ascii=False) + "\n"
            f.write(line)
            n, size = n + 1, size + len(line.encode())
    print(f"{path}: {n} documents, {size / 1e6:.2f} MB")


def main() -> None:
    """Build every source file of the sample corpus."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--stackexchange", type=Path, default=Path("../shared/data/stackexchange/cstheory.meta/Posts.xml")
    )
    parser.add_argument("--gutenberg", type=Path, required=True, help="a Project Gutenberg plain-text book")
    parser.add_argument("--wikipedia", type=Path, required=True, help="a MediaWiki XML dump (.xml.bz2)")
    parser.add_argument("--wikipedia-mb", type=float, default=0.8, help="stop after this much article text")
    args = parser.parse_args()
    for path in (args.stackexchange, args.gutenberg, args.wikipedia):
        if not path.is_file():
            parser.error(f"input not found: {path}")
    OUT.mkdir(parents=True, exist_ok=True)
    write("stackexchange", stackexchange(args.stackexchange))
    write("python_docs", python_docs())
    write("gutenberg", gutenberg(args.gutenberg))
    write("wikipedia", wikipedia(args.wikipedia, int(args.wikipedia_mb * 1e6)))


if __name__ == "__main__":
    main()
