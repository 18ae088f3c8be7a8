"""Users' LaTeX macros, read from their definitions and expanded inline (LLaMA-1's arXiv cleaning).

LLaMA-1 (§2.1), following Lewkowycz et al. (2022), "inline-expanded definitions and macros written by
users to increase consistency across papers". `extract_macros` reads the authors' `\\newcommand`,
`\\renewcommand`, `\\providecommand`, `\\DeclareRobustCommand`, `\\DeclareMathOperator`, `\\def`
(undelimited parameters) and `\\let` of one of those, and takes the definitions out of the text;
`expand_macros` replaces each use by its body with the arguments substituted (#1..#9, an optional first
argument with its default), repeatedly until nothing changes, with a guard on depth and growth.
Comments and verbatim text must be out of the way first (`arxiv.protect_verbatim`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

MAX_EXPANSION_PASSES = 10  # macros defined in terms of macros: nesting deeper than this is left as it is
MAX_GROWTH = 4  # expansion stops once the text is this many times longer (a recursive definition)
_ENDS_IN_CONTROL_WORD = re.compile(r"\\[A-Za-z]+$")

_NEWCOMMAND = re.compile(
    r"\\(?:(?:re|provide)?newcommand|DeclareRobustCommand)\*?(?![A-Za-z])\s*|\\[gex]?def(?![A-Za-z])\s*"
    r"|\\let(?![A-Za-z])\s*|\\DeclareMathOperator(\*?)(?![A-Za-z])\s*"
)
# never expanded even if redefined: the structure the cleaning relies on
_PROTECTED = {"begin", "end", "section", "subsection", "subsubsection", "chapter", "part", "paragraph"}
_PROTECTED |= {"appendix", "bibliography", "item", "input", "include", "documentclass", "usepackage", "def"}


@dataclass
class Macro:
    """A user macro: its body with #1..#n, and the default of an optional first argument if it has one."""

    n_args: int
    body: str
    default: Optional[str] = None


def braced(text: str, start: int, open_: str = "{", close: str = "}") -> Optional[tuple[str, int]]:
    """(contents, end) of the balanced group opening at text[start] (end is just past the closer), or
    None if there is none. An escaped character (\\{, \\}, \\\\) neither opens nor closes."""
    if start >= len(text) or text[start] != open_:
        return None
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\n":
        i += 1
    return i


def _control_word(text: str, i: int) -> Optional[tuple[str, int]]:
    """(name, end) of a \\name at text[i] (letters only), or None."""
    m = re.compile(r"\\([A-Za-z]+)").match(text, i)
    return (m.group(1), m.end()) if m else None


def _parse_definition(text: str, m: re.Match) -> Optional[tuple[str, Macro, int]]:
    """(name, macro, end) of the definition whose command `m` matched, or None if it is not one we can
    expand (internal @ names, delimited parameters, bodies with package internals)."""
    command = m.group(0).strip()
    i = m.end()
    if command.startswith("\\DeclareMathOperator"):
        name_group = braced(text, i)
        if name_group is None or not re.fullmatch(r"\s*\\[A-Za-z]+\s*", name_group[0]):
            return None
        body_group = braced(text, _skip_space(text, name_group[1]))
        if body_group is None:
            return None
        star = "*" if m.group(1) else ""
        return name_group[0].strip()[1:], Macro(0, f"\\operatorname{star}{{{body_group[0]}}}"), body_group[1]
    if command.startswith("\\let"):
        target = _control_word(text, i)
        if target is None:
            return None
        j = _skip_space(text, target[1])
        if j < len(text) and text[j] == "=":
            j = _skip_space(text, j + 1)
        source = _control_word(text, j)
        if source is None:
            return None
        return target[0], Macro(-1, source[0]), source[1]  # n_args -1: an alias, resolved by the caller
    if command.startswith(("\\def", "\\gdef", "\\edef", "\\xdef")):
        word = _control_word(text, i)
        if word is None:
            return None
        params = re.compile(r"(?:#[1-9])*").match(text, word[1])
        numbers = params.group(0)[1::2]
        if numbers != "123456789"[: len(numbers)]:
            return None
        body_group = braced(text, params.end())
        if body_group is None:
            return None
        return word[0], Macro(len(numbers), body_group[0]), body_group[1]
    # \newcommand{\name}[n][default]{body}, braces around the name optional
    if text.startswith("{", i):
        name_group = braced(text, i)
        if name_group is None or not re.fullmatch(r"\s*\\[A-Za-z]+\s*", name_group[0]):
            return None
        name, i = name_group[0].strip()[1:], name_group[1]
    else:
        word = _control_word(text, i)
        if word is None:
            return None
        name, i = word
    n_args, default = 0, None
    i = _skip_space(text, i)
    n = re.compile(r"\[\s*([0-9])\s*\]").match(text, i)
    if n:
        n_args, i = int(n.group(1)), _skip_space(text, n.end())
        optional = braced(text, i, "[", "]")
        if optional is not None:
            default, i = optional[0], _skip_space(text, optional[1])
    body_group = braced(text, i)
    if body_group is None:
        return None
    return name, Macro(n_args, body_group[0], default), body_group[1]


