"""The house's import layering: stages and the command line on top, no import circles.

Every ``medseg/**/*.py`` is parsed with ``ast``; every import counts, at module level or inside a
function, relative or absolute. ``from pkg import name`` counts as importing ``pkg.name`` where
that is a module of medseg, and ``pkg`` otherwise.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "medseg"
TOP_LAYER = ("medseg.stages", "medseg.cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The medseg modules that module ``name`` (read from ``path``) imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in known else source)
    return {target for target in found if target in known and target != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _in_layer(name: str, layer: str) -> bool:
    return name == layer or name.startswith(layer + ".")


def _is_top(name: str) -> bool:
    return any(_in_layer(name, layer) for layer in TOP_LAYER)


def _components(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan): groups that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle of imports per strongly connected component, as a closed path."""
    return [_closed_path(graph, component) for component in _components(graph)]


def _closed_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One circle through the component's smallest module: a breadth-first path back to it."""
    start = min(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if target not in came_from:
                    came_from[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no circle through {start} in {sorted(component)}")


def test_parser_counts_every_kind_of_import(tmp_path: Path) -> None:
    """Relative imports, imports inside functions and under TYPE_CHECKING, and ``from pkg import submodule``."""
    source = tmp_path / "a.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import b\n"
        "from .sub import thing\n"
        "from medseg import c\n"
        "if TYPE_CHECKING:\n"
        "    from medseg.d import Model\n"
        "def f():\n"
        "    import medseg.e\n"
        "    from ..outside import x\n"
    )
    known = {"medseg", "medseg.pkg", "medseg.pkg.a", "medseg.pkg.b", "medseg.pkg.sub", "medseg.c", "medseg.d",
             "medseg.e", "medseg.outside"}
    found = _imports("medseg.pkg.a", source, known)
    assert found == {"medseg.pkg.b", "medseg.pkg.sub", "medseg.c", "medseg.d", "medseg.e", "medseg.outside"}


def test_cycles_are_found_with_their_path() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_graph_of_medseg_sees_function_level_and_submodule_imports() -> None:
    graph = _graph()
    assert "medseg.stages.plan" in graph["medseg.cli"]  # imported inside a command function
    assert "medseg.services.process" in graph["medseg.services.slurm"]  # from medseg.services import process
    assert "medseg.errors" in graph["medseg.config"]


def test_only_stages_and_cli_import_stages() -> None:
    offenders = sorted(
        f"{name} imports {target}"
        for name, targets in _graph().items()
        if not _is_top(name)
        for target in sorted(targets)
        if _in_layer(target, "medseg.stages")
    )
    assert not offenders, "modules below the stages import a stage:\n" + "\n".join(offenders)


def test_no_import_cycles() -> None:
    graph = _graph()
    found = [
        f"{' -> '.join(_closed_path(graph, group))} (the group: {', '.join(sorted(group))})"
        for group in _components(graph)
    ]
    assert not found, "import cycles among medseg's modules:\n" + "\n".join(found)
