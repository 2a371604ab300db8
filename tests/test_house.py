"""The house rules that code can check: every module says what it is for in a docstring, rooms import
only the rooms after them in one order, and no module imports one that imports it back. Imports are
read from the source (function-level ones included), so nothing is executed."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
ROOMS = ("cli", "demo", "train", "infer", "deploy", "eval", "loading", "data", "model")
"""A room may import only rooms after it (the package `__init__` docstring says why in this order)."""
HELPERS = {"_io": None, "_lazy": None, "plots": None, "demo_config": "demo"}
"""Modules any room may import (None), or that belong to a room."""


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "genieblue").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in its source."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:  # `from . import x` imports module x
                    deps.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _room(module: str) -> str | None:
    top = module.split(".")[1] if "." in module else None
    return HELPERS.get(top, top)


def test_every_module_has_a_docstring():
    missing = [str(p.relative_to(SRC)) for p in _modules().values() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, missing


def test_no_module_imports_one_that_imports_it_back():
    assert cycles(import_graph()) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check finds one


def test_rooms_import_only_the_rooms_after_them():
    graph = import_graph()
    assert {_room(m) for m in graph} - {None} == set(ROOMS)  # every room is placed, no other exists
    upward = sorted(
        (m, d)
        for m, deps in graph.items()
        for d in deps
        if None not in (_room(m), _room(d)) and ROOMS.index(_room(d)) < ROOMS.index(_room(m))
    )
    assert not upward, upward