def extract_macros(tex: str) -> tuple[dict[str, Macro], str]:
    """The user macros defined in `tex` (a later definition wins) and `tex` without their definitions.
    Definitions nested in another's body are not read on their own. Comments must be gone already."""
    macros: dict[str, Macro] = {}
    out, pos = [], 0
    for m in _NEWCOMMAND.finditer(tex):
        if m.start() < pos:
            continue
        parsed = _parse_definition(tex, m)
        if parsed is None:
            continue
        name, macro, end = parsed
        out.append(tex[pos : m.start()])
        pos = end
        if name in _PROTECTED or "@" in macro.body or "\\csname" in macro.body:
            continue
        if macro.n_args == -1:  # \let\a=\b: a copy of \b if \b is one of ours
            if macro.body in macros:
                macros[name] = macros[macro.body]
            continue
        macros[name] = macro
    out.append(tex[pos:])
    return macros, "".join(out)


def _join(left: str, right: str) -> str:
    """left + right, with a space where a control word would otherwise run into letters (\\alpha + x)."""
    if right[:1].isalpha() and _ENDS_IN_CONTROL_WORD.search(left[-64:]):
        return f"{left} {right}"
    return left + right


def _argument(text: str, i: int) -> Optional[tuple[str, int]]:
    """(argument, end) of the undelimited argument starting at text[i] (after spaces): a {group}, a
    control sequence or one character; None at the end of the text or before a closing brace."""
    i = _skip_space(text, i)
    if i >= len(text) or text[i] == "}":
        return None
    if text[i] == "{":
        return braced(text, i)
    if text[i] == "\\":
        word = _control_word(text, i)
        return (text[i : word[1]], word[1]) if word else (text[i : i + 2], i + 2)
    return text[i], i + 1


def _substitute(body: str, args: list[str]) -> str:
    """The body with #1..#9 replaced by the arguments and ## by #."""
    out = ""
    pos = 0
    for m in re.finditer(r"#(#|[1-9])", body):
        out = _join(out, body[pos : m.start()])
        k = m.group(1)
        out = _join(out, "#" if k == "#" else (args[int(k) - 1] if int(k) <= len(args) else ""))
        pos = m.end()
    return _join(out, body[pos:])


def expand_macros(tex: str, macros: dict[str, Macro]) -> str:
    """`tex` with every use of the macros replaced by its body, arguments substituted, repeated until
    nothing changes (at most MAX_EXPANSION_PASSES times, and while the text stays under MAX_GROWTH times
    its length). A use whose arguments are missing is left as it is."""
    if not macros:
        return tex
    names = sorted(macros, key=len, reverse=True)
    pattern = re.compile(r"\\(" + "|".join(map(re.escape, names)) + r")(?![A-Za-z])")
    limit = MAX_GROWTH * max(len(tex), 1)
    for _ in range(MAX_EXPANSION_PASSES):
        pieces, pos, changed = [], 0, False
        for m in pattern.finditer(tex):
            if m.start() < pos:
                continue
            macro = macros[m.group(1)]
            i, args = m.end(), []
            if macro.default is not None:
                optional = braced(tex, _skip_space(tex, i), "[", "]")
                args.append(optional[0] if optional else macro.default)
                i = optional[1] if optional else i
            while len(args) < macro.n_args:
                arg = _argument(tex, i)
                if arg is None:
                    break
                args.append(arg[0])
                i = arg[1]
            if len(args) < macro.n_args:
                continue
            if macro.n_args == 0 and tex.startswith("{}", i):  # "\name{}" stands for the name alone
                i += 2
            _append(pieces, tex[pos : m.start()])
            _append(pieces, _substitute(macro.body, args))
            pos, changed = i, True
        if not changed:
            break
        _append(pieces, tex[pos:])
        tex = "".join(pieces)
        if len(tex) > limit:
            break
    return tex


def _append(pieces: list[str], text: str) -> None:
    """Append to a text being built piece by piece, the way `_join` joins two strings."""
    if text:
        if pieces and text[0].isalpha() and _ENDS_IN_CONTROL_WORD.search(pieces[-1][-64:]):
            pieces.append(" ")
        pieces.append(text)
