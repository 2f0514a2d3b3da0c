"""The tree keeps its shape: which room of the code may import which, and no import cycles.

Read from the source (every import statement, the lazy ones inside functions too), so a rule is
broken the moment someone writes the import, whether or not a test happens to run that path.
The rooms are described in each package's `__init__` docstring.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cluster", "workers", "pairs", "protos", "bench")

# room -> module prefixes it must never import (a prefix matches the module and its children)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "workers": ("cluster", "pairs", "bench", "ray.serve"),
    "cluster.scheduling": (
        "cluster.api",
        "cluster.transport",
        "cluster.routing",
        "cluster.serve",
        "cluster.engine",
        "cluster.cli",
        "ray",
        "grpc",
        "torch",
        "transformers",
        "protos",
    ),
    "cluster.transport": ("cluster.api", "cluster.routing", "cluster.serve", "cluster.cli", "ray"),
    "cluster.api": ("cluster.transport", "cluster.routing", "cluster.serve", "cluster.cli", "ray"),
    "cluster.routing": ("cluster.serve", "cluster.cli", "ray"),
    "cluster.observability": (
        "cluster.serve",
        "cluster.routing",
        "cluster.transport",
        "cluster.cli",
        "ray",
        "grpc",
        "torch",
    ),
    "cluster.config": ("cluster.serve", "cluster.routing", "ray", "grpc", "torch"),
    "cluster.engine": ("cluster.serve", "cluster.routing", "cluster.api", "ray", "grpc"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if not path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                found[module_name(path)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module `name` imports; `from pkg import mod` counts as importing pkg.mod."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)
    return out


MODULES = source_modules()
GRAPH = {name: imports_of(name, path, set(MODULES)) for name, path in MODULES.items()}


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_imports_point_one_way(room):
    broken = {
        f"{mod} imports {imp}"
        for mod, imps in GRAPH.items()
        if under(mod, room)
        for imp in imps
        for banned in FORBIDDEN[room]
        if under(imp, banned)
    }
    assert not broken, sorted(broken)


def test_only_the_serve_room_and_tensor_parallel_workers_import_ray():
    users = {m for m, imps in GRAPH.items() for i in imps if under(i, "ray")}
    allowed = ("cluster.serve", "cluster.cli", "workers.tp", "bench")
    assert {m for m in users if not any(under(m, a) for a in allowed)} == set()


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                found.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    # A module importing its own package's __init__ (for a constant) is not a cycle.
    graph = {m: {i for i in imps if not under(m, i)} for m, imps in GRAPH.items()}
    assert cycles(graph) == []


def test_the_checks_see_what_they_guard():
    # Not vacuous: the graph holds the imports we know are there, and a cycle is found.
    assert "cluster.scheduling.rows" in GRAPH["cluster.scheduling.scheduler"]
    assert "cluster.scheduling" in FORBIDDEN and any(under(m, "cluster.scheduling") for m in GRAPH)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    by_room = defaultdict(int)
    for m in GRAPH:
        by_room[m.split(".")[0]] += 1
    assert all(by_room[p] for p in ("cluster", "workers", "pairs"))
