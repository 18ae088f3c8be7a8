"""The Books (Project Gutenberg) and GitHub raw sources on real data: the Canterbury corpus's 1990s
Gutenberg etexts, a 2011 Gutenberg ebook, and excerpts of five PyPI sdists under five licences (see the
READMEs under tests/data/raw/)."""

from __future__ import annotations

import gzip
import json
import re
import textwrap
import zipfile
from pathlib import Path

import pytest

from data_pipeline.raw import github, gutenberg
from data_pipeline.raw.common import CorruptInput, Tally
from data_pipeline.sources import open_text

DATA = Path(__file__).resolve().parent / "data" / "raw"
BOOKS = DATA / "gutenberg"
REPOS = DATA / "github"
BOOK_FILES = ["alice29.txt.gz", "asyoulik.txt", "lcet10.txt.bz2", "pg1661.txt.gz", "plrabn12.txt.xz"]
SHERLOCK_FIRST = "THE ADVENTURES OF SHERLOCK HOLMES"
SHERLOCK_LAST = "Walsall, where I believe that she has met with considerable success."


def book_docs(path: Path, **options) -> tuple[list[dict], Tally]:
    tally = Tally()
    return list(gutenberg.documents(path, gutenberg.Options(**options), tally)), tally


def code_docs(path: Path, **options) -> tuple[dict[str, dict], Tally]:
    tally = Tally()
    return {d["meta"]["path"]: d for d in github.documents(path, github.Options(**options), tally)}, tally


def raw_text(name: str) -> str:
    """A bundled book's text exactly as distributed (decompressed, decoded)."""
    with open_text(BOOKS / name) as f:
        return gutenberg.decode(f.read())[0]


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# Books


def test_modern_header_footer_and_credits_removed():
    (doc,), tally = book_docs(BOOKS / "pg1661.txt.gz")
    text = doc["text"]
    assert lines(text)[0] == SHERLOCK_FIRST and lines(text)[-1] == SHERLOCK_LAST
    for boilerplate in ("Project Gutenberg", "START OF THIS", "END OF THIS", "Produced by", "FULL LICENSE", "\r"):
        assert boilerplate not in text
    assert "To Sherlock Holmes she is always THE woman." in text
    assert doc["id"] == "gutenberg/pg1661"
    meta = doc["meta"]
    assert (meta["title"], meta["author"], meta["language"], meta["ebook"]) == (
        "The Adventures of Sherlock Holmes",
        "Arthur Conan Doyle",
        "English",
        1661,
    )
    assert (meta["header"], meta["footer"], meta["encoding"]) == ("modern", True, "utf-8")
    assert tally.docs_in == 1 and not tally.dropped


def test_early_etext_notes_removed():
    """1992: a one-line `The Project Gutenberg Etext of` header with a `*End of` footer (lcet10), and a
    one-page `This is the February 1992 Project Gutenberg release of:` introduction (plrabn12)."""
    (workshop,), _ = book_docs(BOOKS / "lcet10.txt.bz2")
    assert lines(workshop["text"])[:2] == ["WORKSHOP ON ELECTRONIC TEXTS", "PROCEEDINGS"]
    assert lines(workshop["text"])[-1] == "[A few of the italics (when used for emphasis) were replaced by CAPS mh]"
    assert "Project Gutenberg" not in workshop["text"]
    assert workshop["meta"]["title"] == "LOC WORKSHOP ON ELECTRONIC TEXTS"
    assert (workshop["meta"]["header"], workshop["meta"]["footer"]) == ("etext_note", True)

    (milton,), _ = book_docs(BOOKS / "plrabn12.txt.xz")
    assert lines(milton["text"])[:3] == ["Paradise Lost", "Book I", "Of Man's first disobedience, and the fruit"]
    assert lines(milton["text"])[-1] == "[The End]"  # the DOS end-of-file marks after it are gone
    for note in ("Project Gutenberg", "IBM cards", "Introduction  (one page)", "\x1a"):
        assert note not in milton["text"]
    assert (milton["meta"]["title"], milton["meta"]["author"]) == ("Paradise Lost", "John Milton")


