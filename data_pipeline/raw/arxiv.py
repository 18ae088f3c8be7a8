"""ArXiv papers from their LaTeX sources, cleaned the way LLaMA-1 did.

LLaMA-1 (Touvron et al. 2023, §2.1), following Lewkowycz et al. (2022): "We removed everything before
the first section, as well as the bibliography. We also removed the comments from the .tex files, and
inline-expanded definitions and macros written by users to increase consistency across papers." The
appendix goes too by default (`Options.drop_appendix`), as the recipe's issue asks; the text stays LaTeX.

An input is one paper: a `.tex`, a compressed `.tex` (`.gz`, `.bz2`, `.xz`, `.zst`), a tar (`.tar`,
`.tar.gz`, or an arXiv `.gz` that holds a tar) or an unpacked folder, whose main file is the one with
`\\documentclass`; the files it `\\input`s or `\\include`s are inlined. The authors' macros are expanded
by `latex_macros`. Verbatim blocks (`verbatim`, `lstlisting`, `minted`, ... and `\\verb`) are kept as
written: no comment, macro, section, bibliography or `\\end{document}` is looked for inside them.
"""

from __future__ import annotations

import io
import posixpath
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from data_pipeline.raw.common import CorruptInput, Tally, make_doc, stream_errors
from data_pipeline.raw.latex_macros import expand_macros, extract_macros
from data_pipeline.sources import open_text

SOURCE = "arxiv"
MAX_INPUT_DEPTH = 8  # \input inside \input ...

# environments whose body TeX reads as characters, not commands (`comment`'s body is dropped)
_VERBATIM_ENVS = r"verbatim\*?|Verbatim\*?|BVerbatim|lstlisting|minted|alltt|filecontents\*?|comment"
_VERB = re.compile(r"\\verb\*?([^\sA-Za-z*])[^\n]*?\1")
# what the verbatim scan stops at: an escaped \ or % (plain text), \verb, a verbatim environment, a comment
_VERBATIM_SCAN = re.compile(rf"\\[\\%]|\\verb\*?(?![A-Za-z])|\\begin\{{({_VERBATIM_ENVS})\}}|%")
# a verbatim block stands in the text as one character of Unicode's plane 15 (private use) until restored
_BLOCK_BASE, _MAX_BLOCKS = 0xF0000, 0xFFFE
_BLOCK_CHAR = re.compile("[\U000f0000-\U000ffffd]")
# a sectioning command with its title: \section*[short]{Title} ("\titleformat{\section}" is not one)
_SECTIONING = re.compile(r"\\(?:part|chapter|section|subsection|subsubsection|paragraph)\*?\s*(?:\[[^\]\n]*\]\s*)?\{")
_BEGIN_DOCUMENT = re.compile(r"\\begin\{document\}")
_END_MATTER = {
    "bibliography": re.compile(
        r"\\begin\{thebibliography\}|\\bibliography\s*\{|\\bibliographystyle\s*\{|\\printbibliography\b"
    ),
    "appendix": re.compile(r"\\appendix\b|\\appendices\b|\\begin\{appendix\}|\\begin\{appendices\}"),
}
_END_DOCUMENT = re.compile(r"\\end\{document\}")
_DOCUMENTCLASS = re.compile(r"^[^%\n]*\\document(?:class|style)\b", re.M)
_LATEXISH = re.compile(r"\\(?:documentclass|documentstyle|begin\{document\}|section)\b")
_INPUT = re.compile(r"\\(?:input|include)\s*\{\s*([^{}\s]+)\s*\}|\\input\s+([A-Za-z0-9_./-]+)")


