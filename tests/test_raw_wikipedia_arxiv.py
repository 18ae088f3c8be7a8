"""Wikipedia dumps and arXiv LaTeX sources, read and cleaned on real files (tests/data/raw/*/README.md)."""

from __future__ import annotations

import bz2
import gzip
import io
import re
import tarfile
from pathlib import Path

import pytest

from data_pipeline.raw import arxiv, wikipedia
from data_pipeline.raw.common import CorruptInput, Tally

DATA = Path(__file__).resolve().parent / "data" / "raw"
WIKI = DATA / "wikipedia"
LATEX = DATA / "latex"
ENWIKI = WIKI / "enwiki-shortened-first11pages.xml.bz2"
TABLES = WIKI / "enwiki-table-markup.xml.bz2"
BGWIKI = WIKI / "bgwiki-latest-pages-articles-shortened.xml.bz2"
QUOTES_DIV = WIKI / "enwiki-shortened-quotes-and-div.xml.bz2"
AOM = LATEX / "aomsample.tex.gz"
MNRAS = LATEX / "mnras_template.tex.gz"
IEEE = LATEX / "bare_jrnl.tex.gz"
TRANSLATOR = LATEX / "translator.tex.gz"


def wiki_docs(path: Path, **options) -> tuple[list[dict], Tally]:
    tally = Tally()
    return list(wikipedia.documents(path, wikipedia.Options(**options), tally)), tally


def arxiv_docs(path: Path, **options) -> tuple[list[dict], Tally]:
    tally = Tally()
    return list(arxiv.documents(path, arxiv.Options(**options), tally)), tally


def read_until_error(docs) -> tuple[list[dict], CorruptInput]:
    """The documents a generator yields before it raises CorruptInput, and the error."""
    out = []
    with pytest.raises(CorruptInput) as error:
        for doc in docs:
            out.append(doc)
    return out, error.value


# --------------------------------------------------------------------------------------------------
# Wikipedia


def test_wikipedia_article_cleaned_and_redirects_dropped():
    docs, tally = wiki_docs(ENWIKI)
    assert tally.docs_in == 11
    assert tally.dropped == {"redirect": 10}
    [doc] = docs
    assert doc["id"] == "wikipedia-en-12-rev716551092"
    assert doc["meta"] == {
        "source": "wikipedia",
        "title": "Anarchism",
        "page_id": 12,
        "revision_id": 716551092,
        "language": "en",
        "url": "https://en.wikipedia.org/wiki/Anarchism",
    }
    text = doc["text"]
    assert text.startswith(
        "Anarchism is a political philosophy that advocates self-governed societies based on voluntary institutions."
    )
    assert "\nEtymology and terminology\n" in text  # a heading, as a plain line
    assert "anti-globalisation movements" in text  # the text of [[anti-globalisation movement]]s
    for gone in ("[[", "]]", "{{", "}}", "==", "<ref", "&lt;", "thumb|", "File:", "Category:"):
        assert gone not in text, gone
    assert "Globalization and International Political Economy" not in text  # a {{cite book}} inside a <ref>
    assert "Collectivist anarchist Mikhail Bakunin opposed" not in text  # a [[File:...]] caption
    assert "Political ideologies" not in text  # [[Category:Political ideologies]]
    assert "\n\n\n" not in text


def test_wikipedia_tables_removed():
    docs, tally = wiki_docs(TABLES)
    assert tally.docs_in == 5 and tally.dropped == {}
    titles = [doc["meta"]["title"] for doc in docs]
    assert titles[0] == "Constructive vote of no confidence" and "Economy of Estonia" in titles
    text = "\n".join(doc["text"] for doc in docs)
    assert "The constructive vote of no confidence (in German: konstruktives Misstrauensvotum" in text
    assert "Estonian economy is an advanced economy" in text
    assert "Opposition candidate (party)" not in text  # a header cell of a {| table |}
    assert "1,213.4" not in text and "937.8" not in text  # revenue cells of another
    assert not re.search(r"^\s*(\{\||\|-|\|\}|!)", text, re.M)
    assert "wikitable" not in text
    # no <siteinfo>: the language is the root's xml:lang
    assert {doc["meta"]["language"] for doc in docs} == {"en"}


