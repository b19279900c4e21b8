"""The fleet's SQL lives in its store (``edge_sdk.fleet._store``) only.

The import-linter contract keeps the rest of ``edge_sdk.fleet`` from importing a
database driver or SQLAlchemy; this test catches SQL written as text, which needs no
import (``exec_driver_sql("SELECT ...")`` on a connection the store handed out)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import edge_sdk.fleet

FLEET = Path(edge_sdk.fleet.__file__).parent
STORE = FLEET / "_store"

#: An SQL statement as text: keywords in capitals, as SQL is written here.
SQL = re.compile(r"\b(SELECT\s+[\w\s,.*()]+?\s+FROM\s|SELECT\s+\w+\s*\(|INSERT\s+INTO\s"
                 r"|UPDATE\s+\w+\s+SET\s|DELETE\s+FROM\s|(CREATE|ALTER|DROP)\s+(TABLE|INDEX)\s"
                 r"|PRAGMA\s+\w+|BEGIN\s+IMMEDIATE)")


def _sql_strings(path: Path) -> list[str]:
    """``line: text`` of every string literal (f-string parts too) that holds SQL."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and SQL.search(node.value):
            found.append(f"{node.lineno}: {node.value[:80]!r}")
    return found


def test_no_sql_statement_outside_the_fleet_store() -> None:
    outside = {str(p.relative_to(FLEET)): _sql_strings(p)
               for p in sorted(FLEET.rglob("*.py")) if STORE not in p.parents}
    assert outside, "no fleet module found"
    offenders = {p: s for p, s in outside.items() if s}
    assert not offenders, f"SQL outside edge_sdk.fleet._store: {offenders}"


def test_the_check_finds_the_sql_the_store_writes_as_text() -> None:
    # The store has a few statements as text (an advisory lock, a migration's ALTER
    # TABLE, SQLite pragmas): the pattern must see them, or the test above proves nothing.
    inside = [s for p in sorted(STORE.rglob("*.py")) for s in _sql_strings(p)]
    assert any("pg_advisory_xact_lock" in s for s in inside), inside
    assert any("ALTER TABLE" in s for s in inside), inside
