"""GitHub: source files -> one document per file, LLaMA-1's recipe for code.

LLaMA-1 (§2.1) used the public GitHub dataset on Google BigQuery, kept only projects under the
Apache, BSD and MIT licences, filtered low-quality files with heuristics on line length and on the
share of alphanumeric characters, removed boilerplate such as headers with regular expressions, and
deduplicated exactly (the runner's `exact_dedup`). Here:

- licence: a repository checkout's licence is read from its top-level LICENSE / LICENCE / COPYING
  files and recognised by their wording (`detect_license`); a JSONL row carries it in a field
  (BigQuery's `license`, The Stack's `max_stars_repo_licenses`). A file whose licences are not all
  allowed is dropped (`license_not_allowed`, the example names the licence found);
- extension: only code files (`EXTENSIONS`, or the names in `FILENAMES`), else `extension_not_allowed`;
- quality: a line over 1000 characters (`long_line`: minified or generated code, embedded data), mean
  line length over 100 (`long_mean_line`), alphanumeric share under 0.25 (`low_alphanumeric`);
- boilerplate: the comment blocks at the top of a file that speak of copyright or licence are removed.

Input: a folder (a repository checkout; hidden folders such as `.git` are skipped) or a JSONL file
(plain, .gz, .bz2, .xz, .zst) of one source file per line, its field names set in `Options`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Optional, Sequence

from data_pipeline.raw.common import CorruptInput, Tally, make_doc, range_lines, stream_errors
from data_pipeline.sources import open_text

SOURCE = "github"

# comment syntaxes: (line comment prefix, (block comment open, close))
_HASH, _SLASH = ("#", None), ("//", ("/*", "*/"))
_LANGUAGES: dict[str, tuple[str, Optional[str], Optional[tuple[str, str]]]] = {}
for _language, _exts, (_line, _block) in [
    ("Python", "py pyi pyx pxd", _HASH),
    ("Shell", "sh bash zsh", _HASH),
    ("Ruby", "rb", _HASH),
    ("Perl", "pl pm", _HASH),
    ("R", "r", _HASH),
    ("Julia", "jl", _HASH),
    ("PowerShell", "ps1 psm1", _HASH),
    ("CMake", "cmake", _HASH),
    ("Makefile", "mk mak", _HASH),
    ("Dockerfile", "dockerfile", _HASH),
    ("Elixir", "ex exs", _HASH),
    ("Nim", "nim", _HASH),
    ("Tcl", "tcl", _HASH),
    ("C", "c h", _SLASH),
    ("C++", "cc cpp cxx c++ hh hpp hxx h++ inl", _SLASH),
    ("CUDA", "cu cuh", _SLASH),
    ("Objective-C", "m mm", _SLASH),
    ("C#", "cs", _SLASH),
    ("Java", "java", _SLASH),
    ("Kotlin", "kt kts", _SLASH),
    ("Scala", "scala", _SLASH),
    ("Groovy", "groovy gradle", _SLASH),
    ("Go", "go", _SLASH),
    ("Rust", "rs", _SLASH),
    ("Swift", "swift", _SLASH),
    ("Dart", "dart", _SLASH),
    ("JavaScript", "js jsx mjs cjs", _SLASH),
    ("TypeScript", "ts tsx", _SLASH),
    ("PHP", "php", _SLASH),
    ("Zig", "zig", ("//", None)),
    ("Protocol Buffers", "proto", _SLASH),
    ("Solidity", "sol", _SLASH),
    ("Verilog", "v sv svh", _SLASH),
    ("CSS", "css scss less", (None, ("/*", "*/"))),
    ("HTML", "html htm", (None, ("<!--", "-->"))),
    ("SQL", "sql", ("--", ("/*", "*/"))),
    ("Lua", "lua", ("--", ("--[[", "]]"))),
    ("Haskell", "hs", ("--", ("{-", "-}"))),
    ("OCaml", "ml mli", (None, ("(*", "*)"))),
    ("Erlang", "erl hrl", ("%", None)),
    ("TeX", "tex", ("%", None)),
    ("Lisp", "lisp el scm rkt", (";", None)),
    ("Clojure", "clj cljs cljc", (";", None)),
    ("Assembly", "asm s", (";", None)),
    ("Fortran", "f f90 f95 f03 f08 for", ("!", None)),
    ("Visual Basic", "vb bas", ("'", None)),
]:
    for _ext in _exts.split():
        _LANGUAGES[_ext] = (_language, _line, _block)

EXTENSIONS = tuple(_LANGUAGES)
FILENAMES = {"Makefile": "mk", "GNUmakefile": "mk", "Dockerfile": "dockerfile", "CMakeLists.txt": "cmake"}
LICENSE_FILE = re.compile(r"^(?:licen[cs]e|copying|unlicense)(?:[-._].*)?$", re.I)
_NOTICE = re.compile(r"copyright|licen[cs]e|spdx|all rights reserved|permission is hereby granted", re.I)
_SPDX = {
    name.lower(): name
    for name in ("MIT", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "GPL-2.0", "GPL-3.0", "LGPL-2.1", "LGPL-3.0")
    + ("AGPL-3.0", "MPL-2.0", "ISC", "Unlicense", "BSL-1.0", "EPL-1.0", "EPL-2.0", "CC0-1.0")
}


@dataclass
class Options:
    allowed_licenses: Sequence[str] = ("MIT", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause")  # SPDX ids
    extensions: Sequence[str] = EXTENSIONS  # file name endings kept (lowercase, no dot)
    filenames: Sequence[str] = tuple(FILENAMES)  # files without a code extension kept by name
    max_line_chars: int = 1000  # a longer line drops the file (`long_line`)
    max_mean_line_chars: float = 100.0  # `long_mean_line`
    min_alphanumeric: float = 0.25  # share of letters and digits in the text (`low_alphanumeric`)
    max_file_bytes: int = 1_000_000  # larger files dropped unread (`too_large`)
    strip_license_header: bool = True
    # JSONL input: field names (the first present of each list is used)
    content_field: str = "content"
    path_fields: Sequence[str] = ("path", "max_stars_repo_path")
    license_fields: Sequence[str] = ("license", "licenses", "max_stars_repo_licenses")
    repo_fields: Sequence[str] = ("repo_name", "max_stars_repo_name")


def detect_license(text: str) -> str:
    """The SPDX id of a licence file's text, recognised by its wording; `unknown` when not recognised."""
    words = " ".join(re.sub(r"[^\w.,'-]+", " ", text.lower()).split())
    head = words[:600]
    if "gnu affero general public license" in head:
        return "AGPL-3.0"
    if "gnu lesser general public license" in head or "gnu library general public license" in head:
        return "LGPL-3.0" if "version 3" in head else "LGPL-2.1"
    if "gnu general public license" in head:
        return "GPL-3.0" if "version 3" in head else "GPL-2.0"
    if "apache license" in head and "version 2.0" in head:
        return "Apache-2.0"
    if "mozilla public license" in head and "2.0" in head:
        return "MPL-2.0"
    if "permission is hereby granted, free of charge, to any person obtaining a copy" in words:
        return "MIT"
    if "redistribution and use in source and binary forms" in words:
        if "all advertising materials" in words:
            return "BSD-4-Clause"
        third = "neither the name" in words or "the name of the author may not" in words
        return "BSD-3-Clause" if third else "BSD-2-Clause"
    if "permission to use, copy, modify, and or distribute this software for any purpose" in words:
        return "ISC"
    if "this is free and unencumbered software released into the public domain" in words:
        return "Unlicense"
    if "boost software license" in head:
        return "BSL-1.0"
    return "unknown"


