"""Layers that only point down: no import cycle among the modules of pretrain/ and data_pipeline/, and
data_pipeline (which pretrain uses) never imports pretrain.

The graph is read from the source with `ast`, not by importing: an edge is an import that runs when the
module is imported (module level, class bodies, if/try/with blocks; not inside functions, where a lazy
import is allowed). Importing `a.b.c` also runs the packages `a.b` it passes through, unless the
importer is inside them already.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pretrain", "data_pipeline")


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `packages` under `root` (a package by its __init__)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _runs_on_import(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of `body` that run when the module is imported."""
    found = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            found += _runs_on_import(node.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                found += _runs_on_import(getattr(node, field, []))
    return found


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: dict) -> list[str]:
    """The modules an import statement names (`from x import y`: x.y when that is a module, else x)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the package of `module`, `level - 1` packages up
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}".rstrip(".")
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES, lazy: bool = False) -> dict[str, set[str]]:
    """Module -> the modules of `packages` its import runs (with `lazy`, also imports inside functions)."""
    modules = module_files(root, packages)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        if lazy:
            nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        else:
            nodes = _runs_on_import(tree.body)
        for node in nodes:
            for target in _targets(name, path.name == "__init__.py", node, modules):
                parts = target.split(".")
                for prefix in (".".join(parts[:k]) for k in range(1, len(parts) + 1)):
                    inside = prefix == name or name.startswith(prefix + ".")  # already being imported
                    if prefix in modules and not inside:
                        graph[name].add(prefix)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None when there is none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        path.append(node)
        for nxt in sorted(graph[node]):
            if nxt in path:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert len(graph) > 40 and "pretrain.checkpoint_layout" in graph["pretrain.consolidate"]  # the graph is real
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_data_pipeline_never_imports_pretrain():
    graph = import_graph(lazy=True)  # not even inside a function
    upward = {m: sorted(t for t in ts if t.startswith("pretrain")) for m, ts in graph.items()}
    assert {m: ts for m, ts in upward.items() if m.startswith("data_pipeline") and ts} == {}
    assert "data_pipeline.loader" in graph["pretrain.trainer"]  # pretrain does use it


def test_checkpoint_layout_is_below_consolidate_and_the_strategies():
    graph = import_graph(lazy=True)
    parallel = [m for m in graph if m.startswith("pretrain.parallel")]
    assert not [m for m in graph["pretrain.consolidate"] if m.startswith("pretrain.parallel")]
    assert graph["pretrain.checkpoint_layout"] == set()
    assert "pretrain.checkpoint_layout" in graph["pretrain.parallel.base"] | graph["pretrain.parallel.deepspeed"]
    assert len(parallel) >= 5


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_check_finds_cycles_and_allows_lazy_imports(tmp_path):
    _write(
        tmp_path,
        {
            "top/__init__.py": "",
            "top/a.py": "from top.sub import b\n",
            "top/sub/__init__.py": "from . import b\n",
            "top/sub/b.py": "from ..c import X\n\ndef f():\n    from top import a\n",
            "top/c.py": "import typing\nif typing.TYPE_CHECKING:\n    from top import a\nX = 1\n",
            "low/__init__.py": "",
            "low/d.py": "try:\n    import top.c\nexcept ImportError:\n    pass\n",
        },
    )
    graph = import_graph(tmp_path, ("top", "low"))
    assert graph["top.a"] == {"top.sub", "top.sub.b"}  # the package it passes through runs too
    assert graph["top.sub"] == {"top.sub.b"} and graph["top.sub.b"] == {"top.c"}  # relative, lazy left out
    assert graph["top.c"] == set() and graph["low.d"] == {"top", "top.c"}  # TYPE_CHECKING out, try/except in
    assert find_cycle(graph) is None
    assert "top.a" in import_graph(tmp_path, ("top", "low"), lazy=True)["top.sub.b"]
    _write(tmp_path, {"top/c.py": "class C:\n    from top.a import thing\n"})  # a class body runs on import
    cycle = find_cycle(import_graph(tmp_path, ("top", "low")))
    assert cycle[0] == cycle[-1] and set(cycle) == {"top.a", "top.sub", "top.sub.b", "top.c"}
