"""The package's import graph, read from the source (``ast``), every import at module level and inside functions.

:func:`import_closure` gives the modules a set of entry points reaches; :func:`hada.runs.code_digest` hashes the
closure of the code that computes a run's result, and ``tests/test_boundary.py`` checks with it that no computing
module reaches presentation code and that no import circle exists.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "hada"


def package_modules(root: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file under ``root`` (the ``hada`` package's folder)."""
    root = Path(root)
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imported_names(module: str, path: Path, tree: ast.AST) -> set[str]:
    names = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: None if is_package else -1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            names.add(origin)
            names.update(f"{origin}.{alias.name}" for alias in node.names)  # a submodule imported by name
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: the package's modules it imports}``, imports inside functions included; a name that is not a
    module (``from hada.x import f``) counts as its module."""
    modules = package_modules(root)
    graph = {}
    for module, path in modules.items():
        edges = set()
        for name in _imported_names(module, path, ast.parse(path.read_text(encoding="utf-8"))):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                edges.add(name)
        graph[module] = edges
    return graph


def import_closure(roots, graph: dict[str, set[str]]) -> set[str]:
    """The modules ``roots`` reach through ``graph``, the roots included."""
    seen, todo = set(), list(roots)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out