def test_text_without_markers_is_kept_whole_or_dropped_on_request():
    """The Canterbury corpus's Alice and As You Like It had Gutenberg's header already cut off."""
    (alice,), _ = book_docs(BOOKS / "alice29.txt.gz")
    assert lines(alice["text"])[0] == "ALICE'S ADVENTURES IN WONDERLAND" and lines(alice["text"])[-1] == "THE END"
    assert alice["meta"]["header"] == "none" and alice["meta"]["footer"] is False
    assert alice["text"] == gutenberg.normalize(raw_text("alice29.txt.gz"))

    (play,), _ = book_docs(BOOKS / "asyoulik.txt")
    assert lines(play["text"])[0] == "AS YOU LIKE IT" and lines(play["text"])[-1] == "[Exeunt]"

    docs, tally = book_docs(BOOKS / "asyoulik.txt", require_markers=True)
    assert docs == [] and tally.dropped == {"no_gutenberg_markers": 1}


# The header and footer styles no bundled file has, wrapped around the real Alice: abridged from the
# 1990s small-print etexts and the early-2000s `***START OF` ebooks, with their marker lines verbatim.
SMALL_PRINT = (
    "*****The Project Gutenberg Etext of Alice in Wonderland*****\n"
    "#11 in our series by Lewis Carroll\n\n"
    "Copyright laws are changing all over the world, be sure to check\n"
    "the copyright laws for your country before posting these files!!\n\n"
    "**Welcome To The World of Free Plain Vanilla Electronic Texts**\n\n"
    "**Etexts Readable By Both Humans and By Computers, Since 1971**\n\n"
    "*These Etexts Prepared By Hundreds of Volunteers and Donations*\n\n"
    "**START**THE SMALL PRINT!**FOR PUBLIC DOMAIN ETEXTS**START**\n"
    'Why is this "Small Print!" statement here?  You know: lawyers.\n\n'
    "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n\n"
    "This etext was prepared by a Project Gutenberg volunteer.\n\n\n",
    "\n\n\nEnd of Project Gutenberg Etext of Alice in Wonderland\n",
)
NO_SPACE = (
    "The Project Gutenberg EBook of Alice's Adventures in Wonderland, by Lewis Carroll\n\n"
    "Title: Alice's Adventures in Wonderland\n\nAuthor: Lewis Carroll\n\n"
    "Release Date: January, 1991 [EBook #11]\n\nLanguage: English\n\n"
    "***START OF THE PROJECT GUTENBERG EBOOK ALICE'S ADVENTURES IN WONDERLAND***\n\n\n",
    "\n\n\nEnd of the Project Gutenberg EBook of Alice's Adventures in Wonderland, by Lewis Carroll\n\n"
    "***END OF THE PROJECT GUTENBERG EBOOK ALICE'S ADVENTURES IN WONDERLAND***\n\n"
    "***** This file should be named 11.txt or 11.zip *****\n",
)


@pytest.mark.parametrize("wrapper,style", [(SMALL_PRINT, "small_print"), (NO_SPACE, "modern")], ids=["1993", "2003"])
def test_older_header_styles(wrapper, style):
    alice = raw_text("alice29.txt.gz")
    book = gutenberg.parse_gutenberg(wrapper[0] + alice + wrapper[1])
    assert book.text == gutenberg.normalize(alice)
    assert book.header == style and book.footer
    assert book.ebook == 11 and book.author == "Lewis Carroll"


def test_zip_and_cp1252_fallback(tmp_path):
    (reference,), _ = book_docs(BOOKS / "pg1661.txt.gz")
    text = raw_text("pg1661.txt.gz")
    with zipfile.ZipFile(tmp_path / "1661.zip", "w") as archive:  # Gutenberg's NNNN.zip of NNNN.txt
        archive.writestr("1661.txt", text.encode("utf-8"))
    (zipped,), _ = book_docs(tmp_path / "1661.zip")
    assert zipped["text"] == reference["text"] and zipped["id"] == "gutenberg/1661/1661"

    (tmp_path / "1661-8.txt").write_bytes(text.encode("cp1252"))  # "née", "employé" are not UTF-8 now
    (legacy,), _ = book_docs(tmp_path / "1661-8.txt")
    assert legacy["meta"]["encoding"] == "cp1252" and legacy["text"] == reference["text"]


