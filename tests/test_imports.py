"""The package's import graph has no cycles and no module takes another's private names.

Imports anywhere in a file count (a function-level import still ties the two modules
together); only `if TYPE_CHECKING:` blocks are left out, since they never run.
"""
from __future__ import annotations

import ast
import warnings
from pathlib import Path

PACKAGE = "lorif_stream"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST):
    """Every Import/ImportFrom node outside `if TYPE_CHECKING:` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _package_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _edges():
    """(importer, imported module, names) for every intra-package import."""
    modules = _package_modules()
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        with warnings.catch_warnings():  # a module's own escape-sequence warnings are not ours
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_text(), str(path))
        for node in _runtime_imports(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        yield name, alias.name, ()
                continue
            target = _resolve(name, is_package, node)
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in modules:  # `from pkg import submodule`
                    yield name, submodule, ()
                else:
                    yield name, target, (alias.name,)


def _graph() -> dict[str, set[str]]:
    modules = _package_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for importer, imported, _ in _edges():
        if imported in modules and imported != importer:
            graph[importer].add(imported)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
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
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walker_sees_the_package():
    graph = _graph()
    assert "lorif_stream.build" in graph and "lorif_stream.store.lmdb_store" in graph
    assert "lorif_stream.store.codec" in graph["lorif_stream.store.lmdb_store"]


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_no_private_names_imported_across_modules():
    private = sorted(
        f"{importer} takes {imported}.{name}"
        for importer, imported, names in _edges()
        for name in names
        if name.startswith("_") and not name.startswith("__") and imported != importer)
    assert private == []