class Unusable(ValueError):
    """A LaTeX source that yields no document; `reason` is the drop reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Options:
    """ArXiv settings in the recipe config."""

    drop_appendix: bool = True  # cut from \appendix on, like the bibliography
    min_chars: int = 500  # cleaned papers shorter than this are dropped ("too_short")


def strip_comments(tex: str) -> str:
    """LaTeX without comments: `%` to the end of the line (an escaped `\\%` kept), lines that were only a
    comment removed whole, `comment` environments removed. Verbatim text is left as it is."""
    return restore_verbatim(*protect_verbatim(tex))


def protect_verbatim(tex: str) -> tuple[str, list[str]]:
    """`tex` without its comments (as `strip_comments`), each verbatim block (`verbatim`, `lstlisting`,
    `minted`, ... environments and `\\verb|...|`) replaced by one placeholder character, and the blocks.

    Read left to right as TeX reads it: a `%` inside verbatim is text, a `\\begin{verbatim}` in a comment
    starts nothing, and `\\end{document}`, `\\section` or `\\newcommand` inside verbatim are not seen by
    what works on the text before `restore_verbatim`. A block left open runs to the end, as in TeX.
    Raises `Unusable` ("too_many_verbatim") past 65,534 blocks."""
    tex = _BLOCK_CHAR.sub("", tex)
    out: list[str] = []
    blocks: list[str] = []
    pos = i = 0  # text before pos is in `out`; the scan goes on from i
    while (m := _VERBATIM_SCAN.search(tex, i)) is not None:
        token, start = m.group(0), m.start()
        if token == "%":
            line_start = tex.rfind("\n", 0, start) + 1
            line_end = tex.find("\n", start)
            line_end = len(tex) if line_end == -1 else line_end
            if tex[line_start:start].strip(" \t") == "":  # a line that is only a comment
                out.append(tex[pos:line_start])
                pos = i = min(line_end + 1, len(tex))
            else:
                out.append(tex[pos:start])
                pos = i = line_end
            continue
        if m.group(1) is not None:  # a verbatim environment, to its \end (or to the end of the text)
            close = re.compile(rf"\\end\{{{re.escape(m.group(1))}\}}").search(tex, m.end())
            stop = close.end() if close else len(tex)
        elif token.startswith("\\verb"):
            verb = _VERB.match(tex, start)
            stop = verb.end() if verb else -1
        else:  # \\ or \%: text
            stop = -1
        if stop == -1:
            i = m.end()
            continue
        out.append(tex[pos:start])
        if m.group(1) != "comment":
            if len(blocks) == _MAX_BLOCKS:
                raise Unusable("too_many_verbatim", f"more than {_MAX_BLOCKS} verbatim blocks")
            out.append(chr(_BLOCK_BASE + len(blocks)))
            blocks.append(tex[start:stop])
        pos = i = stop
    out.append(tex[pos:])
    return "".join(out), blocks


def restore_verbatim(tex: str, blocks: list[str]) -> str:
    """`tex` with the placeholders of `protect_verbatim` replaced by their blocks."""
    return _BLOCK_CHAR.sub(lambda m: blocks[ord(m.group(0)) - _BLOCK_BASE], tex)


def clean_latex(source: str, drop_appendix: bool = True) -> str:
    """A paper's LaTeX cleaned as in LLaMA-1: comments removed, user macros expanded, everything before
    the first sectioning command removed, and from the bibliography (and the appendix, unless
    `drop_appendix` is false) or \\end{document} on. Raises `Unusable` ("no_section") if there is no
    section."""
    tex, verbatim = protect_verbatim(source.replace("\r\n", "\n"))
    macros, tex = extract_macros(tex)
    begin = _BEGIN_DOCUMENT.search(tex)
    # expanded first, so that a section or bibliography written through the authors' macros is found
    tex = expand_macros(tex[begin.end() :] if begin else tex, macros)
    first = _SECTIONING.search(tex)
    if first is None:
        raise Unusable("no_section", "no \\section (or \\chapter, \\part, ...) to start from")
    tex = tex[first.start() :]
    ends = [_END_DOCUMENT, _END_MATTER["bibliography"]] + ([_END_MATTER["appendix"]] if drop_appendix else [])
    tex = tex[: min((m.start() for m in (p.search(tex) for p in ends) if m), default=len(tex))]
    tex = re.sub(r"[ \t]+$", "", tex, flags=re.M)
    return restore_verbatim(re.sub(r"\n{3,}", "\n\n", tex), verbatim).strip()  # verbatim text as written


def decode(data: bytes) -> str:
    """LaTeX bytes as text: UTF-8, else Latin-1 (older arXiv sources)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _is_text(data: bytes) -> bool:
    return b"\x00" not in data[:65536] and not data.startswith(b"%PDF")