def test_damaged_or_short_books(tmp_path):
    data = (BOOKS / "pg1661.txt.gz").read_bytes()
    (tmp_path / "cut.txt.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptInput, match=r"cut\.txt\.gz"):
        book_docs(tmp_path / "cut.txt.gz")
    (tmp_path / "bad.zip").write_bytes(data[:1000])
    with pytest.raises(CorruptInput, match=r"bad\.zip"):
        book_docs(tmp_path / "bad.zip")

    sherlock = raw_text("pg1661.txt.gz")
    (tmp_path / "short.txt").write_text(sherlock[: sherlock.index("ADVENTURE I.")])  # header + contents
    docs, tally = book_docs(tmp_path / "short.txt")
    assert docs == [] and tally.dropped == {"too_short": 1}


def new_edition(old: str) -> str:
    """The 2011 ebook #1661 made into a 2020s re-release, as Gutenberg re-releases books: the header of
    today's ebooks (credits moved into it), a re-wrapped text with typographic quotes and dashes, a few
    spellings modernised, and today's end marker. (No second real edition of a bundled book was found
    in the Debian and PyPI packages searched, so this one is made from the real book.)"""
    start, end = old.index("*** START OF"), old.index("*** END OF")
    body = old[old.index("\n", start) : old.rindex("End of the Project Gutenberg", 0, end)]
    body = body.replace("Produced by an anonymous Project Gutenberg volunteer and Jose Menendez", "")
    body = re.sub(r"\bto-(day|morrow|night)\b", r"to\1", body)
    body = re.sub(r'"(?=\w)', "\u201c", body).replace('"', "\u201d").replace("'", "\u2019").replace("--", "\u2014")
    paragraphs = [p for p in re.split(r"\n\s*\n", body)]
    body = "\n\n".join(textwrap.fill(" ".join(p.split()), 70) if not p.startswith(" ") else p for p in paragraphs)
    header = (
        "The Project Gutenberg eBook of The Adventures of Sherlock Holmes, by Arthur Conan Doyle\n\n"
        "This eBook is for the use of anyone anywhere in the United States and\nmost other parts of the world "
        "at no cost and with almost no restrictions\nwhatsoever.\n\n"
        "Title: The Adventures of Sherlock Holmes\n\nAuthor: Arthur Conan Doyle\n\n"
        "Release Date: November 29, 2002 [eBook #1661]\n[Most recently updated: October 10, 2023]\n\n"
        "Language: English\n\nProduced by: an anonymous Project Gutenberg volunteer and Jose Menendez\n\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK THE ADVENTURES OF SHERLOCK HOLMES ***\n"
    )
    return header + body + "\n\n*** END OF THE PROJECT GUTENBERG EBOOK THE ADVENTURES OF SHERLOCK HOLMES ***\n"


def test_two_editions_of_a_book_become_one(tmp_path):
    """LLaMA-1 removed books with more than 90% content overlap: of the two Sherlock Holmes editions the
    first is kept, and every other book, each a different work, is kept too."""
    from data_pipeline.raw import dedup

    (tmp_path / "1661-0.txt").write_text(new_edition(raw_text("pg1661.txt.gz")), encoding="utf-8")
    files = [BOOKS / name for name in BOOK_FILES] + [tmp_path / "1661-0.txt"]
    docs = [doc for path in files for doc in book_docs(path)[0]]
    assert len(docs) == 6 and docs[-1]["meta"]["header"] == "modern"
    assert lines(docs[-1]["text"])[0] == SHERLOCK_FIRST

    old, new = (dedup.shingles(doc["text"], 5) for doc in (docs[3], docs[-1]))
    assert 0.9 < len(old & new) / len(old | new) < 1  # a new edition: not the same words throughout

    tally = Tally()
    unique = list(dedup.exact_dedup(docs, tally))
    assert len(unique) == 6  # the editions differ, so only near-dedup can find them
    kept = list(dedup.near_dedup(unique, tally, threshold=0.9))
    assert [d["id"] for d in kept] == [d["id"] for d in docs[:-1]]
    assert tally.dropped == {"near_duplicate": 1} and "gutenberg/pg1661" in tally.examples["near_duplicate"][0]


def test_an_edition_with_added_notes_is_still_the_same_book():
    """Overlap is measured on the smaller text (containment): an edition that adds an introduction and
    notes (here ~12% more words, taken from another real book) shares under 0.9 of the union of
    shingles with the old one, yet holds all of it: still one book. A different book stays."""
    from data_pipeline.raw import dedup

    sherlock = book_docs(BOOKS / "pg1661.txt.gz")[0][0]
    lcet10 = book_docs(BOOKS / "lcet10.txt.bz2")[0][0]
    words = lcet10["text"].split()
    notes = " ".join(words[: len(sherlock["text"].split()) // 8])
    annotated = {"id": "annotated", "text": "INTRODUCTION\n\n" + notes + "\n\n" + sherlock["text"]}
    old, new = (dedup.shingles(doc["text"], 5) for doc in (sherlock, annotated))
    assert len(old & new) / len(old | new) < 0.9 < len(old & new) / len(old)
    tally = Tally()
    kept = list(dedup.near_dedup([sherlock, annotated, lcet10], tally, threshold=0.9))
    assert [d["id"] for d in kept] == [sherlock["id"], lcet10["id"]]
    assert tally.dropped == {"near_duplicate": 1}


# --------------------------------------------------------------------------------------------------
# GitHub


@pytest.mark.parametrize(
    "licence_file,expected",
    [
        ("six-1.17.0/LICENSE", "MIT"),
        ("absl_py-2.5.1/LICENSE", "Apache-2.0"),
        ("pycparser-3.12/LICENSE", "BSD-3-Clause"),
        ("mkdocs-1.6.1/LICENSE", "BSD-2-Clause"),
        ("mutagen-1.48.1/COPYING", "GPL-2.0"),
    ],
)
def test_license_detected_from_its_text(licence_file, expected):
    assert github.detect_license((REPOS / licence_file).read_text()) == expected
    assert github.repo_license(REPOS / licence_file.split("/")[0]) == expected


def test_gpl_repository_dropped_whole():
    docs, tally = code_docs(REPOS / "mutagen-1.48.1")
    assert docs == {} and tally.docs_in == 3
    assert tally.dropped == {"license_not_allowed": 3}
    assert all("(license: GPL-2.0)" in example for example in tally.examples["license_not_allowed"])


def test_license_headers_stripped_and_code_kept():
    six, _ = code_docs(REPOS / "six-1.17.0")
    source = (REPOS / "six-1.17.0" / "six.py").read_text()
    assert "Permission is hereby granted" in source and "Permission is hereby granted" not in six["six.py"]["text"]
    assert six["six.py"]["text"].startswith('"""Utilities for writing code that runs on Python 2 and 3"""')
    assert six["six.py"]["text"].endswith(source[-300:])
    assert six["six.py"]["meta"] | {"source": None} == {
        "source": None,
        "repo": "six-1.17.0",
        "path": "six.py",
        "license": "MIT",
        "language": "Python",
    }

    absl, _ = code_docs(REPOS / "absl_py-2.5.1")
    text = absl["absl/flags/_validators_classes.py"]["text"]
    assert text.startswith('"""Defines *private* classes') and "Apache License" not in text

    pycparser, _ = code_docs(REPOS / "pycparser-3.12")
    assert pycparser["pycparser/ast_transforms.py"]["text"].startswith("from copy import deepcopy")

    mkdocs, _ = code_docs(REPOS / "mkdocs-1.6.1")
    lunr = mkdocs["mkdocs/contrib/search/lunr-language/lunr.da.js"]["text"]  # two /*! Copyright */ blocks
    assert "Copyright" not in lunr and lunr.startswith("/**\n * export the module via AMD")
    darkmode = "mkdocs/themes/mkdocs/js/darkmode.js"  # no header: untouched
    assert mkdocs[darkmode]["text"] == (REPOS / "mkdocs-1.6.1" / darkmode).read_text()

    shebang = "#!/usr/bin/env python\n# Copyright 2024 A. Author\n# SPDX-License-Identifier: MIT\n\nimport os\n"
    assert github.strip_license_header(shebang, "py") == "#!/usr/bin/env python\nimport os\n"
    assert github.strip_license_header("# Compute things.\nimport os\n", "py") == "# Compute things.\nimport os\n"


def test_minified_file_and_extension_filter():
    docs, tally = code_docs(REPOS / "mkdocs-1.6.1")
    assert "mkdocs/themes/readthedocs/js/html5shiv.min.js" not in docs  # one 2,639-character line
    assert tally.dropped == {"long_line": 1, "extension_not_allowed": 1}  # and LICENSE
    assert "html5shiv.min.js" in tally.examples["long_line"][0]

    docs, tally = code_docs(REPOS / "pycparser-3.12")
    assert list(docs) == ["pycparser/ast_transforms.py"] and tally.dropped == {"extension_not_allowed": 2}
    docs, _ = code_docs(REPOS / "pycparser-3.12", extensions=[*github.EXTENSIONS, "cfg"])
    assert docs["pycparser/_c_ast.cfg"]["meta"]["language"] == "cfg"


def test_line_length_and_alphanumeric_heuristics():
    options = github.Options()
    six = (REPOS / "six-1.17.0" / "six.py").read_text()
    assert github.quality_problem(six, options) is None
    assert github.quality_problem("x = 1\n" + "y" * 1001, options) == "long_line"
    assert github.quality_problem(("data = '" + "ab" * 70 + "'\n") * 20, options) == "long_mean_line"
    assert github.quality_problem("+----+----+\n|    |    |\n+----+----+\n" * 10, options) == "low_alphanumeric"


def test_jsonl_rows_like_bigquery_and_the_stack(tmp_path):
    def row(folder: str, file: str, **fields) -> dict:
        return {"content": (REPOS / folder / file).read_text(), **fields}

    rows = [
        row("six-1.17.0", "six.py", repo_name="benjaminp/six", path="six.py", license="mit"),
        row("mutagen-1.48.1", "mutagen/_tags.py", repo_name="quodlibet/mutagen", path="_tags.py", license="gpl-2.0"),
        row("six-1.17.0", "setup.cfg", repo_name="benjaminp/six", path="setup.cfg", license="mit"),
        row(
            "mkdocs-1.6.1",
            "mkdocs/themes/readthedocs/js/html5shiv.min.js",
            repo_name="mkdocs/mkdocs",
            path="mkdocs/themes/readthedocs/js/html5shiv.min.js",
            license="bsd-2-clause",
        ),
        row(
            "pycparser-3.12",
            "pycparser/ast_transforms.py",
            max_stars_repo_name="eliben/pycparser",
            max_stars_repo_path="pycparser/ast_transforms.py",
            max_stars_repo_licenses=["BSD-3-Clause"],
        ),
    ]
    path = tmp_path / "files.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows[:2]) + '\n{"content": "truncated\n')
        f.write("\n".join(json.dumps(r) for r in rows[2:]) + "\n")
    docs, tally = code_docs(path)
    assert list(docs) == ["six.py", "pycparser/ast_transforms.py"]
    assert docs["six.py"]["id"] == "github/benjaminp/six/six.py" and docs["six.py"]["meta"]["license"] == "MIT"
    assert "Permission is hereby granted" not in docs["six.py"]["text"]
    assert docs["pycparser/ast_transforms.py"]["meta"]["repo"] == "eliben/pycparser"
    assert tally.docs_in == 6
    assert tally.dropped == {"license_not_allowed": 1, "bad_record": 1, "extension_not_allowed": 1, "long_line": 1}

    renamed = tmp_path / "renamed.jsonl"  # other field names through the options
    renamed.write_text(json.dumps({"text": rows[0]["content"], "file": "six.py", "lic": ["MIT", "Apache-2.0"]}))
    docs, _ = code_docs(renamed, content_field="text", path_fields=["file"], license_fields=["lic"])
    assert docs["six.py"]["meta"]["license"] == "MIT, Apache-2.0" and docs["six.py"]["meta"]["repo"] == "renamed"


def test_damaged_jsonl_raises_after_the_good_rows(tmp_path):
    content = (REPOS / "six-1.17.0" / "six.py").read_text()
    lines_ = [json.dumps({"content": content, "path": f"six{i}.py", "license": "MIT"}) for i in range(20)]
    data = gzip.compress(("\n".join(lines_) + "\n").encode())
    path = tmp_path / "files.jsonl.gz"
    path.write_bytes(data[: len(data) * 3 // 4])
    tally, docs = Tally(), []
    with pytest.raises(CorruptInput, match=r"files\.jsonl\.gz"):
        for doc in github.documents(path, github.Options(), tally):
            docs.append(doc)
    assert docs and docs[0]["meta"]["path"] == "six0.py"


def test_an_unreadable_file_is_counted_and_the_rest_of_the_repository_read(monkeypatch):
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "setup.py":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    docs, tally = code_docs(REPOS / "six-1.17.0")
    assert "six.py" in docs and "setup.py" not in docs
    assert tally.dropped["unreadable"] == 1 and "Permission denied" in tally.examples["unreadable"][0]
    assert tally.docs_in == len(docs) + sum(tally.dropped.values())
