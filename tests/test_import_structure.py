"""The package's import graph has no circles, and no module reaches for another's private names.

The modules are parsed with ``ast``, never imported. Every ``import``/``from ... import`` between
``aligner`` modules counts, those inside functions too (a function-level import is the usual way to
hide a circle); only imports under ``if TYPE_CHECKING:`` are left out, since they never run.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "aligner"


@dataclass(frozen=True)
class Import:
    """One imported name (``from X import name``) or module (``import X``) between package modules."""

    source: str  # the importing module
    target: str  # the module the import runs: X.name when that is a module, else X
    name: str | None  # for ``from X import name``: the name; None for ``import X``
    from_module: str  # X
    line: int


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package at ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _runtime_imports(tree: ast.AST):
    """Yield the Import/ImportFrom nodes that can run: everything but ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    if not is_package:
        parts = parts[:-1]
    parts = parts[: len(parts) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def collect_imports(root: Path) -> tuple[dict[str, Path], list[Import]]:
    """The package's modules, and every import between them that can run."""
    modules = module_files(root)
    package = root.name

    def _in_package(name: str) -> bool:
        return name == package or name.startswith(package + ".")

    imports = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _runtime_imports(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _in_package(alias.name):
                        imports.append(Import(module, alias.name, None, alias.name, node.lineno))
                continue
            base = _absolute(module, path.name == "__init__.py", node)
            if not _in_package(base):
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                target = submodule if submodule in modules else base
                imports.append(Import(module, target, alias.name, base, node.lineno))
    return modules, imports


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; returns the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
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
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(imports: list[Import]) -> list[Import]:
    """``from X import _name`` from another module, and ``import X._module``; dunder names are fine."""
    return [imp for imp in imports
            if (imp.name is not None and _private(imp.name) and imp.from_module != imp.source)
            or (imp.name is None and any(_private(part) for part in imp.from_module.split(".")))]


def import_cycles(modules: dict[str, Path], imports: list[Import]) -> list[list[str]]:
    """Each group of modules that import each other, directly or around a circle."""
    edges: dict[str, set[str]] = {module: set() for module in modules}
    for imp in imports:
        if imp.target in modules and imp.target != imp.source:
            edges[imp.source].add(imp.target)
    return strongly_connected(edges)


def _grouped(imports: list[Import]) -> list[str]:
    """``from X import a, b`` as one line, not one per name."""
    names: dict[tuple[str, int, str], list[str]] = {}
    for imp in imports:
        names.setdefault((imp.source, imp.line, imp.from_module), []).append(imp.name or "")
    return [f"{source}, line {line}: " + (f"from {module} import {', '.join(n)}" if any(n) else f"import {module}")
            for (source, line, module), n in sorted(names.items())]


@pytest.fixture(scope="module")
def graph():
    return collect_imports(ROOT)


def test_the_walk_sees_the_package(graph):
    modules, imports = graph
    assert {"aligner", "aligner.cli", "aligner.commands.label", "aligner.data.tokenize"} <= set(modules)
    assert any(imp.source == "aligner.cli" for imp in imports)


def test_no_private_names_imported_across_modules(graph):
    _, imports = graph
    offenders = private_imports(imports)
    if offenders:
        pytest.fail("private names imported from another module (make them public, or move them to a module "
                    "both sides can import):\n" + "\n".join(f"  {line}" for line in _grouped(offenders)),
                    pytrace=False)


def test_no_import_cycles(graph):
    modules, imports = graph
    cycles = import_cycles(modules, imports)
    if cycles:
        lines = ["import cycles (move what both sides need to a module below both; a function-level import "
                 "still counts):"]
        for component in cycles:
            members = set(component)
            lines.append("  " + " / ".join(component))
            lines += [f"      {line}" for line in _grouped(
                [imp for imp in imports if imp.source in members and imp.target in members
                 and imp.target != imp.source])]
        pytest.fail("\n".join(lines), pytrace=False)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_checks_find_hidden_cycles_and_private_names(tmp_path):
    root = _write(tmp_path, {
        "pkg/__init__.py": "from pkg.api import run\n",
        "pkg/api.py": "def run():\n    from pkg import low\n    return low.x\n",
        "pkg/low.py": "import pkg\nx = pkg.__name__\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/a.py": "from . import b\nfrom ..low import _hidden, __doc__\n",
        "pkg/sub/b.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub import a\n"
                         "else:\n    import pkg.sub._impl\n"),
        "pkg/sub/_impl.py": "",
    })
    modules, imports = collect_imports(root)
    assert import_cycles(modules, imports) == [["pkg", "pkg.api", "pkg.low"]]
    assert _grouped(private_imports(imports)) == ["pkg.sub.a, line 2: from pkg.low import _hidden",
                                                  "pkg.sub.b, line 5: import pkg.sub._impl"]