def test_wikipedia_bulgarian_dump_keeps_its_language():
    docs, tally = wiki_docs(BGWIKI)
    assert tally.docs_in == 3 and tally.dropped == {"not_main_namespace": 2}
    [doc] = docs
    assert doc["meta"]["language"] == "bg" and doc["id"] == "wikipedia-bg-558-rev7862180"
    assert doc["meta"]["title"] == "Григориански календар"
    assert doc["meta"]["url"].startswith("https://bg.wikipedia.org/wiki/%D0%93")
    text = doc["text"]
    assert "Григорианският календар е въведен в употреба на 4 октомври 1582\u00a0г." in text  # &nbsp; kept
    assert "60-пфениг пощенска марка" not in text  # caption of a [[File:...]]
    assert "Категория:" not in text and "[[" not in text
    assert "United States Naval Observatory" not in text  # {{cite web}} in a <ref>


def test_wikipedia_language_filter_drops_whole_dump():
    docs, tally = wiki_docs(BGWIKI, languages=["en", "de"])
    assert docs == [] and tally.dropped == {"language_not_selected": 1}
    assert "language bg" in tally.examples["language_not_selected"][0]
    docs, tally = wiki_docs(TABLES, languages=["bg"])  # language from xml:lang
    assert docs == [] and tally.dropped == {"language_not_selected": 1}
    assert len(wiki_docs(BGWIKI, languages=[])[0]) == 1  # empty: every language
    assert "bg" in wikipedia.Options().languages and len(wikipedia.Options().languages) == 20


def test_wikipedia_namespace_names_from_header(tmp_path):
    """File links are recognised by the names the dump's <namespaces> gives, not only the built-in ones."""
    xml = bz2.decompress(BGWIKI.read_bytes()).decode("utf-16")
    xml = xml.replace(
        '<namespace key="6" case="first-letter">Файл</namespace>', '<namespace key="6">Снимка</namespace>'
    )
    assert xml.count("[[File:DBP 1982") == 1
    xml = xml.replace("[[File:DBP 1982", "[[Снимка:DBP 1982")
    path = tmp_path / "bgwiki.xml"
    path.write_text(xml, encoding="utf-8")
    [doc], _ = wiki_docs(path)
    assert "60-пфениг пощенска марка" not in doc["text"]
    assert "Григорианският календар е въведен" in doc["text"]


def test_wikipedia_min_chars():
    docs, tally = wiki_docs(TABLES, min_chars=5000)
    assert tally.dropped == {"too_short": 2}  # "Academy Award for Best Production Design", "Brahui language"
    assert len(docs) == 3


def test_clean_wikitext_magic_words_and_empty_sections():
    text = wikipedia.clean_wikitext(
        "__NOTOC__Intro with a [[Target|label]] and {{Citation needed}}.<!-- hidden -->\n"
        "== Body ==\nSome text.<ref>A source</ref>\n== References ==\n{{Reflist}}\n[[Category:X]]"
    )
    assert text == "Intro with a label and.\n\nBody\n\nSome text."


def test_wikipedia_bold_and_italic_quotes_paired_as_mediawiki_does():
    """`''A Modest Proposal'''s satire`: a line with odd numbers of italics and bolds, which MediaWiki reads
    as an italic title and an apostrophe; mwparserfromhell alone leaves `'''` glued to the text."""
    xml = bz2.decompress(QUOTES_DIV.read_bytes()).decode()
    assert "uses ''A Modest Proposal'''s satire technique" in xml
    docs, tally = wiki_docs(QUOTES_DIV)
    assert tally.docs_in == 2 and tally.dropped == {}
    modest = next(doc for doc in docs if doc["meta"]["title"] == "A Modest Proposal")
    assert "he uses A Modest Proposal's satire technique against the Vietnam War." in modest["text"]
    assert "''" not in modest["text"]
    assert wikipedia.balance_quotes("the ''Iliad'''s hero") == "the ''Iliad&#39;''s hero"
    assert wikipedia.balance_quotes("a '''bold''' and ''italic''") == "a '''bold''' and ''italic''"  # paired
    assert wikipedia.balance_quotes("l''''amour'''") == "l&#39;'''amour'''"  # four: an apostrophe and a bold


