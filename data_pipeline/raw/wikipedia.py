"""Wikipedia from MediaWiki XML dumps (`pages-articles.xml[.bz2]`), cleaned the way LLaMA-1 did.

LLaMA-1 (Touvron et al. 2023, §2.1) took the Wikipedia dumps of 20 languages and removed hyperlinks,
comments and other formatting boilerplate. Here: the dump is streamed (iterparse, each page cleared
once read), only main-namespace pages that are not redirects are kept, and the wikitext is reduced to
plain text with mwparserfromhell: templates, references, tables, galleries, math, file/image and
category links, comments and magic words go; link text stays; headings become plain lines and a
heading whose section ends up empty (References, External links) goes with it. Bold and italic quotes
are first paired line by line as MediaWiki pairs them (`balance_quotes`).

A document's id is `wikipedia-<language>-<page id>-rev<revision id>`: the same page from two dumps is two
documents only when its revision differs (the same revision is the same text, kept once by exact dedup).

The dump's language comes from its header (`<dbname>enwiki</dbname>`, else the base URL, else the
root's `xml:lang`); a dump of a language not in `Options.languages` is dropped whole. The localised
names of the File and Category namespaces come from the header's `<namespaces>` too, on top of a
built-in list for the LLaMA-1 languages.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import quote, urlsplit

from data_pipeline.raw.common import CorruptInput, Tally, make_doc, stream_errors
from data_pipeline.sources import open_text

SOURCE = "wikipedia"

# Touvron et al. 2023, §2.1: "bg, ca, cs, da, de, en, es, fr, hr, hu, it, nl, pl, pt, ro, ru, sl, sr, sv, uk".
LLAMA_LANGUAGES = (
    "bg", "ca", "cs", "da", "de", "en", "es", "fr", "hr", "hu",
    "it", "nl", "pl", "pt", "ro", "ru", "sl", "sr", "sv", "uk",
)  # fmt: skip

# Namespace 6 (File, with its old name Image) and 14 (Category) in the LLaMA-1 languages, canonical names
# and common aliases; a dump's own <namespaces> header adds to these.
FILE_NAMES = {
    "file", "image", "media", "файл", "изображение", "медия", "datei", "bild", "fichier", "archivo", "imagen",
    "fitxer", "arxiu", "imatge", "soubor", "obrázek", "fil", "billede", "datoteka", "slika", "fájl", "kép",
    "immagine", "bestand", "afbeelding", "plik", "grafika", "ficheiro", "imagem", "arquivo", "fișier", "fişier",
    "imagine", "слика", "датотека", "зображення", "медіа",
}  # fmt: skip
CATEGORY_NAMES = {
    "category", "категория", "kategorie", "catégorie", "categoría", "categoria", "kategori",
    "kategorija", "kategória", "categorie", "kategoria", "категорија", "категорія",
}  # fmt: skip

DROP_TAGS = {"ref", "references", "table", "gallery", "math", "chem", "ce", "timeline", "imagemap", "score", "graph"}
DROP_TAGS |= {"templatedata", "templatestyles", "mapframe", "maplink", "syntaxhighlight", "source", "inputbox"}

_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_REF = re.compile(r"<ref\b[^>]*?/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)  # also where the parser gives up
_LINK_START = re.compile(r"\[\[\s*:?\s*([^:\[\]|\n]+?)\s*:")
_MAGIC_WORD = re.compile(r"__([^\W_]+)__")
_QUOTES = re.compile(r"('{2,})")
_APOSTROPHE = "&#39;"  # an apostrophe that is text, not part of a bold or italic quote
_REDIRECT = re.compile(r"\s*#[^\W\d_]+\s*:?\s*\[\[")  # "#REDIRECT [[", "#WEITERLEITUNG [[", "#ПРЕНАСОЧВАНЕ [["
_INTERLANGUAGE = re.compile(r"[a-z]{2,3}(-[a-z]+)*$")
_DBNAME = re.compile(r"([a-z_]+?)wiki$")
_WIKIPEDIA_HOST = re.compile(r"([a-z-]+)\.wikipedia\.org$")


@dataclass
class Options:
    """Wikipedia settings in the recipe config."""

    languages: list[str] = field(default_factory=lambda: list(LLAMA_LANGUAGES))  # empty: every language
    min_chars: int = 200  # cleaned articles shorter than this are dropped ("too_short")


def _local(tag: str) -> str:
    """A tag without its `{namespace-uri}` prefix (dumps carry a versioned xmlns)."""
    return tag.rpartition("}")[2]


def _child(elem: ET.Element, name: str) -> Optional[ET.Element]:
    for child in elem:
        if _local(child.tag) == name:
            return child
    return None


def _child_text(elem: ET.Element, name: str) -> Optional[str]:
    child = _child(elem, name)
    return None if child is None else (child.text or "")


def dump_language(dbname: str, base: str, xml_lang: str) -> str:
    """The language code of a dump from its header: "enwiki" -> "en", "zh_min_nanwiki" -> "zh-min-nan",
    else the host of the base URL ("https://bg.wikipedia.org/..."), else the root's xml:lang; "" if none."""
    m = _DBNAME.match(dbname.strip())
    if m:
        return m.group(1).replace("_", "-")
    m = _WIKIPEDIA_HOST.match(urlsplit(base.strip()).hostname or "")
    if m:
        return m.group(1)
    return xml_lang.strip().lower()


