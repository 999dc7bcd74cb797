"""The package's import graph: no cycles, and imports run one way through the layers.

DESIGN's rule: edges (cli, integrations, testing) → jobs (job, store, io) → call path
(api, client, routing) → engines (runner, flow, providers, batchapi) → policies
(failure, retry, limits, tokens, config, concurrency, ...) → leaves (errors, models).
Every ``import`` counts: module level, inside functions, and under ``TYPE_CHECKING``
(a cycle hidden there is still a cycle in the design).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent / "llmbatch"

#: layer of each module, by its first name(s) after ``llmbatch.`` (lower = deeper)
LAYERS: dict[str, int] = {
    "errors": 0,
    "models": 0,
    "_log": 0,
    "context": 0,
    "failure": 1,
    "retry": 1,
    "limits": 1,
    "tokens": 1,
    "config": 1,
    "concurrency": 1,
    "cache": 1,
    "structured": 0,
    "runner": 2,
    "flow": 2,
    "providers": 2,
    "batchapi": 2,
    "api": 3,
    "client": 3,
    "routing": 3,
    "job": 4,
    "store": 4,
    "io": 4,
    "cli": 5,
    "integrations": 5,
    "metrics": 5,
    "testing": 5,
    "compat": 5,
    "__main__": 5,
    "": 6,  # the package itself (llmbatch/__init__.py): the public names
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imported(name: str, tree: ast.AST) -> set[str]:
    """The llmbatch modules *name*'s source imports, wherever the import statement is."""
    found: set[str] = set()
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imported(name, ast.parse(path.read_text())) for name, path in MODULES.items()}


def layer(name: str) -> int:
    rest = name.removeprefix("llmbatch").removeprefix(".")
    return LAYERS[rest.split(".")[0]]


def test_every_module_has_a_layer() -> None:
    """A new module must be placed in the layers (and so in DESIGN's diagram)."""
    assert [] == [
        name
        for name in MODULES
        if name.split(".", 1)[-1].split(".")[0] not in LAYERS and name != "llmbatch"
    ]


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in GRAPH[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    """No two modules import each other, directly or around a loop."""
    assert [] == cycles()


def test_imports_run_one_way_through_the_layers() -> None:
    """No module imports one of a higher layer (a package may import its own
    submodules: its ``__init__`` gathers their public names)."""
    upward = sorted(
        (name, other)
        for name, targets in GRAPH.items()
        for other in targets
        if layer(other) > layer(name) and not other.startswith(name + ".")
    )
    assert [] == upward


@pytest.mark.parametrize("name", ["llmbatch.client", "llmbatch.providers.openai"])
def test_the_graph_sees_function_level_imports(name: str) -> None:
    """Sanity: the graph is not empty where imports are known to exist."""
    assert GRAPH[name]
