"""Rules for every module of the package: no ``unittest.mock`` in library code, and no import cycle between the
modules at the package's root (the layering of its parts: ``test_layout.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

import revcol


def test_no_unittest_mock_in_the_library():
    for path in Path(revcol.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(name == "unittest" or name.startswith("unittest.") for name in imported), path.name


def _revcol_imports(path: Path) -> set[str]:
    """The ``revcol.*`` modules that module ``path`` imports anywhere (functions too), except for type checking."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "revcol":
                found |= {f"revcol.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("revcol.") and m != f"revcol.{path.stem}"}


def test_no_module_of_the_package_imports_one_that_imports_it_back():
    imports = {f"revcol.{p.stem}": _revcol_imports(p) for p in Path(revcol.__file__).parent.glob("*.py")}

    def reaches(start: str, goal: str, seen: frozenset) -> bool:
        return any(m == goal or (m not in seen and reaches(m, goal, seen | {m})) for m in imports.get(start, ()))

    cycles = sorted(m for m in imports if m != "revcol.__init__" and reaches(m, m, frozenset()))
    assert cycles == [], cycles