def clean_wikitext(wikitext: str, file_names: set[str] = FILE_NAMES, category_names: set[str] = CATEGORY_NAMES) -> str:
    """Plain text of an article's wikitext: templates, <ref>s, tables, galleries, math, file/image,
    category and interlanguage links, comments and magic words removed; link text kept; headings as plain
    lines, those whose section is left empty dropped. `file_names`/`category_names` are the lowercase
    namespace prefixes to treat as file and category links."""
    try:
        import mwparserfromhell
        from mwparserfromhell.nodes import Heading
    except ImportError as e:
        raise ImportError("wikipedia sources need mwparserfromhell: pip install mwparserfromhell") from e

    wikitext = _drop_tables(_REF.sub("", _COMMENT.sub("", wikitext)))
    wikitext = "\n".join(balance_quotes(line) for line in wikitext.split("\n"))
    code = mwparserfromhell.parse(_drop_links(wikitext, file_names | category_names))
    _prune(code, file_names, category_names)
    parts = []
    for section in code.get_sections(flat=True, include_lead=True):
        heading = ""
        if section.nodes and isinstance(section.nodes[0], Heading):
            heading = _plain(section.nodes[0].title.strip_code(normalize=True, collapse=True))
            section.remove(section.nodes[0])
        body = _plain(section.strip_code(normalize=True, collapse=True))
        if body:
            parts.append(f"{heading}\n\n{body}" if heading else body)
    return "\n\n".join(parts)


def balance_quotes(line: str) -> str:
    """A line of wikitext with its bold and italic quotes paired as MediaWiki pairs them (its parser's
    `doQuotes`): four quotes are an apostrophe and a bold, more than five are apostrophes and a bold
    italic, and when a line has an odd number of both italics and bolds, one bold is an apostrophe and an
    italic, so that `''Iliad'''s` is *Iliad'*s. mwparserfromhell leaves such quotes in the text. The
    apostrophes that are text are written as `&#39;`, so that no parser takes them for quotes again."""
    parts = _QUOTES.split(line)  # text, quotes, text, ...
    if len(parts) == 1:
        return line
    italics = bolds = 0
    for i in range(1, len(parts), 2):
        n = len(parts[i])
        if n == 4 or n > 5:
            kept = 3 if n == 4 else 5
            parts[i - 1] += _APOSTROPHE * (n - kept)
            parts[i], n = "'" * kept, kept
        italics += n in (2, 5)
        bolds += n in (3, 5)
    if italics % 2 and bolds % 2:
        # the bold to split: the first after a one-letter word, else after a longer word, else after a space
        single = multi = space = 0
        for i in range(1, len(parts), 2):
            if len(parts[i]) == 3:
                before = parts[i - 1]
                if before[-1:] == " ":
                    space = space or i
                elif before[-2:-1] == " ":
                    single = i
                    break
                else:
                    multi = multi or i
        i = single or multi or space
        if i:
            parts[i - 1] += _APOSTROPHE
            parts[i] = "''"
    return "".join(parts)


