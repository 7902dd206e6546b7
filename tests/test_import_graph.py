"""The import graph of ``p2plab`` and ``rendezvous_service_code`` runs one way.

Issue 13: no import cycles (imports inside functions and under ``TYPE_CHECKING`` included: a
cycle held together by a function-level import is still a cycle), no private name imported
across modules, and nothing in ``p2plab/core`` that does I/O or reads a clock.  The graph is
built with :mod:`ast` from the source, so importing nothing can hide an edge.

Run ``python -m tests.test_import_graph`` to print the graph and any cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("p2plab", "rendezvous_service_code")
CORE_FORBIDDEN = {"asyncio", "socket", "time", "random", "threading", "selectors"}


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, str, int]]:
    """``(target module, imported name or "", line)`` for every import in ``path``."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out: list[tuple[str, str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in mods:
                    out.append((sub, "", node.lineno))
                else:
                    out.append((target, alias.name, node.lineno))
    return out


def graph() -> tuple[dict[str, set[str]], list[str]]:
    """Edges between our modules (package ``__init__`` re-exports excluded as targets) and every
    private name imported across modules."""
    mods = _modules()
    inits = {m for m, p in mods.items() if p.name == "__init__.py"}
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private: list[str] = []
    for name, path in mods.items():
        for target, imported, line in _imports(name, path, mods):
            if target.split(".")[0] not in PACKAGES:
                continue
            if target in mods and target != name and target not in inits:
                edges[name].add(target)
            if imported.startswith("_") and not imported.startswith("__") and target != name:
                private.append(f"{path.relative_to(ROOT)}:{line}: {target}.{imported}")
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    edges, _ = graph()
    assert cycles(edges) == []


def test_no_private_names_imported_across_modules() -> None:
    _, private = graph()
    assert private == []


def test_core_does_no_io_and_reads_no_clock() -> None:
    mods = _modules()
    bad = [
        f"{name}: {target}"
        for name, path in mods.items()
        if name.startswith("p2plab.core")
        for target, _, _ in _imports(name, path, mods)
        if target.split(".")[0] in CORE_FORBIDDEN
    ]
    assert bad == []


def test_core_imports_nothing_above_it() -> None:
    edges, _ = graph()
    up = [
        f"{m} -> {t}"
        for m, targets in edges.items()
        if m.startswith("p2plab.core")
        for t in targets
        if not t.startswith("p2plab.core") and t not in ("p2plab.errors", "p2plab.config")
    ]
    assert up == []


def test_the_checker_sees_a_cycle_and_a_private_import(tmp_path: Path) -> None:
    """The graph code itself: a two-module cycle through a function-level import is found."""
    edges = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert cycles(edges) == [["a", "b"]]
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from p2plab.core.stun import _x\n")
    found = _imports("p2plab.m", src, {"p2plab.core.stun": src})
    assert ("p2plab.core.stun", "_x", 2) in found


if __name__ == "__main__":
    e, p = graph()
    for m in sorted(e):
        if e[m]:
            print(f"{m} -> {', '.join(sorted(e[m]))}")
    print("cycles:", cycles(e) or "none")
    print("private imports:", len(p))
    for line in p:
        print("  ", line)