def test_wikipedia_div_around_a_table_leaves_no_markup():
    """Alkali metal (cut after its "Nuclear" section): a `<div style=...>` around a table closed by
    `|}</div>` on one line; dropping that line whole left the `<div>` unclosed, and so as text."""
    xml = bz2.decompress(QUOTES_DIV.read_bytes()).decode()
    assert "===Nuclear===\n&lt;div style=&quot;float: right; margin: 5px;&quot;&gt;\n{|" in xml
    assert "\n|}&lt;/div&gt;\nAll the alkali metals have odd atomic numbers" in xml
    docs, _ = wiki_docs(QUOTES_DIV)
    alkali = next(doc for doc in docs if doc["meta"]["title"] == "Alkali metal")["text"]
    assert "Nuclear\n\nAll the alkali metals have odd atomic numbers;" in alkali
    assert "<" not in alkali and ">" not in alkali and "style=" not in alkali
    assert "Primordial isotopes of the alkali metals" not in alkali  # the table's caption: the table is gone


def test_wikipedia_ids_unique_across_dumps_of_two_revisions(tmp_path):
    """The same page in two dumps at two revisions (A Modest Proposal as bundled, and as a later dump would
    hold it: a new revision id and one edit) gives two documents with two ids; a dump read again gives the
    same ids, and a page unchanged between the dumps the same id and text (which exact dedup keeps once)."""
    xml = bz2.decompress(QUOTES_DIV.read_bytes()).decode()
    old_revision = "<id>713534992</id>\n      <parentid>"
    assert xml.count(old_revision) == 1 and xml.count("]]ian [[Satire|satirical]] [[essay]]") == 1
    later = xml.replace(old_revision, "<id>713600000</id>\n      <parentid>")
    later = later.replace("]]ian [[Satire|satirical]] [[essay]]", "]]ian [[essay]]")
    (tmp_path / "later.xml").write_text(later, encoding="utf-8")
    first, _ = wiki_docs(QUOTES_DIV)
    second, _ = wiki_docs(tmp_path / "later.xml")
    [old] = [doc for doc in first if doc["meta"]["page_id"] == 665]
    [new] = [doc for doc in second if doc["meta"]["page_id"] == 665]
    assert old["id"] == "wikipedia-en-665-rev713534992" and new["id"] == "wikipedia-en-665-rev713600000"
    assert old["meta"]["revision_id"] == 713534992 and "Juvenalian essay" in new["text"] != old["text"]
    [alkali_first] = [doc for doc in first if doc["meta"]["page_id"] == 666]
    [alkali_second] = [doc for doc in second if doc["meta"]["page_id"] == 666]
    assert alkali_first == alkali_second and alkali_first["id"] == "wikipedia-en-666-rev717054770"
    assert [doc["id"] for doc in wiki_docs(QUOTES_DIV)[0]] == [doc["id"] for doc in first]


