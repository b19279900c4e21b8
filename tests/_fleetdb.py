"""Databases for fleet tests: a fresh SQLite file, or a fresh PostgreSQL database created
on the local server (127.0.0.1:5432, trust auth) and dropped afterwards."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

PG_ADMIN = os.environ.get("EDGE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
ENGINES = ("sqlite", "postgresql")


def _admin() -> object:
    import psycopg

    return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)


@pytest.fixture(params=ENGINES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database on each engine."""
    yield from make_db(request.param, tmp_path)


def make_db(engine: str, tmp: Path) -> Iterator[str]:
    if engine == "sqlite":
        yield f"sqlite:///{tmp / 'fleet.db'}"
        return
    import psycopg

    name = f"edge_test_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as err:
        why = " ".join(str(err).split())
        pytest.skip(f"no PostgreSQL at {PG_ADMIN} ({why}): the test command (.ci/test) "
                    "starts one when run as root, or set EDGE_TEST_PG")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def assign(where: str | Path, fleet: str, devices: Iterable[str], *groups: str,
           tags: Iterable[str] = ()) -> None:
    """Give ``devices`` the ``groups`` and ``tags`` (``KEY=VALUE``) as an operator does:
    ``edge-sdk device set`` in bulk, from an assignment file. ``where``: a database URL,
    or a release repository directory (its fleet.db)."""
    import tempfile

    from edge_sdk.cli import main

    db = ["--db", str(where)] if "://" in str(where) else ["--repo", str(where)]
    opts = [*(a for g in groups for a in ("--group", g)),
            *(a for t in tags for a in ("--tag", t))]
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write("".join(f"{d}\n" for d in devices))
        f.flush()
        code = main(["device", "set", "--file", f.name, "--fleet", fleet, *db,
                     "--operator", "provisioning", *opts])
    assert code == 0, f"edge-sdk device set failed with {code}"
