"""The package's import graph has no cycle, counting imports made only for type checking."""

from __future__ import annotations

import ast
from pathlib import Path

import vdsmconn

ROOT = Path(vdsmconn.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from package import module` depends on that module, not on the package.
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                found.update(subs or {node.module})
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first walk (each reported once, from where it closes)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_package_imports_have_no_cycle() -> None:
    graph = import_graph()
    assert "vdsmconn.reconcile.supervisor" in graph
    assert cycles(graph) == []


def test_connectors_see_neither_the_configuration_nor_the_store() -> None:
    """Connectors get typed settings and an attachment store through their HostContext."""
    graph = import_graph()
    connectors = [m for m in graph if m.startswith("vdsmconn.connectors.")]
    assert "vdsmconn.connectors.managed" in connectors
    for module in connectors:
        assert not graph[module] & {"vdsmconn.config", "vdsmconn.state.store"}, module