def _drop_tables(wikitext: str) -> str:
    """Wikitext without its {| ... |} tables (nested ones too), found line by line: the parser leaves a
    table with bad attributes as text. What follows a table's closing `|}` on its line (the `</div>` of a
    `<div>` around the table) stays. An unclosed table is left to the parser."""
    lines = wikitext.split("\n")
    keep = [True] * len(lines)
    depth, start = 0, 0
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if stripped.startswith("{|"):
            start = i if depth == 0 else start
            depth += 1
        elif stripped.startswith("|}") and depth:
            depth -= 1
            if depth == 0:
                keep[start:i] = [False] * (i - start)
                lines[i] = stripped[2:]
                keep[i] = bool(lines[i].strip())
    return "\n".join(line for line, k in zip(lines, keep) if k)


def _drop_links(wikitext: str, prefixes: set[str]) -> str:
    """Wikitext without its [[Prefix:...]] links for the given (lowercase) namespace prefixes, nested
    [[...]] in captions included: the parser leaves a caption with unbalanced quotes as text."""
    out, pos = [], 0
    for m in _LINK_START.finditer(wikitext):
        if m.start() < pos or m.group(1).strip().lower() not in prefixes:
            continue
        depth, i = 0, m.start()
        while i < len(wikitext) - 1:
            pair = wikitext[i : i + 2]
            if pair in ("[[", "]]"):
                depth += 1 if pair == "[[" else -1
                i += 2
                if depth == 0:
                    out.append(wikitext[pos : m.start()])
                    pos = i
                    break
            else:
                i += 1
    out.append(wikitext[pos:])
    return "".join(out)


def _prune(code, file_names, category_names) -> None:
    """Replace, in place and in one walk, every node that leaves no text by an empty one: templates, dropped
    tags, file/category/interlanguage links. (Wikicode.remove searches the whole tree per call: quadratic.)"""
    from mwparserfromhell.nodes import Tag, Template, Text, Wikilink

    nodes = code.nodes
    for i, node in enumerate(nodes):
        if isinstance(node, Template) or (isinstance(node, Tag) and str(node.tag).strip().lower() in DROP_TAGS):
            nodes[i] = Text("")
            continue
        if isinstance(node, Wikilink):
            prefix, colon, _ = str(node.title).strip().lstrip(":").partition(":")
            prefix = prefix.strip().lower()
            if colon and (prefix in file_names or prefix in category_names or _INTERLANGUAGE.match(prefix)):
                nodes[i] = Text("")
                continue
        for child in node.__children__():
            _prune(child, file_names, category_names)


def _plain(text: str) -> str:
    """Magic words out, trailing spaces and runs of blank lines squeezed."""
    text = _MAGIC_WORD.sub(lambda m: "" if m.group(1).isupper() else m.group(0), text)
    text = re.sub(r"\([ \t,;]*\)", "", text)  # "()", "( ; )" left by removed templates
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"[ \t]+([,.;])(?=\s|$)", r"\1", text)
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _article_url(base: str, language: str, title: str) -> str:
    parts = urlsplit(base)
    host = f"{parts.scheme}://{parts.netloc}" if parts.netloc else f"https://{language or 'en'}.wikipedia.org"
    return f"{host}/wiki/{quote(title.replace(' ', '_'), safe=':/()!,;*@$')}"


