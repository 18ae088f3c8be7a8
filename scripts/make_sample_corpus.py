"""Build `data_pipeline/sample_corpus/`: a few MB of real text, one JSONL file per kind of source.

Nobody on this project wrote any of it. Each output line is one document in the RedPajama layout,
`{"id", "text", "meta": {"source", "title", "origin", "license"}}`, UTF-8, no empty texts.

| output                | input                                                                   |
|-----------------------|-------------------------------------------------------------------------|
| stackexchange.jsonl   | `Posts.xml` of a StackExchange dump (default: cstheory.meta in shared/) |
| python_docs.jsonl     | `pydoc_data.topics`, which ships with CPython (no input needed)         |
| gutenberg.jsonl       | a Project Gutenberg plain-text book                                     |
| wikipedia.jsonl       | a MediaWiki XML dump excerpt (`.xml.bz2`)                               |
| tex_articles.jsonl    | LaTeX / Sweave (`.Rnw`) sources of journal articles                     |

The inputs come from packages; fetch them once (the only network step), into any folder:

    apt-get download golang-github-pierrec-lz4-dev=2.5.2-2   # testdata/pg1661.txt (Gutenberg #1661)
    pip download --no-deps gensim==4.4.0                      # test_data/enwiki-...-shortened.bz2
    apt-get download r-cran-sandwich=3.0-2-1 r-cran-zoo=1.8-11-1 r-cran-strucchange=1.5-3-1 \\
        r-cran-lmtest=0.9.40-1 r-cran-party=1.3-11-1           # doc/*.Rnw: JSS-style articles
    pip install mwparserfromhell                               # wikitext -> text, this script only

(the Debian versions are bookworm's). Then, from the repository root, give the downloaded archives
as they are (a `.deb` or a wheel is read in place, nothing is unpacked to disk) or files taken out of
them:

    python3 scripts/make_sample_corpus.py \\
        --gutenberg DL/golang-github-pierrec-lz4-dev_2.5.2-2_all.deb \\
        --wikipedia DL/gensim-4.4.0-*.whl \\
        --tex DL/r-cran-*.deb

A source whose input is not given is skipped and its file left as it is; `python_docs` is always
rebuilt, from the running Python (3.11.7 made the bundled file).
"""

from __future__ import annotations

import argparse
import bz2
import fnmatch
import html
import io
import json
import re
import sys
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "data_pipeline" / "sample_corpus"
DEFAULT_POSTS = ROOT.parent / "shared" / "data" / "stackexchange" / "cstheory.meta" / "Posts.xml"
sys.path.insert(0, str(ROOT))  # the cleaning code is the recipe's (data_pipeline/raw/)

from data_pipeline.raw.latex_macros import braced as latex_braced  # noqa: E402
from data_pipeline.raw.stackexchange import html_to_text, post_license  # noqa: E402


class InputError(Exception):
    """An input file is missing, unreadable, or not what the source expects."""


# --------------------------------------------------------------------------------------------------
# Reading inputs out of the packages that ship them


@dataclass
class Member:
    """One file taken from an input: its bytes and where it came from."""

    name: str  # the file's path inside the package (or the file's name when given directly)
    data: bytes
    package: str  # "Debian package NAME VERSION", "PyPI wheel NAME VERSION", or "" for a plain file


