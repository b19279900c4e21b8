"""The fleet database on SQLite and PostgreSQL: migrations, refusals, the read API."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from edge_sdk.fleet import SCHEMA_VERSION, FleetDB, FleetError, FleetUsageError
from tests import _fleetdb

db_url = _fleetdb.db_url  # the fixture: one empty database per engine


def test_open_creates_the_schema_once_and_reopens(db_url: str) -> None:
    with FleetDB.open(db_url) as db:
        assert db.devices() == [] and db.rollouts() == [] and db.audit() == []
    with FleetDB.open(db_url) as db, db.begin() as c:
        versions = c.execute(sa.text("SELECT version FROM schema_version")).scalars().all()
    assert versions == list(range(1, SCHEMA_VERSION + 1))


def test_a_newer_schema_is_refused_and_left_unchanged(db_url: str) -> None:
    with FleetDB.open(db_url) as db, db.begin() as c:
        c.execute(sa.text("INSERT INTO schema_version (version, applied) VALUES (99, 0)"))
    with pytest.raises(FleetError, match="schema version 99, newer than"):
        FleetDB.open(db_url)
    with _raw(db_url) as c:
        assert sorted(c.execute(sa.text("SELECT version FROM schema_version")).scalars()) \
            == [*range(1, SCHEMA_VERSION + 1), 99]


class _raw:
    def __init__(self, url: str) -> None:
        from edge_sdk.fleet._db import engine_url

        self.engine = sa.create_engine(engine_url(url))

    def __enter__(self) -> sa.Connection:
        self.conn = self.engine.connect()
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()
        self.engine.dispose()


def test_an_unreachable_database_is_one_line(tmp_path) -> None:
    with pytest.raises(FleetError, match="cannot reach database") as err:
        FleetDB.open("postgresql://postgres@127.0.0.1:1/nope")
    assert "\n" not in str(err.value)
    with pytest.raises(FleetError, match="does not exist"):
        FleetDB.open(f"sqlite:///{tmp_path / 'no' / 'such' / 'fleet.db'}")
    with pytest.raises(FleetUsageError, match="must start with"):
        FleetDB.open("mysql://x")


def test_audit_rows_keep_actor_action_and_parameters_in_order(db_url: str) -> None:
    with FleetDB.open(db_url) as db:
        db.record_audit("alice", "release.add", {"model": "m", "version": "1"})
        db.record_audit("bob", "rollout.pause", {"rollout": 3})
        rows = db.audit()
    assert [(r["actor"], r["action"], r["params"]) for r in rows] == [
        ("alice", "release.add", {"model": "m", "version": "1"}),
        ("bob", "rollout.pause", {"rollout": 3})]
    json.dumps(rows)


def test_unknown_rollout_is_a_usage_error(db_url: str) -> None:
    with FleetDB.open(db_url) as db, pytest.raises(FleetUsageError, match="no rollout 7"):
        db.rollout(7)
