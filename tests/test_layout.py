"""The package's layout stays honest: no import cycle, and no module reaches into another module's
underscored names (reads of other packages' internals live in ``_compat.py`` only)."""

from __future__ import annotations

import ast
from pathlib import Path

import fastapi_sessionmaker

PACKAGE = Path(fastapi_sessionmaker.__file__).parent
NAME = "fastapi_sessionmaker"


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join((NAME, *parts)).removesuffix(".__init__")
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def _runtime_imports(tree: ast.Module, module: str, known: set[str]) -> set[str]:
    """Package modules imported when ``module`` is imported (not under TYPE_CHECKING, not lazily)."""
    imported: set[str] = set()
    for node in tree.body:
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{module}: use absolute imports"
            base = node.module or ""
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        imported.update(t for t in targets if t in known and t != module)
    return imported


def test_the_package_has_no_import_cycle() -> None:
    trees = modules()
    known = set(trees)
    graph = {name: _runtime_imports(tree, name, known) for name, tree in trees.items()}
    # A package imports its __init__ first: importing a.b runs a/__init__.py.
    for name in list(graph):
        parent = name.rsplit(".", 1)[0]
        if parent in graph and parent != name and name != NAME:
            graph[name] = graph[name] | {parent} - {name}
    graph[NAME] = {m for m in graph[NAME] if not m.startswith(f"{NAME}.testing")}

    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if target == NAME or node.startswith(target + "."):
                continue  # a submodule importing its own package's __init__ is fine
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target] if target in path else [node, target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def _defined_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.AnnAssign,)) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            names.add(node.value)  # setattr(cls, "_name", ...) and string tables of names
    return names


ALLOWED = {"_replace", "_asdict", "_fields"}  # namedtuple's public API (SQLAlchemy's URL)


def test_no_module_reaches_into_underscored_names_defined_elsewhere() -> None:
    offences = []
    for name, tree in modules().items():
        if name.endswith("._compat"):
            continue  # the one place for other packages' internals
        own = _defined_names(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__") or node.attr in ALLOWED or node.attr in own:
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id in {"self", "cls"}:
                continue
            offences.append(f"{name}:{node.lineno}: .{node.attr}")
    assert not offences, "underscored names of other modules or packages:\n" + "\n".join(offences)