def _ar_members(path: Path) -> dict[str, bytes]:
    """The members of a Unix `ar` archive (the container format of a .deb), by name."""
    blob = path.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise InputError(f"{path}: not a .deb (no ar archive header)")
    members, pos = {}, 8
    while pos + 60 <= len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = blob[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
    return members


def _open_tar(name: str, data: bytes) -> tarfile.TarFile:
    """A tar archive held in memory; .xz, .gz, .bz2 and plain (zstd needs Python >= 3.14)."""
    if name.endswith(".zst"):
        raise InputError(f"{name}: zstd-compressed .deb members are not supported; use an xz one")
    return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")


def _deb_members(path: Path, pattern: str) -> list[Member]:
    """Files of a .deb whose path matches the glob `pattern`, with the package's name and version."""
    ar = _ar_members(path)
    control_name = next((n for n in ar if n.startswith("control.tar")), None)
    data_name = next((n for n in ar if n.startswith("data.tar")), None)
    if not (control_name and data_name):
        raise InputError(f"{path}: a .deb without control.tar.* or data.tar.*")
    with _open_tar(control_name, ar[control_name]) as tar:
        info = next((i for i in tar if i.name.removeprefix("./") == "control"), None)
        if info is None:
            raise InputError(f"{path}: a .deb without a control file")
        control = tar.extractfile(info).read().decode()
    fields = dict(re.findall(r"^(Package|Version): (.*)$", control, re.M))
    package = f"Debian package {fields.get('Package', path.name)} {fields.get('Version', '?')}"
    found = []
    with _open_tar(data_name, ar[data_name]) as tar:
        for info in tar:
            name = info.name.removeprefix("./")
            if info.isfile() and fnmatch.fnmatch(name, pattern):
                found.append(Member(name, tar.extractfile(info).read(), package))
    return sorted(found, key=lambda m: m.name)


def _zip_members(path: Path, pattern: str) -> list[Member]:
    """Files of a wheel (or any zip) whose path matches the glob `pattern`."""
    parts = path.name.split("-")
    package = f"PyPI wheel {parts[0]} {parts[1]}" if path.suffix == ".whl" and len(parts) > 2 else path.name
    with zipfile.ZipFile(path) as z:
        return [Member(n, z.read(n), package) for n in sorted(z.namelist()) if fnmatch.fnmatch(n, pattern)]


def read_inputs(paths: Iterable[Path], pattern: str, what: str) -> list[Member]:
    """Every input file for one source: plain files as given, and, from each .deb, wheel or zip,
    its files that match the glob `pattern` (in path order). Raises InputError if a path is
    missing or yields nothing."""
    members: list[Member] = []
    for path in paths:
        if not path.is_file():
            raise InputError(f"{what}: input not found: {path}")
        if path.suffix == ".deb":
            found = _deb_members(path, pattern)
        elif path.suffix in {".whl", ".zip"}:
            found = _zip_members(path, pattern)
        else:
            found = [Member(path.name, path.read_bytes(), "")]
        if not found:
            raise InputError(f"{what}: no file matching {pattern!r} in {path}")
        members.extend(found)
    return members


def decode(member: Member) -> str:
    """A member's text: UTF-8 (a BOM dropped), else Latin-1; line ends made \\n."""
    try:
        text = member.data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = member.data.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def provenance(member: Member) -> str:
    """'PACKAGE: path/inside' for a packaged file, the file name for a plain one."""
    return f"{member.package}: {member.name}" if member.package else member.name


# --------------------------------------------------------------------------------------------------
# StackExchange


def stackexchange(posts_xml: Path, site: str) -> Iterator[dict]:
    """One document per question of a StackExchange `Posts.xml`: its title, its body and the bodies
    of its answers (in dump order), HTML stripped with code kept. The licence is that of each post,
    by date; a document whose posts span two licence versions names both."""
    if not posts_xml.is_file():
        raise InputError(f"stackexchange: input not found: {posts_xml}")
    questions: dict[str, dict] = {}
    answers: dict[str, list[tuple[str, str]]] = {}
    try:
        for _, row in ET.iterparse(posts_xml):
            if row.tag != "row":
                continue
            kind, body, date = row.get("PostTypeId"), html_to_text(row.get("Body", "")), row.get("CreationDate", "")
            if kind == "1":
                title = html.unescape(row.get("Title", ""))
                questions[row.get("Id")] = {"title": title, "body": body, "date": date}
            elif kind == "2" and body:
                answers.setdefault(row.get("ParentId"), []).append((body, date))
            row.clear()
    except ET.ParseError as e:
        raise InputError(f"stackexchange: {posts_xml} is not valid XML: {e}") from e
    for qid, q in questions.items():
        replies = answers.get(qid, [])
        text = "\n\n".join([q["title"], q["body"], *(body for body, _ in replies)]).strip()
        if not text:
            continue
        licences = sorted({post_license(d) for d in [q["date"], *(d for _, d in replies)]})
        yield {
            "id": f"stackexchange-{site}-{qid}",
            "text": text,
            "meta": {
                "source": "stackexchange",
                "title": q["title"],
                "license": " and ".join(licences),
                "origin": f"{site}.stackexchange.com/questions/{qid}",
            },
        }


# --------------------------------------------------------------------------------------------------
# Python documentation


def python_docs() -> Iterator[dict]:
    """One document per topic of the Python reference, as `help()` shows it (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    version = ".".join(map(str, sys.version_info[:2]))
    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield {
                "id": f"python_docs-{name}",
                "text": text,
                "meta": {
                    "source": "python_docs",
                    "title": name,
                    "license": "PSF-2.0",
                    "origin": f"CPython {version} pydoc_data/topics.py",
                },
            }


# --------------------------------------------------------------------------------------------------
# Project Gutenberg


def gutenberg(books: list[Member]) -> Iterator[dict]:
    """Each book between Project Gutenberg's START/END markers (licence header and footer removed),
    one document per story or chapter: a line in Roman numerals followed by an upper-case title
    starts a new one. The part before the first such line (the table of contents) is dropped."""
    for book in books:
        text = decode(book)
        start = re.search(r"^\*\*\* ?START OF.*$", text, re.M)
        end = re.search(r"^\*\*\* ?END OF.*$", text, re.M)
        if not (start and end):
            raise InputError(f"gutenberg: {book.name}: no Project Gutenberg START/END markers")
        body = re.sub(
            r"\n\s*End of (the )?Project Gutenberg.*$", "", text[start.end() : end.start()], flags=re.S | re.I
        )
        title = re.search(r"^Title: (.*)$", text[: start.start()], re.M)
        stem = Path(book.name).stem
        parts = re.split(r"\n(?=(?:ADVENTURE |CHAPTER )?[IVXLC]+\. [A-Z][A-Z .'-]+\n)", body)
        chapters = [p.strip() for p in parts if p.strip()][1:]
        if not chapters:
            raise InputError(f"gutenberg: {book.name}: no chapter headings found")
        for n, chapter in enumerate(chapters, start=1):
            yield {
                "id": f"gutenberg-{stem}-{n:02d}",
                "text": chapter,
                "meta": {
                    "source": "gutenberg",
                    "title": f"{title.group(1).strip() if title else stem}: {chapter.splitlines()[0].strip()}",
                    "license": "Public domain (Project Gutenberg)",
                    "origin": f"gutenberg.org ebook {stem}",
                },
            }


# --------------------------------------------------------------------------------------------------
# Wikipedia


def wikipedia(dumps: list[Member], max_bytes: int) -> Iterator[dict]:
    """Main-namespace articles without redirects, in dump order, wikitext stripped to plain text by
    mwparserfromhell (references, tables, galleries and math removed); articles under 500 characters
    skipped; stops once `max_bytes` of text is out."""
    try:
        import mwparserfromhell
    except ImportError as e:
        raise InputError("wikipedia: needs mwparserfromhell (pip install mwparserfromhell)") from e

    total = 0
    for dump in dumps:
        raw = io.BytesIO(dump.data)
        stream = bz2.open(raw) if dump.name.endswith(".bz2") else raw
        ns = ""
        for event, elem in ET.iterparse(stream, events=("start", "end")):
            if event == "start":
                if not ns:
                    ns = elem.tag[: elem.tag.index("}") + 1] if elem.tag.startswith("{") else ""
                continue
            if elem.tag != f"{ns}page":
                continue
            title = elem.findtext(f"{ns}title") or ""
            wikitext = elem.findtext(f"{ns}revision/{ns}text") or ""
            is_article = elem.findtext(f"{ns}ns") == "0" and elem.find(f"{ns}redirect") is None
            elem.clear()
            if not is_article:
                continue
            code = mwparserfromhell.parse(wikitext)
            for node in code.filter_tags(recursive=False):
                if str(node.tag).strip().lower() in {"ref", "table", "gallery", "math"}:
                    code.remove(node)
            text = code.strip_code(normalize=True, collapse=True)
            text = re.sub(r"^\s*(thumb|left|right)\|.*$", "", text, flags=re.M)
            text = re.sub(r"\n{3,}", "\n\n", text).strip()
            if len(text) < 500:
                continue
            yield {
                "id": f"wikipedia-en-{title}",
                "text": text,
                "meta": {
                    "source": "wikipedia",
                    "title": title,
                    "license": "CC BY-SA 3.0",
                    "origin": f"en.wikipedia.org/wiki/{title.replace(' ', '_')}",
                },
            }
            total += len(text.encode())
            if total >= max_bytes:
                return


# --------------------------------------------------------------------------------------------------
# LaTeX articles

_VERBATIM_ENVS = "verbatim|Verbatim|Code|CodeInput|CodeOutput|Scode|Sinput|Soutput|Schunk|lstlisting|alltt"


def braced(text: str, start: int) -> str | None:
    """The contents of the balanced {...} group opening at text[start], or None if there is none."""
    group = latex_braced(text, start)
    return group[0] if group else None


def strip_comments(tex: str) -> str:
    """LaTeX without comments: whole comment lines dropped, trailing comments cut (an escaped \\%
    kept). Verbatim-like environments must have been taken out before."""
    out = []
    for line in tex.split("\n"):
        if re.match(r"^\s*%", line):
            continue
        out.append(re.sub(r"(?<!\\)%.*$", "", line))
    return "\n".join(out)


def clean_tex(source: str) -> tuple[str, str]:
    """(title, text) of a LaTeX or Sweave article, cleaned the way LLaMA's arXiv data was: the
    preamble dropped (but title and abstract kept, as \\title{} and an abstract environment),
    comments dropped, bibliography commands and everything after \\end{document} dropped. Sweave
    code chunks that the article shows become verbatim blocks; hidden ones (echo=FALSE) go."""
    head, sep, body = source.partition("\\begin{document}")
    if not sep:
        raise InputError("no \\begin{document}")
    body = body.split("\\end{document}")[0]
    title, title_in_body = "", False
    m = re.search(r"\\title\s*(?=\{)", head)
    if not m:
        m, title_in_body = re.search(r"\\title\s*(?=\{)", body), True
    if m:
        title = " ".join((braced(m.string, m.end()) or "").split())
    abstract = ""
    m = re.search(r"\\Abstract\s*(?=\{)", head)
    if m:
        abstract = (braced(head, m.end()) or "").strip()

    kept: list[str] = []  # verbatim blocks, protected from comment stripping

    def keep(block: str) -> str:
        """Park a verbatim block and leave a placeholder line."""
        kept.append(block)
        return f"\x00{len(kept) - 1}\x00"

    def chunk(m: re.Match) -> str:
        """A Sweave chunk: a verbatim block if shown, nothing if hidden."""
        options, code = m.group(1), m.group(2).strip("\n")
        if re.search(r"echo\s*=\s*(FALSE|F)\b", options) or not code.strip():
            return ""
        return keep(f"\\begin{{verbatim}}\n{code}\n\\end{{verbatim}}")

    body = re.sub(r"^<<(.*?)>>=[ \t]*\n(.*?)^@[ \t]*$", chunk, body, flags=re.M | re.S)
    body = re.sub(rf"\\begin\{{({_VERBATIM_ENVS})\}}.*?\\end\{{\1\}}", lambda m: keep(m.group(0)), body, flags=re.S)
    body = strip_comments(body)
    body = re.sub(r"^\s*\\(SweaveOpts|bibliography|bibliographystyle|setkeys)\b.*$", "", body, flags=re.M)
    body = re.sub(r"\x00(\d+)\x00", lambda m: kept[int(m.group(1))], body)
    body = re.sub(r"[ \t]+$", "", body, flags=re.M)
    body = re.sub(r"\n{3,}", "\n\n", body).strip()
    front = []
    if title and not title_in_body:
        front.append(f"\\title{{{title}}}")
    if abstract:
        front.append(f"\\begin{{abstract}}\n{strip_comments(abstract).strip()}\n\\end{{abstract}}")
    return title, "\n\n".join(front + [body])


def r_package_licenses(debs: Iterable[Path]) -> dict[str, str]:
    """The License field of each R package's DESCRIPTION in the given .deb files, keyed by the
    Debian package ("Debian package NAME VERSION"); packages without one are left out."""
    licences = {}
    for path in debs:
        if path.suffix == ".deb":
            for member in _deb_members(path, "usr/lib/R/site-library/*/DESCRIPTION"):
                m = re.search(r"^License: *(.+)$", decode(member), re.M)
                if m:
                    licences[member.package] = m.group(1).strip()
    return licences


def tex_articles(sources: list[Member], licences: dict[str, str], default_license: str | None) -> Iterator[dict]:
    """One document per LaTeX/Sweave article, cleaned by `clean_tex`, in the order given. The licence
    is the one its package declares (`licences`, by package), else `default_license`; an article with
    neither is an InputError."""
    for member in sources:
        licence = licences.get(member.package) or default_license
        if not licence:
            raise InputError(f"tex: {provenance(member)}: licence unknown; give --tex-license")
        try:
            title, text = clean_tex(decode(member))
        except InputError as e:
            raise InputError(f"tex: {provenance(member)}: {e}") from e
        stem = Path(member.name).stem
        yield {
            "id": f"tex_articles-{stem}",
            "text": text,
            "meta": {
                "source": "tex_articles",
                "title": title or stem,
                "license": licence,
                "origin": provenance(member),
            },
        }


# --------------------------------------------------------------------------------------------------


# Characters that str.splitlines() and some JSONL readers take for line ends; json.dumps leaves them raw.
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def write(out_dir: Path, name: str, docs: Iterable[dict]) -> None:
    """Write documents to OUT_DIR/<name>.jsonl (via a temporary file, so a failure leaves the old one)
    and say how many. Raises InputError on an empty text, a duplicate id, or no documents at all."""
    path = out_dir / f"{name}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    n = size = 0
    seen: set[str] = set()
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for doc in docs:
                if not doc["text"].strip():
                    raise InputError(f"{name}: document {doc['id']} has no text")
                if doc["id"] in seen:
                    raise InputError(f"{name}: duplicate id {doc['id']}")
                seen.add(doc["id"])
                line = json.dumps(doc, ensure_ascii=False).translate(_LINE_BREAKS) + "\n"
                f.write(line)
                n, size = n + 1, size + len(line.encode())
        if n == 0:
            raise InputError(f"{name}: no documents")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"{path}: {n} documents, {size:,} bytes")


def main(argv: list[str] | None = None) -> int:
    """Build the sample corpus files whose inputs are given (python_docs always); 0 on success."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument(
        "--stackexchange",
        type=Path,
        default=DEFAULT_POSTS,
        help="Posts.xml of a StackExchange dump (default: %(default)s)",
    )
    parser.add_argument(
        "--stackexchange-site", default="cstheory.meta", help="the site's name, for ids and URLs (default: %(default)s)"
    )
    parser.add_argument(
        "--gutenberg", type=Path, nargs="+", help="Project Gutenberg pgNNNN.txt books, or .deb packages holding them"
    )
    parser.add_argument(
        "--wikipedia",
        type=Path,
        nargs="+",
        help="English Wikipedia XML dumps (enwiki-*pages-articles*.xml.bz2), or wheels/zips holding one",
    )
    parser.add_argument("--wikipedia-mb", type=float, default=0.8, help="stop after this many MB of article text")
    parser.add_argument("--tex", type=Path, nargs="+", help=".tex/.Rnw articles, or .deb packages (their doc/*.Rnw)")
    parser.add_argument(
        "--tex-license", help="licence of --tex articles whose package declares none (plain files, non-R packages)"
    )
    args = parser.parse_args(argv)

    given = [args.stackexchange, *(args.gutenberg or []), *(args.wikipedia or []), *(args.tex or [])]
    missing = [str(path) for path in given if not path.is_file()]
    if missing:
        parser.error(f"input not found: {', '.join(missing)}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        write(args.out, "stackexchange", stackexchange(args.stackexchange, args.stackexchange_site))
        write(args.out, "python_docs", python_docs())
        if args.gutenberg:
            write(args.out, "gutenberg", gutenberg(read_inputs(args.gutenberg, "*/pg[0-9]*.txt", "gutenberg")))
        if args.wikipedia:
            dumps = read_inputs(args.wikipedia, "*enwiki-*pages-articles*.xml*.bz2", "wikipedia")
            write(args.out, "wikipedia", wikipedia(dumps, int(args.wikipedia_mb * 1e6)))
        if args.tex:
            articles = read_inputs(args.tex, "*/doc/*.Rnw", "tex")
            write(args.out, "tex_articles", tex_articles(articles, r_package_licenses(args.tex), args.tex_license))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, given in (("gutenberg", args.gutenberg), ("wikipedia", args.wikipedia), ("tex_articles", args.tex)):
        if not given:
            print(f"{name}: no input given, {args.out / (name + '.jsonl')} left as it is")
    return 0


if __name__ == "__main__":
    sys.exit(main())
