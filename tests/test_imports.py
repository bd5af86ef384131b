"""The import graph of bpsim: no cycles, and the library never imports the CLI.

Every module of ``bpsim/`` is read with ``ast`` (nothing is imported). An
edge ``a -> b`` means module ``a`` imports bpsim module ``b``, at module
level or inside a function: a function-level import only postpones a cycle,
it does not remove it. Imports under ``if TYPE_CHECKING:`` never run and do
not count, nor do the ``"module:attribute"`` strings of the method registry
(:func:`bpsim.methods.load`). Importing ``bpsim.a.b`` also runs the package
``bpsim.a``'s ``__init__``; that implicit edge is not counted either, so a
package may re-export its modules' names.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "bpsim"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Import nodes of ``tree``, skipping ``if TYPE_CHECKING:`` bodies."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imports(child)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def _target(name: str) -> str | None:
    """The bpsim module ``name`` refers to: itself, or the closest enclosing module."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _edges(module: str, path: Path) -> set[str]:
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    out = set()
    for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # from pkg import sub: the module pkg.sub if there is one, else pkg itself
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                     for a in node.names]
        for n in names:
            t = _target(n) if n.split(".")[0] == "bpsim" else None
            if t is not None and t != module:
                out.add(t)
    return out


GRAPH = {m: _edges(m, p) for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component of size > 1 (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:          # a shortest path back to the start, inside the component
        start, members = comp[0], set(comp)
        prev = {start: None}
        frontier = [start]
        closing = None
        while frontier and closing is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        closing = v
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if closing is not None:
                    break
            frontier = nxt
        path = [start]
        v = closing
        while v is not None and v != start:
            path.append(v)
            v = prev[v]
        out.append([start, *reversed(path[1:]), start])
    return out


def test_the_walk_finds_the_modules_and_their_imports():
    assert {"bpsim", "bpsim.trace", "bpsim.chrome", "bpsim.methods", "bpsim.cli",
            "bpsim.cli.types"} <= GRAPH.keys()
    assert "bpsim.chrome" in GRAPH["bpsim.trace"]
    assert "bpsim.cli.types" in GRAPH["bpsim.cli.train"]        # from bpsim.cli import types
    assert "bpsim.cli" not in GRAPH["bpsim.cli.train"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles in bpsim:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_library_never_imports_the_cli():
    bad = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() for t in ts
                 if (t == "bpsim.cli" or t.startswith("bpsim.cli."))
                 and not (m == "bpsim.cli" or m.startswith("bpsim.cli.") or m == "bpsim.__main__"))
    assert not bad, "library modules import the command line:\n" + "\n".join(bad)