def inline_inputs(tex: str, files: dict[str, str], directory: str = "", depth: int = 0) -> str:
    """`tex` with each \\input{name} / \\include{name} (not commented out) replaced by that file's text
    from `files` (paths inside the archive, ".tex" added when missing), recursively; others left."""
    if depth >= MAX_INPUT_DEPTH:
        return tex

    def replace(m: re.Match) -> str:
        line_start = tex.rfind("\n", 0, m.start()) + 1
        if re.search(r"(?<!\\)%", tex[line_start : m.start()]):
            return m.group(0)
        name = (m.group(1) or m.group(2)).strip()
        for candidate in (posixpath.join(directory, name), name):
            candidate = posixpath.normpath(candidate)
            for path in (candidate, candidate + ".tex"):
                if path in files:
                    return inline_inputs(files[path], files, posixpath.dirname(path), depth + 1)
        return m.group(0)

    return _INPUT.sub(replace, tex)


def main_file(files: dict[str, str]) -> Optional[str]:
    """The main .tex of a paper's files: one with \\documentclass (preferring \\begin{document}, then
    the longest), else one with \\begin{document}; None if there is none."""
    tex = {name: text for name, text in files.items() if name.lower().endswith((".tex", ".ltx"))}
    ranked = sorted(
        tex,
        key=lambda n: (bool(_DOCUMENTCLASS.search(tex[n])), "\\begin{document}" in tex[n], len(tex[n])),
        reverse=True,
    )
    if ranked and (_DOCUMENTCLASS.search(tex[ranked[0]]) or "\\begin{document}" in tex[ranked[0]]):
        return ranked[0]
    return None


def _paper_id(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".bz2", ".xz", ".zst", ".tgz", ".tar", ".tex"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return name


def _paper(files: dict[str, str]) -> tuple[Optional[str], Optional[str]]:
    """(main file with its inputs inlined, main file's name) of a paper's text files; (None, None)."""
    main = main_file(files)
    if main is None:
        return None, None
    return inline_inputs(files[main], files, posixpath.dirname(main)), main


def read_source(path: Path) -> tuple[Optional[str], Optional[str]]:
    """(LaTeX text with its inputs inlined, main file name inside the archive or folder, or None) of one
    paper; (None, None) if it holds no LaTeX. Raises CorruptInput for a damaged file."""
    if path.is_dir():  # an unpacked paper
        files = {}
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            raw = file.read_bytes()
            if _is_text(raw):
                files[file.relative_to(path).as_posix()] = decode(raw)
        return _paper(files)
    try:
        with open_text(path) as f:
            data = f.read()
        is_tar = data[257:262] == b"ustar" or path.name.endswith((".tar", ".tar.gz", ".tgz"))
        if is_tar or (not _is_text(data) and tarfile.is_tarfile(io.BytesIO(data))):
            files = {}
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
                for member in tar.getmembers():
                    if member.isfile():
                        raw = tar.extractfile(member).read()
                        if _is_text(raw):
                            files[posixpath.normpath(member.name)] = decode(raw)
            return _paper(files)
    except (*stream_errors(), tarfile.TarError) as e:
        raise CorruptInput(f"{path}: cannot be read to its end ({type(e).__name__}: {e})") from e
    if not _is_text(data):
        return None, None
    return decode(data), None


def documents(path: Path, options: Options, tally: Tally) -> Iterator[dict]:
    """The cleaned paper in one LaTeX source file or archive (at most one document)."""
    path = Path(path)
    tex, main = read_source(path)
    tally.read(tex or "")
    origin = f"{path.name}:{main}" if main else path.name
    if tex is None or not _LATEXISH.search(tex):
        tally.drop("not_latex", origin, tex)
        return
    try:
        text = clean_latex(tex, options.drop_appendix)
    except Unusable as e:
        tally.drop(e.reason, origin, tex)
        return
    if len(text) < options.min_chars:
        tally.drop("too_short", origin, text)
        return
    meta = {"file": path.name, **({"main_file": main} if main else {})}
    yield make_doc(SOURCE, f"arxiv-{_paper_id(path)}", text, **meta)
