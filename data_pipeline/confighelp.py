"""`--help` text for a typed config: every section and key with its default and one-line meaning.

Generated from the schema itself (the dataclasses of `pretrain.config`, `pretrain.model_args`,
`data_pipeline.config`, ...): a section's meaning is its class docstring's first line, a key's meaning
the trailing `# ...` comment on its line in the source. Nothing here imports torch, so `--help` is fast.
"""

from __future__ import annotations

import ast
import enum
import inspect
import sys
import tokenize
import typing
from dataclasses import MISSING, fields, is_dataclass
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def _comments(path: str) -> dict[int, str]:
    """Line number -> the trailing comment on it, of one source file."""
    found = {}
    with open(path, "rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type == tokenize.COMMENT:
                found[tok.start[0]] = tok.string.lstrip("#").strip()
    return found


@lru_cache(maxsize=None)
def _field_lines(path: str, class_name: str) -> dict[str, int]:
    """Field name -> the line it is declared on, for the class `class_name` of one source file."""
    tree = ast.parse(Path(path).read_text(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {
                item.target.id: item.lineno
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            }
    return {}


def field_meanings(cls: type) -> dict[str, str]:
    """Field name -> its one-line meaning (the comment on its line; '' when it has none)."""
    path = inspect.getsourcefile(cls)
    if path is None:
        return {}
    comments = _comments(path)
    return {name: comments.get(line, "") for name, line in _field_lines(path, cls.__name__).items()}


def summary(cls: type) -> str:
    """The first paragraph of a class's docstring, as one line."""
    doc = (inspect.getdoc(cls) or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


def _hints(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


def _item_dataclass(hint: typing.Any) -> type | None:
    """The dataclass of a `List[SomeConfig]` field, else None."""
    if typing.get_origin(hint) in (list, typing.List):
        (item,) = typing.get_args(hint) or (None,)
        return item if is_dataclass(item) else None
    return None


def _enum_of(hint: typing.Any) -> type | None:
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and issubclass(candidate, enum.Enum):
            return candidate
    return None


def _default_text(f) -> str:
    if f.default is not MISSING:
        value = f.default
    elif f.default_factory is not MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, str) and str(value) == "???":  # omegaconf's MISSING
        return "(required)"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:_}" if isinstance(value, int) else f"{value:g}"
    return str(value) if not isinstance(value, str) else value or "''"


def config_keys(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, default, meaning, section summary) of every leaf key of the dataclass `cls`, in schema order;
    a section is a field whose type is a dataclass, a list of dataclasses is shown as `name[i].key`."""
    rows = []
    hints, meanings = _hints(cls), field_meanings(cls)
    for f in fields(cls):
        hint, key = hints.get(f.name), f"{prefix}{f.name}"
        if is_dataclass(hint):
            rows += config_keys(hint, f"{key}.")
            continue
        item = _item_dataclass(hint)
        if item is not None:
            rows += config_keys(item, f"{key}[i].")
            continue
        meaning = meanings.get(f.name, "")
        choices = _enum_of(hint)
        if choices is not None:
            listed = " | ".join(m.value for m in choices)
            meaning = f"{listed}; {meaning}" if meaning else listed
        rows.append((key, _default_text(f), meaning, summary(cls)))
    return rows


def config_help(cls: type, how: str = "key=value after the config path") -> str:
    """The `--help` epilog listing the config `cls`: sections (with their meaning), keys, defaults, meanings."""
    rows = config_keys(cls)
    width = min(max(len(key) for key, *_ in rows) + 2, 34)
    dwidth = min(max(len(default) for _, default, *_ in rows) + 2, 32)
    lines = [f"config keys ({how}; default, meaning):"]
    section = None
    for key, default, meaning, about in rows:
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            section = head
            lines.append("")
            if head:
                lines.append(f"{head}: {about}")
        lines.append(f"  {key:<{width - 2}}  {default:<{dwidth - 2}}  {meaning}".rstrip())
    return "\n".join(lines)
