"""The library's modules import each other at module level only, and without a cycle.

The demo (``ddim_jax.demo``) is an application, not the library: its CLI imports its parts
lazily, when a command needs them, and is left out.
"""

from __future__ import annotations

import ast
import pathlib

import ddim_jax

PACKAGE = pathlib.Path(ddim_jax.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    return ".".join(("ddim_jax", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def _library_files() -> list[pathlib.Path]:
    return [path for path in PACKAGE.rglob("*.py") if "demo" not in path.relative_to(PACKAGE).parts]


def _imports() -> list[tuple[str, str, int, bool]]:
    """``(module, imported library module, line, at module level)`` for each internal import."""
    modules = {_module_name(path) for path in _library_files()}
    found = []
    for path in _library_files():
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                # ``from ddim_jax import _padded`` imports the module ddim_jax._padded
                submodules = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = [m for m in submodules if m in modules] or [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            name = _module_name(path)
            for target in targets:
                if target in modules and target != name:
                    found.append((name, target, node.lineno, id(node) in top_level))
    return found


def test_imports_are_at_module_level():
    nested = [f"{name}:{line} imports {target}" for name, target, line, top in _imports() if not top]
    assert nested == []


def test_import_graph_is_acyclic():
    graph: dict[str, set[str]] = {_module_name(path): set() for path in _library_files()}
    for name, target, _, _ in _imports():
        graph[name].add(target)
    assert "ddim_jax._values" in graph and "ddim_jax._schedule" in graph
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module) :] + [module]))
        if module not in done:
            for target in sorted(graph[module]):
                visit(target, path + [module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])
