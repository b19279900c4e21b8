"""The suite's own shape: a test module never imports another test module. Shared fixtures
and helpers live in tests/_*.py (or conftest.py), so loading one test module never loads
another's tests, and a test module can be renamed or trimmed alone."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent

def imported_test_modules(source: str) -> set[str]:
    """The test modules (``test_*``) of this package that ``source`` imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            # A relative import (``from .test_a import x``) is inside this package.
            module = ("tests" + (f".{node.module}" if node.module else "") if node.level
                      else node.module or "")
            names = [module, *(f"{module}.{a.name}" for a in node.names)]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if len(parts) >= 2 and parts[0] == "tests" and parts[1].startswith("test_"):
                found.add(parts[1])
    return found


def test_no_test_module_imports_another_test_module() -> None:
    offenders = sorted(
        (path.name, imported)
        for path in TESTS.glob("*.py")
        for imported in imported_test_modules(path.read_text(encoding="utf-8"))
    )
    assert offenders == [], (
        "test modules import other test modules (move what they share to tests/_*.py): "
        f"{offenders}")


def test_the_check_sees_every_import_form() -> None:
    for source in ("from tests.test_a import x", "from tests import _e2e, test_a",
                   "import tests.test_a", "from .test_a import x", "from . import test_a",
                   "def f():\n    from tests.test_a import x"):
        assert imported_test_modules(source) == {"test_a"}, source
    for source in ("from tests._e2e import wait_for", "from tests import _e2e",
                   "import tests._process", "from edge_sdk.test_x import y"):
        assert imported_test_modules(source) == set(), source
