"""Habits of the code that no linter rule checks: short functions and no import circles."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# The library and the two stages, under the names they are imported by.
PACKAGES = {"fsseg": REPO / "fsseg", "fsseg.pretrain": REPO / "pretrain", "fsseg.adapt": REPO / "adapt"}
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts[:-1]) if parts[-1] == "__init__" else (package, *parts))
            found[name] = path
    return found


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these functions:\n" + "\n".join(long)


def imported_at_load(tree: ast.Module, name: str, known: set[str], is_package: bool) -> set[str]:
    """The modules of ``known`` that module ``name`` imports when it loads (top-level imports, not those inside
    functions or under ``if TYPE_CHECKING``)."""
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    parent = parent.rpartition(".")[0]
                base = f"{parent}.{base}" if base else parent
            # "from package import module" imports the module; "from module import name" the module alone
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_module_imports_itself_through_others():
    paths = modules()
    known = set(paths)
    graph = {
        name: imported_at_load(ast.parse(path.read_text()), name, known, path.name == "__init__.py")
        for name, path in paths.items()
    }
    # A package's __init__ that imports its own modules is how packages export names, not a circle.
    graph = {
        name: {t for t in targets if not (t.startswith(name + ".") and paths[name].name == "__init__.py")}
        for name, targets in graph.items()
    }
    circles, state = [], {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                circles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles:\n" + "\n".join(circles)
