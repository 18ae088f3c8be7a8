"""StackExchange: the `Posts.xml` of a site's archive dump -> one document per question.

LLaMA-1 (§2.1) kept the 28 largest sites, removed the HTML and sorted each question's answers by
score, highest first. A document here is `Q: <title>\\n\\n<question>` followed by `A: <answer>` for
each answer (by integer score, then by id), HTML removed with paragraph breaks and code kept.

Rows are streamed (`iterparse`) into a temporary SQLite table, so a dump far larger than memory
(StackOverflow's is ~100 GB) groups answers under their question on disk. Input: `Posts.xml` (plain,
.gz, .bz2, .xz, .zst) or the site's `.7z` archive (needs `py7zr`). The licence of each post follows
from its date, as StackExchange licenses contributions; a document names every version it spans.
"""

from __future__ import annotations

import html
import re
import sqlite3
import tempfile
import xml.etree.ElementTree as ET
from contextlib import ExitStack
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import IO, Iterator, Optional

from data_pipeline.raw.common import CorruptInput, Tally, make_doc
from data_pipeline.sources import open_text


@dataclass
class Options:
    site: Optional[str] = None  # default: from the file or folder name, e.g. "cstheory.meta"
    min_answers: int = 0  # questions with fewer answers are dropped (`too_few_answers`)
    min_chars: int = 1  # documents shorter than this are dropped (`too_short`)
    tmp_dir: Optional[str] = None  # where posts are grouped (about the size of the dump); None: the system's


class _TextExtractor(HTMLParser):
    """The text of an HTML fragment, with a line break around each block element; code kept."""

    BREAKS = {"p", "pre", "li", "blockquote", "h1", "h2", "h3", "h4", "br", "hr", "ul", "ol"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
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
    parser.close()
    return re.sub(r"\n{3,}", "\n\n", "".join(parser.parts)).strip()


def post_license(creation_date: str) -> str:
    """The licence a post was contributed under, by its ISO date (StackExchange's rule)."""
    if creation_date < "2011-04-08":
        return "CC BY-SA 2.5"
    if creation_date < "2018-05-02":
        return "CC BY-SA 3.0"
    return "CC BY-SA 4.0"


def site_name(path: Path) -> str:
    """`cstheory.meta` from `.../cstheory.meta/Posts.xml` or `cstheory.meta.stackexchange.com.7z`."""
    if path.name.lower().startswith("posts.xml"):
        return path.parent.name
    name = path.name.split(".7z")[0]
    return name.removesuffix(".com").removesuffix(".stackexchange").removesuffix(".stackoverflow") or name


def _open_posts(path: Path, stack: ExitStack) -> IO[bytes]:
    """The Posts.xml stream of `path` (a .7z archive is unpacked into a temporary folder)."""
    if path.suffix != ".7z":
        return stack.enter_context(open_text(path))
    try:
        import py7zr
    except ImportError:
        raise CorruptInput(f"{path}: reading .7z archives needs py7zr (pip install py7zr)") from None
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="posts-"))
    try:
        with py7zr.SevenZipFile(path) as archive:
            names = [n for n in archive.getnames() if n.rsplit("/", 1)[-1] == "Posts.xml"]
            if not names:
                raise CorruptInput(f"{path}: no Posts.xml in the archive")
            archive.extract(path=folder, targets=names[:1])
    except (py7zr.exceptions.Bad7zFile, EOFError, OSError) as e:
        raise CorruptInput(f"{path}: {e}") from None
    return stack.enter_context(open(Path(folder) / names[0], "rb"))


def documents(path: Path, options: Options, tally: Tally) -> Iterator[dict]:
    """One document per question of the dump at `path` (see the module docstring)."""
    path = Path(path)
    site = options.site or site_name(path)
    with ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="stackexchange-", dir=options.tmp_dir))
        db = sqlite3.connect(Path(folder) / "posts.sqlite")
        stack.callback(db.close)
        db.execute("CREATE TABLE post (id INTEGER, question INTEGER, score INTEGER, date TEXT, title TEXT, body TEXT)")
        error = None
        try:
            root = None
            for event, row in ET.iterparse(_open_posts(path, stack), events=("start", "end")):
                if root is None:
                    root = row  # <posts>: cleared as rows are stored, so memory stays flat
                elif event == "end" and row.tag == "row":
                    _store(db, row, path, tally)
                    root.clear()
        except (ET.ParseError, EOFError, OSError) as e:  # truncated or corrupt: keep what was read
            error = CorruptInput(f"{path}: {e}")
        db.execute("CREATE INDEX by_question ON post (question, score)")
        yield from _questions(db, path, site, options, tally)
        if error is not None:
            raise error


def _store(db: sqlite3.Connection, row: ET.Element, path: Path, tally: Tally) -> None:
    """Keep a question or an answer in the table; count any other post as dropped."""
    kind, post_id = row.get("PostTypeId"), row.get("Id", "?")
    body = row.get("Body", "")
    if kind not in ("1", "2"):  # tag wikis, excerpts, moderator nominations, ...
        tally.read(body)
        tally.drop("not_question_or_answer", f"{path}:post {post_id}", html_to_text(body))
        return
    try:
        number, score = int(post_id), int(row.get("Score", "0"))
        question = number if kind == "1" else int(row.get("ParentId", ""))
    except ValueError:
        tally.read(body)
        tally.drop("bad_post_ids", f"{path}:post {post_id}", html_to_text(body))
        return
    title = html.unescape(row.get("Title", "")) if kind == "1" else None
    db.execute(
        "INSERT INTO post VALUES (?, ?, ?, ?, ?, ?)",
        (number, question, score, row.get("CreationDate", ""), title, body),
    )


def _questions(db: sqlite3.Connection, path: Path, site: str, options: Options, tally: Tally) -> Iterator[dict]:
    """Assemble each question with its answers, best first; answers without a question are dropped."""
    query = "SELECT question, id, title, date, body FROM post ORDER BY question, title IS NULL, score DESC, id"
    current: Optional[int] = None
    posts: list[tuple] = []
    for question, post_id, title, date, body in db.execute(query):
        if question != current and posts:
            yield from _document(posts, path, site, options, tally)
            posts = []
        current = question
        posts.append((post_id, title, date, body))
    if posts:
        yield from _document(posts, path, site, options, tally)


def _document(posts: list[tuple], path: Path, site: str, options: Options, tally: Tally) -> Iterator[dict]:
    qid, title, date, body = posts[0]
    if title is None:  # the question is not in the dump
        for post_id, _, _, answer in posts:
            tally.read(answer)
            tally.drop("answer_without_question", f"{path}:post {post_id}", answer)
        return
    answers = [(d, html_to_text(b)) for _, _, d, b in posts[1:]]
    parts = [f"Q: {title}\n\n{html_to_text(body)}".strip()] + [f"A: {text}" for _, text in answers if text]
    text = "\n\n".join(parts)
    origin = f"{path}:question {qid}"
    tally.read(text)
    if len(answers) < options.min_answers:
        tally.drop("too_few_answers", origin, text)
        return
    if len(text) < options.min_chars:
        tally.drop("too_short", origin, text)
        return
    licences = sorted({post_license(d) for d in [date, *(d for d, _ in answers)]})
    yield make_doc(
        "stackexchange",
        f"stackexchange-{site}-{qid}",
        text,
        site=site,
        title=title,
        answers=len(answers),
        license=" and ".join(licences),
        url=f"https://{site if '.' in site and site.endswith('.com') else site + '.stackexchange.com'}/questions/{qid}",
    )