def test_wikipedia_truncated_bz2_raises_after_earlier_pages(tmp_path):
    # recompressed with 100 kB blocks, so the first pages decompress before the cut
    path = tmp_path / "enwiki-table-markup.xml.bz2"
    path.write_bytes(bz2.compress(bz2.decompress(TABLES.read_bytes()), compresslevel=1)[:-5000])
    docs, error = read_until_error(wikipedia.documents(path, wikipedia.Options(), Tally()))
    assert [doc["meta"]["title"] for doc in docs][:2] == [
        "Constructive vote of no confidence",
        "List of Prison Break characters",
    ]
    assert len(docs) < 5
    assert str(path) in str(error)
    # the bundled single-block file cut in half: nothing comes out, the file is named
    half = tmp_path / "half.xml.bz2"
    half.write_bytes(TABLES.read_bytes()[: TABLES.stat().st_size // 2])
    docs, error = read_until_error(wikipedia.documents(half, wikipedia.Options(), Tally()))
    assert docs == [] and str(half) in str(error)


def test_wikipedia_broken_xml_raises_after_earlier_pages(tmp_path):
    xml = bz2.decompress(TABLES.read_bytes()).decode("utf-8")
    third = xml.index("<title>Academy Award for Best Production Design</title>")
    path = tmp_path / "broken.xml"
    path.write_text(xml[:third] + xml[third:].replace("</title>", "</titel>", 1), encoding="utf-8")
    docs, error = read_until_error(wikipedia.documents(path, wikipedia.Options(), Tally()))
    assert len(docs) == 2 and "broken.xml" in str(error)
    cut = tmp_path / "cut.xml"  # ends in the middle of the fourth page
    cut.write_text(xml[: xml.index("<title>Economy of Estonia</title>") + 500], encoding="utf-8")
    docs, error = read_until_error(wikipedia.documents(cut, wikipedia.Options(), Tally()))
    assert len(docs) == 3 and "cut.xml" in str(error)


# --------------------------------------------------------------------------------------------------
# ArXiv (LaTeX)


def test_arxiv_llama_cleaning_on_real_article():
    [doc], tally = arxiv_docs(AOM)
    assert tally.docs_in == 1 and tally.dropped == {}
    assert doc["id"] == "arxiv-aomsample" and doc["meta"] == {"source": "arxiv", "file": "aomsample.tex.gz"}
    text = doc["text"]
    # everything before the first section is gone: preamble, title, abstract
    assert text.startswith("\\section{Introduction}\n\nThis paper demonstrates the use of \\texttt{aomart} class.")
    for gone in ("\\documentclass", "Sample Paper for the", "This is a test file for", "\\begin{document}"):
        assert gone not in text, gone
    # the bibliography and what follows are gone; the text before it stays
    assert "\\bibliography" not in text and "\\end{document}" not in text
    assert text.endswith("{Special project Secret Defense}.")
    # comments are gone, escaped \% are not
    assert "Can't show example from msam or msbm" not in text
    assert not re.search(r"(?<!\\)%", text)
    # the authors' macros are expanded and their definitions removed
    assert "\\newcommand" not in text and "\\let\\norm" not in text
    assert "${\\hat C_1(X|Y)}$, the one-way complexity of a random pair ${(X,Y)}$," in text  # \Cw1, \XcY
    assert "Theorem~\\ref{thm-main} yields immediately" in text  # \thmref{thm-main}
    assert "\\ifx\\right\\right\\relax \\left.\\fi\\det\\mathbf{K}" in text  # \eval{...}: default [\right]
    assert "\\left\\lVert f\\right\\rVert_\\infty" in text  # \norm{f}, \let to \enVert
    assert "{\\protect\\normalfont\\ttfamily amsmath} package" in text  # \pkg{amsmath} -> \ntt, spaced
    outside_verbatim = re.sub(r"\\begin\{verbatim\}.*?\\end\{verbatim\}", "", text, flags=re.S)
    for name in ("Cw", "XcY", "thmref", "eval", "norm", "enVert", "pkg", "ntt"):
        assert not re.search(rf"\\{name}(?![A-Za-z])", outside_verbatim), name
    # a verbatim block shows the source as the authors wrote it: their macros unexpanded
    assert "\\begin{verbatim}\n\\[\\norm{f}_\\infty=\n\\esssup_{x\\in R^n}\\abs{f(x)}\\]\n\\end{verbatim}" in text


def test_arxiv_sections_and_bibliography_written_through_the_authors_macros(tmp_path):
    """The cut points are found after expansion: a paper that starts its sections and its bibliography
    with macros of its own is cut as if it had written them out."""
    with gzip.open(AOM, "rt", encoding="utf-8") as f:
        source = f.read()
    macros = "\\newcommand{\\sect}[1]{\\section{#1}}\n\\def\\refs{\\bibliography{aomsample}}\n"
    source = source.replace("\\begin{document}", macros + "\\begin{document}", 1)
    source = source.replace("\\section{Introduction}", "\\sect{Introduction}", 1)
    source = re.sub(r"\\bibliography\{[^}]*\}", lambda m: "\\refs", source, count=1)
    (tmp_path / "macro-sections.tex").write_text(source, encoding="utf-8")
    [doc], _ = arxiv_docs(tmp_path / "macro-sections.tex")
    [reference], _ = arxiv_docs(AOM)
    assert doc["text"] == reference["text"]


def test_arxiv_bibliography_and_appendix():
    [doc], _ = arxiv_docs(MNRAS)
    text = doc["text"]
    assert text.startswith("\\section{Introduction}\n\nThis is a simple template for authors")
    assert "No references should appear in the abstract" not in text  # the abstract precedes \section
    assert "\\section*{Data Availability}" in text
    assert "\\bibliography" not in text and "Some extra material" not in text
    assert "Please keep new commands to a minimum" not in text and "% used for referring" not in text
    # IEEEtran: \appendices before the thebibliography environment; the paper is short
    docs, tally = arxiv_docs(IEEE)
    assert docs == [] and tally.dropped == {"too_short": 1}
    [doc], _ = arxiv_docs(IEEE, min_chars=100)
    assert doc["text"].endswith("\\section{Conclusion}\nThe conclusion goes here.")
    [doc], _ = arxiv_docs(IEEE, min_chars=100, drop_appendix=False)
    assert "\\section{Proof of the First Zonklar Equation}" in doc["text"]
    assert "thebibliography" not in doc["text"]


def test_arxiv_tex_gz_and_tar_variants_agree(tmp_path):
    source = gzip.decompress(AOM.read_bytes())
    [reference], _ = arxiv_docs(AOM)
    plain = tmp_path / "aomsample.tex"
    plain.write_bytes(source)

    # a multi-file paper: the macros and the second half in their own files, \input-ed
    tex = source.decode("utf-8")
    defs_start, defs_end = tex.index("%    Some definitions useful"), tex.index("%\\setcounter{tocdepth}")
    half = tex.index("\\section{Main theorem}")
    main = tex[:defs_start] + "\\input macros.tex\n% \\input{missing}\n" + tex[defs_end:half] + "\\input{sections/rest}"
    files = {
        "paper/main.tex": main,
        "paper/macros.tex": tex[defs_start:defs_end],
        "paper/sections/rest.tex": tex[half:],
        "paper/fig1.pdf": "%PDF-1.4 binary\x00data",
    }

    def tar(path: Path, mode: str) -> Path:
        with tarfile.open(path, mode) as out:
            for name, text in files.items():
                data = text.encode("utf-8")
                info = tarfile.TarInfo(name)
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
        return path

    arxiv_style = tmp_path / "2101.00001.gz"  # arXiv's e-print: a gzipped tar named .gz
    arxiv_style.write_bytes(gzip.compress(tar(tmp_path / "inner.tar", "w").read_bytes()))
    for path in (plain, tar(tmp_path / "paper.tar", "w"), tar(tmp_path / "paper.tar.gz", "w:gz"), arxiv_style):
        [doc], tally = arxiv_docs(path)
        assert doc["text"] == reference["text"], path.name
        assert tally.bytes_in >= len(source) - 100
    assert doc["id"] == "arxiv-2101.00001" and doc["meta"]["main_file"] == "paper/main.tex"
    with tarfile.open(tmp_path / "paper.tar") as unpack:
        unpack.extractall(tmp_path / "unpacked", filter="data")
    [doc], _ = arxiv_docs(tmp_path / "unpacked")  # a folder (for a runner that passes folders whole)
    assert doc["text"] == reference["text"] and doc["meta"]["main_file"] == "paper/main.tex"


def test_arxiv_not_latex_and_no_section(tmp_path):
    docs, tally = arxiv_docs(ENWIKI)  # a real file, but XML
    assert docs == [] and tally.dropped == {"not_latex": 1}
    pdf = tmp_path / "paper.gz"
    pdf.write_bytes(gzip.compress(b"%PDF-1.5\n%\xe2\xe3\xcf\xd3\n1 0 obj\x00"))
    assert arxiv_docs(pdf)[1].dropped == {"not_latex": 1}
    no_section = tmp_path / "nosection.tex"
    text = gzip.decompress(MNRAS.read_bytes()).decode("utf-8")
    no_section.write_text(re.sub(r"\\(sub)*section\*?\{[^}]*\}", "", text), encoding="utf-8")
    docs, tally = arxiv_docs(no_section)
    assert docs == [] and tally.dropped == {"no_section": 1}


def test_arxiv_damaged_archives(tmp_path):
    paper = tmp_path / "paper.tar.gz"
    with tarfile.open(paper, "w:gz") as out:
        out.add(tmp_path, arcname=".", recursive=False)
        data = gzip.decompress(AOM.read_bytes())
        info = tarfile.TarInfo("main.tex")
        info.size = len(data)
        out.addfile(info, io.BytesIO(data))
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(paper.read_bytes()[:-3000])
    with pytest.raises(CorruptInput, match="cut.tar.gz"):
        arxiv_docs(cut)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(AOM.read_bytes())  # gzip bytes where a tar is expected
    with pytest.raises(CorruptInput, match="garbage.tar"):
        arxiv_docs(garbage)


def test_macro_expansion_rules():
    tex = (
        "\\def\\pair#1#2{(#1,#2)}\\newcommand{\\norm}[2][2]{\\|#2\\|_{#1}}\\newcommand\\R{\\mathbb{R}}"
        "\\def\\loop{\\loop x}\\renewcommand*{\\tool}{Tool}\\section{A} $\\pair a{\\R}$, $\\norm{v}$, "
        "$\\norm[1]{w}$, \\tool{} and \\tool\\ work, 50\\% here % a comment\n\\loop"
    )
    text = arxiv.clean_latex(tex)
    assert text.startswith(
        "\\section{A} $(a,\\mathbb{R})$, $\\|v\\|_{2}$, $\\|w\\|_{1}$, Tool and Tool\\ work, 50\\% here"
    )
    assert "a comment" not in text
    assert text.endswith("x x x")  # a recursive macro stops at the depth guard
    assert len(text) < 300


def test_strip_comments_keeps_escaped_percent_and_verbatim():
    tex = "a\\% b % c\n% whole line\n\\\\% after a line break\n\\begin{verbatim}\n50% kept\n\\end{verbatim}\n"
    assert arxiv.strip_comments(tex) == "a\\% b \n\\\\\n\\begin{verbatim}\n50% kept\n\\end{verbatim}\n"

    # a comment that names a verbatim environment starts nothing; a \verb holds a % and a \end{document}
    tex = "% \\begin{verbatim}\nkept\n\\verb|%| and \\verb+\\end{document}+ % gone\n"
    assert arxiv.strip_comments(tex) == "kept\n\\verb|%| and \\verb+\\end{document}+ \n"
    text = arxiv.clean_latex("\\section{A}\n" + tex + "after\n\\end{document}\nlost")
    assert text == "\\section{A}\nkept\n\\verb|%| and \\verb+\\end{document}+\nafter"


def test_arxiv_end_document_inside_verbatim_does_not_end_the_paper():
    """TeX Live's translator.tex shows whole documents in `verbatim`, `\\end{document}` included, a third of
    the way in: the paper goes on to its real end, every block is closed, and what a block holds (a `%`, an
    authors' `\\newcommand`) is kept as written, not taken for a comment or a definition."""
    source = gzip.decompress(TRANSLATOR.read_bytes()).decode()
    first_verbatim_end = source.index("\\end{document}\n\\end{verbatim}")
    assert first_verbatim_end < len(source) / 3 and source.count("\\end{document}") == 3
    [doc], tally = arxiv_docs(TRANSLATOR)
    text = doc["text"]
    assert tally.dropped == {} and text.startswith("\\section{Translating Strings}")
    assert "\\section{Contributing}" in text and "\\subsubsection{Package Loading Process}" in text
    assert text.endswith("\\url{https://github.com/josephwright/translator}.\n\\end{enumerate}")
    assert len(text) > 0.9 * len(source[source.index("\\section{") : source.rindex("\\end{document}")])
    assert text.count("\\begin{verbatim}") == text.count("\\end{verbatim}") == 13
    assert text.count("\\end{document}\n\\end{verbatim}") == 2  # the two shown in verbatim, not the real one
    assert "\\newcommand\\MoveKnight[2]{%\n  ...\n  \\translate{knight}\n  ...\n}\n\\end{verbatim}" in text
    # the same paper with its examples in lstlisting, minted (with its language argument) and fancyvrb's Verbatim
    for begin, end in [
        ("\\begin{lstlisting}", "\\end{lstlisting}"),
        ("\\begin{minted}{latex}", "\\end{minted}"),
        ("\\begin{Verbatim}", "\\end{Verbatim}"),
    ]:
        variant = arxiv.clean_latex(source.replace("\\begin{verbatim}", begin).replace("\\end{verbatim}", end))
        assert variant == text.replace("\\begin{verbatim}", begin).replace("\\end{verbatim}", end), begin
    # in `comment` environments the examples are dropped, and the paper still runs to its end
    commented = source.replace("\\begin{verbatim}", "\\begin{comment}").replace("\\end{verbatim}", "\\end{comment}")
    commented = arxiv.clean_latex(commented)
    assert "\\end{document}" not in commented and "MoveKnight" not in commented
    assert commented.endswith("\\url{https://github.com/josephwright/translator}.\n\\end{enumerate}")
    # a block left open runs to the end of the text, as TeX reads it: nothing in it is cut or uncommented
    cut = source[: source.index("\\end{verbatim}", first_verbatim_end)]
    open_block = arxiv.clean_latex(cut)
    assert open_block.endswith("\\begin{document}\n...\n\\end{document}")