def repo_license(root: Path) -> str:
    """The licence(s) of a repository checkout from its top-level licence files (`none` without one)."""
    found = sorted(
        {
            detect_license(p.read_text("utf-8", "replace"))
            for p in root.iterdir()
            if p.is_file() and LICENSE_FILE.match(p.name)
        }
    )
    return ", ".join(found) or "none"


def _license_allowed(license: str, options: Options) -> bool:
    allowed = {name.lower() for name in options.allowed_licenses}
    names = [n.strip().lower() for n in license.split(",") if n.strip()]
    return bool(names) and all(n in allowed for n in names)


def _license_of_row(row: dict, options: Options) -> str:
    value = next((row[f] for f in options.license_fields if row.get(f)), None)
    names = value if isinstance(value, list) else [value] if value else []
    return ", ".join(_SPDX.get(str(n).strip().lower(), str(n).strip()) for n in names) or "none"


def language_key(name: str, options: Options) -> Optional[str]:
    """The key of a file name in the language table (its extension, or e.g. `mk` for `Makefile`), or
    None when the recipe does not keep such files."""
    if name in options.filenames:
        return FILENAMES.get(name, name)
    ext = name.rsplit(".", 1)[1].lower() if "." in name.lstrip(".") else None
    return ext if ext in options.extensions else None


def strip_license_header(text: str, key: Optional[str]) -> str:
    """The file without the comment blocks at its top that mention copyright or a licence (a shebang or
    encoding line before them is kept)."""
    if key not in _LANGUAGES:
        return text
    _, line, block = _LANGUAGES[key]
    keep = ""
    first = re.match(r"(?:#![^\n]*\n)?(?:[ \t]*#[^\n]*coding[:=][^\n]*\n)?", text) if line == "#" else None
    if first and first.end():
        keep, text = text[: first.end()], text[first.end() :]
    while True:
        body = text.lstrip()
        end = 0
        if block and body.startswith(block[0]):
            close = body.find(block[1], len(block[0]))
            end = close + len(block[1]) if close >= 0 else 0
        elif line and body.startswith(line):
            match = re.match(rf"(?:[ \t]*{re.escape(line)}[^\n]*(?:\n|$))+", body)
            end = match.end() if match else 0
        if not end or not _NOTICE.search(body[:end]):
            return keep + text
        text = body[end:].lstrip("\n")