@dataclass
class _Site:
    """What a dump's header says: language, base URL, namespace prefixes."""

    language: str = ""
    base: str = ""
    namespace_names: set[str] = field(default_factory=set)  # every non-main prefix, for pages without <ns>
    file_names: set[str] = field(default_factory=lambda: set(FILE_NAMES))
    category_names: set[str] = field(default_factory=lambda: set(CATEGORY_NAMES))


def documents(path: Path, options: Options, tally: Tally) -> Iterator[dict]:
    """Cleaned main-namespace articles of one MediaWiki XML dump (plain or compressed), streamed."""
    path = Path(path)
    wanted = {lang.lower() for lang in options.languages}
    site, dbname = _Site(), ""
    root: Optional[ET.Element] = None
    language_known = False  # decided at the first page

    stream = open_text(path)
    try:
        for event, elem in ET.iterparse(stream, events=("start", "end")):
            if event == "start":
                if root is None:
                    root = elem
                continue
            tag = _local(elem.tag)
            if tag == "dbname":
                dbname = elem.text or ""
            elif tag == "base":
                site.base = elem.text or ""
            elif tag == "namespace":
                name, key = (elem.text or "").strip().lower(), elem.get("key", "")
                if name and key not in ("0", ""):
                    site.namespace_names.add(name)
                    if key == "6":
                        site.file_names.add(name)
                    elif key == "14":
                        site.category_names.add(name)
            elif tag == "siteinfo":
                root.remove(elem)
            elif tag == "page":
                if not language_known:
                    xml_lang = root.get("{http://www.w3.org/XML/1998/namespace}lang", "")
                    site.language, language_known = dump_language(dbname, site.base, xml_lang), True
                    if wanted and site.language not in wanted:
                        # the whole dump counts as one document read and dropped; its pages are not parsed
                        tally.read("")
                        tally.drop("language_not_selected", f"{path} (language {site.language or 'unknown'})")
                        return
                doc = _page(elem, path, site, options, tally)
                root.clear()
                if doc is not None:
                    yield doc
    except (ET.ParseError, *stream_errors()) as e:
        raise CorruptInput(f"{path}: cannot be read to its end ({type(e).__name__}: {e})") from e
    finally:
        stream.close()


def _page(page: ET.Element, path: Path, site: _Site, options: Options, tally: Tally) -> Optional[dict]:
    """One <page> element as a cleaned document, or None (counted as dropped)."""
    title = _child_text(page, "title") or ""
    page_id = (_child_text(page, "id") or "").strip()
    revision = _child(page, "revision")
    wikitext = (_child_text(revision, "text") if revision is not None else None) or ""
    revision_id = ((_child_text(revision, "id") if revision is not None else None) or "").strip()
    tally.read(wikitext)
    origin = f"{path.name}:{title}"
    ns = _child_text(page, "ns")
    if ns is None:  # very old dumps: no <ns>, the title's prefix tells
        prefix, colon, _ = title.partition(":")
        ns = "1" if colon and prefix.strip().lower() in site.namespace_names else "0"
    if ns.strip() != "0":
        tally.drop("not_main_namespace", origin, wikitext)
        return None
    if _child(page, "redirect") is not None or _REDIRECT.match(wikitext):
        tally.drop("redirect", origin, wikitext)
        return None
    text = clean_wikitext(wikitext, site.file_names, site.category_names)
    if len(text) < options.min_chars:
        tally.drop("too_short", origin, text)
        return None
    # the revision makes the id unique when two dumps hold the page: the same revision twice is the same
    # text, which the source's exact dedup keeps once
    doc_id = f"wikipedia-{site.language}-{page_id or title}" + (f"-rev{revision_id}" if revision_id else "")
    return make_doc(
        SOURCE,
        doc_id,
        text,
        title=title,
        page_id=int(page_id) if page_id.isdigit() else page_id,
        revision_id=int(revision_id) if revision_id.isdigit() else revision_id,
        language=site.language,
        url=_article_url(site.base, site.language, title),
    )