def quality_problem(text: str, options: Options) -> Optional[str]:
    """The reason LLaMA-1's code heuristics drop this text, or None when it passes."""
    lengths = [len(line) for line in text.splitlines()] or [0]
    if max(lengths) > options.max_line_chars:
        return "long_line"
    if sum(lengths) / len(lengths) > options.max_mean_line_chars:
        return "long_mean_line"
    if sum(c.isalnum() for c in text) < options.min_alphanumeric * len(text):
        return "low_alphanumeric"
    return None


def _clean(
    text: str, path: str, repo: str, license: str, origin: str, options: Options, tally: Tally
) -> Optional[dict]:
    """The document for one source file after the recipe's checks, or None (the drop counted)."""
    if not _license_allowed(license, options):
        tally.drop("license_not_allowed", f"{origin} (license: {license})", text)
        return None
    key = language_key(PurePosixPath(path).name, options)
    if key is None:
        tally.drop("extension_not_allowed", origin, text)
        return None
    if "\x00" in text:
        tally.drop("binary", origin)
        return None
    if options.strip_license_header:
        text = strip_license_header(text, key)
    if not text.strip():
        tally.drop("empty", origin)
        return None
    problem = quality_problem(text, options)
    if problem:
        tally.drop(problem, origin, text)
        return None
    language = _LANGUAGES[key][0] if key in _LANGUAGES else key
    return make_doc(SOURCE, f"{SOURCE}/{repo}/{path}", text, repo=repo, path=path, license=license, language=language)


def _tree_files(root: Path) -> Iterator[Path]:
    """The regular files under `root` in sorted order, hidden folders (.git, .github, ...) skipped."""
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(names):
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                yield path


def _tree_documents(root: Path, options: Options, tally: Tally) -> Iterator[dict]:
    license = repo_license(root)
    for file in _tree_files(root):
        rel = file.relative_to(root).as_posix()
        origin = f"{root}:{rel}"
        try:
            size = file.stat().st_size
            data = file.read_bytes() if size <= options.max_file_bytes else b""
        except OSError as e:  # one unreadable file: counted, the rest of the repository still read
            tally.read("")
            tally.drop("unreadable", f"{origin} ({e})", None)
            continue
        if size > options.max_file_bytes:
            tally.read("")
            tally.drop("too_large", f"{origin} ({size} bytes)", None)
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            tally.read(data.decode("utf-8", "replace"))
            tally.drop("not_utf8", origin, None)
            continue
        tally.read(text)
        doc = _clean(text, rel, root.name, license, origin, options, tally)
        if doc:
            yield doc


def _jsonl_documents(path: Path, options: Options, tally: Tally, lines: Optional[tuple[int, int]]) -> Iterator[dict]:
    """The rows of a JSONL file (`lines`: only those starting in that byte range, named by offset)."""
    stem = Path(re.sub(r"\.(gz|bz2|xz|zst)$", "", path.name)).stem
    try:
        with open_text(path) as f:
            rows = enumerate(f, start=1) if lines is None else range_lines(f, *lines)
            for number, raw in rows:
                origin = f"{path}:{number}" if lines is None else f"{path}@{number}"
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                    text = row[options.content_field]
                    if not isinstance(text, str):
                        raise TypeError(f"{options.content_field} is not text")
                except (ValueError, KeyError, TypeError):
                    tally.read(raw.decode("utf-8", "replace"))
                    tally.drop("bad_record", origin, raw.decode("utf-8", "replace"))
                    continue
                tally.read(text)
                fallback = f"{stem}-{number}" if lines is None else f"{stem}-at-{number}"
                file_path = next((str(row[f]) for f in options.path_fields if row.get(f)), fallback)
                repo = next((str(row[f]) for f in options.repo_fields if row.get(f)), stem)
                doc = _clean(text, file_path, repo, _license_of_row(row, options), origin, options, tally)
                if doc:
                    yield doc
    except stream_errors() as e:  # truncated or corrupt compressed stream: what was yielded stays
        raise CorruptInput(f"{path}: {type(e).__name__}: {e}") from None


def documents(path: Path, options: Options, tally: Tally, lines: Optional[tuple[int, int]] = None) -> Iterator[dict]:
    """The kept source files of one input: a repository checkout (folder) or a JSONL of files (`lines`:
    the rows starting in that byte range of it, a part of a huge file; rows without a path field are
    then named by their byte offset, not their line number)."""
    path = Path(path)
    if path.is_dir():
        yield from _tree_documents(path, options, tally)
    else:
        yield from _jsonl_documents(path, options, tally, lines)
